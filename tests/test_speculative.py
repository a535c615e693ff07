"""Speculative decoding on the tiny random model: greedy outputs equal plain decoding's whatever
the proposer (n-gram lookup; the model drafting for itself, so most guesses hold; another random
model, so most fail), under batching, chunked prefill, preemption, stop strings, lengths and the
thinking budget; sampled tokens follow the target's distribution; aborts leave no block held."""

from __future__ import annotations

import json
import random

import pytest
import torch

from r1 import LLM, SamplingParams
from r1.engine import EngineRequest, NgramProposer
from r1.sampling import make_generator, verify_proposed
from tests.conftest import save_tiny_hf_model

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def _prompts(n, seed=0, lo=3, hi=40):
    rng = random.Random(seed)
    # A repeated phrase in each prompt gives the n-gram lookup something to find.
    return [[rng.randrange(512) for _ in range(rng.randint(lo, hi))] + [5, 6, 7, 8, 5, 6] for _ in range(n)]


@pytest.fixture(scope="module")
def other_draft(tiny_model_folder, tmp_path_factory):
    """A second random model with the same tokenizer: a draft whose guesses mostly fail."""
    folder = tmp_path_factory.mktemp("tiny-draft")
    save_tiny_hf_model(folder, seed=1)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((tiny_model_folder / name).read_bytes())
    return folder


@pytest.fixture(params=["ngram", "draft:self", "draft:other"])
def speculative(request, tiny_model_folder, other_draft):
    return {
        "ngram": "ngram",
        "draft:self": f"draft:{tiny_model_folder}",
        "draft:other": f"draft:{other_draft}",
    }[request.param]


def _llm(folder, **kw):
    kw = {"dtype": "fp32", "device": "cpu", "kv_cache_tokens": 4096, "block_size": 4, **kw}
    return LLM(str(folder), progress=False, **kw)


@pytest.fixture(scope="module")
def plain(tiny_model_folder):
    return _llm(tiny_model_folder)


def _spec_llm(folder, speculative, **kw):
    # Speculation in every step, whatever the batch, so batches exercise it too.
    return _llm(folder, speculative=speculative, speculative_disable_by_batch_size=1000, **kw)


def _assert_no_leaks(llm):
    bm = llm.engine.core.scheduler.block_manager
    assert not llm.engine.has_unfinished()
    assert bm.num_free_blocks == bm.num_blocks
    assert not llm.engine.core.speculator.states


def test_ngram_lookup_proposes_what_followed_the_latest_longest_match():
    from r1.engine.sequence import Sequence

    proposer = NgramProposer(2, 3)
    seq = Sequence(0, [1, 2, 3, 9, 1, 2, 3, 7, 7, 2, 3], max_tokens=10)
    # "2 3" last occurred before "7 7 2 3", and "7 2 3" never did: the 2-gram's latest match wins.
    assert proposer.propose([seq], [3]) == [[7, 7, 2]]
    seq.append_token(7)  # "3 7" follows at 7..: [7, 2, 3]; "2 3 7" at 8.. too, and is longer
    assert proposer.propose([seq], [2]) == [[7, 2]]
    seq.append_token(42)  # never seen
    assert proposer.propose([seq], [4]) == [[]]


def test_batch_with_chunked_prefill_equals_plain(tiny_model_folder, plain, speculative):
    prompts = _prompts(6)
    # One request with a penalty, which never guesses, shares the steps of those that do.
    params = [GREEDY] * 5 + [SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, repetition_penalty=1.3)]
    expected = [c.token_ids for c in plain.generate(prompts, params)]
    llm = _spec_llm(tiny_model_folder, speculative, max_num_batched_tokens=16)
    assert [c.token_ids for c in llm.generate(prompts, params)] == expected
    # Each alone, too: batch 1 is where speculation is on by default.
    assert [llm.generate(p, GREEDY)[0].token_ids for p in prompts[:2]] == expected[:2]
    stats = llm.engine.stats()
    assert stats.spec_rounds > 0 and stats.spec_proposed > 0
    if speculative.endswith(str(tiny_model_folder)):  # the model's own guesses all hold
        assert stats.spec_accepted == stats.spec_proposed
        assert stats.spec_mean_accepted > 3
    _assert_no_leaks(llm)


