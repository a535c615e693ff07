"""BlockManager: allocation, reference counts, the prefix cache's hash chain, its cache salts and
its LRU eviction."""

import hashlib
import struct

import pytest

from r1.engine.block_manager import BlockManager
from r1.engine.sequence import Sequence

BS = 4  # block size in these tests


def seq_of(tokens, seq_id=0, salt=None):
    return Sequence(seq_id, list(tokens), max_tokens=8, cache_salt=salt)


def admit_and_compute(bm: BlockManager, seq: Sequence) -> list[int]:
    """Admit seq with its cached prefix, compute all its tokens, register its full blocks."""
    cached = bm.lookup_prefix(seq)
    num_cached = len(cached) * BS
    assert bm.admit(seq, cached, seq.num_tokens - num_cached)
    seq.num_cached_tokens = num_cached
    seq.num_computed_tokens = seq.num_tokens
    bm.cache_full_blocks(seq, num_cached)
    return cached


def ref_counts(bm: BlockManager) -> list[int]:
    return [b.ref_count for b in bm.blocks]


@pytest.mark.parametrize("num_tokens, blocks", [(1, 1), (3, 1), (4, 1), (5, 2), (8, 2), (9, 3)])
def test_allocation_covers_ceil_tokens_over_block_size(num_tokens, blocks):
    bm = BlockManager(num_blocks=8, block_size=BS)
    seq = seq_of(range(100, 100 + num_tokens))
    assert bm.admit(seq, [], num_tokens)
    assert len(seq.block_table) == blocks
    assert len(set(seq.block_table)) == blocks
    assert bm.num_free_blocks == 8 - blocks
    assert bm.usage == pytest.approx(blocks / 8)


def test_allocate_grows_the_table_only_at_block_boundaries():
    bm = BlockManager(num_blocks=8, block_size=BS)
    seq = seq_of(range(3))
    assert bm.admit(seq, [], 3)
    seq.num_computed_tokens = 3
    assert bm.allocate(seq, 1) and len(seq.block_table) == 1  # token 4 still fits block 0
    seq.num_computed_tokens = 4
    assert bm.allocate(seq, 1) and len(seq.block_table) == 2
    assert bm.allocate(seq, 4) and len(seq.block_table) == 2  # 8 tokens: still two blocks
    assert bm.allocate(seq, 5) and len(seq.block_table) == 3


def test_allocation_is_all_or_nothing():
    bm = BlockManager(num_blocks=3, block_size=BS)
    a, b = seq_of(range(8), 0), seq_of(range(50, 58), 1)
    assert bm.admit(a, [], 8)
    assert not bm.admit(b, [], 8)  # needs 2 blocks, 1 left
    assert b.block_table == [] and bm.num_free_blocks == 1
    a.num_computed_tokens = 8
    assert not bm.allocate(a, 5)  # needs 2 more blocks, 1 left
    assert len(a.block_table) == 2 and bm.num_free_blocks == 1
    assert bm.allocate(a, 4) and bm.num_free_blocks == 0


def test_shared_prefix_is_refcounted_and_counted_in_tokens():
    bm = BlockManager(num_blocks=16, block_size=BS)
    prefix = list(range(10, 18))  # two full blocks
    a = seq_of(prefix + [1, 2, 3], 0)
    assert admit_and_compute(bm, a) == []
    assert (bm.prefix_queries, bm.prefix_hits) == (11, 0)

    b = seq_of(prefix + [7, 7], 1)
    cached = admit_and_compute(bm, b)
    assert cached == a.block_table[:2]
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    assert b.num_cached_tokens == 8
    assert (bm.prefix_queries, bm.prefix_hits) == (21, 8)
    refs = ref_counts(bm)
    assert [refs[i] for i in a.block_table] == [2, 2, 1]
    assert bm.num_free_blocks == 16 - 4

    bm.free(a)
    assert [ref_counts(bm)[i] for i in b.block_table] == [1, 1, 1]
    assert bm.num_free_blocks == 16 - 3
    bm.free(b)
    assert bm.num_free_blocks == 16 and bm.usage == 0
    assert sum(ref_counts(bm)) == 0


