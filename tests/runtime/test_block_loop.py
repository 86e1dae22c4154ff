"""The torch reference backend under the real sampler: the KV-cached loop gives exactly the tokens of
the full-recompute loop (the upstream way), pads are invisible, SPRINT keep 1.0 is the baseline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from llada_edge.calibration.requests import procedural_image
from llada_edge.runtime import Pipeline, SprintConfig
from llada_edge.runtime.backends.torch_backend import TorchBackend
from llada_edge.runtime.sampler import BlockDiffusionSampler, SamplingConfig, left_pad

MASK = 156895


@pytest.fixture(scope="module")
def pipes(tiny_ckpt: Path) -> dict[str, Pipeline]:
    return {"cached": Pipeline.load(tiny_ckpt), "recompute": Pipeline.load(tiny_ckpt, kv_cache=False)}


@pytest.fixture(scope="module")
def source_image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("img") / "src.png"
    Image.fromarray(procedural_image(150, 220, seed=2)).save(path)
    return path


def test_understanding_cached_equals_recompute(pipes, source_image) -> None:
    a, b = (p.understand(source_image, "What is shown?", max_new_tokens=40, steps=8) for p in pipes.values())
    assert a.tokens == b.tokens and len(a.tokens) > 0
    assert a.text == b.text and a.text.strip()
    # same denoising steps; the cached loop adds its prefill and one commit pass per finished block
    assert a.steps == b.steps and a.forward_passes > b.forward_passes


def test_t2i_with_cfg_cached_equals_recompute(pipes) -> None:
    a, b = (p.generate_image("a red bicycle", 192, 160, cfg_scale=3.0, steps=4) for p in pipes.values())
    assert a.grid == (6, 5) and len(a.vq_tokens) == 30
    assert a.vq_tokens == b.vq_tokens
    assert all(0 <= t < 16384 for t in a.vq_tokens)  # image-only vocabulary
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert a.image.size == (160, 192)


@pytest.mark.parametrize("image_scale", [0.0, 1.5])
def test_edit_cached_equals_recompute(pipes, source_image, image_scale) -> None:
    a, b = (p.edit(source_image, "make it blue", cfg_image_scale=image_scale, steps=4, source_size=128)
            for p in pipes.values())
    assert a.vq_tokens == b.vq_tokens
    gh, gw = a.grid
    # at most (128/32)^2 = 16 crop patches of 32 px, i.e. 64 tokens of 16 px
    assert len(a.vq_tokens) == gh * gw and gh * gw <= 64
    assert a.image.size == (gw * 32, gh * 32)


def test_pad_tokens_are_invisible(tiny_ckpt) -> None:
    """Whatever sits in the left pads of a CFG row, no row's outputs change (pads are invalid keys)."""
    backend = TorchBackend(tiny_ckpt)

    def block_hidden(pad_token: int, pads_valid: bool = False) -> np.ndarray:
        rows = left_pad([list(range(10, 50)), list(range(60, 75))], pad_token)
        valid = rows.valid | pads_valid
        backend.start(2, 96)
        backend.prefill(rows.ids[:, :32], rows.positions[:, :32], valid[:, :32])
        block = np.concatenate([rows.ids[:, 32:], np.full((2, 24), MASK)], axis=1)
        pos = np.concatenate([rows.positions[:, 32:], rows.positions[:, -1:] + 1 + np.arange(24)], axis=1)
        return backend.forward_block(block, pos, np.ones((2, 32), dtype=bool))[0]

    reference = block_hidden(MASK)
    # Not bit-exact: the pads route to other experts, which changes the expert batch sizes and thus
    # the BLAS blocking of the real tokens' matmuls (last-bit differences).
    np.testing.assert_allclose(block_hidden(1234), reference, rtol=0, atol=1e-5)
    assert np.abs(block_hidden(1234, pads_valid=True)[1] - reference[1]).max() > 1e-2  # a leak would show


def test_sprint_keep_one_equals_baseline_on_the_model(tiny_ckpt) -> None:
    backend = TorchBackend(tiny_ckpt)
    prompt = list(range(100, 164))  # block aligned, so the adaptive and fixed schedules coincide
    rows = left_pad([prompt, prompt[-20:]], MASK)
    base = BlockDiffusionSampler(backend, "image", SamplingConfig(steps=8)).generate(rows, 64, [2.0, -1.0])
    sprint = BlockDiffusionSampler(backend, "image", SamplingConfig(steps=8),
                                   SprintConfig(keep_ratio=1.0)).generate(rows, 64, [2.0, -1.0])
    assert base.tokens.tolist() == sprint.tokens.tolist()
    pruned = BlockDiffusionSampler(backend, "image", SamplingConfig(steps=8),
                                   SprintConfig(keep_ratio=0.5)).generate(rows, 64, [2.0, -1.0])
    assert pruned.pruned_fraction == pytest.approx(0.5, abs=0.05)
    assert pruned.tokens.shape == (64,)


def test_thinking_mode_and_chat_run(pipes) -> None:
    pipe = pipes["cached"]
    res = pipe.generate_image("a cat", 64, 64, mode="thinking", thinking_max_tokens=24, steps=4)
    assert res.thinking is not None and res.grid == (2, 2) and "thinking" in res.timings
    assert res.forward_passes > 0
    chat = pipe.chat([{"role": "user", "content": "hello"}], max_new_tokens=24, steps=8)
    assert chat.text.strip() and chat.forward_passes > 0 and chat.steps > 0


def test_results_carry_timings_and_passes(pipes) -> None:
    res = pipes["cached"].generate_image("a tree", 64, 96, steps=4)
    assert {"backbone", "sigvq", "dit", "vae", "total"} <= set(res.timings)
    assert res.forward_passes >= res.steps > 0
    d = res.to_dict()
    assert d["tokens"] == res.vq_tokens and d["size"] == [96, 64]
