"""SigLIP-VQ image tokenizer (the GLM-Image vision tokenizer), PyTorch reference (model-spec §5).

pixels [1, 3, H, W] (normalised, H and W multiples of the patch size) -> VQ ids [gh*gw].

Export-friendly rewrites of the upstream code, each exactly equivalent:

* the per-patch ``view`` + Conv2d is a Conv2d with stride 16 on the whole image (same windows);
* the position table is resized with ``F.interpolate(bilinear, align_corners=False)`` instead of
  ``grid_sample`` at the patch centres with border padding (same sample points, same clamping);
* the VQ ``argmin`` of squared distances between unit vectors is the ``argmax`` of their dot product;
* the 1x1 ``quant_conv`` is a matmul on [N, C].

Token order: with ``merge_size`` 2 the upstream preprocessor lays the patches out in 2x2-window
order while the ViT still adds *raster* position embeddings (model-spec §5.1). Since the ViT has no
other notion of position, that is the same as permuting the patch embeddings into window order
before adding the raster table, which is what ``order="window"`` does. The ids come out in that
order, as upstream.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llada_edge.config import VisionTokenizerConfig


def window_order(gh: int, gw: int) -> list[int]:
    """Raster indices listed in 2x2-window order: (h/2, w/2, 2, 2)."""
    if gh % 2 or gw % 2:
        raise ValueError(f"window order needs an even grid, got {gh}x{gw}")
    return [(2 * bh + dh) * gw + 2 * bw + dw
            for bh in range(gh // 2) for bw in range(gw // 2) for dh in range(2) for dw in range(2)]


class _Attention(nn.Module):
    def __init__(self, cfg: VisionTokenizerConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, d = x.shape
        q, k, v = self.qkv(x).reshape(n, 3, self.num_heads, d // self.num_heads).permute(1, 2, 0, 3).unbind(0)
        out = F.scaled_dot_product_attention(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0))
        return self.proj(out.squeeze(0).transpose(0, 1).reshape(n, d))


class _Mlp(nn.Module):
    def __init__(self, cfg: VisionTokenizerConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU


class _Block(nn.Module):
    def __init__(self, cfg: VisionTokenizerConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attn = _Attention(cfg)
        self.mlp = _Mlp(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionTokenizerConfig) -> None:
        super().__init__()
        p = cfg.patch_size
        self.proj = nn.Conv2d(cfg.in_channels, cfg.hidden_size, kernel_size=p, stride=p)


class _PositionEmbedding(nn.Module):
    def __init__(self, cfg: VisionTokenizerConfig) -> None:
        super().__init__()
        self.position_embedding = nn.Embedding(cfg.pos_grid**2, cfg.hidden_size)


class _Visual(nn.Module):
    def __init__(self, cfg: VisionTokenizerConfig) -> None:
        super().__init__()
        self.patch_embed = _PatchEmbed(cfg)
        self.embeddings = _PositionEmbedding(cfg)
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.depth))


class _Quantize(nn.Module):
    def __init__(self, cfg: VisionTokenizerConfig) -> None:
        super().__init__()
        self.embedding = nn.Embedding(cfg.num_embeddings, cfg.embed_dim)


class _VQModel(nn.Module):
    def __init__(self, cfg: VisionTokenizerConfig) -> None:
        super().__init__()
        self.quantize = _Quantize(cfg)
        self.quant_conv = nn.Conv2d(cfg.latent_channels, cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.latent_channels, 1)  # unused at inference


class _Root(nn.Module):
    def __init__(self, cfg: VisionTokenizerConfig) -> None:
        super().__init__()
        self.visual = _Visual(cfg)
        self.vqmodel = _VQModel(cfg)


class SigLipVQTokenizer(nn.Module):
    """Keys ``model.visual.*`` and ``model.vqmodel.*`` of ``image_tokenizer/*.safetensors``."""

    def __init__(self, cfg: VisionTokenizerConfig, order: str = "raster") -> None:
        super().__init__()
        if order not in ("raster", "window"):
            raise ValueError(f"token order must be 'raster' or 'window', got {order!r}")
        self.cfg = cfg
        self.order = order
        self.model = _Root(cfg)

    def position_embeddings(self, gh: int, gw: int) -> torch.Tensor:
        """Learned grid table resized to gh x gw (bilinear, half-pixel), raster order [gh*gw, D]."""
        table = self.model.visual.embeddings.position_embedding.weight
        g = self.cfg.pos_grid
        grid = table.float().reshape(1, g, g, -1).permute(0, 3, 1, 2)
        resized = F.interpolate(grid, size=(gh, gw), mode="bilinear", align_corners=False)
        return resized.flatten(2).squeeze(0).transpose(0, 1).to(table.dtype)

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [1, 3, H, W] -> ViT output [gh*gw, D] in token order."""
        visual = self.model.visual
        dtype = visual.patch_embed.proj.weight.dtype
        patches = visual.patch_embed.proj(pixels.to(dtype))  # [1, D, gh, gw]
        _, _, gh, gw = patches.shape
        x = patches.flatten(2).squeeze(0).transpose(0, 1)  # raster [N, D]
        if self.order == "window":  # == x[window_order(gh, gw)], as reshapes so H and W can stay dynamic
            d = x.shape[-1]
            x = x.reshape(gh // 2, 2, gw // 2, 2, d).permute(0, 2, 1, 3, 4).reshape(gh * gw, d)
        x = x + self.position_embeddings(gh, gw)
        for block in visual.blocks:
            x = block(x)
        return x

    def quantize(self, feats: torch.Tensor) -> torch.Tensor:
        """ViT features [N, D] -> ids [N]: cosine-nearest codebook entry, computed in fp32."""
        vq = self.model.vqmodel
        w = vq.quant_conv.weight.float().flatten(1)  # [E, D]
        bias = vq.quant_conv.bias
        assert bias is not None  # quant_conv is built with a bias (and the layout requires it)
        z = F.linear(feats.float(), w, bias.float())
        z = F.normalize(z, dim=-1)
        codebook = F.normalize(vq.quantize.embedding.weight.float(), dim=-1)
        return torch.argmax(z @ codebook.t(), dim=-1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.quantize(self.features(pixels))
