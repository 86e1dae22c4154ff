"""The routing probes read each MoE layer's expert choice in both lowerings, without changing what the layer does."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from llada_edge.engines.routing_probe import install_probes, selection_agreement
from llada_edge.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend


@pytest.mark.parametrize("build", ["tiny_build", "trained_build_ort"])  # dense lowering, com.microsoft.MoE
def test_probes_see_top_k_experts_per_token_and_leave_outputs_alone(build, request) -> None:
    build_dir: Path = request.getfixturevalue(build)
    plain, probed = OnnxRuntimeBackend(build_dir), OnnxRuntimeBackend(build_dir)
    probes = install_probes(probed)
    cfg = plain.config.backbone
    assert sorted(probes) == [f"layer_{i}" for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 5000, (1, 40))
    feeds = (ids, np.arange(40)[None], np.ones((1, 40), bool))
    np.testing.assert_array_equal(plain.hidden_states(*feeds), probed.hidden_states(*feeds))
    for probe in probes.values():
        (chosen,) = probe.chosen
        assert chosen.shape == (40, cfg.num_experts)
        assert (chosen.sum(-1) == cfg.num_experts_per_tok).all()  # exactly the top-k, in every token
    first = {name: p.chosen.pop() for name, p in probes.items()}
    probed.hidden_states(ids[:, ::-1].copy(), *feeds[1:])  # other tokens choose other experts...
    again = {name: p.chosen.pop() for name, p in probes.items()}
    # ... in some layer at least: a probe that read a constant would agree with itself everywhere. Not in every
    # layer: a trained router may send both inputs' tokens to the same experts (one training of the tiny
    # checkpoint collapsed its layer 2 onto one top-k set for the first input but not for the reversed one), and
    # how much each layer varies moves from one training to the next
    assert any(selection_agreement(first[n], again[n]) < 1.0 for n in first)
    assert all(selection_agreement(c, c) == 1.0 for c in first.values())
