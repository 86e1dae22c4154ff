"""The backends behind the :class:`~llada_edge.runtime.backend.Backend` protocol, created by name.

* ``torch``: :class:`~llada_edge.runtime.backends.torch_backend.TorchBackend` (a checkpoint folder);
* ``onnxruntime``: :class:`~llada_edge.runtime.backends.onnxruntime_backend.OnnxRuntimeBackend` (a build folder);
* ``tensorrt``: :class:`~llada_edge.runtime.backends.tensorrt_backend.TensorRTBackend` (a build folder, GPU).

Each implementation is imported only when it is created, so choosing onnxruntime never imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llada_edge.buildfolder import is_build_folder
from llada_edge.errors import InputError
from llada_edge.runtime.backend import Backend

BACKENDS = ("auto", "torch", "onnxruntime", "tensorrt")


@dataclass(frozen=True)
class BackendOptions:
    """The options a user picks once (the CLI's ``--precision``, ``--device``, ``--dtype``); each backend takes
    the ones that apply to it."""

    precision: str = "fp32"  # onnxruntime, tensorrt: which engines of the build
    device: str = "cpu"  # torch
    dtype: str = "float32"  # torch
    threads: int | None = None  # onnxruntime: intra-op threads per session (None: ONNX Runtime's, one per core)
    cuda_graphs: bool = False  # torch: one CUDA graph per step shape (static shapes, sparse grouped MoE)
    fp8: str | None = None  # torch: FP8 projections with "token" or "tensor" activation scales

    def for_backend(self, name: str) -> dict[str, Any]:
        if name == "torch":
            return {"device": self.device, "dtype": self.dtype, "cuda_graphs": self.cuda_graphs, "fp8": self.fp8}
        if name == "onnxruntime" and self.threads:
            return {"precision": self.precision, "threads": self.threads}
        return {"precision": self.precision}


def resolve_backend(name: str, path: str | Path) -> str:
    """``auto``: a build folder runs on onnxruntime, a checkpoint folder on the torch reference."""
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


def create_backend(name: str, path: str | Path, options: BackendOptions | None = None, **extra: Any) -> Backend:
    """Instantiate a backend by name (``auto`` resolves by folder); ``extra`` are backend-specific keywords
    (``threads``, ``kv_cache``, ``cuda_graphs``...)."""
    name = resolve_backend(name, path)
    kwargs = {**(options.for_backend(name) if options is not None else {}), **extra}
    if name == "torch":
        from llada_edge.runtime.backends.torch_backend import TorchBackend

        return TorchBackend(path, **kwargs)
    if name == "tensorrt":
        from llada_edge.runtime.backends.tensorrt_backend import TensorRTBackend

        return TensorRTBackend(path, **kwargs)
    from llada_edge.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend

    return OnnxRuntimeBackend(path, **kwargs)
