"""The output processor: a request's sampled tokens become what its caller reads.

Owns, per request, the streaming detokenizer, the text with the tail held back that could still
grow into a stop string, the reasoning/answer split (cut where the core's reasoning tracker saw
the tags), timing and the `RequestOutput` of each step. It finds stop strings, and says so, but
does not schedule, sample or decide eos and length (core.py).

A request that does not stream (its caller reads only the end) and has no stop strings to look
for gives one output, its final one: its tokens are gathered, and decoded once when it ends,
with the text's length at each reasoning tag taken from a decode of the tokens up to it.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

from r1.engine.interface import RequestOutput, TokenUpdate
from r1.reasoning import CLOSE, OPEN, ReasoningText
from r1.sampling_params import SamplingParams
from r1.tokenizer import IncrementalDetokenizer, Tokenizer

# Characters already handed out that a streaming request's text may keep. Small, since each
# token's append copies what is kept (docs/performance.md, "Host work per step").
TEXT_KEPT = 256


@dataclass
class _Output:
    params: SamplingParams
    detokenizer: IncrementalDetokenizer
    split: ReasoningText
    streams: bool  # whether each step's tokens are detokenized as they come
    # The text detokenized so far from offset `base` on: the part a stop string or the reasoning
    # split can still reach (the end may be held back for stop strings). Dropping what is older
    # keeps a long stream's appends from copying all of its text every token.
    text: str = ""
    base: int = 0
    num_emitted_chars: int = 0
    holdback: int = 0  # characters of the text held back: a stop string's length, less one
    arrival: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    # A request that does not stream: its tokens, logprobs, and (token count, role) at its tags.
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)
    tags: list[tuple[int, str]] = field(default_factory=list)


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.outputs: dict[str, _Output] = {}

    def add(self, request_id: str, params: SamplingParams, prompt_opens_reasoning: bool, stream: bool = True) -> None:
        self.outputs[request_id] = _Output(
            params,
            IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens),
            ReasoningText(prompt_opens_reasoning),
            streams=stream or bool(params.stop),
            holdback=max((len(s) - 1 for s in params.stop), default=0),
        )

    def process(self, update: TokenUpdate) -> RequestOutput | None:
        """The request's output for this step, or None when it has nothing to report (it does not
        stream, and goes on); finish_reason "stop" where a stop string appeared (the caller then
        finishes the request in the core). A failed update ends it with its error."""
        if update.error is not None:
            return self.fail(update, update.error)
        out = self.outputs[update.request_id]
        if update.token_id is not None and out.first_token_time is None:
            out.first_token_time = time.perf_counter()
        if not out.streams:
            return self._gather(update, out)
        new_ids = [] if update.token_id is None else [update.token_id]
        reason = update.finish_reason
        if update.token_id is not None:
            out.text += out.detokenizer.add(update.token_id)
            if update.role in (OPEN, CLOSE):
                out.split.mark(update.role, out.text, out.base)
            if out.params.stop and self._cut_at_stop_string(out):
                reason = "stop"
            elif reason is not None:  # bytes held back for an unfinished character come out now
                out.text += out.detokenizer.flush()
        end = out.base + len(out.text)
        if reason is not None:
            final = self._output(update, out, new_ids, end, reason)
            del self.outputs[update.request_id]
            return final
        # Hold back a tail that could still grow into a stop string.
        output = self._output(update, out, new_ids, max(out.num_emitted_chars, end - out.holdback), None)
        keep_from = out.num_emitted_chars - out.holdback  # where the next stop-string search starts
        if keep_from - out.base > TEXT_KEPT:
            out.text, out.base = out.text[keep_from - out.base :], keep_from
        return output

    def _gather(self, update: TokenUpdate, out: _Output) -> RequestOutput | None:
        """Keep a token of a request that does not stream; at its end, its one output."""
        if update.token_id is not None:
            out.token_ids.append(update.token_id)
            out.logprobs += update.logprobs
            if update.role in (OPEN, CLOSE):
                out.tags.append((len(out.token_ids), update.role))
        if update.finish_reason is None:
            return None
        skip = out.params.skip_special_tokens
        for count, role in out.tags:
            out.split.mark(role, self.tokenizer.decode(out.token_ids[:count], skip))
        out.text = self.tokenizer.decode(out.token_ids, skip)
        del self.outputs[update.request_id]
        update = dataclasses.replace(update, logprobs=out.logprobs)
        return self._output(update, out, out.token_ids, len(out.text), update.finish_reason)

    def fail(self, update: TokenUpdate, error: str) -> RequestOutput:
        """The final output of a request that failed: finish_reason "error", its text so far dropped."""
        out = self.outputs.pop(update.request_id)
        return self._record(update, out, [], "", "", "", "error", [], error)

    @staticmethod
    def _cut_at_stop_string(out: _Output) -> bool:
        """Cut the text at the first stop string that appeared; True if one did."""
        stops = out.params.stop
        search_from = max(0, out.num_emitted_chars - max(len(s) for s in stops) + 1) - out.base
        hits = [(i, s) for s in stops if (i := out.text.find(s, search_from)) >= 0]
        if not hits:
            return False
        i, s = min(hits)
        out.text = out.text[: i + len(s)] if out.params.include_stop_str_in_output else out.text[:i]
        return True

    def _output(
        self, update: TokenUpdate, out: _Output, new_ids: list[int], upto: int, reason: str | None
    ) -> RequestOutput:
        delta = out.text[out.num_emitted_chars - out.base : upto - out.base]
        out.num_emitted_chars = upto
        reasoning, answer = out.split.take(out.text, upto, reason is not None, out.base)
        return self._record(update, out, new_ids, delta, reasoning, answer, reason, update.logprobs)

    @staticmethod
    def _record(
        update: TokenUpdate, out: _Output, new_ids, delta, reasoning, answer, reason, logprobs, error=None
    ) -> RequestOutput:
        """The RequestOutput of these pieces, with the update's counts and out's timing as of now."""
        now = time.perf_counter()
        first = out.first_token_time or now
        return RequestOutput(
            update.request_id,
            new_ids,
            delta,
            reasoning,
            answer,
            reason is not None,
            reason,
            update.num_prompt_tokens,
            update.num_output_tokens,
            update.num_cached_tokens,
            first - out.arrival,
            now - first,
            logprobs,  # each update's own list
            error,
            update.num_reasoning_tokens,
        )
