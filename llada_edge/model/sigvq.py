"""SigVQ: VQ ids -> decoder conditioning features (model-spec §6.1).

``feat = W2 · silu(W1 · E[q] + b1) + b2``; the ids are the *un-offset* VQ codes. Before embedding,
the h x w id grid is upsampled 2x (nearest), always, so a 32x32 grid conditions the decoder with
64x64 = 4096 features (:func:`llada_edge.runtime.decode.upsample_ids_2x`, numpy, shared with the runtime).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _Proj(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, dim)


class _Projector(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        # Keys net.0.proj.* and net.2.* (net.1 is the parameter-free SiLU).
        self.net = nn.ModuleList([_Proj(dim), nn.SiLU(), nn.Linear(dim, dim)])


class SigVQ(nn.Module):
    """Keys of ``image_tokenizer/sigvq_embedding.pt``."""

    def __init__(self, num_codes: int, dim: int) -> None:
        super().__init__()
        self.prior_token_embedding = nn.Embedding(num_codes, dim)
        self.prior_projector = _Projector(dim)

    @property
    def dim(self) -> int:
        return self.prior_token_embedding.embedding_dim

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        net = self.prior_projector.net
        first = net[0]
        assert isinstance(first, _Proj)  # built so in _Projector.__init__
        x = self.prior_token_embedding(ids)
        return net[2](F.silu(first.proj(x)))
