"""HF safetensors checkpoints: one file or shards listed by model.safetensors.index.json.

Yields the same (hf_name, tensor) stream as the GGUF loader, each tensor read from a memory map
only when it is reached. It does not own config or tokenizer files (loaders/__init__.py does).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open

INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A safetensors checkpoint that is missing, corrupt or truncated."""


def checkpoint_files(folder: Path) -> list[Path]:
    """The shard files of a folder's checkpoint, in a stable order."""
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{folder}: the index lists shards that are missing: {', '.join(missing)}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no *.safetensors weights found")
    return files


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({e})") from None


def num_tensors(folder: Path) -> int:
    total = 0
    for path in checkpoint_files(folder):
        with _open(path) as f:
            total += len(f.keys())
    return total


def iter_tensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    for path in checkpoint_files(folder):
        with _open(path) as f:
            for name in f.keys():
                try:
                    yield name, f.get_tensor(name)
                except (SafetensorError, OSError, RuntimeError) as e:
                    raise CheckpointError(
                        f"{path}: cannot read tensor {name}: corrupt or truncated file ({e})"
                    ) from None
