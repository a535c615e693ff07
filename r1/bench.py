"""Benchmarks of the engine through `LLM`: latency and throughput, and the record they leave.

Latency is one prompt's prefill (time to the first token of a `prompt_len` prompt, in the
engine's prefill chunks) and batch-1 decode (tokens after the first over the seconds after it). Throughput is
nano-vllm's bench: N sequences of random prompt and output lengths run as one batch, eos
ignored, generated tokens over wall seconds (prefill included). Prompts are random token ids,
reproducible by seed, so bench/compare.py hands the very same ids to llama.cpp and transformers.

Owns the workloads, the timing and the results record (settings, figures, machine, command).
It does not own argument parsing (cli.py) or the peer engines (bench/compare.py).
"""

from __future__ import annotations

import json
import math
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

from r1.sampling_params import SamplingParams

# nano-vllm draws prompt ids from [0, 10000): ordinary tokens in every Qwen2 vocabulary.
PROMPT_VOCAB = 10_000
WARMUP_TOKENS = 4


def random_prompts(lengths: list[int], vocab_size: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    high = min(vocab_size, PROMPT_VOCAB)
    return [[rng.randrange(high) for _ in range(n)] for n in lengths]


def latency_prompts(prompt_len: int, repeats: int, vocab_size: int, seed: int = 0):
    """(warm-up, [prefill prompt per repeat], [decode prompt per repeat]), all distinct.

    Distinct prompts keep the prefix cache from serving one run out of another.
    """
    prompts = random_prompts([prompt_len] * (1 + 2 * repeats), vocab_size, seed)
    return prompts[0], prompts[1 : 1 + repeats], prompts[1 + repeats :]


def throughput_workload(
    num_seqs: int, input_len: tuple[int, int], output_len: tuple[int, int], vocab_size: int, seed: int = 0
) -> tuple[list[list[int]], list[int]]:
    """nano-vllm's workload: prompt and output lengths uniform in the inclusive ranges."""
    if num_seqs < 1:
        raise ValueError(f"--num-seqs must be at least 1; got {num_seqs}")
    for name, (low, high) in (("input", input_len), ("output", output_len)):
        if not 1 <= low <= high:
            raise ValueError(f"--min-{name} must be at least 1 and at most --max-{name}; got {low}..{high}")
    rng = random.Random(seed)
    prompt_lens = [rng.randint(*input_len) for _ in range(num_seqs)]
    output_lens = [rng.randint(*output_len) for _ in range(num_seqs)]
    return random_prompts(prompt_lens, vocab_size, seed + 1), output_lens


def throughput_warmup(num_seqs: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    """A short batch on other ids: first-call paths run, and no prefix is shared with the workload."""
    return random_prompts([32] * min(4, num_seqs), vocab_size, seed + 2)


def _greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def _check_room(llm, tokens: int) -> None:
    if tokens > llm.engine.max_model_len:
        raise ValueError(
            f"the benchmark needs {tokens} tokens per sequence but the context holds "
            f"{llm.engine.max_model_len} (raise --max-model-len or the KV pool)"
        )


def latency(llm, prompt_len: int = 512, output_len: int = 128, repeats: int = 1, seed: int = 0) -> dict:
    """Prefill tok/s of a prompt_len prompt (its time to the first token, in the engine's
    prefill chunks) and batch-1 decode tok/s over output_len tokens.

    Each figure is the median over `repeats` runs, after one warm-up run of the same shape.
    """
    if output_len < 2 or repeats < 1:
        raise ValueError("latency needs --output-len of at least 2 and --repeats of at least 1")
    _check_room(llm, prompt_len + output_len)
    warm, prefill_prompts, decode_prompts = latency_prompts(prompt_len, repeats, llm.config.vocab_size, seed)
    llm.generate(warm, _greedy(WARMUP_TOKENS))
    # max_tokens=1: the time to the first token is the prompt's prefill chunks plus one sample.
    prefill = [llm.generate(p, _greedy(1))[0].timing["prefill_seconds"] for p in prefill_prompts]
    decode = [llm.generate(p, _greedy(output_len))[0] for p in decode_prompts]
    decode_seconds = statistics.median(c.timing["decode_seconds"] for c in decode)
    output_tokens = len(decode[0].token_ids)
    prefill_seconds = statistics.median(prefill)
    return {
        "prompt_tokens": prompt_len,
        "output_tokens": output_tokens,
        "repeats": repeats,
        "prefill_seconds": prefill_seconds,
        "prefill_tok_s": prompt_len / prefill_seconds,
        "decode_seconds": decode_seconds,
        "decode_tok_s": (output_tokens - 1) / decode_seconds,
    }


def throughput(llm, prompts: list[list[int]], output_lens: list[int], temperature: float = 0.6, seed: int = 0) -> dict:
    """Generated tokens per wall second with every sequence in one continuous batch."""
    _check_room(llm, max(len(p) + n for p, n in zip(prompts, output_lens)))
    llm.generate(throughput_warmup(len(prompts), llm.config.vocab_size, seed), _greedy(WARMUP_TOKENS))
    params = [
        SamplingParams(temperature=temperature, max_tokens=n, ignore_eos=True, seed=seed + i)
        for i, n in enumerate(output_lens)
    ]
    start = time.perf_counter()
    completions = llm.generate(prompts, params)
    seconds = time.perf_counter() - start
    total_output = sum(len(c.token_ids) for c in completions)
    return {
        "num_seqs": len(prompts),
        "temperature": temperature,
        "total_input_tokens": sum(len(p) for p in prompts),
        "total_output_tokens": total_output,
        "seconds": seconds,
        "output_tok_s": total_output / seconds,
    }


# ---- the record -----------------------------------------------------------------------------


def engine_settings(llm, model: str) -> dict:
    import torch

    return {
        "model": model,
        "quant": llm.engine_config.quant,
        "dtype": str(llm.dtype).removeprefix("torch."),
        "kv_dtype": llm.engine_config.kv_dtype,
        "device": llm.device.type,
        "threads": torch.get_num_threads(),
        **llm.engine.config_record(),
    }


def decode_read_bytes(model) -> int:
    """The weight bytes one decode step reads: every parameter and buffer but the embedding table."""
    embedding = model.model.embed_tokens.weight
    tensors = [t for t in (*model.parameters(), *model.buffers()) if t is not embedding]
    return sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values())


def gguf_decode_read_bytes(path) -> int:
    """The same for llama.cpp running a GGUF file: its tensors but the embedding table."""
    from r1.loaders import gguf

    header = gguf.read_header(path)
    return sum(gguf.tensor_nbytes(t) for t in header.tensors if t.name != "token_embd.weight")


def bus_fraction(tok_s: float, read_bytes: int, machine_info: dict) -> float | None:
    """Decode speed as a fraction of what the measured read bandwidth allows for read_bytes a token."""
    gb_s = machine_info.get("read_gb_s")
    return round(tok_s * read_bytes / (gb_s * 1e9), 3) if gb_s else None


def speculation(llm) -> dict:
    """Speculative decoding's counts over the engine's life: rounds, guesses, kept, and the rates."""
    s = llm.engine.stats()
    if not s.spec_rounds:
        return {}
    return {
        "spec_rounds": s.spec_rounds,
        "spec_proposed": s.spec_proposed,
        "spec_accepted": s.spec_accepted,
        "spec_acceptance_rate": round(s.spec_acceptance_rate, 4),
        "spec_mean_accepted": round(s.spec_mean_accepted, 3),
    }


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's name, with its family and model numbers: a VM may call every EPYC "AMD EPYC",
    and family 25 (Zen 4) and 26 (Zen 5) differ 2x in vector arithmetic."""
    from r1 import kernels

    fields = kernels.cpuinfo_fields(cpuinfo)
    if "model name" not in fields:
        return platform.processor() or platform.machine()
    if "cpu family" in fields and "model" in fields:
        return f"{fields['model name']} (family {fields['cpu family']}, model {fields['model']})"
    return fields["model name"]


def read_bandwidth_gb_s(gib: float = 1.0, passes: int = 3) -> float:
    """GB/s of a plain float32 sum over `gib` GiB on torch's threads, the best of a few passes: the
    rate a CPU decode step can read its weights at, to state every speed as a share of it."""
    import torch

    x = torch.ones(int(gib * 2**28))  # touched once here, so the passes read memory, not page faults
    best = math.inf
    for _ in range(passes):
        started = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - started)
    return round(x.nbytes / best / 1e9, 1)


def machine() -> dict:
    """What the figures are measured on. Take it before the run: the load average then says how
    busy the machine was with other work, not with ours."""
    import torch

    return {
        "cpu": cpu_model(),
        "read_gb_s": read_bandwidth_gb_s(),
        "read_threads": torch.get_num_threads(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "load_average_1m": round(os.getloadavg()[0], 2),
    }


def save(path: str | Path, result: dict, machine_info: dict) -> Path:
    """Write one result as JSON with the machine (taken before the run) and the command line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "machine": machine_info, **result}
    path.write_text(json.dumps(record, indent=1) + "\n")
    return path
