"""Structured output: `response_format` (json_object, json_schema) as a token constraint.

The grammar work is llguidance's: it compiles a JSON schema and, at each step, says which tokens
may come next. This module adapts it to the engine's constraint hook (`allowed_tokens`,
`accept`, `is_done`): it builds llguidance's tokenizer once from ours, turns a response_format
into matchers (compiled once per API request, copied for each of its samples), and turns
llguidance's bitmask into a boolean mask as wide as the model's logits. It does not decide where
the constraint applies (the engine applies it to the answer, after the reasoning) nor parse HTTP
requests (protocol.py).
"""

from __future__ import annotations

import threading

import llguidance
import numpy as np
import torch

from r1.tokenizer import Tokenizer

# Compact JSON ("a": 1, "b": 2) instead of free whitespace, which a small model can fill with
# newlines until max_tokens runs out.
JSON_OPTIONS = {"whitespace_flexible": False}


class GrammarConstraint:
    """One request's matcher: which tokens may follow what has been accepted so far."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int):
        self.matcher = matcher
        self.vocab_size = vocab_size

    def allowed_tokens(self) -> torch.Tensor:
        """A bool mask of shape (vocab_size,): True where the token keeps the output valid."""
        words = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        # Bit i of 32-bit little-endian word j is token 32 * j + i.
        bits = np.unpackbits(words, bitorder="little").astype(bool)
        mask = torch.zeros(self.vocab_size, dtype=torch.bool)
        n = min(self.vocab_size, bits.size)  # the model's rows past the tokenizer's stay False
        mask[:n] = torch.from_numpy(bits[:n])
        return mask

    def accept(self, token_id: int) -> None:
        # A token outside the mask puts the matcher in its error state, which counts as done.
        self.matcher.consume_token(token_id)

    def is_done(self) -> bool:
        """True once nothing but the end of the output can follow (or the matcher failed)."""
        return self.matcher.is_stopped()


class StructuredOutputs:
    """Builds constraints for one tokenizer; llguidance's tokenizer is made once, on first use."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_token_ids: list[int]):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self._ll_tokenizer: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()  # building takes ~1 s; concurrent first requests build it once

    def constraints(self, response_format: dict | None, n: int) -> list[GrammarConstraint | None]:
        """n constraints for an OpenAI response_format dict, each walking the grammar on its own;
        Nones for plain text. The schema is compiled once, whatever n is.

        Raises ValueError for an unknown type or a schema llguidance cannot compile.
        """
        kind = (response_format or {}).get("type", "text")
        if kind == "text":
            return [None] * n
        if kind == "json_object":
            schema = {"type": "object"}
        elif kind == "json_schema":
            schema = (response_format.get("json_schema") or {}).get("schema")
            if not isinstance(schema, dict):
                raise ValueError("response_format.json_schema.schema must be a JSON schema object")
        else:
            raise ValueError(f"unknown response_format type {kind!r}")
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
        # A grammar that does not compile leaves the matcher in its error state (log_level 0: quietly).
        matcher = llguidance.LLMatcher(self._llg_tokenizer(), grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(f"invalid JSON schema: {matcher.get_error()}")
        matchers = [matcher] + [matcher.deep_copy() for _ in range(n - 1)]
        return [GrammarConstraint(m, self.vocab_size) for m in matchers]

    def _llg_tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._ll_tokenizer is None:
                self._ll_tokenizer = llguidance.LLTokenizer(
                    self.tokenizer.backend.to_str(), eos_token=self.eos_token_ids
                )
            return self._ll_tokenizer
