"""`r1 bench host`'s figures for two versions of r1 in one run: the working tree and a base commit.

Each figure is measured in a fresh process for each tree in turn, alternating, and the median of
--repeats kept, so that the drift of a shared machine falls on both alike. The base tree gets this
tree's r1/bench_host.py; a base whose EngineRequest has no `stream` field streamed every request,
and is given the field (ignored there) so the same workload runs.

    python bench/host_before_after.py --base 0f45a4a --save bench/results/host_xeon.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from r1 import bench  # noqa: E402

CHILD = """
import json, sys
from r1 import bench_host
from r1.llm import load_tokenizer
from r1.loaders import open_model_files
tok = load_tokenizer(None, open_model_files(sys.argv[1]))
print(json.dumps(bench_host.host_table(tok, [int(sys.argv[2])], int(sys.argv[3]))))
"""


def base_tree(commit: str, where: Path) -> Path:
    tree = where / "base"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-f", str(tree), commit], check=True)
    shutil.copy(ROOT / "r1" / "bench_host.py", tree / "r1" / "bench_host.py")
    interface = tree / "r1" / "engine" / "interface.py"
    text = interface.read_text()
    if "stream: bool" not in text:
        salt = "    cache_salt: str | None = None  # its prefix-cache blocks are shared only under the same salt\n"
        interface.write_text(text.replace(salt, salt + "    stream: bool = True\n", 1))
    return tree


def measure(tree: Path, model: str, n: int, output_len: int, extensions: Path | None = None) -> list[dict]:
    """One run of CHILD in tree; its CPU kernels built under `extensions` when given (two trees
    sharing torch's build folder would rebuild their differing kernels at every turn)."""
    env = os.environ | ({"TORCH_EXTENSIONS_DIR": str(extensions)} if extensions else {})
    out = subprocess.run(
        [sys.executable, "-c", CHILD, model, str(n), str(output_len)], cwd=tree, capture_output=True, text=True, env=env
    )
    if out.returncode:
        raise RuntimeError(f"{tree}: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="the commit to compare against")
    p.add_argument("--model", default="demo", help="whose tokenizer the requests use")
    p.add_argument("--sizes", default="1,16,64,256")
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--save", default=None)
    a = p.parse_args()
    machine = bench.machine()
    base_commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", a.base], capture_output=True, text=True, check=True
    ).stdout.strip()
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = base_tree(base_commit, Path(tmp))
        try:
            for n in map(int, a.sizes.split(",")):
                runs = {"before": [], "after": []}
                for _ in range(a.repeats):
                    runs["before"].append(measure(base, a.model, n, a.output_len, Path(tmp) / "extensions"))
                    runs["after"].append(measure(ROOT, a.model, n, a.output_len))
                for i, case in enumerate(runs["after"][0]):
                    before = statistics.median(r[i]["host_ms_per_step"] for r in runs["before"])
                    after = statistics.median(r[i]["host_ms_per_step"] for r in runs["after"])
                    row = {k: case[k] for k in ("num_seqs", "sampled", "stream")}
                    row |= {"before_ms": before, "after_ms": after, "speedup": round(before / after, 2)}
                    rows.append(row)
                    print(
                        f"{n:4d} seqs  {'sampled' if case['sampled'] else 'greedy ':7s}  "
                        f"{'stream' if case['stream'] else 'final ':6s}  before {before:7.3f} ms  "
                        f"after {after:7.3f} ms  {before / after:5.2f}x",
                        flush=True,
                    )
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)], check=False)
    if a.save:
        record = {
            "command": " ".join(["python", *sys.argv]),
            "machine": machine,
            "base_commit": base_commit,
            "head_commit": head,
            "output_len": a.output_len,
            "repeats": a.repeats,
            "rows": rows,
        }
        Path(a.save).write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
