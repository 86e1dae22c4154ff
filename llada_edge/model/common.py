"""Building blocks shared by the reference modules."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """fp32 statistics, cast back to the input dtype, *then* the affine weight.

    That rounding order is the upstream one for the backbone (model-spec §2.3) and the same as
    diffusers' RMSNorm used by the Z-Image decoder.
    """

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)
