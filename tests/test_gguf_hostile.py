"""Corrupt and hostile GGUF files: each one must fail as a GGUFError naming the file and the byte
offset of the bad field, never as an IndexError, a MemoryError or a huge allocation.

The files are built by hand (`_gguf` below, checked byte for byte against gguf's own GGUFWriter),
so every test knows the offset of the field it breaks.
"""

from __future__ import annotations

import random
import struct

import gguf
import numpy as np
import pytest
import torch

from r1.loaders.gguf import GGUFError, iter_tensors, read_header

U32, STRING, ARRAY = 4, 8, 9  # GGUF value types
F32, Q8_0 = 0, 8  # ggml tensor types
NAME = "token_embd.weight"  # a name r1 maps (model.embed_tokens.weight), so the file loads
WEIGHTS = np.arange(6, dtype=np.float32).reshape(2, 3)


def _str(s: str | bytes) -> bytes:
    s = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(s)) + s


def _kv(key: str, vtype: int, payload: bytes) -> bytes:
    return _str(key) + struct.pack("<I", vtype) + payload


def _info(name: str, dims: list[int], ggml_type: int = F32, offset: int = 0, n_dims: int | None = None) -> bytes:
    """A tensor info; dims innermost first, as GGUF stores them."""
    return (
        _str(name)
        + struct.pack("<I", len(dims) if n_dims is None else n_dims)
        + b"".join(struct.pack("<Q", d) for d in dims)
        + struct.pack("<IQ", ggml_type, offset)
    )


ARCH = _kv("general.architecture", STRING, _str("qwen2"))
VALID_INFO = _info(NAME, [3, 2])
KV_AT = 24  # after magic, version and the two counts
AFTER_ARCH = KV_AT + len(ARCH)  # the second key, or the first tensor info when ARCH is the only key


def _gguf(kvs=(ARCH,), infos=(VALID_INFO,), data=WEIGHTS.tobytes(), counts=None) -> bytes:
    """A GGUF v3 file laid out as GGUFWriter lays it out: header, data, each padded to 32 bytes."""
    n_tensors, n_kv = counts or (len(infos), len(kvs))
    header = b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + b"".join(kvs) + b"".join(infos)
    if not data:
        return header
    return b"".join(part + b"\0" * (-len(part) % 32) for part in (header, data))


def _write(tmp_path, data: bytes):
    path = tmp_path / "hostile.gguf"
    path.write_bytes(data)
    return path


def _fails_at(path, offset: int, phrase: str) -> None:
    with pytest.raises(GGUFError) as err:
        list(iter_tensors(read_header(path)))
    message = str(err.value)
    assert str(path) in message and f"offset {offset}" in message and phrase in message, message


def _write_with_gguf(path, alignment: int | None = None):
    w = gguf.GGUFWriter(str(path), "qwen2")
    if alignment is not None:
        w.add_custom_alignment(alignment)
    w.add_tensor(NAME, WEIGHTS)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_hand_built_file_is_what_gguf_writes(tmp_path):
    assert _write_with_gguf(tmp_path / "ref.gguf").read_bytes() == _gguf()


def test_valid_file_loads(tmp_path):
    header = read_header(_write(tmp_path, _gguf()))
    assert header.metadata == {"general.architecture": "qwen2"}
    assert [(t.name, t.shape) for t in header.tensors] == [(NAME, (2, 3))]
    [(name, tensor)] = list(iter_tensors(header))
    assert name == "model.embed_tokens.weight" and torch.equal(tensor, torch.from_numpy(WEIGHTS))


def test_custom_alignment_places_the_data(tmp_path):
    header = read_header(_write_with_gguf(tmp_path / "a.gguf", alignment=256))
    assert header.metadata["general.alignment"] == 256 and header.data_offset == 256
    [(_, tensor)] = list(iter_tensors(header))
    assert torch.equal(tensor, torch.from_numpy(WEIGHTS))


def _alignment_kv(value: bytes, vtype: int = U32) -> bytes:
    return _kv("general.alignment", vtype, value)


ALIGN_VALUE_AT = KV_AT + len(ARCH) + len(_str("general.alignment")) + 4
NDIMS_AT = AFTER_ARCH + len(_str(NAME))
DIMS_AT = NDIMS_AT + 4

