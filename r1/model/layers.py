"""The small building blocks of the Qwen2 decoder: RMSNorm, rotary embedding, SwiGLU MLP.

Each matches HF transformers' Qwen2 numerics (the parity tests hold us to 1e-4 in fp32). Norms,
rotations and SwiGLU's silu(gate) * up run on r1's kernels, one call each where PyTorch takes 2-8
ops: on a CPU in float32, its C++ ones (r1/kernels/layer_ops.cpp); on a GPU with gpu_layer_ops on,
its Triton ones (r1/kernels/gpu_layer_ops.py); elsewhere, in PyTorch.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from r1 import kernels


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(normed, sum) for (N, hidden) x: sum = x + residual (x without one), normed its RMSNorm.

        The residual stream's add comes into the norm that follows it, as in vLLM, so that both
        are one pass.
        """
        fused = kernels.op_for("add_rms_norm", x) if self.weight.dtype == x.dtype else None
        if fused is not None:
            return fused(x, residual, self.weight, self.eps)
        if residual is not None:
            x = x + residual
        # Normalize in fp32 whatever the weight dtype, as HF does, then scale in the model dtype.
        return self.weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype), x


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos and sin of each position's rotation angles: two (N, head_dim // 2) tensors."""
    inv_freq = _inverse_frequencies(head_dim, theta, positions.device)
    angles = positions.float()[:, None] * inv_freq[None, :]  # (N, head_dim/2), fp32 as HF
    return angles.cos().to(dtype), angles.sin().to(dtype)


@functools.cache
def _inverse_frequencies(head_dim: int, theta: float, device: torch.device) -> torch.Tensor:
    """The rotation's frequencies (head_dim // 2,) in float32, computed once: on a GPU each step
    would otherwise spend four kernels on them."""
    with torch.inference_mode(False):  # usable by any later call, in inference mode or not
        exponents = torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim
        return 1.0 / (theta**exponents)


def apply_rotary_(x: torch.Tensor, heads: int, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate the first `heads` heads of x (N, all heads, head_dim) in place, by the half-split
    (NeoX) convention that Qwen2 uses."""
    fused = kernels.op_for("rotary_", x)
    if fused is not None:
        return fused(x, heads, cos, sin)
    half = x.shape[-1] // 2
    x1, x2 = x[:, :heads, :half], x[:, :heads, half:]
    cos, sin = cos[:, None, :], sin[:, None, :]  # broadcast over heads
    x[:, :heads] = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), with gate and up stacked in one linear (gate's rows first)."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        fused = kernels.op_for("silu_mul", gate_up) if gate_up.dim() == 2 else None
        if fused is not None:
            return self.down_proj(fused(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        # In place on silu's fresh output: one (tokens, intermediate) buffer, not two; at a
        # 512-token chunk on CPU that halves this line's time (3.8 -> 2.0 ms a layer).
        return self.down_proj(F.silu(gate).mul_(up))
