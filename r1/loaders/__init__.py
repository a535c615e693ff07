"""From a model name to a model in memory: resolve the source, then stream weights into it.

A source is an HF folder, an HF hub id, a `.gguf` file, or `demo` / `demo-small`. Each resolves
to `ModelFiles`: the config, sampling defaults, where the tokenizer comes from, and a stream of
(hf_name, tensor). `load_model` builds the model empty on the meta device and moves each tensor
in as it arrives, so two full copies of the weights never exist at once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from r1.config import ModelConfig
from r1.loaders import gguf, hub, safetensors
from r1.model.qwen2 import Qwen2ForCausalLM, fused_linears
from r1.quant import QuantizedLinear, as_float, linear_plan, quantize_linears

# DeepSeek's recommended sampling, used when the files carry no generation_config.json.
R1_SAMPLING_DEFAULTS = {"temperature": 0.6, "top_p": 0.95}


@dataclass
class ModelFiles:
    source: str  # what the user asked for
    path: Path  # the folder or .gguf file it resolved to
    format: str  # "hf" or "gguf"
    config: ModelConfig
    sampling_defaults: dict
    num_tensors: int
    tensors: Callable[[], Iterator[tuple[str, torch.Tensor | gguf.QuantizedBlocks]]] = field(repr=False)
    gguf_header: gguf.GGUFHeader | None = field(default=None, repr=False)

    def source_types(self) -> dict[str, str] | None:
        """hf name -> the GGUF type each tensor is stored in; None for float checkpoints."""
        return gguf.source_types(self.gguf_header) if self.gguf_header is not None else None


def resolve_path(source: str) -> Path:
    """The local folder or .gguf file a model name stands for (downloading or assembling it)."""
    if source in hub.DEMO_ASSETS:
        return hub.demo_path(source)
    path = Path(source).expanduser()
    if path.exists():
        return path
    if hub.looks_like_hub_id(source):
        return hub.hub_snapshot(source)
    raise FileNotFoundError(
        f"model not found: {source!r} is neither a local folder or .gguf file, "
        f"a Hugging Face hub id (owner/name), nor one of {', '.join(hub.DEMO_ASSETS)}"
    )


def _sampling_defaults(folder: Path) -> dict:
    path = folder / "generation_config.json"
    if not path.is_file():
        return dict(R1_SAMPLING_DEFAULTS)
    gen = json.loads(path.read_text())
    defaults = {k: gen[k] for k in ("temperature", "top_p", "top_k") if k in gen}
    if gen.get("do_sample") is False:
        defaults["temperature"] = 0.0
    return defaults


def open_model_files(source: str) -> ModelFiles:
    path = resolve_path(source)
    if path.is_file():
        header = gguf.read_header(path)
        shapes = {t.name: t.shape for t in header.tensors}
        config = ModelConfig.from_gguf_metadata(header.metadata, shapes)
        return ModelFiles(
            source,
            path,
            "gguf",
            config,
            dict(R1_SAMPLING_DEFAULTS),
            len(header.tensors),
            lambda: gguf.iter_tensors(header),
            header,
        )
    config_path = path / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{path}: not a model folder (no config.json)")
    config = ModelConfig.from_json_file(config_path)
    safetensors.checkpoint_files(path)  # fail now, not after the model is built
    return ModelFiles(
        source,
        path,
        "hf",
        config,
        _sampling_defaults(path),
        safetensors.num_tensors(path),
        lambda: safetensors.iter_tensors(path),
    )


def _set_parameter(model: nn.Module, name: str, parts: list, dtype: torch.dtype, device) -> None:
    """Fill one parameter from the checkpoint tensors it stacks (one unless the model fuses it)."""
    module_path, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_path)
    if isinstance(module, QuantizedLinear) and leaf == "weight":
        module.set_parts(parts, torch.device(device))  # repacked, or quantized from the floats
    else:
        tensor = torch.cat([as_float(p) for p in parts]) if len(parts) > 1 else as_float(parts[0])
        setattr(module, leaf, nn.Parameter(tensor.to(device=device, dtype=dtype), requires_grad=False))


def _checkpoint_layout(model: Qwen2ForCausalLM) -> dict[str, tuple[tuple[int, ...], str, int, int]]:
    """checkpoint tensor name -> (its shape, the parameter it fills, its part index, the number of
    parts): the model's own names, with each fused linear split back into the linears it stacks."""
    fused = fused_linears(model.config)
    layout = {}
    for name, p in model.named_parameters():
        module_path, _, leaf = name.rpartition(".")
        parent, _, module = module_path.rpartition(".")
        parts = fused.get(module, ((module, p.shape[0]),))
        for i, (part, rows) in enumerate(parts):
            checkpoint_name = ".".join(filter(None, (parent, part, leaf)))
            layout[checkpoint_name] = ((rows, *p.shape[1:]), name, i, len(parts))
    return layout


def load_model(
    files: ModelFiles, dtype: torch.dtype, device: torch.device | str, progress: bool = True, quant: str = "none"
) -> Qwen2ForCausalLM:
    """Build the model on meta and stream the checkpoint's tensors into it (quantizing as they come)."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with torch.device("meta"):
        model = Qwen2ForCausalLM(files.config)
    layout = _checkpoint_layout(model)  # before quantization: float shapes
    quantize_linears(model, linear_plan(files.config, quant, files.source_types()), torch.device(device))
    loaded, parts_seen = set(), {}
    bar = Progress(
        TextColumn("loading {task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
        disable=not progress,
    )
    with bar:
        task = bar.add_task(files.path.name, total=files.num_tensors)
        for name, tensor in files.tensors():
            bar.advance(task)
            if name.endswith("rotary_emb.inv_freq"):  # old checkpoints store it; we compute it
                continue
            if name not in layout:
                raise ValueError(f"{files.path}: unexpected tensor {name!r} for a Qwen2 model")
            shape, target, part, num_parts = layout[name]
            if tuple(tensor.shape) != shape:
                raise ValueError(
                    f"{files.path}: tensor {name} has shape {tuple(tensor.shape)}, the config implies {shape}"
                )
            loaded.add(name)
            parts = parts_seen.setdefault(target, {})
            parts[part] = tensor
            if len(parts) < num_parts:  # a part of a fused linear: set it once all its parts are in
                continue
            _set_parameter(model, target, [parts.pop(i) for i in range(num_parts)], dtype, device)
    if files.config.tie_word_embeddings and "lm_head.weight" not in loaded:
        if isinstance(model.lm_head, QuantizedLinear):
            model.lm_head.set_weight(model.model.embed_tokens.weight)
        else:
            model.lm_head.weight = model.model.embed_tokens.weight
        loaded.add("lm_head.weight")
    missing = sorted(set(layout) - loaded)
    if missing:
        raise ValueError(f"{files.path}: the checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
    return model.eval()