def test_hash_chain_needs_the_same_parent():
    bm = BlockManager(num_blocks=16, block_size=BS)
    admit_and_compute(bm, seq_of([1] * 4 + [2] * 4 + [0], 0))
    admit_and_compute(bm, seq_of([3] * 4 + [4] * 4 + [0], 1))
    # Block [2]*4 is cached, but only after block [1]*4: behind [3]*4 it is a miss.
    assert len(bm.lookup_prefix(seq_of([3] * 4 + [2] * 4 + [0], 2))) == 1
    assert len(bm.lookup_prefix(seq_of([1] * 4 + [2] * 4 + [0], 3))) == 2
    assert bm.lookup_prefix(seq_of([9] * 4 + [2] * 4 + [0], 4)) == []


def test_equal_block_behind_another_prefix_is_not_reused():
    bm = BlockManager(num_blocks=16, block_size=BS)
    a_block, b_block, c_block = [1] * 4, [2] * 4, [3] * 4
    ab = seq_of(a_block + b_block + [0], 0)
    admit_and_compute(bm, ab)
    cb = seq_of(c_block + b_block + [0], 1)
    assert admit_and_compute(bm, cb) == []
    # The two B blocks hold equal tokens but follow different parents: two digests, two blocks.
    ab_b, cb_b = bm.blocks[ab.block_table[1]], bm.blocks[cb.block_table[1]]
    assert ab_b.block_id != cb_b.block_id and ab_b.hash != cb_b.hash
    assert bm.lookup_prefix(seq_of(c_block + b_block + [0], 2)) == cb.block_table[:2]
    assert bm.lookup_prefix(seq_of(a_block + b_block + [0], 3)) == ab.block_table[:2]


@pytest.mark.parametrize(
    "salt_a, salt_b, shared",
    [
        ("tenant-1", "tenant-1", True),
        ("tenant-1", "tenant-2", False),
        (None, "tenant-1", False),
        ("tenant-1", None, False),
        (None, None, True),
        ("", None, False),  # an empty salt is a salt, not the unsalted namespace
        ("\ud800", "\ud800", True),  # a lone surrogate (valid in JSON) hashes without raising
        ("\ud800", "\udc00", False),
    ],
)
def test_cache_salt_separates_prefix_caches(salt_a, salt_b, shared):
    bm = BlockManager(num_blocks=16, block_size=BS)
    tokens = list(range(30, 39))  # two full blocks and one token
    a = seq_of(tokens, 0, salt_a)
    assert admit_and_compute(bm, a) == []
    b = seq_of(tokens, 1, salt_b)
    assert admit_and_compute(bm, b) == (a.block_table[:2] if shared else [])
    assert bm.prefix_hits == (8 if shared else 0)
    if not shared:  # b's own blocks are cached too, under its salt only
        assert bm.lookup_prefix(seq_of(tokens, 2, salt_b)) == b.block_table[:2]
        assert bm.lookup_prefix(seq_of(tokens, 3, salt_a)) == a.block_table[:2]


@pytest.mark.parametrize("salt", [None, "tenant-1"])
def test_block_hash_is_blake2b_over_parent_digest_and_token_ids(salt):
    """The chain, worked out here with hashlib alone: the same bytes in every process and run,
    unlike Python's hash(), which is not cryptographic and salts str per process."""
    bm = BlockManager(num_blocks=8, block_size=BS)
    tokens = [151646, 0, 7, 2**40, 9, 10, 11, 12, 13]
    seq = seq_of(tokens, 0, salt)
    admit_and_compute(bm, seq)

    def blake(data: bytes) -> bytes:
        return hashlib.blake2b(data, digest_size=32).digest()

    seed = (
        bytes(32) if salt is None else hashlib.blake2b(salt.encode(), digest_size=32, person=b"r1 cache salt").digest()
    )
    first = blake(seed + struct.pack("<4q", *tokens[:4]))
    second = blake(first + struct.pack("<4q", *tokens[4:8]))
    assert [bm.blocks[b].hash for b in seq.block_table] == [first, second, None]


