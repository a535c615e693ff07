"""What crosses the engine's boundary: the requests it takes, the outputs and stats it gives, and
the errors it raises. The engine's modules and its callers share these; nothing here acts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from r1.sampling_params import SamplingParams


class TokenConstraint(Protocol):
    """Limits which tokens the answer may use (a JSON grammar, say); applied after the reasoning."""

    def allowed_tokens(self) -> torch.Tensor: ...  # bool (vocab,) of the tokens allowed next

    def accept(self, token_id: int) -> None: ...

    def is_done(self) -> bool: ...


@dataclass(frozen=True)
class EngineRequest:
    """One request as the engine takes it: token ids, concrete or default-filled sampling params.
    Whether the prompt opens R1's reasoning block the engine reads from the ids (r1/reasoning.py)."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    constraint: TokenConstraint | None = None  # restricts the answer's tokens (structured output)
    cache_salt: str | None = None  # its prefix-cache blocks are shared only under the same salt
    # Whether its caller reads each step's output (a stream) or only the final one: a request that
    # does not stream, and has no stop strings to look for, is detokenized once, when it ends.
    stream: bool = True


@dataclass(frozen=True)
class EngineStats:
    """The scheduler's and the KV pool's numbers: a snapshot any thread may read."""

    num_running: int = 0
    num_waiting: int = 0
    num_blocks: int = 0
    num_free_blocks: int = 0
    kv_cache_usage: float = 0.0
    prefix_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_hits: int = 0  # of those, found cached
    num_preemptions: int = 0
    spec_rounds: int = 0  # speculative decoding: a request's guesses verified in one step
    spec_proposed: int = 0  # tokens guessed
    spec_accepted: int = 0  # of those, kept

    @property
    def spec_acceptance_rate(self) -> float:
        return self.spec_accepted / self.spec_proposed if self.spec_proposed else 0.0

    @property
    def spec_mean_accepted(self) -> float:
        """Tokens a verifying step gives a request: its kept guesses plus its own one."""
        return 1 + self.spec_accepted / self.spec_rounds if self.spec_rounds else 0.0


@dataclass
class RequestOutput:
    """What one step produced for one request; the final one has finished=True."""

    request_id: str
    new_token_ids: list[int]
    delta_text: str
    delta_reasoning: str
    delta_answer: str
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int
    time_to_first_token: float  # seconds from arrival to the first token (the prefill)
    decode_seconds: float  # seconds since the first token
    new_logprobs: list[dict] = field(default_factory=list)  # per new token, when asked for
    error: str | None = None  # why the request failed (finish_reason "error")
    num_reasoning_tokens: int = 0  # of the output, the reasoning block's (tags included)


@dataclass
class TokenUpdate:
    """What the core did to one request in a step: the token it appended (None when it only
    finished or failed it), and the request's counts as of then."""

    request_id: str
    token_id: int | None
    role: str | None  # the token's place in the reasoning (r1/reasoning.py)
    logprobs: list[dict]
    finish_reason: str | None  # the core's: eos, a stop token, the length, the constraint, an abort
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int
    num_reasoning_tokens: int
    error: str | None = None


class PromptTooLongError(ValueError):
    """A prompt that does not fit the context: never silently truncated."""


class StepError(RuntimeError):
    """A step that failed as a whole (see core.py); `outputs` holds what it made, among them the
    final outputs ("error") of the requests it failed, for their callers."""

    def __init__(self, cause: Exception, outputs: list):
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.cause, self.outputs = cause, outputs


def is_device_fault(error: BaseException) -> bool:
    """A CUDA error (out-of-memory is its own class) that leaves the context unusable: every later
    call repeats it, so it is the engine's death, not a request's failure."""
    return isinstance(error, torch.AcceleratorError) or "CUDA error" in str(error)
