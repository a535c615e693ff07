"""The serving engine on a tiny random model: continuous batching, chunked prefill, preemption,
prefix caching, aborts and seeds, each checked against the same requests run alone (fp32), with
each step run to its end and with async scheduling."""

from __future__ import annotations

import random

import pytest
import torch

from r1 import LLM, SamplingParams, kernels
from r1.engine import EngineRequest, StepError

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def _prompts(n, seed=0, lo=3, hi=40):
    rng = random.Random(seed)
    return [[rng.randrange(512) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def _llm(folder, **kw):
    kw = {"dtype": "fp32", "device": "cpu", "kv_cache_tokens": 4096, "block_size": 4, **kw}
    return LLM(str(folder), progress=False, **kw)


@pytest.fixture(params=[False, True], ids=["sync", "async"])
def make_llm(request, tiny_model_folder):
    """_llm with each step run to its end, then with async scheduling (the GPU's default), which on
    a CPU changes only the order of the work: every output must stay the same."""

    def make(**kw):
        llm = _llm(tiny_model_folder, async_scheduling=request.param, **kw)
        assert llm.engine.core.async_scheduling is request.param
        return llm

    return make


@pytest.fixture(scope="module")
def alone(tiny_model_folder):
    """Each prompt's greedy tokens with the engine running nothing else."""
    llm = _llm(tiny_model_folder)
    return {tuple(p): llm.generate(p, GREEDY)[0].token_ids for p in _prompts(6)}


def _assert_no_leaks(llm):
    bm = llm.engine.core.scheduler.block_manager
    assert not llm.engine.has_unfinished()
    assert bm.num_free_blocks == bm.num_blocks


def test_batch_with_chunked_prefill_equals_alone(make_llm, alone):
    llm = make_llm(max_num_batched_tokens=16)  # 40-token prompts take 3+ steps
    prompts = _prompts(6)
    got = [c.token_ids for c in llm.generate(prompts, GREEDY)]
    assert got == [alone[tuple(p)] for p in prompts]
    _assert_no_leaks(llm)


def test_requests_joining_mid_flight_equal_alone(make_llm, alone):
    llm = make_llm()
    engine, prompts = llm.engine, _prompts(6)
    tokens = {i: [] for i in range(6)}
    done = set()
    for i, p in enumerate(prompts):  # one new request every two steps
        engine.add_requests([EngineRequest(str(i), p, GREEDY)])
        for _ in range(2):
            for out in engine.step():
                tokens[int(out.request_id)] += out.new_token_ids
                done |= {int(out.request_id)} if out.finished else set()
    while len(done) < 6:
        for out in engine.step():
            tokens[int(out.request_id)] += out.new_token_ids
            done |= {int(out.request_id)} if out.finished else set()
    assert [tokens[i] for i in range(6)] == [alone[tuple(p)] for p in prompts]
    _assert_no_leaks(llm)


def test_preemption_recomputes_and_changes_nothing(make_llm, alone):
    # 20 blocks of 4 tokens cannot hold six sequences of up to 52 tokens at once.
    llm = make_llm(kv_cache_tokens=80, max_model_len=80)
    prompts = _prompts(6)
    got = [c.token_ids for c in llm.generate(prompts, GREEDY)]
    assert llm.engine.core.scheduler.num_preemptions > 0
    assert got == [alone[tuple(p)] for p in prompts]
    _assert_no_leaks(llm)


def test_prefix_cache_computes_a_shared_prompt_once(make_llm):
    shared = _prompts(1, seed=5, lo=33, hi=33)[0]  # 8 full blocks + 1 token
    prompts = [shared + [7, 8, 9], shared + [100, 200], shared + [1]]
    cold = make_llm(enable_prefix_caching=False)
    expected = [c.token_ids for c in cold.generate(prompts, GREEDY)]
    llm = make_llm()
    first = llm.generate(prompts[0], GREEDY)[0]
    assert first.usage["cached_tokens"] == 0
    rest = llm.generate(prompts[1:], GREEDY)
    assert [c.usage["cached_tokens"] for c in rest] == [32, 32]
    bm = llm.engine.core.scheduler.block_manager
    assert bm.prefix_hits == 64
    assert [first.token_ids] + [c.token_ids for c in rest] == expected
    _assert_no_leaks(llm)


def test_aborts_free_every_block(make_llm):
    llm = make_llm()
    engine = llm.engine
    for i, p in enumerate(_prompts(4)):
        engine.add_requests([EngineRequest(str(i), p, SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))])
    engine.step()
    engine.step()
    engine.abort(["0", "3"])  # running, and waiting
    finished = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out.finish_reason
    assert finished == {"0": "abort", "3": "abort", "1": "length", "2": "length"}
    _assert_no_leaks(llm)


def test_seeded_samples_are_the_same_batched_or_alone(make_llm):
    llm = make_llm()
    p = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=10, seed=123, ignore_eos=True)
    prompts = _prompts(3, seed=9)
    solo = llm.generate(prompts[1], p)[0].token_ids
    batched = llm.generate(
        prompts,
        [
            SamplingParams(temperature=1.0, max_tokens=10, ignore_eos=True),
            p,
            SamplingParams(temperature=0.7, max_tokens=10, seed=5, ignore_eos=True),
        ],
    )
    assert batched[1].token_ids == solo
    n = llm.generate(
        prompts[1], SamplingParams(temperature=1.0, top_p=0.9, max_tokens=10, seed=123, n=3, ignore_eos=True)
    )
    assert n[0].token_ids == solo and len({tuple(c.token_ids) for c in n}) == 3


