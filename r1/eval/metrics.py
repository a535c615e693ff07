"""Scores from graded samples: pass@1 with its 95% interval, pass@k, cons@K, lengths, truncation.

Owns the arithmetic only, on sample records as samples.jsonl stores them (problem_id,
sample_index, correct, vote_key, finish_reason, token counts), in any order: a resumed run writes
samples in finishing order, and its scores must not depend on that. It does not grade or read
files. Scores are fractions in [0, 1]; tables print them as percentages.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter, defaultdict

Z_95 = 1.959963984540054  # the normal quantile for a two-sided 95% interval


def pass_at_k(n: int, c: int, k: int) -> float:
    """Chance that at least one of k samples drawn from n (c of them correct) is correct.

    The unbiased estimator of Chen et al. (2021): 1 - C(n-c, k) / C(n, k).
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def majority_correct(votes: list[tuple[str | None, bool]]) -> bool:
    """cons@K for one problem: is the most common answer right? votes are (vote_key, correct) in
    sample order; samples without an answer do not vote; a tie goes to the answer seen first."""
    counts = Counter(key for key, _ in votes if key is not None)
    if not counts:
        return False
    top = max(counts.values())
    winner = next(key for key, _ in votes if key is not None and counts[key] == top)
    return next(correct for key, correct in votes if key == winner)


def ks_for(samples: int) -> list[int]:
    """The k reported for pass@k: powers of two below K, and K itself."""
    ks = [1 << i for i in range(samples.bit_length()) if 1 << i < samples]
    return ks + [samples]


def mean_ci95(values: list[float]) -> list[float] | None:
    """Normal-approximation 95% interval of the mean over problems, clipped to [0, 1]."""
    if len(values) < 2:
        return None
    mean = statistics.fmean(values)
    half = Z_95 * statistics.stdev(values) / math.sqrt(len(values))
    return [max(0.0, mean - half), min(1.0, mean + half)]


def summarize(task: str, records: list[dict], samples_per_problem: int) -> dict:
    """summary.json's scores for these samples; problems with fewer than k samples skip pass@k."""
    by_problem: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_problem[r["problem_id"]].append(r)
    groups = [sorted(g, key=lambda r: r["sample_index"]) for g in by_problem.values()]
    per_problem = [statistics.fmean(r["correct"] for r in g) for g in groups]
    summary = {
        "task": task,
        "num_problems": len(groups),
        "samples_per_problem": samples_per_problem,
        "num_samples": len(records),
        "complete": all(len(g) == samples_per_problem for g in groups),
        "pass@1": _mean(per_problem),
        "pass@1_ci95": mean_ci95(per_problem),
        f"cons@{samples_per_problem}": _mean(
            [majority_correct([(r["vote_key"], r["correct"]) for r in g]) for g in groups]
        ),
    }
    for k in ks_for(samples_per_problem)[1:]:
        summary[f"pass@{k}"] = _mean(
            [pass_at_k(len(g), sum(r["correct"] for r in g), k) for g in groups if len(g) >= k]
        )
    summary["truncated_fraction"] = _mean([r["finish_reason"] == "length" for r in records])
    for name in ("completion_tokens", "reasoning_tokens", "answer_tokens"):
        summary[f"mean_{name}"] = _mean([r[name] for r in records])
    summary["grading_errors"] = sum(r.get("grade_error") is not None for r in records)
    return summary


def _mean(values: list) -> float | None:
    return statistics.fmean(values) if values else None
