"""Training the tiny checkpoint's image side on procedural scenes (:mod:`llada_edge.training.scenes`).

Two steps, in this order, each writing its tensors back into the checkpoint folder in place (same keys,
shapes and BF16 dtypes; see :mod:`llada_edge.training.weights`):

1. :func:`fit_codebook`: the image tokenizer's ViT stays random (a fixed feature extractor), but its VQ
   codebook is refitted by spherical k-means on the ViT features of training scenes, so that ids name
   image content (a code's mean patch colour predicts held-out patches with R^2 ~0.95) and the few
   hundred ids in use are ones a language model can learn. The random 16384-entry codebook matches a
   feature at cosine ~0.64 and scatters similar patches over thousands of ids.
2. :func:`train_decoder`: the VAE learns to reconstruct scenes, then SigVQ and the Z-Image DiT learn,
   by flow matching, to turn the ids of a scene back into its latent, so decoded images follow the
   ids (at the default budget: the scene's colours more than its layout, see :func:`train_decoder`).

Both run in fp32 on the CPU with a fixed number of steps (not a time budget), with every random draw
seeded, and ``threads`` torch threads (default 1: on a 2-core machine a second thread buys ~1.4x when
the machine is idle, and costs 10-30x when another process holds a core). Same seed, same threads,
same machine -> identical weights.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from llada_edge.checkpoint import CheckpointFolder
from llada_edge.config import PreprocessorConfig
from llada_edge.model import load_dit, load_sigvq, load_vae, load_vision_tokenizer
from llada_edge.model.dit import ZImageDiT
from llada_edge.model.sigvq import SigVQ
from llada_edge.model.vision import SigLipVQTokenizer
from llada_edge.runtime.decode import RESOLUTION_MULTIPLIER, decode_tokens, upsample_ids_2x
from llada_edge.runtime.images import smart_resize, to_pixels
from llada_edge.training.scenes import held_out_seeds, render, scene_spec, train_seeds
from llada_edge.training.sequences import window_to_raster
from llada_edge.training.weights import rewrite_safetensors, rewrite_torch_state

Progress = Callable[[str], None]
CODEBOOK_KEY = "model.vqmodel.quantize.embedding.weight"
# Tokenizer inputs the codebook is fitted on. Half-size renders at these sizes are what condition the decoder
# (a gh x gw grid decodes to 32gh x 32gw pixels from a 16gh x 16gw tokenizer input, so 64x64 -> 128x128);
# understanding inputs go through smart_resize (128^2 pixels and up) and are drawn separately.
DIRECT_SIZES = ((32, 32), (64, 64), (64, 96), (96, 64), (96, 96), (128, 128))
UNDERSTAND_SIDE = (112, 240)  # render sides before smart_resize (-> 128..256, multiples of 32)
DEAD_CODE_NOISE = 0.01
DEAD_DIRECTION_FEATURES = 50_000  # training features the dead direction is fitted on
TRAIN_CHECK_FEATURES = 20_000  # training features checked for dead-code wins (all held-out ones are)
HELD_OUT_SIZES_SEED = 12345  # the held-out set draws its sizes from its own generator: the same set for every seed
DECODE_SIZE = 128  # the decoder is trained and evaluated on 128x128 scenes (a 4x4 id grid)
# Peak learning rates (linear warm-up over 5% of the steps, cosine decay to 10%), tuned on the tiny preset.
VAE_LR = 2e-3
VAE_KL = 1e-3  # weight of the KL term (per latent element) against L1 + MSE (per pixel)
DIT_LR = 3e-3
DIT_EMA = 0.995  # the written DiT/SigVQ are an exponential moving average of the trained weights
CFG_DROP = 0.1  # share of DiT training rows with all-zero conditioning


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@contextmanager
def _torch_threads(threads: int) -> Iterator[None]:
    """Run with ``threads`` intra-op threads (results depend on it), restoring the caller's setting."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# ----------------------------------------------------------------------------------------------
# Scenes -> tokenizer inputs and ids
# ----------------------------------------------------------------------------------------------


