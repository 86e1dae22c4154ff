"""Backbone training on a few steps: it learns, keeps the upstream layout, and writes dead rows as zeros."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from llada_edge.checkpoint import CheckpointFolder
from llada_edge.training import scenes
from llada_edge.training.backbone import BackboneTraining, train_backbone
from llada_edge.training.tiny_trained import scene_tokens


@pytest.fixture(scope="module")
def trained(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    ckpt = tmp_path_factory.mktemp("train") / "tiny"
    shutil.copytree(tiny_ckpt, ckpt)
    understand = scene_tokens(ckpt, list(range(40)), "understand")
    t2i = scene_tokens(ckpt, list(range(40, 100)), "t2i")
    held = {"understand": scene_tokens(ckpt, scenes.held_out_seeds(4), "understand"),
            "t2i": scene_tokens(ckpt, scenes.held_out_seeds(4, start=4), "t2i")}
    settings = BackboneTraining(steps=60, batch=8, warmup=10, log_every=1000)
    report = train_backbone(ckpt, understand, t2i, held, settings, seed=0)
    return ckpt, report


def test_training_lowers_held_out_perplexity_and_sharpens_logits(trained) -> None:
    _, report = trained
    before, after = report["before"], report["after"]
    assert after["chat_perplexity"] < 0.2 * before["chat_perplexity"]
    assert after["chat_masked_accuracy"] > before["chat_masked_accuracy"] + 0.05
    assert after["top1_top2_gap_nats"] > before["top1_top2_gap_nats"]
    assert after["routing_entropy_nats"] < before["routing_entropy_nats"] <= before["routing_entropy_uniform_nats"]
    assert json.dumps(report)  # the report is plain JSON


def test_trained_checkpoint_keeps_the_upstream_layout(trained, tiny_ckpt: Path) -> None:
    ckpt, report = trained
    new, old = CheckpointFolder(ckpt), CheckpointFolder(tiny_ckpt)
    new.check(["backbone"])
    assert new.backbone.tensors.keys() == old.backbone.tensors.keys()
    for key, info in old.backbone.tensors.items():
        assert new.backbone.tensors[key].dtype == info.dtype and new.backbone.tensors[key].shape == info.shape
    head = new.backbone.get("lm_head.weight").float()
    live = head.abs().sum(-1) > 0
    assert int(live.sum()) == report["live_ids"]  # every other row is exactly zero: its logit is 0
    assert not torch.equal(new.backbone.get("model.layers.1.mlp.gate.weight"),
                           old.backbone.get("model.layers.1.mlp.gate.weight"))
    # dead embedding rows are untouched
    key = "model.word_embeddings.weight"
    emb_new, emb_old = new.backbone.get(key), old.backbone.get(key)
    np.testing.assert_array_equal(emb_new[~live].float().numpy(), emb_old[~live].float().numpy())
