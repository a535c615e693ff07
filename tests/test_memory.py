"""The memory calculator: R1's arithmetic, the weight formats against real GGUF files, bad input,
the engine's KV pool sizing, the CLI, and one real measurement in a subprocess."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from r1 import memory
from r1.cli import main
from r1.config import R1_1_5B, EngineConfig, ModelConfig
from r1.loaders import gguf
from r1.model.attention import DECODE_GATHER_TOKENS

GiB = 1 << 30
REPO = Path(__file__).resolve().parents[1]


# ---- R1-1.5B's arithmetic ---------------------------------------------------------------------


def test_r1_parameters_kv_and_weights():
    assert R1_1_5B.num_parameters() == 1_777_088_000
    p = memory.plan(R1_1_5B, "bf16", 32768, device="cuda")
    assert p.line("weights").bytes == 1_777_088_000 * 2
    assert round(p.line("weights").gib, 2) == 3.31
    assert p.line("kv cache").bytes == 32768 * 28_672 == int(0.875 * GiB)
    assert memory.plan(R1_1_5B, "bf16", 131072).line("kv cache").bytes == int(3.5 * GiB)


def test_kv_cache_counts_kv_heads_not_attention_heads():
    """GQA: 2 KV heads serve 12 query heads, so the cache is 6x smaller than an MHA formula says."""
    mha = 2 * R1_1_5B.num_hidden_layers * R1_1_5B.num_attention_heads * R1_1_5B.head_dim * 2
    per_token = memory.plan(R1_1_5B, "bf16", 1024).line("kv cache").bytes // 1024
    assert per_token == 28_672 and mha == 6 * per_token


def test_kv_rounds_up_to_whole_blocks_and_scales_with_batch():
    p = memory.plan(R1_1_5B, "bf16", 1000, batch=3)
    assert p.line("kv cache").bytes == 3 * 1008 * 28_672  # 1000 tokens take 63 blocks of 16
    assert memory.plan(R1_1_5B, "bf16", 1000, kv_dtype="fp8").line("kv cache").bytes == 3 * 1008 * 14_336 // 3


def test_total_is_the_sum_of_the_lines_on_cuda():
    p = memory.plan(R1_1_5B, "int4", 8192, batch=4, device="cuda")
    assert p.loading is None and p.total == sum(line.bytes for line in p.lines)
    assert [line.name for line in p.lines] == ["weights", "kv cache", "activations", "logits", "runtime"]
    assert all(line.formula for line in p.lines)


def test_activations_follow_the_prefill_chunk_and_the_context():
    cfg, a = R1_1_5B, 2
    step = memory.activation_bytes(cfg, 1, 131072, a)
    gathered_kv = 2 * 131072 * cfg.kv_size * a
    assert step > gathered_kv  # at long context a decode step's gathered keys and values dominate
    short = memory.activation_bytes(cfg, 16, 16, a)
    assert short < 16 * 3 * cfg.intermediate_size * a * 2  # a 16-token step needs little
    # A decode step of 1 token attends to the context: scores grow only linearly with it.
    assert memory.activation_bytes(cfg, 1, 65536, a) < 2 * memory.activation_bytes(cfg, 1, 32768, a)


def test_decoding_rows_are_gathered_together_up_to_a_bound():
    assert memory.gathered_tokens(100, 4) == 400  # four short sequences at once
    assert memory.gathered_tokens(8192, 256) == DECODE_GATHER_TOKENS  # many: a slice at a time
    assert memory.gathered_tokens(131072, 256) == 131072  # never less than one sequence
    cfg, a = R1_1_5B, 2
    assert memory.activation_bytes(cfg, 256, 8192, a, 256) > memory.activation_bytes(cfg, 256, 8192, a, 1)


# ---- weight formats -----------------------------------------------------------------------------


def test_config_tensors_add_up_to_the_parameter_count():
    for cfg in (R1_1_5B, ModelConfig(tie_word_embeddings=True)):
        assert sum(math.prod(s) for _, s in memory.gguf_tensors(cfg)) == cfg.num_parameters()


def test_q4_k_m_layout_for_r1_is_llama_cpps():
    """Q4_K for most, Q6_K for output and half of attn_v / ffn_down (use_more_bits, counted in the
    file's name order), F32 vectors."""
    types = {name: memory.gguf_preset_type("q4_k_m", name, shape, 28) for name, shape in memory.gguf_tensors(R1_1_5B)}
    assert types["output.weight"] == "Q6_K" and types["token_embd.weight"] == "Q4_K"
    six = [i for i in range(28) if types[f"blk.{i}.attn_v.weight"] == "Q6_K"]
    assert six == [0, 1, 5, 6, 7, 8, 9, 10, 13, 16, 19, 21, 24, 27]  # as in the 1.5B demo GGUF
    assert [i for i in range(28) if types[f"blk.{i}.ffn_down.weight"] == "Q6_K"] == six
    assert types["blk.3.attn_q.bias"] == "F32" and types["blk.3.ffn_gate.weight"] == "Q4_K"


def test_q4_k_m_estimate_equals_the_small_gguf_file_tensor_for_tensor(small_gguf):
    """The 0.5B's 896-wide rows are no multiple of 256: llama.cpp falls back to Q5_0 / Q8_0."""
    header = gguf.read_header(small_gguf)
    source = memory.model_source(str(small_gguf))
    n_layers = source.config.num_hidden_layers
    for t in header.tensors:
        assert memory.gguf_preset_type("q4_k_m", t.name, t.shape, n_layers) == gguf.type_name(t.ggml_type), t.name
    assert source.file_quant == "q4_k_m"
    assert memory.weight_line(source.config, "q4_k_m", "bf16").bytes == source.file_weight_bytes == 485_452_288


def test_r1_weight_only_formats_by_hand():
    cfg = ModelConfig(
        vocab_size=1000,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
    )
    linears = [(256, 256), (128, 256), (128, 256), (256, 256), (512, 256), (512, 256), (256, 512)]  # (rows, cols)
    per_layer_vectors = 256 + 128 + 128 + 256 + 256  # q, k, v biases and the two norms
    rest = 1000 * 256 + 2 * per_layer_vectors + 256  # embedding, vectors, final norm: in bf16
    int8 = 2 * sum(r * c + 2 * r for r, c in linears) + (1000 * 256 + 2 * 1000)
    int4 = 2 * sum(r * c // 2 + r * (c // 32) * 2 + r * 8 for r, c in linears) + (
        1000 * 256 // 2 + 1000 * 8 * 2 + 1000 * 8
    )
    assert memory.weight_line(cfg, "int8", "bf16").bytes == int8 + 2 * rest
    assert memory.weight_line(cfg, "int4-pure", "bf16").bytes == int4 + 2 * rest
    assert memory.weight_line(cfg, "int4-pure", "fp32").bytes == int4 + 4 * rest
    assert "bf16" in memory.weight_line(cfg, "int4-pure", "bf16").formula

    # int4's recipe for float weights: the head, and v and down of layer 1 (the last eighth), at
    # 6 bits: 6 a weight, an int8 scale per 16 and a float16 d per 256 (a row shorter than 256 has one).
    def int4_and_int6(rows, cols):
        return rows * cols // 2 + rows * (cols // 32) * 2 + rows * 8, rows * (
            cols * 6 // 8 + cols // 16 + 2 * -(-cols // 256)
        )

    more = sum(b - a for a, b in (int4_and_int6(1000, 256), int4_and_int6(128, 256), int4_and_int6(256, 512)))
    assert memory.weight_line(cfg, "int4", "bf16").bytes == int4 + more + 2 * rest


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_int4_bytes_are_what_each_devices_linear_holds(device, monkeypatch):
    """The plan's int4 bytes are the buffers of the linear r1 builds on that device: r1's kernel
    layout on the CPU, tinygemm's on CUDA (packed on the meta device, which needs no GPU)."""
    from r1 import quant

    monkeypatch.setattr(quant, "_cuda_nibble_order", lambda device: True)  # a GPU finds it by a multiply
    out_features, in_features = 256, 1536
    linear = (quant.Int4KernelLinear if device == "cpu" else quant.Int4CudaLinear)(in_features, out_features, False)
    linear.set_weight(torch.randn(out_features, in_features, device="cpu" if device == "cpu" else "meta"))
    held = sum(b.nbytes for b in linear.buffers())
    assert quant.int4_nbytes(out_features, in_features, device) == held
    # R1-1.5B's whole plan moves by the difference in its linears: tinygemm's bf16 scales, 11% more.
    on_cpu, on_cuda = (memory.weight_line(R1_1_5B, "int4", "bf16", d) for d in ("cpu", "cuda"))
    assert 1.05 < on_cuda.bytes / on_cpu.bytes < 1.15 and "bf16 scale, zero" in on_cuda.formula
    assert memory.plan(R1_1_5B, "int4", 4096, device="cuda").line("weights").bytes == on_cuda.bytes


