"""Model configuration: the Qwen2 shapes, read from an HF config.json or from GGUF metadata.

Owns the numbers that define the architecture and the arithmetic that follows from them alone
(parameter count, weight bytes). It does not own engine settings (scheduler limits live with the
engine) or memory planning (memory.py).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from r1 import options
from r1.options import KV_CACHE_DTYPES, QUANT_MODES

SUPPORTED_ARCHITECTURES = ("Qwen2ForCausalLM",)

DTYPES = dict(zip(options.DTYPES, (torch.float32, torch.bfloat16, torch.float16)))
_HF_DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


class UnsupportedModelError(ValueError):
    """The files describe a model this engine does not implement."""


@dataclass(frozen=True)
class ModelConfig:
    """Qwen2 decoder shapes. The defaults are DeepSeek-R1-Distill-Qwen-1.5B's config.json."""

    architecture: str = "Qwen2ForCausalLM"
    vocab_size: int = 151936
    hidden_size: int = 1536
    intermediate_size: int = 8960
    num_hidden_layers: int = 28
    num_attention_heads: int = 12
    num_key_value_heads: int = 2
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = False
    dtype: str = "bf16"  # the dtype the weights were published in
    bos_token_id: int | None = 151646
    eos_token_id: int | None = 151643

    def __post_init__(self):
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"unsupported architecture {self.architecture!r}: r1 runs {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"config field {name} must be positive, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; expected one of {sorted(DTYPES)}")

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """Build from an HF config.json dict; unknown keys are ignored."""
        archs = d.get("architectures") or [d.get("architecture", "Qwen2ForCausalLM")]
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known and v is not None}
        kwargs["architecture"] = archs[0]
        if "head_dim" not in kwargs:
            kwargs["head_dim"] = d["hidden_size"] // d["num_attention_heads"]
        kwargs.setdefault("num_key_value_heads", d.get("num_attention_heads", cls.num_attention_heads))
        hf_dtype = d.get("torch_dtype") or d.get("dtype")
        kwargs["dtype"] = _HF_DTYPE_NAMES.get(str(hf_dtype), "bf16")
        if isinstance(kwargs.get("eos_token_id"), list):
            kwargs["eos_token_id"] = kwargs["eos_token_id"][0]
        # transformers 5 nests rope settings in rope_parameters; older files use rope_theta/rope_scaling.
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise UnsupportedModelError(f"RoPE scaling {rope.get('rope_type', rope.get('type'))!r} is not supported")
        if "rope_theta" in rope:
            kwargs["rope_theta"] = rope["rope_theta"]
        if d.get("use_sliding_window"):
            raise UnsupportedModelError("sliding-window attention (use_sliding_window=true) is not supported")
        return cls(**kwargs)

    @classmethod
    def from_json_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(d)

    @classmethod
    def from_gguf_metadata(cls, md: dict, tensor_shapes: dict[str, tuple] | None = None) -> "ModelConfig":
        """Build from GGUF metadata (llama.cpp key names); tensor shapes fill what keys omit."""
        arch = md.get("general.architecture")
        if arch != "qwen2":
            raise UnsupportedModelError(
                f"unsupported GGUF architecture {arch!r}: r1 runs qwen2 (Qwen2ForCausalLM) models"
            )
        tensor_shapes = tensor_shapes or {}
        p = "qwen2."
        hidden, heads = md[p + "embedding_length"], md[p + "attention.head_count"]
        vocab = len(md["tokenizer.ggml.tokens"]) if "tokenizer.ggml.tokens" in md else None
        if "token_embd.weight" in tensor_shapes:
            vocab = tensor_shapes["token_embd.weight"][0]
        return cls(
            vocab_size=vocab or cls.vocab_size,
            hidden_size=hidden,
            intermediate_size=md[p + "feed_forward_length"],
            num_hidden_layers=md[p + "block_count"],
            num_attention_heads=heads,
            num_key_value_heads=md.get(p + "attention.head_count_kv", heads),
            head_dim=md.get(p + "attention.key_length", hidden // heads),
            # stored as float32 (9.99999997e-07); round back to the decimal the config.json had
            rms_norm_eps=float(f"{md.get(p + 'attention.layer_norm_rms_epsilon', 1e-6):.6g}"),
            rope_theta=float(md.get(p + "rope.freq_base", 10000.0)),
            max_position_embeddings=md.get(p + "context_length", 32768),
            # A GGUF without an output tensor reuses the embedding as the head.
            tie_word_embeddings=bool(tensor_shapes) and "output.weight" not in tensor_shapes,
            dtype="bf16",
            bos_token_id=md.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=md.get("tokenizer.ggml.eos_token_id"),
        )

    # ---- arithmetic ---------------------------------------------------------------------------

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def layer_parameters(self) -> int:
        h, i = self.hidden_size, self.intermediate_size
        attention = h * self.q_size + self.q_size + 2 * (h * self.kv_size + self.kv_size) + self.q_size * h
        return attention + 3 * h * i + 2 * h  # + MLP + the two norms

    def num_parameters(self) -> int:
        embedding = self.vocab_size * self.hidden_size
        head = 0 if self.tie_word_embeddings else embedding
        return embedding + head + self.num_hidden_layers * self.layer_parameters() + self.hidden_size

    def weight_bytes(self, dtype: str | None = None) -> int:
        return self.num_parameters() * DTYPES[dtype or self.dtype].itemsize

    def kv_bytes_per_token(self, kv_dtype: torch.dtype = torch.bfloat16) -> int:
        per_token = 2 * self.num_hidden_layers * self.kv_size * kv_dtype.itemsize
        if kv_dtype == torch.int8:  # r1's int8 cache adds a float32 scale per token and kv head
            per_token += 2 * self.num_hidden_layers * self.num_key_value_heads * 4
        return per_token


R1_1_5B = ModelConfig()


@dataclass(frozen=True)
class EngineConfig:
    """How the engine runs a model: device, precision, KV pool and batching limits."""

    dtype: str = "auto"  # fp32 | bf16 | fp16 | auto (bf16 on CUDA; fp32 on CPU, where bf16 matmuls are slower)
    device: str = "auto"  # cpu | cuda | auto
    block_size: int = 16  # tokens per KV-cache block
    kv_cache_tokens: int | None = None  # size of the KV pool; None: from the memory budget
    max_model_len: int | None = None  # None: the model's context, capped by the KV pool
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None  # the per-step token budget; None: resolved_max_num_batched_tokens
    enable_prefix_caching: bool = True
    threads: int | None = None  # CPU threads; None: torch's default
    quant: str = "none"  # weight-only quantization of the linears: none | int8 | int4 (r1/quant.py)
    kv_dtype: str = "auto"  # the KV cache: auto (the model's dtype) | bf16 | int8 (a scale per token and head)
    enforce_eager: bool = False  # on a GPU: run decode steps without CUDA graphs (to compare, or to debug)
    # Launch each step's forward before the last step's tokens are read (r1/engine/llm_engine.py);
    # None: on a GPU, where the host's work then overlaps the device's. A CPU runs the forward
    # itself, so there it only delays each output by a step.
    async_scheduling: bool | None = None
    # Which kernels run (r1/kernels/__init__.py): auto (the widest CPU build that runs here), off
    # (PyTorch's paths) or one build's name; and r1's Triton layer ops on a GPU (opt-in until
    # measured). $R1_KERNELS and $R1_GPU_LAYER_OPS override them.
    cpu_kernels: str = "auto"
    gpu_layer_ops: bool = False
    # Speculative decoding (r1/engine/speculative.py): None, "ngram" (prompt lookup) or
    # "draft:MODEL" (a smaller model of the same vocabulary guesses), up to
    # num_speculative_tokens guesses a step, in steps with fewer than
    # speculative_disable_by_batch_size running sequences (vLLM's name).
    speculative: str | None = None
    num_speculative_tokens: int = 4
    speculative_disable_by_batch_size: int = 4
    # The draft's weight quantization; None: int4-pure when quant is an int4 (its guesses need
    # only be cheap: a coarser draft never changes the output), quant otherwise.
    speculative_draft_quant: str | None = None

    def __post_init__(self):
        if self.dtype not in (*DTYPES, "auto"):
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, auto; got {self.dtype!r}")
        if self.quant not in QUANT_MODES:
            raise ValueError(f"quant must be one of {', '.join(QUANT_MODES)}; got {self.quant!r}")
        if self.speculative_draft_quant not in (None, *QUANT_MODES):
            raise ValueError(
                f"speculative_draft_quant must be one of {', '.join(QUANT_MODES)}; got {self.speculative_draft_quant!r}"
            )
        if self.kv_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_dtype must be one of {', '.join(KV_CACHE_DTYPES)}; got {self.kv_dtype!r}")
        if self.cpu_kernels not in options.CPU_KERNELS:
            raise ValueError(f"cpu_kernels must be one of {', '.join(options.CPU_KERNELS)}; got {self.cpu_kernels!r}")
        if self.device not in (*options.DEVICES, "auto") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be {', '.join(options.DEVICES)} or auto; got {self.device!r}")
        for name in (
            "block_size",
            "kv_cache_tokens",
            "max_model_len",
            "max_num_seqs",
            "max_num_batched_tokens",
            "threads",
            "num_speculative_tokens",
            "speculative_disable_by_batch_size",
        ):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ValueError(f"{name} must be a positive integer; got {value!r}")

        if (
            self.speculative is not None
            and self.speculative != "ngram"
            and not (self.speculative.startswith("draft:") and self.speculative[len("draft:") :])
        ):
            raise ValueError(f"speculative must be ngram or draft:MODEL; got {self.speculative!r}")

    @property
    def resolved_draft_quant(self) -> str:
        if self.speculative_draft_quant is not None:
            return self.speculative_draft_quant
        return "int4-pure" if self.quant.startswith("int4") else self.quant

    @property
    def draft_model(self) -> str | None:
        """The draft model's source, when speculative is draft:MODEL."""
        return self.speculative[len("draft:") :] if self.speculative and self.speculative.startswith("draft:") else None

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(self.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("device cuda was asked for, but torch sees no CUDA GPU (use --device cpu)")
        return device

    def resolved_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        return DTYPES[self.dtype]

    def resolved_async_scheduling(self, device: torch.device) -> bool:
        return device.type == "cuda" if self.async_scheduling is None else self.async_scheduling

    def resolved_kv_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        return {"int8": torch.int8, "bf16": torch.bfloat16}.get(self.kv_dtype, model_dtype)

    def resolved_max_num_batched_tokens(self, device_type: str) -> int:
        """The per-step token budget, which is also the longest prefill chunk: 2048 on a GPU, 256
        on a CPU, where a chunk's activations then stay in cache (on 2 cores, 256 against 2048:
        a 2048-token prompt prefills ~15% faster, 16 sequences of 128 + 128 tokens ~15%). Never
        below max_num_seqs, so that every running sequence can decode in each step."""
        if self.max_num_batched_tokens is not None:
            return self.max_num_batched_tokens
        return max(2048 if device_type == "cuda" else 256, self.max_num_seqs)
