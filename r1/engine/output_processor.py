"""The output processor: a request's sampled tokens become what its caller reads.

Owns, per request, the streaming detokenizer, the text with the tail held back that could still
grow into a stop string, the reasoning/answer split (cut where the core's reasoning tracker saw
the tags), timing and the `RequestOutput` of each step. It finds stop strings, and says so, but
does not schedule, sample or decide eos and length (core.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from r1.engine.interface import RequestOutput, TokenUpdate
from r1.reasoning import ReasoningText
from r1.sampling_params import SamplingParams
from r1.tokenizer import IncrementalDetokenizer, Tokenizer


@dataclass
class _Output:
    params: SamplingParams
    detokenizer: IncrementalDetokenizer
    split: ReasoningText
    text: str = ""  # everything detokenized so far; the tail may be held back for stop strings
    num_emitted_chars: int = 0
    arrival: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.outputs: dict[str, _Output] = {}

    def add(self, request_id: str, params: SamplingParams, prompt_opens_reasoning: bool) -> None:
        self.outputs[request_id] = _Output(
            params,
            IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens),
            ReasoningText(prompt_opens_reasoning),
        )

    def process(self, update: TokenUpdate) -> RequestOutput:
        """The request's output for this step; finish_reason "stop" where a stop string appeared
        (the caller then finishes the request in the core). A failed update ends it with its error."""
        if update.error is not None:
            return self.fail(update, update.error)
        out = self.outputs[update.request_id]
        new_ids = [] if update.token_id is None else [update.token_id]
        reason = update.finish_reason
        if update.token_id is not None:
            if out.first_token_time is None:
                out.first_token_time = time.perf_counter()
            out.text += out.detokenizer.add(new_ids)
            out.split.mark(update.role, out.text)
            if self._cut_at_stop_string(out):
                reason = "stop"
            elif reason is not None:  # bytes held back for an unfinished character come out now
                out.text += out.detokenizer.flush()
        if reason is not None:
            final = self._output(update, out, new_ids, len(out.text), reason)
            del self.outputs[update.request_id]
            return final
        # Hold back a tail that could still grow into a stop string.
        holdback = max((len(s) - 1 for s in out.params.stop), default=0)
        return self._output(update, out, new_ids, max(out.num_emitted_chars, len(out.text) - holdback), None)

    def fail(self, update: TokenUpdate, error: str) -> RequestOutput:
        """The final output of a request that failed: finish_reason "error", its text so far dropped."""
        out = self.outputs.pop(update.request_id)
        return self._record(update, out, [], "", "", "", "error", [], error)

    @staticmethod
    def _cut_at_stop_string(out: _Output) -> bool:
        """Cut the text at the first stop string that appeared; True if one did."""
        stops = out.params.stop
        if not stops:
            return False
        search_from = max(0, out.num_emitted_chars - max(len(s) for s in stops) + 1)
        hits = [(i, s) for s in stops if (i := out.text.find(s, search_from)) >= 0]
        if not hits:
            return False
        i, s = min(hits)
        out.text = out.text[: i + len(s)] if out.params.include_stop_str_in_output else out.text[:i]
        return True

    def _output(
        self, update: TokenUpdate, out: _Output, new_ids: list[int], upto: int, reason: str | None
    ) -> RequestOutput:
        delta = out.text[out.num_emitted_chars : upto]
        out.num_emitted_chars = upto
        reasoning, answer = out.split.take(out.text, upto, final=reason is not None)
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
            list(logprobs),
            error,
            update.num_reasoning_tokens,
        )
