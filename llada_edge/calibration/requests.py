"""The shipped request sets (``calibration_set.json``): the calibration requests that PTQ captures
activations from, and a disjoint held-out set the accuracy report measures on. Their images are
procedural test cards drawn from seeds, so nothing binary ships. Numpy only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CALIBRATION_SET = Path(__file__).resolve().with_name("calibration_set.json")
# How densely the calibration requests are sampled: every DEFAULT_STRIDE-th denoising step is captured, and a
# reservoir keeps DEFAULT_MAX_SAMPLES per component.
DEFAULT_STRIDE = 2
DEFAULT_MAX_SAMPLES = 64


@dataclass(frozen=True)
class RequestSet:
    t2i: list[str]  # prompts
    understand: list[str]  # questions about the test cards
    chat: list[str]  # user messages
    edit: list[str]  # instructions
    image_seeds: list[int]  # test cards (:func:`procedural_image`)


def load_request_set(which: str) -> RequestSet:
    """``"calibration"`` or ``"evaluation"`` (held out: never used for calibration)."""
    data = json.loads(CALIBRATION_SET.read_text(encoding="utf-8"))[which]
    return RequestSet(**data)


def procedural_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A deterministic RGB test card (gradients + a disc), uint8 [H, W, 3]."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    cy, cx, r = height * rng.uniform(0.3, 0.7), width * rng.uniform(0.3, 0.7), min(height, width) / 4
    disc = ((y - cy) ** 2 + (x - cx) ** 2 < r * r).astype(np.float32)
    img = np.stack([x / width, y / height, disc], axis=-1) * 255.0
    return np.asarray(img.clip(0, 255).astype(np.uint8))