@pytest.mark.parametrize("kv_dtype, cache_dtype", [("int8", torch.int8), ("bf16", torch.bfloat16)])
def test_a_smaller_kv_cache_batches_like_alone_and_frees_everything(make_llm, kv_dtype, cache_dtype):
    # Each token's keys and values are rounded on their own (int8: to a scale of their own), so
    # batching changes nothing; the float32 model keeps its dtype.
    llm = make_llm(kv_dtype=kv_dtype)
    prompts = _prompts(4, seed=3)
    solo = [llm.generate(p, GREEDY)[0].token_ids for p in prompts]
    assert [c.token_ids for c in llm.generate(prompts, GREEDY)] == solo
    _assert_no_leaks(llm)
    cache = llm.engine.core.runner.kv_cache
    assert (cache.values if kv_dtype == "int8" else cache).dtype == cache_dtype and llm.dtype == torch.float32


def test_unknown_kv_dtype_is_refused(tiny_model_folder):
    with pytest.raises(ValueError, match="kv_dtype must be one of auto, bf16, int8; got 'fp4'"):
        _llm(tiny_model_folder, kv_dtype="fp4")


def test_a_failed_launch_ahead_leaves_no_pending_tokens(tiny_model_folder, alone):
    # Async scheduling counts the tokens it has not read as pending; a launch that raises
    # (out of memory, say) must take them back and rewind, so that the engine goes on unharmed.
    llm = _llm(tiny_model_folder, async_scheduling=True)
    engine, prompt = llm.engine, _prompts(1)[0]
    run, failures = engine.core.runner.run, []

    def failing_once(scheduled, tables, sampled=None):
        if sampled is not None and not failures:
            failures.append(1)
            raise RuntimeError("CUDA out of memory (simulated)")
        return run(scheduled, tables, sampled)

    engine.core.runner.run = failing_once
    engine.add_requests([EngineRequest("0", prompt, GREEDY)])
    with pytest.raises(RuntimeError, match="simulated"):
        engine.step()
    seq = engine.core.by_request_id["0"].seq
    assert seq.num_pending_tokens == 0 and seq.num_output_tokens == 0  # the sampled token was never read
    tokens = []
    for _ in range(4 * GREEDY.max_tokens):  # bounded: a sequence left with nothing to compute never ends
        tokens += [t for out in engine.step() for t in out.new_token_ids]
    assert tokens == alone[tuple(prompt)]
    _assert_no_leaks(llm)


class _BrokenGrammar:
    """A constraint that allows every token until its `breaks_at`-th call of `where`, from which on
    it raises."""

    def __init__(self, where: str, breaks_at: int = 3):
        self.where, self.calls_left = where, breaks_at

    def _call(self, name: str) -> None:
        if name == self.where:
            self.calls_left -= 1
            if self.calls_left <= 0:
                raise RuntimeError("broken grammar")

    def allowed_tokens(self) -> torch.Tensor:
        self._call("allowed_tokens")
        return torch.ones(512, dtype=torch.bool)

    def accept(self, token_id: int) -> None:
        self._call("accept")

    def is_done(self) -> bool:
        return False


