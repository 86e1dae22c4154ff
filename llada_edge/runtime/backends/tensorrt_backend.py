"""The TensorRT backend: the ``<target>/<precision>/<component>`` engines of a build (``tensorrt`` or
``tensorrt-rtx``), on one CUDA stream.

* Device memory is allocated per request and per step shape, never per step: the KV cache of every
  layer ([B, Hkv, capacity, hd]), the step inputs (ids, positions, mask), hidden ping-pong buffers and
  each layer's block K/V. Step inputs are *uploaded into* those fixed buffers, so a captured CUDA
  graph stays valid from step to step. Their types are the engines' I/O types (fp16/bf16 graphs move half
  the bytes), read from the layer and embed engines, not assumed.
* CUDA graphs: the first step of a shape key (rows x block tokens x capacity) runs once eagerly
  (TensorRT sets up its resources), then the embed + all-layer enqueue sequence is captured into one
  graph and every later step of that key is a single ``cudaGraphLaunch``. A key whose capture fails
  falls back to eager enqueues and is recorded in ``graph_fallbacks``.
* Commits copy each layer's block K/V into the cache slice with one strided ``cudaMemcpy2DAsync``.
* TensorRT-RTX compiles its engines just in time on the RTX GPU; the runtime cache that keeps those kernels is
  loaded from and saved to ``engines/tensorrt-rtx/runtime.<version>.<architectures>.cache`` next to the engines.

Needs ``tensorrt`` (or ``tensorrt_rtx``) and ``cuda-python``; import-guarded (a clear InputError, exit code 2,
without them). On a real GPU this has **not run** (no RTX GPU or TensorRT GPU machine was available). Its logic
runs in the tests on :mod:`~llada_edge.runtime.backends.tensorrt_host` (``libraries=host_libraries(build)``):
cudart calls checked against the real cuda-python binding and carried out on host memory, engines run as their
graphs on ONNX Runtime.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from llada_edge.buildfolder import Artifact, Manifest, check_not_being_written
from llada_edge.config import ModelConfig
from llada_edge.errors import InputError
from llada_edge.runtime.backends.engine_session import EngineSession, StepBuffers
from llada_edge.runtime.backends.gpu_libs import TENSORRT_MODULES, cuda_check, import_cudart, import_tensorrt

if TYPE_CHECKING:  # the engine and context calls are checked against stubs of tensorrt_rtx's binding
    import tensorrt_rtx as tensorrt



class _DeviceArray:
    def __init__(self, cudart: Any, shape: tuple[int, ...], dtype: npt.DTypeLike) -> None:
        self.cudart, self.shape, self.dtype = cudart, tuple(shape), np.dtype(dtype)
        self.nbytes = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize
        self.ptr = cuda_check(cudart.cudaMalloc(max(self.nbytes, 1)))

    def upload(self, array: np.ndarray, stream: Any) -> None:
        src = np.ascontiguousarray(array, dtype=self.dtype)
        cuda_check(self.cudart.cudaMemcpyAsync(self.ptr, src.ctypes.data, src.nbytes,
                                        self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, stream))

    def download(self, stream: Any) -> np.ndarray:
        out = np.empty(self.shape, self.dtype)
        cuda_check(self.cudart.cudaMemcpyAsync(out.ctypes.data, self.ptr, self.nbytes,
                                        self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream))
        cuda_check(self.cudart.cudaStreamSynchronize(stream))
        return out

    def free(self) -> None:
        self.cudart.cudaFree(self.ptr)


@dataclass
class _Step(StepBuffers[_DeviceArray]):
    """Device buffers of one (rows, tokens) shape, its host-side mask buffer, and its captured graph."""

    host_mask: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 0), bool))  # uploaded into ``mask``
    graph: Any = None
    captured: bool = False


class TensorRTBackend(EngineSession[_Step]):
    name = "tensorrt"
    fused_head_kinds: tuple[str, ...] = ("text", "image")

    def __init__(self, build_dir: str | Path, precision: str = "fp32", cuda_graphs: bool = True,
                 verify: bool = True, target: str | None = None, libraries: tuple[Any, Any] | None = None) -> None:
        """``target``: ``tensorrt`` or ``tensorrt-rtx`` (default: the one the build has engines of); ``libraries``:
        ``(tensorrt module, cudart module)`` to use instead of the installed ones (the host stand-in)."""
        self.build_dir = Path(build_dir)
        check_not_being_written(self.build_dir)
        self.manifest = Manifest.load(self.build_dir)
        if verify:
            self.manifest.verify(self.build_dir)
        self.precision = precision
        super().__init__(ModelConfig.from_folder(self.build_dir / "model"))
        self.target = target or self._built_target()
        self.trt, self.cudart = libraries or (import_tensorrt(self.target), import_cudart())
        self.cuda_graphs = cuda_graphs
        self.graph_fallbacks: list[str] = []
        self._runtime = self.trt.Runtime(self.trt.Logger(self.trt.Logger.WARNING))
        self._engines: dict[str, tuple[tensorrt.ICudaEngine, tensorrt.IExecutionContext]] = {}
        self._runtime_cache: Any = None
        self.stream = self._create_stream()
        self._steps: dict[tuple[int, int], _Step] = {}
        self.float_dtype = self._backbone_dtype()  # fp32, or the half type of fp16/bf16 engines

    def _backbone_dtype(self) -> np.dtype[Any]:
        """The one float type of every tensor the backbone engines pass between them (embed output, each layer's
        hidden, cache and block K/V): the buffers are shared, so engines of mixed types are refused here."""
        embed = self.registry.embed
        found = {f"{embed.name}:{t}": self._io_dtype(embed.name, t) for t in embed.spec.outputs}
        for layer in self.registry.layers:
            found.update({f"{layer.name}:{t}": self._io_dtype(layer.name, t)
                          for t in [*layer.spec.inputs, *layer.spec.outputs] if t not in ("positions", "attn_mask")})
        kinds = sorted({str(d) for d in found.values()})
        if len(kinds) != 1:
            raise InputError(f"{self.build_dir}: the {self.precision} {self.target} backbone engines mix float types "
                             f"({', '.join(f'{k}={v}' for k, v in found.items())}); rebuild them with one --dtype")
        return next(iter(found.values()))

    def _create_stream(self) -> Any:
        err, stream = self.cudart.cudaStreamCreate()
        if int(err) != 0:
            where = "RTX GPUs" if self.target == "tensorrt-rtx" else "the GPU they were built on"
            raise InputError(f"the tensorrt backend needs an NVIDIA GPU and its driver; CUDA says {err} (engines of "
                             f"{self.target} run on {where}); on this machine use --backend onnxruntime")
        return stream

    def _built_target(self) -> str:
        embed = self.registry.embed.name
        built = [t for t in TENSORRT_MODULES
                 if Artifact.trt_engine(t, self.precision, embed).entry in self.manifest.components]
        if not built:
            raise InputError(f"{self.build_dir}: no {self.precision} TensorRT engines; run `llada-edge build "
                             f"--target tensorrt-rtx --precision {self.precision}` (or --target tensorrt)")
        return built[0]

    # -- engines ----------------------------------------------------------------------------------

    def _has_graph(self, name: str) -> bool:
        return Artifact.trt_engine(self.target, self.precision, name).entry in self.manifest.components

    def _missing_hint(self, names: list[str]) -> str:
        return (f"export them (`llada-edge export --components {' '.join(names)}`), then `llada-edge build --target "
                f"{self.target} --precision {self.precision}`")

    def _context(self, name: str) -> tuple[tensorrt.ICudaEngine, tensorrt.IExecutionContext]:
        if name not in self._engines:
            entry = self.manifest.components.get(Artifact.trt_engine(self.target, self.precision, name).entry)
            if entry is None:
                raise InputError(f"{self.build_dir}: no {self.precision} {self.target} engine for {name}; run "
                                 f"`llada-edge build --target {self.target} --precision {self.precision}`")
            plan = next(self.build_dir / f.path for f in entry.files if f.path.endswith(".plan"))
            engine: tensorrt.ICudaEngine | None = self._runtime.deserialize_cuda_engine(plan.read_bytes())
            if engine is None:
                raise InputError(f"{self.target} could not load the engine (built for another version or GPU?)",
                                 file=plan)
            if hasattr(engine, "create_runtime_config"):  # TensorRT-RTX: kernels JIT-compiled, kept in a cache
                config = engine.create_runtime_config()
                config.set_runtime_cache(self._shared_runtime_cache(config, entry.meta.get("architectures", [])))
                self._engines[name] = (engine, engine.create_execution_context(config))
            else:
                self._engines[name] = (engine, engine.create_execution_context())
        return self._engines[name]

    def _runtime_cache_path(self, archs: list[str]) -> Path:
        version = str(self.trt.__version__)
        return self.build_dir / "engines" / self.target / f"runtime.{version}.{'+'.join(archs) or 'any'}.cache"

    def _shared_runtime_cache(self, config: Any, archs: list[str]) -> Any:
        """One runtime cache for all engines of the session, seeded from the file next to the engines."""
        if self._runtime_cache is None:
            self._runtime_cache = config.create_runtime_cache()
            self._runtime_cache_file = self._runtime_cache_path(archs)
            if self._runtime_cache_file.is_file() and not self._runtime_cache.deserialize(
                    self._runtime_cache_file.read_bytes()):
                self._runtime_cache = config.create_runtime_cache()  # unreadable (another driver): start empty
        return self._runtime_cache

    def save_runtime_cache(self) -> Path | None:
        """Write TensorRT-RTX's runtime cache (the kernels compiled so far) next to the engines, atomically."""
        if self._runtime_cache is None:
            return None
        from llada_edge.buildfolder.files import atomic_write_bytes

        atomic_write_bytes(self._runtime_cache_file, bytes(self._runtime_cache.serialize()))
        return Path(self._runtime_cache_file)

    def close(self) -> None:
        """Save the runtime cache (TensorRT-RTX), free the device buffers and graphs, destroy the stream."""
        self.save_runtime_cache()
        for buf in [*self._k, *self._v]:
            buf.free()
        self._k, self._v = [], []
        self._free_steps()
        if self.stream is not None:
            cuda_check(self.cudart.cudaStreamDestroy(self.stream))
            self.stream = None

    def _free_steps(self) -> None:
        for step in self._steps.values():
            for buf in [step.ids, step.positions, step.mask, *step.hidden, *step.k_blk, *step.v_blk]:
                buf.free()
            if step.graph not in (None, "eager"):
                cuda_check(self.cudart.cudaGraphExecDestroy(step.graph))
        self._steps.clear()

    def _io_dtype(self, name: str, tensor: str) -> np.dtype[Any]:
        engine, _ = self._context(name)
        return self._numpy_type(engine.get_tensor_dtype(tensor))

    def _numpy_type(self, trt_type: Any) -> np.dtype[Any]:
        """TensorRT's type as numpy's; bf16 (which ``nptype`` does not map) as ml_dtypes' bfloat16."""
        try:
            return np.dtype(self.trt.nptype(trt_type))
        except TypeError:
            if "BF16" not in str(trt_type):
                raise
        try:
            import ml_dtypes
        except ImportError:
            raise InputError("bf16 engines need ml_dtypes on the host: pip install ml_dtypes") from None
        return np.dtype(ml_dtypes.bfloat16)

    def _enqueue(self, name: str, inputs: dict[str, _DeviceArray], outputs: dict[str, _DeviceArray]) -> None:
        _, ctx = self._context(name)
        for tensor, buf in inputs.items():
            ctx.set_input_shape(tensor, buf.shape)
            ctx.set_tensor_address(tensor, buf.ptr)
        for tensor, buf in outputs.items():
            ctx.set_tensor_address(tensor, buf.ptr)
        if not ctx.execute_async_v3(self.stream):
            raise RuntimeError(f"TensorRT failed to run {name}")

    def _run_host(self, name: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """A whole component on host arrays (image side: called a few times per request), each input in the
        engine's type; float outputs come back as float32 (what the sampler and decoders take)."""
        engine, ctx = self._context(name)
        inputs: dict[str, _DeviceArray] = {}
        outputs: dict[str, _DeviceArray] = {}
        try:
            for tensor, array in feeds.items():
                buf = _DeviceArray(self.cudart, array.shape, self._numpy_type(engine.get_tensor_dtype(tensor)))
                inputs[tensor] = buf
                buf.upload(array, self.stream)
                ctx.set_input_shape(tensor, array.shape)
            for i in range(engine.num_io_tensors):
                tensor = engine.get_tensor_name(i)
                if engine.get_tensor_mode(tensor) == self.trt.TensorIOMode.OUTPUT:
                    dtype = self._numpy_type(engine.get_tensor_dtype(tensor))
                    shape = ctx.get_tensor_shape(tensor)  # Dims: indexable, not iterable (in the binding's stub)
                    outputs[tensor] = _DeviceArray(self.cudart, tuple(int(shape[d]) for d in range(len(shape))),
                                                   dtype)
            self._enqueue(name, inputs, outputs)
            return [_widen(buf.download(self.stream)) for buf in outputs.values()]
        finally:
            for buf in [*inputs.values(), *outputs.values()]:
                buf.free()

    # -- the engine session's hooks ---------------------------------------------------------------------

    def _allocate_cache(self, rows: int, capacity: int) -> None:
        shape = self._cache_shape(rows, capacity)
        for buf in [*self._k, *self._v]:
            buf.free()
        self._k = [_DeviceArray(self.cudart, shape, self.float_dtype) for _ in self.registry.layers]
        self._v = [_DeviceArray(self.cudart, shape, self.float_dtype) for _ in self.registry.layers]
        self._free_steps()  # their captured graphs point at the old cache

    def _reset_cache(self) -> None:
        for buf in [*self._k, *self._v]:
            cuda_check(self.cudart.cudaMemsetAsync(buf.ptr, 0, buf.nbytes, self.stream))

    def _step_buffers(self, rows: int, tokens: int) -> _Step:
        if (rows, tokens) not in self._steps:
            def allocate(shape: tuple[int, ...], dtype: npt.DTypeLike) -> _DeviceArray:
                return _DeviceArray(self.cudart, shape, dtype)

            step = _Step(**self._step_arrays(allocate, rows, tokens))
            step.host_mask = np.zeros(step.mask.shape, bool)
            self._steps[(rows, tokens)] = step
        return self._steps[(rows, tokens)]

    def _mask_of(self, step: _Step) -> np.ndarray:
        return step.host_mask

    def _enqueue_layers(self, step: _Step) -> None:
        for name, inputs, outputs in self._step_graphs(step):
            self._enqueue(name, inputs, outputs)

    def _launch(self, step: _Step, ids: np.ndarray, positions: np.ndarray, graphable: bool) -> None:
        """Upload the inputs in place, then: eager enqueue the first time, and for graphable (block) shapes
        capture once and replay."""
        step.ids.upload(ids, self.stream)  # in place: a captured graph keeps reading these buffers
        step.positions.upload(positions, self.stream)
        step.mask.upload(step.host_mask, self.stream)
        cu = self.cudart
        if not (self.cuda_graphs and graphable) or step.graph == "eager":
            self._enqueue_layers(step)
            return
        if step.graph is None and not step.captured:
            self._enqueue_layers(step)  # warm-up run: TensorRT allocates its per-shape resources
            step.captured = True
            return
        if step.graph is None:
            try:
                mode = cu.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
                cuda_check(cu.cudaStreamBeginCapture(self.stream, mode))
                self._enqueue_layers(step)
                graph = cuda_check(cu.cudaStreamEndCapture(self.stream))
                step.graph = cuda_check(cu.cudaGraphInstantiate(graph, 0))
                cuda_check(cu.cudaGraphDestroy(graph))  # the executable graph is what is launched from here on
            except RuntimeError as exc:
                self.graph_fallbacks.append(f"{step.ids.shape}: {exc}")
                cu.cudaStreamEndCapture(self.stream)  # leave capture mode (its result is an error; ignored)
                step.graph = "eager"
                self._enqueue_layers(step)
                return
        cuda_check(cu.cudaGraphLaunch(step.graph, self.stream))

    def _store_block(self, step: _Step, start: int, tokens: int) -> None:
        b, cu = self.config.backbone, self.cudart
        rows = step.ids.shape[0]
        item = self.float_dtype.itemsize
        row_bytes = tokens * b.head_dim * item
        pitch = self._valid.shape[1] * b.head_dim * item
        for i in range(len(self.registry.layers)):  # [B*Hkv] rows of T*hd floats into the cache at column start
            for blk, cache in ((step.k_blk[i], self._k[i]), (step.v_blk[i], self._v[i])):
                cuda_check(cu.cudaMemcpy2DAsync(cache.ptr + start * b.head_dim * item, pitch, blk.ptr, row_bytes,
                                                row_bytes, rows * b.num_key_value_heads,
                                                cu.cudaMemcpyKind.cudaMemcpyDeviceToDevice, self.stream))

    def _hidden_of(self, step: _Step) -> np.ndarray:
        out: _DeviceArray = self._final_hidden(step)
        return _widen(out.download(self.stream))

    # -- heads and image side ---------------------------------------------------------------------

    def head_text(self, hidden: np.ndarray) -> np.ndarray:
        head = self.registry.heads["text"]
        return self._run_host(head.name, head.feeds(hidden.astype(np.float32)))[0]

    def head_image(self, hidden: np.ndarray) -> np.ndarray:
        head = self.registry.heads["image"]
        return self._run_host(head.name, head.feeds(hidden.astype(np.float32)))[0]

    def head_sample(self, kind: str, hidden: np.ndarray, row_weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        head = self.registry.sample_heads[kind]
        x0, p = self._run_host(head.name, head.feeds(hidden.astype(np.float32), np.asarray(row_weights, np.float32)))
        return x0, p

    def tokenize_image(self, pixels: np.ndarray) -> np.ndarray:
        tokenizer = self.registry.vision_tokenizer
        return self._run_host(tokenizer.name, tokenizer.feeds(pixels.astype(np.float32)))[0].astype(np.int64)

    def sigvq(self, ids: np.ndarray) -> np.ndarray:
        return self._run_host(self.registry.sigvq.name, self.registry.sigvq.feeds(ids.astype(np.int64)))[0]

    def dit(self, mode: str, latent: np.ndarray, t: np.ndarray, cap: np.ndarray) -> np.ndarray:
        dit = self.registry.dits[mode]
        return self._run_host(dit.name, dit.feeds_for(latent, t, cap))[0]

    def vae_decode(self, latent: np.ndarray) -> np.ndarray:
        vae = self.registry.vae_decoder
        return self._run_host(vae.name, vae.feeds(latent.astype(np.float32)))[0]


def _widen(array: np.ndarray) -> np.ndarray:
    """Half-precision engine outputs as float32 on the host (the sampler's and decoders' type)."""
    return array.astype(np.float32) if array.dtype == np.float16 or array.dtype.kind == "V" else array
