"""Weight-only quantization of the linear layers: int8 per output channel, int4 group-wise.

Owns the quantized linear modules and which of the model's linears become one. Weights are
quantized one tensor at a time as the loader streams them in, so the float model never exists in
full. Activations stay in the model's dtype; the matmuls run on PyTorch's packed CPU kernels
(`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`), which want bf16 activations.

int4 is asymmetric with one scale and one offset per group of 32 weights: the layout of GGUF's
Q4_K sub-blocks, so a Q4_K weight whose group spans all 16 levels round-trips exactly. The
lm_head, the largest matrix and 20% of a decode step's bytes, is quantized like the rest: int4
there costs 3% perplexity on the 1.5B stand-in and buys 15% decode speed.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

QUANT_MODES = ("none", "int8", "int4")
INT4_GROUP_SIZE = 32
# Above this many rows (a prefill chunk) dequantizing to bf16 and one GEMM beats the packed
# kernels, which are written for the few rows of a decode step.
PACKED_KERNEL_MAX_ROWS = 32


class QuantizedLinear(nn.Module):
    """A linear whose weight is set once (quantized) and multiplied in bf16 on packed kernels."""

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def set_weight(self, weight: torch.Tensor) -> None:
        raise NotImplementedError

    def matmul(self, x2: torch.Tensor) -> torch.Tensor:
        """(rows, in) bf16 -> (rows, out) bf16."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.matmul(x.reshape(-1, self.in_features).to(torch.bfloat16))
        y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


class Int8Linear(QuantizedLinear):
    """y = x @ (q * scale).T + bias, with q int8 (out, in) and one scale per output row."""

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__(in_features, out_features, bias)
        self.register_buffer("qweight", torch.empty(0, dtype=torch.int8), persistent=False)
        self.register_buffer("scales", torch.empty(0, dtype=torch.bfloat16), persistent=False)

    def set_weight(self, weight: torch.Tensor) -> None:
        w = weight.float()
        scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
        self.qweight = (w / scales[:, None]).round().clamp(-127, 127).to(torch.int8)
        self.scales = scales.to(torch.bfloat16)

    def matmul(self, x2: torch.Tensor) -> torch.Tensor:
        if x2.shape[0] <= PACKED_KERNEL_MAX_ROWS:
            return torch._weight_int8pack_mm(x2, self.qweight, self.scales)
        return x2 @ (self.qweight.to(torch.bfloat16) * self.scales[:, None]).T


class Int4Linear(QuantizedLinear):
    """Group-wise asymmetric int4: w = (q - 8) * scale + zero per group of `group_size` inputs."""

    def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int = INT4_GROUP_SIZE):
        if in_features % group_size:
            raise ValueError(f"int4 needs in_features ({in_features}) divisible by the group size ({group_size})")
        super().__init__(in_features, out_features, bias)
        self.group_size = group_size
        self.register_buffer("packed", torch.empty(0, dtype=torch.uint8), persistent=False)
        self.register_buffer("scales_and_zeros", torch.empty(0, dtype=torch.bfloat16), persistent=False)

    def set_weight(self, weight: torch.Tensor) -> None:
        n, k, g = self.out_features, self.in_features, self.group_size
        groups = weight.float().reshape(n, k // g, g)
        lo, hi = groups.amin(-1), groups.amax(-1)
        scale = ((hi - lo) / 15).clamp(min=1e-12)
        q = ((groups - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.int32).reshape(n, k)
        zero = lo + 8 * scale  # the kernel computes (q - 8) * scale + zero
        self.packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
        self.scales_and_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)

    def dequantized_t(self) -> torch.Tensor:
        """The bf16 weight, transposed (in, out), unpacked from the kernel's layout.

        The CPU kernel stores rows in blocks of 64: byte j of (block, k) holds row j in its low
        nibble and row j + 32 in its high one. Writing straight into (in, out) order lets the
        group scales broadcast along contiguous rows and feeds the GEMM without another copy.
        """
        n, k, g = self.out_features, self.in_features, self.group_size
        packed = self.packed.view(n // 64, k, 32).permute(1, 0, 2)  # (in, out/64, 32)
        wt = torch.empty(k, n // 64, 64, dtype=torch.bfloat16, device=self.packed.device)
        wt[..., :32].copy_(packed & 15)
        wt[..., 32:].copy_(packed >> 4)
        wt = wt.view(k // g, g, n)
        scale, zero = self.scales_and_zeros[..., 0], self.scales_and_zeros[..., 1]  # (in/g, out)
        wt.sub_(8).mul_(scale[:, None, :]).add_(zero[:, None, :])
        return wt.view(k, n)

    def matmul(self, x2: torch.Tensor) -> torch.Tensor:
        if x2.shape[0] > PACKED_KERNEL_MAX_ROWS and self.out_features % 64 == 0 and _kernel_layout_is_known():
            return x2 @ self.dequantized_t()  # prefill: one bf16 GEMM runs ~2x faster than the packed kernel
        return torch._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size, self.scales_and_zeros)


@functools.cache
def _kernel_layout_is_known() -> bool:
    """Whether this torch packs int4 the way dequantized_t reads it (checked once on a sample)."""
    levels = torch.randint(0, 16, (128, 64), generator=torch.Generator().manual_seed(0)).float()
    levels[:, ::INT4_GROUP_SIZE], levels[:, 1::INT4_GROUP_SIZE] = 0, 15  # each group spans all 16 levels: exact
    probe = Int4Linear(64, 128, bias=False)
    probe.set_weight(levels)
    return torch.equal(probe.dequantized_t().float().T, levels)


def quantize_linears(model: nn.Module, mode: str, device: torch.device) -> None:
    """Swap the decoder's linears (and the lm_head) for empty quantized ones, before loading."""
    if mode not in QUANT_MODES:
        raise ValueError(f"unknown quantization {mode!r}; expected one of {', '.join(QUANT_MODES)}")
    if mode == "none":
        return
    if device.type != "cpu":
        raise ValueError(f"--quant {mode} runs on the CPU's packed kernels; on {device.type} use --quant none")
    cls = Int4Linear if mode == "int4" else Int8Linear
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        with torch.device("cpu"):
            replacement = cls(module.in_features, module.out_features, module.bias is not None)
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, leaf, replacement)