HOSTILE = {  # name: (file bytes, offset of the bad field, phrase in the message)
    "bad magic": (b"GGML" + _gguf()[4:], 0, "not a GGUF file"),
    "version 1": (_gguf()[:4] + struct.pack("<I", 1) + _gguf()[8:], 4, "unsupported GGUF version 1"),
    "huge tensor count": (_gguf(counts=(2**63, 1)), 8, "tensor infos"),
    "huge kv count": (_gguf(counts=(1, 2**64 - 1)), 8, "key-value pairs"),
    "tensor count past the bytes left": (_gguf(counts=(1000, 1)), 8, "1000 tensor infos"),
    "huge key length": (_gguf(kvs=[struct.pack("<Q", 2**64 - 1) + b"general"]), KV_AT, "a string of"),
    "huge tensor name length": (_gguf(infos=[struct.pack("<Q", 2**40) + VALID_INFO[8:]]), AFTER_ARCH, "a string of"),
    "huge string array": (
        _gguf(kvs=[ARCH, _kv("tokenizer.ggml.tokens", ARRAY, struct.pack("<IQ", STRING, 2**62))]),
        AFTER_ARCH + len(_str("tokenizer.ggml.tokens")) + 4,
        "an array of",
    ),
    "huge int array": (
        _gguf(kvs=[ARCH, _kv("tokenizer.ggml.token_type", ARRAY, struct.pack("<IQ", U32, 2**61))]),
        AFTER_ARCH + len(_str("tokenizer.ggml.token_type")) + 4,
        "an array of",
    ),
    "nested array": (
        _gguf(kvs=[ARCH, _kv("x", ARRAY, struct.pack("<IQ", ARRAY, 1) + struct.pack("<IQ", U32, 0))]),
        AFTER_ARCH + len(_str("x")) + 4,
        "an array of value type 9",
    ),
    "unknown value type": (_gguf(kvs=[_kv("x", 13, b"\0" * 8)]), KV_AT + len(_str("x")), "unknown value type 13"),
    "duplicate key": (_gguf(kvs=[ARCH, ARCH]), AFTER_ARCH, "duplicate key"),
    "alignment 3": (_gguf(kvs=[ARCH, _alignment_kv(struct.pack("<I", 3))]), ALIGN_VALUE_AT, "not a power of two"),
    "alignment 0": (_gguf(kvs=[ARCH, _alignment_kv(struct.pack("<I", 0))]), ALIGN_VALUE_AT, "not a power of two"),
    "alignment 2**31": (_gguf(kvs=[ARCH, _alignment_kv(struct.pack("<I", 2**31))]), ALIGN_VALUE_AT, "up to"),
    "alignment a string": (_gguf(kvs=[ARCH, _alignment_kv(_str("32"), STRING)]), ALIGN_VALUE_AT, "not a power of two"),
    "n_dims 5": (_gguf(infos=[_info(NAME, [3, 2, 1, 1, 1])]), NDIMS_AT, "5 dimensions"),
    "n_dims 2**32-1": (_gguf(infos=[_info(NAME, [3, 2], n_dims=2**32 - 1)]), NDIMS_AT, "4294967295 dimensions"),
    "dims overflow int64": (_gguf(infos=[_info(NAME, [2**32, 2**32])]), DIMS_AT, "more elements than int64 holds"),
    "dim past int64": (_gguf(infos=[_info(NAME, [2**63, 0])]), DIMS_AT, "more elements than int64 holds"),
    "empty dimension": (_gguf(infos=[_info(NAME, [32, 0], ggml_type=Q8_0)]), DIMS_AT, "a dimension of 0"),
    "unknown tensor type": (_gguf(infos=[_info(NAME, [3, 2], ggml_type=200)]), DIMS_AT + 16, "unknown type 200"),
    "row not a whole block": (_gguf(infos=[_info(NAME, [3, 2], ggml_type=Q8_0)]), DIMS_AT, "its block of 32"),
    "unaligned tensor offset": (_gguf(infos=[_info(NAME, [3, 2], offset=4)]), DIMS_AT + 20, "of the alignment"),
    "duplicate tensor": (_gguf(infos=[VALID_INFO, VALID_INFO]), AFTER_ARCH + len(VALID_INFO), "duplicate tensor"),
    # the header is sound, the data is not there: 128 is where the data section starts
    "tensor data past the end": (_gguf(infos=[_info(NAME, [3, 2], offset=1024)]), 128 + 1024, "truncated GGUF file"),
    "tensor data at 2**64": (_gguf(infos=[_info(NAME, [3, 2], offset=2**64 - 32)]), 128 + 2**64 - 32, "past the end"),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_header_fails_at_the_bad_field(tmp_path, case):
    data, offset, phrase = HOSTILE[case]
    _fails_at(_write(tmp_path, data), offset, phrase)


def test_every_truncation_fails_cleanly(tmp_path):
    # Cut inside the header: the parse fails. Cut in the data: the header reads (the R1 tokenizer
    # asset is such a file) and loading the tensors fails.
    header_end, data_end = len(_gguf(data=b"")), 128 + WEIGHTS.nbytes
    for n in range(data_end):
        path = _write(tmp_path, _gguf()[:n])
        with pytest.raises(GGUFError) as err:
            header = read_header(path)
            assert n >= header_end, "a cut header parsed"
            list(iter_tensors(header))
        assert str(path) in str(err.value) and "offset" in str(err.value), str(err.value)
    assert len(list(iter_tensors(read_header(_write(tmp_path, _gguf()[:data_end]))))) == 1


def test_random_header_corruption_raises_only_gguf_error(tmp_path):
    rng = random.Random(0)
    valid = _gguf()
    header_end = len(_gguf(data=b""))
    for _ in range(400):
        data = bytearray(valid)
        for _ in range(rng.randint(1, 3)):
            data[rng.randrange(header_end)] = rng.randrange(256)
        path = _write(tmp_path, bytes(data))
        try:
            list(iter_tensors(read_header(path)))
        except GGUFError as e:
            assert str(path) in str(e)
