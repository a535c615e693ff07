"""Weight-only quantization of the linears: int8 per output channel, int4 group-wise, int6.

Owns the quantized linear modules and which of the model's linears become which (linear_plan).
Weights are quantized one tensor at a time as the loader streams them in, so the float model never
exists in full; GGUF tensors whose blocks a kernel holds as they are (Q4_K, Q6_K) are repacked
rather than dequantized and quantized again. int8 and the portable int4 run on PyTorch's packed
CPU kernels (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`), which want bf16 activations.
On a CPU with AVX-512 VNNI or AVX2, int4 and int6 run on r1's own kernels (r1/kernels/), which
quantize the activations to int8 per group as llama.cpp does: a decode step then reads the
weights at the memory bus's speed and prefill runs 3-8x faster. Elsewhere int4 runs on the
portable kernel and int6 takes int8. On a GPU int8 runs on `_weight_int8pack_mm`'s CUDA kernel
(PyTorch's reference one: a thread per output, so perhaps slower than bf16; bench/gpu.py
measures it) and int4 on `_weight_int4pack_mm` (Int4CudaLinear).

int4 is asymmetric with a scale and a low per group of 32 weights, each an 8-bit multiple of one
of two float steps its row holds for a span of inputs: 4.5 bits a weight and the steps. r1's
quantizer takes one pair a row; a GGUF Q4_K tensor keeps its own, a float16 pair per 256 weights
(Q4_K's d and dmin, under which its 6-bit scales and mins are the 8-bit codes as they are), so it
repacks without a second rounding for 0.125 bits a weight more. int6 is Q6_K's structure:
6.5625 bits. `--quant int4` keeps at int6 what a Q4_K_M file keeps above 4.5 bits (the output
head, half of attn_v and ffn_down; what each choice costs is in docs/quantization.md), following
the file's own types or, for float weights, llama.cpp's recipe; `--quant int4-pure` is int4
throughout.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from r1 import kernels
from r1.options import QUANT_MODES

INT4_GROUP_SIZE = 32
INT6_GROUP_SIZE, INT6_BLOCK = 16, 256  # Q6_K's: a scale per 16 weights, a d per 256
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

    def set_parts(self, parts: list, device: torch.device) -> None:
        """The checkpoint tensors this linear stacks (one, or q, k, v or gate, up), each a float
        tensor or a GGUF tensor's blocks; a kernel that holds a GGUF type as it is repacks it.
        Floats are quantized on `device`, where the layer runs."""
        self.set_weight(torch.cat([as_float(p).to(device) for p in parts]))

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
    (out, in / group) uint8 and int8, and steps (2, out, 1) float32, such that
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
        levels, scales, lows, steps = op(w, group_size)
        return levels, scales, lows, steps[..., None]
    n, k = w.shape
    groups = w.reshape(n, k // group_size, group_size)
    low, high = torch.aminmax(groups, dim=-1)
    scale = ((high - low) / 15).clamp_(min=1e-12)
    steps = torch.stack([scale.amax(1) / 255, low.abs().amax(1).clamp_(min=1e-12) / 127])[..., None]
    scales = (scale / steps[0]).round_().clamp_(1, 255).to(torch.uint8)
    lows = (low / steps[1]).round_().clamp_(-127, 127).to(torch.int8)
    scale, low = int4_grid(scales, lows, steps)
    # In place, one float temporary: this runs over every weight at load (1.8x the separate ops).
    levels = (groups - low[..., None]).div_(scale[..., None]).round_().clamp_(0, 15).to(torch.uint8)
    return levels.reshape(n, k), scales, lows, steps


def int4_grid(scales: torch.Tensor, lows: torch.Tensor, steps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each group's float scale and low, (out, in / group), from what int4_groups stores: steps
    (2, out, spans), each span's pair serving its share of the row's groups."""
    step = steps.float().repeat_interleave(scales.shape[1] // steps.shape[2], dim=2)
    return scales * step[0], lows * step[1]


def int4_from_q4_k(fields: tuple[torch.Tensor, ...], out_features: int):
    """GGUF Q4_K blocks (their fields: r1.loaders.gguf.q4_k_fields) as int4_groups' (levels,
    scales, lows, steps), the same numbers: Q4_K's sub-blocks are r1's groups of 32, its 6-bit
    scales and mins r1's 8-bit scales and (negated) lows, and its float16 d and dmin the steps of
    each span of 256 weights."""
    d, dmin, scales, mins, levels = fields
    n = out_features
    steps = torch.stack([d.view(n, -1), dmin.view(n, -1)]).to(torch.float16)
    return levels.reshape(n, -1), scales.view(n, -1), (-mins.view(n, -1).to(torch.int16)).to(torch.int8), steps


def int6_groups(weight: torch.Tensor, group: int = INT6_GROUP_SIZE, rows_per_chunk: int = 2048):
    """6-bit in Q6_K's structure, (levels, scales, d): (out, in) uint8 levels 0..63, (out, in / group)
    int8 scales (group 16 as Q6_K, or 32) and (out, ceil(in / 256)) d (float32 values that float16
    holds), such that w ~ d * scale * (level - 32).

    As llama.cpp's Q6_K quantizer: each group maps its largest |w| to level -32 on grids a
    little narrower and wider, fits the scale to each grid's levels by least squares and keeps the
    best; each 256's scales are then rounded to int8 multiples of their d, and the levels taken
    anew on that stored grid.
    """
    w = weight.float()
    n, k = w.shape
    blocks = -(-k // INT6_BLOCK)
    levels = torch.empty(n, k, dtype=torch.uint8)
    per_block = INT6_BLOCK // group
    scales = torch.empty(n, k // group, dtype=torch.int8)
    d = torch.empty(n, blocks)
    for start in range(0, n, rows_per_chunk):  # bounds the temporaries at a few float copies of a chunk
        g = w[start : start + rows_per_chunk].reshape(-1, k // group, group)
        peak = g.gather(-1, g.abs().argmax(-1, keepdim=True))
        safe_peak = torch.where(peak == 0, 1.0, peak)
        best_scale, best_err = torch.zeros_like(peak), torch.full_like(peak, float("inf"))
        for stretch in (-0.6, -0.4, -0.2, 0.0, 0.2, 0.4, 0.6):
            lv = (g * (-(32 + stretch) / safe_peak)).round_().clamp_(-32, 31)
            scale = (g * lv).sum(-1, keepdim=True) / (lv * lv).sum(-1, keepdim=True).clamp_(min=1)
            err = (g - scale * lv).square_().sum(-1, keepdim=True)
            better = err < best_err
            best_scale, best_err = torch.where(better, scale, best_scale), torch.where(better, err, best_err)
        group_scale = best_scale.squeeze(-1)  # (rows, in / group)
        padded = torch.nn.functional.pad(group_scale, (0, blocks * per_block - group_scale.shape[1]))
        by_block = padded.view(-1, blocks, per_block)
        block_d = (by_block.abs().amax(-1) / 127).half().float()  # (rows, blocks), stored in float16
        safe_d = torch.where(block_d == 0, 1.0, block_d)
        q_scale = (by_block / safe_d[..., None]).round_().clamp_(-127, 127)
        q_scale = q_scale.view(-1, blocks * per_block)[:, : group_scale.shape[1]]
        step = (q_scale * safe_d.repeat_interleave(per_block, dim=1)[:, : group_scale.shape[1]])[..., None]
        lv = torch.where(step == 0, 0.0, g / torch.where(step == 0, 1.0, step)).round_().clamp_(-32, 31)
        rows = slice(start, start + g.shape[0])
        levels[rows] = (lv + 32).to(torch.uint8).view(g.shape[0], k)
        scales[rows], d[rows] = q_scale.to(torch.int8), block_d
    return levels, scales, d


def int6_from_q6_k(fields: tuple[torch.Tensor, ...], out_features: int):
    """GGUF Q6_K blocks (their fields: r1.loaders.gguf.q6_k_fields) as int6_groups' (levels,
    scales, d): the same numbers."""
    d, scales, levels = fields
    return levels.reshape(out_features, -1), scales.reshape(out_features, -1), d.view(out_features, -1)


def int6_nbytes(out_features: int, in_features: int, group: int = INT6_GROUP_SIZE) -> int:
    """The bytes of one int6 weight as r1 holds it: 6 bits a weight, an int8 scale per group (16:
    Q6_K's 210 bytes per 256 weights; 32: 202) and a float16 d per 256."""
    return out_features * (in_features * 6 // 8 + in_features // group + 2 * -(-in_features // INT6_BLOCK))


def as_float(tensor) -> torch.Tensor:
    """A checkpoint tensor as floats: GGUF blocks (r1.loaders.gguf.QuantizedBlocks) dequantized."""
    return tensor if isinstance(tensor, torch.Tensor) else tensor.dequantize()


def stored_fields(parts: list, type_name: str) -> tuple[torch.Tensor, ...] | None:
    """When every part is GGUF blocks of type_name, their decoded fields (QuantizedBlocks.fields),
    the parts' rows one after another; else None."""
    if not all(getattr(p, "type_name", None) == type_name for p in parts):
        return None
    fields = [p.fields() for p in parts]
    return tuple(torch.cat(column) for column in zip(*fields))


def _pack_nibbles(levels: torch.Tensor, tile_rows: int) -> torch.Tensor:
    """Levels (out, in) 0..15 in the CPU kernels' tiles: (tiles, row, in/8, half, j) -> (tiles,
    in/8, row, j, half): byte 4 * row + j of each 64-byte chunk holds input k + j in its low
    nibble and k + 4 + j in its high one."""
    n, k = levels.shape
    q = levels.view(n // tile_rows, tile_rows, k // 8, 2, 4).permute(0, 2, 1, 4, 3)
    return (q[..., 0] | q[..., 1] << 4).reshape(n // tile_rows, k // 8, 64).contiguous()


def _per_tile(x: torch.Tensor, tile_rows: int) -> torch.Tensor:
    """(out, groups) -> (tiles, groups, 16): a group's values for a tile's rows side by side."""
    return x.reshape(-1, tile_rows, x.shape[1]).transpose(1, 2).contiguous()


def int4_nbytes(out_features: int, in_features: int, device: str = "cpu", source_type: str | None = None) -> int:
    """The bytes of one int4 weight as r1 holds it on `device`: levels two to a byte, then on the
    CPU (r1's kernel, Int4KernelLinear) an 8-bit scale and low per group and two float32 steps
    per row, or from Q4_K blocks two float16 steps per 256 weights; on CUDA (Int4CudaLinear) a
    bf16 scale and zero per group, 11% more in all. PyTorch's portable CPU kernel, the fallback
    where r1's cannot run, holds CUDA's layout."""
    groups = out_features * -(-in_features // INT4_GROUP_SIZE)
    if device == "cuda":
        return out_features * in_features // 2 + 4 * groups
    steps = 4 * in_features // 256 if source_type == "Q4_K" else 8
    return out_features * in_features // 2 + 2 * groups + steps * out_features


class _Int4Groups(QuantizedLinear):
    """What every int4 linear shares: its weight quantized by int4_groups, or Q4_K blocks taken
    as they are (int4_from_q4_k); each subclass packs the groups for its kernel (set_groups)."""

    group_size: int

    def set_weight(self, weight: torch.Tensor) -> None:
        self.set_groups(*int4_groups(weight, self.group_size))

    def set_parts(self, parts: list, device: torch.device) -> None:
        fields = stored_fields(parts, "Q4_K")
        if fields is None or self.group_size != 32:
            super().set_parts(parts, device)
        else:
            self.set_groups(*(t.to(device) for t in int4_from_q4_k(fields, self.out_features)))

    def set_groups(self, levels: torch.Tensor, scales: torch.Tensor, lows: torch.Tensor, steps: torch.Tensor) -> None:
        raise NotImplementedError


class _PyTorchInt4Linear(_Int4Groups):
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

    def set_groups(self, levels: torch.Tensor, scales: torch.Tensor, lows: torch.Tensor, steps: torch.Tensor) -> None:
        # The grid rounded to bf16 (a Q4_K tensor keeps its levels as they are).
        scale, low = int4_grid(scales, lows, steps)
        self.packed = self._pack(levels)
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


class Int4KernelLinear(_Int4Groups):
    """The same int4 groups on r1's kernel, AVX-512 VNNI or AVX2 (r1/kernels/int4_matmul.cpp,
    which describes the layout): w = steps[0] * scale * level + steps[1] * low, activations
    quantized to int8 per group. Q4_K blocks repack into it as they are."""

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

    def set_groups(self, levels: torch.Tensor, scales: torch.Tensor, lows: torch.Tensor, steps: torch.Tensor) -> None:
        """Pack int4_groups' levels, scales, lows and steps into the kernel's tiles: steps
        (2, out, spans) become (tiles, spans, 2, 16), a tile's pairs side by side."""
        t, spans = self.TILE_ROWS, steps.shape[2]
        self.packed = _pack_nibbles(levels, t)
        self.scales, self.lows = _per_tile(scales, t), _per_tile(lows, t)
        self.steps = steps.view(2, -1, t, spans).permute(1, 3, 0, 2).contiguous()

    def linear(self, x2: torch.Tensor) -> torch.Tensor:
        bias = self.bias
        if bias is not None and bias.dtype != torch.float32:
            bias = bias.float()
        return kernels.op("int4_matmul")(
            x2.float().contiguous(), self.packed, self.scales, self.lows, self.steps, self.group_size, bias
        )


class Int6KernelLinear(QuantizedLinear):
    """6-bit weights in Q6_K's structure on r1's kernel (r1/kernels/int6_matmul.cpp, which
    describes the layout): w = d * scale * (level - 32), levels 0..63, an int8 scale per `group`
    inputs (16, or 32 for what Q4_K_M keeps at 5.5 bits) and a float16 d per 256. `--quant int4`'s
    higher-precision path: Q6_K blocks repack into it as they are; other weights are quantized by
    int6_groups."""

    TILE_ROWS = 16

    def __init__(self, in_features: int, out_features: int, bias: bool, group: int = INT6_GROUP_SIZE):
        if in_features % group or out_features % self.TILE_ROWS:
            raise ValueError(
                f"int6 needs in_features ({in_features}) divisible by {group} and "
                f"out_features ({out_features}) by {self.TILE_ROWS}"
            )
        super().__init__(in_features, out_features, bias)
        self.group = group
        for name, dtype in (
            ("packed", torch.uint8),
            ("high", torch.uint8),
            ("scales", torch.int8),
            ("d", torch.float16),
        ):
            self.register_buffer(name, torch.empty(0, dtype=dtype), persistent=False)

    def set_weight(self, weight: torch.Tensor) -> None:
        self.set_groups(*int6_groups(weight, self.group))

    def set_parts(self, parts: list, device: torch.device) -> None:
        fields = stored_fields(parts, "Q6_K")
        if fields is None or self.group != INT6_GROUP_SIZE:
            super().set_parts(parts, device)
        else:
            self.set_groups(*int6_from_q6_k(fields, self.out_features))

    def set_groups(self, levels: torch.Tensor, scales: torch.Tensor, d: torch.Tensor) -> None:
        n, k, t = self.out_features, self.in_features, self.TILE_ROWS
        self.packed = _pack_nibbles(levels & 15, t)
        # (tiles, row, k/16, part, j) -> (tiles, k/16, row, j, part): byte 4 * row + j of each 64-byte
        # chunk holds the top 2 bits of inputs k + j, k + 4 + j, k + 8 + j, k + 12 + j, low bits first.
        top = (levels >> 4).view(n // t, t, k // 16, 4, 4).permute(0, 2, 1, 4, 3)
        self.high = (top[..., 0] | top[..., 1] << 2 | top[..., 2] << 4 | top[..., 3] << 6).reshape(n // t, k // 16, 64)
        self.scales, self.d = _per_tile(scales, t), _per_tile(d.to(torch.float16), t)

    def linear(self, x2: torch.Tensor) -> torch.Tensor:
        bias = self.bias
        if bias is not None and bias.dtype != torch.float32:
            bias = bias.float()
        return kernels.op("int6_matmul")(x2.float().contiguous(), self.packed, self.high, self.scales, self.d, bias)


class Int6Per32Linear(Int6KernelLinear):
    """int6 with a scale per 32 inputs (6.3125 bits): the format for what Q4_K_M keeps at 5.5
    bits (Q5_0, Q5_1, Q5_K), which a scale per 16 would hold at 1.06 bits a weight more."""

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__(in_features, out_features, bias, group=2 * INT6_GROUP_SIZE)


class StackedLinear(QuantizedLinear):
    """A fused linear (q, k, v or gate, up) whose parts the plan holds in different formats: each
    run of parts of one format is its own linear, and their outputs are joined. A Q4_K_M file
    keeps some layers' v at Q6_K and their q and k at Q4_K."""

    def __init__(self, in_features: int, bias: bool, runs: list[tuple[QuantizedLinear, int]]):
        super().__init__(in_features, sum(m.out_features for m, _ in runs), bias)
        self.runs = nn.ModuleList(m for m, _ in runs)
        self.parts_per_run = [count for _, count in runs]

    def set_parts(self, parts: list, device: torch.device) -> None:
        start = 0
        for module, count in zip(self.runs, self.parts_per_run):
            module.set_parts(parts[start : start + count], device)
            start += count

    def linear(self, x2: torch.Tensor) -> torch.Tensor:
        outs = [m.linear(x2) for m in self.runs]
        dtype = outs[0].dtype if all(o.dtype == outs[0].dtype for o in outs) else torch.float32
        return self._add_bias(torch.cat([o.to(dtype) for o in outs], dim=1))


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


# ---- which linears get which format -------------------------------------------------------------

# GGUF types of more than int4's 4.5 bits a weight: `--quant int4` holds them at 6 bits, as a
# file's author (or llama.cpp's Q4_K_M recipe) chose: a Q4_K_M file's Q6_K head, attn_v and ffn_down
# at int6 (Q6_K's structure, 6.5625 bits), its 5.5-bit types at int6 with a scale per 32 (6.3125).
SIX_BIT_TYPES = frozenset({"Q6_K", "Q8_0"})
FIVE_BIT_TYPES = frozenset({"Q5_0", "Q5_1", "Q5_K"})
FLOAT_TYPES = frozenset({"F32", "F16", "BF16"})


# The llama.cpp name of each checkpoint linear's role, for Q4_K_M's recipe (memory.gguf_preset_type).
_GGUF_ROLES = {
    "q_proj": "attn_q",
    "k_proj": "attn_k",
    "v_proj": "attn_v",
    "o_proj": "attn_output",
    "gate_proj": "ffn_gate",
    "up_proj": "ffn_up",
    "down_proj": "ffn_down",
}


def linear_kind(quant: str, name: str, shape: tuple[int, int], n_layers: int, source_type: str | None = None) -> str:
    """How `--quant quant` stores one checkpoint linear ("model.layers.3.self_attn.v_proj",
    "lm_head") of shape (out, in): none, int8, int4, int6 or int6/32 (a scale per 32), given the
    GGUF type its file stores it in (None: floats).

    int4 holds a linear at 6 bits where its Q4_K_M type has more than 4.5: the file's type, or for
    float weights the type llama.cpp's Q4_K_M recipe would give it (the head and half of attn_v
    and ffn_down at Q6_K; Q5_0 or Q8_0 for rows that are not a multiple of 256, where no k-quant
    fits). Q6_K and Q8_0 go to int6, the 5.5-bit Q5 types to int6/32, the rest to int4. int4-pure
    is int4 everywhere.
    """
    if quant in ("none", "int8"):
        return quant
    if quant == "int4-pure":
        return "int4"
    if source_type is None or source_type in FLOAT_TYPES:
        from r1.memory import gguf_preset_type  # memory imports this module

        layer_role = (
            "output" if name == "lm_head" else f"blk.{name.split('.')[2]}.{_GGUF_ROLES[name.rsplit('.', 1)[-1]]}"
        )
        source_type = gguf_preset_type("q4_k_m", f"{layer_role}.weight", shape, n_layers)
    return "int6" if source_type in SIX_BIT_TYPES else "int6/32" if source_type in FIVE_BIT_TYPES else "int4"


def checkpoint_linears(cfg) -> list[tuple[str, tuple[int, int]]]:
    """Every linear of a checkpoint, as (name, (out, in)), in the model's order."""
    h, q, kv, inter = cfg.hidden_size, cfg.q_size, cfg.kv_size, cfg.intermediate_size
    out = []
    for i in range(cfg.num_hidden_layers):
        attn, mlp = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        out += [(f"{attn}.q_proj", (q, h)), (f"{attn}.k_proj", (kv, h)), (f"{attn}.v_proj", (kv, h))]
        out += [(f"{attn}.o_proj", (h, q)), (f"{mlp}.gate_proj", (inter, h)), (f"{mlp}.up_proj", (inter, h))]
        out.append((f"{mlp}.down_proj", (h, inter)))
    return out + [("lm_head", (cfg.vocab_size, h))]


def stored_type(source_types: dict[str, str], name: str) -> str | None:
    """The GGUF type a checkpoint linear is stored in (a tied head: its embedding's), or None."""
    tied = "model.embed_tokens.weight" if name == "lm_head" else None
    return source_types.get(f"{name}.weight") or source_types.get(tied)


def linear_plan(cfg, quant: str, source_types: dict[str, str] | None = None) -> dict[str, str]:
    """Each checkpoint linear's format under `--quant quant` (linear_kind), given the types a GGUF
    file stores its weights in (hf name -> type; None for float checkpoints). A tied head
    takes its embedding's type."""
    if quant not in QUANT_MODES:
        raise ValueError(f"unknown quantization {quant!r}; expected one of {', '.join(QUANT_MODES)}")
    types = source_types or {}
    plan = {}
    for name, shape in checkpoint_linears(cfg):
        plan[name] = linear_kind(quant, name, shape, cfg.num_hidden_layers, stored_type(types, name))
    return plan


def linear_class(kind: str, device: torch.device) -> type[QuantizedLinear]:
    """The linear that holds a format on a device. int6 (either scale group) runs on r1's CPU
    kernel; without it (on a GPU, or where the kernels cannot run) it takes int8 per output row, the
    nearest format with a kernel there."""
    if kind == "int8":
        return Int8Linear  # PyTorch's _weight_int8pack_mm has a CUDA kernel too
    if kind == "int4":
        return Int4CudaLinear if device.type == "cuda" else int4_linear_class()
    if kind in ("int6", "int6/32"):
        if device.type != "cpu" or kernels.op("int6_matmul") is None:
            return Int8Linear
        return Int6KernelLinear if kind == "int6" else Int6Per32Linear
    raise ValueError(f"no quantized linear for {kind!r}")


def quantize_linears(model: nn.Module, plan: dict[str, str], device: torch.device) -> None:
    """Swap the decoder's linears (and the lm_head) for empty quantized ones, before loading, as
    the plan (linear_plan) says; a fused linear whose parts differ becomes a StackedLinear."""
    from r1.model.qwen2 import fused_linears

    if all(kind == "none" for kind in plan.values()):
        return
    if device.type not in ("cpu", "cuda"):
        raise ValueError(
            f"quantized weights run on PyTorch's packed CPU and CUDA kernels; on {device.type} use --quant none"
        )
    fused = fused_linears(model.config) if hasattr(model, "config") else {}
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        parent_name, _, leaf = name.rpartition(".")
        parts = fused.get(leaf, ((leaf, module.out_features),))
        runs: list[list] = []  # [kind, rows, parts] for each run of parts of one format
        for part, rows in parts:
            kind = plan[".".join(filter(None, (parent_name, part)))]
            if runs and runs[-1][0] == kind:
                runs[-1][1] += rows
                runs[-1][2] += 1
            else:
                runs.append([kind, rows, 1])
        with torch.device("cpu"):
            if len(runs) == 1:
                replacement = linear_class(runs[0][0], device)(
                    module.in_features, module.out_features, module.bias is not None
                )
            else:
                stack = [
                    (linear_class(kind, device)(module.in_features, rows, False), count) for kind, rows, count in runs
                ]
                replacement = StackedLinear(module.in_features, module.bias is not None, stack)
        setattr(model.get_submodule(parent_name) if parent_name else model, leaf, replacement)
