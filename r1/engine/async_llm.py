"""AsyncLLM: the engine behind an asyncio front, for servers.

`LLMEngine` is not thread-safe and its `step()` blocks for the length of a forward pass, so one
background thread owns it: it runs the commands callers queue (add, abort, stop), steps while
anything is unfinished, and hands each output to the asyncio queue of the request it belongs to.
Callers on any event loop add a group of requests (the n samples of one API call) and iterate
their outputs; a caller that stops early (a client that went away) aborts the stream, so the
requests' KV blocks are freed.

It owns the bounded queue (at most `max_requests` unfinished requests; past that `QueueFullError`)
and a snapshot of the scheduler's numbers for metrics. It does not own tokenizing prompts or
building sampling parameters (the caller's), nor HTTP (r1/server).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from dataclasses import dataclass
from typing import Any, Callable

from r1.engine.llm_engine import LLMEngine, RequestOutput
from r1.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """Too many unfinished requests: the caller should retry later."""


class EngineDeadError(RuntimeError):
    """The engine thread has stopped; no request can be served."""


@dataclass(frozen=True)
class EngineRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    prompt_opens_reasoning: bool = False
    constraint: Any = None  # allowed_tokens() / accept() / is_done(), applied to the answer


@dataclass(frozen=True)
class EngineStats:
    """The scheduler's numbers after the latest step, read by any thread without locking."""

    num_running: int = 0
    num_waiting: int = 0
    num_blocks: int = 0
    num_free_blocks: int = 0
    kv_cache_usage: float = 0.0
    prefix_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_hits: int = 0  # of those, found cached


class AsyncLLM:
    def __init__(self, engine: LLMEngine, max_requests: int = 256):
        if max_requests < 1:
            raise ValueError(f"max_requests must be >= 1, got {max_requests}")
        self.engine = engine
        self.max_requests = max_requests
        self.stats = EngineStats()
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        # request id -> (its caller's loop, its output queue); touched only on the engine thread.
        self._sinks: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="r1-engine", daemon=True)
        self._publish_stats()
        self._thread.start()

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive()

    # ---- the asyncio side --------------------------------------------------------------------

    async def add(self, requests: list[EngineRequest]) -> RequestStream:
        """Add the requests together, all or none, and return the stream of their outputs.

        Raises QueueFullError, PromptTooLongError, ValueError or EngineDeadError, having added
        nothing. The caller must `abort()` the stream when it stops reading before the end.
        """
        loop = asyncio.get_running_loop()
        sink: asyncio.Queue = asyncio.Queue()
        added = loop.create_future()
        ids = [r.request_id for r in requests]
        if not self._submit(lambda: self._add_all(requests, loop, sink, added)):
            raise EngineDeadError("the engine has stopped")
        try:
            await added
        except asyncio.CancelledError:
            self.abort(ids)  # they may have been added just before the caller gave up
            raise
        return RequestStream(self, ids, sink)

    def abort(self, request_ids: list[str]) -> None:
        self._submit(lambda: self._abort_all(list(request_ids)))

    def close(self, timeout: float = 30.0) -> None:
        """Abort everything unfinished and stop the engine thread."""
        def stop():
            self._abort_all(list(self._sinks))
            self._stopping = True
        self._submit(stop)
        self._thread.join(timeout)

    def _submit(self, command: Callable[[], None]) -> bool:
        """Queue a command for the engine thread; False if that thread has stopped."""
        if not self._thread.is_alive():
            return False
        self._commands.put(command)
        return True

    # ---- the engine thread -------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            # Idle: sleep until a command comes. Busy: take what has come, then step.
            self._run_commands(block=not self.engine.has_unfinished())
            if self._stopping:
                # Aborts made outputs: deliver them so no caller waits for a request that is gone.
                self._deliver(self.engine.step() if self.engine.has_unfinished() else [])
                return
            if not self.engine.has_unfinished():
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # a failed step fails its requests, not the server
                log.exception("engine step failed")
                self._fail_all(e)
                continue
            self._deliver(outputs)
            self._publish_stats()

    def _run_commands(self, block: bool) -> None:
        try:
            command = self._commands.get(block=block)
            while True:
                try:
                    command()
                except Exception:  # a bug in one command must not stop the engine for everyone
                    log.exception("engine command failed")
                command = self._commands.get_nowait()
        except queue.Empty:
            pass

    def _add_all(self, requests: list[EngineRequest], loop, sink, added: asyncio.Future) -> None:
        try:
            if len(self._sinks) + len(requests) > self.max_requests:
                raise QueueFullError(f"the server is at its limit of {self.max_requests} unfinished requests")
            done = []
            try:
                for r in requests:
                    self.engine.add_request(r.request_id, r.prompt_token_ids, r.params,
                                            prompt_opens_reasoning=r.prompt_opens_reasoning,
                                            constraint=r.constraint)
                    done.append(r.request_id)
            except Exception:
                # All or none. The aborts' outputs come out of the next step to no sink.
                self._abort_all(done)
                raise
        except Exception as e:
            _call_soon(loop, _settle, added, e)
            return
        for r in requests:
            self._sinks[r.request_id] = (loop, sink)
        _call_soon(loop, _settle, added, None)
        self._publish_stats()

    def _abort_all(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self.engine.abort(request_id)  # a no-op for requests already finished

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for out in outputs:
            target = self._sinks.pop(out.request_id, None) if out.finished else self._sinks.get(out.request_id)
            if target is not None:  # None: nobody waits for it (aborted while being added, or failed)
                by_loop.setdefault(target[0], []).append((target[1], out))
        for loop, items in by_loop.items():
            _call_soon(loop, _put_all, items)

    def _fail_all(self, error: Exception) -> None:
        failed, self._sinks = self._sinks, {}
        self._abort_all(list(failed))
        for loop, sink in {id(s): (lp, s) for lp, s in failed.values()}.values():
            _call_soon(loop, sink.put_nowait, error)
        self._publish_stats()

    def _publish_stats(self) -> None:
        sched = self.engine.scheduler
        bm = sched.block_manager
        self.stats = EngineStats(sched.num_running, sched.num_waiting, bm.num_blocks, bm.num_free_blocks,
                                 bm.usage, bm.prefix_queries, bm.prefix_hits)


class RequestStream:
    """The outputs of one group of requests, in order, until each has finished."""

    def __init__(self, llm: AsyncLLM, request_ids: list[str], sink: asyncio.Queue):
        self._llm, self._sink = llm, sink
        self.request_ids = request_ids
        self.unfinished = set(request_ids)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if not self.unfinished:
            raise StopAsyncIteration
        item = await self._sink.get()
        if isinstance(item, BaseException):  # the engine failed its step
            self.unfinished.clear()
            raise item
        if item.finished:
            self.unfinished.discard(item.request_id)
        return item

    def abort(self) -> int:
        """Stop what has not finished and free its KV blocks; returns how many that was."""
        aborted = len(self.unfinished)
        if aborted:
            self._llm.abort(list(self.unfinished))
            self.unfinished.clear()
        return aborted


def _settle(future: asyncio.Future, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


def _put_all(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for sink, out in items:
        sink.put_nowait(out)


def _call_soon(loop: asyncio.AbstractEventLoop, fn, *args) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # that caller's loop has closed: nobody is listening
        pass
