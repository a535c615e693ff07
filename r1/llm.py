"""The front door: `LLM` loads a model and answers prompts and chats, streamed or collected.

Owns the choices a user makes once (model source, tokenizer override, device, dtype, pool size)
and the shapes users get back (`Completion`). The CLI, the server and the evaluation all call
this; none of them reach into the engine's parts.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator
from typing import Sequence as Seq

import torch

from r1 import kernels, memory
from r1.config import EngineConfig
from r1.engine import (
    DraftProposer,
    EngineRequest,
    LLMEngine,
    ModelRunner,
    NgramProposer,
    RequestOutput,
    SchedulerConfig,
    SpeculativeConfig,
    Speculator,
)
from r1.loaders import ModelFiles, gguf, hub, load_model, open_model_files
from r1.sampling_params import INT64, SamplingParams
from r1.tokenizer import Tokenizer

# Tokens that end a turn in the Qwen2 family besides the declared eos (llama.cpp treats them so).
END_OF_TURN_TOKENS = ("<|endoftext|>", "<|im_end|>", "<｜end▁of▁sentence｜>")

Prompt = str | list[int]
Message = dict  # {"role": "system" | "user" | "assistant", "content": str}


@dataclass
class Completion:
    """One finished request: the text, split into reasoning and answer, and its accounting."""

    request_id: str
    prompt_index: int  # which prompt of the call this answers
    sample_index: int  # which of its n samples (SamplingParams.n) this is
    prompt_token_ids: list[int]
    text: str
    reasoning: str
    answer: str
    token_ids: list[int]
    finish_reason: str | None
    usage: dict  # prompt_tokens, completion_tokens, cached_tokens
    timing: dict  # prefill_seconds, decode_seconds
    logprobs: list[dict] = field(default_factory=list)
    error: str | None = None  # why it failed, when finish_reason is "error"; the others are unharmed


def load_tokenizer(source: str | None, files: ModelFiles) -> Tokenizer:
    """The model's own tokenizer, or another one (an HF folder, hub id, GGUF file or demo name)."""
    if source is None:
        if files.format == "gguf":
            return Tokenizer.from_gguf_metadata(files.gguf_header.metadata)
        return Tokenizer.from_hf_folder(files.path)
    if source in hub.DEMO_ASSETS:
        path = hub.demo_path(source)
    elif Path(source).expanduser().exists():
        path = Path(source).expanduser()
    elif hub.looks_like_hub_id(source):
        path = hub.hub_snapshot(source, tokenizer_only=True)
    else:
        raise FileNotFoundError(f"tokenizer not found: {source!r}")
    if path.is_file():
        return Tokenizer.from_gguf_metadata(gguf.read_header(path).metadata)
    return Tokenizer.from_hf_folder(path)


