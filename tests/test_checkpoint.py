"""Checkpoint I/O: exact round trip, clear failures on broken folders, bounded memory when streaming."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from llada_edge import layout
from llada_edge.checkpoint import CheckpointFolder, TensorReader
from llada_edge.errors import CheckpointError, ConfigError
from llada_edge.synthetic import make_tensor, synthesize


def _all_safetensors(root: Path) -> list[Path]:
    return sorted(root.rglob("*.safetensors"))


def test_synth_then_read_gives_identical_tensors(tiny_ckpt: Path) -> None:
    """Our reader agrees bit for bit with safetensors' own reader on every tensor of every file."""
    n = 0
    for path in _all_safetensors(tiny_ckpt):
        ours = TensorReader.from_files([path])
        with safe_open(str(path), "pt") as ref:
            assert sorted(ref.keys()) == sorted(ours.keys())
            for key in ref.keys():  # noqa: SIM118 - safe_open is not iterable
                a, b = ours.get(key), ref.get_tensor(key)
                assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), key
                n += 1
    assert n > 400


def test_read_matches_generated_values(tiny_ckpt: Path) -> None:
    ckpt = CheckpointFolder(tiny_ckpt)
    specs = layout.backbone_layout(ckpt.config.backbone)
    for key in ("model.layers.1.mlp.experts.3.down_proj.weight", "model.layers.2.mlp.gate.expert_bias",
                "lm_head.weight"):
        assert torch.equal(ckpt.backbone.get(key), make_tensor(specs[key], 0, "backbone", key))
    bias = ckpt.backbone.get("model.layers.1.mlp.gate.expert_bias")
    assert bias.dtype == torch.float32 and bias.abs().max() > 0.05  # non-zero, fp32 as upstream


def test_numpy_reading_widens_bf16_exactly(tiny_ckpt: Path) -> None:
    reader = CheckpointFolder(tiny_ckpt).backbone
    key = "model.layers.0.attention.dense.weight"
    assert (reader.get_numpy(key) == reader.get(key).float().numpy()).all()


def test_fp8_experts_are_read(tmp_path: Path) -> None:
    out = synthesize(tmp_path / "fp8", "tiny", layers=2, expert_dtype="fp8", components=["backbone"],
                     progress=lambda _m: None)
    reader = CheckpointFolder(out).backbone
    key = "model.layers.1.mlp.experts.0.gate_proj.weight"
    t = reader.get(key)
    assert t.dtype == torch.float8_e4m3fn
    assert reader.get("model.layers.1.mlp.shared_experts.gate_proj.weight").dtype == torch.bfloat16
    shard = reader.info(key).file
    with safe_open(str(shard), "pt") as ref:
        assert torch.equal(ref.get_tensor(key).view(torch.uint8), t.view(torch.uint8))
    CheckpointFolder(out).check(["backbone"])  # fp8 passes validation


def _shard_of(root: Path, key: str) -> str:
    return json.loads((root / "model.safetensors.index.json").read_text())["weight_map"][key]


def test_missing_shard_names_file_and_key(tiny_copy: Path) -> None:
    shard = _shard_of(tiny_copy, "lm_head.weight")
    (tiny_copy / shard).unlink()
    with pytest.raises(CheckpointError, match=r"shard listed in model\.safetensors\.index\.json is missing") as err:
        _ = CheckpointFolder(tiny_copy).backbone
    assert shard in str(err.value) and "[lm_head.weight]" in str(err.value)


def test_truncated_shard_names_file_and_key(tiny_copy: Path) -> None:
    shard = tiny_copy / _shard_of(tiny_copy, "model.layers.1.mlp.gate.weight")
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="truncated") as err:
        _ = CheckpointFolder(tiny_copy).backbone
    assert shard.name in str(err.value) and "[model." in str(err.value)


def test_corrupted_header_names_file(tiny_copy: Path) -> None:
    shard = tiny_copy / _shard_of(tiny_copy, "model.norm.weight")
    data = bytearray(shard.read_bytes())
    data[8:20] = b"\x00garbage!!\xff\xfe"
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted safetensors header") as err:
        _ = CheckpointFolder(tiny_copy).backbone
    assert shard.name in str(err.value)


