"""Sequence: one request's tokens and its place in the engine.

Owns the token lists (prompt, output, and the two joined), how many tokens already have their KV
in the cache, the block table that says where, and the finish reason once there is one. It does
not own sampling parameters or stop rules (the engine), nor decide any state change on its own:
the scheduler and the block manager move it along.
"""

from __future__ import annotations

import enum


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


class Sequence:
    """A prompt and the tokens generated after it, with its KV-cache bookkeeping."""

    def __init__(self, seq_id: int, prompt_token_ids: list[int], max_tokens: int, *, cache_salt: str | None = None):
        self.seq_id = seq_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        # One growing list rather than prompt + output rebuilt on every read: the scheduler and
        # the model runner slice it every step.
        self.token_ids = list(prompt_token_ids)
        self.max_tokens = max_tokens
        # Prefix-cache namespace (vLLM's request field): only sequences with an equal salt, or
        # all without one, share cached blocks, so one tenant cannot probe another's prompts.
        self.cache_salt = cache_salt
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0  # tokens whose KV is in the cache
        # Sampled on the device but not read yet: async scheduling (core.py) counts a sequence's
        # coming token while it schedules and launches the next step, before the id is known.
        self.num_pending_tokens = 0
        self.num_cached_tokens = 0  # of the prompt, found in the prefix cache at the last admission
        # Speculative decoding (r1/engine/speculative.py): how many proposed tokens the scheduler
        # should make room for after the last token, the tokens proposed for this step (never in
        # token_ids until accepted), and the tokens whose KV the draft model holds, in its own
        # cache under the same block table.
        self.num_lookahead_tokens = 0
        self.spec_token_ids: list[int] = []
        self.num_draft_computed_tokens = 0
        self.block_table: list[int] = []  # KV block ids, in token order
        self.table_row: int | None = None  # its row in the block manager's BlockTables, while it holds blocks
        self.finish_reason: str | None = None  # "stop" | "length" | "abort"

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids) + self.num_pending_tokens

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.token_ids.append(token_id)

    def __repr__(self) -> str:
        return (
            f"Sequence(id={self.seq_id}, {self.status.name}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, blocks={len(self.block_table)})"
        )