def test_full_hit_still_computes_the_last_token():
    bm = BlockManager(num_blocks=16, block_size=BS)
    tokens = list(range(20, 28))  # exactly two full blocks
    admit_and_compute(bm, seq_of(tokens, 0))
    again = seq_of(tokens, 1)
    cached = bm.lookup_prefix(again)
    # The second block holds the last token, whose logits are needed: only the first is a hit.
    assert len(cached) == 1
    assert bm.admit(again, cached, again.num_tokens - 4)
    assert len(again.block_table) == 2
    assert bm.prefix_hits == 4
    # One token past the blocks: both are hits.
    assert len(bm.lookup_prefix(seq_of(tokens + [99], 2))) == 2


def test_blocks_are_findable_only_once_computed():
    bm = BlockManager(num_blocks=16, block_size=BS)
    a = seq_of(range(12), 0)
    assert bm.admit(a, [], 12)
    assert bm.lookup_prefix(seq_of(range(13), 1)) == []  # allocated, KV not yet computed
    a.num_computed_tokens = 6  # a chunk: block 0 full, block 1 half
    bm.cache_full_blocks(a, 0)
    assert bm.lookup_prefix(seq_of(range(13), 1)) == a.block_table[:1]
    a.num_computed_tokens = 12
    bm.cache_full_blocks(a, 6)
    assert bm.lookup_prefix(seq_of(range(13), 1)) == a.block_table


def test_freed_blocks_stay_cached_and_are_revived():
    bm = BlockManager(num_blocks=4, block_size=BS)
    a = seq_of(range(9), 0)
    admit_and_compute(bm, a)
    held = a.block_table[:2]
    bm.free(a)
    assert bm.num_free_blocks == 4  # cached but unreferenced blocks count as free
    b = seq_of(range(9), 1)
    assert admit_and_compute(bm, b) == held
    assert [bm.blocks[i].ref_count for i in held] == [1, 1]
    assert bm.num_free_blocks == 1
    bm.free(b)
    assert bm.num_free_blocks == 4


def test_reviving_cached_blocks_uses_free_blocks_and_failure_changes_nothing():
    bm = BlockManager(num_blocks=4, block_size=BS)
    a = seq_of(range(9), 0)
    admit_and_compute(bm, a)
    held = a.block_table[:2]
    bm.free(a)
    filler = seq_of([50] * 8, 1)
    assert bm.admit(filler, [], 8)  # takes the two blocks that were never cached
    assert bm.num_free_blocks == 2
    c = seq_of(range(9), 2)
    cached = bm.lookup_prefix(c)
    assert cached == held
    queries = bm.prefix_queries
    # Two cached blocks to revive plus one new: three, with two free.
    assert not bm.admit(c, cached, 1)
    assert c.block_table == [] and bm.num_free_blocks == 2
    assert [bm.blocks[i].ref_count for i in held] == [0, 0]
    assert bm.prefix_queries == queries
    assert bm.lookup_prefix(c) == held  # nothing was evicted either
    bm.free(filler)
    assert bm.admit(c, cached, 1) and c.block_table[:2] == held


