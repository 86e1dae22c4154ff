"""The exportable graph of each component: the reference modules wrapped in the I/O contract of the component
registry (:mod:`llada_edge.components`, whose modules document every input and output shape).

Two deliberate widenings of design.md §5: the layer mask is per query ([B,T,S+T], not [B,S+T]) so the
same graph also prefills a prompt with its block-causal mask in one pass; and the DiT takes its RoPE
tables as inputs (computed on the host in float64 exactly as upstream), which keeps float64 out of the
graph, lets one graph serve every resolution, and fixes the padded lengths.
"""

from __future__ import annotations

import torch
from torch import nn

from llada_edge.config import BackboneConfig
from llada_edge.model.backbone import DecoderLayer, guided_greedy, mask_to_bias, rope_cos_sin, rope_inv_freq
from llada_edge.model.dit import ZImageDiT
from llada_edge.model.sigvq import SigVQ
from llada_edge.model.vae import VaeDecoder
from llada_edge.model.vision import SigLipVQTokenizer


class EmbedGraph(nn.Module):
    def __init__(self, embedding: nn.Embedding) -> None:
        super().__init__()
        self.embedding = embedding

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embedding(ids)


class HeadGraph(nn.Module):
    """Final RMSNorm + lm_head rows: all of them (text) or only the image rows (``head_image``)."""

    def __init__(self, norm: nn.Module, weight: torch.Tensor) -> None:
        super().__init__()
        self.norm = norm
        self.weight = nn.Parameter(weight, requires_grad=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(self.norm(hidden), self.weight).float()


class SampleHeadGraph(nn.Module):
    """The head fused with CFG and greedy scoring: only (x0, p) per block position leave the graph.

    ``row_weights`` [B] combine the rows' logits (CFG: [s, 1-s]; editing: [s_t, 1-s_t+s_i, -s_i]);
    x0 = argmax of the guided logits, p = its softmax probability. Replaces a [B, T, vocab] logits
    transfer and the host-side softmax every step (temperature 0, no CFG rescale).
    """

    def __init__(self, norm: nn.Module, weight: torch.Tensor) -> None:
        super().__init__()
        self.head = HeadGraph(norm, weight)

    def forward(self, hidden: torch.Tensor, row_weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return guided_greedy(self.head(hidden), row_weights)


class LayerGraph(nn.Module):
    """One decoder layer: the block attends to the past K/V plus itself, as ``attn_mask`` allows."""

    inv_freq: torch.Tensor  # a registered buffer (the torch stubs type attributes as Tensor | Module)

    def __init__(self, layer: DecoderLayer, cfg: BackboneConfig) -> None:
        super().__init__()
        self.layer = layer
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    def forward(self, hidden: torch.Tensor, positions: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor,
                attn_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cos, sin = rope_cos_sin(positions, self.inv_freq, hidden.dtype)
        return self.layer(hidden, cos, sin, mask_to_bias(attn_mask.unsqueeze(1)), past_k, past_v)


class VisionTokenizerGraph(nn.Module):
    def __init__(self, tokenizer: SigLipVQTokenizer) -> None:
        super().__init__()
        self.tokenizer = tokenizer

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.tokenizer(pixels)


class SigVQGraph(nn.Module):
    def __init__(self, sigvq: SigVQ) -> None:
        super().__init__()
        self.sigvq = sigvq

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.sigvq(ids).float()


class DiTGraph(nn.Module):
    def __init__(self, dit: ZImageDiT) -> None:
        super().__init__()
        self.dit = dit

    def forward(self, latent: torch.Tensor, t: torch.Tensor, cap: torch.Tensor, img_cos: torch.Tensor,
                img_sin: torch.Tensor, cap_cos: torch.Tensor, cap_sin: torch.Tensor) -> torch.Tensor:
        return self.dit(latent, t, cap, (img_cos, img_sin, cap_cos, cap_sin)).float()


class VaeDecoderGraph(nn.Module):
    def __init__(self, vae: VaeDecoder) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.vae(latent)
