"""``llada-edge reference``: run every PyTorch reference component once on a checkpoint folder.

A smoke check of a folder (synthetic or real): tokenizes a procedural image, runs the backbone over
a prompt built from it, embeds VQ ids with SigVQ, evaluates one DiT velocity per decoder and decodes a
latent with the VAE. It prints what each stage produced and how long it took.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llada_edge.calibration.requests import procedural_image
from llada_edge.errors import InputError


@dataclass
class StageResult:
    name: str
    seconds: float
    output: str


def run_reference(model_dir: str | Path, height: int = 256, width: int = 256, seed: int = 0,
                  progress: Callable[[str], None] | None = None) -> list[StageResult]:
    import torch

    from llada_edge.checkpoint import CheckpointFolder
    from llada_edge.model import load_backbone, load_dit, load_sigvq, load_vae, load_vision_tokenizer
    from llada_edge.runtime.decode import upsample_ids_2x

    if height % 32 or width % 32 or height <= 0 or width <= 0:
        raise InputError(f"image size must be positive multiples of 32, got {height}x{width}")
    ckpt = CheckpointFolder(model_dir)
    cfg = ckpt.config
    results: list[StageResult] = []
    torch.manual_seed(seed)

    def stage(name: str, fn: Callable[[], Any], describe: Callable[[Any], str]) -> Any:
        if progress:
            progress(f"reference: {name} ...")
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = fn()
        results.append(StageResult(name, time.perf_counter() - t0, describe(out)))
        return out

    mean = torch.tensor(cfg.preprocessor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.preprocessor.image_std).view(1, 3, 1, 1)
    img = torch.from_numpy(procedural_image(height, width, seed)).permute(2, 0, 1)[None].float() / 255.0
    pixels = (img - mean) / std
    tokenizer = stage("load image tokenizer", lambda: load_vision_tokenizer(ckpt), lambda m: type(m).__name__)
    ids = stage("image tokenizer", lambda: tokenizer(pixels), lambda x: f"{x.numel()} ids, first {x[:6].tolist()}")

    b = cfg.backbone
    backbone = stage("load backbone", lambda: load_backbone(ckpt), lambda m: f"{b.num_hidden_layers} layers")
    seq = torch.cat([torch.tensor([156901]), ids + b.image_token_offset, torch.tensor([156902]),
                     torch.full((32,), b.mask_token_id)])[None]
    pos = torch.arange(seq.shape[1])[None]
    logits = stage("backbone (block-causal)", lambda: backbone(seq, pos, torch.ones_like(seq, dtype=torch.bool)),
                   lambda x: f"logits {list(x.shape)}, std {x.std():.3f}")
    del logits

    gh, gw = height // 32, width // 32  # the semantic grid an image of this size is generated at
    vq = torch.randint(0, cfg.vision.num_embeddings, (gh * gw,))
    sigvq = load_sigvq(ckpt)
    up = torch.from_numpy(upsample_ids_2x(vq.numpy(), gh, gw))
    cap = stage("sigvq", lambda: sigvq(up)[None], lambda x: f"features {list(x.shape)}")
    hl, wl = height // cfg.vae.downsample_factor, width // cfg.vae.downsample_factor
    latent = torch.randn(1, cfg.vae.latent_channels, 1, hl, wl)
    for mode in ("turbo", "normal"):
        dit = load_dit(ckpt, mode)
        stage(f"dit ({mode})", functools.partial(dit, latent, torch.tensor([0.5]), cap),
              lambda x: f"velocity {list(x.shape)}, std {x.std():.3f}")
    vae = load_vae(ckpt)
    stage("vae decode", lambda: vae(latent[:, :, 0]), lambda x: f"image {list(x.shape)}, mean {x.mean():.3f}")
    return results
