"""Weight-only quantization of the linear layers: int8 per output channel, int4 group-wise.

Owns the quantized linear modules and which of the model's linears become one. Weights are
quantized one tensor at a time as the loader streams them in, so the float model never exists in
full. int8 and the portable int4 run on PyTorch's packed CPU kernels (`_weight_int8pack_mm`,
`_weight_int4pack_mm_for_cpu`), which want bf16 activations. On a CPU with AVX-512 VNNI or
AVX2, int4 runs on r1's own kernel (r1/kernels/), which quantizes the activations to int8 per
group as llama.cpp does: a decode step then reads the weights at the memory bus's speed and
prefill runs 3-8x faster. Elsewhere int4 runs on the portable kernel. On a GPU int8 runs on
`_weight_int8pack_mm`'s CUDA kernel (PyTorch's reference one: a thread per output, so perhaps
slower than bf16; bench/gpu.py measures it) and int4 on `_weight_int4pack_mm` (Int4CudaLinear).

int4 is asymmetric with a scale and a low per group of 32 weights, each an 8-bit multiple of one
of its row's two float steps: 4.5 bits a weight, as GGUF's Q4_K (6-bit ones under a float pair
per 256 weights). The lm_head, the largest matrix and 15% of a decode step's bytes, is quantized
like the rest: int4 there costs 3% perplexity on the 1.5B stand-in and buys 15% decode speed.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from r1 import kernels
from r1.options import QUANT_MODES

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

    def linear(self, x2: torch.Tensor) -> torch.Tensor:
        """(rows, in) -> (rows, out) with the bias added, in whatever float dtype the kernel takes and gives."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:  # the model's (tokens, features), ~110 calls a decode step: no reshapes
            return self.linear(x).to(x.dtype)
        y = self.linear(x.reshape(-1, self.in_features))
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def _add_bias(self, y: torch.Tensor) -> torch.Tensor:
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

    def linear(self, x2: torch.Tensor) -> torch.Tensor:
        x2 = x2.to(torch.bfloat16)
        if x2.shape[0] <= PACKED_KERNEL_MAX_ROWS:
            return self._add_bias(torch._weight_int8pack_mm(x2, self.qweight, self.scales))
        return self._add_bias(x2 @ (self.qweight.to(torch.bfloat16) * self.scales[:, None]).T)


