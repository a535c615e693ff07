"""The engine's host work per step: the real engine around a model that costs nothing.

On a GPU the host must schedule, prepare, sample, update and detokenize a step in less time than
the GPU takes to run it, or the GPU waits. This measures that host work alone: `LLMEngine` with
its real scheduler, block manager, model runner (inputs and metadata), sampler, reasoning
tracker, stop checks, detokenizer and outputs, around a model that returns preset logits rows.
Its vocabulary is narrow (`HOST_VOCAB` columns) so that the sampler's share stays the
bookkeeping's; `sampler_ms` times the sampler alone over the real vocabulary.

Owns the preset model, the workload and its timing; `r1 bench host` prints and saves the figures.
"""

from __future__ import annotations

import statistics
import time
from types import SimpleNamespace

import torch

from r1.engine import EngineRequest, LLMEngine, ModelRunner, SchedulerConfig
from r1.sampling import make_generator, sample_next
from r1.sampling_params import SamplingParams
from r1.tokenizer import Tokenizer

HOST_VOCAB = 512  # the preset logits' columns: real token ids of any Qwen2 vocabulary
POOL_ROWS = 4096  # distinct preset rows, cycled
BLOCK_SIZE = 16
TOKEN_BUDGET = 2048  # tokens a step: a GPU's default
MIN_OUTPUT_LEN = 8  # decode steps enough for a median, after the prompts' and before the last
R1_SAMPLING = {"temperature": 0.6, "top_p": 0.95}


class PresetModel:
    """Stands in for Qwen2ForCausalLM in a ModelRunner: no weights and no compute. Its forward
    hands back the input ids as hidden states, and compute_logits the next rows of a fixed pool
    of random logits over the first HOST_VOCAB ids, peaked as a trained model's are so that top-p
    keeps a few dozen tokens. It takes the ids of the whole vocabulary."""

    def __init__(self, vocab_size: int, seed: int = 0):
        self.config = SimpleNamespace(vocab_size=vocab_size, num_hidden_layers=1, num_key_value_heads=1, head_dim=1)
        self.model = SimpleNamespace(embed_tokens=SimpleNamespace(weight=torch.zeros(1)))
        rows = torch.randn(POOL_ROWS, HOST_VOCAB, generator=torch.Generator().manual_seed(seed)) * 4
        self.pool = torch.cat([rows, rows])  # a slice from any offset needs no wrapping
        self.offset = 0

    def __call__(self, input_ids, positions, kv_cache, meta) -> torch.Tensor:
        return input_ids

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        start, n = self.offset, hidden.shape[0]
        self.offset = (start + n) % POOL_ROWS
        return self.pool[start : start + n]


def host_engine(tokenizer: Tokenizer, num_seqs: int, max_len: int, async_scheduling: bool = False) -> LLMEngine:
    """An engine with room for num_seqs sequences of max_len tokens, around a PresetModel."""
    num_blocks = num_seqs * -(-max_len // BLOCK_SIZE) + 1
    runner = ModelRunner(PresetModel(tokenizer.vocab_size), num_blocks, BLOCK_SIZE, torch.float32)
    config = SchedulerConfig(num_blocks, BLOCK_SIZE, num_seqs, TOKEN_BUDGET, max_model_len=max_len + 1)
    eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    return LLMEngine(runner, tokenizer, config, {}, eos, async_scheduling)


def host_step_ms(
    tokenizer: Tokenizer,
    num_seqs: int,
    output_len: int = 128,
    *,
    sampled: bool = False,
    stream: bool = True,
    prompt: str = "Please reason step by step, and put your final answer within \\boxed{}. What is 17 * 23?",
) -> dict:
    """Host ms of the steps in which every one of num_seqs R1 chat requests decodes a token (their
    median), the requests streaming their outputs or reading only the final one."""
    if output_len < MIN_OUTPUT_LEN:
        raise ValueError(f"the host bench needs an output length of at least {MIN_OUTPUT_LEN}, got {output_len}")
    prompts = [tokenizer.encode_chat([{"role": "user", "content": f"{prompt} ({i})"}]) for i in range(num_seqs)]
    engine = host_engine(tokenizer, num_seqs, max(map(len, prompts)) + output_len)
    settings = R1_SAMPLING if sampled else {"temperature": 0.0}
    engine.add_requests(
        [
            EngineRequest(
                f"host-{i}",
                ids,
                SamplingParams(max_tokens=output_len, ignore_eos=True, seed=i, **settings),
                stream=stream,
            )
            for i, ids in enumerate(prompts)
        ]
    )
    step_ms = []
    while engine.has_unfinished():
        start = time.perf_counter()
        engine.step()
        step_ms.append((time.perf_counter() - start) * 1e3)
    # Every sequence decodes in the steps between the prompts' chunks (and one step of slack)
    # and the last step, which finishes them all.
    prefill_steps = -(-sum(map(len, prompts)) // TOKEN_BUDGET) + 1
    decode_ms = step_ms[prefill_steps:-1]
    median_ms = statistics.median(decode_ms)
    return {
        "num_seqs": num_seqs,
        "sampled": sampled,
        "stream": stream,
        "decode_steps": len(decode_ms),
        "host_ms_per_step": round(median_ms, 3),
        "host_us_per_seq": round(median_ms / num_seqs * 1e3, 2),
    }


def host_table(tokenizer: Tokenizer, sizes=(1, 16, 64, 256), output_len: int = 64) -> list[dict]:
    """host_step_ms at each batch size, greedy and sampled, streaming and not."""
    return [
        host_step_ms(tokenizer, n, output_len, sampled=sampled, stream=stream)
        for n in sizes
        for sampled in (False, True)
        for stream in (True, False)
    ]


def sampler_ms(rows: int = 256, vocab: int = 151936, sampled: bool = True, repeats: int = 5, seed: int = 0) -> float:
    """Median ms of sample_next over rows of vocab logits at R1's settings (or greedy),
    on logits peaked as a trained model's: a few dozen tokens hold nearly all of the mass."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=g)
    top = torch.randint(vocab, (rows, 24), generator=g)
    logits.scatter_add_(1, top, 12 + 2 * torch.randn(rows, 24, generator=g))
    settings = R1_SAMPLING if sampled else {"temperature": 0.0}
    params = [SamplingParams(**settings).with_defaults({}) for _ in range(rows)]
    gens = [make_generator(i) for i in range(rows)]
    times = []
    for _ in range(repeats + 1):  # the first pays for first-call paths
        start = time.perf_counter()
        sample_next(logits, params, [[]] * rows, [[]] * rows, gens)
        times.append((time.perf_counter() - start) * 1e3)
    return round(statistics.median(times[1:]), 3)
