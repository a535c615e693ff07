"""The model runner: turns one scheduled step into tensors, runs the model, returns logits.

Owns the KV cache tensor and the translation from bookkeeping (sequences, block tables) to the
flat batch the model takes: token ids, positions, cache slots and attention metadata. It does not
decide what runs (the scheduler) or what the logits become (sampling.py, via the engine).
"""

from __future__ import annotations

import torch

from r1.engine.scheduler import ScheduledSeq
from r1.model.attention import AttentionMetadata, allocate_kv_cache
from r1.model.qwen2 import Qwen2ForCausalLM


class ModelRunner:
    def __init__(self, model: Qwen2ForCausalLM, num_blocks: int, block_size: int, kv_dtype: torch.dtype):
        cfg = model.config
        self.model, self.block_size = model, block_size
        self.device = model.model.embed_tokens.weight.device
        self.kv_cache = allocate_kv_cache(cfg.num_hidden_layers, num_blocks, block_size, cfg.num_key_value_heads,
                                          cfg.head_dim, kv_dtype, self.device)

    def prepare(self, scheduled: list[ScheduledSeq]):
        """The flat inputs of a step: token ids, positions, metadata, and which rows to sample."""
        token_ids, positions, slots, query_lens, seq_lens, sample_rows = [], [], [], [], [], []
        for s in scheduled:
            seq, start = s.seq, s.seq.num_computed_tokens
            end = start + s.num_new_tokens
            token_ids += seq.token_ids[start:end]
            positions += range(start, end)
            slots += (seq.block_table[p // self.block_size] * self.block_size + p % self.block_size
                      for p in range(start, end))
            query_lens.append(s.num_new_tokens)
            seq_lens.append(end)
            if s.samples:
                sample_rows.append(len(token_ids) - 1)
        width = max(len(s.seq.block_table) for s in scheduled)
        tables = [s.seq.block_table + [0] * (width - len(s.seq.block_table)) for s in scheduled]

        def tensor(x):
            return torch.tensor(x, dtype=torch.long, device=self.device)

        meta = AttentionMetadata(tensor(slots), tensor(tables), query_lens, seq_lens)
        return tensor(token_ids), tensor(positions), meta, tensor(sample_rows)

    @torch.inference_mode()
    def run(self, scheduled: list[ScheduledSeq]) -> torch.Tensor:
        """Run one step; float32 logits (M, vocab) for the M scheduled sequences that sample."""
        input_ids, positions, meta, sample_rows = self.prepare(scheduled)
        hidden = self.model(input_ids, positions, self.kv_cache, meta)
        return self.model.compute_logits(hidden[sample_rows])
