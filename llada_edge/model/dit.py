"""Z-Image diffusion transformer (decoder/ and decoder-turbo/ share it), PyTorch reference (model-spec §6.2).

``forward(latent [B,16,1,Hl,Wl], t [B], cap [B,Lc,cap_dim]) -> velocity [B,16,1,Hl,Wl]`` for a batch of
equally sized items (one image each: the "basic" mode upstream uses), with static shapes:

* the complex RoPE (``torch.polar`` / ``view_as_complex``) is a real rotation of interleaved pairs
  ``(x0, x1) -> (x0 cos - x1 sin, x0 sin + x1 cos)`` with cos/sin tables computed from the shapes;
* padding to multiples of 32 is static: image pad rows become ``x_pad_token``, caption pad rows
  ``cap_pad_token``; pads are real tokens (attended, not masked), as upstream;
* position ids follow upstream exactly: caption token i (pads included) -> (1+i, 0, 0); image token
  (h, w) -> (Lc_pad+1, h, w); image pad rows -> (0, 0, 0).

Key names are the upstream ones (``semantic_embedder.*``, which diffusers calls ``cap_embedder.*``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from llada_edge.config import DecoderConfig
from llada_edge.model.common import RMSNorm
from llada_edge.positions import dit_rope_tables


def apply_interleaved_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, L, H, hd]; cos/sin [L, hd/2]. Rotates pairs (2i, 2i+1) in fp32, returns x's dtype."""
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1).flatten(-2).to(x.dtype)


class _Attention(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        d = cfg.dim
        self.heads = cfg.n_heads
        self.to_q = nn.Linear(d, d, bias=False)
        self.to_k = nn.Linear(d, d, bias=False)
        self.to_v = nn.Linear(d, d, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(d, d, bias=False)])
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:
            # eps fixed at 1e-5 upstream, whatever norm_eps says (model-spec §9)
            self.norm_q = RMSNorm(cfg.head_dim, 1e-5)
            self.norm_k = RMSNorm(cfg.head_dim, 1e-5)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        q = self.to_q(x).unflatten(-1, (self.heads, -1))
        k = self.to_k(x).unflatten(-1, (self.heads, -1))
        v = self.to_v(x).unflatten(-1, (self.heads, -1))
        if self.qk_norm:
            q, k = self.norm_q(q), self.norm_k(k)
        q, k = apply_interleaved_rope(q, cos, sin), apply_interleaved_rope(k, cos, sin)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.to_out[0](out.transpose(1, 2).flatten(2))


class _FeedForward(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class DiTBlock(nn.Module):
    """Self-attention + SwiGLU with sandwich RMSNorms; adaLN-modulated when ``modulated``."""

    def __init__(self, cfg: DecoderConfig, modulated: bool) -> None:
        super().__init__()
        d = cfg.dim
        self.attention = _Attention(cfg)
        self.feed_forward = _FeedForward(cfg)
        self.attention_norm1 = RMSNorm(d, cfg.norm_eps)
        self.attention_norm2 = RMSNorm(d, cfg.norm_eps)
        self.ffn_norm1 = RMSNorm(d, cfg.norm_eps)
        self.ffn_norm2 = RMSNorm(d, cfg.norm_eps)
        self.modulated = modulated
        if modulated:  # no SiLU before this Linear (model-spec §6.2)
            self.adaLN_modulation = nn.Sequential(nn.Linear(cfg.adaln_dim, 4 * d))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                c: torch.Tensor | None = None) -> torch.Tensor:
        if not self.modulated:
            x = x + self.attention_norm2(self.attention(self.attention_norm1(x), cos, sin))
            return x + self.ffn_norm2(self.feed_forward(self.ffn_norm1(x)))
        scale_a, gate_a, scale_f, gate_f = self.adaLN_modulation(c).unsqueeze(1).chunk(4, dim=2)
        x = x + gate_a.tanh() * self.attention_norm2(
            self.attention(self.attention_norm1(x) * (1.0 + scale_a), cos, sin))
        return x + gate_f.tanh() * self.ffn_norm2(self.feed_forward(self.ffn_norm1(x) * (1.0 + scale_f)))


