"""Decode attention over the paged KV cache on a GPU, in Triton: r1's CUDA path.

D one-token queries attend to their sequences' cached keys and values where they lie: each
program reads its sequence's block table and loads the blocks it lists, so no copy of the
context is made (PyTorch's path, in r1/model/attention.py, gathers every sequence's blocks to
the longest one's length each layer). The work is split along the context as well as over
sequences and kv heads (flash-decoding): a batch of one at a long context still fills the GPU.
Each split writes its partial output and log-sum-exp; a second kernel combines them.

The shapes it takes are r1's cache layout (r1/model/attention.py): keys and values
(num_blocks, block_size, kv_heads, head_dim) in the model's dtype, bf16 or int8 with a float32
scale per token and kv head. Nothing here syncs with the host, so a decode step can be captured
in a CUDA graph (r1/engine/cuda_graphs.py). Set TRITON_INTERPRET=1 before importing this module
to run it on CPU tensors (the tests do).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

CHUNK = 64  # cached tokens a program attends to per loop iteration (several blocks at once)


def supports(head_dim: int) -> bool:
    """Whether the kernel takes this head size: tl.dot and tl.arange want a power of two >= 16.
    Any block size will do: each token's block id is loaded on its own."""
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0


@functools.cache
def _programs_wanted(device: torch.device) -> int:
    """Two programs per multiprocessor (on a CPU, under the interpreter: a few)."""
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def num_splits_for(num_seqs: int, kv_heads: int, device: torch.device) -> int:
    """How many parts of each context run in parallel: enough programs to fill the GPU, as a
    power of two up to 128 (a batch of one on R1's 2 kv heads wants 132 on an H100)."""
    wanted = -(-_programs_wanted(device) // (num_seqs * kv_heads))
    return min(128, triton.next_power_of_2(wanted))


def paged_decode_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    key_scales: torch.Tensor | None,
    value_scales: torch.Tensor | None,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    num_splits: int | None = None,
) -> torch.Tensor:
    """(D, heads, head_dim) attention outputs in q's dtype.

    q (D, heads, head_dim); keys, values (num_blocks, block_size, kv_heads, head_dim), with
    (num_blocks, block_size, kv_heads) scales when int8; block_tables (D, width) with at least
    ceil(seq_len / block_size) valid entries per row; seq_lens (D,) cached tokens, the new one
    included.
    """
    d, heads, head_dim = q.shape
    _, block_size, kv_heads, _ = keys.shape
    group = heads // kv_heads
    if num_splits is None:
        num_splits = num_splits_for(d, kv_heads, q.device)
    quantized = key_scales is not None
    if not quantized:  # the pointers are never read without INT8; any tensor will do
        key_scales = value_scales = seq_lens
    parts = torch.empty(d, heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(d, heads, num_splits, dtype=torch.float32, device=q.device)
    _attend_split[(d, kv_heads, num_splits)](
        q,
        keys,
        values,
        key_scales,
        value_scales,
        block_tables,
        seq_lens,
        parts,
        part_lse,
        scale,
        q.stride(0),
        q.stride(1),
        keys.stride(0),
        keys.stride(1),
        keys.stride(2),
        values.stride(0),
        values.stride(1),
        values.stride(2),
        key_scales.stride(0) if quantized else 0,
        key_scales.stride(1) if quantized else 0,
        block_tables.stride(0),
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        CHUNK=CHUNK,
        NUM_SPLITS=num_splits,
        INT8=quantized,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # a float32 model keeps float32 products
        num_warps=8,
    )  # with 4, ptxas spills the (16, 128) accumulator and the chunk's keys and values
    out = torch.empty_like(q)
    _combine_splits[(d, heads)](
        parts, part_lse, out, out.stride(0), out.stride(1), HEAD_DIM=head_dim, NUM_SPLITS=num_splits
    )
    return out


# The table's row stride is the longest sequence's block count in an eager step: left unspecialized,
# so each new width does not compile the kernel again (Triton specializes ints divisible by 16).
@triton.jit(do_not_specialize=["table_stride"])
def _attend_split(
    q_ptr,
    k_ptr,
    v_ptr,
    ks_ptr,
    vs_ptr,
    tables_ptr,
    lens_ptr,
    parts_ptr,
    lse_ptr,
    scale,
    q_stride_seq,
    q_stride_head,
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
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    CHUNK: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    INT8: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One (sequence, kv head, split): the kv head's GROUP query heads over one stretch of the
    context, with an online softmax; writes the normalized partial output and its log-sum-exp."""
    seq, kv_head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    seq_len = tl.load(lens_ptr + seq)
    chunks_per_split = tl.cdiv(tl.cdiv(seq_len, CHUNK), NUM_SPLITS)
    first = split * chunks_per_split
    last = tl.minimum(first + chunks_per_split, tl.cdiv(seq_len, CHUNK))

    rows, dims, tokens = tl.arange(0, GROUP_PAD), tl.arange(0, HEAD_DIM), tl.arange(0, CHUNK)
    heads = kv_head * GROUP + rows  # rows past GROUP are padding (tl.dot wants 16 rows)
    q = tl.load(
        q_ptr + seq * q_stride_seq + heads[:, None] * q_stride_head + dims[None, :],
        mask=rows[:, None] < GROUP,
        other=0.0,
    ).to(tl.float32)
    running_max = tl.full((GROUP_PAD,), float("-inf"), tl.float32)
    running_sum = tl.zeros((GROUP_PAD,), tl.float32)
    acc = tl.zeros((GROUP_PAD, HEAD_DIM), tl.float32)
    for chunk in range(first, last):
        positions = chunk * CHUNK + tokens  # (CHUNK,) token positions in the sequence
        cached = positions < seq_len
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
        running_max, running_sum, acc = softmax_step(
            q, k, v, cached[None, :], scale, running_max, running_sum, acc, PRECISION
        )

    # A split past the context's end saw nothing: weight zero in the combine, not 0/0.
    seen = running_sum > 0
    out = tl.where(seen[:, None], acc / tl.where(seen, running_sum, 1.0)[:, None], 0.0)
    lse = tl.where(seen, running_max + tl.log(tl.where(seen, running_sum, 1.0)), float("-inf"))
    at = (seq * GROUP * tl.num_programs(1) + heads) * NUM_SPLITS + split  # parts is (D, heads, NUM_SPLITS, ...)
    valid = rows < GROUP
    tl.store(parts_ptr + at[:, None] * HEAD_DIM + dims[None, :], out, mask=valid[:, None])
    tl.store(lse_ptr + at, lse, mask=valid)


@triton.jit
def load_kv_chunk(
    k_ptr,
    v_ptr,
    ks_ptr,
    vs_ptr,
    table_ptr,
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
    BLOCK_SIZE: tl.constexpr,
    INT8: tl.constexpr,
):
    """One kv head's keys and values (CHUNK, HEAD_DIM) in float32 at a sequence's `positions`,
    read where its block table (table_ptr) puts them; 0 where not `cached`."""
    blocks = tl.load(table_ptr + positions // BLOCK_SIZE, mask=cached, other=0)
    offsets = positions % BLOCK_SIZE
    k = tl.load(
        k_ptr + (blocks * k_stride_block + offsets * k_stride_token + kv_head * k_stride_head)[:, None] + dims[None, :],
        mask=cached[:, None],
        other=0.0,
    )
    v = tl.load(
        v_ptr + (blocks * v_stride_block + offsets * v_stride_token + kv_head * v_stride_head)[:, None] + dims[None, :],
        mask=cached[:, None],
        other=0.0,
    )
    if INT8:
        scales_at = blocks * s_stride_block + offsets * s_stride_token + kv_head
        k = k.to(tl.float32) * tl.load(ks_ptr + scales_at, mask=cached, other=0.0)[:, None]
        v = v.to(tl.float32) * tl.load(vs_ptr + scales_at, mask=cached, other=0.0)[:, None]
    return k.to(tl.float32), v.to(tl.float32)


@triton.jit
def softmax_step(q, k, v, visible, scale, running_max, running_sum, acc, PRECISION: tl.constexpr):
    """One chunk of keys and values into an online softmax: (running max, running sum, output
    accumulator) of the rows of q over the keys `visible` to each. Products in float32 on the
    tensor cores' tf32: exact for bf16 and fp16 keys (their mantissas fit tf32's), so as exact
    as a bf16 product and finer for the probabilities."""
    scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # (rows, CHUNK)
    scores = tl.where(visible, scores, float("-inf"))
    new_max = tl.maximum(running_max, tl.max(scores, 1))
    probs = tl.exp(scores - new_max[:, None])
    correction = tl.exp(running_max - new_max)
    running_sum = running_sum * correction + tl.sum(probs, 1)
    acc = acc * correction[:, None] + tl.dot(probs, v, input_precision=PRECISION)
    return new_max, running_sum, acc


@triton.jit
def _combine_splits(
    parts_ptr, lse_ptr, out_ptr, out_stride_seq, out_stride_head, HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr
):
    """One (sequence, query head): the splits' outputs weighted by their share of the softmax."""
    seq, head = tl.program_id(0), tl.program_id(1)
    splits, dims = tl.arange(0, NUM_SPLITS), tl.arange(0, HEAD_DIM)
    row = seq * tl.num_programs(1) + head
    lse = tl.load(lse_ptr + row * NUM_SPLITS + splits)
    weights = tl.exp(lse - tl.max(lse, 0))  # the first split always saw a token: the max is finite
    parts = tl.load(parts_ptr + (row * NUM_SPLITS + splits)[:, None] * HEAD_DIM + dims[None, :])
    out = tl.sum(parts * weights[:, None], 0) / tl.sum(weights, 0)
    tl.store(out_ptr + seq * out_stride_seq + head * out_stride_head + dims, out.to(out_ptr.dtype.element_ty))
