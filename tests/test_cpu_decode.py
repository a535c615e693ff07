"""The CPU's decode step in one C++ call (r1/model/cpu_decode.py) against the Python layers it
stands in for: the same logits and the same cache, to the bit."""

from __future__ import annotations

import pytest
import torch

from r1 import kernels
from r1.loaders import load_model, open_model_files
from r1.model import cpu_decode
from r1.model.attention import AttentionMetadata, allocate_kv_cache
from r1.quant import Int4KernelLinear, Int6KernelLinear, StackedLinear

BLOCK = 4
TABLES = [[9, 2, 30, 17, 5, 44, 12, 60], [7, 8, 40, 1, 0, 33, 21, 50]]  # two sequences' scattered blocks
# Their prompt lengths (a step of more than MAX_TOKEN_QUERIES tokens a sequence: the Python layers
# run it either way); they then decode side by side.
PROMPTS = (21, 6)

pytestmark = pytest.mark.skipif(
    kernels.op("add_rms_norm") is None, reason=f"r1's kernels cannot run here: {kernels.unavailable_reason()}"
)


def _meta(lengths: list[int], new: list[int]) -> AttentionMetadata:
    """Sequences of `lengths` cached tokens, each with new[i] tokens after them."""
    slots = [t[p // BLOCK] * BLOCK + p % BLOCK for t, n, q in zip(TABLES, lengths, new) for p in range(n, n + q)]
    return AttentionMetadata(torch.tensor(slots), torch.tensor(TABLES), new, [n + q for n, q in zip(lengths, new)])


def _prompts_in_cache(model, kv_dtype: torch.dtype):
    """Both prompts run into a fresh cache: (cache, the generator that drew them, to draw on)."""
    cfg = model.config
    cache = allocate_kv_cache(cfg.num_hidden_layers, 64, BLOCK, cfg.num_key_value_heads, cfg.head_dim, kv_dtype, "cpu")
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=gen) for n in PROMPTS]
    model(torch.cat(prompts), torch.cat([torch.arange(n) for n in PROMPTS]), cache, _meta([0, 0], list(PROMPTS)))
    return cache, gen


def _decode(model, kv_dtype: torch.dtype, fused: bool, steps: int = 4):
    """Logits of `steps` decode steps of both sequences after their prompts, and the cache."""
    model.cpu_decode = fused
    cache, gen = _prompts_in_cache(model, kv_dtype)
    logits, lengths = [], list(PROMPTS)
    for _ in range(steps):
        ids = torch.randint(0, model.config.vocab_size, (2,), generator=gen)
        hidden = model(ids, torch.tensor(lengths), cache, _meta(lengths, [1, 1]))
        logits.append(model.compute_logits(hidden))
        lengths = [n + 1 for n in lengths]
    values = cache.values if kv_dtype == torch.int8 else cache
    return torch.stack(logits), values.clone()


@pytest.fixture
def cpp_calls(monkeypatch) -> list:
    """One entry for each call of the C++ step."""
    calls = []
    run = cpu_decode.CpuDecodeStep.__call__
    monkeypatch.setattr(cpu_decode.CpuDecodeStep, "__call__", lambda self, *a: calls.append(1) or run(self, *a))
    return calls


# Each quantization with the kinds of linear the tiny model gets under it (float weights: none).
LINEARS = {"none": set(), "int4": {Int6KernelLinear, StackedLinear}, "int4-pure": {Int4KernelLinear}}


@pytest.mark.parametrize("quant", LINEARS)
@torch.inference_mode()
def test_the_cpp_step_equals_the_python_layers(tiny_hf, quant, cpp_calls):
    folder, _ = tiny_hf
    model = load_model(open_model_files(str(folder)), torch.float32, "cpu", progress=False, quant=quant)
    assert LINEARS[quant] <= {type(m) for m in model.modules()}
    for kv_dtype in (torch.float32, torch.bfloat16, torch.int8):
        fused_logits, fused_cache = _decode(model, kv_dtype, fused=True)
        assert len(cpp_calls) == 4  # every decode step ran in C++, and nothing else did
        python_logits, python_cache = _decode(model, kv_dtype, fused=False)
        assert len(cpp_calls) == 4
        assert torch.equal(fused_logits, python_logits)
        assert torch.equal(fused_cache, python_cache)
        cpp_calls.clear()


@torch.inference_mode()
def test_a_verification_step_runs_in_cpp_as_one_query_a_token(tiny_hf, cpp_calls):
    # Speculative decoding's k + 1 tokens a sequence: each attends to its sequence up to itself,
    # on decode_attention's kernel where the Python layers take SDPA (so close, not equal).
    folder, _ = tiny_hf
    model = load_model(open_model_files(str(folder)), torch.float32, "cpu", progress=False)
    new, results = [3, 5], []
    for fused in (True, False):
        model.cpu_decode = fused
        cache, gen = _prompts_in_cache(model, torch.float32)
        ids = torch.randint(0, model.config.vocab_size, (sum(new),), generator=gen)
        positions = torch.cat([torch.arange(n, n + q) for n, q in zip(PROMPTS, new)])
        hidden = model(ids, positions, cache, _meta(list(PROMPTS), new))
        results.append((model.compute_logits(hidden), cache.clone()))
    assert len(cpp_calls) == 1
    (fused_logits, fused_cache), (python_logits, python_cache) = results
    assert (fused_logits - python_logits).abs().max() < 1e-4
    assert (fused_cache - python_cache).abs().max() < 1e-5  # layer 1 on: keys of differently rounded inputs


@torch.inference_mode()
def test_models_the_stack_cannot_hold_run_the_python_layers(tiny_hf):
    folder, _ = tiny_hf
    int8 = load_model(open_model_files(str(folder)), torch.float32, "cpu", progress=False, quant="int8")
    assert cpu_decode.build(int8) is None  # int8 weights have no C++ form in the stack
    bf16 = load_model(open_model_files(str(folder)), torch.bfloat16, "cpu", progress=False)
    assert cpu_decode.build(bf16) is None  # r1's CPU kernels take float32
