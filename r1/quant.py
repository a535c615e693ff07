"""Weight-only quantization of the linear layers: int8 per output channel, int4 group-wise.

Owns the quantized linear modules and which of the model's linears become one. Weights are
quantized one tensor at a time as the loader streams them in, so the float model never exists in
full. Activations stay in the model's dtype; the matmuls run on PyTorch's packed CPU kernels
(`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`), which want bf16 activations.

int4 is asymmetric with one scale and one offset per group of 32 weights: the layout of GGUF's
Q4_K sub-blocks, so a Q4_K weight whose group spans all 16 levels round-trips exactly. The
lm_head, the largest matrix, is int8 in both modes: it decides every token, and int8 keeps it
close to the float head at half the bytes of bf16.
"""

from __future__ import annotations

import torch
from torch import nn

QUANT_MODES = ("none", "int8", "int4")
INT4_GROUP_SIZE = 32
# Above this many rows (a prefill chunk) dequantizing to bf16 and one GEMM beats the int8 packed
# kernel, which is written for the few rows of a decode step.
PACKED_KERNEL_MAX_ROWS = 32


class Int8Linear(nn.Module):
    """y = x @ (q * scale).T + bias, with q int8 (out, in) and one scale per output row."""

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.empty(0, dtype=torch.int8), persistent=False)
        self.register_buffer("scales", torch.empty(0, dtype=torch.bfloat16), persistent=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def set_weight(self, weight: torch.Tensor) -> None:
        w = weight.float()
        scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
        self.qweight = (w / scales[:, None]).round().clamp(-127, 127).to(torch.int8)
        self.scales = scales.to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)
        if x2.shape[0] <= PACKED_KERNEL_MAX_ROWS:
            y = torch._weight_int8pack_mm(x2, self.qweight, self.scales)
        else:
            y = x2 @ (self.qweight.to(torch.bfloat16) * self.scales[:, None]).T
        y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


class Int4Linear(nn.Module):
    """Group-wise asymmetric int4: w = (q - 8) * scale + zero per group of `group_size` inputs."""

    def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int = INT4_GROUP_SIZE):
        super().__init__()
        if in_features % group_size:
            raise ValueError(f"int4 needs in_features ({in_features}) divisible by the group size ({group_size})")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("packed", torch.empty(0, dtype=torch.uint8), persistent=False)
        self.register_buffer("scales_and_zeros", torch.empty(0, dtype=torch.bfloat16), persistent=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def set_weight(self, weight: torch.Tensor) -> None:
        n, k, g = self.out_features, self.in_features, self.group_size
        groups = weight.float().reshape(n, k // g, g)
        lo, hi = groups.amin(-1), groups.amax(-1)
        scale = ((hi - lo) / 15).clamp(min=1e-12)
        q = ((groups - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.int32).reshape(n, k)
        zero = lo + 8 * scale  # the kernel computes (q - 8) * scale + zero
        self.packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
        self.scales_and_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)
        y = torch._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size, self.scales_and_zeros)
        y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


QuantizedLinear = (Int8Linear, Int4Linear)


def quantize_linears(model: nn.Module, mode: str, device: torch.device) -> None:
    """Swap the decoder's linears (and the lm_head) for empty quantized ones, before loading."""
    if mode not in QUANT_MODES:
        raise ValueError(f"unknown quantization {mode!r}; expected one of {', '.join(QUANT_MODES)}")
    if mode == "none":
        return
    if device.type != "cpu":
        raise ValueError(f"--quant {mode} runs on the CPU's packed kernels; on {device.type} use --quant none")
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        use_int4 = mode == "int4" and name != "lm_head"
        cls = Int4Linear if use_int4 else Int8Linear
        with torch.device("cpu"):
            replacement = cls(module.in_features, module.out_features, module.bias is not None)
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, leaf, replacement)