class LLM:
    def __init__(
        self, model: str = hub.DEFAULT_MODEL, *, tokenizer: str | None = None, progress: bool = True, **engine_options
    ):
        self.engine_config = EngineConfig(**engine_options)
        if self.engine_config.threads:
            torch.set_num_threads(self.engine_config.threads)
        self.files = open_model_files(model)
        self.config = self.files.config
        self.device = self.engine_config.resolved_device()
        self.dtype = self.engine_config.resolved_dtype(self.device)
        self.tokenizer = load_tokenizer(tokenizer, self.files)
        kernels.select(self.engine_config.cpu_kernels, self.engine_config.gpu_layer_ops)
        start = time.perf_counter()
        self.model = load_model(self.files, self.dtype, self.device, progress=progress, quant=self.engine_config.quant)
        self.draft = self._load_draft(progress, own_tokenizer=self.tokenizer if tokenizer is None else None)
        self.load_seconds = time.perf_counter() - start
        kv_pool = self._kv_pool()
        runner = ModelRunner(self.model, *kv_pool, enforce_eager=self.engine_config.enforce_eager)
        scheduler_config = self._scheduler_config(runner.num_sequence_blocks)
        runner.capture_decode_graphs(scheduler_config.max_num_seqs, scheduler_config.max_model_len)
        self.engine = LLMEngine(
            runner,
            self.tokenizer,
            scheduler_config,
            self.files.sampling_defaults,
            self._end_of_turn_ids(),
            self.engine_config.resolved_async_scheduling(self.device),
            self._speculator(kv_pool),
        )
        self._ids = itertools.count()

    # ---- speculative decoding -----------------------------------------------------------------

    def _load_draft(self, progress: bool, own_tokenizer: Tokenizer | None):
        """The draft model of --speculative draft:MODEL (the model's dtype; resolved_draft_quant's
        weights), or None. own_tokenizer: the model's own tokenizer, when it is the one in use."""
        source = self.engine_config.draft_model
        if source is None:
            return None
        files = open_model_files(source)
        vocab = files.config.vocab_size
        if vocab > self.config.vocab_size:
            raise ValueError(f"the draft's vocabulary ({vocab}) is larger than the model's ({self.config.vocab_size})")
        # The two models' own tokenizers must agree (a --tokenizer override then serves both).
        own, draft_own = own_tokenizer or load_tokenizer(None, self.files), load_tokenizer(None, files)
        probe = "<｜User｜>Solve 2x + 3 = 7.<｜Assistant｜><think>\n def f(x):\n    return x ** 2"
        if draft_own.encode(probe) != own.encode(probe) or draft_own.eos_token_id != own.eos_token_id:
            raise ValueError(f"the draft model {source!r} does not share the model's tokenizer")
        return load_model(
            files, self.dtype, self.device, progress=progress, quant=self.engine_config.resolved_draft_quant
        )

    def _speculator(self, kv_pool: tuple[int, int, torch.dtype]) -> Speculator | None:
        ec = self.engine_config
        if ec.speculative is None:
            return None
        config = SpeculativeConfig(
            "draft" if self.draft is not None else "ngram",
            ec.num_speculative_tokens,
            draft_model=ec.draft_model,
            draft_quant=ec.resolved_draft_quant if self.draft is not None else None,
            max_batch=ec.speculative_disable_by_batch_size,
        )
        if self.draft is None:
            return Speculator(config, NgramProposer(config.ngram_min, config.ngram_max))
        return Speculator(config, DraftProposer(ModelRunner(self.draft, *kv_pool, enforce_eager=True)))

    # ---- sizing ------------------------------------------------------------------------------

    def _kv_pool(self) -> tuple[int, int, torch.dtype]:
        """(num_blocks, block_size, dtype) of the paged KV cache, sized by the memory calculator."""
        draft = self.draft.config if self.draft is not None else None
        self.kv_pool_tokens = memory.kv_pool_tokens(
            self.config, self.engine_config, self.device, self.dtype, draft=draft
        )
        return (
            self.kv_pool_tokens // self.engine_config.block_size,
            self.engine_config.block_size,
            self.engine_config.resolved_kv_dtype(self.dtype),
        )

    def _scheduler_config(self, num_blocks: int) -> SchedulerConfig:
        """The scheduler's limits, over the num_blocks of the pool the runner lets sequences use."""
        ec = self.engine_config
        max_len = min(ec.max_model_len or self.config.max_position_embeddings, num_blocks * ec.block_size)
        if ec.max_model_len and ec.max_model_len > self.config.max_position_embeddings:
            raise ValueError(
                f"max_model_len {ec.max_model_len} exceeds the model's context ({self.config.max_position_embeddings})"
            )
        return SchedulerConfig(
            num_blocks=num_blocks,
            block_size=ec.block_size,
            max_num_seqs=ec.max_num_seqs,
            max_num_batched_tokens=ec.resolved_max_num_batched_tokens(self.device.type),
            max_model_len=max_len,
            enable_prefix_caching=ec.enable_prefix_caching,
        )

    def _end_of_turn_ids(self) -> set[int]:
        ids = {self.tokenizer.eos_token_id}
        for text in END_OF_TURN_TOKENS:
            token_id = self.tokenizer.token_to_id(text)
            if token_id is not None:
                ids.add(token_id)
        return ids

    # ---- prompts -----------------------------------------------------------------------------

    def encode_prompt(self, prompt: Prompt | list[Message], chat: bool) -> list[int]:
        """Token ids of a prompt: a chat rendered with the template, text, or ids checked as they are."""
        if chat:
            if not isinstance(prompt, list) or not all(isinstance(m, dict) for m in prompt):
                raise TypeError("a chat is a list of {'role': ..., 'content': ...} messages")
            return self.tokenizer.encode_chat(prompt)
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            self.engine.check_prompt_ids(prompt)
            return list(prompt)
        raise TypeError(f"a prompt is a string or a list of token ids, not {type(prompt).__name__}")

    # ---- generation --------------------------------------------------------------------------

    def stream(
        self, prompt: Prompt | list[Message], params: SamplingParams | None = None, chat: bool = False
    ) -> Iterator[RequestOutput]:
        """Run one request alone, yielding its incremental outputs."""
        ids = self.encode_prompt(prompt, chat)
        request_id = f"req-{next(self._ids)}"
        self.engine.add_requests([EngineRequest(request_id, ids, _checked(params or SamplingParams()))])
        finished = False
        try:
            while not finished:
                for out in self.engine.step():
                    if out.request_id == request_id:
                        finished = out.finished
                        yield out
        finally:  # the caller stopped reading, or a step failed
            if not finished:
                self._take_back([request_id])

    def generate(
        self, prompts: Prompt | Seq[Prompt], params: SamplingParams | Seq[SamplingParams] | None = None
    ) -> list[Completion]:
        """Plain completions (no chat template) of one prompt or many, batched."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        return self._run_all(list(prompts), params, chat=False)

    def chat(
        self,
        conversations: list[Message] | Seq[list[Message]],
        params: SamplingParams | Seq[SamplingParams] | None = None,
    ) -> list[Completion]:
        """Answers to one conversation or many, rendered with the model's chat template."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        return self._run_all(list(conversations), params, chat=True)

    def _run_all(self, prompts: list, params, chat: bool) -> list[Completion]:
        """Run every prompt's n samples as one batch; completions come back in prompt order."""
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        params = [_checked(p) for p in params]
        requests, added = [], []  # added: (request id, prompt index, sample index, prompt ids)
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            ids = self.encode_prompt(prompt, chat)
            for j, sample_params in enumerate(expand_samples(p)):
                requests.append(EngineRequest(f"req-{next(self._ids)}", ids, sample_params, stream=False))
                added.append((requests[-1].request_id, i, j, ids))
        self.engine.add_requests(requests)  # one bad prompt fails the call, with nothing queued
        parts: dict[str, list[RequestOutput]] = {rid: [] for rid, *_ in added}
        remaining = set(parts)
        try:
            while remaining:
                for out in self.engine.step():
                    parts[out.request_id].append(out)
                    if out.finished:
                        remaining.discard(out.request_id)
        except BaseException:  # a failed step, or an interrupt: the engine is left empty, usable
            self._take_back(remaining)
            raise
        return [_collect(rid, i, j, ids, parts[rid]) for rid, i, j, ids in added]

    def _take_back(self, request_ids) -> None:
        """Abort requests and let the engine hand out their final outputs, to nobody."""
        self.engine.abort(request_ids)
        self.engine.step()


