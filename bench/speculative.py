"""Batch-1 decode with speculative decoding, against llama.cpp's own tools, in one run.

r1 decodes each prompt of bench/data/speculative_prompts.json (code, a math word problem, an
R1-style reasoning prompt; greedy, chat template) plain, with `--speculative ngram` and with
`--speculative draft:DRAFT`; llama.cpp's `llama-speculative` decodes the same rendered prompts
with the same two GGUF files and the same number of guesses, and `llama-bench` gives its plain
batch-1 decode. With --batches, r1 also runs B of the prompts at once, plain and with the draft
guessing in every step, to show where speculation stops paying (the default
--speculative-disable-by-batch-size). Prints tok/s, guesses kept and the ratios, and saves the
record (machine, command, figures) to bench/results/.

    python bench/speculative.py --model demo --draft demo-small --quant int4 \\
        --llama-bin ../llama-work/build/bin --save bench/results/speculative_demo.json
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import tempfile
import time
from pathlib import Path

from r1 import LLM, SamplingParams, bench, options
from r1.loaders import hub

PROMPTS = Path(__file__).parent / "data" / "speculative_prompts.json"


def gguf_path(source: str) -> Path:
    path = hub.demo_path(source) if source in hub.DEMO_ASSETS else Path(source)
    if path.suffix != ".gguf":
        raise SystemExit(f"llama.cpp needs a .gguf file; {source} is not one")
    return path


def load_r1(args, speculative: str | None, **engine_options) -> LLM:
    return LLM(
        args.model,
        quant=args.quant,
        threads=args.threads,
        speculative=speculative,
        num_speculative_tokens=args.k,
        speculative_draft_quant=args.draft_quant,
        progress=False,
        **engine_options,
    )


def run_r1(args, speculative: str | None, prompts: list[dict]) -> dict:
    llm = load_r1(args, speculative)
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    llm.chat([{"role": "user", "content": "Hi."}], SamplingParams(temperature=0, max_tokens=8))  # warm-up
    per_prompt = []
    for p in prompts:
        before = llm.engine.stats()
        c = llm.chat(p["messages"], params)[0]
        after = llm.engine.stats()
        tokens = c.usage["completion_tokens"] - 1  # the first comes from the prefill
        proposed, accepted = after.spec_proposed - before.spec_proposed, after.spec_accepted - before.spec_accepted
        per_prompt.append(
            {
                "name": p["name"],
                "tokens": tokens,
                "seconds": round(c.timing["decode_seconds"], 3),
                "tok_s": round(tokens / c.timing["decode_seconds"], 2),
                "acceptance": round(accepted / proposed, 3) if proposed else None,
                "token_ids_head": c.token_ids[:16],
            }
        )
    return {"settings": bench.engine_settings(llm, args.model), "prompts": per_prompt, **_totals(per_prompt)}


def run_batches(args, prompts: list[dict], batches: list[int]) -> dict:
    """Output tok/s of B prompts at once (64 greedy tokens each, eos ignored), plain and with the
    draft guessing whatever the batch."""
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    conversations = [p["messages"] for p in prompts]
    figures = {}
    for name, speculative in (("plain", None), ("draft", f"draft:{args.draft}")):
        llm = load_r1(args, speculative, speculative_disable_by_batch_size=max(batches) + 1)
        llm.chat(conversations[:1], SamplingParams(temperature=0, max_tokens=8))  # warm-up
        for b in batches:
            batch = [conversations[i % len(conversations)] for i in range(b)]
            start = time.perf_counter()
            tokens = sum(c.usage["completion_tokens"] for c in llm.chat(batch, params))
            figures.setdefault(str(b), {})[name] = round(tokens / (time.perf_counter() - start), 2)
        del llm
    for row in figures.values():
        row["draft_vs_plain"] = round(row["draft"] / row["plain"], 3)
    return figures


def run_llama_speculative(args, prompts: list[dict], rendered: list[str]) -> dict:
    exe = Path(args.llama_bin) / "llama-speculative"
    per_prompt = []
    for p, text in zip(prompts, rendered):
        with tempfile.NamedTemporaryFile("w", suffix=".txt") as f:
            f.write(text)
            f.flush()
            cmd = [
                str(exe), "-m", str(gguf_path(args.model)), "-md", str(gguf_path(args.draft)), "-f", f.name,
                "-n", str(args.max_tokens), "--spec-draft-n-max", str(args.k), "-t", str(args.threads),
                "-td", str(args.threads), "--temp", "0", "-c", "4096",
            ]  # fmt: skip
            log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
        decoded = re.search(r"decoded\s+(\d+) tokens in\s+([\d.]+) seconds", log)
        drafted, accepted = (int(re.search(rf"{k}\s*=\s*(\d+)", log).group(1)) for k in ("n_drafted", "n_accept"))
        tokens, seconds = int(decoded.group(1)), float(decoded.group(2))
        per_prompt.append(
            {
                "name": p["name"],
                "tokens": tokens,
                "seconds": seconds,
                "tok_s": round(tokens / seconds, 2),
                "acceptance": round(accepted / drafted, 3) if drafted else None,
            }
        )
    return {"command": " ".join(cmd[:1] + ["..."] + cmd[3:]), "prompts": per_prompt, **_totals(per_prompt)}


def run_llama_bench(args) -> dict:
    cmd = [str(Path(args.llama_bin) / "llama-bench"), "-m", str(gguf_path(args.model)), "-t", str(args.threads)]
    cmd += ["-p", "0", "-n", str(args.max_tokens), "-r", "2", "-o", "json"]
    rows = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    return {"command": " ".join(cmd), "tok_s": round(rows[0]["avg_ts"], 2)}


def _totals(per_prompt: list[dict]) -> dict:
    tokens, seconds = sum(p["tokens"] for p in per_prompt), sum(p["seconds"] for p in per_prompt)
    code = [p for p in per_prompt if p["name"].startswith("code")]
    return {
        "tok_s": round(tokens / seconds, 2),
        "code_tok_s": round(sum(p["tokens"] for p in code) / sum(p["seconds"] for p in code), 2),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="demo")
    p.add_argument("--draft", default="demo-small")
    p.add_argument("--quant", default="int4", choices=options.QUANT_MODES)
    p.add_argument(
        "--draft-quant", default=None, choices=options.QUANT_MODES, help="default: r1's (int4-pure under an int4)"
    )
    p.add_argument("--k", type=int, default=4, help="the most guesses a step, for r1 and llama.cpp alike")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--llama-bin", default=None, help="llama.cpp's build/bin (bench/README.md says how to build it)")
    p.add_argument("--batches", default=None, help="e.g. 1,2,4: also r1 plain and draft at these batch sizes")
    p.add_argument("--save", default=None, metavar="PATH")
    args = p.parse_args(argv)
    machine = bench.machine()
    prompts = json.loads(PROMPTS.read_text())
    result = {"what": __doc__.split("\n\n")[0], "k": args.k}
    start = time.perf_counter()
    runs = {
        "r1": run_r1(args, None, prompts),
        "r1_ngram": run_r1(args, "ngram", prompts),
        "r1_draft": run_r1(args, f"draft:{args.draft}", prompts),
    }
    if args.llama_bin:
        tokenizer = LLM(args.model, progress=False, kv_cache_tokens=256).tokenizer
        rendered = [tokenizer.decode(tokenizer.encode_chat(p["messages"]), skip_special_tokens=False) for p in prompts]
        runs["llama_speculative"] = run_llama_speculative(args, prompts, rendered)
        runs["llama_bench"] = run_llama_bench(args)
    result["runs"] = runs
    if args.batches:
        result["batches"] = run_batches(args, prompts, [int(b) for b in args.batches.split(",")])
    plain = runs["r1"]["tok_s"]
    ratios = {f"{name}_vs_r1_plain": round(run["tok_s"] / plain, 3) for name, run in runs.items() if name != "r1"}
    ratios["r1_draft_code_vs_r1_plain_code"] = round(runs["r1_draft"]["code_tok_s"] / runs["r1"]["code_tok_s"], 3)
    if "llama_speculative" in runs:
        for name in ("r1", "r1_ngram", "r1_draft"):
            ratios[f"{name}_vs_llama_speculative"] = round(runs[name]["tok_s"] / runs["llama_speculative"]["tok_s"], 3)
        ratios["r1_vs_llama_bench"] = round(plain / runs["llama_bench"]["tok_s"], 3)
    result["ratios"] = ratios
    result["seconds"] = round(time.perf_counter() - start, 1)
    for name, run in runs.items():
        kept = [x["acceptance"] for x in run.get("prompts", []) if x.get("acceptance") is not None]
        print(f"{name:18s} {run['tok_s']:7.2f} tok/s" + (f"   kept {sum(kept) / len(kept):.0%}" if kept else ""))
    for name, ratio in ratios.items():
        print(f"{name:40s} {ratio:.3f}x")
    for b, row in result.get("batches", {}).items():
        print(f"batch {b}: plain {row['plain']:.2f} tok/s, draft {row['draft']:.2f} ({row['draft_vs_plain']:.3f}x)")
    if args.save:
        bench.save(args.save, result, machine)
    return result


if __name__ == "__main__":
    main()
