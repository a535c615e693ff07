"""The memory calculator: what a model needs at a weight format, context and batch, line by line,
and the size of the engine's paged KV pool, from the same arithmetic.

Owns the bytes of: weights in every format we know (float dtypes; r1's weight-only int8 and int4;
llama.cpp's GGUF presets; or the exact tensors of a given file), the KV cache, one engine step's
activations and logits, the runtime's fixed cost per device, and the CPU's peak while loading.
The constants that are not arithmetic were measured on CPU (bench/memory_validation.py, results
in bench/results/) and say so. It does not own the shapes (config.py) or any allocation.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from r1 import options
from r1.config import DTYPES, EngineConfig, ModelConfig
from r1.model.attention import DECODE_GATHER_TOKENS
from r1.quant import (
    INT4_GROUP_SIZE,
    INT6_GROUP_SIZE,
    checkpoint_linears,
    int4_nbytes,
    int6_nbytes,
    linear_plan,
    stored_type,
)

GiB = 1 << 30

# What r1 holds in memory: floats, and weight-only int8 (per-row scale) / int4 (group-32, with int6 where
# the plan keeps more bits, as r1/quant.py).
FLOAT_QUANTS = options.DTYPES
R1_QUANTS = tuple(m for m in options.QUANT_MODES if m != "none")
# llama.cpp presets by their per-tensor types (llama_tensor_get_type): (default, bigger type for
# half of attn_v and ffn_down, type of output.weight).
GGUF_PRESETS = {
    "q8_0": ("Q8_0", None, "Q8_0"),
    "q6_k": ("Q6_K", None, "Q6_K"),
    "q5_k_m": ("Q5_K", "Q6_K", "Q6_K"),
    "q4_k_m": ("Q4_K", "Q6_K", "Q6_K"),
    "q4_0": ("Q4_0", None, "Q6_K"),
}
QUANTS = FLOAT_QUANTS + R1_QUANTS + tuple(GGUF_PRESETS)
# general.file_type of a GGUF file (llama_ftype), for the presets above.
GGUF_FILE_TYPES = {0: "fp32", 1: "fp16", 32: "bf16", 7: "q8_0", 18: "q6_k", 17: "q5_k_m", 15: "q4_k_m", 2: "q4_0"}
# K-quants need rows of 256; llama.cpp falls back to these for other widths.
_K_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
KV_DTYPES = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp8": torch.float8_e4m3fn,
    "int8": torch.int8,
}

# Measured (bench/results/memory_cpu.json): RSS of Python, torch, the GGUF header and the tokenizer,
# plus the heap the loader leaves behind, with no weights or KV cache.
CPU_RUNTIME_BYTES = int(0.45 * GiB)
# Not measured (no GPU this session): a torch CUDA context with cuBLAS, and caching-allocator slack.
CUDA_CONTEXT_BYTES = GiB // 2
CUDA_ALLOCATOR_SLACK = 0.05
# Measured: a GGUF load peaks at ~16 B per weight of its largest tensor above the runtime, while
# that tensor is dequantized to float32 and regrouped (demo with --quant int4: 3.85 GiB against
# this estimate's 3.93).
GGUF_DEQUANT_BYTES_PER_WEIGHT = 16
# The engine's KV pool without a stated size: a fixed CPU budget; on CUDA, this share of free memory.
CPU_KV_BUDGET_BYTES = 4 * GiB
CUDA_MEMORY_FRACTION = 0.9


# ---- weights ----------------------------------------------------------------------------------


def gguf_tensors(cfg: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    """Every weight as (llama.cpp name, torch shape): what a GGUF file of this model holds."""
    h, q, kv, inter = cfg.hidden_size, cfg.q_size, cfg.kv_size, cfg.intermediate_size
    out = [("token_embd.weight", (cfg.vocab_size, h))]
    if not cfg.tie_word_embeddings:
        out.append(("output.weight", (cfg.vocab_size, h)))
    out.append(("output_norm.weight", (h,)))
    for i in range(cfg.num_hidden_layers):
        for name, shape in (
            ("attn_norm.weight", (h,)),
            ("attn_q.weight", (q, h)),
            ("attn_q.bias", (q,)),
            ("attn_k.weight", (kv, h)),
            ("attn_k.bias", (kv,)),
            ("attn_v.weight", (kv, h)),
            ("attn_v.bias", (kv,)),
            ("attn_output.weight", (h, q)),
            ("ffn_norm.weight", (h,)),
            ("ffn_gate.weight", (inter, h)),
            ("ffn_up.weight", (inter, h)),
            ("ffn_down.weight", (h, inter)),
        ):
            out.append((f"blk.{i}.{name}", shape))
    return out


def _use_more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's choice of the layers that get the bigger type in the _M presets. It counts the
    tensors in file order, and GGUF files list layers by name (blk.0, blk.1, blk.10, ...)."""
    i = sorted(range(n_layers), key=str).index(layer)
    return i < n_layers // 8 or i >= 7 * n_layers // 8 or (i - n_layers // 8) % 3 == 2


