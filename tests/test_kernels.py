"""r1's int4 kernel against float math on the same quantized weights, and which build a CPU gets."""

from __future__ import annotations

import pytest
import torch

from r1 import kernels, options, quant
from r1.config import EngineConfig
from r1.quant import Int4KernelLinear, Int4Linear, Int6KernelLinear

needs_kernels = pytest.mark.skipif(kernels.this_cpus_build() is None, reason="this CPU has no build of r1's kernels")
AVX512_AMX, AVX512_VNNI, AVX2 = kernels.BUILDS


def dequantized(layer: Int4KernelLinear) -> torch.Tensor:
    """The float weight the layer holds, read back through a reference of its documented layout."""
    tiles, k8, _ = layer.packed.shape
    nibbles = layer.packed.view(tiles, k8, 16, 4)  # byte 4 * row + j of each 64-byte chunk
    low, high = nibbles & 15, nibbles >> 4  # inputs k + j and k + 4 + j
    levels = torch.cat([low, high], dim=-1).permute(0, 2, 1, 3).reshape(tiles * 16, k8 * 8).float()
    per_row = lambda t: t.transpose(1, 2).reshape(tiles * 16, -1).float().repeat_interleave(layer.group_size, 1)  # noqa: E731
    spans = layer.steps.shape[1]  # (tiles, spans, 2, 16)
    scale_step, low_step = layer.steps.float().permute(2, 0, 3, 1).reshape(2, tiles * 16, spans)
    per_span = lambda step: step.repeat_interleave(k8 * 8 // spans, 1)  # noqa: E731
    return levels * (per_row(layer.scales) * per_span(scale_step)) + per_row(layer.lows) * per_span(low_step)


def kernel_layer(
    out_features: int, in_features: int, bias: bool, seed: int = 0, steps: str = "row"
) -> Int4KernelLinear:
    """A layer of random weights quantized by r1 (steps "row": a float32 pair a row), or random
    groups as Q4_K holds them ("q4_k": 6-bit codes under a float16 pair per 256 inputs)."""
    g = torch.Generator().manual_seed(seed)
    layer = Int4KernelLinear(in_features, out_features, bias=bias)
    if steps == "row":
        layer.set_weight(torch.randn(out_features, in_features, generator=g) * 0.05)
    else:
        codes = lambda: torch.randint(0, 64, (out_features, in_features // 32), generator=g)  # noqa: E731
        pairs = (torch.rand(2, out_features, in_features // 256, generator=g) + 0.5) * 1e-3
        levels = torch.randint(0, 16, (out_features, in_features), generator=g, dtype=torch.uint8)
        layer.set_groups(levels, codes().to(torch.uint8), (-codes()).to(torch.int8), pairs.to(torch.float16))
    if bias:
        layer.bias.data = torch.randn(out_features, generator=g)
    return layer


def has_flags(build: kernels.Build) -> bool:
    return all(f in kernels.cpu_flags() for f in build.cpu_flags)


@pytest.mark.skipif(not has_flags(AVX512_VNNI), reason="this CPU lacks AVX-512 VNNI")
def test_this_machine_runs_its_widest_build():
    # CI runs on AVX-512 VNNI machines (Intel's since Sapphire Rapids also have AMX): a broken
    # build or a missing ninja must fail here, not silently fall back to the 3x slower portable
    # kernel.
    assert kernels.this_cpus_build() == (AVX512_AMX if has_flags(AVX512_AMX) else AVX512_VNNI)
    assert kernels.unavailable_reason() is None and kernels.running_build() == kernels.this_cpus_build()
    assert quant.int4_linear_class() is Int4KernelLinear
    other_ops = (
        "int4_quantize",
        "decode_attention",
        "add_rms_norm",
        "rotary_",
        "write_kv_int8_",
        "silu_mul",
        "softmax_topk",
        "filter_draw",
    )
    assert all(kernels.op(name) is not None for name in other_ops)


@needs_kernels
@pytest.mark.parametrize("rows", [1, 7, 8, 9, 20])  # the VNNI path takes rows 8 at a time (AMX's from 32)
@pytest.mark.parametrize("bias", [False, True])
# 320 outputs are 20 tiles: past 8 rows, blocks of several tiles with a short last one (on 2
# threads, 7 blocks of 3 and 2).
@pytest.mark.parametrize("outputs", [48, 320])
@pytest.mark.parametrize("steps", ["row", "q4_k"])  # 512 inputs: Q4_K's two spans of 256
def test_exact_on_activations_that_int8_holds(rows, bias, outputs, steps):
    layer = kernel_layer(outputs, 512, bias, steps=steps)
    # Integers whose every group of 32 peaks at +-127 quantize to themselves (scale 1): the
    # kernel's integer dot products must then give the float result, up to float rounding.
    x = torch.randint(-100, 101, (rows, 512)).float()
    x[:, ::32] = torch.randint(0, 2, (rows, 16)).float() * 254 - 127
    want = x @ dequantized(layer).T + (layer.bias if bias else 0)
    got = layer(x)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-3), (got - want).abs().max()


@pytest.mark.skipif(kernels.this_cpus_build() != AVX512_AMX, reason="this CPU has no AMX")
@pytest.mark.parametrize("rows", [32, 47, 100])  # AMX's path starts at 32 rows; 47 and 100 end in a padded tile
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("outputs", [48, 320])  # 3 and 20 tiles: pairs, and one left over
@pytest.mark.parametrize("steps", ["row", "q4_k"])
def test_amx_path_is_bf16_math_on_the_quantized_weights(rows, bias, outputs, steps):
    layer = kernel_layer(outputs, 512, bias, steps=steps)
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 512, generator=g)
    x[:, 7] *= 30  # an outlier channel, which int8 activations per group would lose precision to
    want = x.double() @ dequantized(layer).double().T + (layer.bias.double() if bias else 0)
    # Widened to bf16 (8 significant bits) on both sides and summed in float: measured 2.0-2.4e-3
    # relative without the bias. The VNNI path's int8 activations measure 2.3-3.5e-2 here.
    got = layer(x).double()
    assert ((got - want).norm() / want.norm()).item() < 4e-3


@needs_kernels
def test_unpacked_layout_is_the_quantized_weight():
    weight = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    layer = Int4KernelLinear(64, 32, bias=False)
    layer.set_weight(weight)
    levels, *grid = quant.int4_groups(weight, quant.INT4_GROUP_SIZE)
    scale, low = quant.int4_grid(*grid)
    want = levels.float() * scale.repeat_interleave(32, 1) + low.repeat_interleave(32, 1)
    assert torch.equal(dequantized(layer), want)


@needs_kernels
def test_real_activations_stay_close_to_float():
    # int8 activations per group of 32, as llama.cpp's Q8 ones: measured 0.7-0.8% relative error
    # on Gaussian activations with an outlier channel 30x the rest.
    layer = kernel_layer(256, 1536, bias=True)
    x = torch.randn(5, 1536, generator=torch.Generator().manual_seed(2))
    x[:, 7] *= 30
    want = x @ dequantized(layer).T + layer.bias
    rel = ((layer(x) - want).norm() / want.norm()).item()
    assert rel < 0.02, rel


def swiglu_inputs(rows: int, width: int, seed: int = 0) -> torch.Tensor:
    """(rows, 2 * width) gate_up: wide gates, with the extremes where e^-g leaves a float's range."""
    gate_up = torch.randn(rows, 2 * width, generator=torch.Generator().manual_seed(seed)) * 8
    gate_up[0, :5] = torch.tensor([-100.0, 100.0, -1e30, 1e30, 0.0])
    return gate_up


@needs_kernels
@pytest.mark.parametrize("rows, width", [(1, 8960), (16, 8960), (3, 40), (2, 7)])  # 40 and 7: a tail past the vectors
def test_silu_mul_is_swiglus_activation(rows, width):
    gate_up = swiglu_inputs(rows, width)
    exact = torch.nn.functional.silu(gate_up[:, :width].double()) * gate_up[:, width:].double()
    got = kernels.op("silu_mul")(gate_up)
    assert got.shape == (rows, width)
    # As close as PyTorch's float32 silu (measured: 1.9e-7 relative, both); past g = -87, where
    # e^-g leaves a float's range, within 1e-30 of silu's 0.
    assert torch.allclose(got.double(), exact, rtol=1e-6, atol=1e-30)
    assert got[0, 1] == 100 * gate_up[0, width + 1] and got[0, 3] == 1e30 * gate_up[0, width + 3]


def group_errors(weight: torch.Tensor, levels: torch.Tensor, scales, lows, steps) -> torch.Tensor:
    """Each group's squared error, (rows, groups), of what int4_groups stores."""
    rows, k = weight.shape
    scale, low = quant.int4_grid(scales, lows, steps)
    rebuilt = levels.float().view(rows, -1, 32) * scale[..., None] + low[..., None]
    return ((rebuilt - weight.view(rows, -1, 32)) ** 2).sum(-1)


@needs_kernels
@pytest.mark.parametrize("rows, k", [(64, 1536), (3, 96)])  # 3 x 3 groups: fewer than a vector's worth, padded
def test_int4_quantize_fits_a_better_grid_than_min_max(rows, k, monkeypatch):
    weight = torch.randn(rows, k, generator=torch.Generator().manual_seed(6)) * 0.02
    weight[0, 5] = 0.3  # an outlier: min..max would spread its levels thin
    levels, scales, lows, steps = kernels.op("int4_quantize")(weight, 32)
    assert levels.shape == weight.shape and levels.dtype == torch.uint8 and int(levels.max()) <= 15
    assert scales.dtype == torch.uint8 and lows.dtype == torch.int8 and steps.shape == (2, rows)
    steps = steps[..., None]  # one span a row, as int4_groups gives them
    # What r1 stores: 8-bit multiples of two steps per row, the largest fitted scale 255 of them and
    # the largest |low| 127 (each group keeps the best grid a step either side of its rounded
    # fit); each weight sits on the level nearest it on that grid.
    assert torch.all(scales.amax(1) >= 254) and torch.all(lows.abs().amax(1) >= 126) and int(scales.min()) >= 1
    scale, low = quant.int4_grid(scales, lows, steps)
    groups = weight.view(rows, -1, 32)
    nearest = ((groups - low[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.uint8)
    assert torch.equal(levels, nearest.view(rows, k))
    # On Gaussian weights the squared error falls by 20% (measured 0.80 of min..max's). Rounding
    # the fitted scale and low to the stored grid can cost a group a little against min..max
    # (measured: 28 groups of 3072 lose, the worst by 1.9%).
    monkeypatch.setattr(kernels, "op_for", lambda name, x: None)  # quant's portable path: min..max
    ours, plain = (
        group_errors(weight, levels, scales, lows, steps),
        group_errors(weight, *quant.int4_groups(weight, 32)),
    )
    assert torch.all(ours <= plain * 1.05)
    assert ours.sum() < 0.85 * plain.sum(), (ours.sum() / plain.sum()).item()


@needs_kernels
@pytest.mark.parametrize("portable", [False, True])
def test_int4_quantize_keeps_a_grid_it_can_hold_exactly(portable, monkeypatch):
    # Rows whose groups each use all 16 levels, with scales and lows that are 8-bit multiples of
    # power-of-two steps (so the weights are exact floats), come back exactly, on either path; a
    # constant group as level 0 on its own value.
    if portable:
        monkeypatch.setattr(kernels, "op_for", lambda name, x: None)
    levels = torch.randint(0, 16, (4, 64), generator=torch.Generator().manual_seed(7)).float()
    levels[:, ::32], levels[:, 1::32] = 0, 15
    scales = torch.tensor([[255, 3], [17, 255], [255, 255], [255, 1]])
    lows = torch.tensor([[-127, 40], [5, 127], [-127, -127], [-127, 127]])
    steps = torch.tensor([[2.0**-10, 2.0**-16, 2.0**-4, 2.0**-12], [2.0**-9, 2.0**-12, 2.0**-3, 2.0**-10]])[..., None]
    scale, low = quant.int4_grid(scales, lows, steps)
    weight = levels * scale.repeat_interleave(32, 1) + low.repeat_interleave(32, 1)
    weight[3, 32:] = 127 * 2.0**-10
    got_levels, got_scales, got_lows, got_steps = quant.int4_groups(weight, 32)
    assert torch.equal(got_levels[:, :32].float(), levels[:, :32]) and torch.equal(got_levels[:3].float(), levels[:3])
    assert torch.equal(got_levels[3, 32:], torch.zeros(32, dtype=torch.uint8))
    assert torch.equal(got_scales[:3], scales[:3].to(torch.uint8))
    assert torch.equal(got_scales[3, 0], torch.tensor(255, dtype=torch.uint8))
    assert torch.equal(got_lows, lows.to(torch.int8))
    assert torch.allclose(got_steps[:, :3], steps[:, :3], rtol=1e-5, atol=0)
    assert torch.allclose(got_steps[1, 3], steps[1, 3], rtol=1e-5)  # least squares: 2e-6
    _, rebuilt_low = quant.int4_grid(got_scales, got_lows, got_steps)
    assert torch.allclose(rebuilt_low[3, 1], torch.tensor(127 * 2.0**-10), rtol=1e-6)


def logit_rows(rows: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """(rows, vocab) logits shaped like a model's: a spread of scores and a few far ahead."""
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 2
    logits[:, :5] += 12
    return logits


@needs_kernels
@pytest.mark.parametrize("rows, vocab, width", [(16, 151936, 64), (3, 1001, 64), (2, 1001, 1), (2, 300, 300)])
def test_softmax_topk_is_softmax_then_topk(rows, vocab, width):  # 1001: a tail past the vectors; 300: all of it
    logits = logit_rows(rows, vocab)
    temperature = torch.linspace(0.3, 2.0, rows)
    values, ids = kernels.op("softmax_topk")(logits, temperature, width)
    want_values, want_ids = (logits / temperature[:, None]).softmax(dim=1).topk(width, dim=1)
    assert torch.equal(ids, want_ids)
    assert torch.allclose(values, want_values, rtol=1e-5, atol=1e-9)  # measured: 2e-6 relative


@needs_kernels
def test_softmax_topk_breaks_ties_by_id_and_ranks_masked_tokens_last():
    logits = torch.full((3, 1001), float("-inf"))
    logits[0, [900, 3, 640, 17]] = torch.tensor([1.0, 1.0, 2.0, 1.0])  # what a grammar leaves allowed
    logits[1] = 0.0  # all tied
    logits[2] = logit_rows(1, 1001)[0]
    logits[2, ::3] = float("nan")  # a broken row: NaN counts as -inf
    values, ids = kernels.op("softmax_topk")(logits, torch.ones(3), 8)
    e = torch.e
    assert ids[0].tolist() == [640, 3, 17, 900, 0, 1, 2, 4]  # then the masked ones, by id
    assert torch.allclose(values[0], torch.tensor([e, 1, 1, 1, 0, 0, 0, 0]) / (e + 3))
    assert ids[1].tolist() == list(range(8)) and torch.allclose(values[1], torch.full((8,), 1 / 1001))
    clean = logits[2].nan_to_num(nan=float("-inf"))
    want_values, want_ids = clean.softmax(dim=0).topk(8)
    assert torch.equal(ids[2], want_ids) and torch.allclose(values[2], want_values, rtol=1e-5)


@needs_kernels
def test_filter_draw_draws_what_the_pytorch_filters_draw():
    from r1.sampling import _filter_sorted, draw

    g = torch.Generator().manual_seed(12)
    rows = 600
    logits = logit_rows(rows, 3000) * torch.linspace(0.2, 3.0, rows)[:, None]  # peaked to flat rows
    values, ids = kernels.op("softmax_topk")(logits, torch.full((rows,), 0.6), 64)
    top_p = torch.where(
        torch.rand(rows, generator=g) < 0.7, 0.5 + 0.5 * torch.rand(rows, generator=g), torch.ones(rows)
    )
    min_p = torch.where(torch.rand(rows, generator=g) < 0.5, 0.2 * torch.rand(rows, generator=g), torch.zeros(rows))
    min_p[(top_p == 1) & (min_p == 0)] = 0.05  # every row filters
    u = torch.rand(rows, generator=g)
    kept, settled = _filter_sorted(values, torch.zeros(rows, dtype=torch.long), top_p, min_p)
    tokens, fused_settled = kernels.op("filter_draw")(values, ids, top_p, min_p, u)
    assert torch.equal(tokens, ids.gather(1, draw(kept, u).unsqueeze(1)).squeeze(1))
    assert torch.equal(fused_settled, settled)
    assert 0 < int(settled.sum()) < rows  # both kinds of row were drawn


@needs_kernels
def test_portable_and_kernel_int4_agree():
    weight = torch.randn(64, 128, generator=torch.Generator().manual_seed(3)) * 0.05
    portable, ours = Int4Linear(128, 64, bias=False), Int4KernelLinear(128, 64, bias=False)
    portable.set_weight(weight)
    ours.set_weight(weight)
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(4))
    a, b = portable(x), ours(x)
    assert ((a - b).norm() / a.norm()).item() < 0.02


@needs_kernels
def test_bad_inputs_are_refused_with_a_reason():
    layer = kernel_layer(16, 64, bias=False)
    op = kernels.op("int4_matmul")
    with pytest.raises(RuntimeError, match="x must be contiguous"):
        op(torch.randn(2, 64).double(), layer.packed, layer.scales, layer.lows, layer.steps, 32, None)
    with pytest.raises(RuntimeError, match="K must be a multiple of the group size"):
        op(torch.randn(2, 48), layer.packed, layer.scales, layer.lows, layer.steps, 32, None)
    with pytest.raises(RuntimeError, match="group must be a positive multiple of 16"):
        op(torch.randn(2, 64), layer.packed, layer.scales, layer.lows, layer.steps, 0, None)
    wide = kernel_layer(16, 512, bias=False)
    with pytest.raises(RuntimeError, match="group must be a positive multiple of 16, at most 256"):
        op(
            torch.randn(2, 512),
            wide.packed,
            wide.scales[:, :1].contiguous(),
            wide.lows[:, :1].contiguous(),
            wide.steps,
            512,
            None,
        )
    with pytest.raises(RuntimeError, match="bias must be"):
        op(torch.randn(2, 64), layer.packed, layer.scales, layer.lows, layer.steps, 32, torch.zeros(8))
    with pytest.raises(ValueError, match="out_features"):
        Int4KernelLinear(64, 40, bias=False)
    with pytest.raises(RuntimeError, match=r"gate_up must be contiguous \(N, 2I\)"):
        kernels.op("silu_mul")(torch.randn(2, 7))
    with pytest.raises(RuntimeError, match="K must be a multiple of the group size"):
        kernels.op("int4_quantize")(torch.randn(2, 48), 32)
    with pytest.raises(RuntimeError, match="weight must be contiguous"):
        kernels.op("int4_quantize")(torch.randn(2, 64).bfloat16(), 32)
    softmax_topk = kernels.op("softmax_topk")
    with pytest.raises(RuntimeError, match=r"width must be in \[1, V\]"):
        softmax_topk(torch.randn(2, 10), torch.ones(2), 11)
    with pytest.raises(RuntimeError, match="temperatures must be positive"):
        softmax_topk(torch.randn(2, 10), torch.tensor([1.0, 0.0]), 4)
    with pytest.raises(RuntimeError, match=r"temperature must be contiguous \(B,\) float32"):
        softmax_topk(torch.randn(2, 10), torch.ones(3), 4)
    values, ids = softmax_topk(torch.randn(2, 10), torch.ones(2), 4)
    with pytest.raises(RuntimeError, match=r"top_p, min_p and u must be contiguous \(B,\) float32"):
        kernels.op("filter_draw")(values, ids, torch.ones(2), torch.zeros(3), torch.rand(2))


def test_without_the_kernel_int4_falls_back_to_the_portable_one(monkeypatch):
    monkeypatch.setattr(kernels, "op", lambda name: None)
    assert quant.int4_linear_class() is Int4Linear


def test_op_does_not_look_for_the_build_again(monkeypatch):
    # op() runs ~200 times a decode step: finding the build (reading /proc/cpuinfo) each time cost
    # a third of the decode speed once.
    kernels.op("int4_matmul")
    monkeypatch.setattr(kernels, "cpu_flags", lambda: pytest.fail("op() read the CPU's flags again"))
    for name in ("int4_matmul", "decode_attention", "add_rms_norm", "rotary_", "no_such_op"):
        kernels.op(name)
    assert kernels.op("no_such_op") is None


VNNI_FLAGS = {"avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx2", "fma", "f16c"}


@pytest.mark.parametrize(
    "flags, build",
    [
        (VNNI_FLAGS | {"avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"}, "avx512_amx"),
        (VNNI_FLAGS | {"amx_tile", "amx_int8"}, "avx512_vnni"),  # AMX without bf16
        (VNNI_FLAGS, "avx512_vnni"),
        ({"avx512f", "avx2", "fma", "f16c"}, "avx2"),
        ({"avx2", "fma", "f16c"}, "avx2"),
    ],
)
def test_a_cpu_gets_the_widest_build_it_can_run(monkeypatch, flags, build):
    monkeypatch.delenv(kernels.BUILD_ENV, raising=False)
    monkeypatch.setattr(kernels, "cpu_flags", lambda: flags)
    assert kernels.this_cpus_build().name == build


@pytest.mark.parametrize(
    "cpu, prefetch",
    [
        ({"vendor_id": "AuthenticAMD", "cpu family": "25"}, 0),  # Zen 4: the hardware prefetcher alone
        ({"vendor_id": "AuthenticAMD", "cpu family": "26"}, 4096),
        ({"vendor_id": "GenuineIntel", "cpu family": "6"}, 4096),
        ({}, 4096),  # no /proc/cpuinfo
    ],
)
def test_the_weight_kernels_prefetch_by_cpu(monkeypatch, cpu, prefetch):
    monkeypatch.delenv(kernels.PREFETCH_ENV, raising=False)
    monkeypatch.setattr(kernels, "cpuinfo_fields", lambda: cpu)
    assert kernels.prefetch_bytes() == prefetch
    monkeypatch.setenv(kernels.PREFETCH_ENV, "1024")
    assert kernels.prefetch_bytes() == 1024


def test_a_build_that_does_not_compile_gives_way_to_the_next(monkeypatch):
    # A compiler too old for AMX's flags (GCC before 11) must still give an AMX CPU the VNNI build.
    monkeypatch.delenv(kernels.BUILD_ENV, raising=False)
    monkeypatch.setattr(kernels, "cpu_flags", lambda: VNNI_FLAGS | {"avx512_bf16", "amx_tile", "amx_bf16"})
    errors = {"avx512_amx": "error: unrecognized command-line option '-mamx-bf16'"}
    monkeypatch.setattr(kernels, "_build", lambda build: errors.get(build.name))
    assert kernels.running_build() == AVX512_VNNI and kernels.unavailable_reason() is None
    errors.update(avx512_vnni="error: x", avx2="error: y")
    assert kernels.running_build() is None
    assert kernels.unavailable_reason() == (
        "building r1/kernels failed: avx512_amx: error: unrecognized command-line "
        "option '-mamx-bf16'; avx512_vnni: error: x; avx2: error: y"
    )


def test_a_cpu_without_either_is_told_why(monkeypatch):
    monkeypatch.delenv(kernels.BUILD_ENV, raising=False)
    monkeypatch.setattr(kernels, "cpu_flags", lambda: {"sse4_2", "avx"})
    assert kernels.unavailable_reason() == (
        "this CPU has no build of them (avx512_amx needs avx512f, avx512bw, "
        "avx512vl, avx512_vnni, avx512_bf16, amx_tile, amx_bf16; avx512_vnni needs "
        "avx512f, avx512bw, avx512vl, avx512_vnni; avx2 needs avx2, fma, f16c)"
    )


def test_an_unknown_build_name_is_told_apart(monkeypatch):
    monkeypatch.setenv(kernels.BUILD_ENV, "sse2")
    assert kernels.unavailable_reason() == "R1_KERNELS=sse2 names none of their builds (avx512_amx, avx512_vnni, avx2)"
    monkeypatch.setenv(kernels.BUILD_ENV, "off")
    assert kernels.unavailable_reason() == "R1_KERNELS=off"


@pytest.fixture
def selection(monkeypatch):
    """kernels.select for one test, with neither environment override set; the default after."""
    monkeypatch.delenv(kernels.BUILD_ENV, raising=False)
    monkeypatch.delenv(kernels.GPU_OPS_ENV, raising=False)
    yield kernels.select
    kernels.select()


def test_the_engine_config_chooses_the_kernels_and_the_environment_overrides(selection, monkeypatch):
    if kernels.unavailable_reason() is not None:
        pytest.skip(f"r1's kernels cannot run here: {kernels.unavailable_reason()}")
    build = kernels.running_build().name
    cpu, fp32 = torch.device("cpu"), torch.float32
    assert kernels.plan(cpu, fp32) == {name: f"r1 {build}" for names in kernels.OPS.values() for name in names}
    assert kernels.plan(cpu, torch.bfloat16)["add_rms_norm"] == "pytorch (r1's kernels take float32)"
    assert kernels.plan(cpu, torch.bfloat16)["int4_matmul"] == f"r1 {build}"  # it takes any activations

    assert selection("off") == kernels.Selection("off", False)
    assert kernels.op("add_rms_norm") is None and kernels.unavailable_reason() == "cpu_kernels=off"
    assert set(kernels.plan(cpu, fp32).values()) == {"pytorch (cpu_kernels=off)"}
    monkeypatch.setenv(kernels.BUILD_ENV, build)  # the environment wins over the config
    assert selection("off").cpu_kernels == build and kernels.op("add_rms_norm") is not None
    monkeypatch.delenv(kernels.BUILD_ENV)

    cuda = torch.device("cuda")
    assert kernels.plan(cuda, torch.bfloat16)["silu_mul"] == "pytorch (the layer ops are off)"
    assert selection(gpu_layer_ops=True).gpu_layer_ops
    monkeypatch.setenv(kernels.GPU_OPS_ENV, "off")
    assert not selection(gpu_layer_ops=True).gpu_layer_ops
    selection("sse2")  # EngineConfig refuses it; chosen anyway, it runs nothing and says why
    assert kernels.unavailable_reason() == "cpu_kernels=sse2 names none of their builds (avx512_amx, avx512_vnni, avx2)"
    with pytest.raises(ValueError, match="cpu_kernels must be one of auto, off, avx512_amx"):
        EngineConfig(cpu_kernels="sse2")


def test_the_choices_list_the_builds():
    assert options.CPU_KERNELS == ("auto", "off", *(b.name for b in kernels.BUILDS))


AVX2_CHECK = """
import json, sys, torch
from r1 import kernels
from r1.quant import Int4KernelLinear, Int6KernelLinear
assert kernels.this_cpus_build().name == "avx2" and kernels.unavailable_reason() is None, kernels.unavailable_reason()
assert all(kernels.op(name) is not None for name in ("int4_matmul", "int6_matmul", "decode_attention", "add_rms_norm",
                                                     "rotary_", "write_kv_int8_", "silu_mul", "softmax_topk",
                                                     "filter_draw", "int4_quantize"))
g = torch.Generator().manual_seed(5)
out = {}
for rows in (1, 4, 5, 9):  # the AVX2 kernel takes activation rows 4 at a time
    layer = Int4KernelLinear(256, 48, bias=True)
    layer.set_weight(torch.randn(48, 256, generator=g) * 0.05)
    layer.bias.data = torch.randn(48, generator=g)
    x = torch.randn(rows, 256, generator=g)
    out[rows] = layer(x).tolist()
for rows in (1, 5):  # int6: a row of 896 ends in a short block of 256
    layer = Int6KernelLinear(896, 32, bias=True)
    layer.set_weight(torch.randn(32, 896, generator=g) * 0.05)
    layer.bias.data = torch.randn(32, generator=g)
    out[f"int6 {rows}"] = layer(torch.randn(rows, 896, generator=g)).tolist()
x, res, w = torch.randn(3, 64, generator=g), torch.randn(3, 64, generator=g), torch.randn(64, generator=g)
normed, total = kernels.op("add_rms_norm")(x, res, w, 1e-6)
out["norm"] = (normed - w * torch.nn.functional.rms_norm(x + res, (64,), eps=1e-6)).abs().max().item()
gate_up = torch.randn(3, 2 * 40, generator=g) * 8  # 40: five vectors of 8
exact = torch.nn.functional.silu(gate_up[:, :40].double()) * gate_up[:, 40:].double()
out["silu_mul"] = ((kernels.op("silu_mul")(gate_up).double() - exact).abs() / exact.abs()).max().item()  # no extremes
weight = torch.randn(5, 96, generator=torch.Generator().manual_seed(8))  # 15 groups: blocks of 8, one padded
out["int4_quantize"] = [t.tolist() for t in kernels.op("int4_quantize")(weight, 32)]
logits = torch.randn(3, 1001, generator=g) * 2  # 1001: a tail past the vectors of 8
values, ids = kernels.op("softmax_topk")(logits, torch.tensor([0.6, 1.0, 2.0]), 64)
want_values, want_ids = (logits / torch.tensor([[0.6], [1.0], [2.0]])).softmax(dim=1).topk(64, dim=1)
out["softmax_topk ids"] = torch.equal(ids, want_ids)
out["softmax_topk"] = ((values - want_values).abs() / want_values).max().item()
from r1.model.attention import AttentionMetadata, allocate_kv_cache, paged_attention, write_kv
lens, blocks = [1, 17, 300], [[3], [5, 0], list(range(6, 25))]  # R1's heads, blocks of 16
for dtype in (torch.float32, torch.int8):
    cache = allocate_kv_cache(1, 25, 16, 2, 128, dtype, "cpu")[0]
    slots = torch.tensor([b[p // 16] * 16 + p % 16 for b, n in zip(blocks, lens) for p in range(n)])
    write_kv(cache, torch.randn(len(slots), 2, 128, generator=g), torch.randn(len(slots), 2, 128, generator=g), slots)
    tables = torch.tensor([b + [0] * (19 - len(b)) for b in blocks])
    meta = lambda: AttentionMetadata(torch.tensor([]), tables, [1, 1, 1], lens)
    q = torch.randn(3, 12, 128, generator=g)
    got = paged_attention(q, cache, meta(), 128 ** -0.5)
    kernel_op, kernels.op = kernels.op, lambda name: None
    want = paged_attention(q, cache, meta(), 128 ** -0.5)  # PyTorch's gathered path
    kernels.op = kernel_op
    out[f"attention {dtype}"] = (got - want).abs().max().item()
json.dump(out, sys.stdout)
"""


@pytest.mark.skipif(
    not (has_flags(AVX2) and has_flags(AVX512_VNNI)), reason="compares the AVX2 build with the AVX-512 VNNI one"
)
def test_the_avx2_build_computes_what_the_vnni_one_does():
    # Laptops without AVX-512 run the AVX2 build; CI's machines have AVX-512, so it is built and
    # run here in a process of its own (both builds register the same op names).
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, kernels.BUILD_ENV: "avx2"}
    done = subprocess.run([sys.executable, "-c", AVX2_CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    avx2 = json.loads(done.stdout)
    assert avx2["norm"] < 1e-5 and avx2["silu_mul"] < 1e-6
    assert avx2["softmax_topk ids"] and avx2["softmax_topk"] < 1e-5
    # The same grid search lane by lane, on vectors of 8 groups rather than 16: the same bits.
    weight = torch.randn(5, 96, generator=torch.Generator().manual_seed(8))
    assert avx2["int4_quantize"] == [t.tolist() for t in kernels.op("int4_quantize")(weight, 32)]
    assert avx2["attention torch.float32"] < 1e-5 and avx2["attention torch.int8"] < 1e-5, avx2
    g = torch.Generator().manual_seed(5)
    for rows in (1, 4, 5, 9):  # the same layers and inputs, drawn in the same order
        layer = Int4KernelLinear(256, 48, bias=True)
        layer.set_weight(torch.randn(48, 256, generator=g) * 0.05)
        layer.bias.data = torch.randn(48, generator=g)
        x = torch.randn(rows, 256, generator=g)
        # The same integer dot products; only each group's float sum of x may round differently.
        assert torch.allclose(torch.tensor(avx2[str(rows)]), layer(x), rtol=1e-5, atol=1e-5), rows
    for rows in (1, 5):
        layer = Int6KernelLinear(896, 32, bias=True)
        layer.set_weight(torch.randn(32, 896, generator=g) * 0.05)
        layer.bias.data = torch.randn(32, generator=g)
        got = layer(torch.randn(rows, 896, generator=g))
        assert torch.allclose(torch.tensor(avx2[f"int6 {rows}"]), got, rtol=1e-5, atol=1e-5), rows
