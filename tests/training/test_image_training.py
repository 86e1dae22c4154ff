"""Image-side training of the tiny checkpoint: procedural scenes, the codebook fit, the decoder training.

Small settings throughout (tens of scenes, tens of steps): the tests check that each step moves the held-out
figures the right way and leaves the folder in its exact layout, not the quality of the default run.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from llada_edge.checkpoint import CheckpointFolder, read_header
from llada_edge.model import load_dit, load_sigvq, load_vae, load_vision_tokenizer
from llada_edge.training.image import CODEBOOK_KEY, fit_codebook, scene_tokens, train_decoder
from llada_edge.training.scenes import (
    COLOURS,
    HELD_OUT_SEED_BASE,
    held_out_seeds,
    render,
    scene,
    scene_spec,
    scenes,
    train_seeds,
)

SAFETENSORS = ("image_tokenizer/model.safetensors", "decoder/model.safetensors", "decoder-turbo/model.safetensors",
               "vae/diffusion_pytorch_model.safetensors")
SIGVQ = "image_tokenizer/sigvq_embedding.pt"
SMALL_CODES = 64


def _quiet(_msg: str) -> None:
    pass


def _layout(root: Path) -> dict[str, object]:
    """Keys, shapes and dtypes of every image-side file (what training must leave unchanged)."""
    out: dict[str, object] = {}
    for name in SAFETENSORS:
        out[name] = {k: (v.dtype, v.shape) for k, v in read_header(root / name).items()}
    state = torch.load(root / SIGVQ, map_location="cpu", weights_only=True)
    out[SIGVQ] = {k: (v.dtype, tuple(v.shape)) for k, v in state.items()}
    return out


def _content(seed: int) -> tuple[object, ...]:
    """What a caption should name: the scene without its unnamed jitter and brightness."""
    spec = scene_spec(seed)
    colours = spec.colours if spec.background != "plain" else spec.colours[:1]
    return spec.background, colours, tuple((s.kind, s.colour, s.size, s.position) for s in spec.shapes)


# ----------------------------------------------------------------------------------------------
# Scenes
# ----------------------------------------------------------------------------------------------


def test_scenes_are_deterministic_and_resolution_independent() -> None:
    a, cap_a = scene(7, 96, 128)
    b, cap_b = scene(7, 96, 128)
    assert a.dtype == np.uint8 and a.shape == (96, 128, 3)
    assert np.array_equal(a, b) and cap_a == cap_b
    assert not np.array_equal(a, scene(8, 96, 128)[0])
    # the half-size render (the decoder's conditioning input) shows the same scene as the full one
    full, half = scene(3, 128, 128)[0].astype(np.float32), scene(3, 64, 64)[0].astype(np.float32)
    pooled = full.reshape(64, 2, 64, 2, 3).mean(axis=(1, 3))
    assert np.abs(pooled - half).mean() < 4.0
    batch, captions = scenes([1, 2], 32, 32)
    assert batch.shape == (2, 32, 32, 3) and captions == [scene(1, 32, 32)[1], scene(2, 32, 32)[1]]


def test_captions_name_the_content_and_nothing_else() -> None:
    by_caption: dict[str, tuple[object, ...]] = {}
    by_content: dict[tuple[object, ...], str] = {}
    for seed in range(600):
        caption, content = scene_spec(seed).caption(), _content(seed)
        assert by_caption.setdefault(caption, content) == content  # one caption -> one content
        assert by_content.setdefault(content, caption) == caption  # one content -> one caption
    assert len(by_caption) > 500  # the vocabulary is large enough that captions rarely repeat
    spec = scene_spec(11)
    for shape in spec.shapes:
        assert shape.kind in spec.caption() and shape.colour in spec.caption()
        assert shape.colour not in (spec.colours if spec.background != "plain" else spec.colours[:1])
    # the object colours are really drawn: a plain-background scene contains its object's colour
    seed = next(s for s in range(100) if scene_spec(s).background == "plain" and scene_spec(s).shapes[0].size
                == "large")
    img = render(scene_spec(seed), 128, 128).reshape(-1, 3).astype(np.int32)
    target = np.asarray(COLOURS[scene_spec(seed).shapes[0].colour]) * scene_spec(seed).brightness
    assert (np.abs(img - target).max(axis=1) <= 2).sum() > 100


def test_train_and_held_out_seeds_are_disjoint() -> None:
    train = train_seeds(np.random.default_rng(0), 5000)
    held = held_out_seeds(100)
    assert len(set(train)) == 5000 and max(train) < HELD_OUT_SEED_BASE <= min(held)


# ----------------------------------------------------------------------------------------------
# Codebook
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fitted(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, float]]:
    """A copy of the tiny checkpoint with a small codebook fit (read-only: copy before modifying)."""
    dst = tmp_path_factory.mktemp("fitted") / "tiny"
    shutil.copytree(tiny_ckpt, dst)
    report = fit_codebook(dst, seed=0, codes=SMALL_CODES, images=160, iterations=10, eval_images=40,
                          progress=_quiet)
    return dst, report


def test_fit_codebook_makes_ids_name_content(fitted: tuple[Path, dict[str, float]]) -> None:
    _, r = fitted
    assert r["after_codes_used"] >= 0.6 * SMALL_CODES  # held-out scenes use most of the fitted codes ...
    assert r["after_perplexity"] > 0.3 * SMALL_CODES
    assert r["after_dead_code_share"] == 0.0 and r["train_dead_code_share"] == 0.0  # ... and never the rest
    assert r["after_dead_code_min_lead"] > 0.1
    assert r["after_mean_cosine"] > r["before_mean_cosine"] + 0.15
    # features sit farther from the boundary of their cell: a larger error is needed to flip an id
    assert r["after_mean_boundary_distance"] > 1.3 * r["before_mean_boundary_distance"]
    assert r["after_bf16_agreement"] >= r["before_bf16_agreement"] - 0.002


def test_fit_codebook_changes_only_the_codebook(tiny_ckpt: Path, fitted: tuple[Path, dict[str, float]]) -> None:
    root, _ = fitted
    assert _layout(root) == _layout(tiny_ckpt)
    CheckpointFolder(root).check(["vision", "sigvq", "decoder", "vae"])
    old, new = CheckpointFolder(tiny_ckpt).vision, CheckpointFolder(root).vision
    changed = [k for k in old if not torch.equal(old.get(k), new.get(k))]
    assert changed == [CODEBOOK_KEY]
    tokenizer = load_vision_tokenizer(root)
    ids = scene_tokens(tokenizer, CheckpointFolder(root).config.preprocessor, HELD_OUT_SEED_BASE + 5)
    assert ids.shape == (16,) and ids.max() < SMALL_CODES


def test_fit_codebook_is_deterministic(tiny_ckpt: Path, fitted: tuple[Path, dict[str, float]],
                                       tmp_path: Path) -> None:
    again = tmp_path / "tiny"
    shutil.copytree(tiny_ckpt, again)
    fit_codebook(again, seed=0, codes=SMALL_CODES, images=160, iterations=10, eval_images=40, progress=_quiet)
    name = "image_tokenizer/model.safetensors"
    assert (again / name).read_bytes() == (fitted[0] / name).read_bytes()


# ----------------------------------------------------------------------------------------------
# Decoder
# ----------------------------------------------------------------------------------------------


def test_train_decoder_improves_held_out_figures(tiny_ckpt: Path, fitted: tuple[Path, dict[str, float]],
                                                 tmp_path: Path) -> None:
    root = tmp_path / "tiny"
    shutil.copytree(fitted[0], root)
    lines: list[str] = []
    r = train_decoder(root, seed=0, vae_steps=40, dit_steps=40, scenes=48, vae_batch=4, dit_batch=8,
                      eval_scenes=4, decode_scenes=1, progress=lines.append, every=20)
    assert any("vae step 40/40" in line for line in lines) and any("dit step 40/40" in line for line in lines)
    assert r["after_vae_psnr"] > r["before_vae_psnr"] + 1.0
    # the DiT's own progress: the same held-out latents, ids, t and noise, untrained vs trained
    assert r["after_velocity_mse"] < 0.8 * r["after_untrained_dit_velocity_mse"]
    assert r["after_velocity_mse"] < r["after_velocity_target_ms"]  # better than predicting zero
    assert np.isfinite(r["after_decode_psnr"]) and r["after_decode_psnr"] > 0
    for key in ("eval_before_s", "data_s", "vae_s", "dit_s", "eval_after_s"):
        assert r[key] >= 0

    # same layout, every file loadable, one DiT in both decoder folders, the codebook untouched
    assert _layout(root) == _layout(tiny_ckpt)
    ckpt = CheckpointFolder(root)
    ckpt.check(["vision", "sigvq", "decoder", "vae"])
    load_vae(ckpt), load_dit(ckpt, "normal"), load_sigvq(ckpt)
    assert (root / "decoder/model.safetensors").read_bytes() == (root / "decoder-turbo/model.safetensors").read_bytes()
    assert (root / "image_tokenizer/model.safetensors").read_bytes() == \
        (fitted[0] / "image_tokenizer/model.safetensors").read_bytes()
    for name in ("vae/diffusion_pytorch_model.safetensors", "decoder/model.safetensors", SIGVQ):
        assert (root / name).read_bytes() != (fitted[0] / name).read_bytes()


def test_train_decoder_is_deterministic(fitted: tuple[Path, dict[str, float]], tmp_path: Path) -> None:
    outputs = []
    for name in ("a", "b"):
        root = tmp_path / name
        shutil.copytree(fitted[0], root)
        train_decoder(root, seed=3, vae_steps=3, dit_steps=3, scenes=8, vae_batch=2, dit_batch=4, eval_scenes=2,
                      decode_scenes=1, progress=_quiet)
        outputs.append([(root / f).read_bytes() for f in (*SAFETENSORS, SIGVQ)])
    assert outputs[0] == outputs[1]
