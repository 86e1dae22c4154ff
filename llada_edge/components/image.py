"""The image side's graphs: the SigLIP-VQ tokenizer, SigVQ, the two Z-Image decoders and the VAE decoder.

| graph            | inputs                                                          | outputs                       |
|------------------|-----------------------------------------------------------------|-------------------------------|
| vision_tokenizer | pixels [1,3,H,W] f32                                            | ids [H/16*W/16] i64           |
| sigvq            | ids [N] i64 (un-offset)                                         | feats [N,C] f32               |
| dit_turbo/normal | latent [B,16,1,Hl,Wl], t [B], cap [B,Lc,C], img_cos/img_sin     | velocity [B,16,1,Hl,Wl]       |
|                  | [Nx_pad,hd/2], cap_cos/cap_sin [Lc_pad,hd/2]                    |                               |
| vae_decoder      | latent [1,16,Hl,Wl]                                             | image [1,3,8Hl,8Wl] in [0,1]  |

The DiT takes its RoPE tables as inputs, computed on the host in float64 exactly as upstream: that keeps
float64 out of the graph and lets one graph serve every resolution (:meth:`DiT.feeds_for` builds them).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from llada_edge.components.base import Case, Component, float_inputs, settings
from llada_edge.components.specs import ComponentSpec, f32, i64
from llada_edge.config import ModelConfig
from llada_edge.positions import dit_rope_tables

if TYPE_CHECKING:
    from torch import nn

    from llada_edge.checkpoint import CheckpointFolder, TensorReader

DIT_MODES = ("turbo", "normal")  # decoder-turbo/ (8-step distilled) and decoder/ (50-step with CFG)


class VisionTokenizer(Component):
    graph_kinds = ("vision",)

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config, "vision_tokenizer")

    def _spec(self) -> ComponentSpec:
        return ComponentSpec(self.name, {"pixels": f32(1, 3, "height", "width")}, {"ids": i64("patches")},
                             {"height": 64, "width": 96}, {"height": (128, 512, 800), "width": (128, 512, 800)})

    def tensors(self, ckpt: CheckpointFolder) -> tuple[TensorReader | None, list[str]]:
        return ckpt.vision, ckpt.vision.keys()

    def config_fingerprint(self) -> list[Any]:
        return [settings(self.config.vision), settings(self.config.preprocessor)]

    def build_module(self, ckpt: CheckpointFolder, moe: str = "dense") -> nn.Module:
        import torch

        from llada_edge.model import load_vision_tokenizer
        from llada_edge.model.graphs import VisionTokenizerGraph

        return VisionTokenizerGraph(load_vision_tokenizer(ckpt, torch.float32)).eval()

    def weight_kind(self, weight: str, feeds_argmax: bool) -> str:
        return "keep" if feeds_argmax else "vision"  # the VQ codebook search stays exact

    def validation_cases(self, rng: np.random.Generator) -> list[Case]:
        pre = self.config.preprocessor
        mean = np.asarray(pre.image_mean)[None, :, None, None]
        std = np.asarray(pre.image_std)[None, :, None, None]
        return [(f"{h}x{w}", self.feeds(((rng.uniform(0, 1, (1, 3, h, w)) - mean) / std).astype(np.float32)))
                for h, w in ((128, 192), (256, 128))]


class SigVQ(Component):
    graph_kinds = ("dit",)

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config, "sigvq")

    def _spec(self) -> ComponentSpec:
        c = self.config.decoders["turbo"].cap_feat_dim
        return ComponentSpec(self.name, {"ids": i64("codes")}, {"feats": f32("codes", c)}, {"codes": 24},
                             {"codes": (64, 4096, 4096)})

    def tensors(self, ckpt: CheckpointFolder) -> tuple[TensorReader | None, list[str]]:
        return None, []  # a torch.save file, not safetensors

    def source_files(self, ckpt: CheckpointFolder) -> list[Path]:
        return [ckpt.sigvq_path]

    def config_fingerprint(self) -> list[Any]:
        return []

    def build_module(self, ckpt: CheckpointFolder, moe: str = "dense") -> nn.Module:
        import torch

        from llada_edge.model import load_sigvq
        from llada_edge.model.graphs import SigVQGraph

        return SigVQGraph(load_sigvq(ckpt, torch.float32)).eval()

    def validation_cases(self, rng: np.random.Generator) -> list[Case]:
        return [(f"{n} codes", self.feeds(rng.integers(0, self.config.vision.num_embeddings, n))) for n in (64, 256)]


class DiT(Component):
    """A Z-Image decoder transformer ("turbo" or "normal"); the host feeds it RoPE tables per resolution."""

    graph_kinds = ("dit",)

    def __init__(self, config: ModelConfig, mode: str) -> None:
        super().__init__(config, f"dit_{mode}")
        self.mode = mode

    def _spec(self) -> ComponentSpec:
        dec = self.config.decoders[self.mode]
        c, lat, half = dec.cap_feat_dim, self.config.vae.latent_channels, dec.head_dim // 2
        side = 1024 // self.config.vae.downsample_factor
        return ComponentSpec(
            self.name,
            {"latent": f32("rows", lat, 1, "lh", "lw"), "t": f32("rows"), "cap": f32("rows", "cap_len", c),
             "img_cos": f32("img_len", half), "img_sin": f32("img_len", half),
             "cap_cos": f32("cap_pad", half), "cap_sin": f32("cap_pad", half)},
            {"velocity": f32("rows", lat, 1, "lh", "lw")},
            {"rows": 2, "lh": 8, "lw": 12, "cap_len": 40, "img_len": 32, "cap_pad": 64},
            {"rows": (1, 2 if self.mode == "normal" else 1, 2), "lh": (16, side, side), "lw": (16, side, side),
             "cap_len": (64, 4096, 4096), "img_len": (64, 4096, 4096), "cap_pad": (64, 4096, 4096)})

    def tensors(self, ckpt: CheckpointFolder) -> tuple[TensorReader | None, list[str]]:
        reader = ckpt.decoder(self.mode)
        return reader, reader.keys()

    def config_fingerprint(self) -> list[Any]:
        return [settings(self.config.decoders[self.mode])]

    def build_module(self, ckpt: CheckpointFolder, moe: str = "dense") -> nn.Module:
        import torch

        from llada_edge.model import load_dit
        from llada_edge.model.graphs import DiTGraph

        return DiTGraph(load_dit(ckpt, self.mode, torch.float32)).eval()

    def feeds_for(self, latent: np.ndarray, t: np.ndarray, cap: np.ndarray) -> dict[str, np.ndarray]:
        """The graph's feeds for one evaluation: the inputs in fp32 plus the RoPE tables of this resolution."""
        dec = self.config.decoders[self.mode]
        tables = _rope_tables(latent.shape[3] // dec.patch_size, latent.shape[4] // dec.patch_size, cap.shape[1],
                              tuple(dec.axes_dims), dec.rope_theta)
        return self.feeds(latent.astype(np.float32), t.astype(np.float32), cap.astype(np.float32), *tables)

    def validation_cases(self, rng: np.random.Generator) -> list[Case]:
        return [("1 row 2x3 grid", self._case(rng, 1, 2, 3)), ("CFG rows 4x4 grid", self._case(rng, 2, 4, 4))]

    def _case(self, rng: np.random.Generator, rows: int, gh: int, gw: int) -> dict[str, np.ndarray]:
        dec = self.config.decoders[self.mode]
        factor = self.config.vae.downsample_factor
        lh, lw = gh * 32 // factor, gw * 32 // factor
        cap = float_inputs(rng, rows, 4 * gh * gw, dec.cap_feat_dim)
        if rows == 2:
            cap[1] = 0.0  # the normal sampler's CFG batch: (features, zeros)
        latent = float_inputs(rng, rows, dec.in_channels, 1, lh, lw)
        return self.feeds_for(latent, rng.uniform(0, 1, rows), cap)


