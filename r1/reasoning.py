"""Splitting R1's output into its reasoning and its answer, for finished text and for a stream.

R1 thinks first, between `<think>` and `</think>`, then answers. The prompt usually opens the
reasoning already (the chat template ends with `<think>\\n`), so the output starts inside it and
only closes it; older templates leave the opening to the model. This module owns where the
reasoning ends and how the two parts are trimmed; it works on text, not token ids, and does not
own detokenizing (tokenizer.py) or stopping generation.

The rules, the same for `split_reasoning` and `ReasoningStream`:
- leading whitespace and one `<think>` at the very start are dropped; that `<think>` means
  reasoning even when the prompt did not open it;
- inside reasoning, the first `</think>` ends it; without one the whole text is reasoning;
- outside reasoning everything is answer, tags included;
- both parts are stripped of surrounding whitespace.
"""

from __future__ import annotations

OPEN_TAG, CLOSE_TAG = "<think>", "</think>"


def split_reasoning(text: str, prompt_opened_think: bool = True) -> tuple[str, str]:
    """(reasoning, answer) of a finished output."""
    body = text.lstrip()
    in_reasoning = prompt_opened_think
    if body.startswith(OPEN_TAG):
        body, in_reasoning = body[len(OPEN_TAG):], True
    if not in_reasoning:
        return "", body.strip()
    reasoning, _, answer = body.partition(CLOSE_TAG)
    return reasoning.strip(), answer.strip()


def _partial_tag_len(text: str, tag: str) -> int:
    """Length of the longest end of `text` that could be the start of `tag`."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class ReasoningStream:
    """Feeds text deltas in, gets (reasoning_delta, answer_delta) out.

    Holds back only what the next delta could still change: a possible partial `<think>` at the
    start, a possible partial `</think>`, and trailing whitespace (stripped if the part ends
    there). The concatenated deltas, `finish()` included, equal `split_reasoning` of the whole text.
    """

    def __init__(self, prompt_opened_think: bool = True):
        self.prompt_opened_think = prompt_opened_think
        self.state = "start"  # start -> reasoning -> answer, or start -> answer
        self.pending = ""  # text received but not yet emitted
        self.started = False  # whether the current part has emitted text (its leading space is gone)

    def feed(self, delta: str) -> tuple[str, str]:
        self.pending += delta
        return self._drain(final=False)

    def finish(self) -> tuple[str, str]:
        """The end of the output: emit what was held back."""
        return self._drain(final=True)

    def _drain(self, final: bool) -> tuple[str, str]:
        reasoning = ""
        if self.state == "start":
            head = self.pending.lstrip()
            if head.startswith(OPEN_TAG):
                self._enter("reasoning", head[len(OPEN_TAG):])
            elif OPEN_TAG.startswith(head) and not final:
                return "", ""  # may still become `<think>`
            else:
                self._enter("reasoning" if self.prompt_opened_think else "answer", head)
        if self.state == "reasoning":
            before, tag, after = self.pending.partition(CLOSE_TAG)
            if not tag:
                cut = len(self.pending) - (0 if final else _partial_tag_len(self.pending, CLOSE_TAG))
                reasoning, held = self._take(self.pending[:cut], final)
                self.pending = held + self.pending[cut:]
                return reasoning, ""
            reasoning, _ = self._take(before, final=True)
            self._enter("answer", after)
        answer, self.pending = self._take(self.pending, final)
        return reasoning, answer

    def _enter(self, state: str, text: str) -> None:
        self.state, self.pending, self.started = state, text, False

    def _take(self, text: str, final: bool) -> tuple[str, str]:
        """Splits `text` of the current part into what goes out now and what is held back."""
        if not self.started:
            text = text.lstrip()
        out = text.rstrip()
        self.started = self.started or bool(out)
        return out, "" if final else text[len(out):]
