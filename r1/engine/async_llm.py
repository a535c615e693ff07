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

A failed step fails the requests it ran (a failure outside the forward and the sampler, which no
request can be told from, fails every request), and the engine goes on. The engine is dead, for good,
when its thread ends by anything but close() (a BaseException such as a Rust extension's panic),
when MAX_FAILED_STEPS steps fail in a row, or at the first device fault (a CUDA error other than
running out of memory leaves the context unusable). Then every caller waiting and every later one
gets the same EngineDeadError at once, and `on_dead` tells the owner (the server exits, so that a
supervisor restarts it: vLLM's EngineDeadError).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from typing import Callable

from r1.engine.interface import EngineRequest, EngineStats, RequestOutput, StepError, is_device_fault
from r1.engine.llm_engine import LLMEngine

log = logging.getLogger(__name__)

MAX_FAILED_STEPS = 3  # failed steps in a row after which the engine is taken for dead


class QueueFullError(RuntimeError):
    """Too many unfinished requests: the caller should retry later."""


class EngineDeadError(RuntimeError):
    """The engine thread has stopped; no request can be served."""


class AsyncLLM:
    def __init__(
        self, engine: LLMEngine, max_requests: int = 256, on_dead: Callable[[EngineDeadError], None] | None = None
    ):
        if max_requests < 1:
            raise ValueError(f"max_requests must be >= 1, got {max_requests}")
        self.engine = engine
        self.max_requests = max_requests
        self.on_dead = on_dead  # called on the engine thread, once, when the engine dies
        self.stats = EngineStats()
        self.dead: EngineDeadError | None = None
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        # Orders queueing commands against death, so that no command is queued after the last drain.
        self._lock = threading.Lock()
        # request id -> (its caller's loop, its output queue); touched only on the engine thread.
        self._sinks: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="r1-engine", daemon=True)
        self._publish_stats()
        self._thread.start()

    @property
    def is_alive(self) -> bool:
        return self.dead is None and self._thread.is_alive()

    def check_room(self, count: int) -> None:
        """Raise QueueFullError or EngineDeadError now if `count` more requests cannot be taken:
        the cheap check a server makes before it tokenizes anything. add() checks again."""
        if self.dead is not None:
            raise self._dead_error()
        if len(self._sinks) + count > self.max_requests:
            raise self._queue_full()

    def _dead_error(self) -> EngineDeadError:
        # A fresh one each time: raising one instance again and again would grow its traceback.
        return EngineDeadError(str(self.dead) if self.dead is not None else "the engine has stopped")

    def _queue_full(self) -> QueueFullError:
        return QueueFullError(f"the server is at its limit of {self.max_requests} unfinished requests")

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
            raise self._dead_error()
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
        """Queue a command for the engine thread; False if that thread has stopped or died."""
        with self._lock:
            if self.dead is not None or not self._thread.is_alive():
                return False
            self._commands.put(command)
        return True

    # ---- the engine thread -------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._serve()
        except BaseException as e:  # a panic or an exit too: whatever ends the thread
            log.critical("the engine died", exc_info=e)
            self._die(e if isinstance(e, EngineDeadError) else _death(e))

    def _serve(self) -> None:
        failed_steps = 0
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
                cause = e.cause if isinstance(e, StepError) else e
                log.error("engine step failed", exc_info=cause)
                failed_steps += 1
                if is_device_fault(cause):
                    raise EngineDeadError(f"the device failed: {type(cause).__name__}: {cause}") from cause
                if failed_steps >= MAX_FAILED_STEPS:
                    raise EngineDeadError(
                        f"{failed_steps} steps failed in a row, the last with {type(cause).__name__}: {cause}"
                    ) from cause
                if isinstance(e, StepError):
                    self._deliver(e.outputs)
                else:
                    self._fail_all(e)
                self._publish_stats()
                continue
            failed_steps = 0
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
            if self.dead is not None:
                raise self._dead_error()
            if len(self._sinks) + len(requests) > self.max_requests:
                raise self._queue_full()
            self.engine.add_requests(requests)  # all or none
        except Exception as e:
            _call_soon(loop, _settle, added, e)
            return
        except BaseException as e:  # a panic: the engine dies, and this caller hears it too
            _call_soon(loop, _settle, added, _death(e))
            raise
        for r in requests:
            self._sinks[r.request_id] = (loop, sink)
        _call_soon(loop, _settle, added, None)
        self._publish_stats()

    def _abort_all(self, request_ids: list[str]) -> None:
        self.engine.abort(request_ids)  # a no-op for requests already finished

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
        for loop, sink in {id(s): (lp, s) for lp, s in failed.values()}.values():
            _call_soon(loop, sink.put_nowait, error)
        if self.dead is None:  # a dead engine keeps its blocks: nothing will use them again
            self._abort_all(list(failed))
            self._publish_stats()

    def _die(self, error: EngineDeadError) -> None:
        """Fail every waiting caller and every command still queued; refuse all later ones."""
        with self._lock:
            self.dead = error
        self._run_commands(block=False)  # queued adds now fail with `error`
        self._fail_all(error)
        if self.on_dead is not None:
            self.on_dead(error)

    def _publish_stats(self) -> None:
        self.stats = self.engine.stats()


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


def _death(error: BaseException) -> EngineDeadError:
    return EngineDeadError(f"the engine died: {type(error).__name__}: {error}")


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
