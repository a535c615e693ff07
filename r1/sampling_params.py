"""SamplingParams: what one request asks of the sampler and of the stopping rules.

Owns the per-request knobs (vLLM's names and meanings), their validation at construction, and
filling the fields left as None from the model's generation_config.json. It does not own the
arithmetic on logits (sampling.py), stop-string matching or detokenization (engine and
tokenizer), and it never imports torch, so the bookkeeping that carries it stays torch-free.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Mapping

MAX_LOGPROBS = 20  # the OpenAI API's cap on top_logprobs
MAX_TOKEN_ID = 2**31 - 1  # past any vocabulary, within every index type
MAX_TOP_K = MAX_TOKEN_ID  # a k at or past the model's vocabulary is "disabled" (the engine's clamp)
INT64 = (-(2**63), 2**63 - 1)  # seeds: what a generator takes, and what an API client can name
GREEDY_BELOW = 1e-5  # a temperature this small is greedy: dividing logits by it would overflow
REPETITION_PENALTY = (0.01, 100.0)  # past these a penalized logit over- or underflows float32
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 512  # each new token rescans the text's tail this long
MAX_STOP_TOKEN_IDS = 64


class ParamError(ValueError):
    """A value SamplingParams refuses, naming the field (`param`) for an API's 400."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token and when to stop; validated at construction.

    temperature, top_p and top_k left as None mean "the model's default": call `with_defaults`
    with generation_config.json before sampling, after which every field is concrete.
    """

    n: int = 1
    temperature: float | None = None  # 0 means greedy, and so does anything below GREEDY_BELOW
    top_p: float | None = None  # in (0, 1]; 1 disables
    top_k: int | None = None  # 0 or -1 disable (stored as 0); at most MAX_TOP_K
    min_p: float = 0.0  # drop tokens whose probability is below min_p * the top probability
    repetition_penalty: float = 1.0  # HF/CTRL style over prompt + output tokens, in REPETITION_PENALTY
    presence_penalty: float = 0.0  # OpenAI style over output tokens only
    frequency_penalty: float = 0.0  # OpenAI style over output tokens only
    seed: int | None = None  # within int64
    max_tokens: int | None = None  # None: up to the context limit
    stop: str | list[str] | tuple[str, ...] = ()  # stored as a tuple of str; MAX_STOP_* bound them
    stop_token_ids: list[int] | tuple[int, ...] = ()  # stored as a tuple of int
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    logprobs: int | None = None  # how many top logprobs to return per token, 0..20
    max_reasoning_tokens: int | None = None  # after this many thinking tokens, </think> is forced

    def __post_init__(self) -> None:
        _check_int("n", self.n, low=1)
        if self.temperature is not None:
            _check_float("temperature", self.temperature, low=0.0)
            if self.temperature < GREEDY_BELOW:
                object.__setattr__(self, "temperature", 0.0)
        if self.top_p is not None:
            _check_float("top_p", self.top_p, low=0.0, high=1.0, low_open=True)
        if self.top_k is not None:
            _check_int("top_k", self.top_k)
            if not -1 <= self.top_k <= MAX_TOP_K:
                raise ParamError(
                    "top_k", f"top_k must be -1 or 0 (disabled) or in [1, {MAX_TOP_K}], got {self.top_k!r}"
                )
            if self.top_k == -1:
                object.__setattr__(self, "top_k", 0)  # one spelling of "disabled" downstream
        _check_float("min_p", self.min_p, low=0.0, high=1.0)
        _check_float("repetition_penalty", self.repetition_penalty, *REPETITION_PENALTY)
        _check_float("presence_penalty", self.presence_penalty, low=-2.0, high=2.0)
        _check_float("frequency_penalty", self.frequency_penalty, low=-2.0, high=2.0)
        if self.seed is not None:
            _check_int("seed", self.seed, *INT64)
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens, low=1)
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, low=0, high=MAX_LOGPROBS)
        if self.max_reasoning_tokens is not None:
            _check_int("max_reasoning_tokens", self.max_reasoning_tokens, low=0)
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        object.__setattr__(self, "stop", _stop_strings(self.stop))
        object.__setattr__(self, "stop_token_ids", _stop_token_ids(self.stop_token_ids))

    def with_defaults(self, defaults: Mapping[str, Any]) -> SamplingParams:
        """Fill temperature, top_p and top_k left as None from `defaults` (generation_config.json),
        then from the neutral values (temperature 1.0, top_p 1.0, top_k 0 = disabled).

        Keys other than these three are ignored, so the whole generation config can be passed.
        """
        neutral = {"temperature": 1.0, "top_p": 1.0, "top_k": 0}
        filled = {}
        for name, fallback in neutral.items():
            if getattr(self, name) is None:
                value = defaults.get(name)
                filled[name] = fallback if value is None else value
        return replace(self, **filled) if filled else self

    @property
    def greedy(self) -> bool:
        """True when the next token is the argmax (temperature 0)."""
        return self.temperature == 0


def _check_int(name: str, value: Any, low: int | None = None, high: int | None = None) -> None:
    # bool is an int subclass; True as a count or seed is almost surely a mistake.
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ParamError(name, f"{name} must be {bounds}, got {value!r}")


def _check_float(name: str, value: Any, low: float, high: float | None = None, low_open: bool = False) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got {value!r}")
    above = value > low if low_open else value >= low
    # Written so that NaN and infinities fail too.
    if not (math.isfinite(value) and above and (high is None or value <= high)):
        if high is None:
            bounds = f"> {low}" if low_open else f">= {low}"
        else:
            bounds = f"in {'(' if low_open else '['}{low}, {high}]"
        raise ParamError(name, f"{name} must be a finite number {bounds}, got {value!r}")


def _stop_strings(stop: Any) -> tuple[str, ...]:
    if isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
        raise TypeError(f"stop must be a str or a list of str, got {stop!r}")
    if any(s == "" for s in stop):
        raise ParamError("stop", f"stop strings must be non-empty, got {list(stop)!r}")  # "" matches at once
    if len(stop) > MAX_STOP_STRINGS:
        raise ParamError("stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(stop)}")
    if any(len(s) > MAX_STOP_CHARS for s in stop):
        raise ParamError(
            "stop", f"stop strings must be at most {MAX_STOP_CHARS} characters, got one of {max(len(s) for s in stop)}"
        )
    return tuple(stop)


def _stop_token_ids(ids: Any) -> tuple[int, ...]:
    if not isinstance(ids, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise TypeError(f"stop_token_ids must be a list of int, got {ids!r}")
    if len(ids) > MAX_STOP_TOKEN_IDS:
        raise ParamError("stop_token_ids", f"at most {MAX_STOP_TOKEN_IDS} stop_token_ids, got {len(ids)}")
    if any(not 0 <= i <= MAX_TOKEN_ID for i in ids):
        raise ParamError("stop_token_ids", f"stop_token_ids must lie in [0, {MAX_TOKEN_ID}], got {list(ids)!r}")
    return tuple(ids)
