"""r1's Triton layer ops (r1/kernels/gpu_layer_ops.py) against the layers' PyTorch paths.

On a GPU they run there, and a whole model's logits with them are checked against PyTorch's
path. Elsewhere they run under Triton's interpreter (TRITON_INTERPRET=1), set before Triton loads.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.nn.functional as F

if sys.platform != "linux":
    pytest.skip("Triton has wheels for Linux alone", allow_module_level=True)
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from r1 import kernels  # noqa: E402
from r1.kernels import gpu_layer_ops  # noqa: E402  (imports Triton after the interpreter's switch)
from r1.model import layers  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The Triton ops round to the model's dtype where PyTorch's ops do; on a GPU what is left is
# float32's order of summation, which moves a bf16 result by one step in a few elements. Triton's
# interpreter truncates float32 to bf16 where a GPU rounds to nearest: on a CPU, bf16 results are
# held to three steps (up to three truncations: the residual sum, the normalized row, its product).
ON_GPU = torch.cuda.is_available()
TOLERANCE = {
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.bfloat16: dict(rtol=2**-7 if ON_GPU else 3 * 2**-7, atol=1e-6),
}


@pytest.fixture
def pytorch_path(monkeypatch):
    """The layers with every kernel off: the reference."""
    monkeypatch.setattr(kernels, "op_for", lambda name, x: None)


def _random(*shape, dtype):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape))).to(DEVICE, dtype)


def _agree(ours: torch.Tensor, ref: torch.Tensor) -> None:
    torch.testing.assert_close(ours, ref, **TOLERANCE[ref.dtype])
    if ref.dtype == torch.bfloat16 and ON_GPU:  # one step in a few elements, not everywhere
        assert (ours == ref).float().mean() > 0.97


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hidden", [1536, 100])  # R1's, and one that is no power of two (masked columns)
@pytest.mark.parametrize("with_residual", [True, False])
def test_add_rms_norm_agrees_with_pytorch(pytorch_path, dtype, hidden, with_residual):
    norm = layers.RMSNorm(hidden, 1e-6).to(DEVICE, dtype)
    norm.weight.data = 1 + 0.1 * _random(hidden, dtype=dtype)
    x = _random(5, hidden, dtype=dtype)
    residual = 3 * _random(5, hidden + 1, dtype=dtype)[:, :hidden] if with_residual else None  # strided rows
    ref_normed, ref_sum = norm(x, residual)
    normed, total = gpu_layer_ops.add_rms_norm(x, residual, norm.weight, 1e-6)
    if ON_GPU or dtype == torch.float32:
        assert torch.equal(total, ref_sum)  # both round the same float32 sum
    else:
        _agree(total, ref_sum)
    _agree(normed, ref_normed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [128, 48])  # R1's, and a half (24) that is no power of two
def test_rotary_agrees_with_pytorch(pytorch_path, dtype, head_dim):
    # R1's heads: 12 query heads and 2 key heads rotate, the 2 value heads behind them must not.
    positions = torch.tensor([0, 1, 7, 4000, 131071], device=DEVICE)
    cos, sin = layers.rotary_cos_sin(positions, head_dim, 10000.0, dtype)
    heads = _random(5, 16, head_dim, dtype=dtype)
    ref = heads.clone()
    if dtype == torch.float32:
        layers.apply_rotary_(ref, 14, cos, sin)
    else:  # PyTorch's bf16 path rounds each product and sum; the kernel rounds once, as float64 would
        wide = ref.double()
        layers.apply_rotary_(wide, 14, cos.double(), sin.double())
        ref = wide.to(dtype)
    ours = heads.clone()
    gpu_layer_ops.rotary_(ours, 14, cos, sin)
    assert torch.equal(ours[:, 14:], heads[:, 14:])
    _agree(ours, ref)


@pytest.mark.parametrize(
    "dtype, cache_dtype",
    [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16)],
)
def test_rotary_write_kv_is_rotary_then_write_kv_in_one_kernel(dtype, cache_dtype):
    # R1's 12 query, 2 key and 2 value heads: queries and keys rotate in place, the rotated keys
    # and the values land at the tokens' slots in the cache, and no other slot changes.
    from r1.model.attention import allocate_kv_cache, write_kv

    positions = torch.tensor([0, 1, 7, 4000, 131071], device=DEVICE)
    cos, sin = layers.rotary_cos_sin(positions, 128, 10000.0, dtype)
    heads = _random(5, 16, 128, dtype=dtype)
    cache = allocate_kv_cache(1, 8, 4, 2, 128, cache_dtype, DEVICE)[0]
    cache.copy_(_random(*cache.shape, dtype=cache_dtype))
    slots = torch.tensor([3, 17, 30, 8, 21], device=DEVICE)
    before, ref_heads, ref_cache = cache.clone(), heads.clone(), cache.clone()
    gpu_layer_ops.rotary_(ref_heads, 14, cos, sin)
    write_kv(ref_cache, ref_heads[:, 12:14], ref_heads[:, 14:], slots)
    gpu_layer_ops.rotary_write_kv_(heads, 12, cos, sin, cache, slots)
    assert torch.equal(heads, ref_heads)
    if ON_GPU or cache_dtype == dtype:
        assert torch.equal(cache, ref_cache)
    else:  # the interpreter truncates float32 to bf16 where PyTorch and a GPU round to nearest
        _agree(cache, ref_cache)
    changed = (cache != before).flatten(1, 2).any(-1).any(-1).any(0)  # (slots,)
    assert set(changed.nonzero().flatten().tolist()) == set(slots.tolist())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("intermediate", [8960, 40])  # R1's (past the last 1024-column block), and a short row
def test_silu_mul_agrees_with_pytorch(dtype, intermediate):
    gate_up = 4 * _random(3, 2 * intermediate, dtype=dtype)
    gate, up = gate_up.chunk(2, dim=-1)
    _agree(gpu_layer_ops.silu_mul(gate_up), F.silu(gate) * up)


@pytest.fixture
def gpu_ops_on(monkeypatch):
    """R1_GPU_LAYER_OPS=on for one test; op_for reads it anew before and after."""
    monkeypatch.setenv(kernels.GPU_OPS_ENV, "on")
    kernels._gpu_ops.cache_clear()
    yield
    kernels._gpu_ops.cache_clear()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the ops reach the model on CUDA tensors alone")
def test_model_logits_with_the_ops_match_pytorch(gpu_ops_on, monkeypatch):
    from r1.config import ModelConfig
    from r1.model.attention import AttentionMetadata, allocate_kv_cache
    from r1.model.qwen2 import Qwen2ForCausalLM

    cfg = ModelConfig(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=640,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).to("cuda", torch.bfloat16)
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    tokens, n = torch.randint(0, 512, (20,), device="cuda"), 20

    def logits():
        cache = allocate_kv_cache(3, 4, 16, 2, 64, torch.bfloat16, "cuda")
        meta = AttentionMetadata(torch.arange(n, device="cuda"), torch.arange(4, device="cuda")[None], [n], [n])
        with torch.inference_mode():
            return model.compute_logits(model(tokens, torch.arange(n, device="cuda"), cache, meta))

    assert kernels.op_for("add_rms_norm", tokens.float()) is gpu_layer_ops.add_rms_norm
    ours = logits()
    monkeypatch.setattr(kernels, "op_for", lambda name, x: None)
    ref = logits()
    assert ((ours - ref).norm() / ref.norm()).item() < 2e-2  # bf16 through 3 layers
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


@pytest.mark.skipif(ON_GPU, reason="counted on a CPU, under Triton's interpreter; bench/gpu.py profiles a GPU")
def test_a_batch_1_decode_step_launches_at_most_300_kernels_with_the_layer_ops():
    # The GPU's code path, counted on the CPU (r1/step_kernels.py) for R1's widths at one and
    # two layers: what a layer adds, times 28. With the layer ops a layer is its four matmuls and
    # six Triton kernels; without them (the GPU's default until a GPU has timed them) it is 28.
    from collections import Counter

    from r1.config import ModelConfig
    from r1.model.qwen2 import Qwen2ForCausalLM
    from r1.step_kernels import decode_step_kernels

    def counts(layers: int, layer_ops: bool) -> Counter:
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(ModelConfig(num_hidden_layers=layers, vocab_size=1024)).to(torch.bfloat16)
        return decode_step_kernels(model, layer_ops)

    def r1_step(layer_ops: bool) -> tuple[Counter, int]:
        one, two = counts(1, layer_ops), counts(2, layer_ops)
        per_layer = two - one
        return per_layer, one.total() + 27 * per_layer.total()

    per_layer, total = r1_step(layer_ops=True)
    assert per_layer == Counter(
        {
            "aten.linear": 4,
            "triton._add_rms_norm": 2,
            "triton._rotary": 1,
            "triton._attend_split": 1,
            "triton._combine_splits": 1,
            "triton._silu_mul": 1,
        }
    )
    assert total <= 300
    per_layer_off, total_off = r1_step(layer_ops=False)
    assert per_layer_off.total() == 28 and total_off > 2.5 * total