@pytest.mark.parametrize(
    "model, quant_mode",
    [("small_gguf", "int4"), ("small_gguf", "int4-pure"), ("small_gguf", "int8"), ("tiny_model_folder", "int4")],
)
def test_per_tensor_bytes_are_the_loaded_models(model, quant_mode, request):
    """`r1 memory --per-tensor`'s bytes of each linear are the buffers the loaded linear holds (a
    fused linear's, the sum of its parts'), with the file's types deciding the format (the small
    stand-in's GGUF) or Q4_K_M's recipe (the tiny model's float weights)."""
    from r1.loaders import load_model, open_model_files

    path = str(request.getfixturevalue(model))
    files = open_model_files(path)
    source = memory.model_source(path)
    planned = {
        name: (fmt, nbytes)
        for name, _, _, fmt, nbytes in memory.weight_plan(source.config, quant_mode, "cpu", source.source_types)
    }
    model = load_model(files, torch.float32, "cpu", progress=False, quant=quant_mode)
    fused = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
    formats = set()
    for name, module in model.named_modules():
        if not isinstance(module, quant_module_types()) or ".runs." in name:  # a StackedLinear's parts: counted with it
            continue
        parent, _, leaf = name.rpartition(".")
        parts = [".".join(filter(None, (parent, part))) for part in fused.get(leaf, (leaf,))]
        held = sum(b.nbytes for b in module.buffers())
        assert held == sum(planned[p][1] for p in parts), name
        formats |= {planned[p][0] for p in parts}
    if model == "small_gguf" and quant_mode == "int4":  # Q8_0 and Q6_K at int6, Q5_0 at int6/32, Q4_K at int4
        assert {f.split(" / ")[0] for f in formats} == {"int6 + int8 scale", "int4 + 8-bit scale, low"}
        assert {f for f in formats if f.startswith("int6")} == {"int6 + int8 scale / 16", "int6 + int8 scale / 32"}
    if model == "tiny_model_folder":  # rows of 64 and 192 (short of a d's 256): Q4_K_M's Q5_0 and Q8_0
        assert formats == {"int6 + int8 scale / 16", "int6 + int8 scale / 32"}


