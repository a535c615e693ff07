"""Perplexity of a model on a fixed text: the quality yardstick for quantized weights.

Runs the text through the model over a scratch KV cache, in one pass or a token at a time, and
averages the negative log-likelihood of each next token. Used by the quantization tests and bench/quant_quality.py.
"""

from __future__ import annotations

import math

import torch

from r1.model.attention import AttentionMetadata, allocate_kv_cache
from r1.model.qwen2 import Qwen2ForCausalLM

# The fixed text quantized weights are scored on: prose, code and numbers, so every kind of token counts.
REFERENCE_TEXT = """The history of mathematics is the history of people asking simple questions. Why does a
circle's circumference divided by its diameter always give the same number? Archimedes bounded pi
between 3 10/71 and 3 1/7 by drawing polygons with 96 sides.

def is_prime(n: int) -> bool:
    if n < 2:
        return False
    for d in range(2, int(n ** 0.5) + 1):
        if n % d == 0:
            return False
    return True

The first primes are 2, 3, 5, 7, 11, 13, 17, 19, 23 and 29; there are 25 primes below 100."""


@torch.inference_mode()
def token_logits(
    model: Qwen2ForCausalLM, token_ids: list[int], kv_dtype: torch.dtype | None = None, one_at_a_time: bool = False
) -> torch.Tensor:
    """Float32 logits (T, vocab) at every position of one sequence; the KV cache in kv_dtype
    (default: the model's dtype). In one pass, as a prompt is prefilled, or one token a forward,
    as generation reads the cache (decode attention)."""
    cfg, n = model.config, len(token_ids)
    device = model.model.embed_tokens.weight.device
    block_size = 16
    num_blocks = -(-n // block_size)
    cache = allocate_kv_cache(
        cfg.num_hidden_layers,
        num_blocks,
        block_size,
        cfg.num_key_value_heads,
        cfg.head_dim,
        kv_dtype or model.model.embed_tokens.weight.dtype,
        device,
    )
    ids, table = torch.tensor(token_ids, device=device), torch.arange(num_blocks, device=device)[None]
    chunks = [(p, p + 1) for p in range(n)] if one_at_a_time else [(0, n)]
    hidden = []
    for start, end in chunks:
        positions = torch.arange(start, end, device=device)
        meta = AttentionMetadata(positions, table, [end - start], [end])
        hidden.append(model(ids[start:end], positions, cache, meta))
    return model.compute_logits(torch.cat(hidden))


def perplexity(
    model: Qwen2ForCausalLM, token_ids: list[int], kv_dtype: torch.dtype | None = None, one_at_a_time: bool = False
) -> float:
    logits = token_logits(model, token_ids, kv_dtype, one_at_a_time)[:-1]
    targets = torch.tensor(token_ids[1:], device=logits.device)
    nll = torch.nn.functional.cross_entropy(logits, targets)
    return math.exp(nll.item())