def int4_groups(weight: torch.Tensor, group_size: int):
    """Asymmetric int4 per group as r1 stores it: levels (out, in) uint8 in 0..15, scales and lows
    (out, in / group) uint8 and int8, and steps (2, out) float32, such that
    w ~ steps[0] * scale * level + steps[1] * low within each group: 4.5 bits a weight.

    r1's `int4_quantize` kernel, where it runs, fits each group's grid by least squares
    (r1/kernels/int4_quantize.cpp says how and what it gains); elsewhere the grid spans the
    group's min..max. Either way each row's scales and lows are then rounded to 8-bit multiples
    of its steps (its largest scale / 255, its largest |low| / 127), and each weight takes the
    level nearest it on that stored grid.
    """
    w = weight.float().contiguous()
    op = kernels.op_for("int4_quantize", w)
    if op is not None:
        return op(w, group_size)
    n, k = w.shape
    groups = w.reshape(n, k // group_size, group_size)
    low, high = torch.aminmax(groups, dim=-1)
    scale = ((high - low) / 15).clamp_(min=1e-12)
    steps = torch.stack([scale.amax(1) / 255, low.abs().amax(1).clamp_(min=1e-12) / 127])
    scales = (scale / steps[0, :, None]).round_().clamp_(1, 255).to(torch.uint8)
    lows = (low / steps[1, :, None]).round_().clamp_(-127, 127).to(torch.int8)
    scale, low = int4_grid(scales, lows, steps)
    # In place, one float temporary: this runs over every weight at load (1.8x the separate ops).
    levels = (groups - low[..., None]).div_(scale[..., None]).round_().clamp_(0, 15).to(torch.uint8)
    return levels.reshape(n, k), scales, lows, steps


def int4_grid(scales: torch.Tensor, lows: torch.Tensor, steps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each group's float scale and low, (out, in / group), from what int4_groups stores."""
    return scales * steps[0, :, None], lows * steps[1, :, None]


def int4_nbytes(out_features: int, in_features: int, device: str = "cpu") -> int:
    """The bytes of one int4 weight as r1 holds it on `device`: levels two to a byte, then on the
    CPU (r1's kernel, Int4KernelLinear) an 8-bit scale and low per group and two float32 steps
    per row; on CUDA (Int4CudaLinear) a bf16 scale and zero per group, 11% more in all.
    PyTorch's portable CPU kernel, the fallback where r1's cannot run, holds CUDA's layout."""
    groups = out_features * -(-in_features // INT4_GROUP_SIZE)
    if device == "cuda":
        return out_features * in_features // 2 + 4 * groups
    return out_features * in_features // 2 + 2 * groups + 8 * out_features


class _PyTorchInt4Linear(QuantizedLinear):
    """r1's int4 groups on one of PyTorch's int4 kernels: they take each group's grid as bf16
    (in / group, out, 2) scales and zeros and compute w = (q - 8) * scale + zero; each kernel
    packs the levels its own way (_pack)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int = INT4_GROUP_SIZE):
        if in_features % group_size:
            raise ValueError(f"int4 needs in_features ({in_features}) divisible by the group size ({group_size})")
        super().__init__(in_features, out_features, bias)
        self.group_size = group_size
        self.register_buffer("packed", torch.empty(0, dtype=torch.uint8), persistent=False)
        self.register_buffer("scales_and_zeros", torch.empty(0, dtype=torch.bfloat16), persistent=False)

    def set_weight(self, weight: torch.Tensor) -> None:
        q, scales, lows, steps = int4_groups(weight, self.group_size)
        scale, low = int4_grid(scales, lows, steps)
        self.packed = self._pack(q)
        self.scales_and_zeros = (
            torch.stack([scale, low + 8 * scale], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
        )

    def _pack(self, levels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Int4Linear(_PyTorchInt4Linear):
    """Group-wise asymmetric int4 on PyTorch's portable CPU kernel."""

    def _pack(self, levels: torch.Tensor) -> torch.Tensor:
        return torch._convert_weight_to_int4pack_for_cpu(levels.to(torch.int32), 1)

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

    def linear(self, x2: torch.Tensor) -> torch.Tensor:
        x2 = x2.to(torch.bfloat16)
        if x2.shape[0] > PACKED_KERNEL_MAX_ROWS and self.out_features % 64 == 0 and _kernel_layout_is_known():
            return self._add_bias(x2 @ self.dequantized_t())  # prefill: one bf16 GEMM is ~2x the packed kernel
        return self._add_bias(
            torch._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size, self.scales_and_zeros)
        )


@functools.cache
def _kernel_layout_is_known() -> bool:
    """Whether this torch packs int4 the way dequantized_t reads it (checked once on a sample)."""
    levels = torch.randint(0, 16, (128, 64), generator=torch.Generator().manual_seed(0)).float()
    levels[:, ::INT4_GROUP_SIZE], levels[:, 1::INT4_GROUP_SIZE] = 0, 15  # each group spans all 16 levels: exact
    probe = Int4Linear(64, 128, bias=False)
    probe.set_weight(levels)
    return torch.equal(probe.dequantized_t().float().T, levels)


class Int4KernelLinear(QuantizedLinear):
    """The same int4 groups on r1's kernel, AVX-512 VNNI or AVX2 (r1/kernels/int4_matmul.cpp,
    which describes the layout): w = steps[0] * scale * level + steps[1] * low, activations
    quantized to int8 per group."""

    TILE_ROWS = 16  # output rows per tile, one vector lane each

    def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int = INT4_GROUP_SIZE):
        if in_features % group_size or out_features % self.TILE_ROWS:
            raise ValueError(
                f"int4 needs in_features ({in_features}) divisible by {group_size} and "
                f"out_features ({out_features}) by {self.TILE_ROWS}"
            )
        super().__init__(in_features, out_features, bias)
        self.group_size = group_size
        self.register_buffer("packed", torch.empty(0, dtype=torch.uint8), persistent=False)
        self.register_buffer("scales", torch.empty(0, dtype=torch.uint8), persistent=False)
        self.register_buffer("lows", torch.empty(0, dtype=torch.int8), persistent=False)
        self.register_buffer("steps", torch.empty(0), persistent=False)

    def set_weight(self, weight: torch.Tensor) -> None:
        n, k, t = self.out_features, self.in_features, self.TILE_ROWS
        levels, scales, lows, self.steps = int4_groups(weight, self.group_size)
        # (tiles, row, k/8, half, j) -> (tiles, k/8, row, j, half): byte 4 * row + j of each 64-byte
        # chunk holds input k + j in its low nibble and k + 4 + j in its high one.
        q = levels.view(n // t, t, k // 8, 2, 4).permute(0, 2, 1, 4, 3)
        self.packed = (q[..., 0] | q[..., 1] << 4).reshape(n // t, k // 8, 64).contiguous()

        def per_tile(x):  # (out, groups) -> (tiles, groups, 16)
            return x.view(n // t, t, -1).transpose(1, 2).contiguous()

        self.scales, self.lows = per_tile(scales), per_tile(lows)

    def linear(self, x2: torch.Tensor) -> torch.Tensor:
        bias = self.bias
        if bias is not None and bias.dtype != torch.float32:
            bias = bias.float()
        return kernels.op("int4_matmul")(
            x2.float().contiguous(), self.packed, self.scales, self.lows, self.steps, self.group_size, bias
        )


class Int4CudaLinear(_PyTorchInt4Linear):
    """The same int4 groups on PyTorch's CUDA kernel (tinygemm, bf16 tensor cores; gpt-fast's
    int4), packed for the GPU. Its scales and zeros are bf16, 2 bytes a group of 32 more than r1's
    8-bit ones on the CPU (int4_nbytes plans both)."""

    INNER_K_TILES = 8  # the packing's k tiles: in_features must be a multiple of 8 * 16

    def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int = INT4_GROUP_SIZE):
        tile = self.INNER_K_TILES * 16
        if in_features % tile or out_features % 8:
            raise ValueError(
                f"int4 on CUDA needs in_features ({in_features}) divisible by {tile} and "
                f"out_features ({out_features}) by 8"
            )
        super().__init__(in_features, out_features, bias, group_size)

    def _pack(self, levels: torch.Tensor) -> torch.Tensor:
        return _pack_for_cuda(levels, self.INNER_K_TILES, _cuda_nibble_order(levels.device))

    def linear(self, x2: torch.Tensor) -> torch.Tensor:
        return self._add_bias(
            torch._weight_int4pack_mm(
                x2.to(torch.bfloat16).contiguous(), self.packed, self.group_size, self.scales_and_zeros
            )
        )


def _pack_for_cuda(levels: torch.Tensor, inner_k_tiles: int, high_first: bool) -> torch.Tensor:
    """Levels (out, in) in 0..15, two to a byte, then in the CUDA kernel's tiles."""
    first, second = levels[:, ::2].to(torch.uint8), levels[:, 1::2].to(torch.uint8)
    pairs = first << 4 | second if high_first else second << 4 | first
    return torch._convert_weight_to_int4pack(pairs.contiguous(), inner_k_tiles)


@functools.cache
def _cuda_nibble_order(device: torch.device) -> bool:
    """Whether this torch's CUDA packing reads a byte's high nibble as the earlier weight (as
    torchao packs for it) or its low one: found once by multiplying a known weight by the
    identity, since its documentation says neither."""
    k, n, g = 128, 16, INT4_GROUP_SIZE
    levels = torch.randint(0, 16, (n, k), generator=torch.Generator().manual_seed(0)).to(device)
    identity = torch.eye(k, dtype=torch.bfloat16, device=device)
    ones = torch.stack([torch.ones(k // g, n), torch.full((k // g, n), 8.0)], -1).to(device, torch.bfloat16)
    for high_first in (True, False):  # scale 1, zero 8: (q - 8) * 1 + 8 = q
        packed = _pack_for_cuda(levels, Int4CudaLinear.INNER_K_TILES, high_first)
        product = torch._weight_int4pack_mm(identity, packed, g, ones)
        if torch.equal(product.T.float(), levels.float()):
            return high_first
    raise RuntimeError(
        "this torch's CUDA int4 kernel packs its weights in a layout r1 does not know; use --quant int8 or --quant none"
    )


def int4_linear_class() -> type[QuantizedLinear]:
    """The fastest int4 linear this machine's CPU can run."""
    return Int4KernelLinear if kernels.op("int4_matmul") is not None else Int4Linear


def quantize_linears(model: nn.Module, mode: str, device: torch.device) -> None:
    """Swap the decoder's linears (and the lm_head) for empty quantized ones, before loading."""
    if mode not in QUANT_MODES:
        raise ValueError(f"unknown quantization {mode!r}; expected one of {', '.join(QUANT_MODES)}")
    if mode == "none":
        return
    if device.type not in ("cpu", "cuda"):
        raise ValueError(
            f"--quant {mode} runs on PyTorch's packed CPU and CUDA kernels; on {device.type} use --quant none"
        )
    if mode == "int8":
        cls = Int8Linear  # PyTorch's _weight_int8pack_mm has a CUDA kernel too
    else:
        cls = Int4CudaLinear if device.type == "cuda" else int4_linear_class()
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        with torch.device("cpu"):
            replacement = cls(module.in_features, module.out_features, module.bias is not None)
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, leaf, replacement)
