"""`r1 bench latency` and `r1 bench throughput` at tiny sizes: the JSON they print and save, and
figures that agree with each other (tokens, seconds and rates)."""

from __future__ import annotations

import json

import pytest

from r1 import bench
from r1.cli import main


def _run_json(capsys, *args) -> dict:
    assert main(["bench", *args]) == 0
    return json.loads(capsys.readouterr().out)  # stdout holds exactly one JSON object


def test_latency_json_and_saved_record(tiny_model_folder, tmp_path, capsys):
    saved = tmp_path / "results" / "latency.json"
    out = _run_json(
        capsys,
        "latency",
        "--model",
        str(tiny_model_folder),
        "--prompt-len",
        "24",
        "--output-len",
        "5",
        "--threads",
        "1",
        "--json",
        "--save",
        str(saved),
    )
    assert out["bench"] == "latency" and out["quant"] == "none" and out["dtype"] == "float32"
    assert out["kv_dtype"] == "auto"
    assert out["threads"] == 1 and out["device"] == "cpu" and out["model"] == str(tiny_model_folder)
    from r1 import kernels  # which of r1's CPU kernel builds ran, if any: it changes the figures

    assert out["cpu_kernels"] == (kernels.running_build().name if kernels.unavailable_reason() is None else None)
    assert (out["prompt_tokens"], out["output_tokens"], out["repeats"]) == (24, 5, 1)
    assert out["prefill_seconds"] > 0 and out["decode_seconds"] > 0
    assert out["prefill_tok_s"] == pytest.approx(24 / out["prefill_seconds"])
    assert out["decode_tok_s"] == pytest.approx(4 / out["decode_seconds"])  # the tokens after the first
    record = json.loads(saved.read_text())
    assert {k: record[k] for k in out} == out
    assert isinstance(record["command"], str) and record["command"]
    machine_keys = {"cpu", "read_gb_s", "read_threads", "cores", "torch", "python", "gpu", "load_average_1m"}
    assert set(record["machine"]) == machine_keys
    assert record["machine"]["cores"] >= 1 and record["machine"]["read_gb_s"] > 0


def test_throughput_generates_every_requested_token(tiny_model_folder, capsys):
    args = ["--num-seqs", "5", "--min-input", "4", "--max-input", "40", "--min-output", "2", "--max-output", "9"]
    out = _run_json(capsys, "throughput", "--model", str(tiny_model_folder), *args, "--seed", "3", "--json")
    prompts, output_lens = bench.throughput_workload(5, (4, 40), (2, 9), vocab_size=512, seed=3)
    assert out["num_seqs"] == 5 and out["seed"] == 3 and out["temperature"] == 0.6
    assert (out["min_input"], out["max_input"], out["min_output"], out["max_output"]) == (4, 40, 2, 9)
    assert out["total_input_tokens"] == sum(map(len, prompts))
    assert out["total_output_tokens"] == sum(output_lens)  # eos ignored: every sequence runs to its length
    assert out["seconds"] > 0 and out["output_tok_s"] == pytest.approx(out["total_output_tokens"] / out["seconds"])


def test_throughput_prints_a_summary(tiny_model_folder, capsys):
    assert (
        main(
            [
                "bench",
                "throughput",
                "--model",
                str(tiny_model_folder),
                "--num-seqs",
                "2",
                "--max-input",
                "8",
                "--min-input",
                "8",
                "--min-output",
                "3",
                "--max-output",
                "3",
                "--temperature",
                "0",
            ]
        )
        == 0
    )
    assert "2 sequences, 16 prompt tokens, 6 generated in" in capsys.readouterr().out


def test_workloads_are_reproducible_and_in_range():
    prompts, outs = bench.throughput_workload(50, (3, 7), (1, 4), vocab_size=151936, seed=0)
    assert (prompts, outs) == bench.throughput_workload(50, (3, 7), (1, 4), vocab_size=151936, seed=0)
    assert all(3 <= len(p) <= 7 for p in prompts) and all(1 <= n <= 4 for n in outs)
    assert all(0 <= t < bench.PROMPT_VOCAB for p in prompts for t in p)
    assert max(t for p in bench.random_prompts([200], vocab_size=100, seed=0) for t in p) < 100
    warm, prefill, decode = bench.latency_prompts(16, 2, vocab_size=151936)
    assert len(prefill) == len(decode) == 2
    assert len({tuple(p) for p in [warm, *prefill, *decode]}) == 5  # no run can reuse another's prefix
    with pytest.raises(ValueError, match="min-output"):
        bench.throughput_workload(2, (1, 4), (5, 4), vocab_size=100)


