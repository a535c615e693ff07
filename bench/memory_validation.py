"""Check `r1 memory` against real runs: peak RSS of the engine on the CPU, point by point.

Each (dtype, context, batch) point runs in a fresh subprocess: load the model with a KV pool of
exactly batch x context tokens, then prefill `batch` prompts of context - 4 random tokens and
decode 4. The child reports getrusage's peak RSS twice, for loading and for serving (the peak is
reset in between through /proc/self/clear_refs), and the engine's own accounting (parameter and
KV cache bytes). The parent puts each next to r1.memory's estimate for the CPU.

    python bench/memory_validation.py                     # the 1.5B stand-in, writes bench/results/memory_cpu.json
    python bench/memory_validation.py --model demo-small --points fp32:1024:1 --out /tmp/m.json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_POINTS = ("fp32:1024:1", "fp32:4096:1", "bf16:2048:1", "bf16:1024:4")
NEW_TOKENS = 4
TOLERANCE = 0.10


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def child(model: str, dtype: str, context: int, batch: int) -> dict:
    """Measure one point in this (fresh) process."""
    import torch

    from r1 import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(model, dtype=dtype, device="cpu", kv_cache_tokens=batch * context, max_model_len=context, progress=False)
    load_seconds = time.perf_counter() - start
    peak_loading, rss_loaded = _peak_rss(), _rss()
    params = {id(p): p.numel() * p.element_size() for p in llm.model.parameters()}
    kv_bytes = llm.engine.config_record()["kv_cache_bytes"]
    # Reset the high-water mark so the next reading is the serving phase alone (Linux >= 4.0).
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 150_000, (context - NEW_TOKENS,), generator=g).tolist() for _ in range(batch)]
    start = time.perf_counter()
    out = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS))
    return {
        "peak_rss_loading": peak_loading,
        "peak_rss_serving": _peak_rss(),
        "rss_after_loading": rss_loaded,
        "engine_param_bytes": sum(params.values()),
        "engine_kv_bytes": kv_bytes,
        "prompt_tokens": sum(c.usage["prompt_tokens"] for c in out),
        "load_seconds": round(load_seconds, 1),
        "run_seconds": round(time.perf_counter() - start, 1),
    }


def measure(model: str, dtype: str, context: int, batch: int) -> dict:
    """Run one point in a fresh subprocess and return what it measured."""
    cmd = [sys.executable, __file__, "--child", model, dtype, str(context), str(batch)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"measurement {dtype}:{context}:{batch} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(model: str, dtype: str, context: int, batch: int, measured: dict) -> dict:
    """One point: measured and estimated bytes side by side, with est / measured - 1."""
    from r1.memory import CPU_RUNTIME_BYTES, model_source, plan

    p = plan(model_source(model), dtype, context, batch, device="cpu")
    peak = max(measured["peak_rss_loading"], measured["peak_rss_serving"])
    rows = {
        "peak_rss": (peak, p.peak_rss),
        "peak_rss_loading": (measured["peak_rss_loading"], p.loading.bytes),
        "peak_rss_serving": (measured["peak_rss_serving"], p.serving),
        "engine_weights_and_kv": (
            measured["engine_param_bytes"] + measured["engine_kv_bytes"],
            p.line("weights").bytes + p.line("kv cache").bytes,
        ),
        "runtime_baseline": (
            measured["rss_after_loading"] - measured["engine_param_bytes"] - measured["engine_kv_bytes"],
            CPU_RUNTIME_BYTES,
        ),
    }
    return {
        "dtype": dtype,
        "context": context,
        "batch": batch,
        "measured": measured,
        "estimate": p.to_dict(),
        "comparison": {k: {"measured": m, "estimated": e, "error": round(e / m - 1, 4)} for k, (m, e) in rows.items()},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", nargs=4, metavar=("MODEL", "DTYPE", "CONTEXT", "BATCH"), help=argparse.SUPPRESS)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--points", nargs="+", default=list(DEFAULT_POINTS), help="dtype:context:batch")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "memory_cpu.json"))
    a = ap.parse_args(argv)
    if a.child:
        model, dtype, context, batch = a.child
        print(json.dumps(child(model, dtype, int(context), int(batch))))
        return 0

    import torch

    from r1 import bench

    machine = bench.machine()  # before the runs: the load average is the other work on the machine
    results = []
    for point in a.points:
        dtype, context, batch = point.split(":")
        row = compare(a.model, dtype, int(context), int(batch), measure(a.model, dtype, int(context), int(batch)))
        results.append(row)
        c = row["comparison"]
        print(
            f"{point:>14}: peak RSS {c['peak_rss']['measured'] / 2**30:.3f} GiB measured, "
            f"{c['peak_rss']['estimated'] / 2**30:.3f} estimated ({c['peak_rss']['error']:+.1%}); serving "
            f"{c['peak_rss_serving']['measured'] / 2**30:.3f} vs {c['peak_rss_serving']['estimated'] / 2**30:.3f} "
            f"({c['peak_rss_serving']['error']:+.1%})",
            flush=True,
        )
    worst = max(abs(r["comparison"][k]["error"]) for r in results for k in ("peak_rss", "peak_rss_serving"))
    report = {
        "what": "peak RSS of r1 on the CPU (getrusage ru_maxrss, fresh subprocess per point) against "
        "r1.memory.plan(device='cpu'); loading and serving peaks measured apart (clear_refs reset)",
        "model": a.model,
        "threads": torch.get_num_threads(),
        "gpu": "none in this session: torch.cuda.max_memory_allocated was not recorded",
        "tolerance": TOLERANCE,
        "worst_error": worst,
        "within_tolerance": worst <= TOLERANCE,
        "points": results,
    }
    bench.save(a.out, report, machine)
    print(f"worst error {worst:.1%} (tolerance {TOLERANCE:.0%}); wrote {a.out}")
    return 0 if worst <= TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
