"""Image decoding: VQ ids -> SigVQ features -> Z-Image ODE (turbo or normal) -> VAE (model-spec §6), numpy only.

The flow-matching path is linear: ``x_t = t * x1 + (1 - t) * x0`` with x0 noise (t = 0) and x1 data
(t = 1); the decoder predicts the velocity ``x1 - x0``.

* **turbo** (decoder-turbo/, default 8 steps, no CFG): on ``linspace(0, 1, n+1)`` estimate the data
  ``x1 = x + (1 - t) v`` and the noise ``x0 = x - t v``, then jump to ``t'`` with fresh noise:
  ``x = t' x1 + (1 - t') eps`` (stochastic ratio 1). The last step lands on x1.
* **normal** (decoder/, default 50 grid points): Euler on ``linspace(0, 1, n)`` shifted by
  ``t / (t + s - s t)`` with s = 6, CFG against all-zero conditioning with ``pred = p + w (p - n)``
  (w = 1 upstream) and the norm clamp ``pred *= min(1, |p| / |pred|)`` over the whole latent.

Noise comes from a seeded numpy generator (or the caller), so runs are reproducible; bit-identical
seeds with upstream (float64 torch draws) are not a goal.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from llada_edge.errors import InputError
from llada_edge.runtime.backend import Backend

Velocity = Callable[[np.ndarray, float], np.ndarray]
DECODE_MODES = {"turbo": 8, "normal": 50}  # mode -> default number of steps
MAX_DECODE_STEPS = 200  # decoder evaluations per image: a bound on the work one request can ask for
TIME_SHIFT = 6.0
NORMAL_CFG_SCALE = 1.0  # w of the normal decoder's CFG against all-zero conditioning (upstream's value)
RESOLUTION_MULTIPLIER = 2  # a gh x gw token grid decodes at (32 gh) x (32 gw) pixels


def turbo_timesteps(steps: int) -> np.ndarray:
    return np.linspace(0.0, 1.0, steps + 1)


def normal_timesteps(steps: int, shift: float = TIME_SHIFT) -> np.ndarray:
    t = np.linspace(0.0, 1.0, steps)
    return t / (t + shift - shift * t)


def sample_turbo(velocity: Velocity, z: np.ndarray, steps: int, noise: Callable[[int], np.ndarray],
                 stochastic_ratio: float = 1.0) -> np.ndarray:
    """Distilled few-step sampler (float64 state); ``noise(i)`` gives the fresh noise of step i.

    ``x = t' x1 + (1 - t') (sqrt(1 - r) x0 + sqrt(r) eps)``; upstream turbo uses r = 1.
    """
    x = z.astype(np.float64)
    ts = turbo_timesteps(steps)
    for i in range(steps):
        t, t_next = float(ts[i]), float(ts[i + 1])
        v = velocity(x, t).astype(np.float64)
        data, noise_est = x + (1.0 - t) * v, x - t * v
        if t_next >= 1.0:
            x = data
            continue
        mixed = np.sqrt(1.0 - stochastic_ratio) * noise_est
        if stochastic_ratio > 0:
            mixed = mixed + np.sqrt(stochastic_ratio) * noise(i)
        x = t_next * data + (1.0 - t_next) * mixed
    return x


def sample_euler(velocity: Velocity, z: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Explicit Euler over a time grid: ``x += (t_{k+1} - t_k) v(x, t_k)`` (len(grid) - 1 evaluations)."""
    x = z.astype(np.float32)
    for t, t_next in itertools.pairwise(grid):
        x = x + np.float32(t_next - t) * velocity(x, float(t)).astype(np.float32)
    return x


