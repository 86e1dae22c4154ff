"""``synth --preset tiny-trained``: the tiny preset trained here (:func:`train_tiny`) and its fingerprint.

Order of work (each step reads what the previous one wrote into the folder):

1. ``synthesize(tiny)``: the random checkpoint in the upstream layout (same seed);
2. the image tokenizer's codebook fitted to scene features (:func:`image.fit_codebook`);
3. the backbone trained on text and on the scenes as the fitted tokenizer sees them
   (:func:`backbone.train_backbone`);
4. the VAE, SigVQ and DiT trained to reconstruct scenes from their tokens (:func:`image.train_decoder`);
5. ``training_report.json`` (quality before/after, seconds per stage) written next to the weights;
   upstream loaders ignore it.

The result is cached under ``<cache>/tiny-trained-<fingerprint>`` (:mod:`~llada_edge.training.cache`, which
also finds the patch committed under ``artifacts/``): the fingerprint covers the seed, the training settings, the
corpus text, the source of the code that decides the values (this package, the model, the synthetic writer) and
the torch version, so tests and CI train once and a change of any input trains again. Every random draw is
seeded. The image side gives byte-identical weights run to run on one machine; the backbone does not (two
trainings of one fingerprint here gave different bytes, and report figures within 0.003 of each other; parallel
accumulation in the backward of the embedding gather and of the MoE's index_add is the likely cause,
``torch.use_deterministic_algorithms`` the likely fix). The accuracy
thresholds leave 0.02-0.05 of margin for that and for other CPUs.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from llada_edge.config import ModelConfig
from llada_edge.model.loading import load_vision_tokenizer
from llada_edge.runtime.images import smart_resize, to_pixels
from llada_edge.training import corpus, scenes
from llada_edge.training.backbone import BackboneTraining, train_backbone
from llada_edge.training.sequences import SceneTokens, window_to_raster

Progress = Callable[[str], None]

# Bump when the training code changes what it produces (the fingerprint then names a new cache entry).
TRAINING_VERSION = 1
REPORT_NAME = "training_report.json"
TRAIN_SCENES = {"understand": 1200, "t2i": 1600}
HELD_OUT_SCENES = 48
T2I_GRIDS = ((2, 2), (4, 4), (4, 6), (6, 4), (6, 6), (8, 8))  # token grids (16 px per token at tokenizer input)
UNDERSTAND_SIDES = ((128, 128), (128, 192), (192, 128), (160, 160))  # image sizes, >= smart_resize's minimum


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# Modules of this package that only store or find a trained checkpoint; they decide no value, so editing them
# must not name a new cache entry (and make every clone train again).
PLUMBING = frozenset({"cache.py", "patch.py"})


def _code_digest() -> str:
    """sha256 of the code that decides the trained values: this package (less :data:`PLUMBING`), the model and
    the synthetic writer."""
    root = Path(__file__).resolve().parent.parent
    training = [p for p in root.joinpath("training").glob("*.py") if p.name not in PLUMBING]
    files = sorted([*training, *root.joinpath("model").glob("*.py"), root / "synthetic.py", root / "layout.py"])
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def fingerprint(seed: int, settings: BackboneTraining) -> str:
    """What the trained values depend on: seed, settings, the corpus text, the code and the torch version."""
    payload = {"version": TRAINING_VERSION, "seed": seed, "backbone": asdict(settings),
               "corpus": corpus.corpus_fingerprint(), "code": _code_digest(), "torch": torch.__version__}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# Scenes as tokens
# ----------------------------------------------------------------------------------------------


def scene_tokens(ckpt_dir: Path, seeds: Sequence[int], task: str) -> list[SceneTokens]:
    """Tokenize captioned scenes the way each pipeline does.

    understanding: the image goes through ``smart_resize`` and the checkpoint's token order (window
    for merge_size 2), like ``Pipeline.understand``. text-to-image: the scene is rendered at 16 px per
    token of a grid from :data:`T2I_GRIDS`, tokenized, and put in raster order, the order the decoder reads
    (:func:`~llada_edge.training.sequences.window_to_raster`).
    """
    cfg = ModelConfig.from_folder(ckpt_dir)
    tokenizer = load_vision_tokenizer(ckpt_dir, torch.float32)
    mean, std = cfg.preprocessor.image_mean, cfg.preprocessor.image_std
    out = []
    with torch.no_grad():
        for i, seed in enumerate(seeds):
            if task == "understand":
                h, w = UNDERSTAND_SIDES[i % len(UNDERSTAND_SIDES)]
                pixels_img, caption = scenes.scene(seed, h, w)
                img = smart_resize(Image.fromarray(pixels_img))
            else:
                gh, gw = T2I_GRIDS[i % len(T2I_GRIDS)]
                pixels_img, caption = scenes.scene(seed, 16 * gh, 16 * gw)
                img = Image.fromarray(pixels_img)
            pixels = to_pixels(img, mean, std)
            gh, gw = pixels.shape[2] // 16, pixels.shape[3] // 16
            ids = tokenizer(torch.from_numpy(pixels)).numpy()
            if task == "t2i" and tokenizer.order == "window":
                ids = window_to_raster(ids, gh, gw)
            out.append(SceneTokens(caption, ids.tolist(), gh, gw))
    return out


def _training_scene_seeds(seed: int) -> dict[str, list[int]]:
    rng = np.random.default_rng([seed, 7])
    total = sum(TRAIN_SCENES.values())
    pool = scenes.train_seeds(rng, total)
    first = TRAIN_SCENES["understand"]
    return {"understand": pool[:first], "t2i": pool[first:]}


# ----------------------------------------------------------------------------------------------
# The whole job
# ----------------------------------------------------------------------------------------------


def train_tiny(out: Path, seed: int = 0, settings: BackboneTraining | None = None,
               progress: Progress = _stderr) -> dict[str, Any]:
    """Write the tiny preset to ``out`` (a new or empty folder) and train it there; returns the training report."""
    from llada_edge.synthetic import synthesize
    from llada_edge.training import image

    settings = settings or BackboneTraining()
    torch.manual_seed(seed)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    synthesize(out, "tiny", seed=seed, force=True, progress=lambda _m: None)  # into an empty folder
    seconds["synth"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    progress("tiny-trained: fitting the image tokenizer's codebook ...")
    codebook = image.fit_codebook(out, seed=seed, progress=progress)
    seconds["codebook"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    progress("tiny-trained: tokenizing scenes ...")
    seeds = _training_scene_seeds(seed)
    held = scenes.held_out_seeds(2 * HELD_OUT_SCENES)
    tokens = {task: scene_tokens(out, seeds[task], task) for task in seeds}
    held_tokens = {"understand": scene_tokens(out, held[:HELD_OUT_SCENES], "understand"),
                   "t2i": scene_tokens(out, held[HELD_OUT_SCENES:], "t2i")}
    seconds["scene_tokens"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    progress(f"tiny-trained: training the backbone ({settings.steps} steps) ...")
    backbone = train_backbone(out, tokens["understand"], tokens["t2i"], held_tokens, settings, seed, progress)
    seconds["backbone"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    progress("tiny-trained: training the VAE, SigVQ and DiT ...")
    decoder = image.train_decoder(out, seed=seed, progress=progress)
    seconds["decoder"] = time.perf_counter() - t0
    return {"seed": seed, "seconds": seconds, "total_seconds": sum(seconds.values()), "codebook": codebook,
            "backbone": backbone, "decoder": decoder}
