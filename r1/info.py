"""`r1 info`: what a model source is, read from its files without loading the weights.

Owns the facts a user asks before a download or a run: architecture, shapes, exact parameter
count, weight bytes on disk, context, and special tokens. For the default hub id with no network
and no cache, it answers from R1's known config and says so.
"""

from __future__ import annotations

from r1.config import R1_1_5B, ModelConfig
from r1.loaders import gguf, hub, open_model_files

# R1's special tokens (../shared/MODEL.md), for the offline answer.
R1_SPECIAL_TOKENS = {
    "eos": (151643, "<｜end▁of▁sentence｜>"),
    "bos": (151646, "<｜begin▁of▁sentence｜>"),
    "user": (151644, "<｜User｜>"),
    "assistant": (151645, "<｜Assistant｜>"),
    "think": (151648, "<think>"),
    "end_think": (151649, "</think>"),
}


def _shape_facts(cfg: ModelConfig) -> dict:
    return {
        "architecture": cfg.architecture,
        "layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "attention_heads": cfg.num_attention_heads,
        "kv_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "tied_embeddings": cfg.tie_word_embeddings,
        "rope_theta": cfg.rope_theta,
        "rms_norm_eps": cfg.rms_norm_eps,
        "context_length": cfg.max_position_embeddings,
        "parameters": cfg.num_parameters(),
        "dtype": cfg.dtype,
        "kv_bytes_per_token_bf16": cfg.kv_bytes_per_token(),
    }


def _special_tokens(tokenizer) -> dict:
    names = {"eos": tokenizer.eos_token_id, "bos": tokenizer.bos_token_id}
    for name, text in (
        ("user", "<｜User｜>"),
        ("assistant", "<｜Assistant｜>"),
        ("think", "<think>"),
        ("end_think", "</think>"),
        ("im_start", "<|im_start|>"),
        ("im_end", "<|im_end|>"),
    ):
        names[name] = tokenizer.token_to_id(text)
    return {k: [v, tokenizer.backend.id_to_token(v)] for k, v in names.items() if v is not None}


def _int4_plan(files) -> dict:
    """How `--quant int4` holds the linears on a CPU: per format, how many and their MiB
    (`r1 memory --per-tensor` lists each)."""
    from r1.memory import weight_plan

    formats: dict[str, list] = {}
    for _, _, _, fmt, nbytes in weight_plan(files.config, "int4", "cpu", files.source_types()):
        entry = formats.setdefault(fmt, [0, 0])
        entry[0] += 1
        entry[1] += nbytes
    return {fmt: f"{n} linears, {nbytes / 2**20:,.1f} MiB" for fmt, (n, nbytes) in formats.items()}


def model_info(source: str) -> dict:
    from r1.llm import load_tokenizer

    try:
        files = open_model_files(source)
    except ConnectionError:
        if source != hub.DEFAULT_MODEL:
            raise
        info = {"source": f"{source} (built-in config: the hub is unreachable and the model is not cached)"}
        info.update(_shape_facts(R1_1_5B))
        info["weight_bytes"] = R1_1_5B.weight_bytes()
        info["special_tokens"] = {k: list(v) for k, v in R1_SPECIAL_TOKENS.items()}
        return info
    info = {"source": f"{source} ({files.path})", "format": files.format}
    info.update(_shape_facts(files.config))
    if files.format == "gguf":
        types = sorted({gguf.type_name(t.ggml_type) for t in files.gguf_header.tensors})
        info["weight_bytes"] = sum(gguf.tensor_nbytes(t) for t in files.gguf_header.tensors)
        info["quantization"] = ", ".join(types)
    else:
        info["weight_bytes"] = sum(p.stat().st_size for p in files.path.glob("*.safetensors"))
    info["weight_gib"] = round(info["weight_bytes"] / 2**30, 3)
    info["int4_plan"] = _int4_plan(files)
    info["sampling_defaults"] = files.sampling_defaults
    info["special_tokens"] = _special_tokens(load_tokenizer(None, files))
    return info
