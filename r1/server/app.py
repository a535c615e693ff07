"""The HTTP server: an OpenAI-compatible API, metrics and the chat page, on Starlette and uvicorn.

Owns the routes, the API key, the request-size limit, the served model's name, error responses
in OpenAI's shape with the right status, and running uvicorn: printing where it listens, and on
SIGINT or SIGTERM giving in-flight requests a grace period before aborting them. If the engine
dies, /health answers 503 and `serve` returns with an error, so a supervisor restarts it.

It also owns what keeps web pages the user visits from driving the server: API bodies must be
JSON (a cross-origin page can only send JSON after a CORS preflight, which fails unless
--cors-origin names it), a Host header must be an IP address or a name the server answers (a page
that rebinds its own DNS name to this machine comes under that name), and a server reachable from
other machines needs an API key unless told --insecure. Generation (prompts, streams, usage) is
serving.py's; the wire format is protocol.py's; the engine runs behind `AsyncLLM`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import secrets
import socket
from dataclasses import dataclass
from pathlib import Path

import uvicorn
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from r1.engine import AsyncLLM
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
    # The Host names answered besides IP addresses (None: any; see host_allowlist).
    allowed_hosts: tuple[str, ...] | None = ("localhost",)
    cors_origins: tuple[str, ...] = ()  # browser origins allowed to call the API

    def __post_init__(self):
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("the API key is empty, which any client would match: give a key, or none")


def is_loopback(host: str) -> bool:
    ip = _ip(host)
    return host == "localhost" or (ip is not None and ip.is_loopback)


def check_exposure(host: str, api_key: str | None, insecure: bool) -> None:
    """Refuse (ValueError) to serve beyond this machine without an API key, unless insecure."""
    if not is_loopback(host) and api_key is None and not insecure:
        raise ValueError(
            f"--host {host} lets other machines reach the server, and without --api-key (or "
            f"R1_API_KEY) anyone who can reach it can use it; give a key, or --insecure "
            f"if the network is yours alone"
        )


def host_allowlist(host: str, api_key: str | None, extra: tuple[str, ...] = ()) -> tuple[str, ...] | None:
    """The Host names a server bound to `host` answers, IP addresses aside (None: any).

    A page that rebinds its own DNS name to this machine reaches the server under that name, never
    under an IP address, so names are what is checked. On loopback, and beyond it without an API
    key, only localhost, this machine's names and `extra` pass; beyond loopback with a key, the key
    guards the server and any name does (unless `extra` lists them).
    """
    if api_key is not None and not is_loopback(host):
        return ("localhost", *map(_host_name, extra)) if extra else None
    names = ("localhost",) if is_loopback(host) else ("localhost", socket.gethostname(), socket.getfqdn())
    return tuple(dict.fromkeys(map(_host_name, (*names, *extra))))


def _host_name(host: str) -> str:
    """A Host header's name: lowercase, without its port or a trailing dot ('[::1]' stays so)."""
    name, _, port = host.rpartition(":")
    if not (name and port.isascii() and port.isdigit()):
        name = host
    return name.lower().rstrip(".")


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address a host names literally ('[::1]' as Host headers spell IPv6), or None."""
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def build_app(llm, config: ServerConfig, on_engine_dead=None) -> Starlette:
    """The ASGI app for a loaded `LLM`; its engine thread starts and stops with the app's lifespan.

    One app per LLM: that thread must be the only one driving `llm.engine`. on_engine_dead is
    called (on the engine's thread) with the error if the engine dies.
    """
    serving = Serving(llm, config.served_model_name)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        serving.engine = AsyncLLM(llm.engine, max_requests=config.max_requests, on_dead=on_engine_dead)
        try:
            yield
        finally:
            await asyncio.to_thread(serving.engine.close)

    async def parse(request: Request, model: type[protocol.APIModel]):
        _authorize(request, config.api_key)
        media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        if media_type != "application/json":
            raise APIError(
                415,
                f"the body must be JSON (Content-Type: application/json), not {media_type or 'untyped'}",
                code="unsupported_media_type",
            )
        body = await _read_body(request, config.max_body_bytes)
        try:
            parsed = model.model_validate_json(body)
        except ValidationError as e:
            raise APIError.from_validation(e) from None
        if parsed.model is not None and parsed.model != config.served_model_name:
            raise APIError(
                404,
                f"the model {parsed.model!r} does not exist; this server serves {config.served_model_name!r}",
                param="model",
                code="model_not_found",
            )
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
                raise APIError(
                    404, f"the model {request.path_params['model']!r} does not exist", code="model_not_found"
                )
            return JSONResponse(card)
        return JSONResponse({"object": "list", "data": [card]})

    async def health(request: Request) -> Response:
        engine = serving.engine
        if engine is not None and engine.is_alive:
            return JSONResponse({"status": "ok"})
        status = str(engine.dead) if engine is not None and engine.dead else "engine stopped"
        return JSONResponse({"status": status}, status_code=503)

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
    if config.cors_origins:
        # The origins are the control; SDKs send headers of their own (x-stainless-*) in preflights.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(config.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["*"],
            expose_headers=["Retry-After"],
        )
    if config.allowed_hosts is not None:
        app.add_middleware(_AllowedHosts, hosts=config.allowed_hosts)
    app.add_middleware(_CountRequests, metrics=serving.metrics)
    app.state.serving = serving
    return app


def _authorize(request: Request, api_key: str | None) -> None:
    if api_key is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), api_key.encode()):
        raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')", code="invalid_api_key")


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


class _AllowedHosts:
    """ASGI middleware: a 403 for a Host header that names neither an IP address nor a listed name.

    No Host at all passes: browsers always send one, and HTTP/1.0 health checks may not.
    """

    def __init__(self, app, hosts: tuple[str, ...]):
        self.app, self.hosts = app, set(map(_host_name, hosts))

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        header = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
        name = _host_name(header)
        if not header or _ip(name) is not None or name in self.hosts:
            return await self.app(scope, receive, send)
        error = APIError(
            403,
            f"the Host header {header!r} is not one this server answers; start it with "
            f"--allowed-host NAME to allow a name",
            code="host_not_allowed",
        )
        await error.response()(scope, receive, send)


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


def serve(
    llm,
    config: ServerConfig,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "warning",
    insecure: bool = False,
) -> None:
    """Run the server until SIGINT or SIGTERM; prints where it listens once it does.

    Raises ValueError for a host beyond loopback without an API key unless insecure (check_exposure),
    and EngineDeadError, after the waiting requests have had their errors, if the engine dies.
    """
    check_exposure(host, config.api_key, insecure)
    sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    bound_port = sock.getsockname()[1]
    app = build_app(llm, config, on_engine_dead=lambda error: setattr(server, "should_exit", True))
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=SHUTDOWN_GRACE_SECONDS))

    async def run():
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started and not task.done():
            await asyncio.sleep(0.05)
        if server.started:
            url = f"http://{host if ':' not in host else f'[{host}]'}:{bound_port}"
            print(f"r1 serves {config.served_model_name} at {url} (OpenAI API {url}/v1, chat page {url}/)", flush=True)
        await task

    asyncio.run(run())
    engine = app.state.serving.engine
    if engine is not None and engine.dead is not None:
        raise engine.dead