def cfg_with_norm_clamp(cond: np.ndarray, uncond: np.ndarray, scale: float) -> np.ndarray:
    """``pred = p + scale (p - n)``, then scaled down to ``|p|`` if larger (global L2 per batch item)."""
    pred = cond + scale * (cond - uncond)
    axes = tuple(range(1, cond.ndim))
    norm_p = np.sqrt((cond.astype(np.float64) ** 2).sum(axis=axes, keepdims=True))
    norm_pred = np.sqrt((pred.astype(np.float64) ** 2).sum(axis=axes, keepdims=True))
    factor = np.where(norm_pred > norm_p, norm_p / np.maximum(norm_pred, 1e-30), 1.0)
    return (pred * factor).astype(cond.dtype)


def upsample_ids_2x(ids: np.ndarray, gh: int, gw: int) -> np.ndarray:
    """Raster grid ids [gh*gw] -> nearest 2x upsampled raster ids [4*gh*gw] (always 2x, §6.1)."""
    return np.asarray(ids).reshape(gh, gw).repeat(2, axis=0).repeat(2, axis=1).reshape(-1)


@dataclass
class DecodeResult:
    image: np.ndarray  # [1, 3, H, W] in [0, 1]
    latent: np.ndarray
    timings: dict[str, float] = field(default_factory=dict)
    dit_evaluations: int = 0


def decode_tokens(backend: Backend, vq_ids: np.ndarray, gh: int, gw: int, mode: str = "turbo",
                  steps: int | None = None, seed: int = 0,
                  progress: Callable[[int, int], None] | None = None) -> DecodeResult:
    """Decode a gh x gw grid of un-offset VQ ids into an image of (32 gh) x (32 gw) pixels."""
    if mode not in DECODE_MODES:
        raise InputError(f"unknown decode mode {mode!r} (expected one of {sorted(DECODE_MODES)})")
    steps = DECODE_MODES[mode] if steps is None else steps
    if not (1 if mode == "turbo" else 2) <= steps <= MAX_DECODE_STEPS:
        raise InputError(f"{mode} decoding takes {1 if mode == 'turbo' else 2}..{MAX_DECODE_STEPS} steps, got {steps}")
    vq_ids = np.asarray(vq_ids, dtype=np.int64)
    n_codes = backend.config.vision.num_embeddings
    if vq_ids.shape != (gh * gw,) or vq_ids.min(initial=0) < 0 or vq_ids.max(initial=0) >= n_codes:
        raise InputError(f"expected {gh * gw} VQ ids in [0, {n_codes}) for a {gh}x{gw} grid, got shape "
                         f"{list(vq_ids.shape)}")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    cap = backend.sigvq(upsample_ids_2x(vq_ids, gh, gw))[None].astype(np.float32)
    timings["sigvq"] = time.perf_counter() - t0

    factor = backend.config.vae.downsample_factor
    height, width = gh * 16 * RESOLUTION_MULTIPLIER, gw * 16 * RESOLUTION_MULTIPLIER
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((1, backend.config.vae.latent_channels, 1, height // factor, width // factor))
    evals = 0

    def count(total: int) -> None:
        nonlocal evals
        evals += 1
        if progress:
            progress(evals, total)

    t0 = time.perf_counter()
    if mode == "turbo":
        def velocity(x: np.ndarray, t: float) -> np.ndarray:
            count(steps)
            return backend.dit("turbo", x.astype(np.float32), np.array([t], np.float32), cap)

        x = sample_turbo(velocity, z, steps, lambda _i: rng.standard_normal(z.shape))
    else:
        zeros = np.zeros_like(cap)
        both_caps = np.concatenate([cap, zeros])

        def velocity(x: np.ndarray, t: float) -> np.ndarray:
            count(steps - 1)
            v = backend.dit("normal", np.concatenate([x, x]).astype(np.float32), np.full(2, t, np.float32),
                            both_caps)
            return cfg_with_norm_clamp(v[:1], v[1:], NORMAL_CFG_SCALE)

        x = sample_euler(velocity, z, normal_timesteps(steps))
    timings["dit"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    latent = x[:, :, 0].astype(np.float32)
    image = backend.vae_decode(latent)
    timings["vae"] = time.perf_counter() - t0
    return DecodeResult(image=image, latent=latent, timings=timings, dit_evaluations=evals)
