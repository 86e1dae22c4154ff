"""The GPU libraries, imported on demand with a clear error when missing: the TensorRT module of a target
(``tensorrt`` or ``tensorrt_rtx``: the same API) and cuda-python's runtime binding.

Nothing here touches a GPU: importing the bindings works on any machine (cuda-python answers
``cudaErrorInsufficientDriver`` without a driver), so everything up to the first CUDA call is testable on a CPU.
"""

from __future__ import annotations

import importlib
from typing import Any

from llada_edge.errors import InputError

TENSORRT_MODULES = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx"}
INSTALL_HINTS = {
    "tensorrt": "TensorRT is not installed: the tensorrt target needs the tensorrt Python package (from NVIDIA's "
                "index: pip install tensorrt) and an NVIDIA GPU; on a machine without one, use tensorrt-rtx (builds "
                "without a GPU) or onnxruntime",
    "tensorrt-rtx": "TensorRT-RTX is not installed: pip install 'llada-edge[rtx]' (tensorrt-rtx 1.7.1.116)",
    "cuda": "cuda-python is not installed: pip install 'llada-edge[rtx]' (cuda-python 13)",
}


def import_tensorrt(target: str) -> Any:
    """The TensorRT module of ``target`` (``tensorrt`` or ``tensorrt-rtx``)."""
    if target not in TENSORRT_MODULES:
        raise InputError(f"unknown TensorRT target {target!r} (expected one of {list(TENSORRT_MODULES)})")
    try:
        module = importlib.import_module(TENSORRT_MODULES[target])
    except ImportError:
        raise InputError(INSTALL_HINTS[target]) from None
    if not hasattr(module, "Builder"):  # e.g. the empty namespace package a stubs-only install leaves behind
        raise InputError(f"{INSTALL_HINTS[target]} (found `{TENSORRT_MODULES[target]}` without its bindings)")
    return module


def import_cudart() -> Any:
    """cuda-python's runtime API (``cuda.bindings.runtime``; ``cuda.cudart`` before cuda-python 12.6)."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # type: ignore[attr-defined,no-redef,unused-ignore]
        except ImportError:
            raise InputError(INSTALL_HINTS["cuda"]) from None
    return cudart


class CudaError(RuntimeError):
    """A CUDA runtime call returned an error."""


def cuda_check(result: Any, call: str = "CUDA call") -> Any:
    """cuda-python returns ``(error, *values)``: raise on error, return the value(s)."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise CudaError(f"{call} failed: {err}")
    return values[0] if len(values) == 1 else (values or None)