def quant_module_types():
    from r1 import quant

    return (quant.Int8Linear, quant.Int4KernelLinear, quant.Int4Linear, quant.Int6KernelLinear, quant.StackedLinear)


def test_weight_formats_order_by_size():
    sizes = {q: memory.weight_line(R1_1_5B, q, "bf16").bytes for q in memory.QUANTS}
    # r1's int4 is 4.5 bits a weight (an 8-bit scale and low per 32), with Q4_K_M's tensors at 6.6,
    # but keeps the embedding in bf16.
    assert (
        sizes["fp32"]
        > sizes["bf16"]
        == sizes["fp16"]
        > sizes["int8"]
        > sizes["q8_0"]
        > sizes["q6_k"]
        > sizes["int4"]
        > sizes["int4-pure"]
        > sizes["q5_k_m"]
        > sizes["q4_k_m"]
        > sizes["q4_0"]
    )


def test_hf_folder_gives_exact_bytes_from_the_safetensors_header(tiny_hf):
    folder, _ = tiny_hf
    source = memory.model_source(str(folder))
    assert source.file_quant == "fp32" and source.file_weight_bytes == source.config.num_parameters() * 4
    assert memory.plan(source, "fp32", 64, device="cpu").line("weights").formula.startswith("exact tensor bytes")


@pytest.fixture
def offline(monkeypatch):
    """No hub: the default model id falls back to R1's built-in config."""
    from r1.loaders import hub

    def unreachable(*_, **__):
        raise ConnectionError("offline")

    monkeypatch.setattr(hub, "hub_snapshot", unreachable)


def test_default_model_offline_uses_the_known_config(offline):
    from r1.loaders import hub

    source = memory.model_source(hub.DEFAULT_MODEL)
    assert source.config == R1_1_5B and "built-in" in source.note
    with pytest.raises(ConnectionError):
        memory.model_source("someone/else")


