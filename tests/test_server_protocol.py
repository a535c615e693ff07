"""The server's parts that need no model: request validation and its 400s, sampling parameters
from requests, logprob shapes, grammar constraints over R1's real tokenizer, metrics, and who may
reach the server."""

from __future__ import annotations

import json
import socket
import time

import pytest
import torch
from pydantic import ValidationError

from r1.cli import main
from r1.engine import RequestOutput
from r1.engine.async_llm import EngineStats
from r1.sampling_params import ParamError
from r1.server.app import ServerConfig, check_exposure, host_allowlist
from r1.server.errors import APIError
from r1.server.metrics import Metrics
from r1.server.protocol import (
    LOWEST_LOGPROB,
    ChatCompletionRequest,
    CompletionRequest,
    LogprobFormatter,
    engine_messages,
)
from r1.server.structured import StructuredOutputs
from r1.tokenizer import Tokenizer

USER = {"role": "user", "content": "hi"}


def chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate_json(json.dumps({"messages": [USER], **fields}))


def error_of(body: bytes | str, model=ChatCompletionRequest) -> APIError:
    with pytest.raises(ValidationError) as e:
        model.model_validate_json(body)
    return APIError.from_validation(e.value)


@pytest.fixture(scope="module")
def tokenizer(r1_header):
    return Tokenizer.from_source(r1_header)


def test_chat_request_becomes_sampling_params():
    p = chat(
        max_tokens=50,
        max_completion_tokens=20,
        temperature=0.2,
        top_p=0.9,
        top_k=40,
        n=3,
        seed=5,
        stop=["\n\n"],
        presence_penalty=0.5,
        logprobs=True,
        top_logprobs=4,
        max_reasoning_tokens=64,
    ).to_sampling_params()
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.n, p.seed) == (20, 0.2, 0.9, 40, 3, 5)
    assert (p.stop, p.presence_penalty, p.logprobs, p.max_reasoning_tokens) == (("\n\n",), 0.5, 4, 64)
    # Left out, the model's generation config decides (R1: 0.6 / 0.95), and no logprobs are made.
    p = chat().to_sampling_params()
    assert (p.temperature, p.top_p, p.max_tokens, p.logprobs, p.max_reasoning_tokens) == (None, None, None, None, None)
    assert chat(logprobs=True).to_sampling_params().logprobs == 0


def test_messages_for_the_template():
    req = chat(
        messages=[
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        ]
    )
    assert engine_messages(req.messages) == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "ab"},
    ]


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"n": "2"}, "n"),  # strict: no string-to-number coercion
        ({"n": 1000}, "n"),
        ({"top_p": 0}, "top_p"),
        ({"stream": 1}, "stream"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content.str"),
        ({"top_logprobs": 30, "logprobs": True}, "top_logprobs"),
        ({"response_format": {"type": "yaml"}}, "response_format.type"),
        ({"cache_salt": ""}, "cache_salt"),
        ({"cache_salt": "s" * 257}, "cache_salt"),
    ],
)
def test_invalid_fields_are_400s_naming_the_field(fields, param):
    err = error_of(json.dumps({"messages": [USER], **fields}))
    assert err.status == 400 and err.type == "invalid_request_error"
    assert err.param == param, err.message
    assert err.body()["error"]["message"]


@pytest.mark.parametrize(
    "fields, words",
    [
        ({"top_logprobs": 2}, "needs logprobs"),
        ({"messages": [USER, {"role": "assistant", "content": "x"}]}, "last message"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "json_schema.schema"),
    ],
)
def test_inconsistent_requests_say_why(fields, words):
    assert words in error_of(json.dumps({"messages": [USER], **fields})).message


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}',  # invalid UTF-8
        b"[" * 100_000 + b"]" * 100_000,  # nesting past any sane depth
        b"",
    ],
)
def test_malformed_bodies_are_400s(body):
    err = error_of(body)
    assert (err.status, err.code) == (400, "invalid_json")


def test_sampling_bounds_name_the_field():
    # Refused by SamplingParams, where every caller's values are checked, with the field named.
    for fields, param in (({"stop": ["x"] * 17}, "stop"), ({"top_k": 2**63}, "top_k"), ({"seed": 2**64}, "seed")):
        with pytest.raises(ParamError) as refused:
            chat(**fields).to_sampling_params()
        assert refused.value.param == param


def test_completion_prompt_count_is_bounded():
    err = error_of(json.dumps({"prompt": [[0]] * 257}), CompletionRequest)
    assert err.status == 400 and "at most 256 prompts a call, got 257" in err.message
    assert len(CompletionRequest.model_validate_json(json.dumps({"prompt": ["a"] * 256})).prompts()) == 256


