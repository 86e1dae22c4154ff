"""What a component is: one object per exported graph that owns every fact the toolchain needs about it.

A :class:`Component` knows

* its ONNX contract (:attr:`spec`: I/O names, dynamic axes, trace sizes, TensorRT profile);
* which checkpoint tensors it is built from (:meth:`tensors`) and so what invalidates an export of it
  (:meth:`source_fingerprint`);
* how to build its exportable torch module (:meth:`build_module`; torch is imported only there);
* the inputs it is validated on (:meth:`validation_cases`);
* what a precision recipe does to it (:attr:`graph_kinds`, :meth:`weight_kind`);
* how its feeds are named (:meth:`feeds`, in the spec's input order).

Export, calibration, quantization, the engine builders and the runtime backends ask the component
instead of parsing its name. Importing this package needs numpy only.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from llada_edge.buildfolder.files import sha256_file
from llada_edge.components.specs import ComponentSpec
from llada_edge.config import ModelConfig

if TYPE_CHECKING:
    from torch import nn

    from llada_edge.checkpoint import CheckpointFolder, TensorReader

Case = tuple[str, dict[str, np.ndarray]]  # (label, feeds) of one validation input
T = TypeVar("T")


class Component(ABC):
    """One exported graph of the model."""

    #: Recipe kinds (see :mod:`llada_edge.calibration.recipes`) whose format decides the graph's single Q/DQ
    #: mode, in order of preference: the first one the recipe does not leave in fp32 wins. Empty: the
    #: graph holds no weight a recipe rewrites (a Gather table, convolutions) and is never quantized.
    graph_kinds: tuple[str, ...] = ()
    #: Every recipe kind its weights can take (:meth:`weight_kind`'s answers but "keep"): what keys its engines,
    #: so a recipe change rebuilds only the components it affects.
    extra_kinds: tuple[str, ...] = ()
    #: Calibration samples share a batch axis (ModelOpt's batch-concatenated ``.npz``); otherwise
    #: (image sizes, code counts differ) they are saved one file per sample.
    stacked_calibration: bool = False
    #: Per-output relative tolerances of the export validation where the default (1e-4 of max |reference|)
    #: does not measure the output's own precision; each entry says why.
    validation_tolerances: dict[str, float] = {}  # noqa: RUF012 (read-only, overridden per class)

    def __init__(self, config: ModelConfig, name: str) -> None:
        self.config = config
        self.name = name

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    # -- contract ---------------------------------------------------------------------------------

    @cached_property
    def spec(self) -> ComponentSpec:
        return self._spec()

    @abstractmethod
    def _spec(self) -> ComponentSpec: ...

    def feeds(self, *arrays: T) -> dict[str, T]:
        """Name positional inputs by the spec (numpy arrays, device buffers: whatever the caller binds)."""
        return dict(zip(self.spec.inputs, arrays, strict=True))

    def outputs(self, *arrays: T) -> dict[str, T]:
        """Name positional output buffers by the spec."""
        return dict(zip(self.spec.outputs, arrays, strict=True))

    # -- source -----------------------------------------------------------------------------------

    @abstractmethod
    def tensors(self, ckpt: CheckpointFolder) -> tuple[TensorReader | None, list[str]]:
        """The reader and keys the graph is built from (None: not a safetensors file, see :meth:`source_files`)."""

    @abstractmethod
    def config_fingerprint(self) -> list[Any]:
        """The config fields the graph depends on."""

    def source_files(self, ckpt: CheckpointFolder) -> list[Path]:
        """Files outside a safetensors reader that the graph is built from."""
        return []

    def source_fingerprint(self, ckpt: CheckpointFolder, sha256: Callable[[Path], str] = sha256_file) -> list[Any]:
        """Everything the graph depends on: its config and its tensors (header entries plus the name, size and
        sha256 of the files holding them: a rewritten shard invalidates the components in it, a copied checkpoint
        none). ``sha256`` can remember hashes across runs (:class:`~llada_edge.buildfolder.files.FileHashCache`)."""
        reader, keys = self.tensors(ckpt)
        if reader is None:
            files = self.source_files(ckpt)
            entries: list[Any] = []
        else:
            infos = [reader.info(k) for k in keys if k in reader]
            files = sorted({i.file for i in infos})
            entries = [[i.key, i.dtype, list(i.shape), i.file.name, i.begin, i.end] for i in infos]
        return [*self.config_fingerprint(), entries + [[f.name, f.stat().st_size, sha256(f)] for f in files]]

    def weight_bytes(self, ckpt: CheckpointFolder) -> int:
        """Stored bytes of the graph's weights (decides whether it is exported in its own process)."""
        reader, keys = self.tensors(ckpt)
        if reader is None:
            return sum(f.stat().st_size for f in self.source_files(ckpt))
        return sum(reader.info(k).nbytes for k in keys if k in reader)

    # -- export -----------------------------------------------------------------------------------

    @abstractmethod
    def build_module(self, ckpt: CheckpointFolder, moe: str = "dense") -> nn.Module:
        """The exportable fp32 module, built from only this component's tensors."""

    def moe_lowering(self, moe: str) -> str | None:
        """The MoE lowering this graph is exported with (None: it has no routed experts)."""
        return None

    @abstractmethod
    def validation_cases(self, rng: np.random.Generator) -> list[Case]:
        """Inputs the exported graph is compared with the reference on (the runtime's row layouts)."""

    # -- precision --------------------------------------------------------------------------------

    @property
    def quantized(self) -> bool:
        return bool(self.graph_kinds)

    @property
    def recipe_kinds(self) -> tuple[str, ...]:
        """The recipe kinds this component's weights can take."""
        return (*self.graph_kinds, *self.extra_kinds)

    def weight_kind(self, weight: str, feeds_argmax: bool) -> str:
        """The recipe kind of one constant matmul weight, or "keep" for weights no recipe touches."""
        return self.graph_kinds[0] if self.graph_kinds else "keep"


def settings(config: object) -> dict[str, Any]:
    """A config's fields for a cache key, without where it was read from (a copied checkpoint is the same one)."""
    return {k: v for k, v in vars(config).items() if k != "source"}


def float_inputs(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)