def _checked(params) -> SamplingParams:
    if not isinstance(params, SamplingParams):
        raise TypeError(f"sampling params must be SamplingParams, not {type(params).__name__}")
    return params


def expand_samples(params: SamplingParams) -> list[SamplingParams]:
    """n samples as n requests; a seed becomes seed, seed + 1, ... (wrapping within int64) so the
    samples differ."""
    if params.n == 1:
        return [params]
    low, high = INT64
    seeds = (
        [None] * params.n
        if params.seed is None
        else [(params.seed + i - low) % (high - low + 1) + low for i in range(params.n)]
    )
    return [dataclasses.replace(params, n=1, seed=seed) for seed in seeds]


def _collect(
    request_id: str, prompt_index: int, sample_index: int, prompt_ids: list[int], outputs: list[RequestOutput]
) -> Completion:
    last = outputs[-1]
    return Completion(
        request_id=request_id,
        prompt_index=prompt_index,
        sample_index=sample_index,
        prompt_token_ids=prompt_ids,
        text="".join(o.delta_text for o in outputs),
        reasoning="".join(o.delta_reasoning for o in outputs),
        answer="".join(o.delta_answer for o in outputs),
        token_ids=[t for o in outputs for t in o.new_token_ids],
        finish_reason=last.finish_reason,
        usage={
            "prompt_tokens": last.num_prompt_tokens,
            "completion_tokens": last.num_output_tokens,
            "cached_tokens": last.num_cached_tokens,
            "reasoning_tokens": last.num_reasoning_tokens,
        },
        timing={"prefill_seconds": last.time_to_first_token, "decode_seconds": last.decode_seconds},
        logprobs=[lp for o in outputs for lp in o.new_logprobs],
        error=last.error,
    )
