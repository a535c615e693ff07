"""End to end: data, a run with the small stand-in, a run killed and resumed, and the report."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from r1.eval import data, runner
from r1.eval.data import find_data, normalize_rows, read_problems
from r1.eval.runner import EvalSettings, read_samples, run_eval

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "eval"
MATH500 = DATA / "math500.jsonl"
# Few tokens keep this fast; one problem at a time (2 samples in flight) lets a kill land mid-run.
SETTINGS = EvalSettings("math500", samples=2, max_tokens=8, seed=0)
ENGINE = {"threads": 1, "max_num_seqs": 2}


# ---- data ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, count", [("math500", 500), ("aime2024", 30), ("aime2025", 30), ("amc23", 40), ("gsm8k", 1319)]
)
def test_the_shared_sets_read(name, count):
    problems = read_problems(DATA / f"{name}.jsonl")
    assert len(problems) == count
    assert [p.index for p in problems] == list(range(count))


def test_malformed_data_is_refused(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "problem": "1+1?", "answer": "2"}\n{"id": "a", "problem": "2+2?", "answer": "4"}\n')
    with pytest.raises(ValueError, match="appears twice"):
        read_problems(bad)
    bad.write_text('{"id": "a", "problem": "1+1?", "answer": ""}\n')
    with pytest.raises(ValueError, match="empty"):
        read_problems(bad)
    bad.write_text('{"id": "a", "question": "1+1?"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        read_problems(bad)


def test_downloaded_rows_are_normalized():
    gsm8k = [{"question": "How many?", "answer": "3 + 4 = <<3+4=7>>7\n#### 1,234"}]
    assert normalize_rows("gsm8k", gsm8k) == [{"id": "gsm8k-0", "problem": "How many?", "answer": "1234"}]
    amc = [{"id": 3, "question": "Find m+n.", "answer": 27.0}]
    assert normalize_rows("amc23", amc) == [{"id": "3", "problem": "Find m+n.", "answer": "27"}]


def test_task_data_is_downloaded_once_then_read_from_the_cache(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setenv("R1_CACHE", str(tmp_path / "cache"))
    repo = tmp_path / "repo"  # shaped like HuggingFaceH4/MATH-500
    repo.mkdir()
    (repo / "test.jsonl").write_text(
        json.dumps({"problem": "1+1?", "answer": "2", "unique_id": "test/a/1.json"}) + "\n"
    )
    asked = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: asked.append(repo_id) or str(repo))
    path = find_data("math500")
    assert asked == ["HuggingFaceH4/MATH-500"]
    assert [(p.id, p.answer) for p in read_problems(path)] == [("test/a/1.json", "2")]
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _offline)
    assert find_data("math500") == path  # cached: no second download


def _offline(*args, **kwargs):
    raise OSError("network unreachable")


def test_offline_without_data_says_how_to_get_it(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setenv("R1_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _offline)
    with pytest.raises(FileNotFoundError, match="--data") as e:
        find_data("aime2024")
    assert "HuggingFaceH4/aime_2024" in str(e.value)
    assert data.cached_path("aime2024").name in str(e.value)


def test_a_torn_last_line_is_skipped_and_only_the_writer_cuts_it(tmp_path):
    path = tmp_path / "samples.jsonl"
    torn = '{"a": 1}\n{"a": 2}\n{"a": 3, "b"'
    path.write_text(torn)
    assert read_samples(path) == [{"a": 1}, {"a": 2}]
    assert path.read_text() == torn  # a reader (say, eval report) leaves the file alone
    assert read_samples(path, repair=True) == [{"a": 1}, {"a": 2}]
    assert path.read_text() == '{"a": 1}\n{"a": 2}\n'  # appending goes on after the last good line
    path.write_text('{"a": 1}\n{"a": 2}')  # cut just before its newline: still the sample in flight
    assert read_samples(path, repair=True) == [{"a": 1}]
    assert path.read_text() == '{"a": 1}\n'
    path.write_text('{"a": 1}\nnot json\n{"a": 2}\n')
    with pytest.raises(ValueError, match="damaged"):
        read_samples(path)


# ---- runs ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llm():
    from r1.llm import LLM

    return LLM("demo-small", progress=False, **ENGINE)


@pytest.fixture(scope="module")
def problems():
    return read_problems(MATH500)[:3]


@pytest.fixture(scope="module")
def full_run(llm, problems, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    summary = run_eval(llm, problems, SETTINGS, out, data_path=MATH500)
    return out, summary


def test_a_run_writes_samples_manifest_and_summary(full_run, problems):
    out, summary = full_run
    samples = read_samples(out / "samples.jsonl")
    assert sorted((s["problem_id"], s["sample_index"]) for s in samples) == sorted(
        (p.id, j) for p in problems for j in range(2)
    )
    s = samples[0]
    for key in (
        "prompt",
        "output",
        "reasoning",
        "extracted",
        "gold",
        "correct",
        "finish_reason",
        "prompt_tokens",
        "completion_tokens",
        "reasoning_tokens",
        "answer_tokens",
    ):
        assert key in s
    assert s["prompt"].endswith("Please reason step by step, and put your final answer within \\boxed{}.")
    assert {x["seed"] for x in samples} == set(range(6))  # seed + problem_index * K + sample_index
    assert all(0 < x["completion_tokens"] <= 8 for x in samples)

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["sha256"] == "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
    assert manifest["data"]["sha256"] == "680cfd5f6d38b444f5ae6662c0da445210a362f6826b5a2d27df98c92ab42b67"
    assert manifest["settings"]["temperature"] == 0.6 and manifest["settings"]["top_p"] == 0.95
    assert manifest["engine"]["version"] and manifest["engine"]["dtype"] == "float32"
    assert manifest["model"]["weight_types"]["Q5_0"] > 0
    assert manifest["finished_at"] and manifest["sessions"][0]["machine"]["cpu_count"]

    assert json.loads((out / "summary.json").read_text()) == summary
    assert summary["num_problems"] == 3 and summary["samples_per_problem"] == 2 and summary["complete"]
    for key in (
        "pass@1",
        "pass@1_ci95",
        "cons@2",
        "pass@2",
        "truncated_fraction",
        "mean_reasoning_tokens",
        "mean_answer_tokens",
    ):
        assert key in summary


def test_a_killed_run_resumes_without_redoing_samples_and_ends_the_same(llm, problems, full_run, tmp_path):
    out = tmp_path / "killed"
    log = tmp_path / "stderr.txt"
    cmd = [
        sys.executable,
        "-m",
        "r1.cli",
        "eval",
        "--task",
        "math500",
        "--data",
        str(MATH500),
        "--model",
        "demo-small",
        "--samples",
        "2",
        "--max-tokens",
        "8",
        "--limit",
        "3",
        "--seed",
        "0",
        "--out",
        str(out),
        "--threads",
        "1",
        "--max-num-seqs",
        "2",
    ]
    with open(log, "w") as stderr:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=stderr)
    samples_path = out / "samples.jsonl"
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
        if samples_path.exists() and samples_path.read_bytes().count(b"\n") >= 1:
            break
        time.sleep(0.02)
    proc.kill()
    assert proc.wait() == -signal.SIGKILL, f"the run ended before it was killed:\n{log.read_text()}"

    before = read_samples(samples_path)
    assert 1 <= len(before) < 6
    assert not (out / "summary.json").exists()

    summary = run_eval(llm, problems, SETTINGS, out, data_path=MATH500, resume=True)
    after = read_samples(samples_path)
    assert after[: len(before)] == before  # finished samples were kept, not regenerated
    assert len(after) == 6
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s.get("samples_generated") for s in manifest["sessions"]] == [None, 6 - len(before)]

    full_out, full_summary = full_run
    assert summary == full_summary

    def by_key(records):
        return {
            (r["problem_id"], r["sample_index"]): (r["output"], r["completion_tokens"], r["finish_reason"])
            for r in records
        }

    assert by_key(after) == by_key(read_samples(full_out / "samples.jsonl"))  # seeds make samples reproducible


def test_a_run_directory_is_not_mixed_with_another_run(llm, problems, full_run):
    out, _ = full_run
    with pytest.raises(ValueError, match="--resume"):
        run_eval(llm, problems, SETTINGS, out, data_path=MATH500)
    other = EvalSettings("math500", samples=2, max_tokens=8, seed=1)
    with pytest.raises(ValueError, match="settings"):
        run_eval(llm, problems, other, out, data_path=MATH500, resume=True)
    # A KV cache of another dtype changes the numbers each sample is drawn from.
    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    assert manifest["engine"]["config"]["kv_cache_dtype"] == "float32"
    manifest["engine"]["config"]["kv_cache_dtype"] = "int8"
    kept = manifest_path.read_text()
    manifest_path.write_text(json.dumps(manifest))
    try:
        with pytest.raises(ValueError, match="kv_cache_dtype"):
            run_eval(llm, problems, SETTINGS, out, data_path=MATH500, resume=True)
    finally:
        manifest_path.write_text(kept)
    with runner._only_writer(out):  # as if another process were still writing it
        with pytest.raises(ValueError, match="another r1 eval"):
            run_eval(llm, problems, SETTINGS, out, data_path=MATH500, resume=True)


def test_report_prints_a_run_and_compares_two(full_run, capsys):
    from r1.cli import main

    out, summary = full_run
    assert main(["eval", "report", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "pass@1" in printed and "cons@2" in printed and "demo-small" in printed
    assert main(["eval", "report", str(out), str(out)]) == 0
    assert capsys.readouterr().out.count(str(out.name)) >= 2
