"""A decode step on the CPU in one C++ call: the model's layers handed to r1's DecodeStack
(r1/kernels/decode_step.cpp), which runs the same ops as the Python layers, in the same order,
without a trip through Python and PyTorch's dispatcher for each of a step's ~400 calls.

It runs where the Python layers would run r1's CPU kernels for every op: float32 on the CPU, each
linear on r1's int4 or int6 kernel or a float32 weight (stacked or not), a float32, bf16 or int8
cache, and a step whose new tokens can each be a one-token query (AttentionMetadata.token_queries):
a decode step, equal to the Python layers' to the bit, or a speculative verification step's
k + 1 tokens a sequence, on decode attention where the Python layers take SDPA. Elsewhere
(prefill chunks, other dtypes, int8 weights, PyTorch's paths) the Python layers run. The stack
holds the layers' tensors, not copies: it is built at the first such step, after loading has set
every weight.
"""

from __future__ import annotations

import torch
from torch import nn

from r1 import kernels
from r1.model.attention import DecodeGroup, Int8KVCache
from r1.quant import Int4KernelLinear, Int6KernelLinear, StackedLinear

CACHE_DTYPES = (torch.float32, torch.bfloat16, torch.int8)  # what decode_attention.cpp reads
# The ops the stack calls in place of the Python layers': it runs only where they would run too.
LAYER_OPS = ("add_rms_norm", "rotary_", "write_kv_int8_", "decode_attention", "silu_mul")


class CpuDecodeStep:
    """The model's decode forward as one DecodeStack call."""

    def __init__(self, stack: torch.ScriptObject):
        self.stack = stack

    def __call__(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: torch.Tensor | Int8KVCache,
        slot_mapping: torch.Tensor,
        group: DecodeGroup,
    ) -> torch.Tensor:
        """Hidden states (N, hidden) after the final norm, for N embedded new tokens, each a
        one-token query of group's (its sequence's block table and its length up to itself)."""
        values, scales = (kv_cache.values, kv_cache.scales) if isinstance(kv_cache, Int8KVCache) else (kv_cache, None)
        return self.stack.forward(x, cos, sin, values, scales, slot_mapping, group.block_tables, group.seq_lens)


def build(model: nn.Module) -> CpuDecodeStep | None:
    """The model's decode step in one call, or None where some piece of it has no C++ form here."""
    cfg, decoder = model.config, model.model
    weight = decoder.embed_tokens.weight
    if any(kernels.op(name) is None for name in LAYER_OPS):
        return None
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or cfg.head_dim % 16:
        return None
    stack_class, linear_class = kernels.cpu_class("DecodeStack"), kernels.cpu_class("Linear")
    norms = [
        decoder.norm,
        *(n for layer in decoder.layers for n in (layer.input_layernorm, layer.post_attention_layernorm)),
    ]
    if any(norm.weight.dtype != torch.float32 for norm in norms):
        return None

    def linear(module: nn.Module) -> torch.ScriptObject | None:
        held = linear_class()
        runs = module.runs if isinstance(module, StackedLinear) else [module]
        for run in runs:
            bias = None if run.bias is None else run.bias.float()
            if isinstance(run, Int4KernelLinear):
                held.add_run("int4", [run.packed, run.scales, run.lows, run.steps], run.group_size, bias)
            elif isinstance(run, Int6KernelLinear):
                held.add_run("int6", [run.packed, run.high, run.scales, run.d], 0, bias)
            elif type(run) is nn.Linear and run.weight.dtype == torch.float32:
                held.add_run("float", [run.weight], 0, bias)
            else:  # int8, or int4 on PyTorch's path
                return None
        if isinstance(module, StackedLinear) and module.bias is not None:
            held.set_bias(module.bias.float())
        return held

    attention = decoder.layers[0].self_attn
    stack = stack_class(
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
        decoder.norm.eps,
        attention.scale,
        decoder.norm.weight,
    )
    for layer in decoder.layers:
        attn, mlp = layer.self_attn, layer.mlp
        linears = [linear(m) for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)]
        if any(held is None for held in linears):
            return None
        qkv, o, gate_up, down = linears
        stack.add_layer(layer.input_layernorm.weight, qkv, o, layer.post_attention_layernorm.weight, gate_up, down)
    return CpuDecodeStep(stack)


def runs_on(kv_cache: torch.Tensor | Int8KVCache) -> bool:
    """Whether the C++ step can read and write this cache."""
    return isinstance(kv_cache, Int8KVCache) or kv_cache.dtype in CACHE_DTYPES
