"""The model runner: turns one scheduled step into tensors, runs the model, returns logits.

Owns the KV cache tensor and the translation from bookkeeping (sequences, block tables) to the
flat batch the model takes: token ids, positions, cache slots and attention metadata. On a GPU
it also owns the decode steps' CUDA graphs (cuda_graphs.py), which replay steps in which every
sequence runs one token. It does not decide what runs (the scheduler) or what the logits become
(sampling.py, via the engine).
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

from r1.engine.cuda_graphs import DecodeGraphs
from r1.engine.scheduler import ScheduledSeq
from r1.model.attention import AttentionMetadata, allocate_kv_cache, triton_decode_runs
from r1.model.qwen2 import Qwen2ForCausalLM

log = logging.getLogger(__name__)


class ModelRunner:
    def __init__(
        self,
        model: Qwen2ForCausalLM,
        num_blocks: int,
        block_size: int,
        kv_dtype: torch.dtype,
        enforce_eager: bool = False,
    ):
        cfg = model.config
        self.model, self.block_size, self.num_blocks = model, block_size, num_blocks
        self.device = model.model.embed_tokens.weight.device
        self.kv_dtype = kv_dtype
        self.kv_cache = allocate_kv_cache(
            cfg.num_hidden_layers, num_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim, kv_dtype, self.device
        )
        # On a GPU decode steps replay CUDA graphs, unless asked not to, or unless Triton's paged
        # kernel cannot run here: without it every graph would gather each sequence's cache to
        # max_model_len, each layer. The graphs' padding rows write to the pool's last block.
        self.captures_graphs = self.device.type == "cuda" and not enforce_eager and num_blocks > 1
        if self.captures_graphs and not triton_decode_runs(self.device, cfg.head_dim):
            log.warning(
                "decode steps run without CUDA graphs: Triton's paged decode kernel cannot run here "
                "(it needs triton, and a head_dim that is a power of two >= 16)"
            )
            self.captures_graphs = False
        self.scratch_block = num_blocks - 1 if self.captures_graphs else None
        self.graphs: DecodeGraphs | None = None

    @property
    def num_sequence_blocks(self) -> int:
        """The blocks the block manager may hand to sequences: all but the scratch block."""
        return self.num_blocks - self.captures_graphs

    def capture_decode_graphs(self, max_num_seqs: int, max_model_len: int) -> None:
        """Capture the decode forward for batches up to max_num_seqs, where graphs run."""
        if self.captures_graphs:
            self.graphs = DecodeGraphs(
                self.model, self.kv_cache, self.block_size, self.scratch_block, max_num_seqs, max_model_len
            )

    def prepare(self, scheduled: list[ScheduledSeq], pending_rows: dict[int, int]):
        """The flat inputs of a step as lists: token ids, positions, cache slots, new and cached
        tokens per sequence, block tables, which rows to sample, and (flat row, sampled row) of
        each token still on the device (a sequence's pending token, at pending_rows[seq_id]).

        A sequence samples its last row, or with proposed tokens (speculative decoding) every row
        from its last known token on: the verification reads each position's distribution."""
        chunks, sample_rows, pending, rows = [], [], [], 0
        for s in scheduled:
            seq, start = s.seq, s.seq.num_computed_tokens
            known_end = start + s.num_new_tokens - s.num_spec
            ids = seq.token_ids[start:known_end]
            if seq.num_pending_tokens and known_end == seq.num_tokens:  # only a sequence's last token can be pending
                pending.append((rows + len(ids), pending_rows[seq.seq_id]))
                ids.append(0)  # a place for the id, filled on the device
            if s.num_spec:
                ids += seq.spec_token_ids[: s.num_spec]
            chunks.append((ids, start, seq.block_table))
            rows += len(ids)
            if s.samples:
                sample_rows += range(rows - 1 - s.num_spec, rows)
        tables = [s.seq.block_table for s in scheduled]
        return *self._flatten(chunks), tables, sample_rows, pending

    def _flatten(self, chunks: list[tuple[list[int], int, list[int]]]):
        """(token ids, positions, cache slots, query_lens, seq_lens) as flat lists, of chunks of
        (token ids, position of the first, block table)."""
        token_ids, positions, slots, query_lens, seq_lens = [], [], [], [], []
        bs = self.block_size
        for ids, start, table in chunks:
            end = start + len(ids)
            token_ids += ids
            if len(ids) == 1:  # a decode: most chunks of most steps
                positions.append(start)
                slots.append(table[start // bs] * bs + start % bs)
            else:
                positions += range(start, end)
                slots += (table[p // bs] * bs + p % bs for p in range(start, end))
            query_lens.append(len(ids))
            seq_lens.append(end)
        return token_ids, positions, slots, query_lens, seq_lens

    @torch.inference_mode()
    def run(
        self, scheduled: list[ScheduledSeq], sampled: tuple[torch.Tensor, dict[int, int]] | None = None
    ) -> torch.Tensor:
        """Run one step; float32 logits (M, vocab) of the M rows prepare() samples.

        `sampled` holds the last step's tokens, and the row of each sequence whose input still
        counts its token as pending (async scheduling): they go from there into the inputs on
        the device, unread.
        """
        tokens, pending_rows = sampled if sampled is not None else (None, {})
        token_ids, positions, slots, query_lens, seq_lens, tables, sample_rows, pending = self.prepare(
            scheduled, pending_rows
        )
        tensor = self._tensor
        input_ids = tensor(token_ids)
        if pending:
            rows, sources = zip(*pending)
            input_ids[tensor(rows)] = tokens[tensor(sources)]
        if self.graphs is not None and len(scheduled) <= self.graphs.max_batch and all(n == 1 for n in query_lens):
            hidden = self.graphs.run(input_ids, positions, slots, seq_lens, tables)
        else:
            hidden = self._forward(input_ids, positions, slots, query_lens, seq_lens, tables)
        if len(sample_rows) < len(token_ids):  # a decode step samples every row: no gather
            hidden = hidden[tensor(sample_rows)]
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def run_chunks(self, chunks: list[tuple[list[int], int, list[int]]]) -> torch.Tensor:
        """Run each chunk (token ids, position of the first, block table) of a sequence whose
        earlier tokens are cached; float32 logits (len(chunks), vocab) of each chunk's last token.
        The draft model's forward (speculative.py), which keeps no bookkeeping of its own."""
        token_ids, positions, slots, query_lens, seq_lens = self._flatten(chunks)
        last_rows = torch.tensor(query_lens).cumsum(0) - 1
        hidden = self._forward(
            self._tensor(token_ids), positions, slots, query_lens, seq_lens, [table for _, _, table in chunks]
        )
        return self.model.compute_logits(hidden[last_rows.to(self.device)])

    def _forward(self, input_ids, positions, slots, query_lens, seq_lens, tables) -> torch.Tensor:
        """The model's eager forward over a flat batch; hidden states (N, hidden)."""
        tensor = self._tensor
        width = max(len(t) for t in tables)
        meta = AttentionMetadata(
            tensor(slots), tensor([t + [0] * (width - len(t)) for t in tables]), query_lens, seq_lens
        )
        return self.model(input_ids, tensor(positions), self.kv_cache, meta)

    def _tensor(self, x: list) -> torch.Tensor:
        """Host ints on the device, non-blocking: an in-flight forward need not finish first."""
        return torch.tensor(x, dtype=torch.long).to(self.device, non_blocking=True)

    def start_reading(self, x: torch.Tensor) -> Callable[[], list]:
        """Start copying x to the host behind the work queued so far, ahead of any queued later;
        the function returned waits for the copy and gives x as a list."""
        if x.device.type != "cuda":
            return x.tolist
        host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
        host.copy_(x, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()

        def read() -> list:
            copied.synchronize()
            return host.tolist()

        return read
