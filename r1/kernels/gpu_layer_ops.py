"""The decoder layer's small ops on a GPU, in Triton: RMSNorm with its residual add, rotary
embedding (alone, or with the new keys and values stored in the KV cache), and SwiGLU's
silu(gate) * up, one kernel each.

In PyTorch these take 5, 8 and 2 kernels (casts to float32 and back, the rotation's products,
sums and concatenation): ~30 launches a layer, most of a batch-1 decode step's time on an H200
once the weights stream at full bandwidth (bench/results/gpu_h200.json). Each kernel here reads
its inputs once and writes its outputs once, computing in float32.

They take what layer_ops.cpp's CPU ops take, so r1/kernels/__init__.py's op_for hands either to
r1/model/layers.py; the rounding to the model's dtype happens where PyTorch's path rounds (the
residual sum, the normalized row before its weight, silu's output), so outputs agree with that
path to the last bit in most rows and to float32 rounding in the rest. Rotary's products and sums
stay in float32, one rounding where PyTorch's bf16 ops take three.

Opt-in (--gpu-layer-ops, or R1_GPU_LAYER_OPS=on) until measured: they were written after the first H200 run and pass
their tests under Triton's interpreter, but no GPU has compiled or timed them yet; the next GPU
run should A/B them (batch-1 decode with graphs, on against off) and make them the default if
they pay. Set TRITON_INTERPRET=1 before importing this module to run it on CPU tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

SILU_BLOCK = 1024  # intermediate columns per program


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight * RMSNorm(x + residual), x + residual) for (N, hidden) x; the sum is x itself
    without a residual."""
    n, hidden = x.shape
    has_residual = residual is not None
    residual = residual if has_residual else x  # never read without HAS_RESIDUAL; any tensor will do
    normed = torch.empty_like(x)
    total = torch.empty_like(x) if has_residual else x
    _add_rms_norm[(n,)](
        x,
        residual,
        weight,
        normed,
        total,
        hidden,
        eps,
        x.stride(0),
        residual.stride(0),
        HAS_RESIDUAL=has_residual,
        BLOCK=triton.next_power_of_2(hidden),
    )
    return normed, total


@triton.jit
def _add_rms_norm(
    x_ptr,
    res_ptr,
    w_ptr,
    normed_ptr,
    sum_ptr,
    hidden,
    eps,
    x_stride,
    res_stride,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    inside = cols < hidden
    x = tl.load(x_ptr + row * x_stride + cols, mask=inside, other=0.0)
    if HAS_RESIDUAL:  # the sum rounds to the model's dtype, as PyTorch's add does, before the norm reads it
        x = x.to(tl.float32) + tl.load(res_ptr + row * res_stride + cols, mask=inside, other=0.0).to(tl.float32)
        x = x.to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * hidden + cols, x, mask=inside)
    x = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / hidden + eps)
    normed = (x * rstd).to(normed_ptr.dtype.element_ty).to(tl.float32)  # HF: normalize, round, then scale
    w = tl.load(w_ptr + cols, mask=inside, other=0.0).to(tl.float32)
    tl.store(normed_ptr + row * hidden + cols, (w * normed).to(normed_ptr.dtype.element_ty), mask=inside)


