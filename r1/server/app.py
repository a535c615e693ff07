"""The HTTP server: an OpenAI-compatible API, metrics and the chat page, on Starlette and uvicorn.

Owns the routes, the API key, the request-size limit, the served model's name, error responses
in OpenAI's shape with the right status, and running uvicorn: printing where it listens, and on
SIGINT or SIGTERM giving in-flight requests a grace period before aborting them. Generation
(prompts, streams, usage) is serving.py's; the wire format is protocol.py's; the engine runs
behind `AsyncLLM`.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
from dataclasses import dataclass
from pathlib import Path

import uvicorn
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from r1.engine.async_llm import AsyncLLM
from r1.server import protocol
from r1.server.errors import APIError
from r1.server.metrics import CONTENT_TYPE, Metrics
from r1.server.serving import Serving

STATIC = Path(__file__).parent / "static"
MAX_BODY_BYTES = 4 << 20  # R1's whole 128K-token context is about 0.5 MiB of text
SHUTDOWN_GRACE_SECONDS = 5.0  # in-flight requests get this long to finish; then they are aborted


@dataclass
class ServerConfig:
    served_model_name: str
    api_key: str | None = None
    max_requests: int = 256  # unfinished requests (running and waiting) before new ones get a 503
    max_body_bytes: int = MAX_BODY_BYTES


def build_app(llm, config: ServerConfig) -> Starlette:
    """The ASGI app for a loaded `LLM`; its engine thread starts and stops with the app's lifespan.

    One app per LLM: that thread must be the only one driving `llm.engine`.
    """
    serving = Serving(llm, config.served_model_name)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        serving.engine = AsyncLLM(llm.engine, max_requests=config.max_requests)
        try:
            yield
        finally:
            await asyncio.to_thread(serving.engine.close)

    async def parse(request: Request, model: type[protocol.APIModel]):
        _authorize(request, config.api_key)
        body = await _read_body(request, config.max_body_bytes)
        try:
            parsed = model.model_validate_json(body)
        except ValidationError as e:
            raise APIError.from_validation(e) from None
        if parsed.model is not None and parsed.model != config.served_model_name:
            raise APIError(404, f"the model {parsed.model!r} does not exist; this server serves "
                                f"{config.served_model_name!r}", param="model", code="model_not_found")
        return parsed

    async def chat_completions(request: Request) -> Response:
        return await serving.chat(request, await parse(request, protocol.ChatCompletionRequest))

    async def completions(request: Request) -> Response:
        return await serving.complete(request, await parse(request, protocol.CompletionRequest))

    async def tokenize(request: Request) -> Response:
        return JSONResponse(await serving.tokenize(await parse(request, protocol.TokenizeRequest)))

    async def detokenize(request: Request) -> Response:
        return JSONResponse(serving.detokenize(await parse(request, protocol.DetokenizeRequest)))

    async def models(request: Request) -> Response:
        _authorize(request, config.api_key)
        card = protocol.model_card(config.served_model_name, llm.engine.max_model_len)
        if "model" in request.path_params:
            if request.path_params["model"] != config.served_model_name:
                raise APIError(404, f"the model {request.path_params['model']!r} does not exist",
                               code="model_not_found")
            return JSONResponse(card)
        return JSONResponse({"object": "list", "data": [card]})

    async def health(request: Request) -> Response:
        alive = serving.engine is not None and serving.engine.is_alive
        return JSONResponse({"status": "ok" if alive else "engine stopped"}, status_code=200 if alive else 503)

    async def metrics(request: Request) -> Response:
        return Response(serving.metrics.render(), media_type=CONTENT_TYPE)

    async def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html")

    routes = [
        Route("/", index),
        Route("/health", health),
        Route("/metrics", metrics),
        Route("/v1/models", models),
        Route("/v1/models/{model:path}", models),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/tokenize", tokenize, methods=["POST"]),
        Route("/detokenize", detokenize, methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC)),
    ]
    handlers = {APIError: _api_error, HTTPException: _http_error, Exception: _server_error}
    app = Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan)
    app.add_middleware(_CountRequests, metrics=serving.metrics)
    app.state.serving = serving
    return app


def _authorize(request: Request, api_key: str | None) -> None:
    if api_key is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), api_key.encode()):
        raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                       code="invalid_api_key")


async def _read_body(request: Request, limit: int) -> bytes:
    too_large = APIError(413, f"the request body is over the limit of {limit} bytes", code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


async def _api_error(request: Request, exc: APIError) -> Response:
    return exc.response()


async def _http_error(request: Request, exc: HTTPException) -> Response:
    message = "no such route" if exc.status_code == 404 else exc.detail
    return APIError(exc.status_code, f"{request.method} {request.url.path}: {message}").response()


async def _server_error(request: Request, exc: Exception) -> Response:
    return APIError(500, f"internal error: {type(exc).__name__}", type_="server_error").response()


class _CountRequests:
    """ASGI middleware: counts every HTTP response by route and status."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def send_counting(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_counting)
        finally:
            self.metrics.count_http(scope["path"], status)


def serve(llm, config: ServerConfig, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning") -> None:
    """Run the server until SIGINT or SIGTERM; prints where it listens once it does."""
    sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    bound_port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(build_app(llm, config), log_level=log_level,
                                           timeout_graceful_shutdown=SHUTDOWN_GRACE_SECONDS))

    async def run():
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started and not task.done():
            await asyncio.sleep(0.05)
        if server.started:
            url = f"http://{host if ':' not in host else f'[{host}]'}:{bound_port}"
            print(f"r1 serves {config.served_model_name} at {url} (OpenAI API {url}/v1, chat page {url}/)",
                  flush=True)
        await task

    asyncio.run(run())
