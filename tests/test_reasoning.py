"""split_reasoning on finished R1 outputs, and ReasoningStream fed those outputs cut every possible way."""

import pytest

from r1.reasoning import ReasoningStream, split_reasoning

# (text, prompt_opened_think, expected reasoning, expected answer)
CASES = [
    # the usual shape: the prompt opened <think>, the model closes it and answers
    ("Okay, 2+2.\nThat is 4.\n</think>\n\nThe answer is **4**.", True,
     "Okay, 2+2.\nThat is 4.", "The answer is **4**."),
    # the model re-opens <think> itself (older template), with leading whitespace
    ("\n<think>\nLet me see.\n</think>\n\n42\n", True, "Let me see.", "42"),
    ("<think>\nLet me see.\n</think>\n\n42", False, "Let me see.", "42"),
    # never closed: cut off by the token limit, everything is reasoning
    ("Hmm, the integral of x is\n\nx^2/2, and", True, "Hmm, the integral of x is\n\nx^2/2, and", ""),
    ("<think>unfinished", False, "unfinished", ""),
    # no tags and a prompt that did not open one: all answer, a stray closing tag included
    ("Plain answer.\n", False, "", "Plain answer."),
    ("a </think> b", False, "", "a </think> b"),
    # empty reasoning, empty answer, empty output
    ("</think>\n\nJust the answer.", True, "", "Just the answer."),
    ("<think>\n\n</think>\n\nJust the answer.", False, "", "Just the answer."),
    ("Only thoughts.</think>", True, "Only thoughts.", ""),
    ("", True, "", ""),
    ("", False, "", ""),
    # only the first </think> ends the reasoning; a later one is answer text
    ("think</think>answer </think> more", True, "think", "answer </think> more"),
    # a <think> that is not at the start is plain text
    ("I wrote <think> here\n</think>ok", True, "I wrote <think> here", "ok"),
    ("x <think>y</think>z", False, "", "x <think>y</think>z"),
    # near misses of the tags stay text
    ("a </thin b </think", True, "a </thin b </think", ""),
    ("<thinking>hi</think>bye", False, "", "<thinking>hi</think>bye"),
    ("<thin", False, "", "<thin"),
    ("<think", True, "<think", ""),
    # inner whitespace is kept, outer whitespace is not
    ("  step 1\n\n  step 2  \n</think>\n  indented\n\n  answer\n\n", True,
     "step 1\n\n  step 2", "indented\n\n  answer"),
    ("\t\n \n", True, "", ""),
    ("数学：1+1=2。\n</think>\n\n答案是 **2** 🎉", True, "数学：1+1=2。", "答案是 **2** 🎉"),
]


@pytest.mark.parametrize("text, opened, reasoning, answer", CASES)
def test_split_finished(text, opened, reasoning, answer):
    assert split_reasoning(text, prompt_opened_think=opened) == (reasoning, answer)


def _stream(deltas, opened):
    stream = ReasoningStream(prompt_opened_think=opened)
    pairs = [stream.feed(d) for d in deltas] + [stream.finish()]
    for r, a in pairs:
        assert "</think>" not in r
    return "".join(r for r, _ in pairs), "".join(a for _, a in pairs)


@pytest.mark.parametrize("text, opened, reasoning, answer", CASES)
def test_stream_every_single_cut(text, opened, reasoning, answer):
    for cut in range(len(text) + 1):
        assert _stream([text[:cut], text[cut:]], opened) == (reasoning, answer), cut


@pytest.mark.parametrize("text, opened, reasoning, answer", CASES)
def test_stream_every_pair_of_cuts(text, opened, reasoning, answer):
    # Two cuts put a tag in three pieces, e.g. "</th" + "in" + "k>".
    for i in range(len(text) + 1):
        for j in range(i, len(text) + 1):
            assert _stream([text[:i], text[i:j], text[j:]], opened) == (reasoning, answer), (i, j)


@pytest.mark.parametrize("text, opened, reasoning, answer", CASES)
def test_stream_character_by_character(text, opened, reasoning, answer):
    assert _stream(list(text), opened) == (reasoning, answer)


def test_stream_does_not_hold_back_more_than_it_must():
    stream = ReasoningStream()
    assert stream.feed("First idea") == ("First idea", "")
    # trailing whitespace waits: it is dropped if the reasoning ends here
    assert stream.feed(" \n") == ("", "")
    assert stream.feed("second </th") == (" \nsecond", "")
    assert stream.feed("ink>\n\nAns") == ("", "Ans")
    assert stream.feed("wer.") == ("", "wer.")
    assert stream.finish() == ("", "")


def test_stream_decides_about_an_opening_tag_as_soon_as_it_can():
    stream = ReasoningStream(prompt_opened_think=False)
    assert stream.feed("\n<th") == ("", "")  # could still be <think>
    assert stream.feed("e") == ("", "<the")  # cannot: all answer
    assert stream.finish() == ("", "")

    stream = ReasoningStream(prompt_opened_think=False)
    assert stream.feed("<think>\nfoo") == ("foo", "")
    assert stream.feed("</think>bar") == ("", "bar")
