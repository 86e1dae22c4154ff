"""The component registry: names, groups, what each graph is made of, its recipe kinds and its feeds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from llada_edge.calibration.recipes import RECIPES, get_recipe
from llada_edge.checkpoint import CheckpointFolder
from llada_edge.components import DiT, Layer, Registry
from llada_edge.config import ModelConfig
from llada_edge.errors import InputError


@pytest.fixture(scope="module")
def registry(tiny_ckpt: Path) -> Registry:
    return Registry(ModelConfig.from_folder(tiny_ckpt))


def test_build_order_groups_and_selection(registry: Registry) -> None:
    assert registry.names == ["vision_tokenizer", "sigvq", "dit_turbo", "dit_normal", "vae_decoder", "embed",
                              "layer_0", "layer_1", "layer_2", "head_text", "head_image", "head_text_sample",
                              "head_image_sample"]
    assert [c.name for c in registry.select(["heads", "layer_1", "dit"])] == [
        "dit_turbo", "dit_normal", "layer_1", "head_text", "head_image", "head_text_sample", "head_image_sample"]
    assert registry.select(None) == list(registry)
    assert [c.name for c in registry.backbone] == ["embed", "layer_0", "layer_1", "layer_2", "head_text",
                                                   "head_image"]
    with pytest.raises(InputError, match=r"unknown component 'layer_9'.*groups: layers, heads"):
        registry.select(["layer_9"])


def test_each_component_knows_its_tensors(registry: Registry, tiny_ckpt: Path) -> None:
    ckpt = CheckpointFolder(tiny_ckpt)
    reader, keys = registry.layers[1].tensors(ckpt)
    assert reader is ckpt.backbone and keys and all(k.startswith("model.layers.1.") for k in keys)
    assert registry.layers[1].index == 1 and registry.layers[1].is_moe and not registry.layers[0].is_moe
    assert registry.sigvq.tensors(ckpt) == (None, []) and registry.sigvq.source_files(ckpt) == [ckpt.sigvq_path]
    # a component's fingerprint moves with its own tensors only
    assert registry.embed.source_fingerprint(ckpt) != registry.layers[0].source_fingerprint(ckpt)
    assert registry.embed.weight_bytes(ckpt) == ckpt.backbone.info("model.word_embeddings.weight").nbytes


def test_validation_cases_fit_the_spec(registry: Registry) -> None:
    for component in registry:
        spec = component.spec
        for label, feeds in component.validation_cases(np.random.default_rng(0)):
            assert list(feeds) == list(spec.inputs), (component.name, label)
            for name, sig in spec.inputs.items():
                array = feeds[name]
                assert array.dtype == np.dtype(sig.dtype), (component.name, label, name)
                fixed = [(i, d) for i, d in enumerate(sig.shape) if isinstance(d, int)]
                assert array.ndim == len(sig.shape) and all(array.shape[i] == d for i, d in fixed), (
                    component.name, label, name, array.shape)


def test_recipe_kinds_decide_formats(registry: Registry) -> None:
    layer = registry.layers[1]
    assert layer.weight_kind("model.layers.1.mlp.gate.weight", False) == "router"
    assert layer.weight_kind("model.layers.1.mlp.experts.3.up_proj.weight", False) == "experts"
    assert layer.weight_kind("model.layers.1.attention.query_key_value.weight", False) == "dense"
    assert registry.vision_tokenizer.weight_kind("w", feeds_argmax=True) == "keep"  # the codebook search
    assert registry.vision_tokenizer.weight_kind("w", feeds_argmax=False) == "vision"
    mixed = RECIPES["mixed"]
    assert mixed.graph_format(layer.graph_kinds) == "int4"  # one Q/DQ mode per graph: the experts'
    assert get_recipe("int4", {"experts": "fp32"}).graph_format(layer.graph_kinds) == "int8"  # falls to dense (int8)
    assert mixed.graph_format(registry.heads["text"].graph_kinds) == "int8"  # the text head: int8 on a budget
    assert mixed.graph_format(registry.heads["image"].graph_kinds) == "fp32"  # the image head stays fp32
    assert mixed.graph_format(registry.dits["turbo"].graph_kinds) == "fp8"
    assert not registry.embed.quantized and not registry.vae_decoder.quantized and registry.sigvq.quantized


def test_feeds_are_named_by_the_spec(registry: Registry) -> None:
    layer: Layer = registry.layers[0]
    assert list(layer.feeds(1, 2, 3, 4, 5)) == ["hidden", "positions", "past_k", "past_v", "attn_mask"]
    assert list(layer.outputs("h", "k", "v")) == ["hidden_out", "k_blk", "v_blk"]
    with pytest.raises(ValueError):
        layer.feeds(1, 2)  # a missing input is an error, not a silently short feed dict


def test_dit_feeds_carry_rope_tables_of_the_resolution(registry: Registry) -> None:
    dit: DiT = registry.dits["normal"]
    dec = registry.config.decoders["normal"]
    latent = np.zeros((2, dec.in_channels, 1, 8, 12))
    feeds = dit.feeds_for(latent, np.array([0.5, 0.5]), np.zeros((2, 40, dec.cap_feat_dim)))
    assert list(feeds) == list(dit.spec.inputs) and feeds["latent"].dtype == np.float32
    half = dec.head_dim // 2
    assert feeds["cap_cos"].shape == (64, half)  # the caption padded to a multiple of 32
    again = dit.feeds_for(latent, np.array([0.1, 0.1]), np.zeros((2, 40, dec.cap_feat_dim)))
    assert again["img_cos"] is feeds["img_cos"]  # computed once per resolution
    assert not feeds["img_cos"].flags.writeable  # shared, so read-only