def test_preemption_with_guesses_changes_nothing(tiny_model_folder, plain, speculative):
    prompts = _prompts(6)
    expected = [c.token_ids for c in plain.generate(prompts, GREEDY)]
    llm = _spec_llm(tiny_model_folder, speculative, kv_cache_tokens=100, max_model_len=100)
    assert [c.token_ids for c in llm.generate(prompts, GREEDY)] == expected
    assert llm.engine.core.scheduler.num_preemptions > 0
    _assert_no_leaks(llm)


def test_stops_lengths_and_the_thinking_budget_end_where_plain_decoding_does(tiny_model_folder, plain, speculative):
    prompts = _prompts(4, seed=3)
    first = plain.generate(prompts[0], GREEDY)[0].token_ids
    cases = [
        (prompts[0], SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[first[9]])),
        (prompts[1], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)),
        (prompts[3], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=2)),
    ]
    text = plain.generate(prompts[1], GREEDY)[0].text
    cases.append((prompts[1], SamplingParams(temperature=0, max_tokens=24, stop=[text[12:15]])))
    llm = _spec_llm(tiny_model_folder, speculative)
    for prompt, params in cases:
        want, got = plain.generate(prompt, params)[0], llm.generate(prompt, params)[0]
        assert (got.token_ids, got.text, got.finish_reason) == (want.token_ids, want.text, want.finish_reason)
        assert got.usage | {"cached_tokens": 0} == want.usage | {"cached_tokens": 0}  # plain saw the prompts before
        assert [lp["token_id"] for lp in got.logprobs] == [lp["token_id"] for lp in want.logprobs]
        for a, b in zip(got.logprobs, want.logprobs):
            assert a["logprob"] == pytest.approx(b["logprob"], abs=1e-4)
    assert llm.generate(cases[0][0], cases[0][1])[0].token_ids[-1] == first[9]
    _assert_no_leaks(llm)


def test_the_real_model_with_a_thinking_budget_equals_plain_decoding(small_gguf, r1_header):
    """The 0.5B stand-in, R1's chat template and a thinking budget that closes the block mid-round."""
    chats = [
        [{"role": "user", "content": c}] for c in ("Write a Python function that adds two numbers.", "What is 2+2?")
    ]
    params = [
        SamplingParams(temperature=0, max_tokens=24, max_reasoning_tokens=9),
        SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
    ]
    kw = {"tokenizer": str(r1_header), "dtype": "fp32", "device": "cpu", "kv_cache_tokens": 512, "progress": False}
    want = LLM(str(small_gguf), **kw).chat(chats, params)
    end = want[0].token_ids[9]
    llm = LLM(str(small_gguf), speculative="ngram", **kw)  # the verification is the draft's too
    got = [llm.chat(chat, p)[0] for chat, p in zip(chats, params)]
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    assert [(c.reasoning, c.answer) for c in got] == [(c.reasoning, c.answer) for c in want]
    assert llm.engine.stats().spec_accepted > 0
    assert llm.tokenizer.decode([end], skip_special_tokens=False) == "</think>"


def test_aborts_mid_verification_free_every_block(tiny_model_folder, speculative):
    llm = _spec_llm(tiny_model_folder, speculative)
    engine = llm.engine
    for i, p in enumerate(_prompts(3)):
        engine.add_requests([EngineRequest(str(i), p, SamplingParams(temperature=0, max_tokens=60, ignore_eos=True))])
    for _ in range(20):  # until guesses were verified in the last step
        engine.step()
        if any(s.spec_token_ids for s in engine.core.scheduler.running):
            break
    assert any(s.spec_token_ids for s in engine.core.scheduler.running)
    engine.abort(["0", "2"])
    finished = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out.finish_reason
    assert finished == {"0": "abort", "1": "length", "2": "abort"}
    _assert_no_leaks(llm)