def scene_pixels(seed: int, height: int, width: int, pre: PreprocessorConfig, understand: bool = False) -> torch.Tensor:
    """Normalised tokenizer input [1, 3, H', W'] of scene ``seed``.

    ``understand``: render at height x width and pass it through :func:`smart_resize` (the understanding
    path); otherwise render at exactly height x width (multiples of 32, the decoder-conditioning path,
    which smart_resize would blow up to 128^2 pixels).
    """
    img = Image.fromarray(render(scene_spec(seed), height, width))
    if understand:
        img = smart_resize(img)
    return torch.from_numpy(to_pixels(img, pre.image_mean, pre.image_std))


@torch.no_grad()
def scene_tokens(tokenizer: SigLipVQTokenizer, pre: PreprocessorConfig, seed: int, height: int = DECODE_SIZE,
                 width: int = DECODE_SIZE) -> np.ndarray:
    """The un-offset VQ ids, raster order, of the (height/32) x (width/32) grid that decodes to scene ``seed``
    at height x width: the scene rendered at half size and tokenized (the targets of caption -> image)."""
    gh, gw = height // (16 * RESOLUTION_MULTIPLIER), width // (16 * RESOLUTION_MULTIPLIER)
    pixels = scene_pixels(seed, height // RESOLUTION_MULTIPLIER, width // RESOLUTION_MULTIPLIER, pre)
    ids = tokenizer(pixels).numpy().astype(np.int64)
    return window_to_raster(ids, gh, gw) if tokenizer.order == "window" else ids


# ----------------------------------------------------------------------------------------------
# Codebook
# ----------------------------------------------------------------------------------------------


def projected_features(tokenizer: SigLipVQTokenizer, pixels: torch.Tensor) -> torch.Tensor:
    """Unit vectors [N, E] that :meth:`SigLipVQTokenizer.quantize` compares with the codebook."""
    vq = tokenizer.model.vqmodel
    bias = vq.quant_conv.bias
    assert bias is not None  # built with a bias
    z = F.linear(tokenizer.features(pixels).float(), vq.quant_conv.weight.float().flatten(1), bias.float())
    return F.normalize(z, dim=-1)


def _codebook_inputs(rng: np.random.Generator, count: int, pre: PreprocessorConfig,
                     seeds: Sequence[int]) -> Iterator[torch.Tensor]:
    """Tokenizer inputs of ``seeds``: half of them at the decoder-conditioning sizes, half through smart_resize."""
    for i, seed in enumerate(seeds[:count]):
        if i % 2 == 0:
            h, w = DIRECT_SIZES[int(rng.integers(len(DIRECT_SIZES)))]
            yield scene_pixels(seed, h, w, pre)
        else:
            h, w = (int(v) for v in rng.integers(UNDERSTAND_SIDE[0], UNDERSTAND_SIDE[1] + 1, size=2))
            yield scene_pixels(seed, h, w, pre, understand=True)


@torch.no_grad()
def _features(tokenizer: SigLipVQTokenizer, inputs: Iterator[torch.Tensor]) -> torch.Tensor:
    return torch.cat([projected_features(tokenizer, px) for px in inputs])


def spherical_kmeans(x: torch.Tensor, k: int, iterations: int, gen: torch.Generator) -> torch.Tensor:
    """k unit centroids [k, D] for unit rows x [N, D] (cosine k-means, k-means++ seeding).

    An empty cluster is re-seeded at the point worst served by its centroid, so all k codes stay in use.
    """
    centroids = _kmeans_pp(x, k, gen)
    for _ in range(iterations):
        sims = x @ centroids.t()
        best, assign = sims.max(dim=1)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k)
        empty = (counts == 0).nonzero().flatten()
        if len(empty):
            worst = torch.argsort(best)[: len(empty)]
            sums[empty] = x[worst]
        centroids = F.normalize(sums, dim=-1)
    return centroids


