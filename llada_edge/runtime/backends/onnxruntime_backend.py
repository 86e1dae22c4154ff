"""The ONNX Runtime backend: the graphs of a build folder, one session per component.

Hot loop without per-step allocation: per request (``start``) the KV cache of every layer is one
preallocated array [B, Hkv, capacity, hd] that is bound to the layer graphs as ``past_k``/``past_v``
in place (IO binding over the numpy memory, no copy); the attention mask marks which cache entries
are valid, so the graphs always see the full capacity and shapes stay fixed during a request. Hidden
states ping-pong between two preallocated buffers bound as outputs, and each layer writes its block
K/V into preallocated buffers that ``commit`` copies into the cache (the session logic is
:class:`~llada_edge.runtime.backends.engine_session.EngineSession`). Outputs returned to the sampler
(hidden states, logits) are views of these buffers, valid until the next call.

Needs numpy + onnxruntime only (no torch).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from llada_edge.buildfolder import Artifact, Manifest, check_not_being_written
from llada_edge.config import ModelConfig
from llada_edge.errors import InputError
from llada_edge.runtime.backends.engine_session import EngineSession, StepBuffers

# The kinds of graphs the backend runs: ``build --target onnxruntime`` engines, or the GPU graphs (``quantize``).
GRAPH_KINDS = {"engines": "ort-engine", "gpu": "qdq"}
_FLOAT_TYPES: dict[str, np.dtype[Any]] = {"tensor(float)": np.dtype(np.float32),
                                          "tensor(float16)": np.dtype(np.float16)}


@dataclass
class _Buffers(StepBuffers[np.ndarray]):
    """Preallocated I/O of one (rows, tokens) shape, bound to the graphs in place."""

    # head outputs, allocated on first use: a prefill shape never runs a head, and full-vocabulary
    # logits for a whole prompt would be rows x prompt x 173568 floats
    heads: dict[str, np.ndarray] = field(default_factory=dict)


class OnnxRuntimeBackend(EngineSession[_Buffers]):
    name = "onnxruntime"

    def __init__(self, build_dir: str | Path, precision: str = "fp32", providers: list[str] | None = None,
                 threads: int | None = None, verify: bool = True, graphs: str = "engines") -> None:
        """``graphs``: "engines" runs this precision's ONNX Runtime engines (``build --target onnxruntime``);
        "gpu" runs its GPU graphs instead (``quantize``: ModelOpt Q/DQ in fp16, what the TensorRT engines are
        built from), for their numerics on the CPU. Either falls back to the fp32 export per component."""
        import onnxruntime as ort

        if graphs not in GRAPH_KINDS:
            raise InputError(f"graphs must be one of {list(GRAPH_KINDS)}, got {graphs!r}")
        self.build_dir = Path(build_dir)
        check_not_being_written(self.build_dir)
        self.manifest = Manifest.load(self.build_dir)
        self.precision = precision
        self.graphs = graphs
        super().__init__(ModelConfig.from_folder(self.build_dir / "model"))
        exported = self.registry.exported(self.manifest)
        if precision != "fp32" and not any(self._artifact(c.name).kind == GRAPH_KINDS[graphs] for c in exported):
            how = (f"build --build {self.build_dir} --target onnxruntime --precision {precision}" if graphs == "engines"
                   else f"quantize --build {self.build_dir} --precision {precision}")
            raise InputError(f"{self.build_dir}: no {precision} {'engines' if graphs == 'engines' else 'GPU graphs'} "
                             f"in this build; create them with `llada-edge {how}`")
        if verify:  # a tampered or missing file is a BuildError; only the files this backend will load
            self.manifest.verify(self.build_dir, [self._artifact(c.name).entry for c in exported] + ["model"])
        missing = [c.name for c in self.registry.backbone if c.name not in self.manifest.components]
        if missing:
            raise InputError(f"{self.build_dir}: the build lacks {', '.join(missing[:4])}"
                             f"{' ...' if len(missing) > 4 else ''}; run `llada-edge export` for them")
        self._ort = ort
        self._options = ort.SessionOptions()
        self._options.log_severity_level = 3
        # Each session owns a thread pool whose threads spin after their work; a step runs 20+ sessions one after the
        # other, so the spinning threads of the last one compete with the next one for the cores. Measured on the
        # full 20-layer int4 build (2 cores, chat): median step 923 ms with spinning, 293 ms without.
        self._options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads:
            self._options.intra_op_num_threads = threads
        if graphs == "gpu":
            # ORT's buffer reuse fails on the fp16 recipe's AutoCast graphs ("Shape mismatch attempting to re-use
            # buffer. {1,2,192,16} != {1,4,192,16}" in a 192-token prefill); without reuse they run. The GPU graphs
            # run here for their numerics only, so the memory cost does not matter.
            self._options.enable_mem_reuse = False
        self._providers = providers or ["CPUExecutionProvider"]
        self._sessions: dict[str, Any] = {}  # onnxruntime.InferenceSession per component
        self._bindings: dict[str, Any] = {}
        self._input_types: dict[str, dict[str, np.dtype[Any]]] = {}
        self._output_types: dict[str, list[np.dtype[Any]]] = {}
        self._buffers: dict[tuple[int, int], _Buffers] = {}
        self.float_dtype = self._graph_float_type() if graphs == "gpu" else np.dtype(np.float32)
        # Heads whose fused graph pays off. Measured on the CPU provider (tiny preset, 32-token steps):
        # the 16384-way image head runs 1.6x faster fused, but ORT's exp + reductions over the 173568-way
        # text vocabulary (~13 ms) cost more than host scoring of the still-masked rows only, so text
        # fuses on GPU providers alone.
        gpu = any(p in ("CUDAExecutionProvider", "TensorrtExecutionProvider") for p in self._providers)
        self.fused_head_kinds = tuple(kind for kind, head in self.registry.sample_heads.items()
                                      if (gpu or kind == "image") and head.name in self.manifest.components)

    def _artifact(self, name: str) -> Artifact:
        """What a component runs from: this precision's engine (or GPU graph), else the fp32 export."""
        engine = (Artifact.ort_engine if self.graphs == "engines" else Artifact.qdq_graph)(self.precision, name)
        return engine if engine.entry in self.manifest.components else Artifact.onnx(name)

    def _graph_float_type(self) -> np.dtype[Any]:
        """The float type the backbone graphs pass between them (fp16 for half GPU graphs): the buffers are
        shared, so graphs of mixed types are refused."""
        found = {}
        for name in [self.registry.embed.name, *(layer.name for layer in self.registry.layers)]:
            for arg in [*self.session(name).get_inputs(), *self.session(name).get_outputs()]:
                if arg.type in _FLOAT_TYPES:
                    found[f"{name}:{arg.name}"] = _FLOAT_TYPES[arg.type]
        kinds = {str(d) for d in found.values()}
        if len(kinds) != 1:
            raise InputError(f"{self.build_dir}: the {self.precision} backbone graphs mix float types "
                             f"({', '.join(f'{k}={v}' for k, v in found.items())})")
        return next(iter(found.values()))

    def _output_type(self, name: str, index: int) -> np.dtype[Any]:
        """The float type of a graph's output (fp16 for half GPU graphs), looked up once per graph."""
        if name not in self._output_types:
            self._output_types[name] = [_FLOAT_TYPES.get(a.type, np.dtype(np.float32))
                                        for a in self.session(name).get_outputs()]
        return self._output_types[name][index]

    def _typed(self, name: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``feeds`` in the float types the graph declares (a half GPU graph takes fp16)."""
        if name not in self._input_types:
            self._input_types[name] = {a.name: _FLOAT_TYPES[a.type] for a in self.session(name).get_inputs()
                                       if a.type in _FLOAT_TYPES}
        types = self._input_types[name]
        return {k: (np.ascontiguousarray(v, types[k]) if k in types and v.dtype != types[k] else v)
                for k, v in feeds.items()}

    # -- sessions -----------------------------------------------------------------------------

    @property
    def session_options(self) -> Any:  # onnxruntime.SessionOptions
        return self._options

    @property
    def providers(self) -> list[str]:
        return list(self._providers)

    def _has_graph(self, name: str) -> bool:
        return name in self.manifest.components

    def _missing_hint(self, names: list[str]) -> str:
        return (f"export them (`llada-edge export --components {' '.join(names)}`, or `llada-edge stream` from a "
                "checkpoint that has their weights)")

    def graph_path(self, name: str) -> Path:
        """The ``model.onnx`` a component runs from (this precision's engine, else the fp32 export)."""
        if name not in self.manifest.components:
            raise InputError(f"{self.build_dir}: no {name!r} in this build; export it with "
                             f"`llada-edge export --components {name}`")
        return self.build_dir / self._artifact(name).folder / "model.onnx"

    def session(self, name: str) -> Any:  # onnxruntime.InferenceSession
        if name not in self._sessions:
            path = self.graph_path(name)
            self._sessions[name] = self._ort.InferenceSession(str(path), self._options, providers=self._providers)
            self._bindings[name] = self._sessions[name].io_binding()
        return self._sessions[name]

    def replace_session(self, name: str, session: Any) -> None:
        """Run ``name`` through another session with the same inputs and outputs (an instrumented copy:
        the accuracy report's routing probes)."""
        self._sessions[name] = session
        self._bindings[name] = session.io_binding()

    def _run_bound(self, name: str, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None:
        """Run with inputs and outputs bound to existing numpy memory (no allocation by ORT)."""
        session = self.session(name)
        binding = self._bindings[name]
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        for key, array in inputs.items():
            binding.bind_cpu_input(key, array)
        for key, array in outputs.items():
            binding.bind_output(key, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)
        session.run_with_iobinding(binding)

    # -- the engine session's hooks ---------------------------------------------------------------------

    def _allocate_cache(self, rows: int, capacity: int) -> None:
        shape = self._cache_shape(rows, capacity)
        self._k = [np.zeros(shape, self.float_dtype) for _ in self.registry.layers]
        self._v = [np.zeros(shape, self.float_dtype) for _ in self.registry.layers]
        self._buffers.clear()

    def _step_buffers(self, rows: int, tokens: int) -> _Buffers:
        key = (rows, tokens)
        if key not in self._buffers:
            self._buffers[key] = _Buffers(**self._step_arrays(np.zeros, rows, tokens))
        return self._buffers[key]

    def _mask_of(self, step: _Buffers) -> np.ndarray:
        return step.mask

    def _launch(self, step: _Buffers, ids: np.ndarray, positions: np.ndarray, graphable: bool) -> None:
        step.ids[:] = ids
        step.positions[:] = positions
        for name, inputs, outputs in self._step_graphs(step):
            self._run_bound(name, inputs, outputs)

    def _store_block(self, step: _Buffers, start: int, tokens: int) -> None:
        for i in range(len(self.registry.layers)):  # a copy into the preallocated cache
            self._k[i][:, :, start:start + tokens] = step.k_blk[i]
            self._v[i][:, :, start:start + tokens] = step.v_blk[i]

    def _hidden_of(self, step: _Buffers) -> np.ndarray:
        return np.asarray(self._final_hidden(step))

    # -- heads -----------------------------------------------------------------------------------

    def _head_buffer(self, rows: int, tokens: int, name: str, shape: tuple[int, ...], dtype: npt.DTypeLike
                     ) -> np.ndarray:
        heads = self._step_buffers(rows, tokens).heads
        if name not in heads:
            heads[name] = np.zeros(shape, dtype)
        return heads[name]

    def _head(self, kind: str, hidden: np.ndarray) -> np.ndarray:
        head = self.registry.heads[kind]
        rows, tokens, _ = hidden.shape
        dtype = self._output_type(head.name, 0)
        out = self._head_buffer(rows, tokens, head.name, (rows, tokens, head.vocab), dtype)
        self._run_bound(head.name, self._typed(head.name, head.feeds(hidden)), head.outputs(out))
        return out if dtype == np.float32 else out.astype(np.float32)

    def head_text(self, hidden: np.ndarray) -> np.ndarray:
        return self._head("text", hidden)

    def head_image(self, hidden: np.ndarray) -> np.ndarray:
        return self._head("image", hidden)

    def head_sample(self, kind: str, hidden: np.ndarray, row_weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Guided greedy scoring inside the graph: (x0 [T], p [T]) instead of [B, T, vocab] logits."""
        head = self.registry.sample_heads[kind]
        rows, tokens, _ = hidden.shape
        p_type = self._output_type(head.name, 1)
        x0 = self._head_buffer(rows, tokens, f"{head.name}.x0", (tokens,), np.int64)
        p = self._head_buffer(rows, tokens, f"{head.name}.p", (tokens,), p_type)
        feeds = self._typed(head.name, head.feeds(np.ascontiguousarray(hidden), np.asarray(row_weights, np.float32)))
        self._run_bound(head.name, feeds, head.outputs(x0, p))
        return x0, p.astype(np.float32, copy=False)

    # -- image side ------------------------------------------------------------------------------

    def _run(self, name: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
        out = np.asarray(self.session(name).run(None, self._typed(name, feeds))[0])
        return out.astype(np.float32) if out.dtype in (np.float16,) else out

    def tokenize_image(self, pixels: np.ndarray) -> np.ndarray:
        tokenizer = self.registry.vision_tokenizer
        return self._run(tokenizer.name, tokenizer.feeds(pixels.astype(np.float32))).astype(np.int64)

    def sigvq(self, ids: np.ndarray) -> np.ndarray:
        return self._run(self.registry.sigvq.name, self.registry.sigvq.feeds(ids.astype(np.int64)))

    def dit(self, mode: str, latent: np.ndarray, t: np.ndarray, cap: np.ndarray) -> np.ndarray:
        dit = self.registry.dits[mode]
        return self._run(dit.name, dit.feeds_for(latent, t, cap))

    def vae_decode(self, latent: np.ndarray) -> np.ndarray:
        vae = self.registry.vae_decoder
        return self._run(vae.name, vae.feeds(latent.astype(np.float32)))