def test_latency_times_a_chunked_prefill_to_its_first_token(tiny_model_folder):
    from r1 import LLM

    llm = LLM(str(tiny_model_folder), max_num_batched_tokens=16, progress=False)
    steps = []
    runner = llm.engine.core.runner
    run = runner.run
    runner.run = lambda scheduled, *rest: (
        steps.append(sum(s.num_new_tokens for s in scheduled)) or run(scheduled, *rest)
    )
    result = bench.latency(llm, prompt_len=40, output_len=4)
    assert result["prompt_tokens"] == 40 and result["prefill_tok_s"] > 0
    assert max(steps) == 16  # the prompts went in chunks of the budget
    assert bench.engine_settings(llm, "tiny")["max_num_batched_tokens"] == 16
    with pytest.raises(ValueError, match="context holds"):
        bench.latency(llm, prompt_len=16, output_len=300)


def test_the_cpu_is_named_with_its_family_and_model(tmp_path):
    # A VM names every EPYC "AMD EPYC"; the family number tells Zen 4 (25) from Zen 5 (26).
    info = tmp_path / "cpuinfo"
    first = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\nmodel name\t: AMD EPYC\n"
    info.write_text(first + "\nprocessor\t: 1\ncpu family\t: 25\nmodel\t\t: 17\nmodel name\t: other\n")
    assert bench.cpu_model(str(info)) == "AMD EPYC (family 26, model 2)"
    info.write_text("processor\t: 0\nmodel name\t: Apple M2\n")
    assert bench.cpu_model(str(info)) == "Apple M2"


def test_read_bandwidth_is_bytes_over_the_fastest_pass(monkeypatch):
    clock = iter([0.0, 0.5, 1.0, 1.25, 2.0, 3.0])  # passes of 0.5, 0.25 and 1 s
    monkeypatch.setattr(bench.time, "perf_counter", lambda: next(clock))
    assert bench.read_bandwidth_gb_s(gib=0.25) == round(2**28 / 0.25 / 1e9, 1)


def test_latency_with_guesses_records_what_was_kept(tiny_model_folder, capsys):
    out = _run_json(
        capsys,
        "latency",
        "--model",
        str(tiny_model_folder),
        "--prompt-len",
        "16",
        "--output-len",
        "12",
        "--speculative",
        f"draft:{tiny_model_folder}",
        "--json",
    )
    assert out["speculative"]["method"] == "draft" and out["speculative"]["num_tokens"] == 4
    assert out["spec_proposed"] > 0 and out["spec_acceptance_rate"] == 1.0  # the model's own guesses
    assert out["spec_mean_accepted"] == pytest.approx(1 + out["spec_accepted"] / out["spec_rounds"], abs=1e-3)


def test_bus_fraction_is_bytes_moved_over_what_the_bus_reads():
    assert bench.bus_fraction(10.0, 1_500_000_000, {"read_gb_s": 20.0}) == 0.75
    assert bench.bus_fraction(10.0, 1_500_000_000, {"read_gb_s": None}) is None


def test_the_host_bench_runs_the_real_engine_on_preset_logits(tiny_model_folder):
    from r1 import bench_host
    from r1.engine import EngineRequest
    from r1.sampling_params import SamplingParams
    from r1.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_hf_folder(tiny_model_folder)
    engine = bench_host.host_engine(tokenizer, num_seqs=2, max_len=40)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    engine.add_requests([EngineRequest(str(i), [100 + i] * 9, params, stream=False) for i in range(2)])
    outputs = []
    while engine.has_unfinished():
        outputs += engine.step()
    # One final output each, whose tokens are the argmaxes of the preset rows handed out in turn:
    # the sampler and the bookkeeping ran, only the model's compute was skipped.
    pool = bench_host.PresetModel(tokenizer.vocab_size).pool
    expected = pool[:12].argmax(dim=1).view(6, 2).t().tolist()
    assert [o.new_token_ids for o in outputs] == expected
    assert [o.delta_text for o in outputs] == [tokenizer.decode(ids) for ids in expected]


def test_bench_host_prints_each_size_and_mode(tiny_model_folder, capsys):
    out = _run_json(capsys, "host", "--model", str(tiny_model_folder), "--sizes", "1,3", "--output-len", "8", "--json")
    rows = out["rows"]
    assert [(r["num_seqs"], r["sampled"], r["stream"]) for r in rows] == [
        (n, s, t) for n in (1, 3) for s in (False, True) for t in (True, False)
    ]
    assert all(r["decode_steps"] >= 3 and r["host_ms_per_step"] > 0 for r in rows)
    assert out["sampler_256_rows_ms"]["greedy"] > 0


def test_bench_host_refuses_sizes_and_lengths_it_cannot_measure(tiny_model_folder, capsys):
    for sizes in ("0", "4,x", ""):
        with pytest.raises(SystemExit):
            main(["bench", "host", "--model", str(tiny_model_folder), "--sizes", sizes])
        assert "comma-separated positive integers" in capsys.readouterr().err
    assert main(["bench", "host", "--model", str(tiny_model_folder), "--sizes", "1", "--output-len", "3"]) == 1
    assert "an output length of at least 8" in capsys.readouterr().err
