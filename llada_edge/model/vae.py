"""FLUX.1 VAE decode through diffusers' AutoencoderKL (model-spec §6.4).

latent [B, 16, Hl, Wl] -> image [B, 3, 8*Hl, 8*Wl] in [0, 1]:
``s = latent / scaling_factor + shift_factor``; ``img = vae.decode(s)``; ``(img + 1) / 2`` clamped.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal, Protocol

import torch
from torch import nn


class _AutoencoderConfig(Protocol):
    scaling_factor: float
    shift_factor: float


class Autoencoder(Protocol):
    """What :class:`VaeDecoder` uses of a diffusers ``AutoencoderKL`` (an ``nn.Module``).

    Spelled out because the torch stubs give every ``nn.Module`` attribute the type ``Tensor | Module``
    and diffusers' own annotations resolve to placeholder classes under a type checker.
    """

    @property
    def config(self) -> _AutoencoderConfig: ...

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]: ...

    def decode(self, z: torch.Tensor, return_dict: Literal[False]) -> tuple[torch.Tensor]: ...


class VaeDecoder(nn.Module):
    def __init__(self, vae: Autoencoder) -> None:
        """``vae``: an ``AutoencoderKL`` module (registered as the submodule ``vae``)."""
        super().__init__()
        self.vae = vae
        self.scaling_factor = float(vae.config.scaling_factor)
        self.shift_factor = float(vae.config.shift_factor)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        dtype = next(self.vae.parameters()).dtype
        s = latent.to(dtype) / self.scaling_factor + self.shift_factor
        img = self.vae.decode(s, return_dict=False)[0]
        return ((img.float() + 1.0) / 2.0).clamp(0.0, 1.0)
