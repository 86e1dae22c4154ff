"""The engine session shared by the graph backends (ONNX Runtime, TensorRT): the KV cache bookkeeping of one
request, written once.

One session = one request with ``rows`` sequences that share block positions. The cache of every layer has
a fixed ``capacity`` (tokens per row) and a per-row validity mask, so left pads of CFG rows and SPRINT-pruned
keys are simply invalid entries and the graphs always see fixed shapes during a request. A backbone pass
is: the step's ``attn_mask`` [B, T, capacity+T] written into the step's host buffer (:func:`fill_step_mask`),
then the backend's :meth:`EngineSession._launch` (embed + every layer); ``prefill`` and ``commit`` then copy
the block's K/V into the cache at the current length (:meth:`EngineSession._store_block`).

A backend supplies where memory lives (numpy arrays bound through IO binding, or device buffers) through
the abstract hooks; the order of calls, the masks, the capacity checks and the counters are all here.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np
import numpy.typing as npt

from llada_edge.components import Registry
from llada_edge.config import BLOCK_SIZE, ModelConfig
from llada_edge.errors import InputError

ArrayT = TypeVar("ArrayT")  # host numpy arrays, or device buffers
Allocate = Callable[[tuple[int, ...], npt.DTypeLike], Any]  # (shape, dtype) -> a zeroed buffer


@dataclass
class StepBuffers(Generic[ArrayT]):
    """The I/O of one (rows, tokens) step shape, allocated once: ids/positions [B, T], attn_mask [B, T, capacity+T],
    two hidden [B, T, D] buffers the graphs ping-pong between, and each layer's block K/V [B, Hkv, T, hd]."""

    ids: ArrayT
    positions: ArrayT
    mask: ArrayT
    hidden: tuple[ArrayT, ArrayT]
    k_blk: list[ArrayT]
    v_blk: list[ArrayT]


StepT = TypeVar("StepT", bound=StepBuffers[Any])


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


def check_capacity(used: int, adding: int, capacity: int) -> None:
    if used + adding > capacity:
        raise InputError(f"KV cache capacity {capacity} exceeded ({used} + {adding} tokens)")


def fill_step_mask(out: np.ndarray, cache_valid: np.ndarray, keep: np.ndarray | None, block_valid: np.ndarray,
                   causal_blocks: bool, block_size: int) -> np.ndarray:
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


