"""Library parity: our reference modules against transformers' and diffusers' implementations,
loaded with the same synthetic weights under strict key checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llada_edge.checkpoint import CheckpointFolder
from llada_edge.model import load_dit, load_vae, load_vision_tokenizer
from llada_edge.model.vision import window_order


def _patch_vectors(pixels: torch.Tensor, patch: int) -> torch.Tensor:
    """[1,3,H,W] -> [N, 3*p*p] per-patch vectors ordered (C, p, p), raster over the grid."""
    _, c, h, w = pixels.shape
    x = pixels[0].reshape(c, h // patch, patch, w // patch, patch).permute(1, 3, 0, 2, 4)
    return x.reshape((h // patch) * (w // patch), c * patch * patch)


@pytest.fixture(scope="module")
def glm_image_tokenizer(tiny_ckpt: Path):
    from transformers import GlmImageVisionConfig, GlmImageVisionModel, GlmImageVQVAE, GlmImageVQVAEConfig

    raw = json.loads((tiny_ckpt / "image_tokenizer" / "config.json").read_text())
    reader = CheckpointFolder(tiny_ckpt).vision
    vision = GlmImageVisionModel(GlmImageVisionConfig(**raw["vision_config"])).eval()
    vision.load_state_dict({k.removeprefix("model.visual."): reader.get(k).float()
                            for k in reader if k.startswith("model.visual.")}, strict=True)
    vq = GlmImageVQVAE(GlmImageVQVAEConfig(**raw["vq_config"])).eval()
    vq.load_state_dict({k.removeprefix("model.vqmodel."): reader.get(k).float()
                        for k in reader if k.startswith("model.vqmodel.")}, strict=True)
    return vision, vq


@pytest.mark.parametrize("order", ["raster", "window"])
@pytest.mark.parametrize(("height", "width"), [(128, 192), (256, 256)])
def test_image_tokenizer_matches_transformers_glm_image(tiny_ckpt, glm_image_tokenizer, order, height, width,
                                                        measure) -> None:
    vision, vq = glm_image_tokenizer
    ours = load_vision_tokenizer(tiny_ckpt, torch.float32, order=order)
    pixels = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(height + width))
    gh, gw = height // 16, width // 16
    patches = _patch_vectors(pixels, 16)
    if order == "window":  # upstream lays the pixels out in window order; positions stay raster
        patches = patches[torch.tensor(window_order(gh, gw))]
    with torch.no_grad():
        ref_feats = vision(patches, grid_thw=torch.tensor([[1, gh, gw]])).last_hidden_state
        ref_ids = vq.encode(ref_feats.t().reshape(1, -1, gh, gw)).image_tokens.reshape(-1)
        feats = ours.features(pixels)
        ids = ours.quantize(feats)
    err = (feats - ref_feats).abs().max().item()
    measure(f"tokenizer_vs_transformers_feature_max_abs_{order}_{height}x{width}", err)
    assert err < 1e-4
    assert torch.equal(ids, ref_ids)


def test_window_order_is_not_a_permutation_of_raster_ids(tiny_ckpt) -> None:
    """model-spec §5.1: the order flag must change what the ViT sees, not just the output order."""
    pixels = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        raster = load_vision_tokenizer(tiny_ckpt, order="raster")(pixels)
        window = load_vision_tokenizer(tiny_ckpt, order="window")(pixels)
    assert not torch.equal(raster[torch.tensor(window_order(16, 16))], window)


@pytest.mark.parametrize("mode", ["turbo", "normal"])
@pytest.mark.parametrize(("latent_hw", "cap_len"), [((32, 32), 256), ((16, 20), 40)])
def test_dit_matches_diffusers_zimage(tiny_ckpt, mode, latent_hw, cap_len, measure) -> None:
    from diffusers import ZImageTransformer2DModel

    ckpt = CheckpointFolder(tiny_ckpt)
    cfg = ckpt.config.decoders[mode]
    ref = ZImageTransformer2DModel(
        all_patch_size=(cfg.patch_size,), all_f_patch_size=(cfg.f_patch_size,), in_channels=cfg.in_channels,
        dim=cfg.dim, n_layers=cfg.n_layers, n_refiner_layers=cfg.n_refiner_layers, n_heads=cfg.n_heads,
        n_kv_heads=cfg.n_heads, norm_eps=cfg.norm_eps, qk_norm=cfg.qk_norm, cap_feat_dim=cfg.cap_feat_dim,
        rope_theta=cfg.rope_theta, t_scale=cfg.t_scale, axes_dims=cfg.axes_dims, axes_lens=cfg.axes_lens).eval()
    reader = ckpt.decoder(mode)
    # model-spec §6.2: upstream "semantic_embedder" is diffusers' "cap_embedder"
    ref.load_state_dict({k.replace("semantic_embedder.", "cap_embedder."): reader.get(k).float()
                         for k in reader}, strict=True)
    ours = load_dit(ckpt, mode, torch.float32)
    g = torch.Generator().manual_seed(7)
    latent = torch.randn(2, 16, 1, *latent_hw, generator=g)
    t = torch.tensor([0.25, 0.8])
    cap = torch.randn(2, cap_len, cfg.cap_feat_dim, generator=g)
    with torch.no_grad():
        want = torch.stack(ref(list(latent.unbind(0)), t, list(cap.unbind(0)), return_dict=False)[0])
        got = ours(latent, t, cap)
    err = (got - want).abs().max().item()
    measure(f"dit_vs_diffusers_max_abs_{mode}_{latent_hw[0]}x{latent_hw[1]}_cap{cap_len}", err)
    measure(f"dit_vs_diffusers_max_rel_{mode}_{latent_hw[0]}x{latent_hw[1]}_cap{cap_len}",
            err / want.abs().max().item())
    assert err <= 1e-4 * max(1.0, want.abs().max().item())


def test_vae_streaming_loader_matches_diffusers_from_pretrained(tiny_ckpt, measure) -> None:
    from diffusers import AutoencoderKL

    ours = load_vae(tiny_ckpt, torch.float32)
    ref = AutoencoderKL.from_pretrained(tiny_ckpt / "vae", local_files_only=True, torch_dtype=torch.float32).eval()
    latent = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got = ours(latent)
        s = latent / ref.config.scaling_factor + ref.config.shift_factor
        want = ((ref.decode(s, return_dict=False)[0] + 1) / 2).clamp(0, 1)
    err = (got - want).abs().max().item()
    measure("vae_vs_diffusers_from_pretrained_max_abs", err)
    assert err == 0.0