def test_missing_key_is_listed(tiny_copy: Path) -> None:
    index_path = tiny_copy / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    del index["weight_map"]["model.layers.2.attention.key_layernorm.weight"]
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"1 missing: model\.layers\.2\.attention\.key_layernorm\.weight") as err:
        CheckpointFolder(tiny_copy).check(["backbone"])
    assert "model.safetensors.index.json" in str(err.value)


def test_missing_expert_bias_is_an_error_unless_config_disables_it(tiny_copy: Path) -> None:
    index_path = tiny_copy / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    del index["weight_map"]["model.layers.1.mlp.gate.expert_bias"]
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="expert_bias"):
        CheckpointFolder(tiny_copy).check(["backbone"])
    cfg = json.loads((tiny_copy / "config.json").read_text())
    cfg["moe_router_enable_expert_bias"] = False
    (tiny_copy / "config.json").write_text(json.dumps(cfg))
    CheckpointFolder(tiny_copy).check(["backbone"])


def test_wrong_shape_names_key_and_shapes(tiny_copy: Path) -> None:
    key = "model.layers.0.mlp.up_proj.weight"
    shard = tiny_copy / _shard_of(tiny_copy, key)
    tensors = load_file(str(shard))
    tensors[key] = tensors[key][:100].clone()
    save_file(tensors, str(shard))
    with pytest.raises(CheckpointError, match=rf"{key}: expected \[128, 64\], found \[100, 64\]"):
        CheckpointFolder(tiny_copy).check(["backbone"])


def test_unexpected_key_is_listed(tiny_copy: Path) -> None:
    path = tiny_copy / "decoder" / "model.safetensors"
    tensors = load_file(str(path))
    tensors["siglip_embedder.0.weight"] = torch.ones(4)
    save_file(tensors, str(path))
    with pytest.raises(CheckpointError, match=r"1 unexpected: siglip_embedder\.0\.weight"):
        CheckpointFolder(tiny_copy).check(["decoder"])


def test_config_without_required_field(tiny_copy: Path) -> None:
    cfg = json.loads((tiny_copy / "config.json").read_text())
    del cfg["num_key_value_heads"]
    (tiny_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError) as err:
        CheckpointFolder(tiny_copy)
    assert str(tiny_copy / "config.json") in str(err.value) and "[num_key_value_heads]" in str(err.value)


def test_broken_sigvq_file(tiny_copy: Path) -> None:
    (tiny_copy / "image_tokenizer" / "sigvq_embedding.pt").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(CheckpointError, match="cannot read the SigVQ state dict") as err:
        CheckpointFolder(tiny_copy).check(["sigvq"])
    assert "sigvq_embedding.pt" in str(err.value)


_RSS_SCRIPT = textwrap.dedent("""
    import json, sys, zlib
    import torch
    from llada_edge.checkpoint import CheckpointFolder
    ckpt = CheckpointFolder(sys.argv[1])
    ckpt.check(["backbone"])
    def hwm():  # VmHWM is per address space; ru_maxrss survives fork+exec from the big test process
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    base = hwm()
    reader = ckpt.backbone
    crc = 0
    for key in reader.keys():
        t = reader.get(key)
        crc = zlib.crc32(t.view(torch.uint8).numpy().data, crc)
        del t
    peak = hwm()
    largest = max(i.nbytes for i in reader.tensors.values())
    print(json.dumps({"peak": peak, "base": base, "total": reader.total_bytes, "largest": largest}))
""")


@pytest.mark.slow
def test_streaming_read_of_uni_preset_keeps_rss_bounded(tmp_path: Path, measure) -> None:
    """Reading every tensor of the real-dimension backbone (2 layers, 3.1 GB) in a fresh process."""
    out = synthesize(tmp_path / "uni2", "uni", layers=2, components=["backbone"], progress=lambda _m: None)
    res = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(out)], capture_output=True, text=True, check=True)
    stats = json.loads(res.stdout.strip().splitlines()[-1])
    measure("uni2_backbone_weight_bytes", stats["total"])
    measure("uni2_read_peak_rss_bytes", stats["peak"])
    measure("uni2_read_peak_rss_over_weights", stats["peak"] / stats["total"])
    # One tensor at a time: the peak is the interpreter + the largest tensor, far below the weights.
    assert stats["peak"] < 0.5 * stats["total"]
    assert stats["peak"] - stats["base"] < 1.5 * stats["largest"]
