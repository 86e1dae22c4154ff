"""ODE samplers against closed-form solutions, CFG norm clamp, and decoding on the tiny checkpoint."""

from __future__ import annotations

import numpy as np
import pytest

from llada_edge.errors import InputError
from llada_edge.runtime.decode import (
    cfg_with_norm_clamp,
    decode_tokens,
    normal_timesteps,
    sample_euler,
    sample_turbo,
    turbo_timesteps,
    upsample_ids_2x,
)

RNG = np.random.default_rng(0)
Z = RNG.standard_normal((1, 4, 1, 3, 3))
DATA = RNG.standard_normal((1, 4, 1, 3, 3))


def straight_line_field(x: np.ndarray, t: float) -> np.ndarray:
    """The exact velocity that carries any point to DATA along the linear path: (d - x) / (1 - t)."""
    return (DATA - x) / (1.0 - t)


@pytest.mark.parametrize("steps", [1, 2, 8])
def test_turbo_lands_on_the_data_for_the_exact_field(steps: int) -> None:
    noise_calls = []

    def noise(i: int) -> np.ndarray:
        noise_calls.append(i)
        return RNG.standard_normal(Z.shape)

    out = sample_turbo(straight_line_field, Z, steps, noise)
    np.testing.assert_allclose(out, DATA, rtol=1e-12, atol=1e-12)
    assert noise_calls == list(range(steps - 1))  # fresh noise every step but the last


def test_turbo_without_noise_is_euler_on_the_uniform_grid() -> None:
    """With stochastic ratio 0: x' = t' (x + (1-t) v) + (1-t') (x - t v) = x + (t' - t) v."""
    def field(x: np.ndarray, t: float) -> np.ndarray:
        return -0.7 * x + np.sin(3 * t)

    turbo = sample_turbo(field, Z, 6, lambda _i: np.zeros_like(Z), stochastic_ratio=0.0)
    euler = sample_euler(field, Z.astype(np.float32), turbo_timesteps(6))
    np.testing.assert_allclose(turbo, euler, rtol=1e-5, atol=1e-6)


def test_euler_closed_forms() -> None:
    grid = normal_timesteps(50)
    # exact on the straight-line field (the evaluation never reaches t = 1)
    np.testing.assert_allclose(sample_euler(straight_line_field, Z, grid), DATA, rtol=1e-5, atol=1e-5)
    # linear field v = -lam x: Euler gives prod(1 - lam dt_k) z
    lam = 0.9
    factor = np.prod(1.0 - lam * np.diff(grid))
    np.testing.assert_allclose(sample_euler(lambda x, t: -lam * x, Z, grid), factor * Z, rtol=1e-5, atol=1e-6)


def test_normal_grid_is_shifted() -> None:
    grid = normal_timesteps(50)
    assert grid[0] == 0.0 and grid[-1] == 1.0 and len(grid) == 50 and (np.diff(grid) > 0).all()
    mid = normal_timesteps(3)[1]  # t = 0.5 -> 0.5 / (0.5 + 6 - 3) = 1/7
    assert mid == pytest.approx(1 / 7)


def test_cfg_norm_clamp() -> None:
    p = np.ones((2, 3, 4), np.float32)
    n = np.zeros((2, 3, 4), np.float32)
    n[1] = 2.0  # item 1: pred = 2p - n = 0, smaller than p: kept
    out = cfg_with_norm_clamp(p, n, 1.0)
    np.testing.assert_allclose(out[0], p[0])  # item 0: pred = 2p, norm clamped back to |p|
    np.testing.assert_allclose(out[1], 0.0)
    q = np.random.default_rng(1).standard_normal((1, 8)).astype(np.float32)
    m = np.random.default_rng(2).standard_normal((1, 8)).astype(np.float32)
    pred = q + 1.0 * (q - m)
    want = pred * min(1.0, np.linalg.norm(q) / np.linalg.norm(pred))
    np.testing.assert_allclose(cfg_with_norm_clamp(q, m, 1.0), want, rtol=1e-5)


def test_upsample_is_nearest_2x_in_raster_order() -> None:
    ids = np.arange(12)
    up = upsample_ids_2x(ids, 3, 4).reshape(6, 8)
    rows, cols = np.mgrid[0:6, 0:8]
    assert (up == (rows // 2) * 4 + cols // 2).all()  # output (r, c) takes input (r // 2, c // 2)


def test_decode_tokens_on_the_tiny_checkpoint(tiny_ckpt) -> None:
    from llada_edge.runtime.backends import create_backend

    backend = create_backend("torch", str(tiny_ckpt))
    ids = np.arange(6) * 1000
    turbo = decode_tokens(backend, ids, 2, 3, "turbo", seed=1)
    assert turbo.image.shape == (1, 3, 64, 96) and turbo.dit_evaluations == 8
    assert turbo.image.min() >= 0.0 and turbo.image.max() <= 1.0
    assert set(turbo.timings) == {"sigvq", "dit", "vae"}
    again = decode_tokens(backend, ids, 2, 3, "turbo", seed=1)
    assert np.array_equal(turbo.image, again.image)  # seeded noise: reproducible
    normal = decode_tokens(backend, ids, 2, 3, "normal", steps=5, seed=1)
    assert normal.dit_evaluations == 4 and normal.image.shape == (1, 3, 64, 96)
    with pytest.raises(InputError, match="6 VQ ids"):
        decode_tokens(backend, np.array([1, 2, 99999]), 2, 3)
    with pytest.raises(InputError, match="unknown decode mode"):
        decode_tokens(backend, ids, 2, 3, "fast")
