"""The TensorRT backend: the ``tensorrt/<precision>/<component>`` engines of a build, on one CUDA stream.

* Device memory is allocated per request and per step shape, never per step: the KV cache of every
  layer ([B, Hkv, capacity, hd]), the step inputs (ids, positions, mask), hidden ping-pong buffers and
  each layer's block K/V. Step inputs are *uploaded into* those fixed buffers, so a captured CUDA
  graph stays valid from step to step.
* CUDA graphs: the first step of a shape key (rows x block tokens x capacity) runs once eagerly
  (TensorRT sets up its resources), then the embed + all-layer enqueue sequence is captured into one
  graph and every later step of that key is a single ``cudaGraphLaunch``. A key whose capture fails
  falls back to eager enqueues and is recorded in ``graph_fallbacks``.
* Commits copy each layer's block K/V into the cache slice with one strided ``cudaMemcpy2DAsync``.

Needs ``tensorrt`` and ``cuda-python``; import-guarded (a clear InputError, exit code 2, without them).
Written against the TensorRT 10/11 and cuda-python 12/13 Python APIs. **Not run**: TensorRT cannot be
installed on the development and CI machines and no GPU was available; its tests skip with that reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llada_edge.config import ModelConfig
from llada_edge.engines.manifest import Manifest
from llada_edge.errors import InputError
from llada_edge.positions import dit_rope_tables
from llada_edge.runtime.backend import CacheCounters, fill_step_mask

BLOCK = 32
INSTALL_HINT = ("the tensorrt backend needs TensorRT and cuda-python (pip install tensorrt cuda-python, from "
                "NVIDIA's index) and an NVIDIA GPU; use --backend onnxruntime on this machine")


def _import_cuda() -> tuple[Any, Any]:
    try:
        import tensorrt as trt
    except ImportError:
        raise InputError(INSTALL_HINT) from None
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError:
            raise InputError(INSTALL_HINT) from None
    return trt, cudart


def _ok(result: Any) -> Any:
    """cuda-python returns (error, *values): raise on error, return the values."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RuntimeError(f"CUDA error {err}")
    return values[0] if len(values) == 1 else values