def gguf_preset_type(preset: str, name: str, shape: tuple[int, ...], n_layers: int) -> str:
    """The ggml type llama.cpp gives one tensor under a preset (1-D tensors stay F32)."""
    if len(shape) == 1:
        return "F32"
    default, more, head = GGUF_PRESETS[preset]
    kind = name.rsplit(".", 2)[-2]
    if name == "output.weight":
        qtype = head
    elif more and kind in ("attn_v", "ffn_down") and _use_more_bits(int(name.split(".")[1]), n_layers):
        qtype = more
    else:
        qtype = default
    return _K_FALLBACK.get(qtype, qtype) if shape[-1] % 256 else qtype


def _ggml_bytes(qtype: str, numel: int) -> int:
    import gguf

    block, block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    return numel // block * block_bytes


def _tensor_bytes(quant: str, name: str, shape: tuple[int, ...], cfg: ModelConfig) -> tuple[str, int]:
    """(how one tensor is stored, its bytes) under a llama.cpp preset."""
    qtype = gguf_preset_type(quant, name, shape, cfg.num_hidden_layers)
    return qtype, _ggml_bytes(qtype, math.prod(shape))


def linear_nbytes(kind: str, shape: tuple[int, int], device: str, source_type: str | None = None) -> tuple[str, int]:
    """(how r1 holds one linear of a format on a device, its bytes): quant.linear_class's choice,
    given the GGUF type the file stores it in (Q4_K blocks keep their own int4 steps)."""
    n, k = shape
    if kind == "int4" and device == "cuda":  # packed nibbles; bf16 scale and zero per group
        return f"int4 + bf16 scale, zero / {INT4_GROUP_SIZE}", int4_nbytes(n, k, device)
    if kind == "int4":  # packed nibbles; an 8-bit scale and low per group; two float steps per row or 256
        steps = "float16 steps / 256" if source_type == "Q4_K" else "float32 steps / row"
        return f"int4 + 8-bit scale, low / {INT4_GROUP_SIZE}, {steps}", int4_nbytes(n, k, device, source_type)
    if kind in ("int6", "int6/32") and device == "cpu":  # Q6_K's structure: int8 scale per 16 or 32, f16 d per 256
        group = INT6_GROUP_SIZE if kind == "int6" else 2 * INT6_GROUP_SIZE
        return f"int6 + int8 scale / {group}", int6_nbytes(n, k, group)
    return "int8 + bf16 scale / row", n * k + 2 * n  # int8, and int6 off r1's CPU kernel


def weight_plan(
    cfg: ModelConfig, quant: str, device: str = "cpu", source_types: dict[str, str] | None = None
) -> list[tuple[str, tuple[int, int], str, str, int]]:
    """Each linear under an r1 quant: (name, shape, the type its file stores it in, how r1 holds
    it, bytes), given the file's types (GGUF) or none (float checkpoints)."""
    plan, types = linear_plan(cfg, quant, source_types), source_types or {}
    rows = []
    for name, shape in checkpoint_linears(cfg):
        stored = stored_type(types, name)
        rows.append((name, shape, stored or "float", *linear_nbytes(plan[name], shape, device, stored)))
    return rows


