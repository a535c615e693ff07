"""pass@k, cons@K and the summary against values worked out by hand."""

from __future__ import annotations

import random

import pytest

from r1.eval.metrics import ks_for, majority_correct, mean_ci95, pass_at_k, summarize


@pytest.mark.parametrize(
    "n, c, k, expected",
    [
        (4, 1, 1, 1 / 4),  # pass@1 is the fraction correct
        (4, 2, 2, 1 - 1 / 6),  # 1 - C(2,2)/C(4,2)
        (10, 3, 2, 1 - 21 / 45),  # 1 - C(7,2)/C(10,2)
        (10, 3, 5, 1 - 21 / 252),  # 1 - C(7,5)/C(10,5)
        (5, 3, 3, 1.0),  # only 2 wrong: any 3 include a right one
        (6, 0, 6, 0.0),
        (6, 6, 1, 1.0),
    ],
)
def test_pass_at_k(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected)


def test_pass_at_k_rejects_impossible_counts():
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_majority_vote():
    assert not majority_correct([("a", False), ("a", False), ("b", True)])
    assert majority_correct([("b", True), ("a", False)])  # a tie goes to the answer seen first
    assert not majority_correct([("a", False), ("b", True)])
    assert majority_correct([(None, False), (None, False), ("b", True)])  # no answer, no vote
    assert not majority_correct([(None, False), (None, False)])


def test_reported_ks():
    assert ks_for(64) == [1, 2, 4, 8, 16, 32, 64]
    assert ks_for(6) == [1, 2, 4, 6]
    assert ks_for(1) == [1]


def _records(problem_id, outcomes, finish=None, tokens=(10, 4)):
    return [
        {
            "problem_id": problem_id,
            "sample_index": j,
            "vote_key": key,
            "correct": ok,
            "finish_reason": (finish or ["stop"] * len(outcomes))[j],
            "completion_tokens": tokens[0],
            "reasoning_tokens": tokens[1],
            "answer_tokens": tokens[0] - tokens[1],
            "grade_error": None,
        }
        for j, (key, ok) in enumerate(outcomes)
    ]


def test_summary_by_hand():
    # p1: 2 of 4 right, the right answer "a" is the majority. p2: 1 of 4 right, "x" (wrong) wins.
    records = _records(
        "p1",
        [("a", True), ("a", True), ("b", False), ("c", False)],
        finish=["stop", "stop", "length", "stop"],
        tokens=(10, 4),
    ) + _records("p2", [("x", False), ("x", False), ("y", False), ("z", True)], tokens=(20, 16))
    s = summarize("aime2024", records, samples_per_problem=4)
    assert s["num_problems"] == 2 and s["num_samples"] == 8 and s["complete"]
    assert s["pass@1"] == pytest.approx((2 / 4 + 1 / 4) / 2)
    assert s["cons@4"] == pytest.approx(0.5)
    assert s["pass@2"] == pytest.approx(((1 - 1 / 6) + (1 - 3 / 6)) / 2)  # C(2,2)/C(4,2), C(3,2)/C(4,2)
    assert s["pass@4"] == 1.0
    # Per-problem scores 0.5 and 0.25: mean 0.375, sample sd 0.1768, half width 1.96 * 0.1768 / sqrt(2).
    assert s["pass@1_ci95"] == pytest.approx([0.375 - 0.2450, 0.375 + 0.2450], abs=1e-3)
    assert s["truncated_fraction"] == pytest.approx(1 / 8)
    assert s["mean_completion_tokens"] == 15 and s["mean_reasoning_tokens"] == 10 and s["mean_answer_tokens"] == 5
    # Samples are appended in finishing order; the scores must not depend on it.
    shuffled = records[:]
    random.Random(0).shuffle(shuffled)
    assert summarize("aime2024", shuffled, 4) == s


def test_an_unfinished_run_is_marked_and_skips_pass_at_k_it_cannot_compute():
    records = _records("p1", [("a", True), ("b", False)]) + _records("p2", [("a", True)])
    s = summarize("math500", records, samples_per_problem=2)
    assert not s["complete"]
    assert s["pass@1"] == pytest.approx((0.5 + 1.0) / 2)
    assert s["pass@2"] == 1.0  # only p1 has 2 samples


def test_ci95():
    assert mean_ci95([1.0]) is None  # one problem: no spread to estimate
    assert mean_ci95([0.0, 1.0, 1.0, 1.0]) == pytest.approx([0.26, 1.0], abs=0.01)  # clipped at 1
