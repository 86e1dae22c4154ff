"""The ``Backend`` protocol: what the numpy sampler needs from an engine, numpy in and out.

The sampler owns the *logic* (which tokens to commit, CFG, SPRINT); a backend owns the *compute* and
the KV cache. One session = one request with ``rows`` sequences (1, or 2/3 with CFG) that share
block positions; the cache has a fixed ``capacity`` (tokens per row) and a per-row validity mask, so
left pads of CFG rows and SPRINT-pruned keys are simply invalid entries.

Calls, in order, for one request::

    backend.start(rows, capacity)
    backend.prefill(ids, positions, valid)        # the complete prompt blocks -> cache
    for each block:
        for each step:
            hidden = backend.forward_block(ids, positions, valid)     # block vs cache + itself
            logits = backend.head_image(hidden)  (or head_text)
        backend.commit(ids, positions, valid)     # final block tokens -> their K/V appended

Implementations (``backends/``): ``torch`` (the PyTorch reference; a CUDA-graph mode for CUDA devices),
``onnxruntime`` (build folders, CPU) and ``tensorrt`` (build folders, GPU; one CUDA graph per step
shape). The CUDA-graph and TensorRT paths have not run on this project's machines (no GPU, no
TensorRT). Nothing in this module imports torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from llada_edge.config import ModelConfig


@runtime_checkable
class Backend(Protocol):
    name: str
    config: ModelConfig

    # -- backbone session -------------------------------------------------------------------

    def start(self, rows: int, capacity: int) -> None:
        """Begin a request: an empty KV cache for ``rows`` sequences of up to ``capacity`` tokens."""

    def prefill(self, ids: np.ndarray, positions: np.ndarray, valid: np.ndarray) -> None:
        """Append the K/V of a prefix [B, L] (block-causal attention within it, then the cache)."""

    def forward_block(self, ids: np.ndarray, positions: np.ndarray, valid: np.ndarray,
                      key_importance: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """Hidden states [B, T, D] of one block attending to the valid cache entries plus itself.

        With ``key_importance``, also the attention mass the block puts on each cached key, averaged
        over layers, heads and block queries: [B, cache_len] (SPRINT's pruning score).
        """

    def commit(self, ids: np.ndarray, positions: np.ndarray, valid: np.ndarray) -> None:
        """Run the final tokens of a block and append their K/V to the cache."""

    def set_cache_mask(self, keep: np.ndarray | None) -> None:
        """Restrict attention to cache entries where ``keep`` [B, cache_len] is true (None: all valid)."""

    @property
    def cache_len(self) -> int:
        """Tokens per row currently in the cache."""

    # -- heads ------------------------------------------------------------------------------

    def head_text(self, hidden: np.ndarray) -> np.ndarray:
        """Full-vocabulary logits [B, T, vocab] (fp32)."""

    def head_image(self, hidden: np.ndarray) -> np.ndarray:
        """Image-code logits [B, T, num_image_tokens] (fp32): lm_head rows image_token_offset.. only."""

    # -- image side -------------------------------------------------------------------------

    def tokenize_image(self, pixels: np.ndarray) -> np.ndarray:
        """Normalised pixels [1, 3, H, W] -> VQ ids [H/16 * W/16] (int64, token order of the checkpoint)."""

    def sigvq(self, ids: np.ndarray) -> np.ndarray:
        """Un-offset VQ ids [N] -> decoder conditioning features [N, C]."""

    def dit(self, mode: str, latent: np.ndarray, t: np.ndarray, cap: np.ndarray) -> np.ndarray:
        """Velocity [B, 16, 1, Hl, Wl] of the "turbo" or "normal" decoder."""

    def vae_decode(self, latent: np.ndarray) -> np.ndarray:
        """Latent [1, 16, Hl, Wl] -> image [1, 3, 8*Hl, 8*Wl] in [0, 1]."""

    # -- accounting -------------------------------------------------------------------------

    @property
    def forward_passes(self) -> int:
        """Backbone forward passes so far (prefill, block steps and commits each count one)."""


class CacheCounters:
    """Bookkeeping every backend shares: tokens in the KV cache, backbone passes run."""

    _len: int = 0
    _passes: int = 0

    @property
    def cache_len(self) -> int:
        return self._len

    @property
    def forward_passes(self) -> int:
        return self._passes


def fill_step_mask(out: np.ndarray, cache_valid: np.ndarray, keep: np.ndarray | None, block_valid: np.ndarray,
                   causal_blocks: bool, block_size: int = 32) -> np.ndarray:
    """The layer graphs' ``attn_mask`` [B, T, capacity+T], written into ``out`` (a reused buffer).

    Cache columns: valid entries (and, for SPRINT, kept ones); block columns: the block's valid tokens,
    block-causal within the new tokens for a prefill.
    """
    capacity = cache_valid.shape[1]
    tokens = block_valid.shape[1]
    out[:, :, :capacity] = cache_valid[:, None, :]
    if keep is not None:
        out[:, :, :keep.shape[1]] &= keep[:, None, :]
    out[:, :, capacity:] = block_valid[:, None, :]
    if causal_blocks:
        blk = np.arange(tokens) // block_size
        out[:, :, capacity:] &= (blk[None, :] <= blk[:, None])[None]
    return out


BACKENDS = ("auto", "torch", "onnxruntime", "tensorrt")


def is_build_folder(path: str | Path) -> bool:
    return (Path(path) / "manifest.json").is_file()


def resolve_backend(name: str, path: str | Path) -> str:
    """``auto``: a build folder runs on onnxruntime, a checkpoint folder on the torch reference."""
    from llada_edge.errors import InputError

    if name not in BACKENDS:
        raise InputError(f"unknown backend {name!r} (available: {', '.join(BACKENDS)})")
    build = is_build_folder(path)
    if name == "auto":
        return "onnxruntime" if build else "torch"
    if name in ("onnxruntime", "tensorrt") and not build:
        raise InputError(f"{path}: the {name} backend runs a build folder (manifest.json); create one with "
                         "`llada-edge export --checkpoint DIR --out BUILD`")
    if name == "torch" and build:
        raise InputError(f"{path}: the torch backend runs a checkpoint folder, not a build folder")
    return name


def create_backend(name: str, path: str | Path, **options: object) -> Backend:
    """Instantiate a backend by name; its heavy imports happen here, not at module import."""
    name = resolve_backend(name, path)
    if name == "torch":
        from llada_edge.runtime.backends.torch_backend import TorchBackend

        return TorchBackend(path, **options)  # type: ignore[arg-type]
    if name == "tensorrt":
        from llada_edge.runtime.backends.tensorrt_backend import TensorRTBackend

        return TensorRTBackend(path, **options)  # type: ignore[arg-type]
    from llada_edge.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend

    return OnnxRuntimeBackend(path, **options)  # type: ignore[arg-type]
