"""What quantization costs in quality: each --quant and --kv-dtype against bf16 on the same weights.

For every mode it loads the model (one at a time), scores r1.eval.perplexity.REFERENCE_TEXT (in one
pass, as a prompt is prefilled, and a token at a time, as generation reads the KV cache) and
generates greedily from a few fixed prompts, then compares with the bf16 run: perplexity, the
mean KL divergence from bf16's next-token distribution over the text and how often the likeliest
token is the same (as llama.cpp's `perplexity --kl-divergence` reports; steadier than perplexity
on a short text), and greedy agreement as the share of generated positions whose token equals
bf16's and the mean number of tokens before the first difference.

    python bench/quant_quality.py  # the 1.5B stand-in, writes bench/results/quant_quality_demo.json
    python bench/quant_quality.py --model demo-small --tokens 16 --out /tmp/q.json
"""

from __future__ import annotations

import argparse
import gc
import statistics
from pathlib import Path

# (name, dtype, weight quant, KV cache dtype); the first is the reference the others are compared with.
MODES = (
    ("bf16", "bf16", "none", "auto"),
    ("fp32", "fp32", "none", "auto"),
    ("int8", "fp32", "int8", "auto"),
    ("int4", "fp32", "int4", "auto"),
    ("kv-int8", "fp32", "none", "int8"),
    ("int4+kv-int8", "fp32", "int4", "int8"),
)
PROMPTS = (
    "Please reason step by step, and put your final answer within \\boxed{}. What is 17 * 23?",
    "Write a Python function that returns the n-th Fibonacci number.",
    "Explain why the sky is blue in two sentences.",
    "Translate into French: The library opens at nine and closes at five.",
    "List three prime numbers greater than 100.",
)


def run_mode(model: str, dtype: str, quant: str, kv_dtype: str, tokens: int, threads: int | None) -> dict:
    from r1 import LLM, SamplingParams
    from r1.eval.perplexity import REFERENCE_TEXT, perplexity, token_logits

    llm = LLM(model, dtype=dtype, quant=quant, kv_dtype=kv_dtype, device="cpu", threads=threads, progress=False)
    text_ids = llm.tokenizer.encode(REFERENCE_TEXT)
    out = llm.chat(
        [[{"role": "user", "content": p}] for p in PROMPTS],
        SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True),
    )
    kv = llm.engine_config.resolved_kv_dtype(llm.dtype)
    return {
        "perplexity": perplexity(llm.model, text_ids, kv),
        "perplexity_decoded": perplexity(llm.model, text_ids, kv, one_at_a_time=True),
        "log_probs": token_logits(llm.model, text_ids, kv).log_softmax(dim=-1),
        "text_tokens": len(text_ids),
        "greedy": [c.token_ids for c in out],
    }


def divergence(ref_log_probs, log_probs) -> dict:
    """Mean KL(ref || this) over the text's positions, and the share whose likeliest token is ref's."""
    kl = (ref_log_probs.exp() * (ref_log_probs - log_probs)).sum(dim=-1)
    same_top = (ref_log_probs.argmax(dim=-1) == log_probs.argmax(dim=-1)).float()
    return {"kl_vs_bf16": round(kl.mean().item(), 5), "same_top_token": round(same_top.mean().item(), 4)}


def agreement(ref: list[list[int]], got: list[list[int]]) -> dict:
    same = [sum(a == b for a, b in zip(r, g)) / len(r) for r, g in zip(ref, got)]
    first_diff = [next((i for i, (a, b) in enumerate(zip(r, g)) if a != b), len(r)) for r, g in zip(ref, got)]
    return {"token_agreement": statistics.mean(same), "tokens_before_first_difference": statistics.mean(first_diff)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--tokens", type=int, default=64, help="greedy tokens per prompt")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "quant_quality_demo.json"))
    a = ap.parse_args(argv)

    from r1 import bench, quant

    machine = bench.machine()
    runs = {}
    for name, dtype, mode, kv_dtype in MODES:
        runs[name] = run_mode(a.model, dtype, mode, kv_dtype, a.tokens, a.threads)
        gc.collect()
    ref = runs[MODES[0][0]]
    rows = {}
    for name, dtype, mode, kv_dtype in MODES:
        r = runs[name]
        rows[name] = {
            "dtype": dtype,
            "quant": mode,
            "kv_dtype": kv_dtype,
            "perplexity": round(r["perplexity"], 4),
            "perplexity_vs_bf16": round(r["perplexity"] / ref["perplexity"] - 1, 4),
            "perplexity_decoded": round(r["perplexity_decoded"], 4),
            "perplexity_decoded_vs_bf16": round(r["perplexity_decoded"] / ref["perplexity"] - 1, 4),
            **divergence(ref["log_probs"], r["log_probs"]),
            **agreement(ref["greedy"], r["greedy"]),
        }
        print(
            f"{name:>12}: perplexity {r['perplexity']:.3f} ({rows[name]['perplexity_vs_bf16']:+.1%} vs bf16), "
            f"decoded {r['perplexity_decoded']:.3f} ({rows[name]['perplexity_decoded_vs_bf16']:+.1%}), "
            f"KL {rows[name]['kl_vs_bf16']:.4f}, same top token {rows[name]['same_top_token']:.0%}, "
            f"greedy agreement {rows[name]['token_agreement']:.0%}, "
            f"{rows[name]['tokens_before_first_difference']:.1f} tokens before the first difference",
            flush=True,
        )
    report = {
        "what": "quantized weights against bf16 on the same checkpoint: perplexity on "
        "r1.eval.perplexity.REFERENCE_TEXT (in one pass, and decoded: a token a forward, "
        "through decode attention), KL divergence from bf16 and the same top token over "
        "that text in one pass, and greedy agreement over "
        f"{len(PROMPTS)} chat prompts x {a.tokens} tokens",
        "model": a.model,
        "int4_kernel": quant.int4_linear_class().__name__,
        "text_tokens": ref["text_tokens"],
        "modes": rows,
    }
    bench.save(a.out, report, machine)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
