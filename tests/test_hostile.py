"""The server under hostile input, on real weights (the 0.5B demo model with R1's tokenizer).

Each hostile request is sent while another client's greedy stream is running; it must get the
right 4xx (or, where the value is only odd, a right answer), and the stream beside it must finish
with the tokens it gives alone. Faults injected into the engine must fail only the request they
belong to, or, when the engine itself is gone, every waiter at once with /health saying so.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
import threading
import time
import types

import httpx2
import llguidance
import pytest

from conftest import live_small_server, serving
from r1 import LLM
from r1.engine import sampler
from r1.server import structured
from r1.server.app import ServerConfig, build_app

NAME = "r1-hostile"
KEY = "sk-hostile"
AUTH = {"Authorization": f"Bearer {KEY}"}
BESIDE = {
    "model": NAME,
    "prompt": "def quicksort(items):",
    "max_tokens": 24,
    "temperature": 0,
    "ignore_eos": True,
    "stream": True,
    "logprobs": 0,
}


@pytest.fixture(scope="module")
def live():
    with live_small_server(NAME, KEY, max_requests=32) as live:
        yield live


@pytest.fixture(scope="module")
def http(live):
    with httpx2.Client(base_url=live.url, headers=AUTH, timeout=120, trust_env=False) as http:
        yield http


def stream_tokens(url: str, body: dict, started: threading.Event | None = None) -> list[str]:
    """A streamed completion's tokens (from its logprobs), or its error events."""
    tokens = []
    with httpx2.stream("POST", url + "/v1/completions", json=body, headers=AUTH, timeout=120, trust_env=False) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if started is not None:
                started.set()
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if "error" in event:
                return [f"error: {event['error']['message']}"]
            for choice in event["choices"]:
                tokens += (choice["logprobs"] or {}).get("tokens", [])
    return tokens


@pytest.fixture(scope="module")
def alone(live) -> list[str]:
    return stream_tokens(live.url, BESIDE)


@pytest.fixture
def beside(live, alone):
    """Runs the test while a greedy stream is generating, then checks that stream was unharmed."""
    result, started = [], threading.Event()
    thread = threading.Thread(target=lambda: result.append(stream_tokens(live.url, BESIDE, started)))
    thread.start()
    assert started.wait(60), "the stream beside never started"
    yield
    thread.join(120)
    assert result == [alone], "the stream beside a hostile request changed"
    live.wait_all_free()


def post(http, path: str, body: dict, **kwargs) -> httpx2.Response:
    return http.post(path, content=json.dumps(body), headers={"Content-Type": "application/json", **AUTH}, **kwargs)


CHAT = {"model": NAME, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 4}


@pytest.mark.parametrize(
    "path, body, status, param",
    [
        ("/v1/chat/completions", {**CHAT, "top_k": 2**63}, 400, "top_k"),
        ("/v1/chat/completions", {**CHAT, "seed": 2**64}, 400, "seed"),
        ("/v1/chat/completions", {**CHAT, "repetition_penalty": 1e-300}, 400, "repetition_penalty"),
        ("/v1/chat/completions", {**CHAT, "stop": ["x" * (1 << 20)]}, 400, "stop"),
        ("/v1/chat/completions", {**CHAT, "stop": ["x"] * 17}, 400, "stop"),
        ("/v1/chat/completions", {**CHAT, "n": 17}, 400, "n"),
        ("/v1/completions", {"model": NAME, "prompt": [-1]}, 400, "prompt"),
        ("/v1/completions", {"model": NAME, "prompt": [2**32]}, 400, "prompt"),
        ("/v1/completions", {"model": NAME, "prompt": ["a"] * 400_000}, 400, "prompt"),
        ("/v1/completions", {"model": NAME, "prompt": ["a"] * 32, "n": 2}, 400, "prompt"),  # 64 samples; 32 fit
    ],
)
def test_out_of_bounds_fields_get_a_400_naming_them(http, beside, path, body, status, param):
    start = time.perf_counter()
    r = post(http, path, body)
    assert (r.status_code, r.json()["error"]["param"]) == (status, param), r.text
    assert time.perf_counter() - start < 5  # refused before any costly work


def test_a_tiny_temperature_is_greedy(http, beside):
    greedy = post(http, "/v1/chat/completions", {**CHAT, "temperature": 0, "max_reasoning_tokens": 2})
    tiny = post(http, "/v1/chat/completions", {**CHAT, "temperature": 1e-40, "max_reasoning_tokens": 2})
    assert tiny.status_code == 200, tiny.text
    assert tiny.json()["choices"][0]["message"] == greedy.json()["choices"][0]["message"]


