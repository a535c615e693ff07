"""r1's AVX-512 VNNI int4 kernel against float math on the same quantized weights."""

from __future__ import annotations

import pytest
import torch

from r1 import kernels, quant
from r1.quant import Int4Linear, Int4VnniLinear

needs_vnni = pytest.mark.skipif(any(f not in kernels.cpu_flags() for f in kernels.REQUIRED_CPU_FLAGS),
                                reason="this CPU lacks AVX-512 VNNI")


def dequantized(layer: Int4VnniLinear) -> torch.Tensor:
    """The float weight the layer holds, read back through a reference of its documented layout."""
    tiles, k8, _ = layer.packed.shape
    nibbles = layer.packed.view(tiles, k8, 16, 4)  # byte 4 * row + j of each 64-byte chunk
    low, high = nibbles & 15, nibbles >> 4  # inputs k + j and k + 4 + j
    levels = torch.cat([low, high], dim=-1).permute(0, 2, 1, 3).reshape(tiles * 16, k8 * 8).float()
    per_row = lambda t: t.transpose(1, 2).reshape(tiles * 16, -1).float().repeat_interleave(layer.group_size, 1)  # noqa: E731
    return levels * per_row(layer.scales) + per_row(layer.lows)


def vnni_layer(out_features: int, in_features: int, bias: bool, seed: int = 0) -> Int4VnniLinear:
    g = torch.Generator().manual_seed(seed)
    layer = Int4VnniLinear(in_features, out_features, bias=bias)
    layer.set_weight(torch.randn(out_features, in_features, generator=g) * 0.05)
    if bias:
        layer.bias.data = torch.randn(out_features, generator=g)
    return layer


@needs_vnni
def test_this_machine_runs_the_vnni_kernel():
    # CI runs on AVX-512 VNNI machines: a broken build or a missing ninja must fail here, not
    # silently fall back to the 3x slower portable kernel.
    assert kernels.unavailable_reason() is None
    assert quant.int4_linear_class() is Int4VnniLinear
    assert all(kernels.op(name) is not None for name in ("decode_attention", "add_rms_norm", "rotary_"))


@needs_vnni
@pytest.mark.parametrize("rows", [1, 7, 8, 9, 20])  # the kernel takes activation rows 8 at a time
@pytest.mark.parametrize("bias", [False, True])
def test_exact_on_activations_that_int8_holds(rows, bias):
    layer = vnni_layer(48, 256, bias)
    # Integers whose every group of 32 peaks at +-127 quantize to themselves (scale 1): the
    # kernel's integer dot products must then give the float result, up to float rounding.
    x = torch.randint(-100, 101, (rows, 256)).float()
    x[:, ::32] = torch.randint(0, 2, (rows, 8)).float() * 254 - 127
    want = x @ dequantized(layer).T + (layer.bias if bias else 0)
    got = layer(x)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-3), (got - want).abs().max()


@needs_vnni
def test_unpacked_layout_is_the_quantized_weight():
    weight = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    layer = Int4VnniLinear(64, 32, bias=False)
    layer.set_weight(weight)
    levels, scale, low = quant.int4_groups(weight, quant.INT4_GROUP_SIZE)
    want = levels.float() * scale.bfloat16().float().repeat_interleave(32, 1) + low.bfloat16().float().repeat_interleave(32, 1)
    assert torch.equal(dequantized(layer), want)


@needs_vnni
def test_real_activations_stay_close_to_float():
    # int8 activations per group of 32, as llama.cpp's Q8 ones: measured 0.5-1% relative error
    # on Gaussian activations with an outlier channel 30x the rest.
    layer = vnni_layer(256, 1536, bias=True)
    x = torch.randn(5, 1536, generator=torch.Generator().manual_seed(2))
    x[:, 7] *= 30
    want = x @ dequantized(layer).T + layer.bias
    rel = ((layer(x) - want).norm() / want.norm()).item()
    assert rel < 0.02, rel


@needs_vnni
def test_portable_and_vnni_int4_agree():
    weight = torch.randn(64, 128, generator=torch.Generator().manual_seed(3)) * 0.05
    portable, vnni = Int4Linear(128, 64, bias=False), Int4VnniLinear(128, 64, bias=False)
    portable.set_weight(weight)
    vnni.set_weight(weight)
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(4))
    a, b = portable(x), vnni(x)
    assert ((a - b).norm() / a.norm()).item() < 0.02


@needs_vnni
def test_bad_inputs_are_refused_with_a_reason():
    layer = vnni_layer(16, 64, bias=False)
    op = kernels.op("int4_matmul")
    with pytest.raises(RuntimeError, match="x must be contiguous"):
        op(torch.randn(2, 64).double(), layer.packed, layer.scales, layer.lows, 32, None)
    with pytest.raises(RuntimeError, match="K must be a multiple of the group size"):
        op(torch.randn(2, 48), layer.packed, layer.scales, layer.lows, 32, None)
    with pytest.raises(RuntimeError, match="group must be a positive multiple of 16"):
        op(torch.randn(2, 64), layer.packed, layer.scales, layer.lows, 0, None)
    with pytest.raises(RuntimeError, match="bias must be"):
        op(torch.randn(2, 64), layer.packed, layer.scales, layer.lows, 32, torch.zeros(8))
    with pytest.raises(ValueError, match="out_features"):
        Int4VnniLinear(64, 40, bias=False)


def test_without_the_kernel_int4_falls_back_to_the_portable_one(monkeypatch):
    monkeypatch.setattr(kernels, "op", lambda name: None)
    assert quant.int4_linear_class() is Int4Linear


def test_a_cpu_without_vnni_is_told_why(monkeypatch):
    monkeypatch.setattr(kernels, "cpu_flags", lambda: {"avx2", "fma"})
    assert kernels.unavailable_reason() == "this CPU lacks avx512f, avx512bw, avx512vl, avx512_vnni"