def test_required_field_message():
    assert error_of(b"{}").message == "messages is required"


def test_completion_prompts_in_every_form():
    def prompts(p):
        return CompletionRequest.model_validate_json(json.dumps({"prompt": p})).prompts()

    assert prompts("a") == ["a"]
    assert prompts([1, 2]) == [[1, 2]]
    assert prompts(["a", "b"]) == ["a", "b"]
    assert prompts([[1], [2, 3]]) == [[1], [2, 3]]
    assert CompletionRequest.model_validate_json('{"prompt": "a"}').to_sampling_params().max_tokens == 16
    for bad in (
        '{"prompt": ""}',
        '{"prompt": []}',
        '{"prompt": ["a", ""]}',
        '{"prompt": "a", "echo": true}',
        '{"prompt": [1, "a"]}',
    ):
        assert error_of(bad, CompletionRequest).status == 400


def test_logprobs_spell_tokens_as_their_bytes(tokenizer):
    fmt = LogprobFormatter(tokenizer)
    ids = tokenizer.encode("naïve 日本", add_special_tokens=False)
    assert b"".join(fmt.token_bytes(i) for i in ids) == "naïve 日本".encode()
    think = tokenizer.token_to_id("<think>")
    user = tokenizer.token_to_id("<｜User｜>")  # spelled outside the byte alphabet
    assert (fmt.token_bytes(think), fmt.token_bytes(user)) == (b"<think>", "<｜User｜>".encode())
    entries = [{"token_id": i, "logprob": -0.5, "top": [(i, -0.5), (think, -2.0)]} for i in ids[:2]]
    content = fmt.chat(entries)["content"]
    assert [c["bytes"] for c in content] == [list(fmt.token_bytes(i)) for i in ids[:2]]
    assert content[0]["top_logprobs"][1] == {"token": "<think>", "logprob": -2.0, "bytes": list(b"<think>")}
    legacy = fmt.completion(entries)
    assert legacy["text_offset"] == [0, len(legacy["tokens"][0])]
    assert legacy["top_logprobs"][0] == {legacy["tokens"][0]: -0.5, "<think>": -2.0}


SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