class CountingMatcher:
    """llguidance's LLMatcher, counting how many are built from a grammar."""

    built = 0
    grammar_from_json_schema = staticmethod(llguidance.LLMatcher.grammar_from_json_schema)

    def __new__(cls, *args, **kwargs):
        cls.built += 1
        return llguidance.LLMatcher(*args, **kwargs)


def test_a_pathological_schema_for_16_samples_is_compiled_once(http, beside, monkeypatch):
    monkeypatch.setattr(
        structured, "llguidance", types.SimpleNamespace(LLMatcher=CountingMatcher, LLTokenizer=llguidance.LLTokenizer)
    )
    schema = {"enum": [f"value{i}" for i in range(20_000)]}  # ~60 ms a compile
    r = post(
        http,
        "/v1/chat/completions",
        {
            **CHAT,
            "n": 16,
            "max_tokens": 1,
            "max_reasoning_tokens": 0,
            "response_format": {"type": "json_schema", "json_schema": {"schema": schema}},
        },
    )
    assert r.status_code == 200 and len(r.json()["choices"]) == 16, r.text
    assert CountingMatcher.built == 1


def test_web_pages_cannot_drive_the_server(live, http, beside):
    # A cross-origin page can POST text/plain without a preflight: refused before any work.
    r = http.post(
        "/v1/completions",
        content=json.dumps({"model": NAME, "prompt": "hi"}),
        headers={"Content-Type": "text/plain", **AUTH},
    )
    assert (r.status_code, r.json()["error"]["code"]) == (415, "unsupported_media_type")
    # DNS rebinding: a page on evil.example resolved to 127.0.0.1 sends its own Host.
    for path in ("/health", "/v1/models", "/"):
        r = http.get(path, headers={"Host": "evil.example"})
        assert (r.status_code, r.json()["error"]["code"]) == (403, "host_not_allowed"), path
    port = live.url.rsplit(":", 1)[1]
    for host, status in (
        (f"localhost:{port}", 200),
        (f"LOCALHOST.:{port}", 200),
        (f"[::1]:{port}", 200),
        ("10.1.2.3", 200),
        ("evil.example.", 403),
        (f"evil.example:{port}", 403),
        ("localhost:²", 403),
        (None, 200),
    ):  # None: an HTTP/1.0 client without a Host
        assert raw_status(live.url, "/health", host) == status, host
    # A path out of /static is refused, however it is spelled (sent raw: clients tidy '..' away).
    for path in ("/static/../app.py", "/static/%2e%2e/app.py", "/static/..%2fapp.py"):
        assert raw_status(live.url, path) == 404, path


def raw_status(url: str, path: str, host: str | None = "127.0.0.1") -> int:
    address, port = url.removeprefix("http://").split(":")
    request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\n" if host is not None else f"GET {path} HTTP/1.0\r\n"
    with socket.create_connection((address, int(port)), timeout=10) as s:
        s.sendall(f"{request}Connection: close\r\n\r\n".encode())
        return int(s.recv(1024).split(b" ", 2)[1])


ABORTED = 'r1_requests_finished_total{finish_reason="abort"}'


