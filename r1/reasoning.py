"""R1's reasoning block: where it opens and closes, by token id, and the text split that follows.

R1 thinks first, between `<think>` and `</think>`, then answers. The chat template usually opens
the block in the prompt (it ends with `<think>\\n`), so the output starts inside it and only
closes it; older templates leave the opening to the model. One rule, kept by `ReasoningTracker`
token by token, decides for the whole engine: the thinking budget, the structured-output gate
(it applies to the answer only), the reasoning token count and the text split all follow it.

- The prompt opens the block when its last `<think>` comes after its last `</think>`.
- Blank tokens at the start are passed over; a `<think>` then opens the block, even when the
  prompt did not. Any other first token is reasoning if the prompt opened the block, else answer.
- Inside the block the first `</think>` closes it; after that everything is answer, tags included.
- The block's tokens are counted with their tags.

`ReasoningText` cuts the growing text at the offsets the tracker's tags fall on, and strips each
part of surrounding whitespace. This module does not detokenize (tokenizer.py) or stop anything.
"""

from __future__ import annotations

from typing import Callable

OPEN, REASONING, CLOSE, ANSWER = "open", "reasoning", "close", "answer"  # the roles of a token
CLOSE_TAG = "</think>"


def prompt_opens_reasoning(prompt_token_ids: list[int], start_id: int | None, end_id: int | None) -> bool:
    """Whether the prompt leaves a <think> block open: its last <think> after its last </think>."""
    if start_id is None or start_id not in prompt_token_ids:
        return False
    last_start = len(prompt_token_ids) - 1 - prompt_token_ids[::-1].index(start_id)
    return end_id not in prompt_token_ids[last_start:]


class ReasoningTracker:
    """Where one output stands, by token id: in the reasoning block or not, and its length."""

    def __init__(self, start_id: int | None, end_id: int | None, prompt_opens: bool):
        self.start_id, self.end_id = start_id, end_id
        self.in_reasoning = prompt_opens
        self.at_start = True  # nothing but blank tokens so far
        self.num_tokens = 0  # tokens of the block, its tags included

    def feed(self, token_id: int, is_blank: Callable[[int], bool]) -> str:
        """Follow one output token; its role (OPEN, REASONING, CLOSE or ANSWER). is_blank is
        asked only about the tokens at the start."""
        if self.at_start and token_id == self.start_id:
            self.at_start, self.in_reasoning = False, True
            self.num_tokens += 1
            return OPEN
        if self.at_start and not is_blank(token_id):
            self.at_start = False
        if not self.in_reasoning:
            return ANSWER
        self.num_tokens += 1
        if token_id == self.end_id:
            self.in_reasoning = False
            return CLOSE
        return REASONING

    def budget_spent(self, max_reasoning_tokens: int | None) -> bool:
        """Whether the block is open and has used up its budget: its next token must close it."""
        return self.in_reasoning and max_reasoning_tokens is not None and self.num_tokens >= max_reasoning_tokens


class _Part:
    """One part's stream: leading whitespace dropped, trailing whitespace held until text follows."""

    def __init__(self):
        self.started, self.held = False, ""

    def take(self, piece: str, final: bool) -> str:
        text = self.held + piece
        if not self.started:
            text = text.lstrip()
        out = text.rstrip()
        self.started = self.started or bool(out)
        self.held = "" if final else text[len(out) :]
        return out


class ReasoningText:
    """Splits a growing output text into reasoning and answer deltas at the tracker's tags.

    `mark` is told each token's role once its text is in `text`; `take` hands out the deltas of
    the text up to a point (the output processor holds back a tail that may become a stop string).
    Offsets count from the output's start; `text` may be a tail of it that starts at `base`
    (at or before what was taken), so a long stream need not keep all of its text.
    """

    def __init__(self, prompt_opens: bool):
        self.reasoning_from: int | None = 0 if prompt_opens else None  # offsets in the text
        self.reasoning_to: int | None = None  # where </think> starts
        self.answer_from: int | None = None if prompt_opens else 0
        self.emitted = 0
        self.reasoning, self.answer = _Part(), _Part()

    def mark(self, role: str, text: str, base: int = 0) -> None:
        end = base + len(text)
        if role == OPEN:  # what came before (blank) and the tag itself are neither part
            self.reasoning_from, self.answer_from = end, None
        elif role == CLOSE:
            self.reasoning_to = end - len(CLOSE_TAG) if text.endswith(CLOSE_TAG) else end
            self.answer_from = end

    def take(self, text: str, upto: int, final: bool, base: int = 0) -> tuple[str, str]:
        """(reasoning, answer) deltas of the text up to offset upto since the last take; final
        ends both parts."""
        start, self.emitted = self.emitted, upto
        reasoning = answer = ""
        if self.reasoning_from is not None:
            end = upto if self.reasoning_to is None else min(upto, self.reasoning_to)
            closed = final or (self.reasoning_to is not None and upto >= self.reasoning_to)
            reasoning = self.reasoning.take(_between(text, base, max(start, self.reasoning_from), end), closed)
        if self.answer_from is not None:
            answer = self.answer.take(_between(text, base, max(start, self.answer_from), upto), final)
        return reasoning, answer


def _between(text: str, base: int, start: int, end: int) -> str:
    """The output's characters [start, end) from text, its tail from offset base (start >= base)."""
    return text[start - base : max(end - base, 0)]