def rotary_(x: torch.Tensor, heads: int, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate the first `heads` heads of x (N, all heads, head_dim) in place by the half-split
    (NeoX) convention; cos and sin are (N, head_dim // 2)."""
    _launch_rotary(x, heads, 0, cos, sin, None, None)


def rotary_write_kv_(
    heads: torch.Tensor,
    num_q: int,
    cos: torch.Tensor,
    sin: torch.Tensor,
    layer_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """rotary_ of the query and key heads of heads (N, num_q + 2 * kv_heads, head_dim), in place,
    then the keys and values stored at their cache slots as attention.write_kv stores them into
    a (2, num_blocks, block_size, kv_heads, head_dim) cache of any float dtype: one kernel."""
    _, total, head_dim = heads.shape
    _, num_blocks, block_size, kv_heads, _ = layer_cache.shape
    cache = layer_cache.view(2, num_blocks * block_size, kv_heads, head_dim)
    _launch_rotary(heads, num_q, (total - num_q) // 2, cos, sin, cache, slot_mapping)


def _launch_rotary(
    x: torch.Tensor,
    num_q: int,
    kv_heads: int,
    cos: torch.Tensor,
    sin: torch.Tensor,
    cache: torch.Tensor | None,
    slots: torch.Tensor | None,
) -> None:
    """Rotate x's first num_q + kv_heads heads; with a cache (2, slots, kv_heads, head_dim), store
    the last kv_heads of those (the keys) and the kv_heads after them (the values) at `slots`."""
    n, _, head_dim = x.shape
    half, write_kv = head_dim // 2, cache is not None
    if not write_kv:  # the pointers are never read without WRITE_KV; any tensor will do
        cache, slots = x, cos
    _rotary[(n,)](
        x,
        cos,
        sin,
        cache,
        slots,
        x.stride(0),
        x.stride(1),
        cos.stride(0),
        cache.stride(0),
        cache.stride(1),
        cache.stride(2),
        num_q,
        kv_heads,
        half,
        ROTATED_PAD=triton.next_power_of_2(num_q + kv_heads),
        KV_PAD=triton.next_power_of_2(max(kv_heads, 1)),
        HALF_PAD=triton.next_power_of_2(half),
        WRITE_KV=write_kv,
    )


@triton.jit
def _rotary(
    x_ptr,
    cos_ptr,
    sin_ptr,
    cache_ptr,
    slots_ptr,
    x_stride_token,
    x_stride_head,
    angle_stride,
    cache_stride_kv,
    cache_stride_slot,
    cache_stride_head,
    num_q,
    kv_heads,
    half,
    ROTATED_PAD: tl.constexpr,
    KV_PAD: tl.constexpr,
    HALF_PAD: tl.constexpr,
    WRITE_KV: tl.constexpr,
):
    token = tl.program_id(0)
    dims = tl.arange(0, HALF_PAD)[None, :]
    in_half = dims < half
    cos = tl.load(cos_ptr + token * angle_stride + dims, mask=in_half, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + token * angle_stride + dims, mask=in_half, other=0.0).to(tl.float32)
    # The query and key heads, rotated in place.
    rows = tl.arange(0, ROTATED_PAD)[:, None]
    rotated = (rows < num_q + kv_heads) & in_half
    first = x_ptr + token * x_stride_token + rows * x_stride_head + dims  # each head's first half
    x1 = tl.load(first, mask=rotated, other=0.0).to(tl.float32)
    x2 = tl.load(first + half, mask=rotated, other=0.0).to(tl.float32)
    y1 = (x1 * cos - x2 * sin).to(x_ptr.dtype.element_ty)
    y2 = (x2 * cos + x1 * sin).to(x_ptr.dtype.element_ty)
    tl.store(first, y1, mask=rotated)
    tl.store(first + half, y2, mask=rotated)
    if WRITE_KV:
        # The rotated keys and the values, as they are, at the token's slot.
        slot = tl.load(slots_ptr + token)
        is_key = rotated & (rows >= num_q)
        key_at = cache_ptr + slot * cache_stride_slot + (rows - num_q) * cache_stride_head + dims
        tl.store(key_at, y1.to(cache_ptr.dtype.element_ty), mask=is_key)
        tl.store(key_at + half, y2.to(cache_ptr.dtype.element_ty), mask=is_key)
        value_rows = tl.arange(0, KV_PAD)[:, None]
        is_value = (value_rows < kv_heads) & in_half
        value_from = x_ptr + token * x_stride_token + (num_q + kv_heads + value_rows) * x_stride_head + dims
        value_to = cache_ptr + cache_stride_kv + slot * cache_stride_slot + value_rows * cache_stride_head + dims
        for part in tl.static_range(2):  # each half of the head
            v = tl.load(value_from + part * half, mask=is_value, other=0.0)
            tl.store(value_to + part * half, v.to(cache_ptr.dtype.element_ty), mask=is_value)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for (N, 2 * intermediate) gate_up, gate's columns first."""
    n, width = gate_up.shape
    out = torch.empty(n, width // 2, dtype=gate_up.dtype, device=gate_up.device)
    _silu_mul[(n, triton.cdiv(width // 2, SILU_BLOCK))](gate_up, out, width // 2, gate_up.stride(0), BLOCK=SILU_BLOCK)
    return out


@triton.jit
def _silu_mul(gate_up_ptr, out_ptr, intermediate, gate_up_stride, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = cols < intermediate
    gate = tl.load(gate_up_ptr + row * gate_up_stride + cols, mask=inside, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + row * gate_up_stride + intermediate + cols, mask=inside, other=0.0).to(tl.float32)
    silu = (gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty).to(tl.float32)  # PyTorch rounds silu's output
    tl.store(out_ptr + row * intermediate + cols, (silu * up).to(out_ptr.dtype.element_ty), mask=inside)


OPS = {"add_rms_norm": add_rms_norm, "rotary_": rotary_, "rotary_write_kv_": rotary_write_kv_, "silu_mul": silu_mul}
