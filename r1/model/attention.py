"""Attention over a paged KV cache, and the metadata that describes one forward pass.

A forward pass runs a flat batch of N new tokens that belong to B sequences; each sequence has
some tokens already in the cache and some new ones (a prefill chunk, or one decode token).
The cache of one layer is a tensor (2, num_blocks, block_size, kv_heads, head_dim) in the model's
dtype or bf16 (--kv-dtype bf16), or the same in int8 with a scale per token and kv head
(Int8KVCache, --kv-dtype int8); a sequence's tokens live in the blocks its block table lists, in
order. This module writes the new keys and values to their slots and attends each sequence's new
queries to all of its cached keys.
It does not decide which blocks a sequence gets (the engine's block manager does).
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from r1 import kernels
from r1.model.layers import apply_rotary_

# The most cached tokens decode_attention gathers at once (sequences x the longest one's length).
DECODE_GATHER_TOKENS = 32768
# The most new tokens of a sequence that token_queries runs as one-token queries (a verification
# step's k + 1 for k up to 15); more run as a prefill chunk.
MAX_TOKEN_QUERIES = 16


@dataclass
class DecodeGroup:
    """The sequences of a step that decode one token each, attended to in one batched call."""

    rows: torch.Tensor | None  # their query rows in the flat batch; None when they are all the rows
    block_tables: torch.Tensor  # (D, blocks) the blocks that hold the longest one's tokens
    seq_lens: torch.Tensor  # (D,) int64: the cached tokens each attends to, its new one included
    block_size: int

    @functools.cached_property
    def mask(self) -> torch.Tensor:
        """(D, 1, blocks * block_size) float: 0 where cached, -inf past each length. Only the
        gathered PyTorch path reads it (r1's kernel stops at each length), once per step."""
        length = self.block_tables.shape[1] * self.block_size
        cached = torch.arange(length, device=self.seq_lens.device)[None, :] < self.seq_lens[:, None]
        return torch.zeros(cached.shape, device=cached.device).masked_fill_(~cached, float("-inf"))[:, None, :]


@dataclass
class AttentionMetadata:
    """Where the N new tokens of a forward pass go, and what each sequence attends to."""

    slot_mapping: torch.Tensor  # (N,) int64: block * block_size + offset of each new token
    block_tables: torch.Tensor  # (B, max_blocks) int64: each sequence's blocks, in order
    query_lens: list[int]  # new tokens per sequence; they sum to N
    seq_lens: list[int] | None  # cached + new tokens per sequence (what its queries attend to); None
    # when built by for_decode, whose decode group holds them on the device
    _decode_group: DecodeGroup | None = field(default=None, init=False, repr=False)

    @classmethod
    def for_decode(
        cls, slot_mapping: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor, block_size: int
    ) -> "AttentionMetadata":
        """A step in which every sequence decodes one token, from device tensors alone: no host
        values, so a CUDA graph can capture it (r1/engine/cuda_graphs.py)."""
        meta = cls(slot_mapping, block_tables, [1] * len(seq_lens), None)
        meta._decode_group = DecodeGroup(None, block_tables, seq_lens, block_size)
        return meta

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    def decode_group(self, block_size: int) -> DecodeGroup | None:
        """The sequences that decode one token (None if none); built by the first layer to ask."""
        if self._decode_group is None:
            decoding = [i for i, n in enumerate(self.query_lens) if n == 1]
            if not decoding:
                return None
            device = self.block_tables.device
            lens = torch.tensor([self.seq_lens[i] for i in decoding], device=device)
            num_blocks = -(-max(self.seq_lens[i] for i in decoding) // block_size)
            all_rows = len(decoding) == len(self.query_lens)
            starts = torch.tensor(self.query_lens, device=device).cumsum(0) - 1  # a decode row ends its sequence
            self._decode_group = DecodeGroup(
                rows=None if all_rows else starts[decoding],
                block_tables=self.block_tables[decoding, :num_blocks].contiguous(),
                seq_lens=lens,
                block_size=block_size,
            )
        return self._decode_group

    def token_queries(self, block_size: int) -> DecodeGroup | None:
        """Every new token as a one-token query of its own, attending to its sequence's tokens up
        to its own position: a decode step's group, or a verification step's k + 1 tokens a
        sequence (speculative decoding) as k + 1 rows. None where a sequence runs more than
        MAX_TOKEN_QUERIES new tokens (a prefill: each row would read the whole cache again)."""
        if all(n == 1 for n in self.query_lens):
            return self.decode_group(block_size)
        if self.seq_lens is None or max(self.query_lens) > MAX_TOKEN_QUERIES:
            return None
        lens = [end - n + 1 + j for n, end in zip(self.query_lens, self.seq_lens) for j in range(n)]
        device = self.block_tables.device
        tables = self.block_tables[:, : -(-max(self.seq_lens) // block_size)]
        rows = tables.repeat_interleave(torch.tensor(self.query_lens, device=device), dim=0)
        return DecodeGroup(None, rows.contiguous(), torch.tensor(lens, device=device), block_size)


class Int8KVCache:
    """Keys and values as int8, each (token, kv head) vector with its own float32 scale.

    A quarter of an fp32 cache's bytes (half of bf16's) for an error of at most half a step of
    max|x| / 127 per value. Indexing by layer gives that layer's cache, as it does for the float
    cache tensor; `values` has the float cache's shape and `scales` drops its head_dim.
    """

    def __init__(self, values: torch.Tensor, scales: torch.Tensor):
        self.values, self.scales = values, scales

    def __getitem__(self, layer: int) -> "Int8KVCache":
        return Int8KVCache(self.values[layer], self.scales[layer])

    @property
    def shape(self) -> torch.Size:
        return self.values.shape

    @property
    def nbytes(self) -> int:
        return self.values.nbytes + self.scales.nbytes


def allocate_kv_cache(
    num_layers: int,
    num_blocks: int,
    block_size: int,
    kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device | str,
) -> torch.Tensor | Int8KVCache:
    """The whole cache, (num_layers, 2, num_blocks, block_size, kv_heads, head_dim), in `dtype`
    (torch.int8: an Int8KVCache)."""
    shape = (num_layers, 2, num_blocks, block_size, kv_heads)
    if dtype == torch.int8:
        return Int8KVCache(
            torch.zeros(*shape, head_dim, dtype=torch.int8, device=device),
            torch.zeros(shape, dtype=torch.float32, device=device),
        )
    return torch.zeros(*shape, head_dim, dtype=dtype, device=device)


def write_kv(
    layer_cache: torch.Tensor | Int8KVCache, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Store the new (N, kv_heads, head_dim) keys and values at their slots."""
    _, num_blocks, block_size, kv_heads, head_dim = layer_cache.shape
    slots = num_blocks * block_size
    if isinstance(layer_cache, Int8KVCache):
        values, scales = (
            layer_cache.values.view(2, slots, kv_heads, head_dim),
            layer_cache.scales.view(2, slots, kv_heads),
        )
        fused = kernels.op_for("write_kv_int8_", k) if head_dim % 16 == 0 else None  # its vector width
        if fused is not None:  # on r1's CPU kernel: one call where the lines below are ten
            return fused(k, v, slot_mapping, values, scales)
        kv = torch.stack((k, v)).float()  # (2, N, kv_heads, head_dim): both quantized in one pass
        scale = kv.abs().amax(-1).clamp(min=1e-12) / 127  # (2, N, kv_heads)
        levels = (kv / scale[..., None]).round_().to(torch.int8)
        values.index_copy_(1, slot_mapping, levels)
        scales.index_copy_(1, slot_mapping, scale)
        return
    flat = layer_cache.view(2, slots, kv_heads, head_dim)
    flat[0].index_copy_(0, slot_mapping, k.to(flat.dtype))  # a bf16 cache of a float32 model rounds here
    flat[1].index_copy_(0, slot_mapping, v.to(flat.dtype))


def write_rotated_kv(
    heads: torch.Tensor,
    num_q: int,
    cos: torch.Tensor,
    sin: torch.Tensor,
    layer_cache: torch.Tensor | Int8KVCache,
    slot_mapping: torch.Tensor,
) -> None:
    """Rotate the query and key heads of heads (N, num_q + 2 * kv_heads, head_dim) in place and
    store the new keys and values at their slots: one kernel where the GPU's layer ops run (an
    int8 cache aside), else apply_rotary_ then write_kv."""
    kv_heads = (heads.shape[1] - num_q) // 2
    fused = None if isinstance(layer_cache, Int8KVCache) else kernels.op_for("rotary_write_kv_", heads)
    if fused is not None:
        return fused(heads, num_q, cos, sin, layer_cache, slot_mapping)
    apply_rotary_(heads, num_q + kv_heads, cos, sin)  # queries and keys in one call
    write_kv(layer_cache, heads[:, num_q : num_q + kv_heads], heads[:, num_q + kv_heads :], slot_mapping)


def _gather_blocks(layer_cache: torch.Tensor | Int8KVCache, blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The keys and values of the listed blocks, (2, len(blocks), block_size, kv_heads, head_dim)
    in `dtype`. index_select copies whole blocks; advanced indexing of the cache is 5x slower."""
    if isinstance(layer_cache, Int8KVCache):
        values = layer_cache.values.index_select(1, blocks)
        scales = layer_cache.scales.index_select(1, blocks)
        return (values.float() * scales[..., None]).to(dtype)
    return layer_cache.index_select(1, blocks).to(dtype)


def _gather_seq(layer_cache: torch.Tensor | Int8KVCache, block_table: torch.Tensor, seq_len: int, dtype: torch.dtype):
    """A sequence's cached keys and values as two (seq_len, kv_heads, head_dim) tensors."""
    block_size = layer_cache.shape[2]
    kv = _gather_blocks(layer_cache, block_table[: -(-seq_len // block_size)], dtype)
    kv = kv.flatten(1, 2)[:, :seq_len]
    return kv[0], kv[1]


@functools.cache
def triton_decode_runs(device: torch.device, head_dim: int) -> bool:
    """Whether decode attention on `device` runs on r1's Triton kernel: a GPU, Triton installed,
    and a head size the kernel takes."""
    if device.type != "cuda" or importlib.util.find_spec("triton") is None:
        return False
    from r1.kernels import paged_decode  # imports Triton: only on a GPU

    return paged_decode.supports(head_dim)


def decode_attention(
    q: torch.Tensor, layer_cache: torch.Tensor | Int8KVCache, group: DecodeGroup, scale: float
) -> torch.Tensor:
    """Attention of D one-token queries (D, heads, head_dim) to their sequences' caches.

    Read in place, where each sequence's blocks lie: on a GPU by r1's Triton kernel
    (r1/kernels/paged_decode.py), on a CPU by r1's kernel (r1/kernels/decode_attention.cpp,
    float32 queries; a float32, bf16 or int8 cache). Otherwise gathered, in PyTorch.
    """
    if isinstance(layer_cache, Int8KVCache):
        (keys, values), (key_scales, value_scales) = layer_cache.values, layer_cache.scales
    else:
        (keys, values), key_scales, value_scales = layer_cache, None, None
    if triton_decode_runs(q.device, q.shape[-1]):
        from r1.kernels.paged_decode import paged_decode_attention

        return paged_decode_attention(
            q, keys, values, key_scales, value_scales, group.block_tables, group.seq_lens, scale
        )
    op = kernels.op_for("decode_attention", q) if q.shape[-1] % 16 == 0 else None  # its vector width
    if op is None or not (isinstance(layer_cache, Int8KVCache) or layer_cache.dtype in (torch.float32, torch.bfloat16)):
        return _gathered_decode_attention(q, layer_cache, group, scale)
    return op(q.contiguous(), keys, values, key_scales, value_scales, group.block_tables, group.seq_lens, scale)


def _gathered_decode_attention(
    q: torch.Tensor, layer_cache: torch.Tensor | Int8KVCache, group: DecodeGroup, scale: float
) -> torch.Tensor:
    """decode_attention in PyTorch, batched: the sequences' keys and values are gathered to the
    longest one's length L and the rest is masked off, a few large ops in place of a dozen small
    ones per sequence.

    The sequences go in slices of at most DECODE_GATHER_TOKENS gathered tokens (at least one
    sequence), which bounds the copy (r1/memory.py counts it). Each kv head's keys stay a strided
    view that the matmul reads in place (a transposing copy costs more than the math), which is
    also why this forms the scores by hand rather than through SDPA.
    """
    d, heads, head_dim = q.shape
    kv_heads, length = layer_cache.shape[3], group.mask.shape[-1]
    q = q.view(d, kv_heads, heads // kv_heads, head_dim)  # the query heads that share each kv head
    per_slice = max(1, DECODE_GATHER_TOKENS // length)
    out = []
    for first in range(0, d, per_slice):
        rows = slice(first, first + per_slice)
        blocks = group.block_tables[rows].flatten()
        k, v = _gather_blocks(layer_cache, blocks, q.dtype).view(2, -1, length, kv_heads, head_dim)  # (rows, L, ...)
        per_head = []
        for h in range(kv_heads):
            # Scores in float32 whatever the cache's dtype (a no-op for float32): rounded to bf16,
            # they cost the 1.5B stand-in 3.1% perplexity decoded a token at a time.
            scores = (
                q[rows, h].float() @ k[:, :, h].float().transpose(1, 2) * scale + group.mask[rows]
            )  # (rows, group, L)
            per_head.append(scores.softmax(-1).to(v.dtype) @ v[:, :, h])
        out.append(torch.stack(per_head, 1))  # (rows, kv_heads, group, head_dim)
    return (out[0] if len(out) == 1 else torch.cat(out)).view(d, heads, head_dim)


def paged_attention(
    q: torch.Tensor, layer_cache: torch.Tensor | Int8KVCache, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """Causal attention of the new queries (N, heads, head_dim) to each sequence's cache.

    Sequences that decode one token run together (decode_attention). A step with prefill chunks
    is one call of r1's Triton kernel on a GPU with its kernels on (paged_prefill.py); otherwise
    each chunk gets its own scaled_dot_product_attention call.
    """
    group = meta.decode_group(layer_cache.shape[2])
    if group is not None and group.rows is None:
        return decode_attention(q, layer_cache, group, scale)
    whole_step = kernels.op_for("prefill_attention", q) if triton_decode_runs(q.device, q.shape[-1]) else None
    if whole_step is not None:
        if isinstance(layer_cache, Int8KVCache):
            (keys, values), (key_scales, value_scales) = layer_cache.values, layer_cache.scales
        else:
            (keys, values), key_scales, value_scales = layer_cache, None, None
        return whole_step(
            q, keys, values, key_scales, value_scales, meta.block_tables, meta.query_lens, meta.seq_lens, scale
        )
    out = torch.empty_like(q)
    if group is not None:
        out[group.rows] = decode_attention(q[group.rows], layer_cache, group, scale)
    start = 0
    for i, (q_len, seq_len) in enumerate(zip(meta.query_lens, meta.seq_lens)):
        if q_len == 1:  # a decode token (it sees everything cached): done above, in the group
            start += 1
            continue
        k, v = _gather_seq(layer_cache, meta.block_tables[i], seq_len, q.dtype)
        q_i = q[start : start + q_len].transpose(0, 1)  # (heads, q_len, head_dim)
        k, v = k.transpose(0, 1), v.transpose(0, 1)  # (kv_heads, seq_len, head_dim)
        if q_len == seq_len:  # a whole prompt with nothing cached before it
            mask, causal = None, True
        else:  # a prefill chunk after cached tokens: query j sits at position seq_len - q_len + j
            q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)
            mask = torch.arange(seq_len, device=q.device)[None, :] <= q_pos[:, None]
            causal = False
        # 4-D inputs (a batch of one) select the fused flash kernel on the CPU; 3-D ones fall back
        # to the math kernel, which materializes heads x q_len x seq_len scores.
        o = F.scaled_dot_product_attention(
            q_i[None], k[None], v[None], attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=True
        )[0]
        out[start : start + q_len] = o.transpose(0, 1)
        start += q_len
    return out
