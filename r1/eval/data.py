"""The problem sets: which tasks exist, where their problems come from, and reading them.

Owns the task table (name, default samples per problem, the Hugging Face dataset it downloads
from), finding a task's data (`--data`, then the r1 cache, then a download through
huggingface_hub that is converted and cached), and reading a JSON Lines file of
{id, problem, answer} into `Problem`s, failing clearly on a malformed one. It does not own prompts,
grading or the run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from r1.loaders.hub import cache_dir


@dataclass(frozen=True)
class Problem:
    index: int  # position in the data file; sample seeds derive from it
    id: str
    problem: str
    answer: str


@dataclass(frozen=True)
class Task:
    name: str
    samples: int  # default samples per problem (K)
    hf_dataset: str  # the Hugging Face dataset repo it downloads from
    hf_files: str  # glob of the data file inside that repo


# DeepSeek-R1 reports pass@1 from "k responses (typically between 4 and 64, depending on the test
# set size)" per question: 64 for the small contest sets, 4 for the large ones.
TASKS = {
    "math500": Task("math500", 4, "HuggingFaceH4/MATH-500", "test.jsonl"),
    "aime2024": Task("aime2024", 64, "HuggingFaceH4/aime_2024", "*.parquet"),
    "aime2025": Task("aime2025", 64, "math-ai/aime25", "test.jsonl"),
    "amc23": Task("amc23", 64, "math-ai/amc23", "*test*.parquet"),
    "gsm8k": Task("gsm8k", 4, "openai/gsm8k", "main/test-*.parquet"),
}


def cached_path(task: str) -> Path:
    return cache_dir() / "eval" / f"{task}.jsonl"


def find_data(task: str, data: str | Path | None = None) -> Path:
    """The JSON Lines file to evaluate on: `data`, else the cache, else a download into the cache."""
    if data is not None:
        path = Path(data).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"--data {path}: no such file")
        return path
    path = cached_path(task)
    if path.is_file():
        return path
    try:
        rows = normalize_rows(task, _download_rows(TASKS[task]))
    except Exception as e:  # offline, no such repo, no parquet reader: all end the same way
        raise FileNotFoundError(
            f"no data for {task!r}: not in the cache ({path}) and the download from the Hugging Face "
            f"dataset {TASKS[task].hf_dataset} failed "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
            f'Pass a JSON Lines file of {{"id", "problem", "answer"}} with --data, or put one at {path}'
        ) from None
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    with open(partial, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    partial.replace(path)
    return path


def read_problems(path: Path) -> list[Problem]:
    """Every problem of a JSON Lines file with id, problem and answer on each line."""
    problems, seen = [], set()
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                p = Problem(len(problems), str(row["id"]), row["problem"], str(row["answer"]))
                if not isinstance(p.problem, str):
                    raise TypeError("problem is not a string")
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{line_no}: not a JSON object with id, problem and answer ({e})") from None
            if not p.problem.strip() or not p.answer.strip():
                raise ValueError(f"{path}:{line_no}: problem {p.id!r} has an empty problem or answer")
            if p.id in seen:
                raise ValueError(f"{path}:{line_no}: problem id {p.id!r} appears twice")
            seen.add(p.id)
            problems.append(p)
    if not problems:
        raise ValueError(f"{path}: no problems")
    return problems


def normalize_rows(task: str, rows: list[dict]) -> list[dict]:
    """Rows of a downloaded dataset as {id, problem, answer}: the field names differ by source."""
    out = []
    ids = [_first(r, "id", "unique_id", "ID") for r in rows]
    use_ids = all(i is not None for i in ids) and len(set(map(str, ids))) == len(ids)
    for i, row in enumerate(rows):
        answer, problem = _first(row, "answer", "Answer"), _first(row, "problem", "question", "Problem")
        if answer is None or problem is None:
            raise ValueError(f"row {i} has no problem or answer field (fields: {sorted(row)})")
        if isinstance(answer, float) and answer.is_integer():  # AMC sets store 27 as 27.0
            answer = int(answer)
        answer = str(answer)
        if "####" in answer:  # GSM8K: the worked solution, then "#### 1,234"
            answer = answer.rsplit("####", 1)[1].strip().replace(",", "")
        out.append({"id": str(ids[i]) if use_ids else f"{task}-{i}", "problem": problem, "answer": answer})
    return out


def _first(row: dict, *names: str):
    return next((row[n] for n in names if row.get(n) is not None), None)


def _download_rows(task: Task) -> list[dict]:
    from huggingface_hub import snapshot_download

    folder = Path(snapshot_download(task.hf_dataset, repo_type="dataset", allow_patterns=[task.hf_files]))
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.match(task.hf_files))
    if not files:
        raise FileNotFoundError(f"no file matching {task.hf_files} in {task.hf_dataset}")
    if files[0].suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError(f"{task.hf_dataset} is stored as parquet: pip install pyarrow to read it") from None
        return [row for f in files for row in pq.read_table(f).to_pylist()]
    return [json.loads(line) for f in files for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
