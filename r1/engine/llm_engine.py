"""The engine: requests in, incremental outputs out, one `step()` at a time.

Owns the life of a request: its sequence, resolved sampling parameters, random generator,
streaming detokenizer, stop conditions and timing. A step is: schedule, run the model, sample,
postprocess (append, detokenize, check stops), collect the finished. It does not own the batching
policy (scheduler.py), the tensors (model_runner.py) or the HTTP or CLI surface.

With async scheduling (vLLM's name; on by default on a GPU) a step launches the next step's
forward before it reads its own sampled tokens: the next inputs take those tokens from the
device, and the GPU runs the forward while the host detokenizes, checks stops and hands out
outputs, time it would otherwise sit idle. The price is a sequence that stops unforeseen (an eos,
a stop string) runs one more token, whose result is dropped; one that reaches its length is left
out of the next step, since that end is known ahead. Sampling still follows postprocessing, so
penalties, structured output and the reasoning budget see every token before the next draw.

A failure stays with its request where it can be traced to one: a request whose sampling,
constraint or postprocessing raises finishes with finish_reason "error" and its message, and the
others go on. A failed forward fails the requests it ran, and step() raises StepError carrying
their outputs; so does a step whose every sampled row failed (the sampler's fault, not a
request's). A device fault is never pinned on a request: it leaves step() as it came.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Protocol
from typing import Sequence as Seq

import torch

from r1 import kernels
from r1.engine.model_runner import ModelRunner
from r1.engine.scheduler import ScheduledSeq, Scheduler, SchedulerConfig
from r1.engine.sequence import Sequence, SequenceStatus, pending_token
from r1.reasoning import ReasoningStream
from r1.sampling import compute_logprobs, make_generator, sample_next
from r1.sampling_params import SamplingParams
from r1.tokenizer import IncrementalDetokenizer, Tokenizer

log = logging.getLogger(__name__)


class TokenConstraint(Protocol):
    """Limits which tokens the answer may use (a JSON grammar, say); applied after the reasoning."""

    def allowed_tokens(self) -> torch.Tensor: ...  # bool (vocab,) of the tokens allowed next

    def accept(self, token_id: int) -> None: ...

    def is_done(self) -> bool: ...


@dataclass(frozen=True)
class EngineRequest:
    """One request as the engine takes it: token ids, concrete or default-filled sampling params."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    prompt_opens_reasoning: bool = False  # the prompt leaves a <think> block open (R1's template)
    constraint: TokenConstraint | None = None  # restricts the answer's tokens (structured output)
    cache_salt: str | None = None  # its prefix-cache blocks are shared only under the same salt


@dataclass(frozen=True)
class EngineStats:
    """The scheduler's and the KV pool's numbers: a snapshot any thread may read."""

    num_running: int = 0
    num_waiting: int = 0
    num_blocks: int = 0
    num_free_blocks: int = 0
    kv_cache_usage: float = 0.0
    prefix_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_hits: int = 0  # of those, found cached
    num_preemptions: int = 0


class PromptTooLongError(ValueError):
    """A prompt that does not fit the context: never silently truncated."""


class StepError(RuntimeError):
    """A step that failed as a whole (see the module docstring); `outputs` holds what it made,
    among them the final outputs ("error") of the requests it failed, for their callers."""

    def __init__(self, cause: Exception, outputs: list[RequestOutput]):
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.cause, self.outputs = cause, outputs


def is_device_fault(error: BaseException) -> bool:
    """A CUDA error (out-of-memory is its own class) that leaves the context unusable: every later
    call repeats it, so it is the engine's death, not a request's failure."""
    return isinstance(error, torch.AcceleratorError) or "CUDA error" in str(error)


@dataclass
class RequestOutput:
    """What one step produced for one request; the final one has finished=True."""

    request_id: str
    new_token_ids: list[int]
    delta_text: str
    delta_reasoning: str
    delta_answer: str
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int
    time_to_first_token: float  # seconds from arrival to the first token (the prefill)
    decode_seconds: float  # seconds since the first token
    new_logprobs: list[dict] = field(default_factory=list)  # per new token, when asked for
    error: str | None = None  # why the request failed (finish_reason "error")


