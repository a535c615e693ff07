"""The OpenAI wire format: request models, their sampling parameters, and response bodies.

Requests are pydantic models validated in strict JSON mode straight from the body bytes, so
malformed JSON, invalid UTF-8, runaway nesting and wrong types all come back as one
`ValidationError` (a 400). Unknown fields are ignored, as OpenAI-compatible servers do; fields we
know but cannot honour are rejected. Sizes are bounded here or in SamplingParams (which names the
field it refuses), before any work is done on a request. Responses are plain dicts in the shapes
the `openai` package parses, reasoning apart from the answer as `reasoning_content` (DeepSeek's
and vLLM's convention). This module owns no I/O: routes, streaming and errors are app.py's.
"""

from __future__ import annotations

import math
import time
from functools import cached_property
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from r1.sampling_params import MAX_LOGPROBS, SamplingParams
from r1.tokenizer import Tokenizer

MAX_N = 16  # samples per request: each is a sequence in the batch and a share of the queue
MAX_PROMPTS = 256  # prompts per completions call; each is tokenized before the engine sees it
MAX_SALT_CHARS = 256
# What a logprob of -inf (or NaN, from a broken forward) is reported as: JSON has no infinities.
LOWEST_LOGPROB = -9999.0


class APIModel(BaseModel):
    """Strict JSON: no coercion from strings to numbers or from numbers to bools; unknown keys ignored."""

    model_config = ConfigDict(strict=True, extra="ignore")


# ---- requests ------------------------------------------------------------------------------------


class TextPart(APIModel):
    type: Literal["text"]
    text: str


class ChatMessage(APIModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


def engine_messages(messages: list[ChatMessage]) -> list[dict]:
    """The {'role', 'content'} dicts chat templates take."""
    # "developer" is OpenAI's newer name for the system role; templates know only "system".
    return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]


class StreamOptions(APIModel):
    include_usage: bool = False