class _DeviceArray:
    def __init__(self, cudart: Any, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.cudart, self.shape, self.dtype = cudart, tuple(shape), np.dtype(dtype)
        self.nbytes = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize
        self.ptr = _ok(cudart.cudaMalloc(max(self.nbytes, 1)))

    def upload(self, array: np.ndarray, stream: Any) -> None:
        src = np.ascontiguousarray(array, dtype=self.dtype)
        _ok(self.cudart.cudaMemcpyAsync(self.ptr, src.ctypes.data, src.nbytes,
                                        self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, stream))

    def download(self, stream: Any) -> np.ndarray:
        out = np.empty(self.shape, self.dtype)
        _ok(self.cudart.cudaMemcpyAsync(out.ctypes.data, self.ptr, self.nbytes,
                                        self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream))
        _ok(self.cudart.cudaStreamSynchronize(stream))
        return out

    def free(self) -> None:
        self.cudart.cudaFree(self.ptr)


@dataclass
class _Step:
    """Device buffers of one (rows, tokens) shape, plus its captured graph."""

    ids: _DeviceArray
    positions: _DeviceArray
    mask: _DeviceArray
    hidden: tuple[_DeviceArray, _DeviceArray]
    k_blk: list[_DeviceArray]
    v_blk: list[_DeviceArray]
    graph: Any = None
    captured: bool = False
    extra: dict[str, _DeviceArray] = field(default_factory=dict)


class TensorRTBackend(CacheCounters):
    name = "tensorrt"
    fused_head_kinds = ("text", "image")

    def __init__(self, build_dir: str | Path, precision: str = "fp32", cuda_graphs: bool = True,
                 verify: bool = True) -> None:
        self.trt, self.cudart = _import_cuda()
        self.build_dir = Path(build_dir)
        self.manifest = Manifest.load(self.build_dir)
        if verify:
            self.manifest.verify(self.build_dir)
        self.precision = precision
        self.config = ModelConfig.from_folder(self.build_dir / "model")
        self.cuda_graphs = cuda_graphs
        self.graph_fallbacks: list[str] = []
        self._runtime = self.trt.Runtime(self.trt.Logger(self.trt.Logger.WARNING))
        self._engines: dict[str, tuple[Any, Any]] = {}
        self.stream = _ok(self.cudart.cudaStreamCreate())
        self._layers = self.config.backbone.num_hidden_layers
        self._k: list[_DeviceArray] = []
        self._v: list[_DeviceArray] = []
        self._valid = np.zeros((0, 0), bool)
        self._keep: np.ndarray | None = None
        self._len = 0
        self._passes = 0
        self._steps: dict[tuple[int, int], _Step] = {}

    # -- engines ----------------------------------------------------------------------------------

    def _context(self, name: str) -> tuple[Any, Any]:
        if name not in self._engines:
            entry = self.manifest.components.get(f"tensorrt/{self.precision}/{name}")
            if entry is None:
                raise InputError(f"{self.build_dir}: no {self.precision} TensorRT engine for {name}; run `llada-edge "
                                 f"build --target tensorrt --precision {self.precision}`")
            plan = next(self.build_dir / f.path for f in entry.files if f.path.endswith(".plan"))
            engine = self._runtime.deserialize_cuda_engine(plan.read_bytes())
            if engine is None:
                raise InputError("TensorRT could not load the engine (built for another TensorRT or GPU?)", file=plan)
            self._engines[name] = (engine, engine.create_execution_context())
        return self._engines[name]

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
        """A whole component on host arrays (image side: called a few times per request)."""
        engine, ctx = self._context(name)
        inputs = {}
        for tensor, array in feeds.items():
            buf = _DeviceArray(self.cudart, array.shape, array.dtype)
            buf.upload(array, self.stream)
            inputs[tensor] = buf
            ctx.set_input_shape(tensor, array.shape)
        outputs = {}
        for i in range(engine.num_io_tensors):
            tensor = engine.get_tensor_name(i)
            if engine.get_tensor_mode(tensor) == self.trt.TensorIOMode.OUTPUT:
                dtype = self.trt.nptype(engine.get_tensor_dtype(tensor))
                outputs[tensor] = _DeviceArray(self.cudart, tuple(ctx.get_tensor_shape(tensor)), dtype)
        self._enqueue(name, inputs, outputs)
        result = [buf.download(self.stream) for buf in outputs.values()]
        for buf in [*inputs.values(), *outputs.values()]:
            buf.free()
        return result

    # -- backbone session -------------------------------------------------------------------------

    def start(self, rows: int, capacity: int) -> None:
        b = self.config.backbone
        shape = (rows, b.num_key_value_heads, capacity, b.head_dim)
        if not self._k or self._k[0].shape != shape:
            for buf in [*self._k, *self._v]:
                buf.free()
            self._k = [_DeviceArray(self.cudart, shape, np.float32) for _ in range(self._layers)]
            self._v = [_DeviceArray(self.cudart, shape, np.float32) for _ in range(self._layers)]
            self._steps.clear()  # captured graphs point at the old cache
            self._valid = np.zeros((rows, capacity), bool)
        for buf in [*self._k, *self._v]:
            _ok(self.cudart.cudaMemsetAsync(buf.ptr, 0, buf.nbytes, self.stream))
        self._valid[:] = False
        self._keep = None
        self._len = 0

    def _step(self, rows: int, tokens: int) -> _Step:
        if (rows, tokens) not in self._steps:
            b, cu = self.config.backbone, self.cudart
            kv = (rows, b.num_key_value_heads, tokens, b.head_dim)
            capacity = self._valid.shape[1]
            self._steps[(rows, tokens)] = _Step(
                ids=_DeviceArray(cu, (rows, tokens), np.int64), positions=_DeviceArray(cu, (rows, tokens), np.int64),
                mask=_DeviceArray(cu, (rows, tokens, capacity + tokens), np.bool_),
                hidden=(_DeviceArray(cu, (rows, tokens, b.hidden_size), np.float32),
                        _DeviceArray(cu, (rows, tokens, b.hidden_size), np.float32)),
                k_blk=[_DeviceArray(cu, kv, np.float32) for _ in range(self._layers)],
                v_blk=[_DeviceArray(cu, kv, np.float32) for _ in range(self._layers)])
        return self._steps[(rows, tokens)]

    def _enqueue_layers(self, step: _Step) -> None:
        self._enqueue("embed", {"ids": step.ids}, {"hidden": step.hidden[0]})
        cur, nxt = step.hidden
        for i in range(self._layers):
            self._enqueue(f"layer_{i}", {"hidden": cur, "positions": step.positions, "past_k": self._k[i],
                                         "past_v": self._v[i], "attn_mask": step.mask},
                          {"hidden_out": nxt, "k_blk": step.k_blk[i], "v_blk": step.v_blk[i]})
            cur, nxt = nxt, cur
        step.extra["out"] = cur

    def _launch(self, step: _Step, graphable: bool) -> None:
        """Eager enqueue the first time, then (graphable shapes) capture once and replay."""
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
                _ok(cu.cudaStreamBeginCapture(self.stream, cu.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal))
                self._enqueue_layers(step)
                graph = _ok(cu.cudaStreamEndCapture(self.stream))
                step.graph = _ok(cu.cudaGraphInstantiate(graph, 0))
            except RuntimeError as exc:
                self.graph_fallbacks.append(f"{step.ids.shape}: {exc}")
                step.graph = "eager"
                self._enqueue_layers(step)
                return
        _ok(cu.cudaGraphLaunch(step.graph, self.stream))

    def _run(self, ids: np.ndarray, positions: np.ndarray, valid: np.ndarray, causal_blocks: bool,
             use_keep: bool) -> _Step:
        rows, tokens = ids.shape
        step = self._step(rows, tokens)
        capacity = self._valid.shape[1]
        mask = fill_step_mask(np.empty((rows, tokens, capacity + tokens), bool), self._valid,
                              self._keep if use_keep else None, valid, causal_blocks, BLOCK)
        step.ids.upload(ids, self.stream)  # in place: a captured graph keeps reading these buffers
        step.positions.upload(positions, self.stream)
        step.mask.upload(mask, self.stream)
        self._launch(step, graphable=not causal_blocks)
        self._passes += 1
        return step

    def _append(self, step: _Step, valid: np.ndarray) -> None:
        rows, tokens = valid.shape
        b, cu = self.config.backbone, self.cudart
        if self._len + tokens > self._valid.shape[1]:
            raise InputError(f"KV cache capacity {self._valid.shape[1]} exceeded ({self._len} + {tokens} tokens)")
        row_bytes = tokens * b.head_dim * 4
        pitch = self._valid.shape[1] * b.head_dim * 4
        for i in range(self._layers):  # [B*Hkv] rows of T*hd floats into the cache at column len
            for blk, cache in ((step.k_blk[i], self._k[i]), (step.v_blk[i], self._v[i])):
                _ok(cu.cudaMemcpy2DAsync(cache.ptr + self._len * b.head_dim * 4, pitch, blk.ptr, row_bytes, row_bytes,
                                         rows * b.num_key_value_heads, cu.cudaMemcpyKind.cudaMemcpyDeviceToDevice,
                                         self.stream))
        self._valid[:, self._len:self._len + tokens] = valid
        self._len += tokens

    def prefill(self, ids: np.ndarray, positions: np.ndarray, valid: np.ndarray) -> None:
        if self._len:
            raise RuntimeError("prefill must come first in a session")
        self._append(self._run(ids, positions, valid, causal_blocks=True, use_keep=False), valid)

    def forward_block(self, ids: np.ndarray, positions: np.ndarray, valid: np.ndarray,
                      key_importance: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        if key_importance:
            raise InputError("SPRINT prefix pruning needs attention scores, which the engines do not output")
        step = self._run(ids, positions, valid, causal_blocks=False, use_keep=True)
        return step.extra["out"].download(self.stream), None

    def commit(self, ids: np.ndarray, positions: np.ndarray, valid: np.ndarray) -> None:
        self._append(self._run(ids, positions, valid, causal_blocks=False, use_keep=False), valid)

    def set_cache_mask(self, keep: np.ndarray | None) -> None:
        self._keep = None if keep is None else keep.astype(bool)

    # -- heads and image side ---------------------------------------------------------------------

    def head_text(self, hidden: np.ndarray) -> np.ndarray:
        return self._run_host("head_text", {"hidden": hidden.astype(np.float32)})[0]

    def head_image(self, hidden: np.ndarray) -> np.ndarray:
        return self._run_host("head_image", {"hidden": hidden.astype(np.float32)})[0]

    def head_sample(self, kind: str, hidden: np.ndarray, row_weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x0, p = self._run_host(f"head_{kind}_sample", {"hidden": hidden.astype(np.float32),
                                                       "row_weights": np.asarray(row_weights, np.float32)})
        return x0, p

    def tokenize_image(self, pixels: np.ndarray) -> np.ndarray:
        return self._run_host("vision_tokenizer", {"pixels": pixels.astype(np.float32)})[0].astype(np.int64)

    def sigvq(self, ids: np.ndarray) -> np.ndarray:
        return self._run_host("sigvq", {"ids": ids.astype(np.int64)})[0]

    def dit(self, mode: str, latent: np.ndarray, t: np.ndarray, cap: np.ndarray) -> np.ndarray:
        dec = self.config.decoders[mode]
        tables = dit_rope_tables(latent.shape[3] // dec.patch_size, latent.shape[4] // dec.patch_size, cap.shape[1],
                                 dec.axes_dims, dec.rope_theta)
        feeds = {"latent": latent.astype(np.float32), "t": t.astype(np.float32), "cap": cap.astype(np.float32),
                 "img_cos": tables[0], "img_sin": tables[1], "cap_cos": tables[2], "cap_sin": tables[3]}
        return self._run_host(f"dit_{mode}", feeds)[0]

    def vae_decode(self, latent: np.ndarray) -> np.ndarray:
        return self._run_host("vae_decoder", {"latent": latent.astype(np.float32)})[0]
