"""Grading: the last boxed answer after </think>, math-verify equivalence, and the hard time limit."""

from __future__ import annotations

import time

import pytest

from r1.eval.grading import Grader, answer_section, last_boxed


@pytest.fixture(scope="module")
def grader():
    with Grader() as g:
        yield g


@pytest.mark.parametrize(
    "gold, written",
    [
        (r"\frac{1}{2}", "0.5"),  # fraction and decimal
        (r"\frac12", r"\dfrac{1}{2}"),  # LaTeX spellings of one fraction
        ("0.75", r"\frac{3}{4}"),
        (r"\left( 3, \frac{\pi}{2} \right)", r"(3,\frac{\pi}{2})"),  # a MATH-500 gold as written there
        (r"10\sqrt{2}", r"\sqrt{200}"),
        ("[-2,7]", "[-2, 7]"),  # intervals
        (r"(-\infty, 3)", r"(-\infty,3)"),
        (r"5\text{ cm}", "5"),  # units in \text{}
        ("18", r"18 \text{ dollars}"),
        (r"\text{(C)}", "C"),  # a multiple-choice letter
        ("25", "025"),  # AIME answers with leading zeros
        ("1000", "1,000"),
        ("2, -2", "-2, 2"),  # a list of solutions in another order
    ],
)
def test_equivalent_forms_are_correct(grader, gold, written):
    grade = grader.grade(f"so the answer is $\\boxed{{{written}}}$.", gold)
    assert grade.extracted == written
    assert grade.correct, (gold, written)
    assert grade.error is None


@pytest.mark.parametrize(
    "gold, written",
    [
        ("3", "4"),
        ("[-2,7]", "(-2,7)"),  # open and closed intervals differ
        (r"\frac{1}{3}", "0.3333"),
        (r"\pi", "3.14159"),
        (r"\text{(C)}", "D"),
    ],
)
def test_wrong_answers_are_wrong(grader, gold, written):
    assert not grader.grade(f"\\boxed{{{written}}}", gold).correct


def test_no_boxed_answer_scores_zero(grader):
    grade = grader.grade("The answer is 4.", "4")
    assert (grade.extracted, grade.correct, grade.vote_key) == (None, False, None)


def test_the_last_of_several_boxes_counts(grader):
    text = r"First guess \boxed{3}, but checking again gives \boxed{4}."
    assert grader.grade(text, "4").correct
    assert not grader.grade(text, "3").correct


def test_the_answer_comes_from_after_the_reasoning(grader):
    text = r"<think>maybe \boxed{4}</think>The answer is \boxed{5}."
    assert grader.grade(text, "5").correct
    assert not grader.grade(text, "4").correct
    # Cut off inside the reasoning (no </think>): the whole text is searched.
    assert grader.grade(r"<think>it is \boxed{4} I think", "4").correct


def test_box_extraction():
    assert last_boxed(r"\boxed{\frac{1}{\sqrt{2}}}") == r"\frac{1}{\sqrt{2}}"  # nested braces
    assert last_boxed(r"\boxed{\{1,2\}}") == r"\{1,2\}"  # escaped braces do not close the box
    assert last_boxed(r"\boxed{3} and then \boxed{4") == "3"  # a box cut off by the length limit
    assert last_boxed(r"$\boxed 7$.") == "7"
    assert last_boxed(r"\fbox{8}") == "8"
    assert answer_section("a</think>b</think>c") == "c"
    assert answer_section("no tags") == "no tags"


def test_equal_values_vote_together(grader):
    keys = {grader.grade(f"\\boxed{{{w}}}", "9").vote_key for w in (r"\frac{1}{2}", r"\dfrac12", "0.5")}
    assert len(keys) == 1
    assert grader.grade(r"\boxed{\frac13}", "9").vote_key not in keys


def test_a_pathological_answer_times_out_and_grading_goes_on():
    with Grader(timeout_s=1) as g:
        start = time.perf_counter()
        # sympy tries to evaluate this tower; math-verify's own limit is 5 s, so the kill comes first.
        grade = g.grade(r"\boxed{9^{9^{9^{9}}}}", "3")
        assert time.perf_counter() - start < 4
        assert (grade.correct, grade.error) == (False, "timeout")
        assert grade.extracted == "9^{9^{9^{9}}}"
        assert g.grade(r"\boxed{3}", "3").correct  # a fresh worker took over
