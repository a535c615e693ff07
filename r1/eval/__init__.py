"""Reproducible math evaluation: `r1 eval` and the pieces it is made of.

data.py finds and reads the problem sets, grading.py extracts and checks answers, metrics.py
turns graded samples into scores, manifest.py records what produced a run, runner.py drives the
engine and keeps samples.jsonl, report.py prints the progress bar and the tables. grading.py and
metrics.py work on saved samples alone: they need no model.
"""
