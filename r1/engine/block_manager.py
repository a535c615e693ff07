"""BlockManager: the paged KV cache's bookkeeping, with automatic prefix caching.

Owns which of the pool's fixed-size blocks each sequence holds (its block table), reference counts
for blocks shared by several sequences, and the prefix cache: full blocks are found again by a
BLAKE2b chain over their tokens, seeded with the sequence's cache salt, and blocks no sequence
holds stay findable until reused, the least recently freed reused first. It does not own the KV
tensors (the model runner), nor decide who runs or how many tokens (the scheduler).
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from r1.engine.sequence import Sequence

DIGEST_SIZE = 32  # bytes: a 256-bit chain, so no two prefixes ever share a digest in practice


def chain_seed(cache_salt: str | None) -> bytes:
    """The parent digest of a sequence's first block: equal tokens under other salts never match.

    Unsalted sequences share one seed, so they share the cache with each other.
    """
    if cache_salt is None:
        return bytes(DIGEST_SIZE)
    # surrogatepass: any Python str encodes (one from JSON may hold a lone surrogate), injectively.
    return hashlib.blake2b(
        cache_salt.encode("utf-8", "surrogatepass"), digest_size=DIGEST_SIZE, person=b"r1 cache salt"
    ).digest()


def block_digest(parent: bytes, token_ids: list[int]) -> bytes:
    """BLAKE2b over the parent block's digest and this block's token ids, as little-endian int64s.

    Fixed-width fields make the input unambiguous, and the digest the same in every process.
    """
    return hashlib.blake2b(parent + struct.pack(f"<{len(token_ids)}q", *token_ids), digest_size=DIGEST_SIZE).digest()


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    # Set once the block is full and its KV computed: block_digest(parent block's hash, tokens).
    hash: bytes | None = None


class BlockTables:
    """The block tables of the sequences that hold blocks, as rows of one int64 array that the
    block manager keeps in step with seq.block_table: a step's tables are then one gather rather
    than a padded list a sequence, and its cache slots one lookup for the whole batch. A sequence
    holds a row (seq.table_row) from admission until its blocks are freed; entries past the end of
    its table are 0. The array grows, in rows and columns, as it is asked for more."""

    def __init__(self, rows: int = 16, width: int = 64):
        self.array = np.zeros((rows, width), dtype=np.int64)
        self._free_rows = list(range(rows - 1, -1, -1))  # popped from the end: lowest first

    def assign(self, seq: Sequence) -> None:
        """Give seq a row holding its block table."""
        if not self._free_rows:
            rows = len(self.array)
            self.array = np.concatenate([self.array, np.zeros_like(self.array)])
            self._free_rows = list(range(2 * rows - 1, rows - 1, -1))
        seq.table_row = self._free_rows.pop()
        self.write(seq, 0)

    def write(self, seq: Sequence, start: int) -> None:
        """Copy seq's table entries from index start on into its row."""
        table, width = seq.block_table, self.array.shape[1]
        if len(table) > width:
            wider = np.zeros((len(self.array), max(2 * width, len(table))), dtype=np.int64)
            wider[:, :width] = self.array
            self.array = wider
        self.array[seq.table_row, start : len(table)] = table[start:]

    def clear(self, seq: Sequence, start: int) -> None:
        """Zero seq's entries from index start on (its table is about to lose them)."""
        self.array[seq.table_row, start : len(seq.block_table)] = 0

    def release(self, seq: Sequence) -> None:
        """Take back seq's row, its table about to be emptied."""
        self.clear(seq, 0)
        self._free_rows.append(seq.table_row)
        seq.table_row = None

    def gather(self, seqs: list[Sequence]) -> np.ndarray:
        """The tables of seqs (B, longest table), zero-padded."""
        width = max(len(seq.block_table) for seq in seqs)
        return self.array[[seq.table_row for seq in seqs], :width]


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.tables = BlockTables()
        # Blocks no sequence holds, oldest freed first: allocation takes (and evicts) from the
        # front, so cached blocks freed recently survive longest.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._cached: dict[bytes, int] = {}  # block hash -> block id
        self.prefix_queries = 0  # tokens of admitted sequences looked up in the prefix cache
        self.prefix_hits = 0  # of those, tokens found cached

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def lookup_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks holding the longest run of seq's leading full blocks; takes no references.

        The run stops short of seq's last token, so at least one token is always computed: its
        logits are what the next token is sampled from.
        """
        if not self.enable_prefix_caching:
            return []
        hits: list[int] = []
        parent = chain_seed(seq.cache_salt)
        for start in range(0, seq.num_tokens - self.block_size, self.block_size):
            parent = block_digest(parent, seq.token_ids[start : start + self.block_size])
            # The digest alone decides: it covers the salt and every token up to the block's end,
            # and finding two inputs with one 256-bit BLAKE2b digest is out of reach, so comparing
            # the block's own tokens as well would add nothing.
            block_id = self._cached.get(parent)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def admit(self, seq: Sequence, cached_blocks: list[int], num_new_tokens: int) -> bool:
        """Give a sequence holding no blocks the cached prefix plus room for num_new_tokens more.

        All or nothing: on False nothing changed. The scheduler then sets num_computed_tokens to
        the prefix's length.
        """
        assert not seq.block_table, f"{seq} already holds blocks"
        num_cached_tokens = len(cached_blocks) * self.block_size
        num_new_blocks = self.blocks_needed(num_cached_tokens + num_new_tokens) - len(cached_blocks)
        # A cached block nobody holds sits in the free queue: reviving it uses up a free block too.
        num_revived = sum(self.blocks[b].ref_count == 0 for b in cached_blocks)
        if num_new_blocks + num_revived > len(self._free):
            return False
        # Take the hits before allocating, so that allocation cannot evict them.
        for block_id in cached_blocks:
            if self.blocks[block_id].ref_count == 0:
                del self._free[block_id]
            self.blocks[block_id].ref_count += 1
        seq.block_table = list(cached_blocks)
        seq.block_table.extend(self._take_free_block() for _ in range(num_new_blocks))
        self.tables.assign(seq)
        self.prefix_queries += seq.num_tokens
        self.prefix_hits += num_cached_tokens
        return True

    def allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Grow seq's block table to cover num_computed_tokens + num_new_tokens; all or nothing."""
        needed = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        if needed <= 0:  # a decode's usual case: its last block has room
            return True
        if needed > len(self._free):
            return False
        start = len(seq.block_table)
        seq.block_table.extend(self._take_free_block() for _ in range(needed))
        self.tables.write(seq, start)
        return True

    def cache_full_blocks(self, seq: Sequence, num_computed_before: int) -> None:
        """Register the blocks that became full since seq had num_computed_before tokens computed.

        Only computed blocks are registered: a block is findable once its KV is really there.
        """
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        first, end = num_computed_before // bs, seq.num_computed_tokens // bs
        if first == end:  # no block filled up
            return
        if first:
            parent = self.blocks[seq.block_table[first - 1]].hash
        else:
            parent = chain_seed(seq.cache_salt)
        for i in range(first, end):
            block = self.blocks[seq.block_table[i]]
            block.hash = parent = block_digest(parent, seq.token_ids[i * bs : (i + 1) * bs])
            # Two sequences may compute the same block side by side; the first one stays findable.
            self._cached.setdefault(block.hash, block.block_id)

    def trim(self, seq: Sequence, num_tokens: int) -> None:
        """Give back seq's blocks past the first num_tokens tokens (those only rejected proposed
        tokens used: held by seq alone, never cached)."""
        keep = self.blocks_needed(num_tokens)
        self.tables.clear(seq, keep)
        for block_id in seq.block_table[keep:]:
            if self._release(block_id):  # nothing cached in it: the first to be reused
                self._free.move_to_end(block_id, last=False)
        del seq.block_table[keep:]

    def free(self, seq: Sequence) -> None:
        """Drop seq's references; blocks left unreferenced stay cached until reused."""
        # Freed tail first, so a sequence's tail is evicted before its head, which other prompts
        # are likelier to share and without which the tail can never be hit anyway.
        for block_id in reversed(seq.block_table):
            self._release(block_id)
        if seq.table_row is not None:
            self.tables.release(seq)
        seq.block_table = []

    def _release(self, block_id: int) -> bool:
        """Drop one reference to a block; one nobody holds joins the free queue's end (True)."""
        block = self.blocks[block_id]
        block.ref_count -= 1
        if block.ref_count:
            return False
        self._free[block_id] = None
        return True

    def _take_free_block(self) -> int:
        block_id, _ = self._free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None:  # evict it from the prefix cache
            if self._cached.get(block.hash) == block_id:
                del self._cached[block.hash]
            block.hash = None
        block.ref_count = 1
        return block_id
