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

import numpy as np
import torch

from r1.engine.block_manager import BlockTables
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

    def prepare(self, scheduled: list[ScheduledSeq], tables: BlockTables, pending_rows: dict[int, int]):
        """The flat inputs of a step: token ids (a list), positions, cache slots and sequence
        lengths (arrays), new tokens per sequence (a list), block tables (B, width), which rows
        to sample, and (flat row, sampled row) of each token still on the device (a sequence's
        pending token, at pending_rows[seq_id]).

        A sequence samples its last row, or with proposed tokens (speculative decoding) every row
        from its last known token on: the verification reads each position's distribution."""
        token_ids, starts, query_lens, sample_rows, pending = [], [], [], [], []
        for s in scheduled:
            seq, start = s.seq, s.seq.num_computed_tokens
            known_end = start + s.num_new_tokens - s.num_spec
            ids = seq.token_ids[start:known_end]
            if seq.num_pending_tokens and known_end == seq.num_tokens:  # only a sequence's last token can be pending
                pending.append((len(token_ids) + len(ids), pending_rows[seq.seq_id]))
                ids.append(0)  # a place for the id, filled on the device
            if s.num_spec:
                ids += seq.spec_token_ids[: s.num_spec]
            token_ids += ids
            starts.append(start)
            query_lens.append(len(ids))
            if s.samples:
                sample_rows += range(len(token_ids) - 1 - s.num_spec, len(token_ids))
        block_tables = tables.gather([s.seq for s in scheduled])
        positions, slots, seq_lens = self._flatten(starts, query_lens, block_tables)
        return token_ids, positions, slots, query_lens, seq_lens, block_tables, sample_rows, pending

    def _flatten(
        self, starts: list[int], query_lens: list[int], block_tables: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(positions, cache slots, seq_lens) of sequences that each run query_lens[i] tokens from
        position starts[i], their blocks in block_tables' rows: one lookup for the whole batch."""
        starts_np, lens_np = np.asarray(starts), np.asarray(query_lens)
        if len(lens_np) == int(lens_np.sum()):  # one token each: a decode step
            rows, positions = np.arange(len(starts_np)), starts_np
        else:
            rows = np.repeat(np.arange(len(starts_np)), lens_np)
            first_row = np.cumsum(lens_np) - lens_np
            positions = starts_np[rows] + np.arange(len(rows)) - first_row[rows]
        bs = self.block_size
        slots = block_tables[rows, positions // bs] * bs + positions % bs
        return positions, slots, starts_np + lens_np

    @torch.inference_mode()
    def run(
        self,
        scheduled: list[ScheduledSeq],
        tables: BlockTables,
        sampled: tuple[torch.Tensor, dict[int, int]] | None = None,
    ) -> torch.Tensor:
        """Run one step, the scheduled sequences' blocks in `tables`; float32 logits
        (M, vocab) of the M rows prepare() samples.

        `sampled` holds the last step's tokens, and the row of each sequence whose input still
        counts its token as pending (async scheduling): they go from there into the inputs on
        the device, unread.
        """
        tokens, pending_rows = sampled if sampled is not None else (None, {})
        token_ids, positions, slots, query_lens, seq_lens, block_tables, sample_rows, pending = self.prepare(
            scheduled, tables, pending_rows
        )
        tensor = self._tensor
        input_ids = tensor(token_ids)
        if pending:
            rows, sources = zip(*pending)
            input_ids[tensor(rows)] = tokens[tensor(sources)]
        if self.graphs is not None and len(scheduled) <= self.graphs.max_batch and len(token_ids) == len(scheduled):
            hidden = self.graphs.run(input_ids, positions, slots, seq_lens, block_tables)
        else:
            hidden = self._forward(input_ids, positions, slots, query_lens, seq_lens, block_tables)
        if len(sample_rows) < len(token_ids):  # a decode step samples every row: no gather
            hidden = hidden[tensor(sample_rows)]
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def run_chunks(self, chunks: list[tuple[list[int], int, list[int]]]) -> torch.Tensor:
        """Run each chunk (token ids, position of the first, block table) of a sequence whose
        earlier tokens are cached; float32 logits (len(chunks), vocab) of each chunk's last token.
        The draft model's forward (speculative.py), which keeps no bookkeeping of its own."""
        starts, query_lens = [start for _, start, _ in chunks], [len(ids) for ids, _, _ in chunks]
        block_tables = np.zeros((len(chunks), max(len(table) for _, _, table in chunks)), dtype=np.int64)
        for row, (_, _, table) in zip(block_tables, chunks):
            row[: len(table)] = table
        positions, slots, seq_lens = self._flatten(starts, query_lens, block_tables)
        token_ids = [token for ids, _, _ in chunks for token in ids]
        hidden = self._forward(self._tensor(token_ids), positions, slots, query_lens, seq_lens, block_tables)
        last_rows = torch.tensor(query_lens).cumsum(0) - 1
        return self.model.compute_logits(hidden[last_rows.to(self.device)])

    def _forward(self, input_ids, positions, slots, query_lens, seq_lens, block_tables) -> torch.Tensor:
        """The model's eager forward over a flat batch; hidden states (N, hidden)."""
        tensor = self._tensor
        meta = AttentionMetadata(tensor(slots), tensor(block_tables), query_lens, seq_lens.tolist())
        return self.model(input_ids, tensor(positions), self.kv_cache, meta)

    def _tensor(self, x: list | np.ndarray) -> torch.Tensor:
        """Host ints on the device as int64, non-blocking: an in-flight forward need not finish first."""
        host = torch.from_numpy(np.asarray(x, dtype=np.int64))
        return host.to(self.device, non_blocking=True)

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
