"""Where a batch-1 decode step's time goes: per-op CPU time from torch's profiler, the weight
kernels' effective read bandwidth, and what is left outside the ops (Python and dispatch).

    python bench/profile_step.py --model demo --quant int4 --save bench/results/profile_step_demo_CPU.json

The model decodes one token at a time after a `--context`-token prompt. Steps are timed bare
(min and median of --steps), in one C++ call where it runs (r1/model/cpu_decode.py) and through
the Python layers alternately, then profiled through the Python layers: each op's self time per
step, the weight kernels' bytes over their time, and the step's time outside any op.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from r1 import LLM, bench, options
from r1.engine import ModelRunner

WEIGHT_KERNELS = ("r1::int4_matmul", "r1::int6_matmul", "r1::int8_matmul", "aten::addmm", "aten::mm")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="demo")
    p.add_argument("--quant", default="int4", choices=options.QUANT_MODES)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--save", default=None, metavar="PATH")
    args = p.parse_args(argv)
    machine = bench.machine()
    llm = LLM(args.model, quant=args.quant, threads=args.threads, kv_cache_tokens=16, progress=False)
    # The model's forward over a cache of its own, as the engine's runner runs it, minus the engine.
    block_size = 16
    table = list(range(-(-(args.context + 2 * args.steps + 8) // block_size)))
    runner = ModelRunner(llm.model, len(table), block_size, llm.dtype)
    runner.run_chunks([(list(range(1000, 1000 + args.context)), 0, table)])  # the prompt's KV
    position = args.context

    def step() -> None:
        nonlocal position
        runner.run_chunks([([1234], position, table)])
        position += 1

    model = llm.model
    for _ in range(3):
        step()
    # Steps in one C++ call (r1/model/cpu_decode.py, where it runs) and through the Python layers,
    # alternately; the profile below sees the ops only through the Python layers.
    seconds, python_seconds = [], []
    for _ in range(args.steps):
        for fused, times in ((True, seconds), (False, python_seconds)):
            model.cpu_decode = fused
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
    profiled = 10
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(profiled):
            step()
        wall = (time.perf_counter() - start) / profiled
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    per_step = {e.key: (e.self_cpu_time_total / 1e3 / profiled, e.count // profiled) for e in ops}
    op_ms = sum(ms for ms, _ in per_step.values())
    kernel_ms = sum(per_step[k][0] for k in WEIGHT_KERNELS if k in per_step)
    read_bytes = bench.decode_read_bytes(llm.model)
    result = {
        "settings": bench.engine_settings(llm, args.model),
        "context": args.context,
        "cpu_decode_step": model.cpu_decode_step is not None,
        "step_ms_min": round(1e3 * min(seconds), 2),
        "step_ms_median": round(1e3 * statistics.median(seconds), 2),
        "python_layers_step_ms_min": round(1e3 * min(python_seconds), 2),
        "python_layers_step_ms_median": round(1e3 * statistics.median(python_seconds), 2),
        "profiled_step_ms": round(1e3 * wall, 2),
        "ops_ms": round(op_ms, 2),
        "outside_ops_ms": round(1e3 * wall - op_ms, 2),
        "weight_kernels_ms": round(kernel_ms, 2),
        "decode_read_bytes": read_bytes,
        "weight_kernels_gb_s": round(read_bytes / (kernel_ms / 1e3) / 1e9, 2),
        "bus_fraction_at_median": bench.bus_fraction(1 / statistics.median(seconds), read_bytes, machine),
        "ops": {k: {"ms": round(ms, 3), "calls": n} for k, (ms, n) in list(per_step.items())[:16]},
    }
    print(
        f"step: min {result['step_ms_min']} ms, median {result['step_ms_median']} ms; through the Python layers "
        f"min {result['python_layers_step_ms_min']}, median {result['python_layers_step_ms_median']}, profiled "
        f"{result['profiled_step_ms']} ms = ops {result['ops_ms']} + outside {result['outside_ops_ms']}"
    )
    print(
        f"weight kernels: {kernel_ms:.1f} ms for {read_bytes / 1e6:,.0f} MB = {result['weight_kernels_gb_s']} GB/s "
        f"(the machine reads {machine.get('read_gb_s')} GB/s)"
    )
    for name, op in result["ops"].items():
        print(f"  {name:32s} {op['ms']:8.3f} ms  {op['calls']:5d} calls")
    if args.save:
        bench.save(args.save, result, machine)
    return result


if __name__ == "__main__":
    with torch.inference_mode():
        main()