def _kmeans_pp(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ on cosine distance: each next centroid drawn with probability ∝ (1 - best cosine)^2."""
    first = int(torch.randint(len(x), (1,), generator=gen))
    chosen = [first]
    best = x @ x[first]
    for _ in range(1, k):
        weight = (1.0 - best).clamp_min(0.0) ** 2
        if float(weight.sum()) <= 0.0:
            weight = torch.ones_like(weight)
        nxt = int(torch.multinomial(weight, 1, generator=gen))
        chosen.append(nxt)
        best = torch.maximum(best, x @ x[nxt])
    return x[chosen].clone()


def dead_direction(features: torch.Tensor, centroids: torch.Tensor, iterations: int = 300,
                   sharpness: float = 50.0, step: float = 0.05) -> torch.Tensor:
    """The unit direction d that maximises the smallest lead min_z (best centroid cosine of z - z.d).

    Starts opposite the mean feature and follows the gradient of a soft maximum (log-sum-exp) of
    ``z.d - best(z)`` on the sphere: the features that come closest to d push it away. Opposite the mean
    alone is not enough: the features cover more than a hemisphere, and with few codes some feature's best
    centroid is farther than the direction opposite the mean.
    """
    best = torch.cat([(chunk @ centroids.t()).max(dim=1).values for chunk in features.split(4096)])
    d = -F.normalize(features.mean(dim=0), dim=0)
    for _ in range(iterations):
        weights = torch.softmax(sharpness * (features @ d - best), dim=0)
        d = F.normalize(d - step * (weights @ features), dim=0)
    return d


def dead_codes(direction: torch.Tensor, count: int, gen: torch.Generator) -> torch.Tensor:
    """Rows for the codes the fit does not use: :func:`dead_direction` plus a little seeded noise.

    The noise (norm ~0.06, far above BF16's resolution) keeps the rows distinct, so no engine's
    argmax tie-breaking ever matters; :func:`codebook_stats` checks that no feature picks one.
    """
    noise = torch.randn(count, len(direction), generator=gen) * DEAD_CODE_NOISE
    return F.normalize(direction + noise, dim=-1)


def codebook_stats(features: torch.Tensor, codebook: torch.Tensor, codes: int | None = None) -> dict[str, float]:
    """How unit features [N, E] quantize against a codebook [K, E].

    ``codes_used`` and ``perplexity`` (exp of the entropy of id usage); ``mean_cosine`` to the chosen code;
    ``mean_margin``, best minus second-best cosine; ``mean_boundary_distance``, that margin divided by the
    distance between the two codes: how far the feature sits from the boundary between them, i.e. the size
    of the feature error that flips its id (a margin between two nearby codes is worth more than the same
    margin between two distant ones); ``small_margin_share``, ids with a margin under 0.01. With ``codes``,
    also the share of features whose id is one of the dead rows >= ``codes`` (must be 0) and the smallest
    lead of a feature's best cosine over its best dead-row cosine (positive: no dead row came close).
    """
    cb = F.normalize(codebook.float(), dim=-1)
    values, indices, dead = [], [], []
    for chunk in features.split(4096):
        sims = chunk @ cb.t()
        top = torch.topk(sims, 2, dim=1)
        values.append(top.values)
        indices.append(top.indices)
        if codes is not None and codes < len(cb):
            dead.append(sims[:, codes:].max(dim=1).values)
    top_v, top_i = torch.cat(values), torch.cat(indices)
    margin = top_v[:, 0] - top_v[:, 1]
    gap = (cb[top_i[:, 0]] - cb[top_i[:, 1]]).norm(dim=1).clamp_min(1e-12)
    counts = torch.bincount(top_i[:, 0], minlength=len(cb)).double()
    p = counts[counts > 0] / counts.sum()
    out = {
        "codes_used": float((counts > 0).sum()),
        "perplexity": float(torch.exp(-(p * p.log()).sum())),
        "mean_cosine": float(top_v[:, 0].mean()),
        "mean_margin": float(margin.mean()),
        "mean_boundary_distance": float((margin / gap).mean()),
        "small_margin_share": float((margin < 0.01).double().mean()),
    }
    if codes is not None:
        out["dead_code_share"] = float((top_i[:, 0] >= codes).double().mean())
        out["dead_code_min_lead"] = float((top_v[:, 0] - torch.cat(dead)).min()) if dead else 2.0
    return out


@torch.no_grad()
def bf16_agreement(ckpt_dir: Path, inputs: Sequence[torch.Tensor]) -> float:
    """Share of ids a BF16 copy of the tokenizer gives as the fp32 one does: the tokenizer-agreement figure
    of an accuracy report, for the mildest quantization there is."""
    ckpt = CheckpointFolder(ckpt_dir)
    ref, low = load_vision_tokenizer(ckpt, torch.float32), load_vision_tokenizer(ckpt, torch.bfloat16)
    same = [float((ref(px) == low(px)).double().mean()) for px in inputs]
    return float(np.mean(same))


def fit_codebook(ckpt_dir: Path, seed: int = 0, codes: int = 512, images: int = 1200, iterations: int = 25,
                 eval_images: int = 200, threads: int = 1, progress: Progress = _stderr) -> dict[str, float]:
    """Refit the image tokenizer's codebook: spherical k-means with ``codes`` centroids on ViT features.

    The features are exactly what :meth:`SigLipVQTokenizer.quantize` compares (quant_conv, then L2
    normalisation) of ``images`` training scenes, half at the sizes that condition the decoder, half
    through smart_resize; the centroids go into the first ``codes`` rows of
    ``model.vqmodel.quantize.embedding.weight`` and the other rows get :func:`dead_codes`. Only that tensor
    of ``image_tokenizer/model.safetensors`` changes (the ViT stays as it is). Returns
    :func:`codebook_stats` and :func:`bf16_agreement` on ``eval_images`` held-out scenes, ``before_*`` with
    the codebook found in the folder and ``after_*`` re-read from disk.
    """
    ckpt_dir = Path(ckpt_dir)
    with _torch_threads(threads):
        start = time.perf_counter()
        ckpt = CheckpointFolder(ckpt_dir)
        pre, cfg = ckpt.config.preprocessor, ckpt.config.vision
        if not 0 < codes <= cfg.num_embeddings:
            raise ValueError(f"codes must be in 1..{cfg.num_embeddings}, got {codes}")
        tokenizer = load_vision_tokenizer(ckpt, torch.float32)
        rng = np.random.default_rng(seed)
        gen = torch.Generator().manual_seed(seed)
        feats = _features(tokenizer, _codebook_inputs(rng, images, pre, train_seeds(rng, images)))
        held_rng = np.random.default_rng(HELD_OUT_SIZES_SEED)
        held_inputs = list(_codebook_inputs(held_rng, eval_images, pre, held_out_seeds(eval_images)))
        held = _features(tokenizer, iter(held_inputs))
        progress(f"codebook: {len(feats)} training features from {images} scenes, {len(held)} held-out "
                 f"({time.perf_counter() - start:.1f} s)")
        if len(feats) < codes:
            raise ValueError(f"{len(feats)} features cannot seed {codes} codes: raise images")
        before = codebook_stats(held, tokenizer.model.vqmodel.quantize.embedding.weight)
        before["bf16_agreement"] = bf16_agreement(ckpt_dir, held_inputs)
        t0 = time.perf_counter()
        centroids = spherical_kmeans(feats, codes, iterations, gen)
        kmeans_s = time.perf_counter() - t0
        progress(f"codebook: k-means, {codes} codes x {iterations} iterations ({kmeans_s:.1f} s)")
        direction = dead_direction(feats[:DEAD_DIRECTION_FEATURES], centroids)
        table = torch.cat([centroids, dead_codes(direction, cfg.num_embeddings - codes, gen)])
        rewrite_safetensors(ckpt_dir / "image_tokenizer" / "model.safetensors", {CODEBOOK_KEY: table})
        stored = load_vision_tokenizer(CheckpointFolder(ckpt_dir)).model.vqmodel.quantize.embedding.weight
        after = codebook_stats(held, stored, codes)
        after["bf16_agreement"] = bf16_agreement(ckpt_dir, held_inputs)
        train_dead = codebook_stats(feats[:TRAIN_CHECK_FEATURES], stored, codes)["dead_code_share"]
    report = {f"before_{k}": v for k, v in before.items()}
    report.update({f"after_{k}": v for k, v in after.items()})
    report.update(train_dead_code_share=train_dead, train_features=float(len(feats)),
                  held_out_features=float(len(held)), kmeans_s=kmeans_s, seconds=time.perf_counter() - start)
    progress("codebook: held-out " + ", ".join(f"{k} {before[k]:.4g} -> {after[k]:.4g}" for k in before))
    return report


# ----------------------------------------------------------------------------------------------
# Decoder: data
# ----------------------------------------------------------------------------------------------


@dataclass
class DecoderData:
    """A pool of 128x128 scenes: pixels in [-1, 1] and the upsampled raster ids that condition their decode."""

    seeds: list[int]
    pixels: torch.Tensor  # [N, 3, 128, 128]
    cap_ids: torch.Tensor  # [N, 4 * gh * gw] int64


def _pixels_pm1(seed: int, size: int) -> torch.Tensor:
    img = render(scene_spec(seed), size, size)
    return torch.from_numpy(img).permute(2, 0, 1).float() / 127.5 - 1.0


def decoder_data(tokenizer: SigLipVQTokenizer, pre: PreprocessorConfig, seeds: Sequence[int],
                 size: int = DECODE_SIZE) -> DecoderData:
    g = size // (16 * RESOLUTION_MULTIPLIER)
    pixels = torch.stack([_pixels_pm1(s, size) for s in seeds])
    ids = [upsample_ids_2x(scene_tokens(tokenizer, pre, s, size, size), g, g) for s in seeds]
    return DecoderData(list(seeds), pixels, torch.from_numpy(np.stack(ids)).long())


# ----------------------------------------------------------------------------------------------
# Decoder: models and losses
# ----------------------------------------------------------------------------------------------


def _autoencoder(ckpt: CheckpointFolder) -> Any:
    """The diffusers ``AutoencoderKL`` of the folder, fp32, trainable (typed Any: diffusers' annotations
    resolve to placeholders under a type checker, see :class:`llada_edge.model.vae.Autoencoder`)."""
    vae: Any = load_vae(ckpt, torch.float32).vae
    return vae.train().requires_grad_(True)


def _latent_norm(vae: Any) -> tuple[float, float]:
    """(shift, scale) with ``latent = (z - shift) * scale``: the inverse of :class:`VaeDecoder`'s mapping."""
    return float(vae.config.shift_factor), float(vae.config.scaling_factor)


def vae_loss(vae: Any, pixels: torch.Tensor, gen: torch.Generator, kl_weight: float) -> tuple[torch.Tensor, float]:
    """L1 + MSE reconstruction of a sampled latent, plus ``kl_weight`` x KL to the prior that the config implies.

    The prior is N(shift_factor, 1/scaling_factor^2) per latent element, i.e. the normalised latent
    (z - shift) * scale that the DiT models is pulled towards N(0, 1), the scale of its noise.
    """
    post = vae.encode(pixels).latent_dist
    shift, scale = _latent_norm(vae)
    z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
    recon = vae.decode(z).sample
    mu, var = (post.mean - shift) * scale, post.var * scale**2
    kl = 0.5 * (mu.pow(2) + var - 1.0 - var.clamp_min(1e-12).log()).mean()
    rec = (recon - pixels).abs().mean() + (recon - pixels).pow(2).mean()
    return rec + kl_weight * kl, float(rec.detach())


@torch.no_grad()
def encode_latents(vae: Any, pixels: torch.Tensor, batch: int = 32) -> torch.Tensor:
    """Normalised posterior-mean latents [N, C, 1, H/8, W/8]: the x1 the DiT learns to produce."""
    shift, scale = _latent_norm(vae)
    out = [(vae.encode(chunk).latent_dist.mean - shift) * scale for chunk in pixels.split(batch)]
    return torch.cat(out).unsqueeze(2)


def velocity_loss(dit: ZImageDiT, sigvq: SigVQ, x1: torch.Tensor, cap_ids: torch.Tensor, t: torch.Tensor,
                  x0: torch.Tensor, rope: tuple[torch.Tensor, ...], drop: torch.Tensor | None = None) -> torch.Tensor:
    """Flow-matching MSE: x_t = t x1 + (1 - t) x0, target velocity x1 - x0 (the convention of decode.py).

    ``drop`` [B] bool zeroes the conditioning of those rows: the normal decoder's CFG runs the DiT against
    all-zero conditioning, so the DiT learns what that means.
    """
    cap = sigvq(cap_ids)
    if drop is not None:
        cap = cap * (~drop).to(cap.dtype)[:, None, None]
    tt = t.view(-1, 1, 1, 1, 1)
    v = dit(tt * x1 + (1.0 - tt) * x0, t, cap, rope)
    return (v - (x1 - x0)).pow(2).mean()


def _lr(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    done = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.45 * (1.0 + math.cos(math.pi * done)))


def _set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


def _random_crops(pixels: torch.Tensor, size: int, rng: np.random.Generator) -> torch.Tensor:
    """One random size x size crop per image (the VAE trains on crops: the pixel scale of the 128x128 decode
    at a fraction of the work; convolutions do not care where a crop came from)."""
    n, _, h, w = pixels.shape
    ys = rng.integers(0, h - size + 1, n)
    xs = rng.integers(0, w - size + 1, n)
    return torch.stack([pixels[i, :, ys[i]:ys[i] + size, xs[i]:xs[i] + size] for i in range(n)])


# ----------------------------------------------------------------------------------------------
# Decoder: evaluation (always on what the folder stores)
# ----------------------------------------------------------------------------------------------

EVAL_TIMES = (0.0, 0.25, 0.5, 0.75)


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in [0, 1]."""
    mse = float((a.float() - b.float()).pow(2).mean())
    return 10.0 * math.log10(1.0 / max(mse, 1e-12))


@dataclass
class HeldOut:
    """The held-out scenes a decoder is evaluated on, with the ids of the tokenizer in the folder."""

    data: DecoderData
    decode_seeds: list[int]
    decode_ids: list[np.ndarray]


def held_out_set(ckpt: CheckpointFolder, scenes: int, decode_scenes: int) -> HeldOut:
    tokenizer, pre = load_vision_tokenizer(ckpt), ckpt.config.preprocessor
    decode_seeds = held_out_seeds(decode_scenes, start=20_000)
    return HeldOut(decoder_data(tokenizer, pre, held_out_seeds(scenes, start=10_000)), decode_seeds,
                   [scene_tokens(tokenizer, pre, s) for s in decode_seeds])


@torch.no_grad()
def held_out_velocity(dit: ZImageDiT, sigvq: SigVQ, x1: torch.Tensor, cap_ids: torch.Tensor) -> tuple[float, float]:
    """(flow-matching MSE, mean square of its target) at the fixed :data:`EVAL_TIMES` with fixed noise."""
    g = x1.shape[-1] // dit.cfg.patch_size
    rope = dit.rope_tables(g, g, cap_ids.shape[1])
    gen = torch.Generator().manual_seed(0)
    losses, target = [], []
    for t in EVAL_TIMES:
        x0 = torch.randn(x1.shape, generator=gen)
        losses.append(float(velocity_loss(dit, sigvq, x1, cap_ids, torch.full((len(x1),), t), x0, rope)))
        target.append(float((x1 - x0).pow(2).mean()))
    return float(np.mean(losses)), float(np.mean(target))


@torch.no_grad()
def evaluate_decoder(ckpt_dir: Path, held: HeldOut) -> dict[str, float]:
    """Held-out figures of the image decoder stored in ``ckpt_dir`` (re-read from disk: BF16 weights).

    * ``vae_psnr``: VAE reconstruction (posterior mean) of 128x128 scenes, dB;
    * ``velocity_mse``: flow-matching loss of the turbo DiT at fixed t and noise, on the latents of the
      folder's VAE; ``velocity_target_ms`` is the mean square of the target (the loss of predicting zero);
    * ``latent_std``: std of those normalised latents (the noise has 1);
    * ``decode_psnr``: a full 8-step turbo :func:`decode_tokens` (TorchBackend) of each scene's ids
      against the scene, dB.
    """
    from llada_edge.runtime.backends.torch_backend import TorchBackend

    ckpt = CheckpointFolder(ckpt_dir)
    data = held.data
    vae: Any = load_vae(ckpt).vae
    recon = torch.cat([vae.decode(vae.encode(x).latent_dist.mean).sample for x in data.pixels.split(16)])
    x1 = encode_latents(vae, data.pixels)
    mse, target = held_out_velocity(load_dit(ckpt, "turbo"), load_sigvq(ckpt), x1, data.cap_ids)
    backend = TorchBackend(ckpt_dir)
    decode = []
    g = DECODE_SIZE // 32
    for seed, ids in zip(held.decode_seeds, held.decode_ids, strict=True):
        image = decode_tokens(backend, ids, g, g, "turbo", seed=seed).image
        decode.append(_psnr(torch.from_numpy(image)[0], (_pixels_pm1(seed, DECODE_SIZE) + 1.0) / 2.0))
    return {
        "vae_psnr": _psnr(((recon + 1.0) / 2.0).clamp(0.0, 1.0), (data.pixels + 1.0) / 2.0),
        "velocity_mse": mse,
        "velocity_target_ms": target,
        "latent_std": float(x1.std()),
        "decode_psnr": float(np.mean(decode)),
    }


# ----------------------------------------------------------------------------------------------
# Decoder: training
# ----------------------------------------------------------------------------------------------


def _train_vae(vae: Any, pool: torch.Tensor, steps: int, batch: int, crop: int, lr: float, kl_weight: float,
               rng: np.random.Generator, gen: torch.Generator, progress: Progress, every: int) -> None:
    params = [p for p in vae.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    for step in range(steps):
        _set_lr(opt, _lr(step, steps, lr, max(1, steps // 20)))
        idx = rng.integers(0, len(pool), batch)
        loss, rec = vae_loss(vae, _random_crops(pool[idx], crop, rng), gen, kl_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if (step + 1) % every == 0 or step + 1 == steps:
            progress(f"decoder: vae step {step + 1}/{steps}, loss {float(loss.detach()):.4f} "
                     f"(reconstruction {rec:.4f})")


def _train_dit(dit: ZImageDiT, sigvq: SigVQ, x1: torch.Tensor, cap_ids: torch.Tensor, steps: int, batch: int,
               lr: float, rng: np.random.Generator, gen: torch.Generator, progress: Progress, every: int,
               cfg_drop: float, ema_decay: float = 0.0) -> None:
    params = [p for m in (dit, sigvq) for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    ema = [p.detach().clone() for p in params] if ema_decay > 0 else []
    g = x1.shape[-1] // dit.cfg.patch_size
    rope = dit.rope_tables(g, g, cap_ids.shape[1])
    running = 0.0
    for step in range(steps):
        _set_lr(opt, _lr(step, steps, lr, max(1, steps // 20)))
        idx = torch.from_numpy(rng.integers(0, len(x1), batch))
        t = torch.rand(batch, generator=gen)
        x0 = torch.randn((batch, *x1.shape[1:]), generator=gen)
        drop = torch.rand(batch, generator=gen) < cfg_drop
        loss = velocity_loss(dit, sigvq, x1[idx], cap_ids[idx], t, x0, rope, drop)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if ema:
            with torch.no_grad():
                # the decay warms up (TensorFlow's num_updates rule) so a short run is not pinned to the init
                decay = min(ema_decay, (1.0 + step) / (10.0 + step))
                torch._foreach_lerp_(ema, [p.detach() for p in params], 1.0 - decay)
        value = float(loss.detach())
        running = value if step == 0 else 0.95 * running + 0.05 * value
        if (step + 1) % every == 0 or step + 1 == steps:
            progress(f"decoder: dit step {step + 1}/{steps}, loss {value:.4f} (smoothed {running:.4f})")
    with torch.no_grad():
        for p, e in zip(params, ema, strict=False):
            p.copy_(e)


def _write_decoder(ckpt_dir: Path, vae: Any, dit: ZImageDiT, sigvq: SigVQ) -> None:
    rewrite_safetensors(ckpt_dir / "vae" / "diffusion_pytorch_model.safetensors", dict(vae.state_dict()))
    for sub in ("decoder", "decoder-turbo"):
        rewrite_safetensors(ckpt_dir / sub / "model.safetensors", dict(dit.state_dict()))
    rewrite_torch_state(ckpt_dir / "image_tokenizer" / "sigvq_embedding.pt", dict(sigvq.state_dict()))


def train_decoder(ckpt_dir: Path, seed: int = 0, vae_steps: int = 800, dit_steps: int = 1200,
                  scenes: int = 768, vae_batch: int = 16, vae_crop: int = 48, dit_batch: int = 32,
                  eval_scenes: int = 16, decode_scenes: int = 6, threads: int = 1, progress: Progress = _stderr,
                  every: int = 50) -> dict[str, float]:
    """Train the VAE, then SigVQ + the DiT, on ``scenes`` 128x128 training scenes; write them back in place.

    Run :func:`fit_codebook` first: the DiT learns to decode the ids of the tokenizer in the folder.

    (a) The VAE (encoder and decoder) trains ``vae_steps`` steps on random ``vae_crop``-pixel crops of the
    scenes (same pixel scale as the 128x128 decode, a fraction of the work):
    L1 + MSE reconstruction plus a small KL towards the prior the config's scaling/shift factors imply.
    (b) SigVQ (embedding + projector) and the DiT train jointly ``dit_steps`` steps by flow matching on the
    normalised posterior-mean latents of the scenes, conditioned on the upsampled ids of each scene's
    half-size render; t ~ U(0, 1), and 10% of the rows see all-zero conditioning (the normal decoder's
    CFG branch). What is written is an exponential moving average of the weights (:data:`DIT_EMA`).

    The same DiT weights go to ``decoder/`` and ``decoder-turbo/``: the turbo decoder is *not* distilled
    here (an 8-step sampler on a plain flow-matching model), and ``decoder/`` is not a separate model
    either. Only 128x128 decodes (4x4 id grids) are trained.

    What the default budget (~3.5 min on 2 cores) buys: a VAE at ~23 dB and a DiT whose decodes take the
    colours of the scene its ids came from, but little of its layout. The conditioning tokens carry only
    a 1-D position (caption index i -> RoPE position (1 + i, 0, 0)), so the DiT has to learn where on the
    image grid each id belongs, and the tiny DiT (1 refiner + 2 joint layers) starts to after some
    thousands of steps (3000 steps: decode PSNR ~14.7 dB instead of ~12.5, with visible vertical structure).

    Returns :func:`evaluate_decoder` on held-out scenes before (``before_*``) and after
    (``after_*``), ``after_untrained_dit_velocity_mse`` (the original DiT and SigVQ on the trained VAE's
    latents: the DiT's own progress), and seconds per phase.
    """
    ckpt_dir = Path(ckpt_dir)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    with _torch_threads(threads):
        ckpt = CheckpointFolder(ckpt_dir)
        held = held_out_set(ckpt, eval_scenes, decode_scenes)
        before = evaluate_decoder(ckpt_dir, held)
        untrained = (load_dit(ckpt, "turbo"), load_sigvq(ckpt))
        timings["eval_before_s"] = time.perf_counter() - start
        progress("decoder: before " + ", ".join(f"{k} {v:.4g}" for k, v in before.items()))

        torch.manual_seed(seed)
        rng = np.random.default_rng(seed)
        gen = torch.Generator().manual_seed(seed)
        t0 = time.perf_counter()
        data = decoder_data(load_vision_tokenizer(ckpt), ckpt.config.preprocessor, train_seeds(rng, scenes))
        timings["data_s"] = time.perf_counter() - t0
        progress(f"decoder: {scenes} training scenes rendered and tokenized ({timings['data_s']:.1f} s)")

        t0 = time.perf_counter()
        vae = _autoencoder(ckpt)
        _train_vae(vae, data.pixels, vae_steps, vae_batch, vae_crop, VAE_LR, VAE_KL, rng, gen, progress, every)
        vae.eval().requires_grad_(False)
        timings["vae_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        x1 = encode_latents(vae, data.pixels)
        timings["encode_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        dit = load_dit(ckpt, "turbo").train().requires_grad_(True)
        sigvq = load_sigvq(ckpt).train().requires_grad_(True)
        _train_dit(dit, sigvq, x1, data.cap_ids, dit_steps, dit_batch, DIT_LR, rng, gen, progress, every, CFG_DROP,
                   DIT_EMA)
        timings["dit_s"] = time.perf_counter() - t0
        _write_decoder(ckpt_dir, vae, dit.eval(), sigvq.eval())

        t0 = time.perf_counter()
        after = evaluate_decoder(ckpt_dir, held)
        stored_vae = load_vae(CheckpointFolder(ckpt_dir)).vae
        untrained_mse, _ = held_out_velocity(*untrained, encode_latents(stored_vae, held.data.pixels),
                                             held.data.cap_ids)
        timings["eval_after_s"] = time.perf_counter() - t0
    progress("decoder: after " + ", ".join(f"{k} {v:.4g}" for k, v in after.items())
             + f" (untrained DiT on these latents: velocity_mse {untrained_mse:.4g})")
    report = {f"before_{k}": v for k, v in before.items()}
    report.update({f"after_{k}": v for k, v in after.items()})
    report.update(timings, after_untrained_dit_velocity_mse=untrained_mse, seconds=time.perf_counter() - start)
    return report
