"""One spec per exported component (TensorRT demoDiffusion style): I/O names, dtypes, which axes are
dynamic, the sizes used to trace them, and the min/opt/max shapes a TensorRT profile should cover.

Pure data: each component of :mod:`llada_edge.components` builds its own spec from the model config.

Named dims (strings in a shape) are dynamic. Trace sizes are distinct and > 1 so the exporter keeps
them symbolic (torch.export specialises 0/1-sized dims and merges equal ones).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class TensorSig:
    dtype: str  # numpy dtype name: float32, int64, bool
    shape: tuple[int | str, ...]

    def resolve(self, dims: dict[str, int]) -> tuple[int, ...]:
        return tuple(dims[d] if isinstance(d, str) else d for d in self.shape)

    def to_dict(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class ComponentSpec:
    name: str
    inputs: dict[str, TensorSig]
    outputs: dict[str, TensorSig]
    trace_dims: dict[str, int]
    # TensorRT optimisation profile per named dim: (min, opt, max), around the runtime's shapes.
    profile: dict[str, tuple[int, int, int]] = field(default_factory=dict)

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {name: {i: d for i, d in enumerate(sig.shape) if isinstance(d, str)}
                for name, sig in self.inputs.items()}

    def io_dict(self) -> dict[str, Any]:
        return {"inputs": {k: v.to_dict() for k, v in self.inputs.items()},
                "outputs": {k: v.to_dict() for k, v in self.outputs.items()},
                "profile": {k: list(v) for k, v in self.profile.items()}}


def f32(*shape: int | str) -> TensorSig:
    return TensorSig("float32", shape)


def i64(*shape: int | str) -> TensorSig:
    return TensorSig("int64", shape)
