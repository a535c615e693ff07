"""Attention over a paged KV cache, and the metadata that describes one forward pass.

A forward pass runs a flat batch of N new tokens that belong to B sequences; each sequence has
some tokens already in the cache and some new ones (a prefill chunk, or one decode token).
The cache of one layer is a tensor (2, num_blocks, block_size, kv_heads, head_dim); a sequence's
tokens live in the blocks its block table lists, in order. This module writes the new keys and
values to their slots and attends each sequence's new queries to all of its cached keys. It does
not decide which blocks a sequence gets (the engine's block manager does).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    """Where the N new tokens of a forward pass go, and what each sequence attends to."""

    slot_mapping: torch.Tensor  # (N,) int64: block * block_size + offset of each new token
    block_tables: torch.Tensor  # (B, max_blocks) int64: each sequence's blocks, in order
    query_lens: list[int]  # new tokens per sequence; they sum to N
    seq_lens: list[int]  # cached + new tokens per sequence (what its queries attend to)

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)


def allocate_kv_cache(num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                      dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """One tensor for the whole cache: (num_layers, 2, num_blocks, block_size, kv_heads, head_dim)."""
    return torch.zeros(num_layers, 2, num_blocks, block_size, kv_heads, head_dim, dtype=dtype, device=device)


def write_kv(layer_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store the new (N, kv_heads, head_dim) keys and values at their slots."""
    _, num_blocks, block_size, kv_heads, head_dim = layer_cache.shape
    flat = layer_cache.view(2, num_blocks * block_size, kv_heads, head_dim)
    flat[0].index_copy_(0, slot_mapping, k)
    flat[1].index_copy_(0, slot_mapping, v)


def _gather_seq(layer_cache: torch.Tensor, block_table: torch.Tensor, seq_len: int):
    """A sequence's cached keys and values as two (seq_len, kv_heads, head_dim) tensors."""
    block_size = layer_cache.shape[2]
    num_blocks = -(-seq_len // block_size)
    blocks = block_table[:num_blocks]
    kv = layer_cache[:, blocks]  # (2, num_blocks, block_size, kv_heads, head_dim)
    kv = kv.flatten(1, 2)[:, :seq_len]
    return kv[0], kv[1]


def paged_attention(q: torch.Tensor, layer_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Causal attention of the new queries (N, heads, head_dim) to each sequence's cache.

    The reference path, for every device: one scaled_dot_product_attention call per sequence.
    """
    out = torch.empty_like(q)
    start = 0
    for i, (q_len, seq_len) in enumerate(zip(meta.query_lens, meta.seq_lens)):
        k, v = _gather_seq(layer_cache, meta.block_tables[i], seq_len)
        q_i = q[start:start + q_len].transpose(0, 1)  # (heads, q_len, head_dim)
        k, v = k.transpose(0, 1), v.transpose(0, 1)  # (kv_heads, seq_len, head_dim)
        if q_len == 1:  # a decode token sees everything cached
            mask, causal = None, False
        elif q_len == seq_len:  # a whole prompt with nothing cached before it
            mask, causal = None, True
        else:  # a prefill chunk after cached tokens: query j sits at position seq_len - q_len + j
            q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)
            mask = torch.arange(seq_len, device=q.device)[None, :] <= q_pos[:, None]
            causal = False
        # 4-D inputs (a batch of one) select the fused flash kernel on the CPU; 3-D ones fall back
        # to the math kernel, which materializes heads x q_len x seq_len scores.
        o = F.scaled_dot_product_attention(q_i[None], k[None], v[None], attn_mask=mask, is_causal=causal,
                                           scale=scale, enable_gqa=True)[0]
        out[start:start + q_len] = o.transpose(0, 1)
        start += q_len
    return out
