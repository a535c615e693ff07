"""Our Qwen2 against HF transformers' on the same weights: logits, prefill and cached decode."""

from __future__ import annotations

import torch

from r1.loaders import load_model, open_model_files
from r1.model.attention import AttentionMetadata, allocate_kv_cache

BLOCK = 4  # small blocks so a sequence spans several, non-contiguous ones


def _cache(cfg, num_blocks=64):
    return allocate_kv_cache(
        cfg.num_hidden_layers, num_blocks, BLOCK, cfg.num_key_value_heads, cfg.head_dim, torch.float32, "cpu"
    )


def _meta(block_table, start, n):
    slots = [block_table[p // BLOCK] * BLOCK + p % BLOCK for p in range(start, start + n)]
    return AttentionMetadata(torch.tensor(slots), torch.tensor([block_table]), [n], [start + n])


@torch.inference_mode()
def test_prefill_and_decode_logits_match_transformers(tiny_hf, kernel_path):
    folder, hf = tiny_hf
    ours = load_model(open_model_files(str(folder)), torch.float32, "cpu", progress=False)
    ids = torch.randint(0, 512, (37,), generator=torch.Generator().manual_seed(1))
    ref = hf(ids[None]).logits[0]  # (T, vocab)

    # Whole prompt in one pass, its blocks scattered through the pool.
    table = [9, 2, 30, 17, 5, 41, 12, 3, 22, 60]
    cache = _cache(ours.config)
    hidden = ours(ids, torch.arange(37), cache, _meta(table, 0, 37))
    assert (ours.compute_logits(hidden) - ref).abs().max() < 1e-4

    # A prefill of 20 tokens, a chunk of 9, then one token at a time through the cache.
    cache = _cache(ours.config)
    got = [ours.compute_logits(ours(ids[:20], torch.arange(20), cache, _meta(table, 0, 20)))]
    got.append(ours.compute_logits(ours(ids[20:29], torch.arange(20, 29), cache, _meta(table, 20, 9))))
    for p in range(29, 37):
        got.append(ours.compute_logits(ours(ids[p : p + 1], torch.tensor([p]), cache, _meta(table, p, 1))))
    assert (torch.cat(got) - ref).abs().max() < 1e-4


@torch.inference_mode()
def test_two_sequences_in_one_batch_match_each_alone(tiny_hf, kernel_path):
    folder, hf = tiny_hf
    ours = load_model(open_model_files(str(folder)), torch.float32, "cpu", progress=False)
    a = torch.randint(0, 512, (11,), generator=torch.Generator().manual_seed(2))
    b = torch.randint(0, 512, (6,), generator=torch.Generator().manual_seed(3))
    cache = _cache(ours.config)
    ta, tb = [0, 1, 2], [7, 8]
    slots = [ta[p // BLOCK] * BLOCK + p % BLOCK for p in range(11)] + [
        tb[p // BLOCK] * BLOCK + p % BLOCK for p in range(6)
    ]
    meta = AttentionMetadata(torch.tensor(slots), torch.tensor([ta, tb + [0]]), [11, 6], [11, 6])
    hidden = ours(torch.cat([a, b]), torch.cat([torch.arange(11), torch.arange(6)]), cache, meta)
    logits = ours.compute_logits(hidden)
    assert (logits[:11] - hf(a[None]).logits[0]).abs().max() < 1e-4
    assert (logits[11:] - hf(b[None]).logits[0]).abs().max() < 1e-4


@torch.inference_mode()
def test_half_precisions_track_fp32(tiny_hf):
    folder, hf = tiny_hf
    ids = torch.randint(0, 512, (20,), generator=torch.Generator().manual_seed(4))
    ref = hf(ids[None]).logits[0]
    for dtype in (torch.bfloat16, torch.float16):
        ours = load_model(open_model_files(str(folder)), dtype, "cpu", progress=False)
        cache = allocate_kv_cache(
            ours.config.num_hidden_layers,
            16,
            BLOCK,
            ours.config.num_key_value_heads,
            ours.config.head_dim,
            dtype,
            "cpu",
        )
        logits = ours.compute_logits(ours(ids, torch.arange(20), cache, _meta(list(range(16)), 0, 20)))
        assert logits.dtype == torch.float32
        assert ((logits - ref).norm() / ref.norm()) < 2e-2, dtype
