"""CUDA graphs for decode steps: the model's forward captured once per batch size, then replayed.

A decode step of R1-1.5B launches ~450 small kernels; at small batches launching them takes
longer than running them, and a replayed graph launches them all at once. The graphs are
captured from outside the model (as gpt-fast and nano-vllm do): each reads its inputs from
static buffers, which a step fills before the replay. A step of n sequences takes the smallest
captured size >= n; the rows past n are padding that writes its key and value to a scratch
block no sequence owns and attends to that block alone.

Capture needs a forward with no host syncs and no shapes that depend on the data: the decode
metadata is built from the static tensors (AttentionMetadata.for_decode) and the attention runs
on the Triton kernel, which reads each sequence's length on the device. Prefill and mixed steps
run eagerly (model_runner.py decides). On a CPU the same buffers run eagerly, without capture:
the tests check the padding and the buffers that way.
"""

from __future__ import annotations

import numpy as np
import torch

from r1.model.attention import AttentionMetadata
from r1.model.qwen2 import Qwen2ForCausalLM


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16 up to max_num_seqs (nano-vllm's and vLLM's steps)."""
    sizes = [n for n in (1, 2, 4, 8) if n < max_num_seqs] + list(range(16, max_num_seqs, 16))
    return sizes + [max_num_seqs]


class DecodeGraphs:
    def __init__(
        self,
        model: Qwen2ForCausalLM,
        kv_cache,
        block_size: int,
        scratch_block: int,
        max_num_seqs: int,
        max_model_len: int,
    ):
        self.model, self.kv_cache, self.block_size = model, kv_cache, block_size
        self.scratch_block, self.scratch_slot = scratch_block, scratch_block * block_size
        self.sizes = graph_batch_sizes(max_num_seqs)
        embedding = model.model.embed_tokens.weight  # not the lm_head's: a quantized one has no .weight
        device, n, width = embedding.device, self.sizes[-1], -(-max_model_len // block_size)
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((n,), self.scratch_slot, dtype=torch.long, device=device)
        self.seq_lens = torch.ones(n, dtype=torch.long, device=device)
        self.block_tables = torch.full((n, width), scratch_block, dtype=torch.long, device=device)
        self.hidden = torch.zeros(n, model.config.hidden_size, dtype=embedding.dtype, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        if device.type == "cuda":
            self._capture()

    @property
    def max_batch(self) -> int:
        return self.sizes[-1]

    def _forward(self, size: int) -> None:
        """The decode forward of the first `size` rows of the static buffers, into self.hidden."""
        meta = AttentionMetadata.for_decode(
            self.slot_mapping[:size], self.block_tables[:size], self.seq_lens[:size], self.block_size
        )
        self.hidden[:size] = self.model(self.input_ids[:size], self.positions[:size], self.kv_cache, meta)

    @torch.inference_mode()
    def _capture(self) -> None:
        # Largest first, all in one memory pool: the smaller graphs reuse the largest one's memory.
        pool = None
        for size in reversed(self.sizes):
            self._forward(size)  # warm up: cuBLAS handles, Triton's compiles, the allocator
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._forward(size)
            pool, self.graphs[size] = graph.pool(), graph
        torch.cuda.synchronize()

    def run(
        self,
        input_ids: torch.Tensor,
        positions: np.ndarray,
        slots: np.ndarray,
        seq_lens: np.ndarray,
        block_tables: np.ndarray,
    ) -> torch.Tensor:
        """Hidden states (n, hidden) of n <= max_batch sequences that decode one token each; their
        n input ids are on the device (the last step's samples may be among them, unread)."""
        n = len(input_ids)
        size = next(s for s in self.sizes if s >= n)
        width = block_tables.shape[1]

        def fill(buffer: torch.Tensor, values: np.ndarray) -> None:
            buffer.copy_(torch.from_numpy(values), non_blocking=True)

        self.input_ids[:n].copy_(input_ids)
        fill(self.positions[:n], positions)
        # Padding rows write their key and value to the scratch slot and attend to it alone.
        fill(self.slot_mapping[:n], slots)
        self.slot_mapping[n:size].fill_(self.scratch_slot)
        fill(self.seq_lens[:n], seq_lens)
        self.seq_lens[n:size].fill_(1)
        fill(self.block_tables[:n, :width], block_tables)
        self.block_tables[n:size, :width].fill_(self.scratch_block)
        if size in self.graphs:
            self.graphs[size].replay()
        else:
            self._forward(size)
        return self.hidden[:n]
