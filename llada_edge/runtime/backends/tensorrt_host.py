"""A host stand-in for the subset of cudart and of the TensorRT runtime that
:class:`~llada_edge.runtime.backends.tensorrt_backend.TensorRTBackend` uses, so the backend's own logic (buffers
per shape key, CUDA-graph capture and replay, strided cache commits, fused heads, I/O types) runs end to end on a
machine without a GPU.

* :class:`HostCudart`: every call first goes to the **real** cuda-python binding with the same arguments, so a
  wrong argument count or type raises there (``TypeError``), and the binding answers "no driver"; then the call is
  carried out on host memory: ``cudaMalloc`` hands out zeroed host buffers, copies and memsets are checked to stay
  inside the buffers they touch (a wrong pitch or offset fails instead of corrupting memory), and a stream under
  capture records its operations into a graph that ``cudaGraphLaunch`` replays.
* :class:`HostTensorRT`: ``Runtime.deserialize_cuda_engine(plan)`` finds the plan in the build's manifest by its
  sha256 and runs the graph the engine was built from (the entry's ``source``) on ONNX Runtime's CPU provider; an
  execution context reads its inputs from, and writes its outputs to, the addresses it was given, with the graph's
  I/O types (a strongly typed engine's I/O types are its graph's).

What this does **not** check: anything inside TensorRT (kernels, numerics of the engine, its memory needs), real
stream concurrency, or device-side timing. Those need a GPU.
"""

from __future__ import annotations

import ctypes
import hashlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np

from llada_edge.buildfolder import Manifest
from llada_edge.errors import InputError
from llada_edge.runtime.backends.gpu_libs import import_cudart

_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
              "tensor(int32)": np.int32, "tensor(bool)": np.bool_}


class StandInError(RuntimeError):
    """The backend did something a GPU would reject (an out-of-bounds copy, an unknown pointer or engine)."""


@dataclass
class _Capture:
    ops: list[Callable[[], object]] = field(default_factory=list)


