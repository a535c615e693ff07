"""The Qwen2 decoder (DeepSeek-R1-Distill-Qwen-1.5B's architecture), read top to bottom.

Owns the module tree (with HF parameter names, so checkpoints load by name) and one forward over
a flat batch of new tokens with their positions, a paged KV cache and its metadata. It does not
own loading (loaders/), sampling (sampling.py) or which tokens run together (the engine).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from r1.config import ModelConfig
from r1.model import cpu_decode
from r1.model.attention import AttentionMetadata, paged_attention, write_rotated_kv
from r1.model.layers import RMSNorm, SwiGLU, rotary_cos_sin


def fused_linears(cfg: ModelConfig) -> dict[str, tuple[tuple[str, int], ...]]:
    """The linears the model fuses, each with the checkpoint linears it stacks and their rows.

    Checkpoints store q, k, v and gate, up as separate linears of the same input; one matmul
    for each group reads the input once and halves the calls of a decode step.
    """
    return {
        "qkv_proj": (("q_proj", cfg.q_size), ("k_proj", cfg.kv_size), ("v_proj", cfg.kv_size)),
        "gate_up_proj": (("gate_proj", cfg.intermediate_size), ("up_proj", cfg.intermediate_size)),
    }


class Qwen2Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        )
        self.qkv_proj = nn.Linear(cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size, bias=True)
        self.o_proj = nn.Linear(cfg.q_size, cfg.hidden_size, bias=False)
        self.scale = self.head_dim**-0.5

    def forward(self, x, cos, sin, layer_cache, meta: AttentionMetadata):
        n, h, kv = x.shape[0], self.num_heads, self.num_kv_heads
        heads = self.qkv_proj(x).view(n, h + 2 * kv, self.head_dim)  # query, key, value heads
        write_rotated_kv(heads, h, cos, sin, layer_cache, meta.slot_mapping)
        o = paged_attention(heads[:, :h], layer_cache, meta, self.scale)  # (N, heads, head_dim)
        return self.o_proj(o.reshape(n, self.num_heads * self.head_dim))


class Qwen2DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Qwen2Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, residual, cos, sin, layer_cache, meta):
        """(output, residual): this layer's output is added to the residual stream by the next
        norm (the next layer's, or the model's last), which takes both."""
        h, residual = self.input_layernorm(x, residual)
        h, residual = self.post_attention_layernorm(self.self_attn(h, cos, sin, layer_cache, meta), residual)
        return self.mlp(h), residual


class Qwen2Model(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Qwen2DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Qwen2ForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Qwen2Model(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        # Decode and verification steps on the CPU in one C++ call where they can (cpu_decode.py);
        # False runs the Python layers always (the tests compare the two).
        self.cpu_decode = True

    @functools.cached_property
    def cpu_decode_step(self) -> cpu_decode.CpuDecodeStep | None:
        """The decode step in one C++ call, built at its first use; None where it cannot run."""
        return cpu_decode.build(self)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """Hidden states (N, hidden) of N new tokens; input_ids and positions are (N,).

        kv_cache is (num_layers, 2, num_blocks, block_size, kv_heads, head_dim); the new tokens'
        keys and values are written into it.
        """
        x, residual = self.model.embed_tokens(input_ids), None  # (N, hidden)
        cos, sin = rotary_cos_sin(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        if self.cpu_decode and x.device.type == "cpu" and cpu_decode.runs_on(kv_cache):
            queries = meta.token_queries(kv_cache.shape[3])
            step = self.cpu_decode_step if queries is not None and queries.rows is None else None
            if step is not None:
                return step(x, cos, sin, kv_cache, meta.slot_mapping, queries)
        for i, layer in enumerate(self.model.layers):
            x, residual = layer(x, residual, cos, sin, kv_cache[i], meta)
        return self.model.norm(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits (M, vocab) for the rows of hidden that need them."""
        return self.lm_head(hidden).float()