class EngineSession(CacheCounters, ABC, Generic[StepT]):
    """The backbone half of the Backend protocol over per-component graphs; ``StepT`` is a backend's buffers
    for one (rows, tokens) step shape (:class:`StepBuffers` plus what the backend keeps with them)."""

    provides_key_importance = False  # the graphs output no attention scores (SPRINT pruning needs them)
    fused_step_kinds: tuple[str, ...] = ()  # the head is its own graph: forward_block, then head_sample
    build_dir: Path
    float_dtype: np.dtype[Any] = np.dtype(np.float32)  # hidden states and block K/V: the graphs' float type

    def __init__(self, config: ModelConfig) -> None:
        self.config = config
        self.registry = Registry(config)
        self._valid = np.zeros((0, 0), bool)  # [rows, capacity]: which cache entries hold a real key
        self._keep: np.ndarray | None = None  # SPRINT: cache entries the block steps may attend
        self._block_size = BLOCK_SIZE
        self._len = 0
        self._passes = 0
        self._k: list[Any] = []  # per layer: the K cache [rows, Hkv, capacity, hd] (host or device buffers)
        self._v: list[Any] = []

    @abstractmethod
    def _has_graph(self, name: str) -> bool:
        """Whether the build holds something this backend runs for the component ``name``."""

    def _missing_hint(self, names: list[str]) -> str:
        return f"export them (`llada-edge export --components {' '.join(names)}`) and build them"

    def require(self, components: Sequence[str], task: str) -> None:
        missing = [name for name in components if not self._has_graph(name)]
        if missing:
            raise InputError(f"{self.build_dir}: {task} needs {', '.join(missing)}, which this build lacks; "
                             f"{self._missing_hint(missing)}")

    # -- shared by the backends --------------------------------------------------------------------

    def _cache_shape(self, rows: int, capacity: int) -> tuple[int, int, int, int]:
        b = self.config.backbone
        return rows, b.num_key_value_heads, capacity, b.head_dim

    def _step_arrays(self, allocate: Allocate, rows: int, tokens: int) -> dict[str, Any]:
        """The :class:`StepBuffers` fields of a step shape, from the backend's allocator (keywords for its class)."""
        b = self.config.backbone
        block_kv = self._cache_shape(rows, tokens)
        layers = self.registry.layers
        return {"ids": allocate((rows, tokens), np.int64), "positions": allocate((rows, tokens), np.int64),
                "mask": allocate((rows, tokens, self._valid.shape[1] + tokens), np.bool_),
                "hidden": tuple(allocate((rows, tokens, b.hidden_size), self.float_dtype) for _ in range(2)),
                "k_blk": [allocate(block_kv, self.float_dtype) for _ in layers],
                "v_blk": [allocate(block_kv, self.float_dtype) for _ in layers]}

    def _step_graphs(self, step: StepT) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
        """(component, inputs, outputs) of each graph of a backbone pass, in order: embed, then every layer
        reading one hidden buffer and writing the other; the result lands in :meth:`_final_hidden`."""
        embed = self.registry.embed
        yield embed.name, embed.feeds(step.ids), embed.outputs(step.hidden[0])
        cur, nxt = step.hidden
        for i, layer in enumerate(self.registry.layers):
            yield (layer.name, layer.feeds(cur, step.positions, self._k[i], self._v[i], step.mask),
                   layer.outputs(nxt, step.k_blk[i], step.v_blk[i]))
            cur, nxt = nxt, cur

    def _final_hidden(self, step: StepT) -> Any:
        return step.hidden[len(self.registry.layers) % 2]

    # -- what a backend supplies -------------------------------------------------------------------

    @abstractmethod
    def _allocate_cache(self, rows: int, capacity: int) -> None:
        """(Re)allocate ``_k``/``_v`` (:meth:`_cache_shape` per layer); step buffers of the old shape go."""

    def _reset_cache(self) -> None:
        """Prepare the cache for a new request (nothing by default: invalid entries are masked anyway)."""

    @abstractmethod
    def _step_buffers(self, rows: int, tokens: int) -> StepT:
        """The preallocated buffers of a step shape (created on first use, reused after)."""

    @abstractmethod
    def _mask_of(self, step: StepT) -> np.ndarray:
        """The host buffer the step's attn_mask is written into."""

    @abstractmethod
    def _launch(self, step: StepT, ids: np.ndarray, positions: np.ndarray, graphable: bool) -> None:
        """Run embed + every layer for the step (``graphable``: a block step, whose shape repeats)."""

    @abstractmethod
    def _store_block(self, step: StepT, start: int, tokens: int) -> None:
        """Copy every layer's block K/V of the step into the cache at columns ``start .. start+tokens``."""

    @abstractmethod
    def _hidden_of(self, step: StepT) -> np.ndarray:
        """The final hidden states [B, T, D] of the step, on the host."""

    # -- the session ------------------------------------------------------------------------------

    def start(self, rows: int, capacity: int, block_size: int = BLOCK_SIZE) -> None:
        if self._valid.shape != (rows, capacity):
            self._allocate_cache(rows, capacity)
            self._valid = np.zeros((rows, capacity), bool)
        self._reset_cache()
        self._valid[:] = False
        self._keep = None
        self._len = 0
        self._block_size = block_size

    def _forward(self, ids: np.ndarray, positions: np.ndarray, valid: np.ndarray, prefill: bool,
                 use_keep: bool) -> StepT:
        step = self._step_buffers(*ids.shape)
        fill_step_mask(self._mask_of(step), self._valid, self._keep if use_keep else None, valid, prefill,
                       self._block_size)
        self._launch(step, ids, positions, graphable=not prefill)
        self._passes += 1
        return step

    def _append(self, step: StepT, valid: np.ndarray) -> None:
        tokens = valid.shape[1]
        check_capacity(self._len, tokens, self._valid.shape[1])
        self._store_block(step, self._len, tokens)
        self._valid[:, self._len:self._len + tokens] = valid
        self._len += tokens

    def prefill(self, ids: np.ndarray, positions: np.ndarray, valid: np.ndarray) -> None:
        if self._len:
            raise RuntimeError("prefill must come first in a session")
        self._append(self._forward(ids, positions, valid, prefill=True, use_keep=False), valid)

    def forward_block(self, ids: np.ndarray, positions: np.ndarray, valid: np.ndarray,
                      key_importance: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        if key_importance:
            raise InputError("SPRINT prefix pruning needs attention scores, which the exported graphs do not "
                             "output; use keep ratio 1.0 on this backend, or the torch backend")
        return self._hidden_of(self._forward(ids, positions, valid, prefill=False, use_keep=True)), None

    def forward_sample(self, kind: str, ids: np.ndarray, positions: np.ndarray, valid: np.ndarray,
                       row_weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The block step, then the head's own graph (``fused_step_kinds`` is empty: the sampler does not call
        this, it is here for callers that want one call per step whatever the backend)."""
        hidden, _ = self.forward_block(ids, positions, valid)
        return self.head_sample(kind, hidden, row_weights)

    @abstractmethod
    def head_sample(self, kind: str, hidden: np.ndarray, row_weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The fused CFG + greedy head graph (see the Backend protocol)."""

    def commit(self, ids: np.ndarray, positions: np.ndarray, valid: np.ndarray) -> None:
        self._append(self._forward(ids, positions, valid, prefill=False, use_keep=False), valid)

    def set_cache_mask(self, keep: np.ndarray | None) -> None:
        self._keep = None if keep is None else keep.astype(bool)

    def hidden_states(self, ids: np.ndarray, positions: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """Final hidden states of a whole sequence (block-causal, no cache): for accuracy checks."""
        self.start(ids.shape[0], 1)
        return self._hidden_of(self._forward(ids, positions, valid, prefill=True, use_keep=False)).copy()