# ---- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(quant="q3_xs"), "unknown quantization 'q3_xs'"),
        (dict(context=131073), "exceeds the model's maximum of 131,072"),
        (dict(context=0), "context must be a positive"),
        (dict(batch=-1), "batch must be a positive"),
        (dict(batch=257), "exceeds the engine's max_num_seqs"),
        (dict(kv_dtype="int3"), "unknown KV cache dtype"),
        (dict(device="tpu"), "device must be cpu or cuda"),
    ],
)
def test_bad_input_is_refused_clearly(kwargs, message):
    args = dict(quant="bf16", context=1024, batch=1) | kwargs
    with pytest.raises(ValueError, match=message):
        memory.plan(R1_1_5B, **args)


@pytest.mark.parametrize(
    "text, expected",
    [("8GiB", 8 * GiB), ("8 gb", 8 * 10**9), ("8G", 8 * GiB), ("7500MiB", 7500 << 20), ("1.5", int(1.5 * GiB))],
)
def test_parse_size(text, expected):
    assert memory.parse_size(text) == expected


@pytest.mark.parametrize("text", ["eight", "8TB", "-1GiB", "0"])
def test_parse_size_refuses_nonsense(text):
    with pytest.raises(ValueError, match="cannot read memory size"):
        memory.parse_size(text)


def test_cli_reports_bad_input_as_one_line(offline, capsys):
    assert main(["memory", "--quant", "q3_xs", "--context", "1024"]) == 1
    assert main(["memory", "--context", "200000"]) == 1
    assert main(["memory", "--batch", "-2", "--context", "1024"]) == 1
    errors = capsys.readouterr().err
    assert "unknown quantization" in errors and "maximum of 131,072" in errors and "batch must be" in errors


# ---- questions: fit, sweep, plot ----------------------------------------------------------------


