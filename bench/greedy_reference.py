"""Greedy tokens of the stand-in models, recorded once and checked after any engine change.

`record` writes tests/data/greedy_reference.json; `check` runs the same requests and compares
token for token (tests/test_greedy_reference.py runs `check` for the assets installed). A change
meant to leave outputs alone (a refactor, a new scheduling path) must leave these identical.

    python bench/greedy_reference.py record
    python bench/greedy_reference.py check
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REFERENCE = Path(__file__).resolve().parents[1] / "tests" / "data" / "greedy_reference.json"
PROMPTS = [
    "Write a Python function that returns the n-th Fibonacci number.",
    "What is 17 * 23? Answer briefly.",
    "Explain what a hash map is in two sentences.",
    "def quicksort(xs):",
]
# (model, quant, tokenizer): the dequantized float path and r1's int4 and int6 kernels on each
# stand-in (the small one's int4 plan is mostly int6, its int4-pure all int4); with R1's
# tokenizer the prompt opens a <think> block and a reasoning budget closes it, so the reasoning
# tracker and the text split are checked too.
RUNS = [
    ("demo-small", "none", None),
    ("demo-small", "int4-pure", None),
    ("demo-small", "int4", "r1-tokenizer"),
    ("demo", "int4", None),
]
MAX_TOKENS = 40


def kernel_build() -> str | None:
    """The CPU kernel build int4 runs on: its float sums, so its tokens, are this build's."""
    from r1 import kernels

    return kernels.running_build().name if kernels.op("add_rms_norm") is not None else None


def key(model: str, quant: str, tokenizer: str | None) -> str:
    return f"{model}/{quant}" + (f"/{tokenizer}" if tokenizer else "")


def greedy_outputs(model: str, quant: str, tokenizer: str | None) -> list[dict]:
    """The prompts as one-turn chats, batched, greedy, MAX_TOKENS each: tokens and text split."""
    from r1 import LLM, SamplingParams

    # One thread: the split of decode attention's work follows the thread count, and with it the
    # sums' rounding, which a near tie can turn into another token (int4-pure's fourth prompt does).
    llm = LLM(model, tokenizer=tokenizer, quant=quant, progress=False, max_model_len=512, threads=1)
    budget = {"max_reasoning_tokens": 8} if tokenizer == "r1-tokenizer" else {}
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, **budget)
    done = llm.chat([[{"role": "user", "content": p}] for p in PROMPTS], params)
    return [{"token_ids": c.token_ids, "reasoning": c.reasoning, "answer": c.answer} for c in done]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["record", "check"])
    parser.add_argument(
        "--model", action="append", help="only this run, as model/quant[/tokenizer] (repeatable; default: all of RUNS)"
    )
    args = parser.parse_args()
    runs = [r for r in RUNS if not args.model or key(*r) in args.model]
    if args.action == "record":
        recorded = json.loads(REFERENCE.read_text()) if REFERENCE.exists() else {}
        recorded.update({key(*r): greedy_outputs(*r) for r in runs})
        recorded["cpu_kernels"] = kernel_build()
        lines = ",\n".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in recorded.items())
        REFERENCE.write_text("{\n" + lines + "\n}\n")
        print(f"wrote {REFERENCE}")
        return 0
    reference = json.loads(REFERENCE.read_text())
    if reference["cpu_kernels"] != kernel_build():  # another build's sums: int4 tokens may differ
        runs = [r for r in runs if not r[1].startswith("int4")]
    failed = False
    for run in runs:
        same = greedy_outputs(*run) == reference[key(*run)]
        failed |= not same
        print(f"{key(*run)}: {'identical' if same else 'DIFFERENT'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