class _TimestepEmbedder(nn.Module):
    def __init__(self, out_dim: int, mid_dim: int = 1024, freq_dim: int = 256) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, mid_dim), nn.SiLU(), nn.Linear(mid_dim, out_dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float().unsqueeze(-1) * freqs
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        first = self.mlp[0]
        assert isinstance(first, nn.Linear)  # built so in __init__
        return self.mlp(emb.to(first.weight.dtype))


class _FinalLayer(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(cfg.dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(cfg.dim, cfg.patch_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.adaln_dim, cfg.dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm_final(x) * (1.0 + self.adaLN_modulation(c).unsqueeze(1)))


class ZImageDiT(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        key = f"{cfg.patch_size}-{cfg.f_patch_size}"
        self.patch_key = key
        self.all_x_embedder = nn.ModuleDict({key: nn.Linear(cfg.patch_dim, cfg.dim)})
        self.all_final_layer = nn.ModuleDict({key: _FinalLayer(cfg)})
        self.noise_refiner = nn.ModuleList(DiTBlock(cfg, True) for _ in range(cfg.n_refiner_layers))
        self.context_refiner = nn.ModuleList(DiTBlock(cfg, False) for _ in range(cfg.n_refiner_layers))
        self.t_embedder = _TimestepEmbedder(cfg.adaln_dim)
        self.semantic_embedder = nn.Sequential(RMSNorm(cfg.cap_feat_dim, cfg.norm_eps),
                                               nn.Linear(cfg.cap_feat_dim, cfg.dim))
        self.x_pad_token = nn.Parameter(torch.zeros(1, cfg.dim))
        self.cap_pad_token = nn.Parameter(torch.zeros(1, cfg.dim))
        self.layers = nn.ModuleList(DiTBlock(cfg, True) for _ in range(cfg.n_layers))

    # -- shape helpers ---------------------------------------------------------------------

    def patchify(self, latent: torch.Tensor) -> torch.Tensor:
        """[B, C, 1, Hl, Wl] -> [B, N, p*p*C] with feature order (ph, pw, c), c fastest."""
        b, c, _, h, w = latent.shape
        p = self.cfg.patch_size
        x = latent[:, :, 0].reshape(b, c, h // p, p, w // p, p)
        return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)

    def unpatchify(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, c, p = x.shape[0], self.cfg.in_channels, self.cfg.patch_size
        x = x.reshape(b, h // p, w // p, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, c, 1, h, w)

    def rope_tables(self, ht: int, wt: int, cap_len: int) -> tuple[torch.Tensor, ...]:
        """cos/sin [L, hd/2] for the image tokens and the caption tokens (padded lengths)."""
        tables = dit_rope_tables(ht, wt, cap_len, self.cfg.axes_dims, self.cfg.rope_theta)
        return tuple(torch.from_numpy(t) for t in tables)

    @staticmethod
    def _pad_rows(x: torch.Tensor, pad_token: torch.Tensor, length: int) -> torch.Tensor:
        """Append pad-token rows up to ``length`` (a no-op concat of zero rows when already there)."""
        extra = pad_token.to(x.dtype).expand(x.shape[0], length - x.shape[1], -1)
        return torch.cat([x, extra], dim=1)

    # -- forward -------------------------------------------------------------------------------

    def forward(self, latent: torch.Tensor, t: torch.Tensor, cap: torch.Tensor,
                rope: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        """``rope``: (img_cos, img_sin, cap_cos, cap_sin) from :meth:`rope_tables`, or None to compute
        them here. Their lengths are the padded sequence lengths; passing them in keeps float64 table
        arithmetic out of exported graphs and lets one graph serve every resolution."""
        cfg = self.cfg
        dtype = self.x_pad_token.dtype
        _, _, _, h, w = latent.shape
        ht, wt = h // cfg.patch_size, w // cfg.patch_size
        n_img = ht * wt
        if rope is None:
            rope = tuple(a.to(latent.device) for a in self.rope_tables(ht, wt, cap.shape[1]))
        img_cos, img_sin, cap_cos, cap_sin = rope

        c = self.t_embedder(t * cfg.t_scale)
        x = self._pad_rows(self.all_x_embedder[self.patch_key](self.patchify(latent.to(dtype))), self.x_pad_token,
                           img_cos.shape[0])
        for block in self.noise_refiner:
            x = block(x, img_cos, img_sin, c)
        y = self._pad_rows(self.semantic_embedder(cap.to(dtype)), self.cap_pad_token, cap_cos.shape[0])
        for block in self.context_refiner:
            y = block(y, cap_cos, cap_sin)
        u = torch.cat([x, y], dim=1)  # image first, then caption
        u_cos, u_sin = torch.cat([img_cos, cap_cos]), torch.cat([img_sin, cap_sin])
        for block in self.layers:
            u = block(u, u_cos, u_sin, c)
        out = self.all_final_layer[self.patch_key](u, c)[:, :n_img]
        return self.unpatchify(out, h, w)