class HostCudart:
    """The cudart subset the TensorRT backend calls, on host memory (see the module docstring)."""

    def __init__(self) -> None:
        self.real = import_cudart()
        self.cudaMemcpyKind = self.real.cudaMemcpyKind
        self.cudaStreamCaptureMode = self.real.cudaStreamCaptureMode
        self.calls: Counter[str] = Counter()
        self._buffers: dict[int, np.ndarray] = {}  # address -> its host buffer
        self._capturing: dict[int, _Capture] = {}  # stream -> the graph being recorded
        self._graphs: dict[int, _Capture] = {}
        self._next_handle = 1

    # -- plumbing -----------------------------------------------------------------------------------

    def _real(self, name: str, *args: Any) -> None:
        """The real binding first: it checks the arguments; without a GPU it must answer with an error."""
        self.calls[name] += 1
        result = getattr(self.real, name)(*args)
        err = result[0] if isinstance(result, tuple) else result
        if int(err) == 0:
            raise StandInError(f"{name} succeeded on a real GPU: use the real TensorRT backend, not the stand-in")

    def _handle(self, kind: Callable[[int], Any]) -> Any:
        self._next_handle += 1
        return kind(self._next_handle)

    def _check(self, address: int, nbytes: int, what: str) -> None:
        """``[address, address + nbytes)`` must lie inside one buffer from ``cudaMalloc``."""
        for base, buf in self._buffers.items():
            if base <= address and address + nbytes <= base + buf.nbytes:
                return
        raise StandInError(f"{what}: {nbytes} bytes at {address:#x} are outside every device buffer")

    def _run(self, stream: Any, op: Callable[[], object]) -> None:
        capture = self._capturing.get(int(stream))
        if capture is not None:
            capture.ops.append(op)
        else:
            op()

    # -- the API ------------------------------------------------------------------------------------

    def cudaMalloc(self, size: int) -> tuple[int, int]:
        self._real("cudaMalloc", size)
        buf = np.zeros(size, np.uint8)
        self._buffers[buf.ctypes.data] = buf
        return 0, buf.ctypes.data

    def cudaFree(self, ptr: int) -> tuple[int]:
        self._real("cudaFree", ptr)
        if self._buffers.pop(int(ptr), None) is None:
            raise StandInError(f"cudaFree of {int(ptr):#x}, which cudaMalloc did not return (or was freed)")
        return (0,)

    def cudaStreamCreate(self) -> tuple[int, Any]:
        self._real("cudaStreamCreate")
        return 0, self._handle(self.real.cudaStream_t)

    def cudaStreamDestroy(self, stream: Any) -> tuple[int]:
        self._real("cudaStreamDestroy", stream)
        if int(stream) in self._capturing:
            raise StandInError("cudaStreamDestroy of a stream under capture")
        return (0,)

    def cudaStreamSynchronize(self, stream: Any) -> tuple[int]:
        self._real("cudaStreamSynchronize", stream)
        if int(stream) in self._capturing:
            raise StandInError("cudaStreamSynchronize on a stream under capture")
        return (0,)

    def cudaMemcpyAsync(self, dst: int, src: int, count: int, kind: Any, stream: Any) -> tuple[int]:
        self._real("cudaMemcpyAsync", dst, src, count, kind, stream)
        k = self.real.cudaMemcpyKind
        if kind in (k.cudaMemcpyHostToDevice, k.cudaMemcpyDeviceToDevice):
            self._check(dst, count, "cudaMemcpyAsync destination")
        if kind in (k.cudaMemcpyDeviceToHost, k.cudaMemcpyDeviceToDevice):
            self._check(src, count, "cudaMemcpyAsync source")
        self._run(stream, lambda: ctypes.memmove(dst, src, count))
        return (0,)

    def cudaMemcpy2DAsync(self, dst: int, dpitch: int, src: int, spitch: int, width: int, height: int, kind: Any,
                          stream: Any) -> tuple[int]:
        self._real("cudaMemcpy2DAsync", dst, dpitch, src, spitch, width, height, kind, stream)
        if width > dpitch or width > spitch:
            raise StandInError(f"cudaMemcpy2DAsync: width {width} exceeds a pitch ({dpitch}, {spitch})")
        if height:
            self._check(dst, dpitch * (height - 1) + width, "cudaMemcpy2DAsync destination")
            self._check(src, spitch * (height - 1) + width, "cudaMemcpy2DAsync source")

        def copy() -> None:
            for row in range(height):
                ctypes.memmove(dst + row * dpitch, src + row * spitch, width)

        self._run(stream, copy)
        return (0,)

    def cudaMemsetAsync(self, ptr: int, value: int, count: int, stream: Any) -> tuple[int]:
        self._real("cudaMemsetAsync", ptr, value, count, stream)
        self._check(ptr, count, "cudaMemsetAsync")
        self._run(stream, lambda: ctypes.memset(ptr, value, count))
        return (0,)

    def cudaStreamBeginCapture(self, stream: Any, mode: Any) -> tuple[int]:
        self._real("cudaStreamBeginCapture", stream, mode)
        if int(stream) in self._capturing:
            raise StandInError("cudaStreamBeginCapture on a stream already under capture")
        self._capturing[int(stream)] = _Capture()
        return (0,)

    def cudaStreamEndCapture(self, stream: Any) -> tuple[int, Any]:
        self._real("cudaStreamEndCapture", stream)
        capture = self._capturing.pop(int(stream), None)
        if capture is None:
            raise StandInError("cudaStreamEndCapture without cudaStreamBeginCapture")
        graph = self._handle(self.real.cudaGraph_t)
        self._graphs[int(graph)] = capture
        return 0, graph

    def cudaGraphInstantiate(self, graph: Any, flags: int) -> tuple[int, Any]:
        self._real("cudaGraphInstantiate", graph, flags)
        executable = self._handle(self.real.cudaGraphExec_t)
        self._graphs[int(executable)] = self._graphs[int(graph)]
        return 0, executable

    def cudaGraphDestroy(self, graph: Any) -> tuple[int]:
        self._real("cudaGraphDestroy", graph)
        return self._forget_graph(graph, "cudaGraphDestroy")

    def cudaGraphExecDestroy(self, executable: Any) -> tuple[int]:
        self._real("cudaGraphExecDestroy", executable)
        return self._forget_graph(executable, "cudaGraphExecDestroy")

    def _forget_graph(self, handle: Any, call: str) -> tuple[int]:
        if self._graphs.pop(int(handle), None) is None:
            raise StandInError(f"{call} of a graph that does not exist (or was destroyed)")
        return (0,)

    @property
    def live(self) -> dict[str, int]:
        """What is still allocated: device buffers and graphs (a closed backend leaves nothing)."""
        return {"buffers": len(self._buffers), "graphs": len(self._graphs)}

    def cudaGraphLaunch(self, executable: Any, stream: Any) -> tuple[int]:
        self._real("cudaGraphLaunch", executable, stream)
        if int(executable) not in self._graphs:
            raise StandInError("cudaGraphLaunch of a graph that does not exist (or was destroyed)")
        for op in self._graphs[int(executable)].ops:
            self._run(stream, op)
        return (0,)

    # -- for the context ------------------------------------------------------------------------------

    def view(self, address: int, shape: tuple[int, ...], dtype: np.dtype[Any], what: str) -> np.ndarray:
        """A numpy view of device memory (checked to lie inside one buffer)."""
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        self._check(address, nbytes, what)
        return np.ctypeslib.as_array(ctypes.cast(address, ctypes.POINTER(ctypes.c_uint8)), (max(nbytes, 1),)
                                     )[:nbytes].view(dtype).reshape(shape)

    def enqueue(self, stream: Any, op: Callable[[], None]) -> None:
        self._run(stream, op)