@pytest.mark.parametrize("quant", ["bf16", "int4", "q4_k_m"])
def test_fit_is_the_largest_context_under_the_budget(quant):
    n = memory.fit_context(R1_1_5B, quant, 5 * GiB)  # a budget that runs out below the 128K maximum
    assert memory.plan(R1_1_5B, quant, n).total <= 5 * GiB < memory.plan(R1_1_5B, quant, n + 1).total
    assert memory.fit_context(R1_1_5B, quant, GiB // 2) is None  # not even the weights fit
    assert memory.fit_context(R1_1_5B, quant, 200 * GiB) == R1_1_5B.max_position_embeddings


def test_sweep_grows_with_context_and_stops_at_the_models_maximum(small_gguf):
    source = memory.model_source(str(small_gguf))  # a 32K model
    table = memory.sweep(source, ("bf16", "q4_k_m"))
    for plans in table.values():
        assert [p is None for p in plans] == [False] * 5 + [True] * 2
        totals = [p.total for p in plans if p]
        assert totals == sorted(totals)


def test_cli_json_modes(offline, capsys):
    assert main(["memory", "--context", "32768", "--quant", "bf16", "--json"]) == 0
    one = json.loads(capsys.readouterr().out)
    assert one["lines"][1]["name"] == "kv cache" and one["lines"][1]["bytes"] == 32768 * 28_672
    assert main(["memory", "--json", "--quant", "bf16,int4"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert table["contexts"][-1] == 131072 and len(table["total_gib"]["int4"]) == 7
    assert table["total_gib"]["int4"][0] < table["total_gib"]["bf16"][0]
    assert main(["memory", "--fit", "8GiB", "--json"]) == 0
    fit = json.loads(capsys.readouterr().out)
    assert fit["max_context"]["bf16"] == memory.fit_context(R1_1_5B, "bf16", 8 * GiB)


def test_cli_tables_and_plot(offline, tmp_path, capsys):
    import matplotlib  # noqa: F401  (the plot extra; a missing install fails here)

    png = tmp_path / "memory.png"
    assert main(["memory", "--plot", str(png)]) == 0
    shown = capsys.readouterr().out
    assert "128K" in shown and "H100 80 GB" in shown and "q4_k_m" in shown
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["memory", "--model", "demo-small", "--device", "cpu", "--context", "2048"]) == 0
    shown = capsys.readouterr().out
    assert "loading" in shown and "peak RSS" in shown


# ---- the engine's KV pool -----------------------------------------------------------------------


def test_pool_honours_a_stated_size_and_the_cpu_budget():
    cpu = torch.device("cpu")
    assert memory.kv_pool_tokens(R1_1_5B, EngineConfig(kv_cache_tokens=1000), cpu, torch.float32) == 992
    # A stated pool is kept past the two full contexts a sized one stops at.
    assert memory.kv_pool_tokens(R1_1_5B, EngineConfig(kv_cache_tokens=2**19), cpu, torch.bfloat16) == 2**19
    tokens = memory.kv_pool_tokens(R1_1_5B, EngineConfig(), cpu, torch.bfloat16)
    assert tokens == memory.CPU_KV_BUDGET_BYTES // 28_672 // 16 * 16
    short = dataclasses.replace(R1_1_5B, max_position_embeddings=4096)  # its budget holds 36 contexts
    assert memory.kv_pool_tokens(short, EngineConfig(), cpu, torch.bfloat16) == 2 * 4096


def test_step_budget_is_smaller_on_a_cpu_and_never_below_max_num_seqs():
    assert EngineConfig().resolved_max_num_batched_tokens("cpu") == 256
    assert EngineConfig().resolved_max_num_batched_tokens("cuda") == 2048
    assert EngineConfig(max_num_seqs=300).resolved_max_num_batched_tokens("cpu") == 300
    assert EngineConfig(max_num_batched_tokens=64).resolved_max_num_batched_tokens("cuda") == 64
    # The plan's activations are those of the device's chunk.
    cpu = memory.plan(R1_1_5B, "fp32", 4096, device="cpu")
    assert [line.bytes for line in cpu.lines if line.name == "activations"] == [
        memory.activation_bytes(R1_1_5B, 256, 4096, 4, 1)
    ]


def test_cuda_pool_leaves_room_for_a_step_at_the_context_it_allows():
    cuda, engine = torch.device("cuda"), EngineConfig()
    per_token = 28_672

    def reserve(context):
        return memory.activation_bytes(
            R1_1_5B, engine.resolved_max_num_batched_tokens("cuda"), context, 2, engine.max_num_seqs
        ) + memory.logits_bytes(R1_1_5B, engine.max_num_seqs, 2, async_scheduling=True)

    big = memory.kv_pool_tokens(R1_1_5B, engine, cuda, torch.bfloat16, free_bytes=120 * GiB)
    assert big > 20 * R1_1_5B.max_position_embeddings  # room for many full-length sequences
    assert big * per_token + reserve(R1_1_5B.max_position_embeddings) <= 0.9 * 120 * GiB
    small = memory.kv_pool_tokens(R1_1_5B, engine, cuda, torch.bfloat16, free_bytes=3 * GiB)
    assert small < R1_1_5B.max_position_embeddings  # the pool, and so the context, shrinks
    assert small * per_token + reserve(small) <= 0.9 * 3 * GiB
    assert (small + 64) * per_token + reserve(small + 64) > 0.9 * 3 * GiB
    with pytest.raises(RuntimeError, match="no room for a KV cache"):
        memory.kv_pool_tokens(R1_1_5B, engine, cuda, torch.bfloat16, free_bytes=GiB // 4)


# ---- against a real run -------------------------------------------------------------------------


def test_estimate_matches_a_measured_run_within_10_percent(small_gguf, tmp_path):
    """A fresh process loads the 0.5B in fp32 and prefills 1K tokens; its peak RSS (loading and
    serving) and its own accounting of parameters and KV cache are checked against the plan."""
    out = tmp_path / "memory.json"
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "memory_validation.py"),
            "--model",
            str(small_gguf),
            "--points",
            "fp32:1024:1",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.is_file(), done.stderr[-2000:]
    point = json.loads(out.read_text())["points"][0]
    m, p = point["measured"], point["estimate"]
    assert m["prompt_tokens"] == 1020
    lines = {line["name"]: line["bytes"] for line in p["lines"]}
    assert m["engine_param_bytes"] == lines["weights"] and m["engine_kv_bytes"] == lines["kv cache"]
    peak = max(m["peak_rss_loading"], m["peak_rss_serving"])
    assert abs(p["peak_rss_bytes"] / peak - 1) <= 0.10
    assert abs(p["serving_bytes"] / m["peak_rss_serving"] - 1) <= 0.10
    assert abs(lines["loading"] / m["peak_rss_loading"] - 1) <= 0.10
