"""GGUF files: the header (metadata and tensor infos) and the tensor stream.

Owns reading a `.gguf` file: a metadata-only parse that also works on a file whose tensor data
is cut off (the R1 tokenizer header asset), the map from llama.cpp tensor names to HF names, and
dequantization into torch tensors. It does not own the model config (config.py reads the
metadata dict this returns) or the tokenizer (tokenizer.py builds one from the same dict).

The header is untrusted input: every count, length and size is checked against the bytes that
are actually there before it is used, and every problem is a `GGUFError` naming the file (and,
for the header's fields, the byte offset), so a corrupt or hostile file fails in one clear way
instead of exhausting memory.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import gguf as _gguf  # owns the block layouts and dequantizers
import numpy as np
import torch

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_ALIGNMENT = 1 << 20  # far above any writer's (llama.cpp writes 32); bounds the padding we trust
GGML_MAX_DIMS = 4
INT64_MAX = 2**63 - 1  # ggml counts elements in int64

# GGUF metadata value types (gguf.GGUFValueType) and their struct formats.
_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
# The fewest bytes a key-value pair (key length, type, a 1-byte value) and a tensor info (name
# length, n_dims, type, offset) can take: a count that cannot fit in the bytes left is corrupt.
_MIN_KV_BYTES, _MIN_TENSOR_INFO_BYTES = 8 + 4 + 1, 8 + 4 + 4 + 8


class GGUFError(ValueError):
    """A GGUF file that cannot be read: not GGUF, corrupt, truncated or of an unsupported type.

    The message names the file and, for a header field, the byte offset where the problem was found.
    """


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order (outermost first): GGUF stores dims innermost first
    ggml_type: int
    offset: int  # from the start of the data section


@dataclass(frozen=True)
class GGUFHeader:
    path: Path
    version: int
    metadata: dict
    tensors: list[TensorInfo]
    data_offset: int  # absolute byte offset of the tensor data section
    file_size: int


class _Cursor:
    """Reads little-endian values from a memory map, refusing any read past the end of the file."""

    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def error(self, message: str, at: int | None = None) -> GGUFError:
        return GGUFError(f"{self.path}: {message} (at offset {self.pos if at is None else at})")

    def expect(self, n_bytes: int, what: str, at: int | None = None) -> None:
        """Refuse a length field that points past the end: a cut-off file or a corrupt one."""
        remaining = len(self.buf) - self.pos
        if n_bytes > remaining:
            raise self.error(f"truncated or corrupt GGUF header: {what} needs {n_bytes} bytes, {remaining} remain", at)

    def take(self, n: int) -> memoryview:
        self.expect(n, "a field")
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def scalar(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        at, n = self.pos, self.scalar("<Q")
        self.expect(n, f"a string of {n} bytes", at)
        return bytes(self.take(n)).decode("utf-8", errors="replace")

    def value(self, vtype: int):
        if vtype in _SCALAR_FORMATS:
            return self.scalar(_SCALAR_FORMATS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            at, elem_type, n = self.pos, self.scalar("<I"), self.scalar("<Q")
            if elem_type in _SCALAR_FORMATS:  # read numeric arrays in one go
                dtype = np.dtype(_SCALAR_FORMATS[elem_type])
                self.expect(n * dtype.itemsize, f"an array of {n} items", at)
                return np.frombuffer(self.take(n * dtype.itemsize), dtype=dtype).tolist()
            if elem_type == _STRING:
                self.expect(n * 8, f"an array of {n} strings", at)
                return [self.string() for _ in range(n)]
            # arrays of arrays are refused as llama.cpp does: nesting would recurse without bound
            raise self.error(f"corrupt GGUF header: an array of value type {elem_type}", at)
        raise self.error(f"corrupt GGUF header: unknown value type {vtype}", self.pos - 4)


def _is_alignment(value) -> bool:
    return type(value) is int and 0 < value <= MAX_ALIGNMENT and value & (value - 1) == 0


def _tensor_info(cur: _Cursor, alignment: int) -> TensorInfo:
    """One tensor info, checked as llama.cpp checks it: dims, element count, type, block, offset."""
    name = cur.string()
    n_dims = cur.scalar("<I")
    if n_dims > GGML_MAX_DIMS:
        raise cur.error(
            f"corrupt GGUF header: tensor {name!r} has {n_dims} dimensions (GGUF allows at most {GGML_MAX_DIMS})",
            cur.pos - 4,
        )
    dims_at = cur.pos
    dims = [cur.scalar("<Q") for _ in range(n_dims)]  # innermost first
    if any(d > INT64_MAX for d in dims) or math.prod(dims) > INT64_MAX:
        raise cur.error(
            f"corrupt GGUF header: tensor {name!r} of dims {dims} has more elements than int64 holds", dims_at
        )
    if 0 in dims:  # no weight is empty, and the dequantizers cannot shape one
        raise cur.error(f"corrupt GGUF header: tensor {name!r} of dims {dims} has a dimension of 0", dims_at)
    type_at, ggml_type, offset = cur.pos, cur.scalar("<I"), cur.scalar("<Q")
    if ggml_type not in _gguf.GGML_QUANT_SIZES:
        raise cur.error(f"corrupt GGUF header: tensor {name!r} has unknown type {ggml_type}", type_at)
    block = _gguf.GGML_QUANT_SIZES[ggml_type][0]
    if (dims[0] if dims else 1) % block:
        raise cur.error(
            f"corrupt GGUF header: tensor {name!r} of type {type_name(ggml_type)} has rows of "
            f"{dims[0] if dims else 1} elements, not a multiple of its block of {block}",
            dims_at,
        )
    if offset % alignment:
        raise cur.error(
            f"corrupt GGUF header: tensor {name!r} has data offset {offset}, "
            f"not a multiple of the alignment {alignment}",
            type_at + 4,
        )
    return TensorInfo(name, tuple(reversed(dims)), ggml_type, offset)


def read_header(path: str | os.PathLike) -> GGUFHeader:
    """Parse metadata and tensor infos without touching tensor data (works on truncated files)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    file_size = path.stat().st_size
    if file_size < 24:  # magic, version, the two counts; numpy cannot map an empty file
        raise GGUFError(
            f"{path}: truncated GGUF header: {file_size} bytes, the fixed header needs 24 (at offset {file_size})"
        )
    cur = _Cursor(memoryview(np.memmap(path, dtype=np.uint8, mode="r")), path)
    if bytes(cur.take(4)) != GGUF_MAGIC:
        raise cur.error("not a GGUF file (bad magic bytes)", 0)
    version = cur.scalar("<I")
    if version not in (2, 3):
        raise cur.error(f"unsupported GGUF version {version}", 4)
    n_tensors, n_kv = cur.scalar("<Q"), cur.scalar("<Q")
    cur.expect(
        n_kv * _MIN_KV_BYTES + n_tensors * _MIN_TENSOR_INFO_BYTES,
        f"{n_tensors} tensor infos and {n_kv} key-value pairs",
        8,
    )
    metadata = {}
    for _ in range(n_kv):
        key_at, key = cur.pos, cur.string()
        if key in metadata:
            raise cur.error(f"corrupt GGUF header: duplicate key {key!r}", key_at)
        vtype = cur.scalar("<I")
        value_at, metadata[key] = cur.pos, cur.value(vtype)
        if key == "general.alignment" and not _is_alignment(metadata[key]):
            raise cur.error(
                f"corrupt GGUF header: general.alignment is {metadata[key]!r}, "
                f"not a power of two up to {MAX_ALIGNMENT}",
                value_at,
            )
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    tensors, names = [], set()
    for _ in range(n_tensors):
        info_at, t = cur.pos, _tensor_info(cur, alignment)
        if t.name in names:
            raise cur.error(f"corrupt GGUF header: duplicate tensor {t.name!r}", info_at)
        names.add(t.name)
        tensors.append(t)
    data_offset = -(-cur.pos // alignment) * alignment
    return GGUFHeader(path, version, metadata, tensors, data_offset, file_size)


# ---- tensors ----------------------------------------------------------------------------------

# The types we dequantize: every type in the project's assets and the common llama.cpp ones.
_Q = _gguf.GGMLQuantizationType
DEQUANTIZE_ROWS = 1024  # rows per call: bounds the temporaries (a few MB), amortizes numpy's overhead
SUPPORTED_TYPES = {
    _Q.F32,
    _Q.F16,
    _Q.BF16,
    _Q.Q8_0,
    _Q.Q4_0,
    _Q.Q4_1,
    _Q.Q5_0,
    _Q.Q5_1,
    _Q.Q2_K,
    _Q.Q3_K,
    _Q.Q4_K,
    _Q.Q5_K,
    _Q.Q6_K,
}

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def hf_name(gguf_name: str) -> str:
    """The HF parameter name of a llama.cpp tensor name (blk.3.attn_q.weight -> model.layers.3...)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    raise GGUFError(f"unexpected tensor {gguf_name!r} for a qwen2 model")


def type_name(ggml_type: int) -> str:
    try:
        return _Q(ggml_type).name
    except ValueError:
        return f"unknown type {ggml_type}"


def tensor_nbytes(info: TensorInfo) -> int:
    block, block_bytes = _gguf.GGML_QUANT_SIZES[_Q(info.ggml_type)]
    return math.prod(info.shape) // block * block_bytes  # Python ints: no overflow on a hostile shape


def check_tensors(header: GGUFHeader) -> None:
    """Fail before loading anything if a tensor is unknown to qwen2, of an unsupported type, or
    lies past the end of the file."""
    for t in header.tensors:
        try:
            hf_name(t.name)
        except GGUFError as e:
            raise GGUFError(f"{header.path}: {e}") from None
        if t.ggml_type not in SUPPORTED_TYPES:
            raise GGUFError(
                f"{header.path}: tensor {t.name} has quantization type {type_name(t.ggml_type)}, "
                f"which r1 cannot load (supported: {', '.join(sorted(q.name for q in SUPPORTED_TYPES))})"
            )
        start = header.data_offset + t.offset
        end = start + tensor_nbytes(t)
        if end > header.file_size:
            raise GGUFError(
                f"{header.path}: truncated GGUF file: tensor {t.name}'s data runs from offset "
                f"{start} to {end}, past the end of the file at {header.file_size} bytes "
                f"(an interrupted download?)"
            )


def dequantize(raw: np.ndarray, info: TensorInfo) -> torch.Tensor:
    """One tensor's bytes as a float tensor of its shape (fp32, or the stored float type)."""
    qtype = _Q(info.ggml_type)
    if qtype == _Q.F32:  # copied: a tensor must not alias the read-only map
        arr = raw.view(np.float32).copy()
    elif qtype == _Q.F16:
        arr = raw.view(np.float16).copy()
    elif qtype == _Q.BF16:  # numpy has no bfloat16: reinterpret the bits in torch
        return torch.from_numpy(raw.view(np.int16).copy()).view(torch.bfloat16).reshape(info.shape)
    else:
        # gguf's own dequantize goes 16 rows at a time through np.memmap's Python hooks; its
        # per-type dequantize_rows on a plain view of the bytes, 1024 rows a call, is 2-3x faster.
        rows = raw.view(np.ndarray).reshape(math.prod(info.shape[:-1]), -1)
        if qtype in _TORCH_DEQUANTIZERS:
            block_bytes = _gguf.GGML_QUANT_SIZES[qtype][1]
            out = torch.empty(rows.shape[0], info.shape[-1])
            for start in range(0, rows.shape[0], DEQUANTIZE_ROWS):
                blocks = torch.from_numpy(np.array(rows[start : start + DEQUANTIZE_ROWS])).view(-1, block_bytes)
                out[start : start + DEQUANTIZE_ROWS] = _TORCH_DEQUANTIZERS[qtype](blocks).view(-1, info.shape[-1])
            return out.reshape(info.shape)
        dequantize_rows = getattr(_gguf.quants, qtype.name).dequantize_rows
        arr = np.empty((rows.shape[0], info.shape[-1]), dtype=np.float32)
        for start in range(0, rows.shape[0], DEQUANTIZE_ROWS):
            arr[start : start + DEQUANTIZE_ROWS] = dequantize_rows(rows[start : start + DEQUANTIZE_ROWS])
    return torch.from_numpy(arr).reshape(info.shape)


# Q4_K and Q6_K, the types of a Q4_K_M file, decoded in torch as gguf's numpy decoders do (the
# same float operations in the same order, so the same bits) but on every core: all of the 1.5B
# stand-in's tensors in 7-8.5 s on two cores, against 10-11 s with gguf's. Blocks of 256 weights,
# (n, bytes) uint8 in, (n, 256) float32 out.


def _float16(blocks: torch.Tensor, start: int) -> torch.Tensor:  # (n, 1) from 2 bytes at `start`
    return blocks[:, start : start + 2].contiguous().view(torch.float16).float()


def _shifted(bits: torch.Tensor, shifts: tuple[int, ...], mask: int) -> torch.Tensor:
    """(n, parts, bytes) -> (n, parts, len(shifts), bytes): each byte's fields at those shifts."""
    by = torch.tensor(shifts, dtype=torch.uint8).view(1, 1, -1, 1)
    return (bits.unsqueeze(2) >> by) & mask


def q4_k_fields(blocks: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Q4_K blocks' (d, dmin, scales, mins, levels): (n, 1) float32 d and dmin (float16 in the
    file), (n, 8) uint8 6-bit scales and mins of each sub-block of 32, and (n, 8, 32) uint8
    levels 0..15, such that weight = d * scale * level - dmin * min."""
    # d, dmin (f16), 12 bytes of eight 6-bit scales and mins, 128 bytes of 4-bit levels
    n = blocks.shape[0]
    packed = blocks[:, 4:16].reshape(n, 3, 4)
    d, m, low_bits = packed[:, 0], packed[:, 1], packed[:, 2]
    scales = torch.cat([d & 0x3F, (low_bits & 0x0F) | ((d >> 2) & 0x30)], dim=1)
    mins = torch.cat([m & 0x3F, (low_bits >> 4) | ((m >> 2) & 0x30)], dim=1)
    levels = _shifted(blocks[:, 16:].reshape(n, 4, 32), (0, 4), 0x0F).reshape(n, 8, 32)
    return _float16(blocks, 0), _float16(blocks, 2), scales, mins, levels


def _dequantize_q4_k(blocks: torch.Tensor) -> torch.Tensor:
    d, dmin, scales, mins, levels = q4_k_fields(blocks)
    return ((d * scales).unsqueeze(2) * levels.float() - (dmin * mins).unsqueeze(2)).view(-1, 256)


def q6_k_fields(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q6_K blocks' (d, scales, levels): (n, 1) float32 d, (n, 16) int8 scales of each 16 weights
    and (n, 256) uint8 levels 0..63, such that weight = d * scale * (level - 32)."""
    # 128 bytes of low 4 bits, 64 of high 2 bits, sixteen int8 scales, d (f16)
    n = blocks.shape[0]
    low = _shifted(blocks[:, :128].reshape(n, 2, 64), (0, 4), 0x0F).reshape(n, 8, 32)
    high = _shifted(blocks[:, 128:192].reshape(n, 2, 32), (0, 2, 4, 6), 0x03).reshape(n, 8, 32)
    return _float16(blocks, 208), blocks[:, 192:208].contiguous().view(torch.int8), (low | (high << 4)).view(n, 256)


def _dequantize_q6_k(blocks: torch.Tensor) -> torch.Tensor:
    d, scales, levels = q6_k_fields(blocks)
    n = blocks.shape[0]
    return ((d * scales.float()).unsqueeze(2) * (levels.view(torch.int8) - 32).reshape(n, 16, 16).float()).view(n, 256)


_FIELDS = {_Q.Q4_K: q4_k_fields, _Q.Q6_K: q6_k_fields}
_TORCH_DEQUANTIZERS = {_Q.Q4_K: _dequantize_q4_k, _Q.Q6_K: _dequantize_q6_k}


@dataclass(frozen=True)
class QuantizedBlocks:
    """A quantized tensor as the file stores it, not yet decoded: r1/quant.py repacks the types
    its kernels hold as they are (Q4_K into int4, Q6_K into int6, from their `fields`) and
    dequantizes the rest."""

    info: TensorInfo
    raw: np.ndarray = field(repr=False)  # its bytes, a view of the file's map

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self.info.shape)

    @property
    def type_name(self) -> str:
        return type_name(self.info.ggml_type)

    def blocks(self) -> torch.Tensor:
        """(blocks, bytes per block) uint8, copied out of the map, rows after rows."""
        block_bytes = _gguf.GGML_QUANT_SIZES[_Q(self.info.ggml_type)][1]
        return torch.from_numpy(np.array(self.raw)).view(-1, block_bytes)

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.raw, self.info)

    def fields(self) -> tuple[torch.Tensor, ...]:
        """Q4_K's or Q6_K's decoded fields (q4_k_fields, q6_k_fields), a row of blocks after another."""
        return _FIELDS[_Q(self.info.ggml_type)](self.blocks())


FLOAT_TYPES = {_Q.F32, _Q.F16, _Q.BF16}


def iter_tensors(header: GGUFHeader) -> Iterator[tuple[str, torch.Tensor | QuantizedBlocks]]:
    """Yield (hf_name, tensor) for every tensor, reading the file through a memory map: float
    types as tensors, quantized ones as their blocks."""
    check_tensors(header)
    data = np.memmap(header.path, dtype=np.uint8, mode="r")  # whole file: numpy refuses an offset at its end
    for t in header.tensors:
        start = header.data_offset + t.offset
        raw = data[start : start + tensor_nbytes(t)]
        yield hf_name(t.name), dequantize(raw, t) if t.ggml_type in FLOAT_TYPES else QuantizedBlocks(t, raw)


def source_types(header: GGUFHeader) -> dict[str, str]:
    """hf_name -> the ggml type name the file stores each tensor in."""
    return {hf_name(t.name): type_name(t.ggml_type) for t in header.tensors}
