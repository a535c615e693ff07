"""Decode steps through the CUDA graphs' static buffers (r1/engine/cuda_graphs.py) give the
tokens that eager steps give.

On a GPU the graphs are captured and replayed. On a CPU the same buffers run eagerly, which
checks what capture does not change: the padding rows and their scratch block, the static block
tables with stale entries, and the handoff between graph and eager steps.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_engine import _assert_no_leaks, _prompts

from r1 import LLM, SamplingParams
from r1.engine.cuda_graphs import DecodeGraphs, graph_batch_sizes

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def test_graph_batch_sizes():
    assert graph_batch_sizes(1) == [1]
    assert graph_batch_sizes(5) == [1, 2, 4, 5]
    assert graph_batch_sizes(40) == [1, 2, 4, 8, 16, 32, 40]
    sizes = graph_batch_sizes(256)
    assert sizes[:5] == [1, 2, 4, 8, 16] and sizes[-2:] == [240, 256] and len(sizes) == 4 + 16


def _llm(folder, device, **kw):
    return LLM(
        str(folder),
        progress=False,
        dtype="fp32",
        device=device,
        kv_cache_tokens=4096,
        block_size=16,
        max_num_batched_tokens=32,
        **kw,
    )


@pytest.mark.parametrize("kv_dtype", ["auto", "int8"])
@pytest.mark.parametrize("device", DEVICES)
def test_graph_decode_steps_equal_eager_ones(tiny_model_folder, device, kv_dtype, monkeypatch):
    prompts = _prompts(6, seed=4)
    # Different lengths, so that the batch shrinks through 6, 5, 4, 3 (padded to 4), 2 and 1.
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (30, 3, 40, 10, 20, 16)]
    eager = _llm(tiny_model_folder, device, kv_dtype=kv_dtype, enforce_eager=True)
    assert eager.engine.core.runner.graphs is None
    want = [c.token_ids for c in eager.generate(prompts, params)]

    llm = _llm(tiny_model_folder, device, kv_dtype=kv_dtype)
    runner = llm.engine.core.runner
    if device == "cpu":  # no capture on a CPU: the buffers for batches of up to 4, run eagerly
        assert runner.graphs is None and runner.scratch_block is None
        # Without graphs the block manager holds every block; these six short sequences take
        # blocks from the front of 256 and never reach the last, the scratch block here.
        assert llm.engine.core.scheduler.config.num_blocks == runner.num_blocks
        runner.graphs = DecodeGraphs(
            runner.model,
            runner.kv_cache,
            runner.block_size,
            runner.num_blocks - 1,
            max_num_seqs=4,
            max_model_len=llm.engine.core.scheduler.config.max_model_len,
        )
    else:  # the block manager never hands out the scratch block, the last
        assert llm.engine.core.scheduler.config.num_blocks == runner.scratch_block == runner.num_blocks - 1
        assert set(runner.graphs.graphs) == set(graph_batch_sizes(llm.engine.core.scheduler.config.max_num_seqs))
    graph_batches = []
    run = runner.graphs.run
    monkeypatch.setattr(runner.graphs, "run", lambda ids, *rest: graph_batches.append(len(ids)) or run(ids, *rest))
    got = [c.token_ids for c in llm.generate(prompts, params)]
    assert got == want
    assert {1, 2, 3, 4} <= set(graph_batches)
    _assert_no_leaks(llm)


@pytest.mark.parametrize("quant", ["none", "int8"])  # a quantized lm_head has no .weight to size buffers by
def test_padding_rows_write_only_the_scratch_block(tiny_model_folder, quant):
    # Three sequences run as a batch of four: the fourth row's key and value land in the
    # scratch block, and no other slot but the three sequences' new ones changes.
    llm = _llm(tiny_model_folder, "cpu", quant=quant)
    runner = llm.engine.core.runner
    scratch = runner.num_blocks - 1
    graphs = DecodeGraphs(runner.model, runner.kv_cache, 16, scratch, max_num_seqs=4, max_model_len=64)
    runner.kv_cache.normal_()
    before = runner.kv_cache.clone()
    slots = [5 * 16 + 2, 7 * 16 + 3, 2 * 16 + 15]
    tables = np.array([[5, 0], [9, 7], [2, 0]])
    hidden = graphs.run(
        torch.tensor([11, 12, 13]), np.array([2, 19, 15]), np.array(slots), np.array([3, 20, 16]), tables
    )
    assert hidden.shape == (3, llm.config.hidden_size) and torch.isfinite(hidden).all()
    written = (runner.kv_cache != before).any(-1).any(-1).any(1).any(0)  # (blocks, block_size): each slot
    assert set(written.flatten().nonzero().flatten().tolist()) == {*slots, scratch * 16}
