"""A scripted numpy backend for sampler unit tests: logits are whatever the test says they are."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from llada_edge.config import ModelConfig
from llada_edge.runtime.backends.engine_session import CacheCounters

LogitsFn = Callable[[np.ndarray, np.ndarray, int], np.ndarray]  # (block ids, positions, call no.) -> logits


class ScriptedBackend(CacheCounters):
    """Implements the Backend protocol's backbone half in numpy; records every call.

    ``forward_block`` passes the block ids through as the "hidden state"; the head then asks
    ``logits_fn(ids [B,T], positions [B,T], call_index)`` for logits [B, T, V].
    """

    name = "scripted"
    fused_head_kinds: tuple[str, ...] = ()
    fused_step_kinds: tuple[str, ...] = ()
    provides_key_importance = True

    def __init__(self, config: ModelConfig, logits_fn: LogitsFn) -> None:
        self.config = config
        self.logits_fn = logits_fn
        self.calls: list[tuple[str, np.ndarray, np.ndarray]] = []
        self.masks: list[np.ndarray | None] = []
        self._len = 0
        self._passes = 0
        self._positions = np.zeros(0)

    def start(self, rows: int, capacity: int, block_size: int = 32) -> None:
        self._len = 0
        self.calls.append(("start", np.zeros((rows, 0)), np.zeros((rows, 0))))

    def prefill(self, ids, positions, valid) -> None:
        self.calls.append(("prefill", ids.copy(), positions.copy()))
        self._len += ids.shape[1]
        self._passes += 1

    def forward_block(self, ids, positions, valid, key_importance=False):
        self.calls.append(("block", ids.copy(), positions.copy()))
        self._passes += 1
        self._positions = positions.copy()
        importance = np.linspace(1.0, 0.0, self._len)[None].repeat(ids.shape[0], 0) if key_importance else None
        return np.stack([ids, positions], axis=-1).astype(np.float32), importance

    def commit(self, ids, positions, valid) -> None:
        self.calls.append(("commit", ids.copy(), positions.copy()))
        self._len += ids.shape[1]
        self._passes += 1

    def set_cache_mask(self, keep) -> None:
        self.masks.append(None if keep is None else keep.copy())

    def _head(self, hidden: np.ndarray) -> np.ndarray:
        n_blocks = sum(1 for c in self.calls if c[0] == "block")
        return self.logits_fn(hidden[..., 0].astype(np.int64), hidden[..., 1].astype(np.int64), n_blocks - 1)

    head_text = _head
    head_image = _head


@pytest.fixture(scope="session")
def tiny_config(tiny_ckpt: Path) -> ModelConfig:
    return ModelConfig.from_folder(tiny_ckpt)


@pytest.fixture
def scripted(tiny_config: ModelConfig):
    def make(logits_fn: LogitsFn) -> ScriptedBackend:
        return ScriptedBackend(tiny_config, logits_fn)

    return make
