"""Config parsing: every required field, forced decoder fields, cross-checks, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llada_edge.config import (
    DECODER_FORCED_AXES_LENS,
    BackboneConfig,
    DecoderConfig,
    ModelConfig,
    PreprocessorConfig,
    VisionTokenizerConfig,
)
from llada_edge.errors import ConfigError
from llada_edge.synthetic import preset_configs

UNI = preset_configs("uni", layers=20)


def test_uni_backbone_values() -> None:
    cfg = BackboneConfig.from_dict(UNI["backbone"], Path("config.json"))
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.head_dim, cfg.rotary_dim) == (2048, 20, 128, 64)
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group) == (256, 8, 8, 4)
    assert cfg.mask_token_id == 156895 and cfg.eos_token_id == 156892
    assert cfg.num_image_tokens == 16384
    assert cfg.kv_bytes_per_token == 40960  # model-spec §1
    assert cfg.moe_router_enable_expert_bias is None  # the Uni config omits it


@pytest.mark.parametrize("key", ["rms_norm_eps", "use_bias", "rope_theta", "first_k_dense_replace", "pad_token_id",
                                 "image_token_offset", "num_experts", "n_group", "partial_rotary_factor"])
def test_missing_required_backbone_field_names_file_and_key(key: str) -> None:
    data = dict(UNI["backbone"])
    data.pop(key)
    if key in ("rope_theta", "partial_rotary_factor"):
        data.pop("rope_parameters")
    with pytest.raises(ConfigError) as err:
        BackboneConfig.from_dict(data, Path("/ckpt/config.json"))
    assert "/ckpt/config.json" in str(err.value) and f"[{key}]" in str(err.value)
    assert "required field is missing" in str(err.value)


def test_rope_parameters_block_is_read() -> None:
    data = dict(UNI["backbone"])
    data.pop("rope_theta")
    data.pop("partial_rotary_factor")
    cfg = BackboneConfig.from_dict(data, Path("config.json"))
    assert cfg.rope_theta == 600000 and cfg.partial_rotary_factor == 0.5


@pytest.mark.parametrize(("key", "value", "message"), [
    ("num_key_value_heads", 3, "must divide num_attention_heads"),
    ("use_bias", True, "expected false"),
    ("hidden_act", "gelu", "expected one of"),
    ("rms_norm_eps", "tiny", "expected a number"),
    ("num_experts_per_tok", 200, "cannot exceed"),
    ("image_token_offset", 999999, "inside the vocabulary"),
    ("mask_token_id", 160000, "below image_token_offset"),
])
def test_invalid_backbone_values(key: str, value: object, message: str) -> None:
    data = dict(UNI["backbone"], **{key: value})
    with pytest.raises(ConfigError, match=message) as err:
        BackboneConfig.from_dict(data, Path("config.json"))
    assert f"[{key}]" in str(err.value)


def test_decoder_forces_axes_lens_and_cap_feat_dim() -> None:
    data = dict(UNI["decoder"], axes_lens=[1024, 512, 512], cap_feat_dim=2560)
    cfg = DecoderConfig.from_dict(data, Path("decoder/config.json"))
    assert cfg.axes_lens == DECODER_FORCED_AXES_LENS and cfg.cap_feat_dim == 4096
    assert cfg.head_dim == 128 and cfg.ffn_dim == 10240 and cfg.adaln_dim == 256


def test_decoder_rejects_unknown_key_but_drops_underscored() -> None:
    DecoderConfig.from_dict(dict(UNI["decoder"], _diffusers_version="0.0"), Path("d.json"))
    with pytest.raises(ConfigError, match="unknown decoder config key") as err:
        DecoderConfig.from_dict(dict(UNI["decoder"], head_dims=7), Path("decoder/config.json"))
    assert "[head_dims]" in str(err.value)


def test_decoder_axes_must_sum_to_head_dim() -> None:
    with pytest.raises(ConfigError, match="must sum to head_dim"):
        DecoderConfig.from_dict(dict(UNI["decoder"], axes_dims=[32, 48, 40]), Path("d.json"))


def test_vision_and_preprocessor() -> None:
    v = VisionTokenizerConfig.from_dict(UNI["vision"], Path("c.json"))
    assert (v.hidden_size, v.depth, v.head_dim, v.pos_grid) == (1536, 20, 96, 128)
    p = PreprocessorConfig.from_dict(UNI["preprocessor"], Path("p.json"))
    assert p.token_order == "window"
    with pytest.raises(ConfigError, match="must be 1") as err:
        PreprocessorConfig.from_dict(dict(UNI["preprocessor"], temporal_patch_size=2), Path("p.json"))
    assert "[temporal_patch_size]" in str(err.value)
    bad = json.loads(json.dumps(UNI["vision"]))
    del bad["vq_config"]["embed_dim"]
    with pytest.raises(ConfigError, match=r"\[vq_config.embed_dim\]"):
        VisionTokenizerConfig.from_dict(bad, Path("c.json"))


def test_model_config_cross_checks(tiny_copy: Path) -> None:
    cfg = ModelConfig.from_folder(tiny_copy)
    assert cfg.decoders["turbo"].cap_feat_dim == 64  # the tiny preset's private override
    vision = json.loads((tiny_copy / "image_tokenizer" / "config.json").read_text())
    vision["vq_config"]["num_embeddings"] = 1000
    (tiny_copy / "image_tokenizer" / "config.json").write_text(json.dumps(vision))
    with pytest.raises(ConfigError, match="VQ codebook has 1000 entries"):
        ModelConfig.from_folder(tiny_copy)


def test_missing_and_malformed_files(tiny_copy: Path) -> None:
    (tiny_copy / "vae" / "config.json").unlink()
    with pytest.raises(ConfigError, match="file not found") as err:
        ModelConfig.from_folder(tiny_copy)
    assert str(tiny_copy / "vae" / "config.json") in str(err.value)
    (tiny_copy / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_folder(tiny_copy)