def test_lru_evicts_the_oldest_freed_and_spares_a_reused_block():
    bm = BlockManager(num_blocks=6, block_size=BS)
    a, b = seq_of([1] * 5, 0), seq_of([2] * 5, 1)  # one full block each, plus one partial
    admit_and_compute(bm, a)
    admit_and_compute(bm, b)
    a_head, b_head = a.block_table[0], b.block_table[0]
    bm.free(a)
    bm.free(b)
    # a's head was freed before b's, but a new sequence hits it: held again, it cannot be evicted.
    a2 = seq_of([1] * 5, 2)
    assert admit_and_compute(bm, a2) == [a_head]
    # Free queue now: a never-used block, a's tail, b's tail, b's head. Take three.
    big = seq_of([9] * 12, 3)
    assert bm.admit(big, [], 12)
    assert a_head not in big.block_table and b_head not in big.block_table
    assert bm.lookup_prefix(seq_of([2] * 5, 4)) == [b_head]
    # The only free block left is b's cached head: the next allocation evicts it.
    big.num_computed_tokens = 12
    assert bm.allocate(big, 1)
    assert big.block_table[-1] == b_head
    assert bm.lookup_prefix(seq_of([2] * 5, 4)) == []
    assert bm.lookup_prefix(seq_of([1] * 5, 5)) == [a_head]


def test_oldest_freed_cached_block_is_evicted_first():
    bm = BlockManager(num_blocks=4, block_size=BS)
    a, b = seq_of([1] * 5, 0), seq_of([2] * 5, 1)
    admit_and_compute(bm, a)
    bm.free(a)
    admit_and_compute(bm, b)
    b_head = b.block_table[0]
    bm.free(b)
    # Free queue now: a's tail, a's head, b's tail, b's head (each sequence frees its tail first).
    c = seq_of([3] * 9, 2)
    assert bm.admit(c, [], 9)  # three blocks: a's two and b's tail
    assert b_head not in c.block_table
    assert bm.lookup_prefix(seq_of([1] * 5, 3)) == []
    assert bm.lookup_prefix(seq_of([2] * 5, 4)) == [b_head]


def test_prefix_caching_disabled():
    bm = BlockManager(num_blocks=8, block_size=BS, enable_prefix_caching=False)
    admit_and_compute(bm, seq_of(range(9), 0))
    assert bm.lookup_prefix(seq_of(range(9), 1)) == []
    assert bm.prefix_hits == 0


def test_block_tables_array_follows_every_table_change():
    # The array the model runner gathers from must hold each sequence's table exactly, zeros
    # after it, through admissions with cached prefixes, growth, trims, frees and re-admissions,
    # and as it grows past its first rows and columns.
    import random

    rng = random.Random(0)
    bm = BlockManager(num_blocks=400, block_size=BS)
    bm.tables = type(bm.tables)(rows=2, width=3)
    shared = list(range(1000, 1000 + 3 * BS))
    holding: list[Sequence] = []
    for step in range(300):
        action = rng.random()
        if action < 0.3 or not holding:
            seq = seq_of(shared[: rng.choice([BS, 3 * BS])] + [step] * rng.randint(1, 9), seq_id=step)
            admit_and_compute(bm, seq)
            holding.append(seq)
        elif action < 0.6:
            seq = rng.choice(holding)
            if bm.allocate(seq, rng.randint(1, 4 * BS)):
                seq.num_computed_tokens = len(seq.block_table) * BS
        elif action < 0.75:
            seq = rng.choice(holding)
            bm.trim(seq, max(1, seq.num_computed_tokens - rng.randint(0, 3 * BS)))
            seq.num_computed_tokens = min(seq.num_computed_tokens, len(seq.block_table) * BS)
        else:
            seq = holding.pop(rng.randrange(len(holding)))
            bm.free(seq)
            assert seq.table_row is None
        rows = [s.table_row for s in holding]
        assert len(set(rows)) == len(rows)
        for s in holding:
            row = bm.tables.array[s.table_row].tolist()
            assert row[: len(s.block_table)] == s.block_table and not any(row[len(s.block_table) :])
        if holding:
            gathered = bm.tables.gather(holding)
            assert gathered.shape == (len(holding), max(len(s.block_table) for s in holding))
    assert bm.tables.array.shape[0] > 2 and bm.tables.array.shape[1] > 3
    assert not bm.tables.array[
        [r for r in range(len(bm.tables.array)) if r not in {s.table_row for s in holding}]
    ].any()
