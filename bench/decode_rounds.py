"""Batch-1 decode, r1 against llama.cpp's llama-bench, in alternating rounds.

A shared VM's memory bandwidth drifts by 20-40% over minutes, more than the gap being measured,
so one run of each engine (bench/compare.py) can land in different weather. Here r1 stays loaded
and each round runs r1's decode, then llama-bench's, at the same depth: a `--prompt-len` prompt,
then `--output-len` greedy tokens (r1.bench.latency; `llama-bench -p 0 -n OUTPUT -d PROMPT`,
llama.cpp's f16 cache). Each round's ratio compares the two under the same conditions; the
medians of the rounds are the figures, with each as a fraction of the bus (bench.bus_fraction, at
the median of the read bandwidth measured after each round).

    python bench/decode_rounds.py --llama-bin ../llama-work/build/bin --rounds 5 \\
        --save bench/results/decode_rounds_demo_int4_CPU.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
from pathlib import Path

from r1 import bench, options
from r1.loaders import resolve_path


def llama_bench_decode(bin_dir: Path, path: Path, threads: int, prompt_len: int, output_len: int) -> float:
    """llama-bench's tg tok/s at a KV depth of prompt_len (its mean over 2 repetitions)."""
    command = [str(bin_dir / "llama-bench"), "-m", str(path), "-t", str(threads), "-o", "json", "-r", "2"]
    command += ["-p", "0", "-n", str(output_len), "-d", str(prompt_len)]
    [row] = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)
    return row["avg_ts"]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="demo", help="a .gguf file or demo / demo-small")
    p.add_argument("--llama-bin", required=True, help="llama.cpp's build/bin (bench/README.md)")
    p.add_argument("--quant", default="int4", choices=options.QUANT_MODES)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--save", default=None, metavar="PATH")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.output_len < 2:
        p.error("--rounds must be at least 1 and --output-len at least 2")

    from r1 import LLM

    machine = bench.machine()
    path = resolve_path(args.model)
    llm = LLM(args.model, device="cpu", threads=args.threads, quant=args.quant, progress=False)
    r1_bytes, llama_bytes = bench.decode_read_bytes(llm.model), bench.gguf_decode_read_bytes(path)
    rounds = []
    for i in range(args.rounds):
        r1 = bench.latency(llm, args.prompt_len, args.output_len, 1, seed=i)["decode_tok_s"]
        llama = llama_bench_decode(Path(args.llama_bin), path, args.threads, args.prompt_len, args.output_len)
        read = bench.read_bandwidth_gb_s()  # the round's weather
        rounds.append({"r1": r1, "llama_bench": llama, "ratio": r1 / llama, "read_gb_s": read})
        print(f"round {i + 1}: r1 {r1:.2f} tok/s, llama-bench {llama:.2f}: {r1 / llama:.2f}x; {read} GB/s", flush=True)
    bus = {"read_gb_s": statistics.median(r["read_gb_s"] for r in rounds)}
    r1_median = statistics.median(r["r1"] for r in rounds)
    llama_median = statistics.median(r["llama_bench"] for r in rounds)
    result = {
        "settings": {**bench.engine_settings(llm, args.model), "prompt_len": args.prompt_len},
        "output_len": args.output_len,
        "rounds": rounds,
        "r1_decode_tok_s": r1_median,
        "llama_bench_decode_tok_s": llama_median,
        "ratio_of_medians": r1_median / llama_median,
        "median_ratio": statistics.median(r["ratio"] for r in rounds),
        "r1_read_bytes": r1_bytes,
        "llama_bench_read_bytes": llama_bytes,
        "read_gb_s": bus["read_gb_s"],
        "r1_bus_fraction": bench.bus_fraction(r1_median, r1_bytes, bus),
        "llama_bench_bus_fraction": bench.bus_fraction(llama_median, llama_bytes, bus),
    }
    print(
        f"medians: r1 {r1_median:.2f} tok/s ({result['r1_bus_fraction']:.0%} of the bus), llama-bench "
        f"{llama_median:.2f} ({result['llama_bench_bus_fraction']:.0%}); median ratio {result['median_ratio']:.2f}x"
    )
    if args.save:
        bench.save(args.save, result, machine)
    return result


if __name__ == "__main__":
    main()