def test_a_draft_with_another_tokenizer_is_refused(tiny_model_folder, tmp_path):
    save_tiny_hf_model(tmp_path, seed=2)
    tok = json.loads((tiny_model_folder / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    vocab["2"], vocab["3"] = vocab["3"], vocab["2"]  # two digits' ids swapped
    (tmp_path / "tokenizer.json").write_text(json.dumps(tok))
    (tmp_path / "tokenizer_config.json").write_bytes((tiny_model_folder / "tokenizer_config.json").read_bytes())
    with pytest.raises(ValueError, match="does not share the model's tokenizer"):
        _spec_llm(tiny_model_folder, f"draft:{tmp_path}")
    with pytest.raises(ValueError, match="ngram or draft:MODEL"):
        _llm(tiny_model_folder, speculative="eagle")


def _chi_square(counts: dict, probs: dict, n: int) -> float:
    return sum((counts.get(t, 0) - n * p) ** 2 / (n * p) for t, p in probs.items())


# Critical values of chi-square at p = 0.001, by degrees of freedom: a correct sampler fails a
# test once in a thousand runs; the seeds below are fixed, so each test's outcome is too.
CHI2_999 = {3: 16.27, 7: 24.32, 15: 37.70}


@pytest.mark.parametrize(
    "params", [SamplingParams(temperature=1.0, top_k=8), SamplingParams(temperature=0.7, top_p=0.9, top_k=8)]
)
def test_verification_draws_the_target_distribution(plain, params):
    """Whatever is guessed, the first token kept or drawn follows the target's filtered softmax."""
    params = params.with_defaults({})
    torch.manual_seed(0)
    logits = plain.model.compute_logits(torch.randn(2, plain.config.hidden_size))
    target = torch.softmax(logits[0] / params.temperature, dim=0)
    top = target.topk(8)
    probs = top.values
    if params.top_p < 1:  # the run of likeliest tokens that reaches top_p
        keep = (probs.cumsum(0) - probs) < params.top_p
        probs = probs[keep]
    probs = probs / probs.sum()
    expected = dict(zip(top.indices.tolist(), probs.tolist()))
    likeliest, unlikely = top.indices[0].item(), top.indices[-1].item()
    generator = make_generator(1)
    n = 2000
    for guess in (likeliest, unlikely, 511 if 511 not in expected else 510):
        counts: dict[int, int] = {}
        for _ in range(n):
            keeps, residual, _ = verify_proposed(logits, params, [guess], generator)
            token = guess if keeps[0] else residual[0]
            counts[token] = counts.get(token, 0) + 1
        assert set(counts) <= set(expected)
        assert _chi_square(counts, expected, n) < CHI2_999[len(expected) - 1]


def test_seeded_sampling_with_guesses_is_reproducible_and_plausible(tiny_model_folder):
    llm = _spec_llm(tiny_model_folder, f"draft:{tiny_model_folder}")
    params = SamplingParams(temperature=0.2, top_k=3, max_tokens=16, seed=7, ignore_eos=True)
    prompt = _prompts(1)[0]
    a, b = llm.generate(prompt, params)[0], llm.generate(prompt, params)[0]
    assert a.token_ids == b.token_ids and len(a.token_ids) == 16
    assert llm.engine.stats().spec_accepted > 0
    _assert_no_leaks(llm)


def test_a_coarser_draft_changes_the_guesses_not_the_output(tiny_model_folder, plain):
    prompts = _prompts(2, seed=9)
    expected = [c.token_ids for c in plain.generate(prompts, GREEDY)]
    llm = _spec_llm(tiny_model_folder, f"draft:{tiny_model_folder}", speculative_draft_quant="int8")
    assert llm.engine.config_record()["speculative"] | {"draft_model": None} == {
        "method": "draft",
        "num_tokens": 4,
        "draft_model": None,
        "draft_quant": "int8",
        "max_batch": 1000,
        "ngram_max": 4,
        "ngram_min": 2,
    }
    assert [c.token_ids for c in llm.generate(prompts, GREEDY)] == expected
    assert 0 < llm.engine.stats().spec_accepted
    _assert_no_leaks(llm)
