"""AsyncLLM, the engine thread behind the server, on a tiny random Qwen2 (milliseconds a step):
results equal the blocking API's, groups are added all or none, the queue is bounded, aborts and
failures free every KV block, close() ends the thread, and a dead engine fails every caller at once."""

from __future__ import annotations

import asyncio

import pytest

from r1 import LLM, SamplingParams
from r1.engine.async_llm import MAX_FAILED_STEPS, AsyncLLM, EngineDeadError, EngineRequest, QueueFullError

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
PROMPTS = [[5, 17, 42, 7], [100, 3, 250, 9, 11], [8, 8, 8]]


@pytest.fixture(scope="module")
def llm(tiny_model_folder):
    return LLM(str(tiny_model_folder), dtype="fp32", device="cpu", kv_cache_tokens=512, progress=False)


@pytest.fixture
def front(llm):
    front = AsyncLLM(llm.engine, max_requests=4)
    yield front
    front.close()
    assert not front.is_alive


def all_blocks_free(llm) -> bool:
    bm = llm.engine.core.scheduler.block_manager
    return not llm.engine.has_unfinished() and bm.num_free_blocks == bm.num_blocks


def requests(prompts, params=GREEDY, prefix="r"):
    return [EngineRequest(f"{prefix}{i}", p, params) for i, p in enumerate(prompts)]


async def collect(stream) -> dict[str, list[int]]:
    tokens: dict[str, list[int]] = {}
    async for out in stream:
        tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    return tokens


async def errors(stream) -> dict[str, str | None]:
    """Each request's error (None if it finished well)."""
    return {out.request_id: out.error async for out in stream if out.finished}


def test_concurrent_groups_get_what_the_blocking_api_gives(llm, front):
    expected = [c.token_ids for c in llm.generate(PROMPTS, GREEDY)]

    async def main():
        first = await front.add(requests(PROMPTS[:2], prefix="a"))
        second = await front.add(requests(PROMPTS[2:], prefix="b"))
        return await asyncio.gather(collect(first), collect(second))

    a, b = asyncio.run(main())
    assert [a["a0"], a["a1"], b["b0"]] == expected
    assert all_blocks_free(llm)


def test_group_over_the_queue_bound_is_refused_whole(llm, front):
    async def main():
        with pytest.raises(QueueFullError):
            await front.add(requests(PROMPTS + [[1, 2], [3, 4]]))  # 5 requests; the bound is 4
        assert front.stats.num_running + front.stats.num_waiting == 0
        tokens = await collect(await front.add(requests(PROMPTS + [[1, 2]])))  # 4 fit
        assert len(tokens) == 4

    asyncio.run(main())
    assert all_blocks_free(llm)


def test_a_bad_prompt_adds_none_of_its_group(llm, front):
    async def main():
        with pytest.raises(ValueError, match="token ids"):
            await front.add(requests([PROMPTS[0], [10**6]]))  # the second id is past the vocab
        await asyncio.sleep(0.2)

    asyncio.run(main())
    assert all_blocks_free(llm)


def test_abort_midway_frees_the_blocks(llm, front):
    long = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)

    async def main():
        stream = await front.add(requests(PROMPTS[:2], long))
        await anext(stream)
        stream.abort()
        for _ in range(100):
            if all_blocks_free(llm):
                return
            await asyncio.sleep(0.02)

    asyncio.run(main())
    assert all_blocks_free(llm)


def test_a_failed_step_fails_its_requests_and_the_engine_goes_on(llm, front, monkeypatch):
    real_run = llm.engine.core.runner.run
    calls = iter([RuntimeError("device lost")])

    def flaky_run(*args, **kwargs):
        error = next(calls, None)
        if error:
            raise error
        return real_run(*args, **kwargs)

    monkeypatch.setattr(llm.engine.core.runner, "run", flaky_run)

    async def main():
        failed = await errors(await front.add(requests(PROMPTS[:2], prefix="x")))
        assert failed == {"x0": "RuntimeError: device lost", "x1": "RuntimeError: device lost"}
        return await collect(await front.add(requests(PROMPTS[:1], prefix="y")))

    assert len(asyncio.run(main())["y0"]) == GREEDY.max_tokens
    assert all_blocks_free(llm)


def test_close_aborts_what_is_running(llm):
    front = AsyncLLM(llm.engine)
    long = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)

    async def main():
        stream = await front.add(requests(PROMPTS[:1], long))
        await anext(stream)
        await asyncio.to_thread(front.close)
        reasons = [out.finish_reason async for out in stream if out.finished]
        with pytest.raises(EngineDeadError):
            await front.add(requests(PROMPTS[:1], prefix="late"))
        return reasons

    assert asyncio.run(main()) == ["abort"]
    assert not front.is_alive
    assert all_blocks_free(llm)


class Panic(BaseException):
    """What a Rust extension's panic raises: not an Exception."""


@pytest.fixture
def breakable(llm, monkeypatch):
    """A monkeypatch to break llm's engine with; afterwards the engine is mended and emptied of
    what a dead front left in it."""
    yield monkeypatch
    monkeypatch.undo()
    llm.engine.abort(list(llm.engine.core.by_request_id))
    llm.engine.step()
    assert all_blocks_free(llm)


def test_the_engine_thread_dying_fails_every_waiter_at_once(llm, breakable):
    deaths = []
    front = AsyncLLM(llm.engine, on_dead=deaths.append)
    real_step = llm.engine.step
    long = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)

    def panicking_step():
        if "doomed0" in llm.engine.core.by_request_id:
            raise Panic("injected")
        return real_step()

    breakable.setattr(llm.engine, "step", panicking_step)

    async def main():
        running = await front.add(requests(PROMPTS[:2], long))
        await anext(running)
        doomed = await front.add(requests(PROMPTS[2:], prefix="doomed"))
        started = asyncio.get_running_loop().time()
        for stream in (running, doomed):
            with pytest.raises(EngineDeadError, match="the engine died: Panic: injected"):
                await collect(stream)
        assert asyncio.get_running_loop().time() - started < 1.0
        with pytest.raises(EngineDeadError, match="Panic"):  # later callers hear it at once
            await front.add(requests(PROMPTS[:1], prefix="late"))
        with pytest.raises(EngineDeadError):
            front.check_room(1)

    asyncio.run(main())
    front.close()  # no thread is left to stop: it only joins
    assert not front.is_alive and [str(d) for d in deaths] == ["the engine died: Panic: injected"]


@pytest.mark.parametrize(
    "error, failures_to_die",
    [
        (RuntimeError("out of luck"), MAX_FAILED_STEPS),
        (RuntimeError("CUDA error: an illegal memory access was encountered"), 1),  # sticky: no retry helps
    ],
)
def test_steps_failing_in_a_row_kill_the_engine(llm, breakable, error, failures_to_die):
    def failing_run(*args, **kwargs):
        raise error

    breakable.setattr(llm.engine.core.runner, "run", failing_run)
    front = AsyncLLM(llm.engine)

    async def main():
        for attempt in range(1, failures_to_die):  # each fails its request, and the engine lives
            stream = await front.add(requests(PROMPTS[:1], prefix=f"try{attempt}-"))
            assert await errors(stream) == {f"try{attempt}-0": f"RuntimeError: {error}"}
            assert front.is_alive
        with pytest.raises(EngineDeadError, match=str(error)[:10]):
            await collect(await front.add(requests(PROMPTS[:1], prefix="last")))
        assert not front.is_alive

    asyncio.run(main())
    front.close()
