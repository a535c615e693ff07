"""Greedy outputs of the 0.5B stand-in match the tokens recorded in tests/data: a change meant to
leave outputs alone must leave these identical."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("greedy_reference", ROOT / "bench" / "greedy_reference.py")
greedy_reference = importlib.util.module_from_spec(spec)
spec.loader.exec_module(greedy_reference)
REFERENCE = json.loads(greedy_reference.REFERENCE.read_text())


@pytest.mark.parametrize(
    "run", [r for r in greedy_reference.RUNS if r[0] == "demo-small"], ids=lambda r: greedy_reference.key(*r)
)
def test_greedy_outputs_match_the_recorded_ones(run, small_gguf):
    if run[1].startswith("int4") and REFERENCE["cpu_kernels"] != greedy_reference.kernel_build():
        pytest.skip(f"recorded on the {REFERENCE['cpu_kernels']} kernels; int4 sums differ between builds")
    assert greedy_reference.greedy_outputs(*run) == REFERENCE[greedy_reference.key(*run)]
