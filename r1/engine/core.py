"""The engine core: schedule, run the model, sample, update; one `step()` at a time.

Owns the life of a request inside the engine: its sequence, resolved sampling parameters, random
generator, reasoning tracker and constraint, and the end it comes to by token (eos, a stop token,
its length, a finished constraint, the thinking budget closing its block). A step hands back one
`TokenUpdate` per request it touched; the output processor (output_processor.py) turns those into
text. It does not own the batching policy (scheduler.py), the tensors (model_runner.py) or text.

With async scheduling (vLLM's name; on by default on a GPU) a step launches the next step's
forward before it reads its own sampled tokens: each sequence going on counts one pending token,
the next inputs take it from the device, and the GPU runs the forward while the host reads the
tokens and the output processor works, time it would otherwise sit idle. The price is a sequence
that stops unforeseen (an eos, a stop string) runs one more token, whose row is dropped; one that
reaches its length is left out of the next step, since that end is known ahead. Sampling still
follows the update, so penalties, structured output and the budget see every token first. A row
whose token is settled over the whole vocabulary after the read (sampler.py) went into the next
step as a stand-in: that step's work for it is dropped (ScheduledSeq.stale) and the token runs again.

A failure stays with its request where it can be traced to one: a request whose sampling or
constraint raises fails alone (an update with its error), and the others go on. A failed forward
fails the requests it ran, and step() raises StepError carrying their updates; so does a step
whose every sampled row failed (the sampler's fault, not a request's). A device fault is never
pinned on a request: it leaves step() as it came.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import Callable

import torch

from r1.engine.interface import StepError, TokenConstraint, TokenUpdate, is_device_fault
from r1.engine.model_runner import ModelRunner
from r1.engine.sampler import StepSample, sample_rows, token_logprobs
from r1.engine.scheduler import ScheduledSeq, Scheduler
from r1.engine.sequence import Sequence, SequenceStatus
from r1.engine.speculative import Speculator
from r1.reasoning import ANSWER, ReasoningTracker
from r1.sampling import verify_proposed
from r1.sampling_params import SamplingParams

log = logging.getLogger(__name__)


@dataclass
class CoreRequest:
    request_id: str
    seq: Sequence
    params: SamplingParams  # concrete: defaults filled in
    generator: torch.Generator | None
    reasoning: ReasoningTracker
    constraint: TokenConstraint | None  # restricts the answer's tokens (structured output)


class EngineCore:
    def __init__(
        self,
        runner: ModelRunner,
        scheduler: Scheduler,
        eos_token_ids: set[int],
        is_blank: Callable[[int], bool],
        async_scheduling: bool = False,
        speculator: Speculator | None = None,
    ):
        self.runner, self.scheduler = runner, scheduler
        self.eos_token_ids, self.is_blank = eos_token_ids, is_blank
        self.max_model_len = scheduler.config.max_model_len
        # A step with guesses to verify must know what was kept before the next one is planned.
        self.async_scheduling = async_scheduling and speculator is None
        self.speculator = speculator
        self.requests: dict[int, CoreRequest] = {}  # by seq_id
        self.by_request_id: dict[str, CoreRequest] = {}
        self.seq_ids = itertools.count()
        self._pending: list[TokenUpdate] = []  # updates made outside step() (aborts)
        # The step launched ahead (async scheduling) and its logits, which the next step() samples.
        self._ahead: tuple[list[ScheduledSeq], torch.Tensor] | None = None

    def add(self, requests: list[CoreRequest]) -> None:
        """Queue requests already checked (LLMEngine.add_requests checks a group before any is queued)."""
        for req in requests:
            self.scheduler.add(req.seq)
            self.requests[req.seq.seq_id] = req
            self.by_request_id[req.request_id] = req

    def finish(self, request_id: str, reason: str) -> TokenUpdate | None:
        """End a request that is still the core's (an abort, a stop string found in its text);
        its update, or None when it had already ended."""
        req = self.by_request_id.get(request_id)
        if req is None:
            return None
        self._retire(req, reason)
        return self._update(req, None, [], reason)

    def _retire(self, req: CoreRequest, reason: str) -> None:
        """Finish req's sequence (its blocks go back) and forget it."""
        self.scheduler.finish(req.seq, reason)
        del self.requests[req.seq.seq_id], self.by_request_id[req.request_id]
        if self.speculator is not None:
            self.speculator.forget(req.seq)

    def abort(self, request_id: str) -> None:
        """Finish a request with "abort"; its update comes out of the next step."""
        update = self.finish(request_id, "abort")
        if update is not None:
            self._pending.append(update)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._pending)

    # ---- one step ----------------------------------------------------------------------------

    def step(self) -> list[TokenUpdate]:
        updates, self._pending = self._pending, []
        if self._ahead is not None and not all(s.seq.is_finished or s.stale for s in self._ahead[0]):
            (scheduled, logits), self._ahead = self._ahead, None  # launched by the last step
        else:
            self._ahead = None  # everything it ran has ended
            if self.speculator is not None:
                self.speculator.plan([self.requests[seq.seq_id] for seq in self.scheduler.running])
            scheduled = self.scheduler.schedule()
            if not scheduled:
                return updates
            try:
                if self.speculator is not None:
                    self.speculator.propose(scheduled)
                logits = self.runner.run(scheduled, self.scheduler.block_manager.tables)
            except Exception as e:
                if not is_device_fault(e):
                    updates += [self._fail(self.requests[s.seq.seq_id], e) for s in scheduled]
                raise StepError(e, updates) from e
        self.scheduler.update_after_step(scheduled)
        # The rows of logits: one per sampling sequence, 1 + num_spec for one with guesses. A
        # sequence that ended while its step ran (a stop found a step late, an abort) has no
        # request left, and a stale one ran a stand-in token; their rows are dropped.
        plain, guessed, row = [], [], 0
        for s in scheduled:
            if not s.samples:
                continue
            if not s.seq.is_finished and not s.stale:
                (guessed if s.num_spec else plain).append((s, row))
            row += 1 + s.num_spec
        for s, first in guessed:
            updates += self._verify(self.requests[s.seq.seq_id], s, logits[first : first + 1 + s.num_spec])
        if not plain:
            return updates
        if len(plain) < row:
            logits = logits[torch.tensor([first for _, first in plain], device=logits.device)]
        sample = sample_rows(logits, [self.requests[s.seq.seq_id] for s, _ in plain])
        updates += [self._fail(req, e) for req, e in sample.failures]
        if not sample.reqs:
            raise StepError(sample.failures[0][1], updates)
        try:
            token_ids = self._read_tokens(sample)
        except Exception as e:  # the next step's launch: its sequences were rewound, not failed
            raise StepError(e, updates) from e
        for req, token_id, lp in zip(sample.reqs, token_ids, sample.logprobs):
            try:
                updates.append(self._append_token(req, token_id, lp))
            except Exception as e:  # its constraint: its failure alone
                updates.append(self._fail(req, e))
        return updates

    def _verify(self, req: CoreRequest, s: ScheduledSeq, rows: torch.Tensor) -> list[TokenUpdate]:
        """Append the guesses the target keeps and one token of its own (speculative.py); rows
        holds the target's logits at the last known token and at each guess."""
        seq, proposed = req.seq, req.seq.spec_token_ids[: s.num_spec]
        updates, accepted = [], 0
        try:
            keeps, residual, bonus = verify_proposed(rows, req.params, proposed, req.generator)
            for i in range(len(proposed) + 1):
                # A spent thinking budget forces </think> here, as sample_rows does: a guess is
                # then kept only if it is that token.
                forced = req.reasoning.end_id if req.reasoning.budget_spent(req.params.max_reasoning_tokens) else None
                if i < len(proposed):
                    keep = proposed[i] == forced if forced is not None else keeps[i]
                    token = proposed[i] if keep else forced if forced is not None else residual[i]
                else:
                    keep, token = False, forced if forced is not None else bonus
                lp = token_logprobs(rows[i : i + 1], token, req.params.logprobs)
                updates.append(self._append_token(req, token, lp))
                if seq.is_finished or not keep:
                    break
                accepted += 1
        except Exception as e:
            if seq.is_finished:
                raise
            return [*updates, self._fail(req, e)]
        finally:
            self.speculator.record(seq, len(proposed), accepted)
        if not seq.is_finished:
            self.scheduler.accept_proposed(seq, accepted)
        return updates

    def _read_tokens(self, sample: StepSample) -> list[int]:
        """The sampled ids as numbers, unsettled rows settled; with async scheduling, once the
        next step is launched. An unsettled row reads as -1, so one copy tells which to settle."""
        tokens, reqs = sample.tokens, sample.reqs
        marked = tokens if sample.unsettled is None else tokens.masked_fill(sample.unsettled, -1)
        if not self.async_scheduling:
            return self._settle(sample, marked.tolist())
        read = self.runner.start_reading(marked)  # queued ahead of the next forward
        # Each sequence that goes on counts its coming token as pending, so that the scheduler
        # sees it one token further on; the runner takes the token from its row of `tokens`.
        rows = {r.seq.seq_id: row for row, r in enumerate(reqs) if not self._reaches_length(r.seq, 1)}
        going_on = [reqs[row].seq for row in rows.values()]
        for seq in going_on:
            seq.num_pending_tokens = 1
        try:
            scheduled = self.scheduler.schedule()
            if scheduled:
                self._ahead = scheduled, self.runner.run(scheduled, self.scheduler.block_manager.tables, (tokens, rows))
        except Exception:
            # A failed launch (out of memory, say) loses these tokens unread: each sequence still
            # running computes its last token again next step, to sample anew.
            self._ahead = None
            for req in reqs:
                if req.seq.status is SequenceStatus.RUNNING:
                    req.seq.num_computed_tokens -= 1
            raise
        finally:
            for seq in going_on:
                seq.num_pending_tokens = 0
        return self._settle(sample, read())

    def _settle(self, sample: StepSample, token_ids: list[int]) -> list[int]:
        """token_ids with each unsettled row's (-1) drawn; a step launched ahead with a stand-in
        for one has that sequence's rows dropped, and the sequence runs its token next step."""
        if sample.unsettled is None:
            return token_ids
        rows = [i for i, token in enumerate(token_ids) if token < 0]
        if not rows:
            return token_ids
        for row, token in zip(rows, sample.settle(rows)):
            token_ids[row] = token
        if self._ahead is not None:
            redrawn = {sample.reqs[row].seq.seq_id for row in rows}
            for s in self._ahead[0]:
                s.stale = s.seq.seq_id in redrawn
        return token_ids

    def _reaches_length(self, seq: Sequence, new_tokens: int) -> bool:
        """Whether seq is at its length (max_tokens, or the context) with new_tokens more."""
        return seq.num_output_tokens + new_tokens >= seq.max_tokens or seq.num_tokens + new_tokens >= self.max_model_len

    def _append_token(self, req: CoreRequest, token_id: int, logprobs: list[dict]) -> TokenUpdate:
        seq, params = req.seq, req.params
        seq.append_token(token_id)
        role = req.reasoning.feed(token_id, self.is_blank)
        reason = None
        if req.constraint is not None and role == ANSWER:
            req.constraint.accept(token_id)
            if req.constraint.is_done():
                reason = "stop"
        if token_id in self.eos_token_ids and not params.ignore_eos or token_id in params.stop_token_ids:
            reason = "stop"
        elif reason is None and self._reaches_length(seq, 0):
            reason = "length"
        if reason is not None:
            self._retire(req, reason)
        return self._update(req, token_id, logprobs, reason, role)

    def _fail(self, req: CoreRequest, error: Exception) -> TokenUpdate:
        """Finish req with "error"; a device fault is re-raised instead: it is the engine's,
        never one request's."""
        if is_device_fault(error):
            raise error
        log.error("request %s failed", req.request_id, exc_info=error)
        self._retire(req, "error")
        return self._update(req, None, [], "error", error=f"{type(error).__name__}: {error}")

    @staticmethod
    def _update(req: CoreRequest, token_id, logprobs, reason, role=None, error=None) -> TokenUpdate:
        seq = req.seq
        return TokenUpdate(
            req.request_id,
            token_id,
            role,
            logprobs,
            reason,
            seq.num_prompt_tokens,
            seq.num_output_tokens,
            seq.num_cached_tokens,
            req.reasoning.num_tokens,
            error,
        )
