"""The ``Backend`` protocol: what the numpy sampler needs from an engine, numpy in and out.

The sampler owns the *logic* (which tokens to commit, CFG, SPRINT); a backend owns the *compute* and
the KV cache. One session = one request with ``rows`` sequences (1, or 2/3 with CFG) that share
block positions; the cache has a fixed ``capacity`` (tokens per row) and a per-row validity mask, so
left pads of CFG rows and SPRINT-pruned keys are simply invalid entries.

Calls, in order, for one request::

    backend.start(rows, capacity, block_size)
    backend.prefill(ids, positions, valid)        # the complete prompt blocks -> cache
    for each block:
        for each step:
            hidden = backend.forward_block(ids, positions, valid)     # block vs cache + itself
            logits = backend.head_image(hidden)  (or head_text; or head_sample when fused)
        backend.commit(ids, positions, valid)     # final block tokens -> their K/V appended

Optional capabilities are declared here too, so the sampler and the accuracy report never probe for
methods: ``fused_head_kinds`` (heads with a fused CFG + greedy graph, :meth:`Backend.head_sample`),
``fused_step_kinds`` (heads that :meth:`Backend.forward_sample` runs in one call with the block step, the
hidden states never leaving the device),
``provides_key_importance`` (attention mass for SPRINT pruning) and :meth:`Backend.hidden_states`.

Implementations (``backends/``, created by :func:`llada_edge.runtime.backends.create_backend`): ``torch``
(the PyTorch reference; a CUDA-graph mode for CUDA devices), ``onnxruntime`` (build folders, CPU) and
``tensorrt`` (build folders, GPU; one CUDA graph per step shape); the last two share their session logic
(:mod:`~llada_edge.runtime.backends.engine_session`). The CUDA-graph and TensorRT paths have not run on
this project's machines (no GPU, no TensorRT). Nothing in this module imports torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from llada_edge.config import BLOCK_SIZE, ModelConfig


@runtime_checkable
class Backend(Protocol):
    name: str
    config: ModelConfig
    #: Heads ("text", "image") whose fused graph :meth:`head_sample` can run; empty when there are none.
    fused_head_kinds: tuple[str, ...]
    #: Heads ("text", "image") that :meth:`forward_sample` runs together with the block step; empty when none.
    fused_step_kinds: tuple[str, ...]
    #: Whether ``forward_block(..., key_importance=True)`` returns attention mass (SPRINT prefix pruning).
    provides_key_importance: bool

    # -- backbone session -------------------------------------------------------------------

    def start(self, rows: int, capacity: int, block_size: int = BLOCK_SIZE) -> None:
        """Begin a request: an empty KV cache for ``rows`` sequences of up to ``capacity`` tokens, generated
        in blocks of ``block_size`` (a prefill is block-causal on it)."""

    def prefill(self, ids: np.ndarray, positions: np.ndarray, valid: np.ndarray) -> None:
        """Append the K/V of a prefix [B, L] (block-causal attention within it, then the cache)."""

    def forward_block(self, ids: np.ndarray, positions: np.ndarray, valid: np.ndarray,
                      key_importance: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """Hidden states [B, T, D] of one block attending to the valid cache entries plus itself.

        With ``key_importance``, also the attention mass the block puts on each cached key, averaged
        over layers, heads and block queries: [B, cache_len] (SPRINT's pruning score).
        """

    def forward_sample(self, kind: str, ids: np.ndarray, positions: np.ndarray, valid: np.ndarray,
                       row_weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For a kind in ``fused_step_kinds``: :meth:`forward_block` then :meth:`head_sample` in one call, (x0 [T]
        int64, p [T]); only these 2T numbers come back to the host (one synchronisation per step)."""

    def commit(self, ids: np.ndarray, positions: np.ndarray, valid: np.ndarray) -> None:
        """Run the final tokens of a block and append their K/V to the cache."""

    def set_cache_mask(self, keep: np.ndarray | None) -> None:
        """Restrict attention to cache entries where ``keep`` [B, cache_len] is true (None: all valid)."""

    @property
    def cache_len(self) -> int:
        """Tokens per row currently in the cache."""

    def hidden_states(self, ids: np.ndarray, positions: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """Final hidden states [B, L, D] of a whole sequence (block-causal, no cache): accuracy checks."""

    # -- heads ------------------------------------------------------------------------------

    def head_text(self, hidden: np.ndarray) -> np.ndarray:
        """Full-vocabulary logits [B, T, vocab] (fp32)."""

    def head_image(self, hidden: np.ndarray) -> np.ndarray:
        """Image-code logits [B, T, num_image_tokens] (fp32): lm_head rows image_token_offset.. only."""

    def head_sample(self, kind: str, hidden: np.ndarray, row_weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For a kind in ``fused_head_kinds``: the rows combined by ``row_weights`` (CFG), then x0 = argmax and
        p = its softmax probability, (x0 [T] int64, p [T]), without [B, T, vocab] logits leaving the engine."""

    # -- image side -------------------------------------------------------------------------

    def require(self, components: Sequence[str], task: str) -> None:
        """Raise :class:`~llada_edge.errors.InputError` naming what is missing when this backend cannot run one of
        these graphs (registry names: ``vision_tokenizer``, ``sigvq``, ``dit_turbo``, ``vae_decoder``...). The
        pipeline asks before a request starts, so a build without a decoder fails at once, not after its tokens."""

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
