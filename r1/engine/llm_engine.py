"""The engine's front door: requests in, incremental outputs out, one `step()` at a time.

`LLMEngine` checks and prepares requests (all of a group or none), then joins the two halves of
a step (vLLM v1's split): the core (core.py) schedules, runs, samples and updates each request by
token; the output processor (output_processor.py) turns the updates into text, stop strings, the
reasoning/answer split and `RequestOutput`s. Its public surface is what the rest of r1 uses:
add_requests, abort, step, has_unfinished, stats and config_record (r1/engine/__init__.py).

A request whose output processing raises (its detokenizer, say) fails alone, as one whose
sampling raises does in the core.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Iterable
from typing import Sequence as Seq

from r1 import kernels
from r1.engine.core import CoreRequest, EngineCore
from r1.engine.interface import EngineRequest, EngineStats, PromptTooLongError, RequestOutput, StepError
from r1.engine.model_runner import ModelRunner
from r1.engine.output_processor import OutputProcessor
from r1.engine.scheduler import Scheduler, SchedulerConfig
from r1.engine.sequence import Sequence
from r1.engine.speculative import SpeculationStats, Speculator
from r1.reasoning import ReasoningTracker, prompt_opens_reasoning
from r1.sampling import make_generator
from r1.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class LLMEngine:
    def __init__(
        self,
        runner: ModelRunner,
        tokenizer: Tokenizer,
        scheduler_config: SchedulerConfig,
        sampling_defaults: dict,
        eos_token_ids: set[int],
        async_scheduling: bool = False,
        speculator: Speculator | None = None,
    ):
        self.tokenizer, self.sampling_defaults = tokenizer, sampling_defaults
        self.eos_token_ids = eos_token_ids
        self.max_model_len = scheduler_config.max_model_len
        self.vocab_size = runner.model.config.vocab_size
        self.think_ids = tokenizer.token_to_id("<think>"), tokenizer.token_to_id("</think>")
        self.core = EngineCore(
            runner, Scheduler(scheduler_config), eos_token_ids, self._is_blank, async_scheduling, speculator
        )
        self.output = OutputProcessor(tokenizer)

    def _is_blank(self, token_id: int) -> bool:
        return not self.tokenizer.decode([token_id], skip_special_tokens=False).strip()

    # ---- requests --------------------------------------------------------------------------

    def check_prompt_ids(self, prompt_token_ids: list[int]) -> None:
        """Raise ValueError unless the ids are a non-empty list of the model's token ids."""
        if not prompt_token_ids:
            raise ValueError("the prompt is empty")
        if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < self.vocab_size for t in prompt_token_ids):
            raise ValueError(f"prompt token ids must be integers in [0, {self.vocab_size})")

    def add_requests(self, requests: Seq[EngineRequest]) -> None:
        """Queue a group of requests (the n samples of one call, say), all or none: each is checked,
        and its generator and tracker built, before any is queued.

        Raises ValueError (PromptTooLongError for a prompt past the context) naming the problem.
        """
        ids = [r.request_id for r in requests]
        if len(set(ids)) < len(ids):
            raise ValueError(f"request ids repeat within the group: {ids}")
        prepared = [self._prepare(r) for r in requests]
        for r, req in zip(requests, prepared):
            self.output.add(req.request_id, req.params, req.reasoning.in_reasoning, r.stream)
        self.core.add(prepared)

    def _prepare(self, r: EngineRequest) -> CoreRequest:
        if r.request_id in self.core.by_request_id:
            raise ValueError(f"request id {r.request_id!r} is already in use")
        self.check_prompt_ids(r.prompt_token_ids)
        n = len(r.prompt_token_ids)
        if n >= self.max_model_len:
            raise PromptTooLongError(
                f"the prompt has {n} tokens but the context holds {self.max_model_len} "
                f"(max_model_len), leaving no room to generate"
            )
        params = r.params.with_defaults(self.sampling_defaults)
        if params.top_k >= self.vocab_size:  # keeps every token: vLLM's clamp
            params = dataclasses.replace(params, top_k=0)
        if params.max_reasoning_tokens is not None and self.think_ids[1] is None:
            raise ValueError("max_reasoning_tokens needs a tokenizer with a </think> token")
        room = self.max_model_len - n
        seq = Sequence(
            next(self.core.seq_ids),
            list(r.prompt_token_ids),
            min(params.max_tokens or room, room),
            cache_salt=r.cache_salt,
        )
        self.core.scheduler.check(seq)
        opens = prompt_opens_reasoning(seq.prompt_token_ids, *self.think_ids)
        return CoreRequest(
            r.request_id,
            seq,
            params,
            make_generator(params.seed),
            ReasoningTracker(*self.think_ids, opens),
            r.constraint,
        )

    def abort(self, request_ids: Iterable[str]) -> None:
        """Finish the requests with "abort" (their final outputs come out of the next step); ids
        that are unknown or already finished are passed over."""
        for request_id in request_ids:
            self.core.abort(request_id)

    def has_unfinished(self) -> bool:
        return self.core.has_unfinished()

    def stats(self) -> EngineStats:
        sched, speculator = self.core.scheduler, self.core.speculator
        bm = sched.block_manager
        spec = speculator.stats if speculator is not None else SpeculationStats()
        return EngineStats(
            sched.num_running,
            sched.num_waiting,
            bm.num_blocks,
            bm.num_free_blocks,
            bm.usage,
            bm.prefix_queries,
            bm.prefix_hits,
            sched.num_preemptions,
            spec.rounds,
            spec.proposed,
            spec.accepted,
        )

    def config_record(self) -> dict[str, Any]:
        """The engine's settings that shape its outputs or its speed, for bench records and manifests."""
        cfg, runner = self.core.scheduler.config, self.core.runner
        cpu_kernels = kernels.op("add_rms_norm") is not None
        return {
            "max_model_len": cfg.max_model_len,
            "block_size": cfg.block_size,
            "num_blocks": cfg.num_blocks,
            "max_num_seqs": cfg.max_num_seqs,
            "max_num_batched_tokens": cfg.max_num_batched_tokens,
            "enable_prefix_caching": cfg.enable_prefix_caching,
            "async_scheduling": self.core.async_scheduling,
            "speculative": self.core.speculator.settings() if self.core.speculator else None,
            "kv_cache_dtype": str(runner.kv_dtype).removeprefix("torch."),
            "kv_cache_bytes": runner.kv_cache.nbytes,
            "cuda_graphs": runner.graphs is not None,
            "cuda_graph_sizes": sorted(runner.graphs.graphs) if runner.graphs else [],
            "cpu_kernels": kernels.running_build().name if cpu_kernels else None,
            "cpu_prefetch_bytes": kernels.prefetch_bytes() if cpu_kernels else None,
            "cpu_decode_step": runner.device.type == "cpu" and runner.model.cpu_decode_step is not None,
            "kernels": kernels.plan(runner.device, runner.model.model.embed_tokens.weight.dtype),
        }

    # ---- one step ----------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        try:
            updates = self.core.step()
        except StepError as e:
            raise StepError(e.cause, self._process_all(e.outputs)) from e.cause
        return self._process_all(updates)

    def _process_all(self, updates: list) -> list[RequestOutput]:
        """The outputs of a step's updates, in order. A request that does not stream has none
        until its final one. A request may have several (speculative decoding keeps several
        tokens a step); those after its final output (a stop string found in an earlier token's
        text) are dropped."""
        outputs, ended = [], set()
        for update in updates:
            if update.request_id in ended:
                continue
            out = self._process(update)
            if out is None:
                continue
            outputs.append(out)
            if out.finished:
                ended.add(update.request_id)
        return outputs

    def _process(self, update) -> RequestOutput | None:
        try:
            out = self.output.process(update)
        except Exception as e:  # its detokenizer or stop check: its failure alone
            log.error("request %s failed", update.request_id, exc_info=e)
            self.core.finish(update.request_id, "error")
            return self.output.fail(update, f"{type(e).__name__}: {e}")
        if out is not None and out.finished and update.finish_reason is None:  # a stop string ended it
            self.core.finish(update.request_id, out.finish_reason)
        return out