@pytest.mark.parametrize("where", ["allowed_tokens", "accept"])  # in the batch's sampling; in its own postprocessing
def test_a_request_that_fails_fails_alone(make_llm, where):
    llm = make_llm()
    sampled = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=10, seed=11, ignore_eos=True)
    prompts = _prompts(3, seed=4)
    alone = [llm.generate(p, sampled)[0].token_ids for p in prompts[:2]]
    engine = llm.engine
    for request_id, prompt in zip("ab", prompts):
        engine.add_requests([EngineRequest(request_id, prompt, sampled)])
    engine.add_requests([EngineRequest("broken", prompts[2], sampled, constraint=_BrokenGrammar(where))])
    tokens, last = {}, {}
    while engine.has_unfinished():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            last[out.request_id] = out
    # The others drew what they draw alone, from the seeds' states before the failed batch.
    assert [tokens["a"], tokens["b"]] == alone
    assert (last["broken"].finish_reason, last["broken"].error) == ("error", "RuntimeError: broken grammar")
    assert len(tokens["broken"]) == 2 and last["broken"].finished
    _assert_no_leaks(llm)


def test_a_failed_forward_fails_only_what_it_ran(make_llm, alone, monkeypatch):
    llm = make_llm(max_num_seqs=1)  # the second request waits while the first runs
    first, second = _prompts(2)
    engine = llm.engine
    engine.add_requests([EngineRequest("ran", first, GREEDY)])
    engine.add_requests([EngineRequest("waited", second, GREEDY)])

    def lost(*args, **kwargs):
        raise RuntimeError("device lost")

    with monkeypatch.context() as broken:
        broken.setattr(engine.core.runner, "run", lost)
        with pytest.raises(StepError) as failed:
            engine.step()
    assert [(o.request_id, o.finish_reason, o.error) for o in failed.value.outputs] == [
        ("ran", "error", "RuntimeError: device lost")
    ]
    tokens = []
    while engine.has_unfinished():
        tokens += [t for out in engine.step() for t in out.new_token_ids]
    assert tokens == alone[tuple(second)]
    _assert_no_leaks(llm)


def test_a_group_is_added_all_or_none(make_llm):
    engine = make_llm().engine
    [good] = _prompts(1)
    for group, error in (
        ([EngineRequest("a", good, GREEDY), EngineRequest("b", [10**6], GREEDY)], "token ids"),
        ([EngineRequest("a", good, GREEDY), EngineRequest("a", good, GREEDY)], "repeat"),
        ([EngineRequest("a", good, GREEDY), EngineRequest("b", [1] * 300, GREEDY)], "context"),
    ):
        with pytest.raises(ValueError, match=error):
            engine.add_requests(group)
        assert not engine.has_unfinished() and engine.stats().num_waiting == 0
    engine.add_requests([EngineRequest("a", good, GREEDY)])
    with pytest.raises(ValueError, match="already in use"):
        engine.add_requests([EngineRequest("b", good, GREEDY), EngineRequest("a", good, GREEDY)])
    assert engine.stats().num_waiting == 1


def test_config_record_says_what_shapes_the_outputs(make_llm):
    llm = make_llm(max_num_batched_tokens=16)
    record = llm.engine.config_record()
    assert {
        k: record[k]
        for k in (
            "max_model_len",
            "block_size",
            "max_num_batched_tokens",
            "kv_cache_dtype",
            "cuda_graphs",
            "async_scheduling",
        )
    } == {
        "max_model_len": 256,
        "block_size": 4,
        "max_num_batched_tokens": 16,
        "kv_cache_dtype": "float32",
        "cuda_graphs": False,
        "async_scheduling": llm.engine.core.async_scheduling,
    }
    assert record["kernels"] == kernels.plan(torch.device("cpu"), torch.float32)
    # fp32 keys and values: layers x 2 x blocks x block_size x kv heads x head_dim x 4 bytes
    assert record["kv_cache_bytes"] == 3 * 2 * record["num_blocks"] * 4 * 2 * 16 * 4


def test_rows_settled_after_the_read_sample_as_sync_steps_do(tiny_model_folder):
    # The tiny random model's distributions are flat, so top-p keeps far more than the
    # candidates and every sampled row is settled over the whole vocabulary after the tokens are
    # read. With async scheduling the next step was launched with a stand-in for those tokens:
    # it must be dropped and the token run again, leaving every output as a sync run gives it.
    params = [SamplingParams(temperature=0.6, top_p=0.95, max_tokens=12, seed=i, ignore_eos=True) for i in range(5)]
    prompts = _prompts(5, seed=4)
    sync = [c.token_ids for c in _llm(tiny_model_folder).generate(prompts, params)]
    llm = _llm(tiny_model_folder, async_scheduling=True)
    core, stale = llm.engine.core, []
    settle = core._settle

    def counting(sample, token_ids):
        out = settle(sample, token_ids)
        stale.extend(s for s in (core._ahead or ((),))[0] if s.stale)
        return out

    core._settle = counting
    assert [c.token_ids for c in llm.generate(prompts, params)] == sync
    assert len(stale) > 10
    _assert_no_leaks(llm)
