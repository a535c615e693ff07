"""What quantization costs in quality: each --quant and --kv-dtype against the float model on the
same weights, and beside llama.cpp's own quantization of them.

For every mode it loads the model (one at a time) and scores bench/data/kl_text.txt as
`llama-perplexity --kl-divergence` does: the text's tokens in chunks of 512, each chunk on a fresh
cache, its second half scored (positions 256-510 predicting the next token). Against the first
mode (the reference, float32 weights) it reports the mean KL divergence of the next-token
distribution, how often the likeliest token is the same, and the perplexity over those positions;
then greedy agreement over a few chat prompts, the weight bytes a decode step reads (every weight
but the embedding table, of which it reads one row) and, with --humaneval, HumanEval pass@1
(bench/humaneval.py).

--peer FILE.gguf adds a GGUF file's own weights, dequantized exactly (--quant none): llama.cpp's
quality on the same tokens, up to its int8 activations; its bytes are the file's tensors but the
embedding. Make one with llama.cpp's tools from a float GGUF of the same model
(`llama-quantize model-f16.gguf model-q4_k_m.gguf Q4_K_M`).

    python bench/quant_quality.py  # the 1.5B stand-in, writes bench/results/quant_quality_demo.json
    python bench/quant_quality.py --model f16.gguf --modes fp32,int4,int4-pure --peer q4_k_m.gguf --out ...
    python bench/quant_quality.py --modes fp32,int4,int4-pure --humaneval --out ...
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
from pathlib import Path

import torch

BENCH = Path(__file__).parent
KL_TEXT = BENCH / "data" / "kl_text.txt"
CHUNK = 512  # llama-perplexity's default context: each chunk's second half is scored

# name -> (dtype, weight quant, KV cache dtype)
MODES = {
    "fp32": ("fp32", "none", "auto"),
    "bf16": ("bf16", "none", "auto"),
    "int8": ("fp32", "int8", "auto"),
    "int4": ("fp32", "int4", "auto"),
    "int4-pure": ("fp32", "int4-pure", "auto"),
    "kv-int8": ("fp32", "none", "int8"),
    "int4+kv-int8": ("fp32", "int4", "int8"),
}
PEER = "peer"
PROMPTS = (
    "Please reason step by step, and put your final answer within \\boxed{}. What is 17 * 23?",
    "Write a Python function that returns the n-th Fibonacci number.",
    "Explain why the sky is blue in two sentences.",
    "Translate into French: The library opens at nine and closes at five.",
    "List three prime numbers greater than 100.",
)


def scored_log_probs(llm, text_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities (positions, vocab) at every scored position of every chunk, and the
    tokens that follow them."""
    from r1.eval.perplexity import token_logits

    kv = llm.engine_config.resolved_kv_dtype(llm.dtype)
    rows, targets = [], []
    for start in range(0, len(text_ids) - CHUNK + 1, CHUNK):
        chunk = text_ids[start : start + CHUNK]
        logits = token_logits(llm.model, chunk, kv)[CHUNK // 2 : CHUNK - 1]
        rows.append(logits.log_softmax(dim=-1))
        targets.append(torch.tensor(chunk[CHUNK // 2 + 1 :]))
    return torch.cat(rows), torch.cat(targets)


def run_mode(model: str, dtype: str, quant: str, kv_dtype: str, a) -> dict:
    from r1 import LLM, SamplingParams, bench

    llm = LLM(model, dtype=dtype, quant=quant, kv_dtype=kv_dtype, device="cpu", threads=a.threads, progress=False)
    text_ids = llm.tokenizer.encode(KL_TEXT.read_text())
    log_probs, targets = scored_log_probs(llm, text_ids)
    out = llm.chat(
        [[{"role": "user", "content": p}] for p in PROMPTS],
        SamplingParams(temperature=0.0, max_tokens=a.tokens, ignore_eos=True),
    )
    run = {
        "log_probs": log_probs,
        "targets": targets,
        "text_tokens": len(text_ids),
        "greedy": [c.token_ids for c in out],
        "decode_bytes": bench.decode_read_bytes(llm.model),
    }
    if a.humaneval:
        import humaneval

        run["humaneval"] = humaneval.pass_at_1(llm)
    return run


def divergence(ref: dict, run: dict) -> dict:
    """Mean KL(ref || this) over the scored positions, the share whose likeliest token is ref's,
    and this run's perplexity there."""
    ref_lp, lp = ref["log_probs"], run["log_probs"]
    kl = (ref_lp.exp() * (ref_lp - lp)).sum(dim=-1)
    same_top = (ref_lp.argmax(dim=-1) == lp.argmax(dim=-1)).float()
    nll = -lp.gather(1, run["targets"][:, None]).mean()
    return {
        "kl": round(kl.mean().item(), 5),
        "kl_standard_error": round(kl.std().item() / math.sqrt(kl.numel()), 5),
        "same_top_token": round(same_top.mean().item(), 4),
        "perplexity": round(math.exp(nll.item()), 4),
    }


def agreement(ref: list[list[int]], got: list[list[int]]) -> dict:
    same = [sum(a == b for a, b in zip(r, g)) / len(r) for r, g in zip(ref, got)]
    first_diff = [next((i for i, (a, b) in enumerate(zip(r, g)) if a != b), len(r)) for r, g in zip(ref, got)]
    return {"token_agreement": statistics.mean(same), "tokens_before_first_difference": statistics.mean(first_diff)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo")
    ap.add_argument(
        "--modes", default="fp32,bf16,int8,int4,int4-pure,kv-int8,int4+kv-int8", help="the first is the reference"
    )
    ap.add_argument("--peer", default=None, help="a GGUF file of the same model, scored with its own weights")
    ap.add_argument("--humaneval", action="store_true", help="HumanEval pass@1 too (bench/humaneval.py)")
    ap.add_argument("--tokens", type=int, default=64, help="greedy tokens per prompt")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(BENCH / "results" / "quant_quality_demo.json"))
    a = ap.parse_args(argv)

    from r1 import bench, kernels

    machine = bench.machine()
    names = a.modes.split(",")
    runs = {}
    for name in names:
        runs[name] = run_mode(a.model, *MODES[name], a)
        gc.collect()
    if a.peer:
        runs[PEER] = run_mode(a.peer, "fp32", "none", "auto", a)
        runs[PEER]["decode_bytes"] = bench.gguf_decode_read_bytes(a.peer)
        names.append(PEER)
    ref = runs[names[0]]
    rows = {}
    for name in names:
        r = runs[name]
        dtype, quant, kv_dtype = MODES.get(name, ("fp32", "none", "auto"))
        rows[name] = {
            "model": a.peer if name == PEER else a.model,
            "dtype": dtype,
            "quant": quant,
            "kv_dtype": kv_dtype,
            "decode_bytes": r["decode_bytes"],
            **divergence(ref, r),
            **agreement(ref["greedy"], r["greedy"]),
        }
        if "humaneval" in r:
            rows[name]["humaneval"] = r["humaneval"]
        humaneval = f", HumanEval {r['humaneval']['pass_at_1']}" if "humaneval" in r else ""
        print(
            f"{name:>12}: {r['decode_bytes'] / 1e6:,.0f} MB a token, KL {rows[name]['kl']:.5f} "
            f"(+-{rows[name]['kl_standard_error']:.5f}), same top token {rows[name]['same_top_token']:.1%}, "
            f"perplexity {rows[name]['perplexity']:.3f}, greedy agreement {rows[name]['token_agreement']:.0%}"
            f"{humaneval}",
            flush=True,
        )
    report = {
        "what": f"each mode against {names[0]} on bench/data/kl_text.txt ({ref['text_tokens']} tokens) as "
        f"llama-perplexity --kl-divergence scores it (chunks of {CHUNK}, the second half of each: "
        f"{ref['targets'].numel()} positions): mean KL divergence, same top token, perplexity there; "
        f"greedy agreement over {len(PROMPTS)} chat prompts x {a.tokens} tokens; decode_bytes, the "
        "weights a decode step reads",
        "model": a.model,
        "cpu_kernels": kernels.running_build().name if kernels.running_build() else "off",
        "modes": rows,
    }
    bench.save(a.out, report, machine)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
