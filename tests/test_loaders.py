"""Loading every real source: HF folders (one file, shards), GGUF (float and quantized), the
demo assets, the hub; and clear errors for every kind of bad input."""

from __future__ import annotations

import copy
import json
import shutil

import gguf
import pytest
import torch

from conftest import TINY_CONFIG, save_tiny_gguf
from r1.config import ModelConfig, UnsupportedModelError
from r1.loaders import load_model, open_model_files
from r1.loaders.gguf import GGUFError, read_header
from r1.loaders.safetensors import CheckpointError


def _logits(model, ids):
    from r1.model.attention import AttentionMetadata, allocate_kv_cache

    cfg = model.config
    cache = allocate_kv_cache(
        cfg.num_hidden_layers, 16, 16, cfg.num_key_value_heads, cfg.head_dim, torch.float32, "cpu"
    )
    n = len(ids)
    meta = AttentionMetadata(torch.arange(n), torch.arange(16)[None], [n], [n])
    with torch.inference_mode():
        return model.compute_logits(model(torch.tensor(ids), torch.arange(n), cache, meta))


IDS = [5, 77, 300, 12, 499, 0, 42, 8]


def test_config_from_hf_dict_and_r1_arithmetic():
    cfg = ModelConfig()
    assert cfg.num_parameters() == 1_777_088_000
    assert cfg.kv_bytes_per_token() == 28_672
    assert round(cfg.weight_bytes() / 2**30, 2) == 3.31
    tiny = ModelConfig.from_dict({**TINY_CONFIG, "unknown_key": 1})
    assert (tiny.hidden_size, tiny.head_dim, tiny.num_key_value_heads) == (64, 16, 2)


def test_sharded_safetensors_folder(tiny_hf, tmp_path):
    folder, hf = tiny_hf
    hf.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    files = open_model_files(str(tmp_path))
    assert files.format == "hf" and files.num_tensors == len(hf.state_dict())
    model = load_model(files, torch.float32, "cpu", progress=False)
    ref = hf(torch.tensor([IDS])).logits[0]
    assert (_logits(model, IDS) - ref).abs().max() < 1e-4


def test_generation_config_gives_sampling_defaults(tiny_hf):
    folder, _ = tiny_hf
    assert open_model_files(str(folder)).sampling_defaults == {"temperature": 0.6, "top_p": 0.95}


@pytest.mark.parametrize(
    "qtype, tol", [(None, 1e-4), (gguf.GGMLQuantizationType.F16, 2e-2), (gguf.GGMLQuantizationType.Q8_0, 5e-2)]
)
def test_gguf_matches_the_checkpoint_it_was_made_from(tiny_hf, tmp_path, qtype, tol):
    _, hf = tiny_hf
    if qtype == gguf.GGMLQuantizationType.F16:  # F16 is a plain dtype in GGUF: store the arrays as float16
        hf = copy.deepcopy(hf).half().float()  # (in place otherwise: the fixture is shared)
    path = save_tiny_gguf(tmp_path / "tiny.gguf", hf, qtype=qtype if qtype != gguf.GGMLQuantizationType.F16 else None)
    files = open_model_files(str(path))
    assert files.format == "gguf" and files.config.num_hidden_layers == TINY_CONFIG["num_hidden_layers"]
    model = load_model(files, torch.float32, "cpu", progress=False)
    ref = hf(torch.tensor([IDS])).logits[0]
    err = (_logits(model, IDS) - ref).abs().max() / ref.abs().max()
    assert err < tol


def test_bf16_load_keeps_dtype(tiny_hf):
    folder, _ = tiny_hf
    model = load_model(open_model_files(str(folder)), torch.bfloat16, "cpu", progress=False)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_real_gguf_metadata_and_types(small_gguf):
    header = read_header(small_gguf)
    types = {gguf.GGMLQuantizationType(t.ggml_type).name for t in header.tensors}
    assert types == {"F32", "Q5_0", "Q8_0", "Q4_K", "Q6_K"}
    cfg = open_model_files(str(small_gguf)).config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (
        24,
        896,
        14,
        2,
    )


def test_real_gguf_tensors_dequantize_as_gguf_does(small_gguf):
    # r1 calls gguf's per-type decoder on 1024-row slices of a plain view of the map, or its own
    # torch one for Q4_K and Q6_K: the floats must be gguf's own, for a tensor of each quantized
    # type (Q4_K, Q5_0, Q6_K and Q8_0 here), including one past 1024 rows.
    import numpy as np

    from r1.loaders.gguf import DEQUANTIZE_ROWS, dequantize, tensor_nbytes

    header = read_header(small_gguf)
    data = np.memmap(header.path, dtype=np.uint8, mode="r", offset=header.data_offset)
    by_type = {}
    for t in sorted(header.tensors, key=lambda t: -t.shape[0] if len(t.shape) > 1 else 0):
        by_type.setdefault(gguf.GGMLQuantizationType(t.ggml_type), t)
    assert by_type[gguf.GGMLQuantizationType.Q8_0].shape[0] > DEQUANTIZE_ROWS
    assert {gguf.GGMLQuantizationType.Q4_K, gguf.GGMLQuantizationType.Q6_K} <= by_type.keys()
    for qtype, t in by_type.items():
        raw = data[t.offset : t.offset + tensor_nbytes(t)]
        want = gguf.quants.dequantize(np.array(raw).reshape(int(np.prod(t.shape[:-1])), -1), qtype)
        assert torch.equal(dequantize(raw, t), torch.from_numpy(np.asarray(want, dtype=np.float32)).reshape(t.shape)), (
            qtype
        )