def test_a_stream_of_16_closed_early_frees_its_blocks(live, http):
    aborted = live.metrics().get(ABORTED, 0)
    body = {"model": NAME, "prompt": "Once upon a time", "n": 16, "max_tokens": 400, "ignore_eos": True, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as r:
        next(r.iter_lines())
    live.wait_all_free(timeout=1.0)
    assert live.metrics()[ABORTED] - aborted == 16


def test_a_request_whose_sampling_fails_fails_alone(live, http, beside, monkeypatch):
    real = sampler.draw_tokens

    def failing_for_seed_666(logits, params, *args):
        if any(p.seed == 666 for p in params):
            raise RuntimeError("injected sampling failure")
        return real(logits, params, *args)

    monkeypatch.setattr(sampler, "draw_tokens", failing_for_seed_666)
    r = post(http, "/v1/chat/completions", {**CHAT, "seed": 666, "temperature": 0.6})
    assert r.status_code == 500, r.text
    error = r.json()["error"]
    assert (error["type"], error["code"]) == ("server_error", "generation_failed")
    assert "injected sampling failure" in error["message"]
    # A stream fails in-band: its 200 was sent before the failure.
    assert stream_tokens(live.url, {**BESIDE, "seed": 666, "temperature": 0.6}) == [
        "error: generation failed: RuntimeError: injected sampling failure"
    ]
    assert post(http, "/v1/chat/completions", {**CHAT, "seed": 7, "temperature": 0.6}).status_code == 200


DYING_SERVER = textwrap.dedent("""
    import sys
    from r1 import LLM
    from r1.engine.llm_engine import LLMEngine
    from r1.server.app import ServerConfig, serve

    class Panic(BaseException):  # what a Rust extension's panic is
        pass

    step = LLMEngine.step
    def step_until_seed_666(self):
        if any(r.params.seed == 666 for r in self.core.requests.values()):
            raise Panic("injected")
        return step(self)
    LLMEngine.step = step_until_seed_666
    llm = LLM(sys.argv[1], dtype="fp32", device="cpu", kv_cache_tokens=512, progress=False)
    serve(llm, ServerConfig("tiny"), port=0)
""")


def test_a_dead_engine_fails_every_waiter_and_the_process(tiny_model_folder):
    server = subprocess.Popen(
        [sys.executable, "-c", DYING_SERVER, str(tiny_model_folder)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = server.stdout.readline().split(" at ")[1].split()[0]
        long = {
            "model": "tiny",
            "prompt": [5, 6, 7],
            "max_tokens": 200,
            "ignore_eos": True,
            "temperature": 0,
            "stream": True,
            "logprobs": 0,
        }
        waiting, started = [], threading.Event()
        thread = threading.Thread(target=lambda: waiting.append(stream_tokens(url, long, started)))
        thread.start()
        assert started.wait(120)  # the first token: a cold start may compile r1's kernels
        killed = time.monotonic()
        r = httpx2.post(url + "/v1/completions", json={**long, "stream": False, "seed": 666}, trust_env=False)
        thread.join(30)
        assert time.monotonic() - killed < 5  # at once, not never
        assert (r.status_code, r.json()["error"]["code"]) == (503, "engine_dead")
        assert waiting == [["error: the engine died: Panic: injected"]]
        assert server.wait(30) != 0
        assert "the engine died: Panic: injected" in server.stderr.read()
    finally:
        server.kill()


def test_health_says_when_the_engine_is_dead(tiny_model_folder, monkeypatch):
    llm = LLM(str(tiny_model_folder), dtype="fp32", device="cpu", kv_cache_tokens=512, progress=False)
    deaths = []
    with serving(build_app(llm, ServerConfig("tiny"), on_engine_dead=deaths.append)) as url:
        assert httpx2.get(url + "/health", trust_env=False).status_code == 200
        monkeypatch.setattr(llm.engine.core.runner, "run", fail_with_device_fault)
        body = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 4}
        r = httpx2.post(url + "/v1/completions", json=body, trust_env=False)
        assert (r.status_code, r.json()["error"]["code"]) == (503, "engine_dead")
        health = httpx2.get(url + "/health", trust_env=False)
        assert health.status_code == 503 and "the device failed" in health.json()["status"]
        assert len(deaths) == 1
        r = httpx2.post(url + "/v1/completions", json=body, trust_env=False)  # refused at admission
        assert (r.status_code, r.json()["error"]["code"]) == (503, "engine_dead")


def fail_with_device_fault(*args, **kwargs):
    raise RuntimeError("CUDA error: an illegal memory access was encountered")


def test_only_named_origins_pass_the_cors_preflight(live, tiny_model_folder):
    def preflight(url: str, origin: str) -> httpx2.Response:
        return httpx2.options(
            url + "/v1/chat/completions",
            trust_env=False,
            headers={
                "Origin": origin,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,content-type",
            },
        )

    # No --cors-origin: no page's preflight passes, so no page can send its JSON.
    assert "access-control-allow-origin" not in preflight(live.url, "https://app.example").headers
    llm = LLM(str(tiny_model_folder), dtype="fp32", device="cpu", kv_cache_tokens=512, progress=False)
    with serving(build_app(llm, ServerConfig("tiny", cors_origins=("https://app.example",)))) as url:
        allowed = preflight(url, "https://app.example")
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == "https://app.example"
        other = preflight(url, "https://evil.example")
        assert other.status_code >= 400 and "access-control-allow-origin" not in other.headers