@dataclass
class _Request:
    request_id: str
    seq: Sequence
    params: SamplingParams
    generator: torch.Generator | None
    detokenizer: IncrementalDetokenizer
    reasoning: ReasoningStream
    in_reasoning: bool  # inside <think> ... </think>, by the token ids seen so far
    constraint: TokenConstraint | None  # restricts the answer's tokens (structured output)
    num_reasoning_tokens: int = 0
    text: str = ""  # everything detokenized so far; the tail may be held back for stop strings
    num_emitted_chars: int = 0
    arrival: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    finish_time: float | None = None


class LLMEngine:
    def __init__(self, runner: ModelRunner, tokenizer: Tokenizer, scheduler_config: SchedulerConfig,
                 sampling_defaults: dict, eos_token_ids: set[int], async_scheduling: bool = False):
        self.runner, self.tokenizer = runner, tokenizer
        self.eos_token_ids = eos_token_ids
        self.think_start_id = tokenizer.token_to_id("<think>")
        self.think_end_id = tokenizer.token_to_id("</think>")
        self.scheduler = Scheduler(scheduler_config)
        self.sampling_defaults = sampling_defaults
        self.max_model_len = scheduler_config.max_model_len
        self.requests: dict[int, _Request] = {}  # by seq_id
        self.by_request_id: dict[str, _Request] = {}
        self._seq_ids = itertools.count()
        self._pending: list[RequestOutput] = []  # outputs made outside step() (aborts)
        self.async_scheduling = async_scheduling
        # The step launched ahead (async scheduling) and its logits, which the next step() samples.
        self._ahead: tuple[list[ScheduledSeq], torch.Tensor] | None = None

    # ---- requests --------------------------------------------------------------------------

    def check_prompt_ids(self, prompt_token_ids: list[int]) -> None:
        """Raise ValueError unless the ids are a non-empty list of the model's token ids."""
        vocab = self.runner.model.config.vocab_size
        if not prompt_token_ids:
            raise ValueError("the prompt is empty")
        if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab for t in prompt_token_ids):
            raise ValueError(f"prompt token ids must be integers in [0, {vocab})")

    def add_requests(self, requests: Seq[EngineRequest]) -> None:
        """Queue a group of requests (the n samples of one call, say), all or none: each is checked,
        and its generator and detokenizer built, before any is queued.

        Raises ValueError (PromptTooLongError for a prompt past the context) naming the problem.
        """
        ids = [r.request_id for r in requests]
        if len(set(ids)) < len(ids):
            raise ValueError(f"request ids repeat within the group: {ids}")
        prepared = [self._prepare(r) for r in requests]
        for req in prepared:
            self.scheduler.add(req.seq)
            self.requests[req.seq.seq_id] = req
            self.by_request_id[req.request_id] = req

    def _prepare(self, r: EngineRequest) -> _Request:
        if r.request_id in self.by_request_id:
            raise ValueError(f"request id {r.request_id!r} is already in use")
        self.check_prompt_ids(r.prompt_token_ids)
        n = len(r.prompt_token_ids)
        if n >= self.max_model_len:
            raise PromptTooLongError(f"the prompt has {n} tokens but the context holds {self.max_model_len} "
                                     f"(max_model_len), leaving no room to generate")
        params = r.params.with_defaults(self.sampling_defaults)
        if params.top_k >= self.runner.model.config.vocab_size:  # keeps every token: vLLM's clamp
            params = dataclasses.replace(params, top_k=0)
        if params.max_reasoning_tokens is not None and self.think_end_id is None:
            raise ValueError("max_reasoning_tokens needs a tokenizer with a </think> token")
        room = self.max_model_len - n
        seq = Sequence(next(self._seq_ids), list(r.prompt_token_ids), min(params.max_tokens or room, room),
                       cache_salt=r.cache_salt)
        self.scheduler.check(seq)
        return _Request(r.request_id, seq, params, make_generator(params.seed),
                        IncrementalDetokenizer(self.tokenizer, skip_special_tokens=params.skip_special_tokens),
                        ReasoningStream(prompt_opened_think=r.prompt_opens_reasoning), r.prompt_opens_reasoning,
                        r.constraint)

    def abort(self, request_ids: Iterable[str]) -> None:
        """Finish the requests with "abort" (their final outputs come out of the next step); ids
        that are unknown or already finished are passed over."""
        for request_id in request_ids:
            req = self.by_request_id.get(request_id)
            if req is None or req.seq.is_finished:
                continue
            self.scheduler.finish(req.seq, "abort")
            self._pending.append(self._finish(req, "abort", []))

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._pending)

    def stats(self) -> EngineStats:
        sched = self.scheduler
        bm = sched.block_manager
        return EngineStats(sched.num_running, sched.num_waiting, bm.num_blocks, bm.num_free_blocks, bm.usage,
                           bm.prefix_queries, bm.prefix_hits, sched.num_preemptions)

    def config_record(self) -> dict[str, Any]:
        """The engine's settings that shape its outputs or its speed, for bench records and manifests."""
        cfg = self.scheduler.config
        return {"max_model_len": cfg.max_model_len, "block_size": cfg.block_size, "num_blocks": cfg.num_blocks,
                "max_num_seqs": cfg.max_num_seqs, "max_num_batched_tokens": cfg.max_num_batched_tokens,
                "enable_prefix_caching": cfg.enable_prefix_caching, "async_scheduling": self.async_scheduling,
                "kv_cache_dtype": str(self.runner.kv_dtype).removeprefix("torch."),
                "kv_cache_bytes": self.runner.kv_cache.nbytes,
                "cuda_graphs": self.runner.graphs is not None,
                "cuda_graph_sizes": sorted(self.runner.graphs.graphs) if self.runner.graphs else [],
                "cpu_kernels": kernels.running_build().name if kernels.op("add_rms_norm") is not None else None}

    # ---- one step ----------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        outputs, self._pending = self._pending, []
        if self._ahead is not None:  # launched by the last step, its forward perhaps still running
            (scheduled, logits), self._ahead = self._ahead, None
        else:
            scheduled = self.scheduler.schedule()
            if not scheduled:
                return outputs
            try:
                logits = self.runner.run(scheduled)
            except Exception as e:
                if not is_device_fault(e):
                    outputs += [self._fail(self.requests[s.seq.seq_id], e) for s in scheduled]
                raise StepError(e, outputs) from e
        self.scheduler.update_after_step(scheduled)
        sampling = [s.seq for s in scheduled if s.samples]  # the rows of logits
        # A sequence that ended while its step ran (a stop found a step late, an abort) has no
        # request left; its row is dropped.
        live = [i for i, seq in enumerate(sampling) if not seq.is_finished]
        if not live:
            return outputs
        if len(live) < len(sampling):
            logits = logits[torch.tensor(live, device=logits.device)]
        reqs = [self.requests[sampling[i].seq_id] for i in live]
        rng_states = [r.generator.get_state() if r.generator is not None else None for r in reqs]
        try:
            tokens, logprobs = self._sample(logits, reqs)
        except Exception as e:
            if is_device_fault(e):
                raise
            reqs, tokens, logprobs = self._sample_apart(logits, reqs, rng_states, outputs)
            if not reqs:
                raise StepError(e, outputs) from e
        try:
            token_ids = self._read_tokens(tokens, reqs)
        except Exception as e:  # the next step's launch: its sequences were rewound, not failed
            raise StepError(e, outputs) from e
        for req, token_id, lp in zip(reqs, token_ids, logprobs):
            try:
                outputs.append(self._append_token(req, token_id, lp))
            except Exception as e:  # its detokenizer, stop check or constraint: its failure alone
                outputs.append(self._fail(req, e))
        if self._ahead is not None and all(s.seq.is_finished for s in self._ahead[0]):
            self._ahead = None  # everything it ran has ended
        return outputs

    def _sample(self, logits: torch.Tensor, reqs: list[_Request]) -> tuple[torch.Tensor, list[list[dict]]]:
        """The next token of each row (B,) on the logits' device, and each row's logprobs."""
        raw_logits = logits
        constrained = [i for i, r in enumerate(reqs) if r.constraint is not None and not r.in_reasoning]
        if constrained:
            logits = logits.clone()
            for i in constrained:
                allowed = reqs[i].constraint.allowed_tokens().to(logits.device)
                logits[i, :allowed.shape[0]].masked_fill_(~allowed, float("-inf"))
                logits[i, allowed.shape[0]:] = float("-inf")  # the model's padding rows
        tokens = sample_next(logits, [r.params for r in reqs], [r.seq.prompt_token_ids for r in reqs],
                             [r.seq.output_token_ids for r in reqs], [r.generator for r in reqs])
        capped = [i for i, r in enumerate(reqs) if r.in_reasoning and r.params.max_reasoning_tokens is not None
                  and r.num_reasoning_tokens >= r.params.max_reasoning_tokens]
        if capped:
            tokens[capped] = self.think_end_id  # thinking budget spent: close it, the answer follows
        # Logprobs are read before the next step is launched, which reading would wait for.
        return tokens, self._logprobs(raw_logits, tokens, reqs)

    def _sample_apart(self, logits: torch.Tensor, reqs: list[_Request], rng_states: list, outputs: list):
        """After the batch's sampling raised: each row alone, from its generator's state before
        the batch, so a row draws what it would have; the rows that raise fail their requests.
        Returns the rows that go on: (reqs, tokens, logprobs)."""
        kept, tokens, logprobs = [], [], []
        for row, (req, state) in enumerate(zip(reqs, rng_states)):
            if state is not None:
                req.generator.set_state(state)
            try:
                token, lp = self._sample(logits[row:row + 1], [req])
            except Exception as e:
                outputs.append(self._fail(req, e))
                continue
            kept.append(row)
            tokens.append(token)
            logprobs += lp
        if not kept:
            return [], None, []
        return [reqs[i] for i in kept], torch.cat(tokens), logprobs

    def _fail(self, req: _Request, error: Exception) -> RequestOutput:
        """Finish req with finish_reason "error": its blocks are freed, its text so far dropped.
        A device fault is re-raised instead: it is the engine's, never one request's."""
        if is_device_fault(error):
            raise error
        log.error("request %s failed", req.request_id, exc_info=error)
        self.scheduler.finish(req.seq, "error")
        req.finish_time = time.perf_counter()
        self.requests.pop(req.seq.seq_id, None)  # _finish may have taken it out before it raised
        self.by_request_id.pop(req.request_id, None)
        return self._record(req, [], "", "", "", True, "error", [], error=f"{type(error).__name__}: {error}")

    def _read_tokens(self, tokens: torch.Tensor, reqs: list[_Request]) -> list[int]:
        """The sampled ids as numbers; with async scheduling, once the next step is launched."""
        if not self.async_scheduling:
            return tokens.tolist()
        read = self.runner.start_reading(tokens)  # queued ahead of the next forward
        # Each sequence that goes on holds its coming token's place with a stand-in for its row,
        # so that the scheduler sees it one token further on.
        going_on = [(row, r.seq) for row, r in enumerate(reqs) if not self._reaches_length(r.seq, 1)]
        for row, seq in going_on:
            seq.append_token(pending_token(row))
        try:
            scheduled = self.scheduler.schedule()
            if scheduled:
                self._ahead = scheduled, self.runner.run(scheduled, tokens)
        except Exception:
            # A failed launch (out of memory, say) loses these tokens unread: each sequence still
            # running computes its last token again next step, to sample anew.
            self._ahead = None
            for req in reqs:
                if req.seq.status is SequenceStatus.RUNNING:
                    req.seq.num_computed_tokens -= 1
            raise
        finally:  # and no stand-in stays behind
            for _, seq in going_on:
                seq.pop_token()
        return read()

    def _reaches_length(self, seq: Sequence, new_tokens: int) -> bool:
        """Whether seq is at its length (max_tokens, or the context) with new_tokens more."""
        return (seq.num_output_tokens + new_tokens >= seq.max_tokens
                or seq.num_tokens + new_tokens >= self.max_model_len)

    def _track_reasoning(self, req: _Request, token_id: int) -> bool:
        """Follow <think> ... </think> by token id; True if the constraint governs this token."""
        if req.in_reasoning:
            req.num_reasoning_tokens += 1
            if token_id == self.think_end_id:
                req.in_reasoning = False
            return False
        if token_id == self.think_start_id and req.seq.num_output_tokens == 1:
            req.in_reasoning = True  # the model opened its own reasoning block
            return False
        return req.constraint is not None

    def _logprobs(self, logits, tokens: torch.Tensor, reqs) -> list[list[dict]]:
        wanted = [r.params.logprobs for r in reqs]
        if all(w is None for w in wanted):
            return [[] for _ in reqs]
        top_n = max(w or 0 for w in wanted)
        chosen, top_ids, top_lps = compute_logprobs(logits, tokens, top_n)
        token_ids = tokens.tolist()
        out = []
        for i, w in enumerate(wanted):
            if w is None:
                out.append([])
                continue
            top = list(zip(top_ids[i, :w].tolist(), top_lps[i, :w].tolist()))
            out.append([{"token_id": token_ids[i], "logprob": chosen[i].item(), "top": top}])
        return out

    def _append_token(self, req: _Request, token_id: int, logprobs: list[dict]) -> RequestOutput:
        seq, params = req.seq, req.params
        if req.first_token_time is None:
            req.first_token_time = time.perf_counter()
        seq.append_token(token_id)
        req.text += req.detokenizer.add([token_id])
        constrained = self._track_reasoning(req, token_id)
        if constrained:
            req.constraint.accept(token_id)
        reason = None
        if self._cut_at_stop_string(req) or (constrained and req.constraint.is_done()):
            reason = "stop"
        else:
            if token_id in self.eos_token_ids and not params.ignore_eos or token_id in params.stop_token_ids:
                reason = "stop"
            elif self._reaches_length(seq, 0):
                reason = "length"
            if reason is not None:  # bytes held back for an unfinished character come out now
                req.text += req.detokenizer.flush()
        if reason is not None:
            self.scheduler.finish(seq, reason)
            return self._finish(req, reason, [token_id], logprobs)
        # Hold back a tail that could still grow into a stop string.
        holdback = max((len(s) - 1 for s in params.stop), default=0)
        visible = len(req.text) - holdback
        delta = req.text[req.num_emitted_chars:visible] if visible > req.num_emitted_chars else ""
        req.num_emitted_chars += len(delta)
        return self._output(req, [token_id], delta, False, None, logprobs)

    def _cut_at_stop_string(self, req: _Request) -> bool:
        """Cut the text at the first stop string that appeared; True if one did."""
        stops = req.params.stop
        if not stops:
            return False
        search_from = max(0, req.num_emitted_chars - max(len(s) for s in stops) + 1)
        hits = [(i, s) for s in stops if (i := req.text.find(s, search_from)) >= 0]
        if not hits:
            return False
        i, s = min(hits)
        req.text = req.text[:i + len(s)] if req.params.include_stop_str_in_output else req.text[:i]
        return True

    def _finish(self, req: _Request, reason: str, new_ids: list[int], logprobs=()) -> RequestOutput:
        req.finish_time = time.perf_counter()
        delta = req.text[req.num_emitted_chars:]
        req.num_emitted_chars = len(req.text)
        out = self._output(req, new_ids, delta, True, reason, list(logprobs))
        del self.requests[req.seq.seq_id]
        del self.by_request_id[req.request_id]
        return out

    def _output(self, req, new_ids, delta, finished, reason, logprobs) -> RequestOutput:
        reasoning, answer = req.reasoning.feed(delta)
        if finished:
            tail_reasoning, tail_answer = req.reasoning.finish()
            reasoning, answer = reasoning + tail_reasoning, answer + tail_answer
        return self._record(req, new_ids, delta, reasoning, answer, finished, reason, logprobs)

    @staticmethod
    def _record(req, new_ids, delta, reasoning, answer, finished, reason, logprobs, error=None) -> RequestOutput:
        """The RequestOutput of these pieces, with req's counts and timing as of now."""
        seq, now = req.seq, time.perf_counter()
        first = req.first_token_time or now
        return RequestOutput(req.request_id, new_ids, delta, reasoning, answer, finished, reason,
                             seq.num_prompt_tokens, seq.num_output_tokens, seq.num_cached_tokens,
                             first - req.arrival, now - first, logprobs, error)
