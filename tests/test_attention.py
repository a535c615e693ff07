"""Paged attention against plain per-sequence attention on contiguous keys and values."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from r1 import kernels
from r1.model import attention
from r1.model.attention import AttentionMetadata, Int8KVCache, allocate_kv_cache, paged_attention, write_kv

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 4, 2, 16, 4


def reference(q, keys, values, q_len):
    """Causal attention of a sequence's last q_len queries to its keys and values (L, kv_heads, D)."""
    seq_len = keys.shape[0]
    mask = torch.arange(seq_len)[None, :] <= torch.arange(seq_len - q_len, seq_len)[:, None]
    o = F.scaled_dot_product_attention(
        q.transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1), attn_mask=mask, enable_gqa=True
    )
    return o.transpose(0, 1)


def scattered_batch(
    seq_lens,
    query_lens,
    seed=0,
    cache_dtype=torch.float32,
    heads=HEADS,
    kv_heads=KV_HEADS,
    head_dim=HEAD_DIM,
    block=BLOCK,
):
    """Random keys and values for each sequence, stored in shuffled blocks of one cache."""
    g = torch.Generator().manual_seed(seed)
    tables, slots, keys, values = [], [], [], []
    max_blocks = max(-(-n // block) for n in seq_lens)
    num_blocks = max_blocks * len(seq_lens) + 8
    free = torch.randperm(num_blocks, generator=g).tolist()
    for n in seq_lens:
        table = [free.pop() for _ in range(-(-n // block))]
        tables.append(table + [0] * (max_blocks - len(table)))
        slots += [table[p // block] * block + p % block for p in range(n)]
        keys.append(torch.randn(n, kv_heads, head_dim, generator=g))
        values.append(torch.randn(n, kv_heads, head_dim, generator=g))
    cache = allocate_kv_cache(1, num_blocks, block, kv_heads, head_dim, cache_dtype, "cpu")[0]
    write_kv(cache, torch.cat(keys), torch.cat(values), torch.tensor(slots))
    q = torch.randn(sum(query_lens), heads, head_dim, generator=g)
    meta = AttentionMetadata(torch.tensor([], dtype=torch.long), torch.tensor(tables), list(query_lens), list(seq_lens))
    return q, cache, meta, keys, values


@pytest.mark.parametrize("gather_tokens", [32768, 40])  # 40: two sequences (of 16 gathered tokens) a slice
def test_decoding_sequences_attend_together_as_each_alone(monkeypatch, gather_tokens, kernel_path):
    monkeypatch.setattr(attention, "DECODE_GATHER_TOKENS", gather_tokens)
    seq_lens = [5, 1, 13, 8, 4]
    q, cache, meta, keys, values = scattered_batch(seq_lens, [1] * 5)
    got = paged_attention(q, cache, meta, HEAD_DIM**-0.5)
    for i in range(5):
        want = reference(q[i : i + 1], keys[i], values[i], 1)
        assert torch.allclose(got[i : i + 1], want, atol=1e-5), i


def test_decodes_mixed_with_prefill_chunks(kernel_path):
    # A fresh prompt, a decode, a prefill chunk after cached tokens, another decode.
    seq_lens, query_lens = [6, 9, 11, 3], [6, 1, 4, 1]
    q, cache, meta, keys, values = scattered_batch(seq_lens, query_lens, seed=1)
    got = paged_attention(q, cache, meta, HEAD_DIM**-0.5)
    start = 0
    for i, q_len in enumerate(query_lens):
        want = reference(q[start : start + q_len], keys[i], values[i], q_len)
        assert torch.allclose(got[start : start + q_len], want, atol=1e-5), i
        start += q_len


@pytest.mark.parametrize("query_lens", [[1] * 4, [6, 1, 4, 1]])
def test_int8_cache_stays_within_its_rounding(query_lens, kernel_path):
    seq_lens = [6, 9, 11, 3]
    q, cache, meta, keys, values = scattered_batch(seq_lens, query_lens, seed=2, cache_dtype=torch.int8)
    assert isinstance(cache, Int8KVCache) and cache.values.dtype == torch.int8
    got = paged_attention(q, cache, meta, HEAD_DIM**-0.5)
    start, worst = 0, 0.0
    for i, q_len in enumerate(query_lens):
        want = reference(q[start : start + q_len], keys[i], values[i], q_len)
        worst = max(worst, (got[start : start + q_len] - want).abs().max().item())
        start += q_len
    # Each stored value is off by at most half a step, max|x| / 254 (~0.015 for these Gaussians);
    # the attention output, a weighted mean, stays within a few such steps (measured ~0.01).
    assert 0 < worst < 0.05, worst


def int8_rounded(q: torch.Tensor) -> torch.Tensor:
    """Each head's query as r1's VNNI kernel multiplies it with int8 keys: scale * (high + low /
    254), high on the 255 levels of scale = max|q| / 127 and low its rounding error on 255 more
    (times the scale's float inverse, ties to even)."""
    scale = q.abs().amax(-1, keepdim=True) / 127
    x = q * (1 / scale)
    high = x.round()
    return scale * (high + ((x - high) * 254).round() / 254)


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16, torch.int8])
def test_kernel_agrees_with_pytorch_at_the_models_shapes(cache_dtype, monkeypatch):
    # R1's heads (12 query, 2 kv, head_dim 128) and block size, lengths across many blocks.
    if kernels.op("decode_attention") is None:
        pytest.skip(f"r1's kernels cannot run here: {kernels.unavailable_reason()}")
    seq_lens = [1, 15, 16, 17, 300, 1000]
    q, cache, meta, _, _ = scattered_batch(
        seq_lens, [1] * 6, seed=3, cache_dtype=cache_dtype, heads=12, kv_heads=2, head_dim=128, block=16
    )
    got = paged_attention(q, cache, meta, 128**-0.5)
    if cache_dtype == torch.int8 and kernels.this_cpus_build().name in ("avx512_amx", "avx512_vnni"):
        q = int8_rounded(q)  # its integer dot products are exact: only the query's rounding differs
    monkeypatch.setattr(kernels, "op", lambda name: None)
    want = paged_attention(q, cache, meta, 128**-0.5)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_bf16_decode_keeps_its_scores_in_float32():
    # Keys with a large shared component, as Qwen2's key bias gives them: scores of ~90 +- 1,
    # which bf16 rounds in steps of 0.5 (measured: error 0.11 against 0.002 in float32, and 3.1%
    # perplexity on the 1.5B stand-in decoded a token at a time).
    g = torch.Generator().manual_seed(4)
    keys, values = torch.randn(64, 1, 128, generator=g) + 8, torch.randn(64, 1, 128, generator=g)
    cache = allocate_kv_cache(1, 4, 16, 1, 128, torch.bfloat16, "cpu")[0]
    write_kv(cache, keys.bfloat16(), values.bfloat16(), torch.arange(64))
    meta = AttentionMetadata(torch.tensor([]), torch.arange(4)[None], [1], [64])
    q = torch.ones(1, 2, 128)
    got = attention.decode_attention(q.bfloat16(), cache, meta.decode_group(16), 128**-0.5).float()
    want = reference(q, keys.bfloat16().float(), values.bfloat16().float(), 1)
    assert (got - want).abs().max() < 0.01, (got - want).abs().max()


def test_int8_cache_writes_on_the_kernel_equal_pytorchs(monkeypatch):
    if kernels.op("write_kv_int8_") is None:
        pytest.skip(f"r1's kernels cannot run here: {kernels.unavailable_reason()}")
    g = torch.Generator().manual_seed(0)
    heads = torch.randn(37, 16, 128, generator=g) * 3  # a layer's q, k, v heads: k and v are strided views
    heads[5, 12] = 0  # an all-zero key: the smallest scale, as PyTorch's clamp gives it
    k, v = heads[:, 12:14], heads[:, 14:]
    slots = torch.randperm(64 * 16, generator=g)[:37]
    fused, plain = (allocate_kv_cache(1, 64, 16, 2, 128, torch.int8, "cpu")[0] for _ in range(2))
    write_kv(fused, k, v, slots)
    with pytest.raises(RuntimeError, match="outside the cache"):
        write_kv(fused, k, v, slots + 64 * 16)
    monkeypatch.setattr(kernels, "op", lambda name: None)  # PyTorch's ten ops
    write_kv(plain, k, v, slots)
    assert torch.equal(fused.values, plain.values) and torch.equal(fused.scales, plain.scales)
    assert fused.values.view(2, -1, 2, 128)[0, slots[5], 0].abs().max() == 0


def test_kernel_refuses_a_block_outside_the_cache():
    if kernels.op("decode_attention") is None:
        pytest.skip(f"r1's kernels cannot run here: {kernels.unavailable_reason()}")
    q, cache, meta, _, _ = scattered_batch([5, 9], [1, 1])
    group = meta.decode_group(BLOCK)
    group.block_tables[1, 2] = cache.shape[1]  # one past the last block
    with pytest.raises(RuntimeError, match="lists block"):
        attention.decode_attention(q, cache, group, 1.0)
