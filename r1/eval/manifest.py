"""What produced a run, for manifest.json: model and data digests, engine, settings, machine, times.

Owns file digests (sha256, remembered in the r1 cache by path, size and mtime so a 1 GB model is
hashed once; demo assets and Hugging Face cache blobs already carry theirs), the model's source
and quantization, the engine's version and git commit, and a description of the machine. It does
not decide which settings matter for resuming (runner.py) or write files.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import subprocess
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

from r1.loaders import hub

_HEX64 = re.compile(r"[0-9a-f]{64}")


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def file_sha256(path: Path) -> str:
    """sha256 of a file, from the digest cache when the file has not changed since it was hashed."""
    path = Path(path).resolve()
    if _HEX64.fullmatch(path.name) and path.parent.name == "blobs":  # a Hugging Face cache blob (LFS)
        return path.name
    stat = path.stat()
    cache_file = hub.cache_dir() / "sha256.json"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, json.JSONDecodeError):
        cache = {}
    entry = cache.get(str(path))
    if entry and entry["size"] == stat.st_size and entry["mtime_ns"] == stat.st_mtime_ns:
        return entry["sha256"]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    cache[str(path)] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest.hexdigest()}
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    partial = cache_file.with_suffix(f".{os.getpid()}.partial")
    partial.write_text(json.dumps(cache, indent=1))
    partial.replace(cache_file)
    return digest.hexdigest()


def model_record(llm, tokenizer: str | None = None) -> dict:
    """The model's source, files with their sha256, format, and the types its weights are stored in."""
    files = llm.files
    record = {
        "source": files.source,
        "path": str(files.path),
        "format": files.format,
        "tokenizer": tokenizer or "the model's own",
    }
    if files.format == "gguf":
        demo = hub.DEMO_ASSETS.get(files.source)
        record["sha256"] = demo.sha256 if demo else file_sha256(files.path)
        record["size"] = files.path.stat().st_size
        record["weight_types"] = _gguf_types(files.gguf_header)
    else:
        record["files"] = {
            p.name: file_sha256(p)
            for p in sorted(files.path.iterdir())
            if p.suffix in (".safetensors", ".json") and p.is_file()
        }
        record["weight_types"] = {files.config.dtype: files.num_tensors}
    return record


def _gguf_types(header) -> dict[str, int]:
    import gguf

    counts = Counter(gguf.GGMLQuantizationType(t.ggml_type).name for t in header.tensors)
    return dict(sorted(counts.items()))


def engine_record(llm) -> dict:
    import torch

    import r1

    return {
        "name": "r1",
        "version": r1.__version__,
        "git_commit": _git_commit(Path(r1.__file__).parent),
        "torch": torch.__version__,
        "device": str(llm.device),
        "dtype": str(llm.dtype).removeprefix("torch."),
        "max_model_len": llm.engine.max_model_len,
        "kv_pool_tokens": llm.kv_pool_tokens,
        "max_num_seqs": llm.engine_config.max_num_seqs,
        "quant": llm.engine_config.quant,
        "config": llm.engine.config_record(),
    }


def _git_commit(folder: Path) -> str | None:
    """HEAD of the checkout r1 runs from, with "-dirty" when it has uncommitted changes."""
    try:
        head = _git(folder, "rev-parse", "HEAD")
        return head + ("-dirty" if _git(folder, "status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return None  # installed from a wheel, or git missing


def _git(folder: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=10, check=True
    ).stdout.strip()


def machine_record() -> dict:
    import torch

    record = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        record["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return record


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