class JsonSchemaFormat(APIModel):
    name: str = "response"
    description: str | None = None
    schema_: dict | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(APIModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and (self.json_schema is None or self.json_schema.schema_ is None):
            raise ValueError("response_format of type json_schema needs json_schema.schema")
        return self

    def as_dict(self) -> dict:
        return self.model_dump(by_alias=True, exclude_none=True)


class _Sampling(APIModel):
    """The fields chat and completions share (OpenAI's, then vLLM's extensions)."""

    model: str | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    # vLLM's: the prompt's prefix-cache blocks are shared only with requests of the same salt.
    cache_salt: str | None = Field(None, min_length=1, max_length=MAX_SALT_CHARS)

    def sampling_params(self, max_tokens: int | None, logprobs: int | None, **extra) -> SamplingParams:
        """Raises ValueError or TypeError (a 400) for values SamplingParams refuses."""
        return SamplingParams(
            n=self.n,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            seed=self.seed,
            max_tokens=max_tokens,
            stop=self.stop or (),
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            **extra,
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    response_format: ResponseFormat | None = None
    max_reasoning_tokens: int | None = Field(None, ge=0)  # extension: then </think> is forced

    @model_validator(mode="after")
    def _check(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs to be true")
        if self.messages[-1].role == "assistant":
            raise ValueError("the last message must not be the assistant's: there is nothing to answer")
        return self

    def to_sampling_params(self) -> SamplingParams:
        extra = {} if self.max_reasoning_tokens is None else {"max_reasoning_tokens": self.max_reasoning_tokens}
        return self.sampling_params(
            self.max_completion_tokens or self.max_tokens, (self.top_logprobs or 0) if self.logprobs else None, **extra
        )


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)  # the legacy API's default
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False

    @model_validator(mode="after")
    def _check(self):
        if self.echo:
            raise ValueError("echo is not supported")
        if self.prompt == [] or self.prompt == "" or any(p == "" or p == [] for p in self.prompts()):
            raise ValueError("the prompt is empty")
        return self

    @field_validator("prompt")
    @classmethod
    def _few_prompts(cls, prompt):
        if len(_prompts(prompt)) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts a call, got {len(prompt)}")
        return prompt

    def prompts(self) -> list[str | list[int]]:
        """One prompt or a batch: a string, token ids, or a list of either."""
        return _prompts(self.prompt)

    def to_sampling_params(self) -> SamplingParams:
        return self.sampling_params(self.max_tokens, self.logprobs)


def _prompts(prompt) -> list[str | list[int]]:
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        return [prompt]
    return list(prompt)


class TokenizeRequest(APIModel):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give either prompt or messages")
        return self


class DetokenizeRequest(APIModel):
    model: str | None = None
    tokens: list[int]


# ---- responses ---------------------------------------------------------------------------------


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0, reasoning_tokens: int = 0) -> dict:
    """OpenAI's usage object; reasoning_tokens counts R1's <think> block, its tags included."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": reasoning_tokens},
    }


def chat_completion(id_: str, model: str, choices: list[dict], usage_: dict) -> dict:
    return {
        "id": id_,
        "object": "chat.completion",
        "created": now(),
        "model": model,
        "choices": choices,
        "usage": usage_,
    }


def chat_choice(index: int, reasoning: str, answer: str, finish_reason: str | None, logprobs: dict | None) -> dict:
    message = {"role": "assistant", "content": answer, "reasoning_content": reasoning or None}
    return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}


def chat_chunk(id_: str, model: str, created: int, choices: list[dict], usage_: dict | None = None) -> dict:
    chunk = {"id": id_, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices}
    if usage_ is not None:
        chunk["usage"] = usage_
    return chunk


def chunk_choice(index: int, delta: dict, finish_reason: str | None = None, logprobs: dict | None = None) -> dict:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


def completion(id_: str, model: str, created: int, choices: list[dict], usage_: dict | None) -> dict:
    body = {"id": id_, "object": "text_completion", "created": created, "model": model, "choices": choices}
    if usage_ is not None:
        body["usage"] = usage_
    return body


def completion_choice(index: int, text: str, finish_reason: str | None, logprobs: dict | None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def model_card(name: str, max_model_len: int) -> dict:
    return {"id": name, "object": "model", "created": now(), "owned_by": "r1", "max_model_len": max_model_len}


def error_body(
    message: str, type_: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class LogprobFormatter:
    """Engine logprobs ({token_id, logprob, top}) in the chat and the legacy completions shapes."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    @cached_property
    def _byte_of_char(self) -> dict[str, int]:
        # Byte-level BPE spells each byte as one printable character (GPT-2's table); invert it.
        printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
        others = [b for b in range(256) if b not in printable]
        chars = [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]
        return dict(zip(chars, printable + others))

    def token_bytes(self, token_id: int) -> bytes:
        piece = self.tokenizer.backend.id_to_token(token_id) or ""
        table = self._byte_of_char
        if all(c in table for c in piece):
            return bytes(table[c] for c in piece)
        return piece.encode()  # an added token spelled outside the byte alphabet, like <｜User｜>

    def token_text(self, token_id: int) -> str:
        return self.token_bytes(token_id).decode("utf-8", errors="replace")

    def chat(self, entries: list[dict]) -> dict:
        def item(token_id: int, logprob: float) -> dict:
            raw = self.token_bytes(token_id)
            return {"token": raw.decode("utf-8", errors="replace"), "logprob": _finite(logprob), "bytes": list(raw)}

        return {
            "content": [
                {**item(e["token_id"], e["logprob"]), "top_logprobs": [item(t, lp) for t, lp in e["top"]]}
                for e in entries
            ]
        }

    def completion(self, entries: list[dict], text_offset: int = 0) -> dict:
        tokens = [self.token_text(e["token_id"]) for e in entries]
        offsets = []
        for token in tokens:
            offsets.append(text_offset)
            text_offset += len(token)
        return {
            "tokens": tokens,
            "token_logprobs": [_finite(e["logprob"]) for e in entries],
            "top_logprobs": [{self.token_text(t): _finite(lp) for t, lp in e["top"]} for e in entries],
            "text_offset": offsets,
        }


def _finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) and logprob > LOWEST_LOGPROB else LOWEST_LOGPROB
