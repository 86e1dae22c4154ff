"""Procedural captioned scenes: the image data the tiny checkpoint's image side is trained on (numpy only).

A scene is one or two flat-coloured shapes on a plain, gradient or striped background, and an English
caption that names exactly what was drawn ("a large red disc at the top left and a small blue ring at
the center, on a white background"). The caption is a function of the scene's parameters and the
parameters are a function of the seed, so a model can learn caption -> image tokens; the few things a
caption leaves out (a position jitter of a few percent, a slight brightness change) are small next to
what it names.

Scenes are described in relative coordinates, so ``scene(seed, h, w)`` at any size draws the same
content: the decoder's conditioning tokens come from a half-size render of the scene it reconstructs.
Shapes are drawn with 4x4 supersampling, so small renders (64x64) are not aliased.

Seeds below :data:`HELD_OUT_SEED_BASE` are for training; seeds from it upwards are held out (every
evaluation in :mod:`llada_edge.training` draws its scenes there, and no training loop does).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

HELD_OUT_SEED_BASE = 1_000_000  # seeds >= this are held out: never drawn for training

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 30),
    "yellow": (240, 220, 50),
    "green": (50, 170, 70),
    "blue": (40, 80, 220),
    "purple": (140, 60, 180),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("disc", "square", "triangle", "ring", "cross", "diamond")
# Cell centres of a 3 x 3 layout, (row, column) in [0, 1]: name -> (y, x).
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.2, 0.2), "top": (0.2, 0.5), "top right": (0.2, 0.8),
    "left": (0.5, 0.2), "center": (0.5, 0.5), "right": (0.5, 0.8),
    "bottom left": (0.8, 0.2), "bottom": (0.8, 0.5), "bottom right": (0.8, 0.8),
}
SIZES = {"small": 0.11, "large": 0.17}  # half-extent as a fraction of the shorter side
BACKGROUNDS = ("plain", "gradient", "stripes")
SUPERSAMPLE = 4
JITTER = 0.03  # position jitter (fraction of the side) the caption does not name


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    size: str
    position: str
    dy: float  # jitter, fraction of the height
    dx: float  # jitter, fraction of the width

    def phrase(self) -> str:
        where = "the center" if self.position == "center" else f"the {self.position}"
        return f"a {self.size} {self.colour} {self.kind} at {where}"


@dataclass(frozen=True)
class SceneSpec:
    """Everything that determines a scene's pixels (at any resolution)."""

    background: str  # one of BACKGROUNDS
    colours: tuple[str, str]  # background colour(s): the second is used by gradient and stripes only
    shapes: tuple[Shape, ...]
    brightness: float  # a global gain close to 1, left out of the caption

    def caption(self) -> str:
        objects = " and ".join(s.phrase() for s in self.shapes)
        first, second = self.colours
        if self.background == "plain":
            return f"{objects}, on a {first} background"
        if self.background == "gradient":
            return f"{objects}, on a background fading from {first} at the top to {second} at the bottom"
        return f"{objects}, on {first} and {second} stripes"


def scene_spec(seed: int) -> SceneSpec:
    """The scene drawn for ``seed`` (deterministic: numpy's PCG64 seeded with it)."""
    rng = np.random.default_rng(seed)
    names = list(COLOURS)
    background = BACKGROUNDS[int(rng.choice(len(BACKGROUNDS), p=[0.5, 0.25, 0.25]))]
    picks = rng.choice(len(names), size=2, replace=False)
    colours = (names[int(picks[0])], names[int(picks[1])])
    used = {colours[0]} if background == "plain" else set(colours)
    n_shapes = 1 if rng.random() < 0.5 else 2
    positions = rng.choice(len(POSITIONS), size=n_shapes, replace=False)
    shapes = []
    for pos in positions:
        free = [c for c in names if c not in used]  # an object never has a background colour
        colour = free[int(rng.integers(len(free)))]
        used.add(colour)
        shapes.append(Shape(kind=SHAPES[int(rng.integers(len(SHAPES)))], colour=colour,
                            size="small" if rng.random() < 0.5 else "large",
                            position=list(POSITIONS)[int(pos)],
                            dy=float(rng.uniform(-JITTER, JITTER)), dx=float(rng.uniform(-JITTER, JITTER))))
    return SceneSpec(background, colours, tuple(shapes), float(rng.uniform(0.92, 1.05)))