@dataclass(frozen=True)
class Line:
    """One line of a memory plan: its bytes and how they were worked out."""

    name: str
    bytes: int
    formula: str

    @property
    def gib(self) -> float:
        return self.bytes / GiB


def weight_line(
    cfg: ModelConfig, quant: str, compute: str, device: str = "cpu", source_types: dict[str, str] | None = None
) -> Line:
    """Weight bytes of a model stored as `quant` and served on `device`; what a format leaves
    unquantized is in `compute`. r1's int4 follows the file's types where it has them."""
    if quant in FLOAT_QUANTS:
        n, size = cfg.num_parameters(), DTYPES[quant].itemsize
        return Line("weights", n * size, f"{n:,} params x {size} B ({quant})")
    parts: dict[str, list[int]] = {}  # storage -> [weights, bytes]

    def add(label: str, numel: int, nbytes: int) -> None:
        part = parts.setdefault(label, [0, 0])
        part[0] += numel
        part[1] += nbytes

    if quant in GGUF_PRESETS:
        for name, shape in gguf_tensors(cfg):
            qtype, nbytes = _tensor_bytes(quant, name, shape, cfg)
            add(qtype, math.prod(shape), nbytes)
        layout = f"llama.cpp {quant.upper()} layout"
    else:
        linears = weight_plan(cfg, quant, device, source_types)
        for _, shape, _, label, nbytes in linears:
            add(label, math.prod(shape), nbytes)
        rest = cfg.num_parameters() - sum(math.prod(shape) for _, shape, *_ in linears)
        if cfg.tie_word_embeddings:  # the head is a quantized copy of the embedding
            rest += cfg.vocab_size * cfg.hidden_size
        add(f"{compute}: embedding, norms, biases", rest, rest * DTYPES[compute].itemsize)
        layout = f"r1 weight-only {quant}"
    terms = " + ".join(f"{n / 1e6:,.1f}M x {b / n:.4g} B ({label})" for label, (n, b) in parts.items())
    return Line("weights", sum(b for _, b in parts.values()), f"{layout}: {terms}")


# ---- model sources ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSource:
    """A model's config and, when there are files, what they hold (no weights are read)."""

    name: str
    config: ModelConfig
    file_quant: str | None = None  # the format the file stores its weights in
    file_weight_bytes: int | None = None  # exact tensor bytes in the file(s)
    file_bytes: int | None = None  # what loading maps into memory
    is_gguf: bool = False
    source_types: dict[str, str] | None = None  # a GGUF file's type of each tensor, by hf name
    note: str = ""


