"""The `r1` command as a user runs it: generate (streamed, --json, --raw, --tokenizer), chat, info."""

from __future__ import annotations

import json
import re

import pytest

from r1.cli import main


@pytest.fixture(autouse=True)
def offline_hub(monkeypatch, tmp_path):
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))


def test_generate_json_raw(small_gguf, capsys):
    args = ["generate", "def add(a, b):", "--raw", "--json", "--model", str(small_gguf)]
    args += ["--temperature", "0", "--max-tokens", "8"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)  # stdout holds exactly one JSON object
    assert set(out) == {
        "text",
        "reasoning",
        "answer",
        "prompt_token_ids",
        "token_ids",
        "finish_reason",
        "usage",
        "timing",
    }
    assert out["usage"] == {"prompt_tokens": len(out["prompt_token_ids"]), "completion_tokens": 8}
    assert out["finish_reason"] == "length" and len(out["token_ids"]) == 8
    assert out["text"].strip() and out["answer"] == out["text"].strip() and out["reasoning"] == ""
    assert set(out["timing"]) == {"prefill_seconds", "decode_seconds"}
    # The GPU's default scheduling, asked for on the CPU, gives the same tokens.
    assert main([*args, "--async-scheduling"]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == out["token_ids"]


def test_generate_streams_reasoning_then_answer_with_r1_format(small_gguf, r1_header, capsys):
    assert (
        main(
            [
                "generate",
                "What is 2+2?",
                "--model",
                str(small_gguf),
                "--tokenizer",
                str(r1_header),
                "--temperature",
                "0",
                "--max-tokens",
                "12",
                "--seed",
                "1",
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    assert "Thinking..." in captured.out  # R1's template opened <think>: the output starts as reasoning
    assert re.search(r"prompt 12 tokens \(.* tok/s\), generated \d+ tokens \(.* tok/s\)", captured.err)


def test_chat_keeps_history_and_resets(small_gguf, monkeypatch, capsys):
    lines = iter(["Hi", "/reset", "Bye", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert main(["chat", "--model", str(small_gguf), "--temperature", "0", "--max-tokens", "4"]) == 0
    err = capsys.readouterr().err
    assert "conversation cleared" in err and err.count("generated") == 2


def test_info_offline_default_model_uses_the_known_config(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"] == 1_777_088_000
    assert (info["layers"], info["hidden_size"], info["attention_heads"], info["kv_heads"]) == (28, 1536, 12, 2)
    assert info["special_tokens"]["bos"] == [151646, "<｜begin▁of▁sentence｜>"]
    assert "built-in config" in info["source"]


def test_info_of_a_gguf_reads_its_file(small_gguf, capsys):
    assert main(["info", str(small_gguf), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "gguf" and info["quantization"] == "F32, Q4_K, Q5_0, Q6_K, Q8_0"
    assert info["weight_bytes"] < small_gguf.stat().st_size
    assert info["special_tokens"]["eos"][1] == "<|im_end|>"


def test_errors_are_one_clear_line(capsys):
    assert main(["generate", "hi", "--model", "./missing-model"]) == 1
    assert "error: model not found: './missing-model'" in capsys.readouterr().err
    assert main(["generate", "hi", "--model", "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"]) == 1
    assert "--model demo" in capsys.readouterr().err
