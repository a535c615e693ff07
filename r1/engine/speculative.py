"""Speculative decoding: cheap guesses of a sequence's next tokens, checked by the model in one
forward, so a batch-1 step that reads every weight once yields several tokens.

A proposer guesses up to k tokens after a decoding sequence's last one: `NgramProposer` finds
the sequence's latest n-gram earlier in its own tokens (prompt and output) and proposes what
followed it there; `DraftProposer` runs a smaller model of the same vocabulary greedily, k
steps, over its own KV cache, kept under the target's block tables (same block ids, its own
tensors), so it needs no blocks of its own. The target then runs the last token and the
guesses in one forward and the core keeps the guesses its own sampling agrees with
(sampling.verify_proposed), plus one token of its own: the output has exactly the
distribution of plain decoding, greedy or sampled.

Both proposers guess deterministically, a point mass where Leviathan et al. (2023) allow a
draft distribution q: the acceptance test becomes "keep d with probability p(d)", the residual
"p without d", and one verification serves both proposers.

The `Speculator` holds the policy: which requests speculate (not those with penalties or a
constraint, whose distributions depend on each earlier token in ways the rows of one forward do
not see), how many tokens each proposes (k adapts to what is accepted, as transformers'
assisted generation does: up 2 after a round that kept them all, down 1 otherwise, and a
request that keeps rejecting at k = 1 pauses its guesses for a growing number of steps), no
speculation once the batch is large enough to be compute-bound, and the counts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from r1.engine.model_runner import ModelRunner
from r1.engine.scheduler import ScheduledSeq
from r1.engine.sequence import Sequence
from r1.sampling import greedy_tokens

METHODS = ("ngram", "draft")
MAX_PAUSE = 16  # steps a request that keeps rejecting goes without guessing, at most


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str  # ngram | draft
    num_tokens: int = 4  # the most tokens proposed per step (k)
    draft_model: str | None = None  # the draft's source, as the user named it (method draft)
    draft_quant: str | None = None  # its weight quantization
    # No speculation in steps with at least this many running sequences: a batch that large
    # already reads each weight for many tokens, and the guesses would only add compute.
    max_batch: int = 4
    ngram_max: int = 4  # the longest and shortest n-grams the n-gram proposer looks up
    ngram_min: int = 2

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"speculative method must be one of {', '.join(METHODS)}; got {self.method!r}")
        for name in ("num_tokens", "max_batch", "ngram_max", "ngram_min"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer; got {value!r}")
        if (self.method == "draft") != bool(self.draft_model):
            raise ValueError("a draft model goes with method draft, and only with it")
        if self.ngram_min > self.ngram_max:
            raise ValueError(f"ngram_min ({self.ngram_min}) exceeds ngram_max ({self.ngram_max})")


class NgramProposer:
    """Prompt lookup: the longest of the sequence's last n tokens (ngram_max down to ngram_min)
    seen before, and the tokens that followed its latest earlier occurrence.

    Each sequence has an index from n-gram to the position after its latest occurrence, grown by
    the tokens added since the last lookup, so a lookup costs O(new tokens), not O(length)."""

    def __init__(self, ngram_min: int, ngram_max: int):
        self.ngram_min, self.ngram_max = ngram_min, ngram_max
        self.indexes: dict[int, tuple[dict[tuple, int], list[int]]] = {}  # seq_id -> (index, [indexed up to])

    def propose(self, seqs: list[Sequence], ks: list[int]) -> list[list[int]]:
        return [self._lookup(seq, k) for seq, k in zip(seqs, ks)]

    def _lookup(self, seq: Sequence, k: int) -> list[int]:
        tokens = seq.token_ids
        index, done = self.indexes.setdefault(seq.seq_id, ({}, [0]))
        # Index every n-gram that ends before the last token: the suffix itself must not match
        # its own position, which has nothing after it yet.
        for end in range(max(done[0], 1), len(tokens)):
            for n in range(self.ngram_min, min(self.ngram_max, end) + 1):
                index[tuple(tokens[end - n : end])] = end
        done[0] = max(done[0], len(tokens))
        for n in range(min(self.ngram_max, len(tokens) - 1), self.ngram_min - 1, -1):
            follows = index.get(tuple(tokens[len(tokens) - n :]))
            if follows is not None:
                return tokens[follows : follows + k]
        return []

    def forget(self, seq: Sequence) -> None:
        self.indexes.pop(seq.seq_id, None)


class DraftProposer:
    """A smaller model's greedy continuation. Its KV cache has the target's block layout, and a
    sequence's draft tokens live in the sequence's blocks there; seq.num_draft_computed_tokens
    counts those still valid (0 after a preemption; a sequence admitted with a cached prefix
    recomputes it, as the draft may never have seen those blocks)."""

    def __init__(self, runner: ModelRunner):
        self.runner = runner

    def propose(self, seqs: list[Sequence], ks: list[int]) -> list[list[int]]:
        # First call: each sequence's tokens the draft has not yet cached, its last one included;
        # then one token per call for those that want more.
        chunks = [
            (s.token_ids[s.num_draft_computed_tokens :], s.num_draft_computed_tokens, s.block_table) for s in seqs
        ]
        proposed: list[list[int]] = [[] for _ in seqs]
        active = list(range(len(seqs)))
        while active:
            tokens = greedy_tokens(self.runner.run_chunks(chunks)).tolist()
            for i, token in zip(active, tokens):
                proposed[i].append(token)
                seqs[i].num_draft_computed_tokens = seqs[i].num_tokens + len(proposed[i]) - 1
            active = [i for i in active if len(proposed[i]) < ks[i]]
            chunks = [([proposed[i][-1]], seqs[i].num_draft_computed_tokens, seqs[i].block_table) for i in active]
        return proposed

    def forget(self, seq: Sequence) -> None:
        pass


@dataclass
class _RequestState:
    k: int  # tokens to propose next
    pause: int = 0  # steps left without guessing
    next_pause: int = 1


@dataclass
class SpeculationStats:
    """Running totals: rounds (a request's verified guesses in one step), tokens proposed, kept."""

    rounds: int = 0
    proposed: int = 0
    accepted: int = 0


@dataclass
class Speculator:
    config: SpeculativeConfig
    proposer: NgramProposer | DraftProposer
    stats: SpeculationStats = field(default_factory=SpeculationStats)
    states: dict[int, _RequestState] = field(default_factory=dict)  # by seq_id

    def settings(self) -> dict:
        """The configuration, for bench records and manifests."""
        return dataclasses.asdict(self.config)

    def plan(self, reqs: list) -> None:
        """Set how many tokens each running request may propose this step (its lookahead)."""
        on = len(reqs) < self.config.max_batch
        for req in reqs:
            seq = req.seq
            seq.num_lookahead_tokens = 0
            if not on or not _speculates(req):
                continue
            state = self.states.setdefault(seq.seq_id, _RequestState(self.config.num_tokens))
            if state.pause:
                state.pause -= 1
                continue
            # Never more than the tokens left: each accepted guess is an output token.
            seq.num_lookahead_tokens = max(0, min(state.k, seq.max_tokens - seq.num_output_tokens - 1))

    def propose(self, scheduled: list[ScheduledSeq]) -> None:
        """Fill the room the scheduler made with the proposer's guesses."""
        guessing = [s for s in scheduled if s.num_spec]
        for s in scheduled:
            s.seq.spec_token_ids = []
        if not guessing:
            return
        guesses = self.proposer.propose([s.seq for s in guessing], [s.num_spec for s in guessing])
        for s, tokens in zip(guessing, guesses):
            s.seq.spec_token_ids = tokens[: s.num_spec]
            s.shrink_spec(len(s.seq.spec_token_ids))

    def record(self, seq: Sequence, num_proposed: int, num_accepted: int) -> None:
        """Count a round and adapt the request's k to it (if it goes on)."""
        self.stats.rounds += 1
        self.stats.proposed += num_proposed
        self.stats.accepted += num_accepted
        state = self.states.get(seq.seq_id)
        if state is None:  # it ended in this round
            return
        if num_accepted == num_proposed:
            state.k, state.next_pause = min(self.config.num_tokens, state.k + 2), 1
        elif state.k > 1:
            state.k -= 1
        elif num_accepted == 0:
            state.pause, state.next_pause = state.next_pause, min(MAX_PAUSE, 2 * state.next_pause)

    def forget(self, seq: Sequence) -> None:
        self.states.pop(seq.seq_id, None)
        self.proposer.forget(seq)


def _speculates(req) -> bool:
    """Whether a request's next tokens may be verified from one forward's rows: not when
    penalties or a constraint make each position's distribution depend on the tokens before it
    in ways the rows do not see."""
    p = req.params
    return req.constraint is None and p.repetition_penalty == 1.0 and not p.presence_penalty and not p.frequency_penalty