def _safetensors_tensor_bytes(path: Path) -> int:
    """Sum of the tensors' byte ranges, from the safetensors header alone."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return sum(t["data_offsets"][1] - t["data_offsets"][0] for k, t in header.items() if k != "__metadata__")


def model_source(name: str) -> ModelSource:
    """Resolve --model: a GGUF file or demo name (its header), an HF folder (config.json and the
    safetensors headers), or a hub id (config.json only; R1's known config when offline)."""
    from r1.config import R1_1_5B
    from r1.loaders import gguf, hub, resolve_path, safetensors

    if hub.looks_like_hub_id(name) and name not in hub.DEMO_ASSETS:
        try:
            folder = hub.hub_snapshot(name, tokenizer_only=True)  # config.json, never the weights
        except ConnectionError:
            if name != hub.DEFAULT_MODEL:
                raise
            return ModelSource(name, R1_1_5B, note="built-in config (hub unreachable, not cached)")
        return ModelSource(name, ModelConfig.from_json_file(folder / "config.json"))
    path = resolve_path(name)
    if path.is_file():
        header = gguf.read_header(path)
        config = ModelConfig.from_gguf_metadata(header.metadata, {t.name: t.shape for t in header.tensors})
        return ModelSource(
            name,
            config,
            GGUF_FILE_TYPES.get(header.metadata.get("general.file_type"), "file"),
            sum(gguf.tensor_nbytes(t) for t in header.tensors),
            header.file_size,
            True,
            source_types=gguf.source_types(header),
        )
    config = ModelConfig.from_json_file(path / "config.json")
    files = safetensors.checkpoint_files(path)
    return ModelSource(
        name,
        config,
        config.dtype,
        sum(_safetensors_tensor_bytes(f) for f in files),
        sum(f.stat().st_size for f in files),
    )


# ---- one engine step --------------------------------------------------------------------------


def gathered_tokens(context: int, decode_rows: int) -> int:
    """The most cached tokens attention copies out of the paged cache at once: a prefill chunk's
    sequence, or decoding sequences padded to the longest, DECODE_GATHER_TOKENS at a time. (On
    r1's CPU kernel decodes read the cache in place, and this bounds their scratch from above.)"""
    return max(context, min(decode_rows * context, DECODE_GATHER_TOKENS))


def activation_bytes(cfg: ModelConfig, step_tokens: int, context: int, act_itemsize: int, decode_rows: int = 1) -> int:
    """Peak temporaries of one forward of `step_tokens` new tokens whose longest sequence attends
    to `context` tokens, `decode_rows` of them decoding: the hidden stream plus the larger of
    attention's and the MLP's buffers."""
    stream = step_tokens * (3 * cfg.hidden_size * 4 + (3 * cfg.q_size + 4 * cfg.kv_size) * act_itemsize)
    # Attention copies keys and values out of the paged cache (the prefill's fused flash kernel
    # then keeps only tiles of the scores; decoding rows hold fp32 scores and probabilities).
    per_token = 2 * cfg.kv_size * act_itemsize + 2 * cfg.num_attention_heads * 4
    gathered_kv = gathered_tokens(context, decode_rows) * per_token
    mlp = 3 * step_tokens * cfg.intermediate_size * act_itemsize
    return stream + max(gathered_kv, mlp)


def logits_bytes(cfg: ModelConfig, rows: int, act_itemsize: int, async_scheduling: bool = False) -> int:
    """The head's output for the rows that sample, its fp32 copy and two sampling copies; with
    async scheduling, the next step's output and fp32 copy beside them."""
    step = act_itemsize + 4
    return rows * cfg.vocab_size * (step + 2 * 4 + (step if async_scheduling else 0))


# ---- the plan -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryPlan:
    """What one configuration needs. `total` must fit; on the CPU `peak_rss` is what getrusage shows
    (it also counts the file pages mapped while loading, which the kernel can reclaim)."""

    model: str
    quant: str
    context: int
    batch: int
    device: str
    kv_dtype: str
    lines: tuple[Line, ...]  # weights, KV cache, activations, logits, runtime: what serving holds
    loading: Line | None  # CPU only: the peak while the weights stream in
    reclaimable: int  # of loading: clean file pages mapped from the checkpoint

    @property
    def serving(self) -> int:
        return sum(line.bytes for line in self.lines)

    @property
    def total(self) -> int:
        return max(self.serving, self.loading.bytes - self.reclaimable if self.loading else 0)

    @property
    def peak_rss(self) -> int:
        return max(self.serving, self.loading.bytes if self.loading else 0)

    def line(self, name: str) -> Line:
        return next(line for line in self.lines if line.name == name)

    def to_dict(self) -> dict:
        lines = [*self.lines, *([self.loading] if self.loading else [])]
        return {
            "model": self.model,
            "quant": self.quant,
            "context": self.context,
            "batch": self.batch,
            "device": self.device,
            "kv_dtype": self.kv_dtype,
            "lines": [{"name": x.name, "bytes": x.bytes, "gib": round(x.gib, 3), "formula": x.formula} for x in lines],
            "serving_bytes": self.serving,
            "total_bytes": self.total,
            "total_gib": round(self.total / GiB, 3),
            "peak_rss_bytes": self.peak_rss if self.loading else None,
        }


def compute_dtype(quant: str, device: str) -> str:
    """The dtype activations run in: a float quant's own, else the engine's default for the device."""
    return quant if quant in FLOAT_QUANTS else ("bf16" if device == "cuda" else "fp32")


def plan(
    source: ModelSource | ModelConfig,
    quant: str | None = None,
    context: int | None = None,
    batch: int = 1,
    device: str = "cuda",
    kv_dtype: str = "auto",
    engine: EngineConfig = EngineConfig(),
) -> MemoryPlan:
    """The memory of `batch` sequences of `context` tokens each, served by r1 on `device`."""
    if isinstance(source, ModelConfig):
        source = ModelSource("config", source)
    cfg = source.config
    quant = compute_dtype("", device) if quant is None else quant
    context = cfg.max_position_embeddings if context is None else context
    _check(source, quant, context, batch, device, kv_dtype, engine)
    compute = compute_dtype(quant, device)
    a = DTYPES[compute].itemsize
    kv_dtype = compute if kv_dtype == "auto" else kv_dtype

    if quant == source.file_quant and source.file_weight_bytes:
        weights = Line("weights", source.file_weight_bytes, f"exact tensor bytes in {source.name} ({quant})")
    else:
        weights = weight_line(cfg, quant, compute, device, source.source_types)
    per_token = cfg.kv_bytes_per_token(KV_DTYPES[kv_dtype])
    tokens = batch * -(-context // engine.block_size) * engine.block_size
    kv = Line(
        "kv cache",
        tokens * per_token,
        f"{batch} x {tokens // batch:,} tokens (blocks of {engine.block_size}) x {per_token:,} B "
        f"(2 x {cfg.num_hidden_layers} layers x {cfg.num_key_value_heads} kv heads x {cfg.head_dim} x "
        f"{KV_DTYPES[kv_dtype].itemsize} B {kv_dtype}"
        + (" + a 4 B scale per kv head" if kv_dtype == "int8" else "")
        + ")",
    )
    step = min(engine.resolved_max_num_batched_tokens(device), batch * context)
    rows = min(batch, engine.max_num_seqs)
    gathered = gathered_tokens(context, rows)
    acts = Line(
        "activations",
        activation_bytes(cfg, step, context, a, rows),
        f"prefill chunk C={step:,}: C x (3 x {cfg.hidden_size} x 4 + (3 x {cfg.q_size} + 4 x {cfg.kv_size})"
        f" x {a}) + max(attention's gathered K, V and scores {gathered:,} tokens x (2 x {cfg.kv_size} x {a}"
        f" + 2 x {cfg.num_attention_heads} x 4), MLP 3 x C x {cfg.intermediate_size} x {a})",
    )
    ahead = engine.resolved_async_scheduling(torch.device(device))
    logits = Line(
        "logits",
        logits_bytes(cfg, rows, a, ahead),
        f"{rows} rows x {cfg.vocab_size:,} vocab x ({a} + 3 x 4 B"
        + (f" + {a} + 4 B" if ahead else "")
        + ") (head output, fp32, sampling copies"
        + (", the next step's output, fp32" if ahead else "")
        + ")",
    )
    loading, reclaimable = None, 0
    if device == "cuda":
        slack = int(CUDA_ALLOCATOR_SLACK * (weights.bytes + kv.bytes + acts.bytes + logits.bytes))
        runtime = Line(
            "runtime",
            CUDA_CONTEXT_BYTES + slack,
            f"CUDA context {CUDA_CONTEXT_BYTES / GiB:.2f} GiB + allocator slack {CUDA_ALLOCATOR_SLACK:.0%}"
            " of the tensors (estimates: not measured on a GPU)",
        )
    else:
        runtime = Line(
            "runtime",
            CPU_RUNTIME_BYTES,
            f"Python, torch, tokenizer: {CPU_RUNTIME_BYTES / GiB:.2f} GiB (measured RSS with no weights)",
        )
        loading, reclaimable = _loading_line(source, weights, runtime)
    return MemoryPlan(
        source.name, quant, context, batch, device, kv_dtype, (weights, kv, acts, logits, runtime), loading, reclaimable
    )


def _loading_line(source: ModelSource, weights: Line, runtime: Line) -> tuple[Line, int]:
    """The CPU's peak while loading: the weights so far plus the checkpoint's mapped pages, or, for
    a GGUF file, the dequantization of its largest tensor, whichever is more."""
    cfg = source.config
    mapped = source.file_bytes or cfg.num_parameters() * DTYPES[cfg.dtype].itemsize
    what = source.name if source.file_bytes else f"a {cfg.dtype} checkpoint"
    nbytes = runtime.bytes + weights.bytes + mapped
    formula = f"runtime + weights + {mapped / GiB:.2f} GiB of {what} mapped (clean pages the kernel can reclaim)"
    if source.is_gguf:
        largest = max(math.prod(shape) for _, shape in gguf_tensors(cfg))
        dequant = runtime.bytes + GGUF_DEQUANT_BYTES_PER_WEIGHT * largest
        if dequant > nbytes:
            return Line(
                "loading",
                dequant,
                f"runtime + {GGUF_DEQUANT_BYTES_PER_WEIGHT} B x {largest:,} weights "
                "(dequantizing the largest GGUF tensor)",
            ), 0
    return Line("loading", nbytes, formula), mapped


def _check(
    source: ModelSource, quant: str, context: int, batch: int, device: str, kv_dtype: str, engine: EngineConfig
) -> None:
    known = QUANTS + ((source.file_quant,) if source.file_quant and source.file_quant not in QUANTS else ())
    if quant not in known:
        raise ValueError(f"unknown quantization {quant!r}; expected one of {', '.join(known)}")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, got {device!r}")
    if kv_dtype != "auto" and kv_dtype not in KV_DTYPES:
        raise ValueError(f"unknown KV cache dtype {kv_dtype!r}; expected auto or one of {', '.join(KV_DTYPES)}")
    if not isinstance(context, int) or context <= 0:
        raise ValueError(f"context must be a positive number of tokens, got {context!r}")
    if context > source.config.max_position_embeddings:
        raise ValueError(
            f"context {context:,} exceeds the model's maximum of {source.config.max_position_embeddings:,} tokens"
        )
    if not isinstance(batch, int) or batch <= 0:
        raise ValueError(f"batch must be a positive number of sequences, got {batch!r}")
    if batch > engine.max_num_seqs:
        raise ValueError(f"batch {batch} exceeds the engine's max_num_seqs ({engine.max_num_seqs})")


# ---- questions over many plans ----------------------------------------------------------------

SWEEP_CONTEXTS = (1024, 4096, 8192, 16384, 32768, 65536, 131072)
SWEEP_QUANTS = ("fp32", "bf16", "int8", "int4", "q8_0", "q4_k_m")
# Nominal memory of common GPUs (the driver leaves a little less usable).
GPUS = {
    "T4 16 GB": 16 * GiB,
    "RTX 3060 12 GB": 12 * GiB,
    "RTX 4090 24 GB": 24 * GiB,
    "L4 24 GB": 24 * GiB,
    "A100 40 GB": 40 * GiB,
    "A100 80 GB": 80 * GiB,
    "H100 80 GB": 80 * GiB,
}
_UNITS = {"": GiB, "g": GiB, "gib": GiB, "gb": 10**9, "m": 1 << 20, "mib": 1 << 20, "mb": 10**6}


def parse_size(text: str) -> int:
    """Bytes of '8GiB', '8 GB', '8G', '7500MiB' or a bare number of GiB."""
    match = re.fullmatch(r"\s*(\d*\.?\d+)\s*([a-z]*)\s*", text.lower())
    if not match or match[2] not in _UNITS or float(match[1]) <= 0:
        raise ValueError(f"cannot read memory size {text!r}: use e.g. 8GiB, 16GB, 7500MiB")
    return int(float(match[1]) * _UNITS[match[2]])


def _largest(fits, lo: int, hi: int) -> int:
    """The largest n in [lo, hi] with fits(n), for a fits that holds up to some n and not after."""
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def fit_context(source: ModelSource | ModelConfig, quant: str, budget: int, **options) -> int | None:
    """The largest context whose plan's total fits `budget` bytes; None if not even one token does."""
    cfg = source if isinstance(source, ModelConfig) else source.config

    def fits(context: int) -> bool:  # memory grows with context
        return plan(source, quant, context, **options).total <= budget

    return _largest(fits, 1, cfg.max_position_embeddings) if fits(1) else None


def sweep(
    source: ModelSource | ModelConfig, quants=SWEEP_QUANTS, contexts=SWEEP_CONTEXTS, **options
) -> dict[str, list[MemoryPlan | None]]:
    """A plan per quantization and context; None where the context exceeds the model's."""
    cfg = source if isinstance(source, ModelConfig) else source.config
    return {
        q: [plan(source, q, c, **options) if c <= cfg.max_position_embeddings else None for c in contexts]
        for q in quants
    }


def plot_sweep(table: dict[str, list[MemoryPlan | None]], path: str | Path, title: str) -> None:
    """Total memory against context, one line per quantization, with common GPU sizes marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    for quant, plans in table.items():
        points = [(p.context, p.total / GiB) for p in plans if p]
        ax.plot(*zip(*points), marker="o", label=quant)
    sizes: dict[int, list[str]] = {}
    for name, size in GPUS.items():
        sizes.setdefault(size, []).append(name)
    for size, names in sizes.items():
        ax.axhline(size / GiB, color="grey", linestyle="--", linewidth=0.8)
        ax.text(
            0.01,
            size / GiB,
            " / ".join(names),
            transform=ax.get_yaxis_transform(),
            va="bottom",
            fontsize=7,
            color="dimgrey",
        )
    ax.set_xscale("log", base=2)
    contexts = sorted({p.context for plans in table.values() for p in plans if p})
    ax.set_xticks(contexts, [f"{c // 1024}K" if c >= 1024 else str(c) for c in contexts])
    ax.set_xlabel("context (tokens per sequence)")
    ax.set_ylabel("total memory (GiB)")
    ax.set_title(title)
    ax.legend(title="weights")
    ax.grid(True, which="major", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- the engine's KV pool -----------------------------------------------------------------------


def kv_pool_tokens(
    cfg: ModelConfig,
    engine: EngineConfig,
    device: torch.device,
    dtype: torch.dtype,
    free_bytes: int | None = None,
    draft: ModelConfig | None = None,
) -> int:
    """Tokens of paged KV cache the engine allocates (a multiple of the block size).

    `dtype` is the model's; the cache's is engine.kv_dtype's. A draft model (speculative
    decoding) keeps a cache of as many tokens, so a token costs both. A stated kv_cache_tokens wins.
    Otherwise the CPU gets a fixed KV budget, and CUDA a share of the memory free after loading,
    less one step's activations at the longest context the pool can hold (the pool caps the
    context, so a smaller GPU trades context for room to compute).
    """
    per_token = cfg.kv_bytes_per_token(engine.resolved_kv_dtype(dtype))
    if draft is not None:
        per_token += draft.kv_bytes_per_token(engine.resolved_kv_dtype(dtype))
    if engine.kv_cache_tokens:
        tokens = engine.kv_cache_tokens
    elif device.type != "cuda":  # at most two full contexts: a small model needs no 4 GiB
        tokens = min(CPU_KV_BUDGET_BYTES // per_token, cfg.max_position_embeddings * 2)
    else:  # as vLLM: what is free, for as many sequences as it holds
        if free_bytes is None:
            free_bytes, _ = torch.cuda.mem_get_info(device)
        budget = int(free_bytes * CUDA_MEMORY_FRACTION)
        max_len = engine.max_model_len or cfg.max_position_embeddings

        def room(context: int) -> int:  # KV bytes left once a step at this context has its activations
            step = activation_bytes(
                cfg, engine.resolved_max_num_batched_tokens(device.type), context, dtype.itemsize, engine.max_num_seqs
            )
            return (
                budget
                - step
                - logits_bytes(cfg, engine.max_num_seqs, dtype.itemsize, engine.resolved_async_scheduling(device))
            )

        if room(max_len) >= max_len * per_token:
            tokens = room(max_len) // per_token
        else:  # the longest context whose own KV and activations fit
            tokens = _largest(lambda context: room(context) >= context * per_token, 0, max_len)
    if tokens < engine.block_size and not engine.kv_cache_tokens:
        raise RuntimeError(
            f"no room for a KV cache: {tokens} tokens fit, a block holds {engine.block_size} "
            "(free memory, or lower max_num_batched_tokens / max_num_seqs)"
        )
    return max(1, tokens // engine.block_size) * engine.block_size
