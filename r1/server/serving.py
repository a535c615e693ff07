"""Serving OpenAI requests: prompts to engine requests, engine outputs to responses and streams.

Owns what happens between a validated request and its answer: admission (whether the engine has
room for the call's samples, asked before any tokenizing or grammar compiling), encoding the
prompt (off the event loop), checking it against the context, expanding n into seeded samples
with a grammar constraint each, adding them to the engine as one group, and then either
collecting the outputs into one response or streaming them as server-sent events. A client that
goes away mid-request aborts its group, so the KV blocks come back. A request that fails in the
engine gets a 500 (in-band once a stream has begun) and leaves the others alone; a dead engine
answers 503. It also keeps the usage and metrics accounting. It does not own routing,
authentication or parsing (app.py, protocol.py).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator

import jinja2
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from r1.engine import (
    AsyncLLM,
    EngineDeadError,
    EngineRequest,
    EngineStats,
    PromptTooLongError,
    QueueFullError,
    RequestOutput,
    RequestStream,
)
from r1.llm import expand_samples
from r1.sampling_params import ParamError
from r1.server import protocol
from r1.server.errors import APIError
from r1.server.metrics import Metrics
from r1.server.structured import StructuredOutputs

CLIENT_CLOSED = 499  # nginx's status for "the client went away first": what /metrics counts


@dataclass
class _Sample:
    """One choice being collected."""

    reasoning: str = ""
    answer: str = ""
    text: str = ""
    logprobs: list[dict] = field(default_factory=list)
    finish_reason: str | None = None


class _Usage:
    def __init__(self, prompt_tokens: int):
        self.prompt_tokens = prompt_tokens
        self.completion = {}  # request id -> tokens generated
        self.reasoning = {}  # request id -> of those, the reasoning block's
        self.cached_tokens = 0

    def add(self, out: RequestOutput) -> None:
        self.completion[out.request_id] = out.num_output_tokens
        self.reasoning[out.request_id] = out.num_reasoning_tokens
        self.cached_tokens = max(self.cached_tokens, out.num_cached_tokens)

    def as_dict(self) -> dict:
        return protocol.usage(
            self.prompt_tokens, sum(self.completion.values()), self.cached_tokens, sum(self.reasoning.values())
        )


class Serving:
    def __init__(self, llm, served_model_name: str):
        self.llm = llm
        self.model_name = served_model_name
        self.engine: AsyncLLM | None = None  # started by the app's lifespan
        self.metrics = Metrics(lambda: self.engine.stats if self.engine else EngineStats())
        self.structured = StructuredOutputs(llm.tokenizer, llm.config.vocab_size, sorted(llm.engine.eos_token_ids))
        self.logprobs = protocol.LogprobFormatter(llm.tokenizer)

    # ---- endpoints ---------------------------------------------------------------------------

    async def chat(self, request: Request, req: protocol.ChatCompletionRequest) -> Response:
        params = _checked(req.to_sampling_params)
        self._admit(params.n, "n")
        ids = await self._encode(protocol.engine_messages(req.messages), chat=True)
        self._check_length(len(ids), params.max_tokens, "messages")
        samples = expand_samples(params)
        response_format = req.response_format.as_dict() if req.response_format else None
        # The first grammar built also builds llguidance's tokenizer (~1 s), so off the event loop.
        constraints = await asyncio.to_thread(_checked, self.structured.constraints, response_format, len(samples))
        id_ = f"chatcmpl-{uuid.uuid4().hex}"
        stream = await self._add(
            [
                EngineRequest(f"{id_}-{i}", ids, p, c, req.cache_salt, stream=req.stream)
                for i, (p, c) in enumerate(zip(samples, constraints))
            ]
        )
        usage = _Usage(len(ids))
        if req.stream:
            return _EventStream(self._chat_events(stream, req, id_, usage), lambda: self._release(stream))
        collected = await _unless_disconnected(request, self._gather(stream, usage))
        if collected is None:
            return Response(status_code=CLIENT_CLOSED)
        choices = [
            protocol.chat_choice(
                i, s.reasoning, s.answer, s.finish_reason, self.logprobs.chat(s.logprobs) if req.logprobs else None
            )
            for i, s in enumerate(collected)
        ]
        return JSONResponse(protocol.chat_completion(id_, self.model_name, choices, usage.as_dict()))

    async def complete(self, request: Request, req: protocol.CompletionRequest) -> Response:
        params = _checked(req.to_sampling_params)
        self._admit(len(req.prompts()) * params.n, "n" if len(req.prompts()) == 1 else "prompt")
        encoded = [await self._encode(prompt, chat=False) for prompt in req.prompts()]
        for ids in encoded:
            self._check_length(len(ids), params.max_tokens, "prompt")
        id_ = f"cmpl-{uuid.uuid4().hex}"
        samples = expand_samples(params)
        stream = await self._add(
            [
                EngineRequest(
                    f"{id_}-{p * len(samples) + j}", ids, sample, cache_salt=req.cache_salt, stream=req.stream
                )
                for p, ids in enumerate(encoded)
                for j, sample in enumerate(samples)
            ]
        )
        usage = _Usage(sum(len(ids) for ids in encoded))
        if req.stream:
            return _EventStream(self._completion_events(stream, req, id_, usage), lambda: self._release(stream))
        collected = await _unless_disconnected(request, self._gather(stream, usage))
        if collected is None:
            return Response(status_code=CLIENT_CLOSED)
        want_logprobs = req.logprobs is not None
        choices = [
            protocol.completion_choice(
                i, s.text, s.finish_reason, self.logprobs.completion(s.logprobs) if want_logprobs else None
            )
            for i, s in enumerate(collected)
        ]
        return JSONResponse(protocol.completion(id_, self.model_name, protocol.now(), choices, usage.as_dict()))

    async def tokenize(self, req: protocol.TokenizeRequest) -> dict:
        if req.messages is not None:
            ids = await self._encode(protocol.engine_messages(req.messages), chat=True)
        else:
            ids = await asyncio.to_thread(self.llm.tokenizer.encode, req.prompt, req.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": self.llm.engine.max_model_len}

    def detokenize(self, req: protocol.DetokenizeRequest) -> dict:
        vocab = self.llm.tokenizer.vocab_size
        if any(not 0 <= t < vocab for t in req.tokens):
            raise APIError(400, f"token ids must lie in [0, {vocab})", param="tokens")
        return {"prompt": self.llm.tokenizer.decode(req.tokens, skip_special_tokens=False)}

    # ---- requests in ---------------------------------------------------------------------------

    def _admit(self, num_samples: int, param: str) -> None:
        """Whether the engine can take num_samples more requests: a 400 (naming param) if it never
        could, a 503 while it is full or dead."""
        limit = self.engine.max_requests
        if num_samples > limit:
            raise APIError(
                400,
                f"this call asks for {num_samples} samples (prompts x n) but this server takes at most {limit} at once",
                param=param,
            )
        try:
            self.engine.check_room(num_samples)
        except (QueueFullError, EngineDeadError) as e:
            raise _engine_error(e) from None

    async def _encode(self, prompt, chat: bool) -> list[int]:
        """The prompt's token ids; tokenizing runs off the event loop."""
        try:
            return await asyncio.to_thread(self.llm.encode_prompt, prompt, chat)
        except (TypeError, ValueError, jinja2.TemplateError) as e:
            raise APIError(400, f"cannot render the prompt: {e}", param="messages" if chat else "prompt") from None

    def _check_length(self, num_prompt_tokens: int, max_tokens: int | None, prompt_param: str) -> None:
        limit = self.llm.engine.max_model_len
        if num_prompt_tokens >= limit:
            raise APIError(
                400,
                f"the prompt has {num_prompt_tokens} tokens but this model's context holds {limit}, "
                f"leaving no room for an answer",
                param=prompt_param,
                code="context_length_exceeded",
            )
        if max_tokens is not None and num_prompt_tokens + max_tokens > limit:
            raise APIError(
                400,
                f"the prompt ({num_prompt_tokens} tokens) plus max_tokens ({max_tokens}) exceeds "
                f"this model's context of {limit} tokens",
                param="max_tokens",
                code="context_length_exceeded",
            )

    async def _add(self, requests: list[EngineRequest]) -> RequestStream:
        try:
            return await self.engine.add(requests)
        except (QueueFullError, EngineDeadError) as e:
            raise _engine_error(e) from None
        except PromptTooLongError as e:
            raise APIError(400, str(e), code="context_length_exceeded") from None
        except ValueError as e:
            raise APIError(400, str(e)) from None

    # ---- outputs out -------------------------------------------------------------------------

    # A stream is released when its reader is done (the gathering, or the event response), which
    # frees the KV blocks of whatever has not finished: a no-op after a normal end, the cleanup
    # after a disconnect or a failure.

    def _release(self, stream: RequestStream) -> None:
        aborted = stream.abort()
        if aborted:  # their own final outputs go unread, so they are counted here
            self.metrics.finished.labels("abort").inc(aborted)

    async def _outputs(self, stream: RequestStream, usage: _Usage) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(choice index, output) until all finish, accounted in usage and metrics; raises an
        APIError when one of them, or the engine, fails."""
        index = {request_id: i for i, request_id in enumerate(stream.request_ids)}
        last_decode: dict[str, float] = {}
        try:
            async for out in stream:
                self.metrics.observe(out, last_decode)
                if out.error is not None:
                    raise APIError(500, f"generation failed: {out.error}", code="generation_failed")
                usage.add(out)
                yield index[out.request_id], out
        except EngineDeadError as e:
            raise _engine_error(e) from None
        except APIError:
            raise
        except Exception as e:  # the step this request ran in failed
            raise APIError(500, f"generation failed: {type(e).__name__}: {e}", code="generation_failed") from None

    async def _gather(self, stream: RequestStream, usage: _Usage) -> list[_Sample]:
        samples = [_Sample() for _ in stream.request_ids]
        try:
            async for i, out in self._outputs(stream, usage):
                s = samples[i]
                s.reasoning += out.delta_reasoning
                s.answer += out.delta_answer
                s.text += out.delta_text
                s.logprobs += out.new_logprobs
                s.finish_reason = out.finish_reason
        finally:
            self._release(stream)
        return samples

    async def _chat_events(self, stream, req: protocol.ChatCompletionRequest, id_: str, usage: _Usage):
        created = protocol.now()

        def chunk(choices: list[dict], usage_: dict | None = None) -> str:
            return _event(protocol.chat_chunk(id_, self.model_name, created, choices, usage_))

        try:
            for i in range(len(stream.request_ids)):
                yield chunk([protocol.chunk_choice(i, {"role": "assistant", "content": ""})])
            async for i, out in self._outputs(stream, usage):
                delta = {}
                if out.delta_reasoning:
                    delta["reasoning_content"] = out.delta_reasoning
                if out.delta_answer:
                    delta["content"] = out.delta_answer
                logprobs = self.logprobs.chat(out.new_logprobs) if req.logprobs and out.new_logprobs else None
                if delta or logprobs or out.finished:
                    yield chunk([protocol.chunk_choice(i, delta, out.finish_reason, logprobs)])
            if req.include_usage:
                yield chunk([], usage.as_dict())
        except Exception as e:  # the 200 is sent, so the failure is said in-band
            yield _event(_as_api_error(e).body())
        yield "data: [DONE]\n\n"

    async def _completion_events(self, stream, req: protocol.CompletionRequest, id_: str, usage: _Usage):
        created = protocol.now()
        offsets = [0] * len(stream.request_ids)  # each choice's text so far, for logprobs' text_offset
        try:
            async for i, out in self._outputs(stream, usage):
                logprobs = None
                if req.logprobs is not None and out.new_logprobs:
                    logprobs = self.logprobs.completion(out.new_logprobs, offsets[i])
                offsets[i] += len(out.delta_text)
                if out.delta_text or logprobs or out.finished:
                    choice = protocol.completion_choice(i, out.delta_text, out.finish_reason, logprobs)
                    yield _event(protocol.completion(id_, self.model_name, created, [choice], None))
            if req.include_usage:
                yield _event(protocol.completion(id_, self.model_name, created, [], usage.as_dict()))
        except Exception as e:
            yield _event(_as_api_error(e).body())
        yield "data: [DONE]\n\n"


def _checked(fn, *args):
    """Calls fn; the ValueError or TypeError it raises about the request becomes a 400."""
    try:
        return fn(*args)
    except ParamError as e:
        raise APIError(400, str(e), param=e.param) from None
    except (ValueError, TypeError) as e:
        raise APIError(400, str(e)) from None


def _as_api_error(e: Exception) -> APIError:
    if isinstance(e, APIError):
        return e
    return APIError(500, f"internal error: {type(e).__name__}: {e}")


def _engine_error(e: QueueFullError | EngineDeadError) -> APIError:
    if isinstance(e, QueueFullError):
        return APIError(503, str(e), code="queue_full", headers={"Retry-After": "1"})
    return APIError(503, str(e), code="engine_dead")


def _event(body: dict) -> str:
    # allow_nan=False: a bare NaN is not JSON, and clients would fail on the whole event.
    return f"data: {json.dumps(body, ensure_ascii=False, allow_nan=False)}\n\n"


async def _unless_disconnected(request: Request, work):
    """work's result, or None if the client disconnects first (work is then cancelled)."""
    task = asyncio.ensure_future(work)

    async def disconnected():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watch = asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()  # its stream aborts the requests
    return task.result() if task in done else None


class _EventStream(StreamingResponse):
    """Server-sent events; `on_close` runs however the response ends, a disconnect included."""

    def __init__(self, events, on_close):
        super().__init__(
            events, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()
            self.on_close()
