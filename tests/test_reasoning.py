"""R1's reasoning rule by token id (ReasoningTracker) and the text split it drives (ReasoningText),
on finished outputs fed token by token, with the text handed out at every pace."""

import re

import pytest

from r1.reasoning import ANSWER, CLOSE, OPEN, REASONING, ReasoningText, ReasoningTracker, prompt_opens_reasoning

START, END = 1, 2  # the tag tokens' ids; every other character is a token of its own

# (text, prompt_opened_think, expected reasoning, expected answer)
CASES = [
    # the usual shape: the prompt opened <think>, the model closes it and answers
    (
        "Okay, 2+2.\nThat is 4.\n</think>\n\nThe answer is **4**.",
        True,
        "Okay, 2+2.\nThat is 4.",
        "The answer is **4**.",
    ),
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
    (
        "  step 1\n\n  step 2  \n</think>\n  indented\n\n  answer\n\n",
        True,
        "step 1\n\n  step 2",
        "indented\n\n  answer",
    ),
    ("\t\n \n", True, "", ""),
    ("数学：1+1=2。\n</think>\n\n答案是 **2** 🎉", True, "数学：1+1=2。", "答案是 **2** 🎉"),
]


def tokens(text: str) -> list[tuple[int, str]]:
    """(id, text) of each token: the tags whole, one token per other character."""
    out = []
    for piece in re.split(r"(<think>|</think>)", text):
        if piece in ("<think>", "</think>"):
            out.append((START if piece == "<think>" else END, piece))
        else:
            out += [(100 + ord(c), c) for c in piece]
    return out


def is_blank(token_id: int) -> bool:
    return token_id >= 100 and not chr(token_id - 100).strip()


def split(text: str, opened: bool, holdback: int = 0, every: int = 1) -> tuple[str, str]:
    """Feed text's tokens; take the text every `every` tokens, holding back its last `holdback`
    characters (as stop strings make the output processor do); then the final take."""
    tracker, split_ = ReasoningTracker(START, END, opened), ReasoningText(opened)
    so_far, parts = "", []
    for n, (token_id, piece) in enumerate(tokens(text), 1):
        role = tracker.feed(token_id, is_blank)
        so_far += piece
        split_.mark(role, so_far)
        if n % every == 0:
            parts.append(split_.take(so_far, max(split_.emitted, len(so_far) - holdback), final=False))
    parts.append(split_.take(so_far, len(so_far), final=True))
    for r, _ in parts:
        assert "</think>" not in r
    return "".join(r for r, _ in parts), "".join(a for _, a in parts)


@pytest.mark.parametrize("text, opened, reasoning, answer", CASES)
def test_split_token_by_token(text, opened, reasoning, answer):
    assert split(text, opened) == (reasoning, answer)


@pytest.mark.parametrize("text, opened, reasoning, answer", CASES)
def test_split_at_every_pace_and_holdback(text, opened, reasoning, answer):
    for every in (1, 2, 3, 7):
        for holdback in (0, 1, 4, 9):
            assert split(text, opened, holdback, every) == (reasoning, answer), (every, holdback)


def test_split_holds_back_only_trailing_whitespace():
    tracker, text_split = ReasoningTracker(START, END, True), ReasoningText(True)
    so_far, got = "", []
    for token_id, piece in tokens("First idea \nsecond </think>\n\nAnswer."):
        so_far += piece
        text_split.mark(tracker.feed(token_id, is_blank), so_far)
        got.append(text_split.take(so_far, len(so_far), final=False))
    assert got[9] == ("a", "")  # "First idea"
    assert got[10] == got[11] == ("", "")  # " \n" waits: dropped if the reasoning ends there
    assert got[12] == (" \ns", "")
    assert "".join(r for r, _ in got) == "First idea \nsecond"
    assert "".join(a for _, a in got) == "Answer."


def test_the_tracker_counts_the_block_with_its_tags_and_spends_the_budget():
    tracker = ReasoningTracker(START, END, prompt_opens=False)
    roles = [tracker.feed(t, is_blank) for t, _ in tokens("\n<think>ab</think>cd")]
    assert roles == [ANSWER, OPEN, REASONING, REASONING, CLOSE, ANSWER, ANSWER]
    assert tracker.num_tokens == 4 and not tracker.in_reasoning

    # an output opening its own block after a blank line is reasoning to the budget too
    tracker = ReasoningTracker(START, END, prompt_opens=False)
    for t, _ in tokens("\n<think>ab"):
        tracker.feed(t, is_blank)
    assert tracker.in_reasoning and tracker.budget_spent(3) and not tracker.budget_spent(4)
    assert not tracker.budget_spent(None)

    tracker = ReasoningTracker(START, END, prompt_opens=False)  # a <think> after text is text
    assert [tracker.feed(t, is_blank) for t, _ in tokens("x<think>")] == [ANSWER, ANSWER]
    assert not tracker.budget_spent(0)


def test_is_blank_is_asked_only_at_the_start():
    asked = []
    tracker = ReasoningTracker(START, END, prompt_opens=True)
    for t, _ in tokens("  ab  c"):
        tracker.feed(t, lambda token_id: asked.append(token_id) or is_blank(token_id))
    assert len(asked) == 3  # the two spaces and "a"


@pytest.mark.parametrize(
    "prompt, opens",
    [
        ([5, START, 6], True),
        ([5, START, 6, END, 7], False),
        ([START, END, START], True),
        ([5, 6], False),
        ([END], False),
        ([], False),
    ],
)
def test_the_prompt_opens_the_block_when_its_last_think_is_unclosed(prompt, opens):
    assert prompt_opens_reasoning(prompt, START, END) is opens
    assert prompt_opens_reasoning(prompt, None, END) is False
