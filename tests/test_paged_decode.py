"""r1's Triton paged decode kernel (r1/kernels/paged_decode.py) against the PyTorch path.

On a GPU it runs there. Elsewhere it runs under Triton's interpreter (TRITON_INTERPRET=1: the
same kernel code, each program in turn on the CPU), which must be set before Triton reads it.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

if sys.platform != "linux":
    pytest.skip("Triton has wheels for Linux alone", allow_module_level=True)
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import triton  # noqa: E402  (after the interpreter's switch)

from r1.kernels import paged_decode  # noqa: E402

if not torch.cuda.is_available() and tuple(map(int, triton.__version__.split(".")[:2])) < (3, 9):
    # 3.6's interpreter makes a loaded scalar a 1-element array, which a loop's bound cannot be.
    pytest.skip(f"Triton {triton.__version__}'s interpreter cannot run the kernel (3.9's can)", allow_module_level=True)
from test_attention import scattered_batch  # noqa: E402

from r1.model import attention  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _on_device(cache):
    if isinstance(cache, attention.Int8KVCache):
        return attention.Int8KVCache(cache.values.to(DEVICE), cache.scales.to(DEVICE))
    return cache.to(DEVICE)


def _kernel(q, cache, group, scale, num_splits):
    if isinstance(cache, attention.Int8KVCache):
        (keys, values), (key_scales, value_scales) = cache.values, cache.scales
    else:
        (keys, values), key_scales, value_scales = cache, None, None
    return paged_decode.paged_decode_attention(
        q, keys, values, key_scales, value_scales, group.block_tables, group.seq_lens, scale, num_splits=num_splits
    )


# Lengths within one block, across several, and past one 64-token chunk; splits past the context's
# end (8 splits of a 1-token sequence) must weigh nothing.
@pytest.mark.parametrize("num_splits", [1, 2, 8])
@pytest.mark.parametrize(
    "dtype, cache_dtype, tolerance",
    [
        (torch.float32, torch.float32, 1e-6),
        (torch.bfloat16, torch.bfloat16, 5e-3),  # the outputs and the reference's probabilities round to bf16
        (torch.float32, torch.int8, 1e-6),
        (torch.bfloat16, torch.int8, 5e-3),  # a GPU's --kv-dtype int8
    ],
)
def test_kernel_agrees_with_pytorch(num_splits, dtype, cache_dtype, tolerance):
    # R1's heads: 6 query heads share each kv head (padded to tl.dot's 16 rows), head_dim 128.
    seq_lens = [1, 16, 17, 130, 300]
    q, cache, meta, _, _ = scattered_batch(
        seq_lens, [1] * len(seq_lens), seed=5, cache_dtype=cache_dtype, heads=12, kv_heads=2, head_dim=128, block=16
    )
    if cache_dtype == torch.bfloat16:
        cache = cache.to(dtype)
    q, cache = q.to(DEVICE, dtype), _on_device(cache)
    meta.block_tables = meta.block_tables.to(DEVICE)
    group = meta.decode_group(16)
    got = _kernel(q, cache, group, 128**-0.5, num_splits)
    want = attention._gathered_decode_attention(q, cache, group, 128**-0.5)
    assert got.dtype == dtype and got.shape == want.shape
    error = ((got.float() - want.float()).norm() / want.float().norm()).item()
    assert error < tolerance, error


def test_kernel_reads_only_the_listed_blocks():
    # Stale block ids past each sequence's length (a CUDA graph's static table keeps them) and a
    # poisoned unused block change nothing.
    seq_lens = [20, 5]
    q, cache, meta, _, _ = scattered_batch(seq_lens, [1, 1], seed=6, heads=12, kv_heads=2, head_dim=128, block=16)
    q, cache, meta.block_tables = q.to(DEVICE), cache.to(DEVICE), meta.block_tables.to(DEVICE)
    group = meta.decode_group(16)
    want = _kernel(q, cache, group, 128**-0.5, 2)
    used = set(group.block_tables[0, :2].tolist()) | {group.block_tables[1, 0].item()}
    unused = next(b for b in range(cache.shape[1]) if b not in used)
    cache[:, unused] = float("nan")
    group.block_tables = torch.cat([group.block_tables, torch.full((2, 3), unused, device=DEVICE)], 1)
    group.block_tables[1, 1] = unused
    got = _kernel(q, cache, group, 128**-0.5, 2)
    assert torch.equal(got, want)


@pytest.mark.parametrize("block_size", [8, 24, 128])  # under, across and over the kernel's 64-token chunk
def test_any_block_size(block_size):
    seq_lens = [1, 30, 200]
    q, cache, meta, _, _ = scattered_batch(
        seq_lens, [1] * len(seq_lens), seed=7, heads=12, kv_heads=2, head_dim=128, block=block_size
    )
    q, cache, meta.block_tables = q.to(DEVICE), cache.to(DEVICE), meta.block_tables.to(DEVICE)
    group = meta.decode_group(block_size)
    got = _kernel(q, cache, group, 128**-0.5, 2)
    want = attention._gathered_decode_attention(q, cache, group, 128**-0.5)
    assert ((got - want).norm() / want.norm()).item() < 1e-6


def test_supported_head_sizes():
    assert paged_decode.supports(128) and paged_decode.supports(64) and paged_decode.supports(16)
    assert not paged_decode.supports(8)  # under tl.dot's 16
    assert not paged_decode.supports(96)  # not a power of two


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a GPU's decode attention (a CPU's never takes Triton)")
def test_a_gpu_decodes_on_the_kernel():
    assert attention.triton_decode_runs(torch.device("cuda", torch.cuda.current_device()), 128)
    assert not attention.triton_decode_runs(torch.device("cuda", torch.cuda.current_device()), 96)
    assert not attention.triton_decode_runs(torch.device("cpu"), 128)


@pytest.mark.parametrize(
    "dtype, cache_dtype, tolerance",
    [
        (torch.float32, torch.float32, 1e-6),
        (torch.bfloat16, torch.bfloat16, 5e-3),
        (torch.float32, torch.int8, 1e-4),  # the reference's decode row: r1's CPU kernel scales after the product
    ],
)
def test_prefill_kernel_agrees_with_pytorch_on_a_mixed_step(dtype, cache_dtype, tolerance):
    # One call for a whole step (r1/kernels/paged_prefill.py): a prompt with nothing cached, a
    # chunk after cached tokens, a decode token, and a chunk spanning two of the kernel's tiles
    # and three of its key chunks, each against PyTorch's per-sequence path.
    from r1.kernels.paged_prefill import paged_prefill_attention

    seq_lens, query_lens = [37, 65, 70, 150], [37, 20, 1, 50]
    q, cache, meta, _, _ = scattered_batch(
        seq_lens, query_lens, seed=8, cache_dtype=cache_dtype, heads=12, kv_heads=2, head_dim=128, block=16
    )
    if cache_dtype == torch.bfloat16:
        cache = cache.to(dtype)
    q = q.to(dtype)
    want = attention.paged_attention(q, cache, meta, 128**-0.5)
    if isinstance(cache, attention.Int8KVCache):
        (keys, values), (key_scales, value_scales) = cache.values, cache.scales
    else:
        (keys, values), key_scales, value_scales = cache, None, None
    got = paged_prefill_attention(
        q.to(DEVICE),
        *(x if x is None else x.to(DEVICE) for x in (keys, values, key_scales, value_scales)),
        meta.block_tables.to(DEVICE),
        query_lens,
        seq_lens,
        128**-0.5,
    ).cpu()
    assert got.dtype == dtype and got.shape == want.shape
    for i, (start, n) in enumerate(zip([0, 37, 57, 58], query_lens)):
        rows = slice(start, start + n)
        error = ((got[rows].float() - want[rows].float()).norm() / want[rows].float().norm()).item()
        assert error < tolerance, (i, error)


def test_paged_attention_hands_a_mixed_step_to_the_prefill_kernel(monkeypatch):
    # With r1's GPU kernels on, paged_attention makes the one call for a step with prefill chunks
    # (routed here as it is for CUDA tensors), and its outputs are the per-chunk path's.
    from r1 import kernels
    from r1.kernels.paged_prefill import paged_prefill_attention

    seq_lens, query_lens = [40, 9, 66], [40, 1, 30]
    q, cache, meta, _, _ = scattered_batch(seq_lens, query_lens, seed=9, heads=12, kv_heads=2, head_dim=128, block=16)
    q, cache, meta.block_tables = q.to(DEVICE), cache.to(DEVICE), meta.block_tables.to(DEVICE)
    want = attention.paged_attention(q, cache, meta, 128**-0.5)
    calls = []

    def routed(name, x):
        return (
            (lambda *args: calls.append(name) or paged_prefill_attention(*args))
            if name == "prefill_attention"
            else None
        )

    monkeypatch.setattr(kernels, "op_for", routed)
    monkeypatch.setattr(attention, "triton_decode_runs", lambda device, head_dim: True)
    meta = attention.AttentionMetadata(meta.slot_mapping, meta.block_tables, query_lens, seq_lens)  # no cached group
    got = attention.paged_attention(q, cache, meta, 128**-0.5)
    assert calls == ["prefill_attention"]
    assert ((got - want).norm() / want.norm()).item() < 1e-6
