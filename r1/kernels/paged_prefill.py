"""Attention of a whole step's new tokens to the paged KV cache on a GPU, in Triton: one call for
every sequence of a prefill or mixed step.

PyTorch's path (r1/model/attention.py) loops over the step's prefill chunks, gathering each
sequence's cache and calling scaled_dot_product_attention, every layer: at 256 sequences that is
thousands of small launches a step. Here each program takes one query head of a tile of BLOCK_M
of one sequence's new tokens (a prompt, a chunk after cached tokens, or a single decode token)
and walks that sequence's blocks where they lie, causally (a query at position p sees the
tokens at 0..p), with an online softmax in float32. A tile past its sequence's new tokens exits
at once, so the grid is (sequences, tiles of the longest chunk, query heads).

The cache layout and dtypes are paged_decode.py's (bf16, float32, or int8 with a float32 scale
per token and kv head). Nothing here reads a device value on the host. Set TRITON_INTERPRET=1
before importing this module to run it on CPU tensors (the tests do).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from r1.kernels.paged_decode import load_kv_chunk, softmax_step

BLOCK_M = 32  # new tokens a program attends for
CHUNK = 64  # cached tokens a program reads per loop iteration


def paged_prefill_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    key_scales: torch.Tensor | None,
    value_scales: torch.Tensor | None,
    block_tables: torch.Tensor,
    query_lens: list[int],
    seq_lens: list[int],
    scale: float,
) -> torch.Tensor:
    """(N, heads, head_dim) attention outputs in q's dtype for the flat batch q (N, heads,
    head_dim) of sequences that run query_lens[i] new tokens each, their last at position
    seq_lens[i] - 1; their keys and values already in the cache at the slots their block_tables
    (B, width) rows list."""
    n, heads, head_dim = q.shape
    _, block_size, kv_heads, _ = keys.shape
    starts = [0]
    for length in query_lens[:-1]:
        starts.append(starts[-1] + length)
    shape = torch.tensor([starts, query_lens, seq_lens], dtype=torch.int32).to(q.device, non_blocking=True)
    quantized = key_scales is not None
    if not quantized:  # the pointers are never read without INT8; any tensor will do
        key_scales = value_scales = shape
    out = torch.empty_like(q)
    _attend[(len(query_lens), triton.cdiv(max(query_lens), BLOCK_M), heads)](
        q,
        keys,
        values,
        key_scales,
        value_scales,
        block_tables,
        shape,
        out,
        scale,
        len(query_lens),
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        keys.stride(0),
        keys.stride(1),
        keys.stride(2),
        values.stride(0),
        values.stride(1),
        values.stride(2),
        key_scales.stride(0) if quantized else 0,
        key_scales.stride(1) if quantized else 0,
        block_tables.stride(0),
        GROUP=heads // kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        BLOCK_M=BLOCK_M,
        CHUNK=CHUNK,
        INT8=quantized,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # a float32 model keeps float32 products
        num_warps=4,
    )
    return out


# Strides that change with the step (the table's width, the batch) are left unspecialized, so
# that each new value does not compile the kernel again (Triton specializes ints divisible by 16).
@triton.jit(do_not_specialize=["num_seqs", "table_stride"])
def _attend(
    q_ptr,
    k_ptr,
    v_ptr,
    ks_ptr,
    vs_ptr,
    tables_ptr,
    shape_ptr,
    out_ptr,
    scale,
    num_seqs,
    q_stride_token,
    q_stride_head,
    out_stride_token,
    out_stride_head,
    k_stride_block,
    k_stride_token,
    k_stride_head,
    v_stride_block,
    v_stride_token,
    v_stride_head,
    s_stride_block,
    s_stride_token,
    table_stride,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    CHUNK: tl.constexpr,
    INT8: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One (sequence, tile of its new tokens, query head)."""
    seq, tile, head = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    query_len = tl.load(shape_ptr + num_seqs + seq)
    if tile * BLOCK_M < query_len:
        first_row = tl.load(shape_ptr + seq)
        seq_len = tl.load(shape_ptr + 2 * num_seqs + seq)
        kv_head = head // GROUP
        rows, dims, tokens = tl.arange(0, BLOCK_M), tl.arange(0, HEAD_DIM), tl.arange(0, CHUNK)
        query = tile * BLOCK_M + rows  # the new tokens' indices in the chunk
        is_query = query < query_len
        query_pos = seq_len - query_len + query  # their positions in the sequence
        q = tl.load(
            q_ptr + (first_row + query)[:, None] * q_stride_token + head * q_stride_head + dims[None, :],
            mask=is_query[:, None],
            other=0.0,
        ).to(tl.float32)
        running_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        running_sum = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
        # The tile's last query sees up to its own position: nothing past it is read.
        end = tl.minimum(seq_len, seq_len - query_len + (tile + 1) * BLOCK_M)
        for start in range(0, end, CHUNK):
            positions = start + tokens
            cached = positions < end
            k, v = load_kv_chunk(
                k_ptr,
                v_ptr,
                ks_ptr,
                vs_ptr,
                tables_ptr + seq * table_stride,
                positions,
                cached,
                kv_head,
                dims,
                k_stride_block,
                k_stride_token,
                k_stride_head,
                v_stride_block,
                v_stride_token,
                v_stride_head,
                s_stride_block,
                s_stride_token,
                BLOCK_SIZE,
                INT8,
            )
            # Causal: every query row sees position 0 in the first chunk, so its max is finite.
            visible = cached[None, :] & (positions[None, :] <= query_pos[:, None])
            running_max, running_sum, acc = softmax_step(
                q, k, v, visible, scale, running_max, running_sum, acc, PRECISION
            )
        out = acc / running_sum[:, None]
        tl.store(
            out_ptr + (first_row + query)[:, None] * out_stride_token + head * out_stride_head + dims[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=is_query[:, None],
        )