class VaeDecoder(Component):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config, "vae_decoder")

    def _spec(self) -> ComponentSpec:
        lat = self.config.vae.latent_channels
        return ComponentSpec(self.name, {"latent": f32(1, lat, "lh", "lw")}, {"image": f32(1, 3, "height", "width")},
                             {"lh": 8, "lw": 12}, {"lh": (16, 128, 128), "lw": (16, 128, 128)})

    def tensors(self, ckpt: CheckpointFolder) -> tuple[TensorReader | None, list[str]]:
        return ckpt.vae_weights, ckpt.vae_weights.keys()

    def config_fingerprint(self) -> list[Any]:
        return [self.config.vae.raw]

    def build_module(self, ckpt: CheckpointFolder, moe: str = "dense") -> nn.Module:
        import torch

        from llada_edge.model import load_vae
        from llada_edge.model.graphs import VaeDecoderGraph

        return VaeDecoderGraph(load_vae(ckpt, torch.float32)).eval()

    def validation_cases(self, rng: np.random.Generator) -> list[Case]:
        lat = self.config.vae.latent_channels
        return [(f"{h}x{w}", self.feeds(float_inputs(rng, 1, lat, h, w))) for h, w in ((8, 12), (16, 16))]


@lru_cache(maxsize=32)
def _rope_tables(ht: int, wt: int, cap_len: int, axes_dims: tuple[int, ...], theta: float
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One table set per resolution, computed once (read-only: every caller shares it)."""
    tables = dit_rope_tables(ht, wt, cap_len, list(axes_dims), theta)
    for table in tables:
        table.setflags(write=False)
    return tables