def test_truncated_r1_header_reads_metadata_only(r1_header):
    header = read_header(r1_header)
    assert header.metadata["tokenizer.ggml.pre"] == "deepseek-r1-qwen"
    assert len(header.tensors) == 339
    with pytest.raises(GGUFError, match="truncated GGUF file"):
        load_model(open_model_files(str(r1_header)), torch.float32, "cpu", progress=False)


# ---- bad input ------------------------------------------------------------------------------


def test_missing_path():
    with pytest.raises(FileNotFoundError, match="model not found: './no/such/model'"):
        open_model_files("./no/such/model")


def test_folder_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        open_model_files(str(tmp_path))


def test_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY_CONFIG))
    with pytest.raises(CheckpointError, match="no \\*.safetensors weights"):
        open_model_files(str(tmp_path))


def test_truncated_safetensors(tiny_hf, tmp_path):
    folder, _ = tiny_hf
    shutil.copytree(folder, tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated safetensors"):
        load_model(open_model_files(str(tmp_path / "m")), torch.float32, "cpu", progress=False)


def test_corrupt_safetensors(tiny_hf, tmp_path):
    folder, _ = tiny_hf
    shutil.copytree(folder, tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"\xff" * 4096)
    with pytest.raises(CheckpointError, match="corrupt or truncated safetensors"):
        open_model_files(str(tmp_path / "m"))


def test_unsupported_architecture_in_config(tiny_hf, tmp_path):
    folder, _ = tiny_hf
    shutil.copytree(folder, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["architectures"] = ["MistralForCausalLM"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="unsupported architecture 'MistralForCausalLM'"):
        open_model_files(str(tmp_path / "m"))


def test_unsupported_architecture_in_gguf(tiny_hf, tmp_path):
    path = save_tiny_gguf(tmp_path / "llama.gguf", tiny_hf[1], arch="llama")
    with pytest.raises(UnsupportedModelError, match="unsupported GGUF architecture 'llama'"):
        open_model_files(str(path))


def test_unsupported_quant_type(tiny_hf, tmp_path):
    path = save_tiny_gguf(
        tmp_path / "iq.gguf",
        tiny_hf[1],
        raw_type_of={"model.layers.0.mlp.up_proj.weight": gguf.GGMLQuantizationType.IQ4_NL},
    )
    with pytest.raises(GGUFError, match="blk.0.ffn_up.weight has quantization type IQ4_NL"):
        load_model(open_model_files(str(path)), torch.float32, "cpu", progress=False)


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(GGUFError, match="not a GGUF file"):
        open_model_files(str(bad))


def test_corrupt_gguf_header(tiny_hf, tmp_path):
    path = save_tiny_gguf(tmp_path / "tiny.gguf", tiny_hf[1])
    data = bytearray(path.read_bytes())
    data[24:32] = (2**62).to_bytes(8, "little")  # the first key's length: absurd
    path.write_bytes(bytes(data))
    with pytest.raises(GGUFError, match="truncated or corrupt GGUF header"):
        open_model_files(str(path))


def test_truncated_gguf_header(small_gguf, tmp_path):
    cut = tmp_path / "cut.gguf"
    with open(small_gguf, "rb") as f:
        cut.write_bytes(f.read(100_000))  # inside the token list
    with pytest.raises(GGUFError, match="truncated or corrupt GGUF header"):
        open_model_files(str(cut))


def test_offline_hub_id_says_how_to_get_weights(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ConnectionError, match="--model demo"):
        open_model_files("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B")


def test_demo_asset_missing_parts_names_the_extra(monkeypatch, tmp_path):
    from r1.loaders import hub

    monkeypatch.setenv("R1_CACHE", str(tmp_path))
    monkeypatch.setitem(
        hub.DEMO_ASSETS,
        "demo-missing",
        hub.DemoAsset(
            "nothing", (("r1_no_such_part_package", "data/x.bin"), ("r1_no_such_part_package2", "x")), 1, "0", "demo"
        ),
    )
    with pytest.raises(FileNotFoundError, match=r"pip install 'r1\[demo\]'"):
        hub.demo_path("demo-missing")