class TensorIOMode(Enum):
    INPUT = 1
    OUTPUT = 2


class HostEngine:
    """An engine of the build, run as the ONNX graph it was built from."""

    def __init__(self, cudart: HostCudart, graph: Path, name: str) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.enable_mem_reuse = False  # ORT 1.32's CPU provider mis-reuses fp16 buffers across dynamic shapes
        self.name = name
        self.cudart = cudart
        self.session = ort.InferenceSession(str(graph), opts, providers=["CPUExecutionProvider"])
        unknown = [v for v in [*self.session.get_inputs(), *self.session.get_outputs()] if v.type not in _ORT_TYPES]
        if unknown:  # bf16: ONNX Runtime's CPU provider has no kernels for it
            raise StandInError(f"{name}: the stand-in runs engines on ONNX Runtime's CPU provider, which cannot run "
                               f"{unknown[0].name} of type {unknown[0].type}")
        self.io = {i.name: (TensorIOMode.INPUT, np.dtype(_ORT_TYPES[i.type])) for i in self.session.get_inputs()}
        self.io.update({o.name: (TensorIOMode.OUTPUT, np.dtype(_ORT_TYPES[o.type]))
                        for o in self.session.get_outputs()})
        self.names = list(self.io)

    @property
    def num_io_tensors(self) -> int:
        return len(self.names)

    def get_tensor_name(self, index: int) -> str:
        return self.names[index]

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        return self.io[name][0]

    def get_tensor_dtype(self, name: str) -> np.dtype[Any]:
        return self.io[name][1]

    def create_runtime_config(self) -> HostRuntimeConfig:
        return HostRuntimeConfig()

    def create_execution_context(self, config: HostRuntimeConfig | None = None) -> HostContext:
        return HostContext(self)


class HostRuntimeCache:
    """TensorRT-RTX's runtime cache (JIT-compiled kernels): nothing to compile here, so it stays empty."""

    def __init__(self) -> None:
        self.data = b""

    def serialize(self) -> bytes:
        return self.data

    def deserialize(self, data: bytes) -> bool:
        self.data = bytes(data)
        return True


class HostRuntimeConfig:
    def __init__(self) -> None:
        self.cache: HostRuntimeCache | None = None

    def create_runtime_cache(self) -> HostRuntimeCache:
        return HostRuntimeCache()

    def set_runtime_cache(self, cache: HostRuntimeCache) -> bool:
        self.cache = cache
        return True


