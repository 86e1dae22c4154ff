"""The ONNX Runtime backend: the graphs of a build folder, one session per component.

Hot loop without per-step allocation: per request (``start``) the KV cache of every layer is one
preallocated array [B, Hkv, capacity, hd] that is bound to the layer graphs as ``past_k``/``past_v``
in place (IO binding over the numpy memory, no copy); the attention mask marks which cache entries
are valid, so the graphs always see the full capacity and shapes stay fixed during a request. Hidden
states ping-pong between two preallocated buffers bound as outputs, and each layer writes its block
K/V into preallocated buffers that ``commit`` copies into the cache. Outputs returned to the sampler
(hidden states, logits) are views of these buffers, valid until the next call.

Needs numpy + onnxruntime only (no torch).
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


@dataclass
class _Buffers:
    """Preallocated I/O of one (rows, tokens) shape."""

    ids: np.ndarray
    positions: np.ndarray
    mask: np.ndarray
    hidden: tuple[np.ndarray, np.ndarray]
    k_blk: list[np.ndarray]
    v_blk: list[np.ndarray]
    # head outputs, allocated on first use: a prefill shape never runs a head, and full-vocabulary
    # logits for a whole prompt would be rows x prompt x 173568 floats
    heads: dict[str, np.ndarray] = field(default_factory=dict)


class OnnxRuntimeBackend(CacheCounters):
    name = "onnxruntime"

    def __init__(self, build_dir: str | Path, precision: str = "fp32", providers: list[str] | None = None,
                 threads: int | None = None, verify: bool = True) -> None:
        import onnxruntime as ort

        self.build_dir = Path(build_dir)
        self.manifest = Manifest.load(self.build_dir)
        self.precision = precision
        prefix = f"onnxruntime/{precision}/"
        if precision != "fp32" and not any(n.startswith(prefix) for n in self.manifest.components):
            raise InputError(f"{self.build_dir}: no {precision} engines in this build; create them with `llada-edge "
                             f"build --build {self.build_dir} --target onnxruntime --precision {precision}`")
        if verify:  # a tampered or missing file is a BuildError; only the files this backend will load
            self.manifest.verify(self.build_dir, [self._entry_name(n) for n in self._loadable()] + ["model"])
        self.config = ModelConfig.from_folder(self.build_dir / "model")
        b = self.config.backbone
        missing = [n for n in self._backbone_names() if n not in self.manifest.components]
        if missing:
            raise InputError(f"{self.build_dir}: the build lacks {', '.join(missing[:4])}"
                             f"{' ...' if len(missing) > 4 else ''}; run `llada-edge export` for them")
        self._ort = ort
        self._options = ort.SessionOptions()
        self._options.log_severity_level = 3
        if threads:
            self._options.intra_op_num_threads = threads
        self._providers = providers or ["CPUExecutionProvider"]
        self._sessions: dict[str, object] = {}
        self._bindings: dict[str, object] = {}
        self._layers = b.num_hidden_layers
        self._k: list[np.ndarray] = []
        self._v: list[np.ndarray] = []
        self._valid = np.zeros((0, 0), bool)
        self._keep: np.ndarray | None = None
        self._len = 0
        self._passes = 0
        self._buffers: dict[tuple[int, int], _Buffers] = {}
        self._rope_cache: dict[tuple[str, int, int, int], tuple[np.ndarray, ...]] = {}
        # Heads whose fused graph pays off. Measured on the CPU provider (tiny preset, 32-token steps):
        # the 16384-way image head runs 1.6x faster fused, but ORT's exp + reductions over the 173568-way
        # text vocabulary (~13 ms) cost more than host scoring of the still-masked rows only, so text
        # fuses on GPU providers alone.
        gpu = any(p in ("CUDAExecutionProvider", "TensorrtExecutionProvider") for p in self._providers)
        self.fused_head_kinds = tuple(k for k in (("text", "image") if gpu else ("image",))
                                      if f"head_{k}_sample" in self.manifest.components)

    def _loadable(self) -> list[str]:
        return [name for name, entry in self.manifest.components.items() if entry.kind == "onnx"]

    def _entry_name(self, name: str) -> str:
        """The manifest entry a component runs from: this precision's engine, else the fp32 export."""
        engine = f"onnxruntime/{self.precision}/{name}"
        return engine if engine in self.manifest.components else name

    def _backbone_names(self) -> list[str]:
        return ["embed", *(f"layer_{i}" for i in range(self.config.backbone.num_hidden_layers)), "head_text",
                "head_image"]

    # -- sessions -----------------------------------------------------------------------------

    def session(self, name: str) -> Any:  # onnxruntime.InferenceSession
        if name not in self._sessions:
            if name not in self.manifest.components:
                raise InputError(f"{self.build_dir}: no {name!r} in this build; export it with "
                                 f"`llada-edge export --components {name}`")
            entry = self._entry_name(name)
            path = (self.build_dir / "engines" / entry if entry != name else self.build_dir / "onnx" / name) \
                / "model.onnx"
            self._sessions[name] = self._ort.InferenceSession(str(path), self._options, providers=self._providers)
            self._bindings[name] = self._sessions[name].io_binding()
        return self._sessions[name]

    def _run_bound(self, name: str, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None:
        """Run with inputs and outputs bound to existing numpy memory (no allocation by ORT)."""
        self.session(name)
        binding = self._bindings[name]
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        for key, array in inputs.items():
            binding.bind_cpu_input(key, array)
        for key, array in outputs.items():
            binding.bind_output(key, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)
        self._sessions[name].run_with_iobinding(binding)

    # -- backbone session -------------------------------------------------------------------------

    def start(self, rows: int, capacity: int) -> None:
        b = self.config.backbone
        shape = (rows, b.num_key_value_heads, capacity, b.head_dim)
        if not self._k or self._k[0].shape != shape:
            self._k = [np.zeros(shape, np.float32) for _ in range(self._layers)]
            self._v = [np.zeros(shape, np.float32) for _ in range(self._layers)]
            self._valid = np.zeros((rows, capacity), bool)
            self._buffers.clear()
        self._valid[:] = False
        self._keep = None
        self._len = 0

    def _buffers_for(self, rows: int, tokens: int) -> _Buffers:
        key = (rows, tokens)
        if key not in self._buffers:
            b = self.config.backbone
            kv = (rows, b.num_key_value_heads, tokens, b.head_dim)
            capacity = self._valid.shape[1]
            self._buffers[key] = _Buffers(
                ids=np.zeros((rows, tokens), np.int64), positions=np.zeros((rows, tokens), np.int64),
                mask=np.zeros((rows, tokens, capacity + tokens), bool),
                hidden=(np.zeros((rows, tokens, b.hidden_size), np.float32),
                        np.zeros((rows, tokens, b.hidden_size), np.float32)),
                k_blk=[np.zeros(kv, np.float32) for _ in range(self._layers)],
                v_blk=[np.zeros(kv, np.float32) for _ in range(self._layers)])
        return self._buffers[key]

    def _head_buffer(self, rows: int, tokens: int, name: str, shape: tuple[int, ...], dtype: type) -> np.ndarray:
        heads = self._buffers_for(rows, tokens).heads
        if name not in heads:
            heads[name] = np.zeros(shape, dtype)
        return heads[name]

    def _backbone(self, ids: np.ndarray, positions: np.ndarray, valid: np.ndarray, causal_blocks: bool,
                  use_keep: bool) -> _Buffers:
        rows, tokens = ids.shape
        buf = self._buffers_for(rows, tokens)
        buf.ids[:] = ids
        buf.positions[:] = positions
        fill_step_mask(buf.mask, self._valid, self._keep if use_keep else None, valid, causal_blocks, BLOCK)
        self._run_bound("embed", {"ids": buf.ids}, {"hidden": buf.hidden[0]})
        cur, nxt = buf.hidden
        for i in range(self._layers):
            self._run_bound(f"layer_{i}", {"hidden": cur, "positions": buf.positions, "past_k": self._k[i],
                                           "past_v": self._v[i], "attn_mask": buf.mask},
                            {"hidden_out": nxt, "k_blk": buf.k_blk[i], "v_blk": buf.v_blk[i]})
            cur, nxt = nxt, cur
        buf.hidden = (cur, nxt)  # the final hidden state is hidden[0]
        self._passes += 1
        return buf

    def _append(self, buf: _Buffers, valid: np.ndarray) -> None:
        n = valid.shape[1]
        if self._len + n > self._valid.shape[1]:
            raise InputError(f"KV cache capacity {self._valid.shape[1]} exceeded ({self._len} + {n} tokens)")
        for i in range(self._layers):  # a copy into the preallocated cache
            self._k[i][:, :, self._len:self._len + n] = buf.k_blk[i]
            self._v[i][:, :, self._len:self._len + n] = buf.v_blk[i]
        self._valid[:, self._len:self._len + n] = valid
        self._len += n

    def hidden_states(self, ids: np.ndarray, positions: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """Final hidden states of a whole sequence (block-causal, no cache): for accuracy checks."""
        self.start(ids.shape[0], 1)
        return self._backbone(ids, positions, valid, causal_blocks=True, use_keep=False).hidden[0].copy()

    def prefill(self, ids: np.ndarray, positions: np.ndarray, valid: np.ndarray) -> None:
        if self._len:
            raise RuntimeError("prefill must come first in a session")
        buf = self._backbone(ids, positions, valid, causal_blocks=True, use_keep=False)
        self._append(buf, valid)

    def forward_block(self, ids: np.ndarray, positions: np.ndarray, valid: np.ndarray,
                      key_importance: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        if key_importance:
            raise InputError("SPRINT prefix pruning needs attention scores, which the exported graphs do not "
                             "output; use keep ratio 1.0 on the onnxruntime backend, or the torch backend")
        buf = self._backbone(ids, positions, valid, causal_blocks=False, use_keep=True)
        return buf.hidden[0], None

    def commit(self, ids: np.ndarray, positions: np.ndarray, valid: np.ndarray) -> None:
        buf = self._backbone(ids, positions, valid, causal_blocks=False, use_keep=False)
        self._append(buf, valid)

    def set_cache_mask(self, keep: np.ndarray | None) -> None:
        self._keep = None if keep is None else keep.astype(bool)

    # -- heads -----------------------------------------------------------------------------------

    def _head(self, name: str, hidden: np.ndarray) -> np.ndarray:
        rows, tokens, _ = hidden.shape
        b = self.config.backbone
        vocab = b.num_image_tokens if name == "head_image" else b.vocab_size
        out = self._head_buffer(rows, tokens, name, (rows, tokens, vocab), np.float32)
        self._run_bound(name, {"hidden": np.ascontiguousarray(hidden, np.float32)}, {"logits": out})
        return out

    def head_text(self, hidden: np.ndarray) -> np.ndarray:
        return self._head("head_text", hidden)

    def head_sample(self, kind: str, hidden: np.ndarray, row_weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Guided greedy scoring inside the graph: (x0 [T], p [T]) instead of [B, T, vocab] logits."""
        rows, tokens, _ = hidden.shape
        x0 = self._head_buffer(rows, tokens, f"head_{kind}_sample.x0", (tokens,), np.int64)
        p = self._head_buffer(rows, tokens, f"head_{kind}_sample.p", (tokens,), np.float32)
        self._run_bound(f"head_{kind}_sample", {"hidden": np.ascontiguousarray(hidden, np.float32),
                                                "row_weights": np.asarray(row_weights, np.float32)},
                        {"x0": x0, "p": p})
        return x0, p

    def head_image(self, hidden: np.ndarray) -> np.ndarray:
        return self._head("head_image", hidden)

    # -- image side ------------------------------------------------------------------------------

    def tokenize_image(self, pixels: np.ndarray) -> np.ndarray:
        return self.session("vision_tokenizer").run(None, {"pixels": pixels.astype(np.float32)})[0].astype(np.int64)

    def sigvq(self, ids: np.ndarray) -> np.ndarray:
        return self.session("sigvq").run(None, {"ids": ids.astype(np.int64)})[0]

    def _rope(self, mode: str, ht: int, wt: int, cap_len: int) -> tuple[np.ndarray, ...]:
        key = (mode, ht, wt, cap_len)
        if key not in self._rope_cache:  # one table set per resolution, computed once
            dec = self.config.decoders[mode]
            self._rope_cache[key] = dit_rope_tables(ht, wt, cap_len, dec.axes_dims, dec.rope_theta)
        return self._rope_cache[key]

    def dit(self, mode: str, latent: np.ndarray, t: np.ndarray, cap: np.ndarray) -> np.ndarray:
        patch = self.config.decoders[mode].patch_size
        tables = self._rope(mode, latent.shape[3] // patch, latent.shape[4] // patch, cap.shape[1])
        feeds = {"latent": latent.astype(np.float32), "t": t.astype(np.float32), "cap": cap.astype(np.float32),
                 "img_cos": tables[0], "img_sin": tables[1], "cap_cos": tables[2], "cap_sin": tables[3]}
        return self.session(f"dit_{mode}").run(None, feeds)[0]

    def vae_decode(self, latent: np.ndarray) -> np.ndarray:
        return self.session("vae_decoder").run(None, {"latent": latent.astype(np.float32)})[0]
