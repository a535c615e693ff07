"""The output processor on R1's tokenizer: a request that does not stream gets one output, the
same text, reasoning, answer, token ids and logprobs as the streamed outputs joined."""

from __future__ import annotations

import pytest

from r1.engine.interface import TokenUpdate
from r1.engine.output_processor import TEXT_KEPT, OutputProcessor
from r1.reasoning import ReasoningTracker
from r1.sampling_params import SamplingParams
from r1.tokenizer import Tokenizer

THINK, END_THINK = 151648, 151649

LONG = "".join(f"Step {i}: 数学 {i * i} 🫠. " for i in range(900))  # 20,000 characters

OUTPUTS = [  # (output text, whether the prompt opened the reasoning block)
    (LONG + "\n</think>\n\n" + LONG, True),
    ("Okay, 2+2 is 4. 👍🏽\n</think>\n\nThe answer is **4**.", True),
    ("\n<think>\nLet me see: 数学 🫠.\n</think>\n\n42", True),
    ("Hmm, still thinking about ℕ⊆ℤ", True),
    ("Plain answer 🇯🇵, no tags.", False),
    ("think</think>answer </think> more", True),
]


@pytest.fixture(scope="module")
def r1(r1_header):
    from r1.loaders.gguf import read_header

    return Tokenizer.from_gguf_metadata(read_header(r1_header).metadata)


def run(tokenizer, ids, opened, stream, params, finish="length"):
    """The outputs of one request fed ids token by token, the last with finish_reason `finish`."""
    processor = OutputProcessor(tokenizer)
    processor.add("r", params, opened, stream)
    tracker = ReasoningTracker(THINK, END_THINK, opened)
    outputs = []
    for n, token_id in enumerate(ids, 1):
        role = tracker.feed(token_id, lambda t: not tokenizer.decode([t]).strip())
        logprobs = [{"token_id": token_id, "logprob": -0.5 * n, "top": []}] if params.logprobs is not None else []
        reason = finish if n == len(ids) else None
        update = TokenUpdate("r", token_id, role, logprobs, reason, 7, n, 0, tracker.num_tokens)
        out = processor.process(update)
        if "r" in processor.outputs:  # a long stream keeps only the tail it may still need
            assert len(processor.outputs["r"].text) < TEXT_KEPT + 200
        if out is not None:
            outputs.append(out)
            if out.finished:  # a stop string: the core finishes the request
                break
    assert not processor.outputs  # the request's state is gone once it ended
    return outputs


def joined(outputs):
    return (
        "".join(o.delta_text for o in outputs),
        "".join(o.delta_reasoning for o in outputs),
        "".join(o.delta_answer for o in outputs),
        [t for o in outputs for t in o.new_token_ids],
        [lp for o in outputs for lp in o.new_logprobs],
        outputs[-1].finish_reason,
        outputs[-1].num_reasoning_tokens,
    )


@pytest.mark.parametrize("text, opened", OUTPUTS)
@pytest.mark.parametrize("logprobs", [None, 0])
def test_a_request_that_does_not_stream_gets_the_streamed_outputs_joined(r1, text, opened, logprobs):
    ids = r1.encode(text, add_special_tokens=False)
    assert (THINK in ids or END_THINK in ids) == ("think>" in text)  # the tags are single tokens
    params = SamplingParams(logprobs=logprobs)
    streamed = run(r1, ids, opened, True, params)
    final = run(r1, ids, opened, False, params)
    assert len(streamed) == len(ids) and len(final) == 1 and final[0].finished
    assert joined(final) == joined(streamed)
    assert joined(final)[3] == ids
    assert joined(final)[0] == r1.decode(ids)


@pytest.mark.parametrize("reasoning", ["Okay.", LONG])
def test_a_request_with_stop_strings_is_cut_whether_or_not_it_streams(r1, reasoning):
    ids = r1.encode(reasoning + "\n</think>\n\n" + LONG + "The answer is 4. DONE and more", add_special_tokens=False)
    params = SamplingParams(stop=["DONE", "never"])
    for stream in (True, False):
        outputs = run(r1, ids, True, stream, params)
        assert outputs[-1].finish_reason == "stop"
        assert "".join(o.delta_reasoning for o in outputs) == reasoning.strip()
        assert "".join(o.delta_answer for o in outputs) == LONG + "The answer is 4."


def test_an_aborted_request_that_does_not_stream_keeps_its_tokens(r1):
    ids = r1.encode("Half a thought 🫠", add_special_tokens=False)
    (final,) = run(r1, ids, True, False, SamplingParams(), finish="abort")
    assert (final.finish_reason, final.new_token_ids, final.delta_reasoning) == ("abort", ids, "Half a thought 🫠")