def _shape_mask(shape: Shape, y: np.ndarray, x: np.ndarray, height: int, width: int) -> np.ndarray:
    """Boolean coverage of one shape on sample points (y, x) in pixels."""
    side = min(height, width)
    cy0, cx0 = POSITIONS[shape.position]
    cy, cx = (cy0 + shape.dy) * height, (cx0 + shape.dx) * width
    r = SIZES[shape.size] * side
    u, v = (x - cx) / r, (y - cy) / r  # unit half-extent coordinates
    if shape.kind == "disc":
        return np.asarray(u * u + v * v <= 1.0)
    if shape.kind == "square":
        return np.asarray((np.abs(u) <= 0.85) & (np.abs(v) <= 0.85))
    if shape.kind == "ring":
        d = u * u + v * v
        return np.asarray((d <= 1.0) & (d >= 0.45))
    if shape.kind == "cross":
        return np.asarray(((np.abs(u) <= 1.0) & (np.abs(v) <= 0.3)) | ((np.abs(v) <= 1.0) & (np.abs(u) <= 0.3)))
    if shape.kind == "diamond":
        return np.asarray(np.abs(u) + np.abs(v) <= 1.0)
    # triangle, apex up at v = -1 (image rows grow downwards), base at v = 0.8 with half-width 1
    return np.asarray((v <= 0.8) & (np.abs(u) <= (v + 1.0) / 1.8))


def _background(spec: SceneSpec, y: np.ndarray, x: np.ndarray, height: int) -> np.ndarray:
    a = np.asarray(COLOURS[spec.colours[0]], np.float32)
    b = np.asarray(COLOURS[spec.colours[1]], np.float32)
    if spec.background == "plain":
        return np.broadcast_to(a, (*y.shape, 3)).copy()
    if spec.background == "gradient":
        f = (y / height)[..., None].astype(np.float32)
        return a * (1.0 - f) + b * f
    band = (np.floor(y / height * 8.0) % 2 == 1)[..., None]  # 8 horizontal bands
    return np.where(band, b, a).astype(np.float32)


def render(spec: SceneSpec, height: int, width: int) -> np.ndarray:
    """uint8 [H, W, 3]: the scene at this size (supersampled, then box-filtered)."""
    if height <= 0 or width <= 0:
        raise ValueError(f"scene size must be positive, got {height}x{width}")
    s = SUPERSAMPLE
    ys = (np.arange(height * s, dtype=np.float32) + 0.5) / s
    xs = (np.arange(width * s, dtype=np.float32) + 0.5) / s
    y, x = np.meshgrid(ys, xs, indexing="ij")
    img = _background(spec, y, x, height)
    for shape in spec.shapes:
        mask = _shape_mask(shape, y, x, height, width)
        img[mask] = np.asarray(COLOURS[shape.colour], np.float32)
    img = img.reshape(height, s, width, s, 3).mean(axis=(1, 3)) * spec.brightness
    return np.asarray(np.clip(np.rint(img), 0, 255).astype(np.uint8))


def scene(seed: int, height: int, width: int) -> tuple[np.ndarray, str]:
    """A procedural scene and its caption: (uint8 RGB [H, W, 3], English text)."""
    spec = scene_spec(seed)
    return render(spec, height, width), spec.caption()


def scenes(seeds: Iterable[int], height: int, width: int) -> tuple[np.ndarray, list[str]]:
    """Several scenes at one size: (uint8 [N, H, W, 3], captions)."""
    images, captions = [], []
    for seed in seeds:
        img, text = scene(seed, height, width)
        images.append(img)
        captions.append(text)
    return np.stack(images) if images else np.zeros((0, height, width, 3), np.uint8), captions


def held_out_seeds(count: int, start: int = 0) -> list[int]:
    """``count`` held-out seeds (from :data:`HELD_OUT_SEED_BASE` + start)."""
    return [HELD_OUT_SEED_BASE + start + i for i in range(count)]


def train_seeds(rng: np.random.Generator, count: int) -> list[int]:
    """``count`` distinct training seeds (all below :data:`HELD_OUT_SEED_BASE`), drawn from ``rng``."""
    return [int(s) for s in rng.choice(HELD_OUT_SEED_BASE, size=count, replace=False)]