def test_json_schema_constraint_allows_exactly_valid_continuations(tokenizer):
    structured = StructuredOutputs(tokenizer, vocab_size=151936, eos_token_ids=[tokenizer.eos_token_id])
    c, copy = structured.constraints({"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}}, 2)
    start = c.allowed_tokens()
    assert start.shape == (151936,)
    assert not c.is_done()
    for token_id in tokenizer.encode('{"name":"Ada","age":36}', add_special_tokens=False):
        mask = c.allowed_tokens()
        assert mask[token_id] and not mask[tokenizer.token_to_id("<think>")]
        c.accept(token_id)
    assert c.is_done()  # the object is closed and nothing may follow
    assert c.allowed_tokens().nonzero().flatten().tolist() == [tokenizer.eos_token_id]
    # The copy made for a second sample walked none of that: it is where c started.
    assert not copy.is_done() and torch.equal(copy.allowed_tokens(), start)
    # A second constraint starts from scratch: '{' leads, a bare digit may not.
    [fresh] = structured.constraints({"type": "json_object"}, 1)
    assert not fresh.allowed_tokens()[tokenizer.encode("7", add_special_tokens=False)[0]]
    assert structured.constraints({"type": "text"}, 3) == [None] * 3


def test_bad_schemas_are_value_errors(tokenizer):
    structured = StructuredOutputs(tokenizer, vocab_size=151936, eos_token_ids=[tokenizer.eos_token_id])
    for fmt in (
        {"type": "json_schema", "json_schema": {"schema": {"type": "nonsense"}}},
        {"type": "json_schema", "json_schema": {"schema": {"$ref": "#/missing"}}},
    ):
        with pytest.raises(ValueError, match="invalid JSON schema"):
            structured.constraints(fmt, 1)


def output(request_id, n_new, ttft, decode, finished=False, reason=None) -> RequestOutput:
    return RequestOutput(request_id, [1] * n_new, "", "", "", finished, reason, 10, 0, 0, ttft, decode)


def test_metrics_histograms_and_gauges():
    m = Metrics(
        lambda: EngineStats(
            num_running=2,
            num_waiting=1,
            num_blocks=100,
            num_free_blocks=75,
            kv_cache_usage=0.25,
            prefix_queries=200,
            prefix_hits=50,
            spec_rounds=10,
            spec_proposed=40,
            spec_accepted=30,
        )
    )
    seen: dict = {}
    for out in (
        output("a", 1, 0.5, 0.0),
        output("a", 1, 0.5, 0.1),
        output("a", 2, 0.5, 0.3, True, "length"),
        output("b", 5, 0.2, 0.4, True, "stop"),  # a request that did not stream: one output
    ):
        m.observe(out, seen)
    m.count_http("/v1/chat/completions", 200)
    m.count_http("/wp-admin/../etc/passwd", 404)
    text = m.render().decode()
    assert "r1_time_to_first_token_seconds_count 2.0" in text
    # a: 0.1, then 0.1 twice (0.2 over 2 tokens); b: 0.1 four times (0.4 over the 4 after its first)
    assert "r1_inter_token_latency_seconds_count 7.0" in text
    assert "r1_generation_tokens_total 9.0" in text
    assert 'r1_requests_finished_total{finish_reason="length"} 1.0' in text
    assert 'r1_http_requests_total{route="other",status="404"} 1.0' in text
    for line in (
        "r1_requests_running 2.0",
        "r1_requests_waiting 1.0",
        "r1_kv_cache_usage_ratio 0.25",
        "r1_prefix_cache_hit_rate 0.25",
        "r1_spec_decode_draft_tokens_total 40.0",
        "r1_spec_decode_accepted_tokens_total 30.0",
        "r1_spec_decode_acceptance_rate 0.75",
        "r1_spec_decode_mean_accepted_length 4.0",  # 3 kept a round, and the model's own token
    ):
        assert line in text
    assert not seen  # finished requests leave no state behind


def test_logprobs_are_finite_json(tokenizer):
    # -inf (a token the model rules out) and NaN (a broken forward) have no JSON spelling.
    fmt = LogprobFormatter(tokenizer)
    entries = [{"token_id": 9, "logprob": float("nan"), "top": [(9, float("-inf")), (10, -1e30)]}]
    chat_content = fmt.chat(entries)["content"][0]
    assert chat_content["logprob"] == LOWEST_LOGPROB
    assert [t["logprob"] for t in chat_content["top_logprobs"]] == [LOWEST_LOGPROB] * 2
    legacy = fmt.completion(entries)
    assert legacy["token_logprobs"] == [LOWEST_LOGPROB]
    assert list(legacy["top_logprobs"][0].values()) == [LOWEST_LOGPROB] * 2
    json.dumps([chat_content, legacy], allow_nan=False)


@pytest.mark.parametrize(
    "host, key, insecure, refused",
    [
        ("127.0.0.1", None, False, False),
        ("localhost", None, False, False),
        ("::1", None, False, False),
        ("0.0.0.0", None, False, True),
        ("192.168.1.5", None, False, True),
        ("::", None, False, True),
        ("0.0.0.0", "sk-x", False, False),
        ("0.0.0.0", None, True, False),
    ],
)
def test_a_server_beyond_loopback_needs_a_key(host, key, insecure, refused):
    if refused:
        with pytest.raises(ValueError, match="--api-key"):
            check_exposure(host, key, insecure)
    else:
        check_exposure(host, key, insecure)


def test_host_allowlist():
    # IP addresses always pass (a rebinding page comes under a name); these are the names.
    assert host_allowlist("127.0.0.1", None) == ("localhost",)
    assert host_allowlist("::1", "sk-x", ("R1.lan:8000", "box.")) == ("localhost", "r1.lan", "box")
    assert host_allowlist("0.0.0.0", "sk-x") is None  # beyond loopback the API key guards it
    assert host_allowlist("0.0.0.0", "sk-x", ("r1.example",)) == ("localhost", "r1.example")
    # Beyond loopback without a key (--insecure) the names still guard it: this machine's own.
    assert host_allowlist("0.0.0.0", None) == tuple(
        dict.fromkeys(n.lower() for n in ("localhost", socket.gethostname(), socket.getfqdn()))
    )


def test_an_empty_api_key_is_refused():
    with pytest.raises(ValueError, match="API key is empty"):
        ServerConfig("m", api_key=" ")


def test_serve_refuses_an_open_host_before_loading(capsys, monkeypatch):
    for key in ("", "  "):  # an empty R1_API_KEY is no key
        monkeypatch.setenv("R1_API_KEY", key)
        start = time.perf_counter()
        assert main(["serve", "--host", "0.0.0.0", "--model", "no-such-model"]) == 1
        assert "--api-key" in capsys.readouterr().err  # not "not found": nothing was loaded
        assert time.perf_counter() - start < 5
