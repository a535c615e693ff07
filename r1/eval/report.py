"""Terminal output of an evaluation: the live progress bar, the summary table, two runs compared.

Owns presentation only (rich): scores print as percentages, and a run is read back from its
directory (summary.json, or the samples so far when the run did not finish). It does not compute
scores beyond calling metrics.summarize on saved samples.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from r1.eval.metrics import summarize
from r1.eval.runner import read_samples

# DeepSeek-R1-Distill-Qwen-1.5B as published (temperature 0.6, top-p 0.95, 32,768 tokens).
PUBLISHED = {"math500": {"pass@1": 0.839}, "aime2024": {"pass@1": 0.289, "cons@64": 0.527}}


class EvalProgress:
    """The bar shown during a run: problems done, samples/s, running pass@1."""

    def __init__(self, console, task: str):
        self.bar = Progress(
            TextColumn(f"{task}"),
            BarColumn(),
            TextColumn("{task.fields[problems]} problems"),
            TextColumn("{task.fields[rate]} samples/s"),
            TextColumn("pass@1 {task.fields[score]}"),
            TimeElapsedColumn(),
            console=console,
        )
        self.task_id = None

    def __enter__(self) -> EvalProgress:
        self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.stop()

    def start(self, state) -> None:
        self.task_id = self.bar.add_task(
            "eval", total=state.samples_total, completed=state.samples_done, **self._fields(state)
        )

    def update(self, state) -> None:
        self.bar.update(self.task_id, completed=state.samples_done, **self._fields(state))

    @staticmethod
    def _fields(state) -> dict:
        elapsed = time.perf_counter() - state.started
        score = f"{100 * state.correct_done / state.samples_done:.1f}%" if state.samples_done else "-"
        return {
            "problems": f"{state.problems_done}/{state.problems_total}",
            "rate": f"{state.generated / elapsed:.2f}" if elapsed > 0 else "-",
            "score": score,
        }


def load_run(folder: str | Path) -> tuple[dict, dict]:
    """(summary, manifest) of a run directory; a run that did not finish is summarized from its samples."""
    folder = Path(folder)
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{folder}: not an eval run (no manifest.json)")
    manifest = json.loads(manifest_path.read_text())
    summary_path = folder / "summary.json"
    if summary_path.is_file() and manifest.get("finished_at"):
        return json.loads(summary_path.read_text()), manifest
    settings = manifest["settings"]
    return summarize(settings["task"], read_samples(folder / "samples.jsonl"), settings["samples"]), manifest


def _rows(summary: dict, manifest: dict | None) -> list[tuple[str, str]]:
    rows = [
        ("task", summary["task"]),
        ("problems", str(summary["num_problems"])),
        ("samples per problem", str(summary["samples_per_problem"])),
    ]
    if not summary.get("complete", True):
        rows.append(("complete", "no: summarized from the samples so far"))
    ci = summary.get("pass@1_ci95")
    rows.append(("pass@1", _pct(summary["pass@1"]) + (f"  (95% CI {_pct(ci[0])} - {_pct(ci[1])})" if ci else "")))
    for key, value in summary.items():
        if key.startswith(("cons@", "pass@")) and key not in ("pass@1", "pass@1_ci95"):
            rows.append((key, _pct(value)))
    rows.append(("cut off at max tokens", _pct(summary["truncated_fraction"])))
    for name in ("completion", "reasoning", "answer"):
        value = summary.get(f"mean_{name}_tokens")
        rows.append((f"mean {name} tokens", "-" if value is None else f"{value:.0f}"))
    if summary.get("grading_errors"):
        rows.append(("grading errors", str(summary["grading_errors"])))
    if manifest:
        s = manifest["settings"]
        rows.append(("model", manifest["model"]["source"]))
        rows.append(
            ("sampling", f"T={s['temperature']} top-p={s['top_p']} max {s['max_tokens']} tokens seed {s['seed']}")
        )
    published = PUBLISHED.get(summary["task"], {})
    rows += [(f"published {k} (R1-Distill-Qwen-1.5B)", _pct(v)) for k, v in published.items()]
    return rows


def summary_table(summary: dict, manifest: dict | None = None) -> Table:
    table = Table(title="r1 eval", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for name, value in _rows(summary, manifest):
        table.add_row(name, value)
    return table


def compare_table(runs: list[tuple[str, dict, dict]]) -> Table:
    """Runs side by side, one column each; runs are (label, summary, manifest)."""
    table = Table(title="r1 eval: comparison")
    table.add_column("")
    for label, _, _ in runs:
        table.add_column(label)
    columns = [dict(_rows(summary, manifest)) for _, summary, manifest in runs]
    names = list(dict.fromkeys(name for col in columns for name in col))
    for name in names:
        table.add_row(name, *(col.get(name, "-") for col in columns))
    return table


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"