class HostContext:
    def __init__(self, engine: HostEngine) -> None:
        self.engine = engine
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.runs = 0

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        if self.engine.get_tensor_mode(name) is not TensorIOMode.INPUT:
            raise StandInError(f"{self.engine.name}: set_input_shape of {name!r}, which is not an input")
        self.shapes[name] = tuple(int(d) for d in shape)
        return True

    def set_tensor_address(self, name: str, address: int) -> bool:
        if name not in self.engine.io:
            raise StandInError(f"{self.engine.name}: no tensor named {name!r}")
        self.addresses[name] = int(address)
        return True

    def _feeds(self, shapes_only: bool = False) -> dict[str, np.ndarray]:
        """The inputs as they are in device memory; ``shapes_only``: zeros of the set shapes (what TensorRT's shape
        inference needs: our graphs' output shapes depend on input shapes, not values)."""
        feeds = {}
        for name, (mode, dtype) in self.engine.io.items():
            if mode is not TensorIOMode.INPUT:
                continue
            if name not in self.shapes:
                raise StandInError(f"{self.engine.name}: input {name!r} has no shape (set_input_shape)")
            if shapes_only:
                feeds[name] = np.zeros(self.shapes[name], dtype)
                continue
            if name not in self.addresses:
                raise StandInError(f"{self.engine.name}: input {name!r} has no address (set_tensor_address)")
            feeds[name] = self.engine.cudart.view(self.addresses[name], self.shapes[name], dtype,
                                                  f"{self.engine.name} input {name}").copy()
        return feeds

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        if self.engine.get_tensor_mode(name) is TensorIOMode.INPUT:
            return self.shapes[name]
        outputs = self.engine.session.run([name], self._feeds(shapes_only=True))
        return tuple(outputs[0].shape)

    def execute_async_v3(self, stream_handle: Any) -> bool:
        int(stream_handle)  # TensorRT takes the stream as an integer handle

        def run() -> None:
            self.runs += 1
            names = [n for n, (mode, _t) in self.engine.io.items() if mode is TensorIOMode.OUTPUT]
            for name, value in zip(names, self.engine.session.run(names, self._feeds()), strict=True):
                if name not in self.addresses:
                    raise StandInError(f"{self.engine.name}: output {name!r} has no address")
                out = self.engine.cudart.view(self.addresses[name], value.shape, self.engine.io[name][1],
                                              f"{self.engine.name} output {name}")
                out[...] = value

        self.engine.cudart.enqueue(stream_handle, run)
        return True


class HostTensorRT:
    """The ``tensorrt`` module subset the backend uses: Logger, Runtime, TensorIOMode, nptype, __version__."""

    TensorIOMode = TensorIOMode

    class Logger:
        WARNING = 2

        def __init__(self, severity: int = 2) -> None:
            self.severity = severity

    def __init__(self, build_dir: Path, cudart: HostCudart) -> None:
        self.build_dir = Path(build_dir)
        self.cudart = cudart
        self.__version__ = "host-stand-in"
        self.engines_loaded: list[str] = []

    def nptype(self, dtype: np.dtype[Any]) -> type[np.generic]:
        return np.dtype(dtype).type

    def Runtime(self, logger: Any) -> HostRuntime:
        return HostRuntime(self)


class HostRuntime:
    def __init__(self, trt: HostTensorRT) -> None:
        self.trt = trt

    def deserialize_cuda_engine(self, plan: bytes) -> HostEngine | None:
        digest = hashlib.sha256(plan).hexdigest()
        manifest = Manifest.load(self.trt.build_dir)
        for name, entry in manifest.components.items():
            if entry.kind == "trt-engine" and any(f.sha256 == digest for f in entry.files):
                self.trt.engines_loaded.append(name)
                return HostEngine(self.trt.cudart, self.trt.build_dir / entry.meta["source"] / "model.onnx", name)
        return None  # as TensorRT does for a plan it cannot load


def host_libraries(build_dir: str | Path) -> tuple[HostTensorRT, HostCudart]:
    """``(tensorrt, cudart)`` stand-ins for ``TensorRTBackend(..., libraries=...)`` on a machine without a GPU."""
    try:
        cudart = HostCudart()
    except InputError as exc:
        raise InputError(f"the host stand-in checks every call against the real cuda-python binding: {exc}") from None
    return HostTensorRT(Path(build_dir), cudart), cudart
