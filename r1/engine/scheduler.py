"""Scheduler: which sequences run in the next step, and on how many of their tokens.

One rule for prefill and decode (vLLM v1): every sequence has num_tokens and num_computed_tokens,
and each step hands out a token budget to close the gaps, running sequences first and then waiting
ones in arrival order. A long prompt thus prefills in chunks alongside other sequences' decodes.
When the KV pool runs out, the most recently admitted sequence is preempted: its blocks are freed
and it is recomputed later, helped by the prefix cache.

It owns the waiting queue, the running list and the sequences' status. It does not sample,
detokenize or decide when a sequence stops: the engine calls finish().
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from r1.engine.block_manager import BlockManager
from r1.engine.sequence import Sequence, SequenceStatus


@dataclass(frozen=True)
class SchedulerConfig:
    num_blocks: int  # the KV pool's size, in blocks
    block_size: int = 16  # tokens per block
    max_num_seqs: int = 256  # sequences running at once
    max_num_batched_tokens: int = 2048  # the per-step token budget
    max_model_len: int = 131072  # prompt + output tokens of one sequence
    enable_prefix_caching: bool = True

    def __post_init__(self):
        for name in ("num_blocks", "block_size", "max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"SchedulerConfig.{name} must be a positive integer, got {value!r}")


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int  # run (seq.token_ids + seq.spec_token_ids)[seq.num_computed_tokens:][:num_new_tokens] now
    # Of those, proposed tokens (speculative decoding) after the sequence's last token: room made
    # for them; the proposer may fill fewer (shrink), and the verification counts those accepted.
    num_spec: int = 0
    # Whether this step reaches the end of the known tokens, so a token is sampled for it. Fixed
    # when scheduled, so it still reads true after update_after_step and append_token.
    samples: bool = field(init=False)
    # Launched ahead (async scheduling) with a stand-in for the sequence's pending token, which
    # settling then replaced: the step's work for it is dropped, and the token runs again.
    stale: bool = field(default=False, init=False)

    def __post_init__(self):
        assert self.num_new_tokens > 0, f"{self.seq} scheduled with {self.num_new_tokens} tokens"
        self.samples = self.seq.num_computed_tokens + self.num_new_tokens - self.num_spec == self.seq.num_tokens

    def shrink_spec(self, num_spec: int) -> None:
        """Run only num_spec of the proposed tokens room was made for (the proposer found fewer)."""
        self.num_new_tokens -= self.num_spec - num_spec
        self.num_spec = num_spec


class Scheduler:
    def __init__(self, config: SchedulerConfig):
        self.config = config
        self.block_manager = BlockManager(config.num_blocks, config.block_size, config.enable_prefix_caching)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in order of admission
        self.num_preemptions = 0

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence; raise ValueError for one that could never finish."""
        self.check(seq)
        self.waiting.append(seq)

    def check(self, seq: Sequence) -> None:
        """Raise ValueError for a sequence that could never finish; changes nothing."""
        if seq.num_prompt_tokens == 0:
            raise ValueError("the prompt is empty")
        if seq.max_tokens <= 0:
            raise ValueError(f"max_tokens must be positive, got {seq.max_tokens}")
        max_len = seq.num_prompt_tokens + seq.max_tokens
        if max_len > self.config.max_model_len:
            raise ValueError(
                f"prompt ({seq.num_prompt_tokens} tokens) + max_tokens ({seq.max_tokens}) "
                f"exceeds max_model_len ({self.config.max_model_len})"
            )
        # A sequence the whole pool cannot hold would preempt itself forever. Its last sampled
        # token is never run through the model, so it needs KV for max_len - 1 tokens.
        if self.block_manager.blocks_needed(max_len - 1) > self.config.num_blocks:
            raise ValueError(
                f"prompt + max_tokens ({max_len} tokens) would outgrow the KV cache "
                f"({self.config.num_blocks} blocks of {self.config.block_size} tokens)"
            )

    def schedule(self) -> list[ScheduledSeq]:
        """Hand out this step's token budget: running sequences in admission order, then admissions."""
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledSeq] = []
        preemptions_before = self.num_preemptions

        # Running sequences first, oldest first; a decode's gap is its one sampled token. One
        # without a gap is ending: async scheduling left it out, its token being read its last.
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if num_new == 0:
                i += 1
                continue
            # A decoding sequence may take room for proposed tokens, from what the budget and the
            # free blocks leave: guesses never preempt anybody.
            num_spec = 0
            if seq.num_lookahead_tokens and seq.num_computed_tokens == seq.num_tokens - 1:
                slots = (len(seq.block_table) + self.block_manager.num_free_blocks) * self.config.block_size
                num_spec = max(0, min(seq.num_lookahead_tokens, budget - num_new, slots - seq.num_tokens))
            if not self._allocate_or_preempt(seq, num_new + num_spec):
                break  # seq was the newest running sequence and preempted itself
            scheduled.append(ScheduledSeq(seq, num_new + num_spec, num_spec))
            budget -= num_new + num_spec
            i += 1

        # Then waiting ones in arrival order, unless blocks just ran out: admitting now would only
        # take back what the preemption freed.
        while (
            self.num_preemptions == preemptions_before
            and self.waiting
            and budget > 0
            and len(self.running) < self.config.max_num_seqs
        ):
            seq = self.waiting[0]
            cached = self.block_manager.lookup_prefix(seq)
            num_cached = len(cached) * self.config.block_size
            num_new = min(seq.num_tokens - num_cached, budget)
            if not self.block_manager.admit(seq, cached, num_new):
                break  # first come, first served: nobody overtakes the head of the queue
            self.waiting.popleft()
            seq.num_computed_tokens = num_cached
            seq.num_cached_tokens = min(num_cached, seq.num_prompt_tokens)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled.append(ScheduledSeq(seq, num_new))
            budget -= num_new
        return scheduled

    def update_after_step(self, scheduled: list[ScheduledSeq]) -> None:
        """Record that the step computed its tokens, proposed ones aside (accept_proposed counts
        those that hold); call it before finishing any of them."""
        for s in scheduled:
            if s.seq.is_finished or s.stale:  # aborted while the step ran, or ran a stand-in token
                continue
            num_computed_before = s.seq.num_computed_tokens
            s.seq.num_computed_tokens += s.num_new_tokens - s.num_spec
            self.block_manager.cache_full_blocks(s.seq, num_computed_before)

    def accept_proposed(self, seq: Sequence, num_accepted: int) -> None:
        """Count as computed the first num_accepted proposed tokens, now in seq.token_ids, and give
        back the blocks that only the rejected ones used. Their KV stays where it was written, past
        the computed tokens, to be overwritten; the prefix cache never saw it."""
        num_computed_before = seq.num_computed_tokens
        seq.num_computed_tokens += num_accepted
        seq.num_draft_computed_tokens = min(seq.num_draft_computed_tokens, seq.num_computed_tokens)
        self.block_manager.cache_full_blocks(seq, num_computed_before)
        self.block_manager.trim(seq, seq.num_tokens)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Retire a waiting or running sequence ("stop", "length" or "abort") and free its blocks."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        else:  # already finished: an abort that raced the sequence's own end
            return
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def _allocate_or_preempt(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Allocate for seq, preempting the newest running sequences until it fits.

        Returns False when seq itself had to be preempted; those scheduled before it never are,
        since they are older.
        """
        while not self.block_manager.allocate(seq, num_new_tokens):
            victim = self.running.pop()
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        """Free seq's blocks and requeue it at the front, to recompute everything it had."""
        self.block_manager.free(seq)
        seq.num_computed_tokens = seq.num_draft_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
