"""Generation end to end on real weights: greedy parity with transformers, batching, seeds,
stop conditions, reasoning split, and clear errors for bad requests."""

from __future__ import annotations

import pytest
import torch

from r1 import LLM, SamplingParams
from r1.engine import PromptTooLongError

PROMPTS = [
    "The capital of France is",
    "def quicksort(arr):\n",
    "Q: What is 12 * 7?\nA:",
    "Les fleurs du printemps sont",
    "1, 1, 2, 3, 5, 8,",
]
GREEDY = SamplingParams(temperature=0, max_tokens=24)


@pytest.fixture(scope="module")
def llm(small_gguf):
    return LLM(str(small_gguf), dtype="fp32", device="cpu", kv_cache_tokens=8192, progress=False)


@pytest.fixture(scope="module")
def hf_greedy(small_gguf, llm):
    """transformers' greedy continuation of each prompt, from the same GGUF dequantized to fp32."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(small_gguf.parent, gguf_file=small_gguf.name, dtype=torch.float32).eval()
    out = []
    for prompt in PROMPTS:
        ids = torch.tensor([llm.tokenizer.encode(prompt)])
        with torch.inference_mode():
            gen = hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=24,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
        out.append(gen[0, ids.shape[1] :].tolist())
    return out


def test_greedy_matches_transformers_on_real_weights_batched(llm, hf_greedy):
    completions = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    for c, ref in zip(completions, hf_greedy):
        assert c.token_ids == ref, c.text


def test_each_request_alone_equals_the_batch(llm):
    batched = [c.token_ids for c in llm.generate(PROMPTS[:3], GREEDY)]
    alone = [llm.generate(p, GREEDY)[0].token_ids for p in PROMPTS[:3]]
    assert batched == alone


def test_same_seed_same_sample_different_seed_differs(llm):
    p = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=16, seed=7)
    a = llm.generate(PROMPTS[3], p)[0].token_ids
    b = llm.generate([PROMPTS[0], PROMPTS[3]], p)[1].token_ids  # batched with another request
    c = llm.generate(PROMPTS[3], SamplingParams(temperature=1.0, top_p=0.95, max_tokens=16, seed=8))[0].token_ids
    assert a == b
    assert a != c


def test_stop_string_cuts_the_text(llm):
    full = llm.generate(PROMPTS[4], GREEDY)[0].text
    stop = full.strip().split(",")[2]  # a piece of what greedy will produce
    c = llm.generate(PROMPTS[4], SamplingParams(temperature=0, max_tokens=24, stop=[stop]))[0]
    assert c.finish_reason == "stop"
    assert c.text == full[: full.index(stop)]
    kept = llm.generate(
        PROMPTS[4], SamplingParams(temperature=0, max_tokens=24, stop=[stop], include_stop_str_in_output=True)
    )[0]
    assert kept.text == full[: full.index(stop) + len(stop)]


def test_stop_token_ids_and_max_tokens(llm):
    full = llm.generate(PROMPTS[0], GREEDY)[0]
    c = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[full.token_ids[3]]))[0]
    assert c.finish_reason == "stop" and c.token_ids == full.token_ids[:4]
    short = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=5))[0]
    assert short.finish_reason == "length" and short.token_ids == full.token_ids[:5]


def test_chat_uses_the_template_and_stops_at_end_of_turn(llm):
    c = llm.chat([{"role": "user", "content": "Say hello."}], SamplingParams(temperature=0, max_tokens=64))[0]
    ids = llm.tokenizer.encode_chat([{"role": "user", "content": "Say hello."}])
    assert c.prompt_token_ids == ids
    assert c.finish_reason == "stop" and c.token_ids[-1] == llm.tokenizer.token_to_id("<|im_end|>")
    assert c.answer == c.text.strip() and c.reasoning == ""


def test_streamed_deltas_add_up_to_the_collected_text(llm):
    deltas = list(llm.stream(PROMPTS[1], GREEDY))
    assert deltas[-1].finished and not any(d.finished for d in deltas[:-1])
    assert "".join(d.delta_text for d in deltas) == llm.generate(PROMPTS[1], GREEDY)[0].text


def test_prompt_over_the_context_is_refused(small_gguf):
    small = LLM(str(small_gguf), dtype="fp32", max_model_len=64, kv_cache_tokens=256, progress=False)
    with pytest.raises(PromptTooLongError, match="the prompt has 101 tokens but the context holds 64"):
        small.generate([5] * 101, GREEDY)
    assert not small.engine.has_unfinished()
    bm = small.engine.core.scheduler.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_bad_requests_get_clear_errors(llm):
    with pytest.raises(TypeError, match="stop"):
        SamplingParams(stop=[1, 2])
    with pytest.raises(TypeError, match="stop"):
        llm.generate("hi", SamplingParams(stop=5))
    with pytest.raises(TypeError, match="SamplingParams"):
        llm.generate("hi", {"temperature": 0})
    with pytest.raises(ValueError, match=r"prompt token ids must be integers in \[0, 151936\)"):
        llm.generate([10**7], GREEDY)
    for ids in ([-1], [2**32], [5, 2**64]):  # refused before decoding, which takes only valid ids
        with pytest.raises(ValueError, match="prompt token ids"):
            llm.generate(ids, GREEDY)


def test_reasoning_split_with_the_r1_template(small_gguf, r1_header):
    r1 = LLM(str(small_gguf), tokenizer=str(r1_header), kv_cache_tokens=2048, progress=False)
    chat = [{"role": "user", "content": "What is 2+2?"}]
    ids = r1.tokenizer.encode_chat(chat)
    assert r1.tokenizer.decode(ids[-3:], skip_special_tokens=False) == "<｜Assistant｜><think>\n"
    c = r1.chat(chat, SamplingParams(temperature=0, max_tokens=40, max_reasoning_tokens=6))[0]
    think_end = r1.tokenizer.token_to_id("</think>")
    assert c.token_ids[6] == think_end  # the thinking budget closed the block
    assert "</think>" in c.text and c.reasoning == c.text.split("</think>")[0].strip()
    assert c.answer == c.text.split("</think>", 1)[1].strip()


def test_async_scheduling_gives_the_same_outputs(small_gguf, r1_header):
    # Stops found a step late (a stop token, a stop string), logprobs,
    # penalties, a seeded draw and a reasoning budget, batched: launching each step before the
    # last one's tokens are read must change none of them.
    r1 = LLM(
        str(small_gguf), tokenizer=str(r1_header), dtype="fp32", device="cpu", kv_cache_tokens=4096, progress=False
    )
    chats = [[{"role": "user", "content": c}] for c in ("What is 2+2?", "Name a colour.", "Say hi.")]
    probe = r1.chat(chats[0], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))[0]
    params = [
        SamplingParams(temperature=0, max_tokens=16, stop_token_ids=[probe.token_ids[5]]),
        SamplingParams(temperature=0, max_tokens=16, stop=[probe.text[12:16]]),
        SamplingParams(temperature=0, max_tokens=20, max_reasoning_tokens=4, logprobs=2),
        SamplingParams(temperature=0.8, top_p=0.9, repetition_penalty=1.3, max_tokens=14, seed=3, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=64),
    ]
    batch = [chats[0], chats[0], chats[1], chats[2], chats[2]]

    def outputs(async_scheduling):
        r1.engine.core.async_scheduling = async_scheduling
        completions = r1.chat(batch, params)
        logprobs = [[(lp["logprob"], *(v for _, v in lp["top"])) for lp in c.logprobs] for c in completions]
        return [
            (
                c.token_ids,
                c.text,
                c.reasoning,
                c.answer,
                c.finish_reason,
                [(lp["token_id"], [i for i, _ in lp["top"]]) for lp in c.logprobs],
            )
            for c in completions
        ], logprobs

    sync, sync_logprobs = outputs(False)
    launched_ahead = []
    run = r1.engine.core.runner.run
    r1.engine.core.runner.run = lambda scheduled, tables, sampled=None: (
        launched_ahead.append(sampled is not None) or run(scheduled, tables, sampled)
    )
    got, got_logprobs = outputs(True)
    assert got == sync
    # Batches differ by the rows of sequences that ended a step late, which moves fp32 sums a little.
    torch.testing.assert_close(got_logprobs, sync_logprobs, rtol=0, atol=1e-4)
    assert sum(launched_ahead) > 10
    assert [o[4] for o in sync] == ["stop", "stop", "length", "length", "length"]
    assert len(sync[2][5]) == 20 and sync[2][0][4] == r1.tokenizer.token_to_id("</think>")
    bm = r1.engine.core.scheduler.block_manager
    assert not r1.engine.has_unfinished() and bm.num_free_blocks == bm.num_blocks
