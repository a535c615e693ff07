"""Perplexity of a model on a fixed text: the quality yardstick for quantized weights.

Runs the text through the model in one pass over a scratch KV cache and averages the negative
log-likelihood of each next token. Used by the quantization tests and bench/quant_quality.py.
"""

from __future__ import annotations

import math

import torch

from r1.model.attention import AttentionMetadata, allocate_kv_cache
from r1.model.qwen2 import Qwen2ForCausalLM


@torch.inference_mode()
def token_logits(model: Qwen2ForCausalLM, token_ids: list[int]) -> torch.Tensor:
    """Float32 logits (T, vocab) at every position of one sequence."""
    cfg, n = model.config, len(token_ids)
    device = model.model.embed_tokens.weight.device
    block_size = 16
    num_blocks = -(-n // block_size)
    cache = allocate_kv_cache(cfg.num_hidden_layers, num_blocks, block_size, cfg.num_key_value_heads,
                              cfg.head_dim, model.model.embed_tokens.weight.dtype, device)
    positions = torch.arange(n, device=device)
    meta = AttentionMetadata(positions, torch.arange(num_blocks, device=device)[None], [n], [n])
    hidden = model(torch.tensor(token_ids, device=device), positions, cache, meta)
    return model.compute_logits(hidden)


def perplexity(model: Qwen2ForCausalLM, token_ids: list[int]) -> float:
    logits = token_logits(model, token_ids)[:-1]
    targets = torch.tensor(token_ids[1:], device=logits.device)
    nll = torch.nn.functional.cross_entropy(logits, targets)
    return math.exp(nll.item())
