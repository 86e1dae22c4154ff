"""The PyTorch reference backend: the reference modules of :mod:`llada_edge.model` behind the
:class:`~llada_edge.runtime.backend.Backend` protocol, and the fast CUDA path built from the same modules.

The KV cache is preallocated per request (``start``) with a fixed capacity and filled in place;
components load lazily on first use, so an understanding request never loads the image decoder.

``kv_cache=False`` is the upstream HF way: no cache, every step recomputes the whole sequence so far
with the block-causal mask. It exists to prove that the cached loop gives the same tokens.

``moe_impl`` picks the MoE lowering (:class:`~llada_edge.model.backbone.MoE`): ``loop`` (the upstream eager
way, data-dependent), ``dense``, or the static sparse ``grouped`` / ``padded`` (:mod:`llada_edge.model.sparse_moe`).

``static_shapes=True`` runs every block step over the *full* preallocated cache with a key mask (no
slicing by the current length) and a static MoE lowering (``grouped`` unless another static one is asked
for), so the shapes and addresses of a step never change within a request: the precondition for CUDA
graphs, and testable on the CPU. ``cuda_graphs=True`` (CUDA only, implies static shapes) then captures one
graph per step kind and shape (block / fused text head / fused image head x rows x block tokens x capacity)
after warm-up runs on a side stream, and replays it with the inputs copied into static buffers; when capture
fails it falls back to eager for that key and records why in ``graph_fallbacks``.

``fp8="token"|"tensor"`` stores every projection of the layers (attention, MLPs, shared and routed experts)
as e4m3 with per-channel scales and runs them through ``torch._scaled_mm`` / ``torch._scaled_grouped_mm``
with activations scaled per token or per tensor (:mod:`llada_edge.model.fp8`); CUDA needs compute capability
>= 8.9, the CPU runs the same math slowly (the tests' path).

A block step with a fused head (:meth:`TorchBackend.forward_sample`) keeps the hidden states on the device
and brings back only x0 and p, in one transfer: one host synchronisation per step by design (gpu_check.py
counts them on a GPU).
The CUDA paths (capture, replay, the Hopper FP8 and grouped-GEMM kernels) have not run on this project's
machines; ``benchmarks/gpu_check.py`` checks and times them where a GPU is lent, and their tests skip without one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from llada_edge.checkpoint import CheckpointFolder
from llada_edge.components import Registry
from llada_edge.config import BLOCK_SIZE
from llada_edge.errors import InputError, LladaEdgeError
from llada_edge.model import load_backbone, load_dit, load_sigvq, load_vae, load_vision_tokenizer
from llada_edge.model.backbone import KVCache, LLaDA2Backbone, guided_greedy
from llada_edge.model.fp8 import ACTIVATION_SCALINGS, fp8_supported
from llada_edge.model.sparse_moe import SPARSE_LOWERINGS
from llada_edge.runtime.backends.engine_session import CacheCounters, check_capacity

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
MOE_LOWERINGS = ("loop", "dense", *SPARSE_LOWERINGS)
STATIC_MOE_LOWERINGS = ("dense", *SPARSE_LOWERINGS)  # no data-dependent shapes, no host sync
BLOCK = "block"  # the step kind without a head (forward_block, commit); the fused ones are "text" and "image"

StepFn = Callable[..., tuple[torch.Tensor, ...]]


class _CapturedStep:
    """One CUDA graph for a step of one kind and shape: static inputs in, static outputs out.

    The KV cache tensors are captured by address (preallocated per request and only written in
    place), so a replay always sees the current cache. Inputs are copied into the static buffers.
    """

    def __init__(self, step: StepFn, inputs: Sequence[torch.Tensor]) -> None:
        self.inputs = [t.clone() for t in inputs]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):  # warm-up: allocator pools, lazy kernels, cuBLAS handles
                step(*self.inputs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = step(*self.inputs)

    def replay(self, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        for static, new in zip(self.inputs, inputs, strict=True):
            static.copy_(new)
        self.graph.replay()
        return self.out


class TorchBackend(CacheCounters):
    name = "torch"
    fused_head_kinds: tuple[str, ...] = ("text", "image")
    fused_step_kinds: tuple[str, ...] = ("text", "image")
    provides_key_importance = True  # attention mass per cached key, from probes in the reference attention

    def __init__(self, model_dir: str | Path, device: str = "cpu", dtype: str = "float32",
                 moe_impl: str | None = None, kv_cache: bool = True, static_shapes: bool = False,
                 cuda_graphs: bool = False, fp8: str | None = None) -> None:
        if dtype not in DTYPES:
            raise InputError(f"unknown dtype {dtype!r} for the torch backend (expected one of {sorted(DTYPES)})")
        self.ckpt = CheckpointFolder(model_dir)
        self.config = self.ckpt.config
        self.device = torch.device(device)
        self.dtype = DTYPES[dtype]
        self.static_shapes = static_shapes or cuda_graphs
        self.moe_impl = self._pick_moe(moe_impl, self.static_shapes, fp8, self.device.type == "cuda"
                                       and self.dtype == torch.float32)
        if fp8 is not None and fp8 not in ACTIVATION_SCALINGS:
            raise InputError(f"unknown FP8 activation scaling {fp8!r} (expected one of {list(ACTIVATION_SCALINGS)})")
        if fp8 is not None and not fp8_supported(self.device):
            raise InputError(f"FP8 GEMMs need compute capability >= 8.9; {self.device} has "
                             f"{torch.cuda.get_device_capability(self.device)}")
        if fp8 is not None and self.device.type == "cuda" and self.dtype != torch.bfloat16:
            raise InputError("FP8 on CUDA needs --dtype bfloat16 (the FP8 kernels write bf16)")
        self.fp8 = fp8
        self._backbone: LLaDA2Backbone | None = None
        self._components: dict[str, torch.nn.Module] = {}
        self._k: list[torch.Tensor] = []
        self._v: list[torch.Tensor] = []
        self._valid = torch.zeros(0, 0, dtype=torch.bool)
        self._keep: torch.Tensor | None = None
        self._block_size = BLOCK_SIZE
        self._len = 0
        self._passes = 0
        self.kv_cache = kv_cache
        if cuda_graphs and self.device.type != "cuda":
            raise InputError("CUDA graphs need a CUDA device (--device cuda)")
        self.cuda_graphs = cuda_graphs
        self._graphs: dict[tuple[str, int, int, int], _CapturedStep | None] = {}
        self.graph_fallbacks: list[str] = []
        self._history: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # kv_cache=False only

    @staticmethod
    def _pick_moe(moe_impl: str | None, static_shapes: bool, fp8: str | None, cuda_fp32: bool) -> str:
        """The MoE lowering: asked for, else ``grouped`` where shapes must be static or experts are FP8 (``padded``
        for fp32 on CUDA, whose grouped GEMM exists for bf16 only: torch's fp32 fallback reads offsets on the host)."""
        if moe_impl is None:
            if not (static_shapes or fp8):
                return "loop"
            return "padded" if cuda_fp32 and not fp8 else "grouped"
        if moe_impl not in MOE_LOWERINGS:
            raise InputError(f"unknown MoE lowering {moe_impl!r} (expected one of {list(MOE_LOWERINGS)})")
        if static_shapes and moe_impl not in STATIC_MOE_LOWERINGS:
            raise InputError(f"static shapes (and CUDA graphs) need a static MoE lowering "
                             f"({', '.join(STATIC_MOE_LOWERINGS)}), not {moe_impl!r}")
        if fp8 and moe_impl != "grouped":
            raise InputError(f"FP8 routed experts run in the grouped MoE lowering, not {moe_impl!r}")
        return moe_impl

    # -- lazy components ----------------------------------------------------------------------

    @property
    def backbone(self) -> LLaDA2Backbone:
        if self._backbone is None:
            backbone = load_backbone(self.ckpt, self.dtype).to(self.device)
            backbone.set_moe_impl(self.moe_impl)
            if self.fp8:
                backbone.to_fp8(self.fp8)
            self._backbone = backbone
        return self._backbone

    def _component(self, key: str, load: Callable[[], torch.nn.Module]) -> torch.nn.Module:
        """A reference module, loaded on first use (an understanding request never loads the decoders)."""
        if key not in self._components:
            self._components[key] = load().to(self.device)
        return self._components[key]

    def require(self, components: Sequence[str], task: str) -> None:
        registry = Registry(self.config)
        missing = []
        for name in components:
            component = registry[name]
            try:  # a missing or unreadable weights file raises here, before any module is built
                component.tensors(self.ckpt)
                if not all(path.is_file() for path in component.source_files(self.ckpt)):
                    missing.append(name)
            except LladaEdgeError:
                missing.append(name)
        if missing:
            raise InputError(f"{self.ckpt.root}: {task} needs {', '.join(missing)}, whose weights this checkpoint "
                             "lacks")

    def _t(self, array: np.ndarray) -> torch.Tensor:
        # non_blocking: from pageable memory CUDA stages the bytes at once and returns without waiting for the
        # stream, where a blocking copy would synchronise it (several host syncs per step instead of one)
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device, non_blocking=True)

    # -- backbone session ---------------------------------------------------------------------

    def start(self, rows: int, capacity: int, block_size: int = BLOCK_SIZE) -> None:
        cfg = self.config.backbone
        shape = (rows, cfg.num_key_value_heads, capacity, cfg.head_dim)
        if not self._k or self._k[0].shape != shape:
            self._k = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(cfg.num_hidden_layers)]
            self._v = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(cfg.num_hidden_layers)]
            self._valid = torch.zeros(rows, capacity, dtype=torch.bool, device=self.device)
            self._graphs.clear()  # captured graphs read the cache by address: the old tensors are gone
        self._valid.zero_()
        self._keep = None
        self._len = 0
        self._block_size = block_size
        self._history = []

    def _append(self, kv: list[tuple[torch.Tensor, torch.Tensor]], valid: torch.Tensor) -> None:
        n = valid.shape[1]
        check_capacity(self._len, n, self._valid.shape[1])
        for layer, (k, v) in enumerate(kv):  # a copy into the preallocated cache
            self._k[layer][:, :, self._len:self._len + n] = k
            self._v[layer][:, :, self._len:self._len + n] = v
        self._valid[:, self._len:self._len + n] = valid
        self._len += n

    @torch.inference_mode()
    def prefill(self, ids: np.ndarray, positions: np.ndarray, valid: np.ndarray) -> None:
        if self._len:
            raise RuntimeError("prefill must come first in a session")
        valid_t = self._t(valid).bool()
        if not self.kv_cache:
            self._remember(ids, positions, valid_t)
            return
        _, kv = self.backbone.forward_full(self._t(ids), self._t(positions), valid_t, self._block_size)
        self._passes += 1
        self._append(kv, valid_t)

    def _remember(self, ids: np.ndarray, positions: np.ndarray, valid: torch.Tensor) -> None:
        self._history.append((self._t(ids), self._t(positions), valid))
        self._len += ids.shape[1]

    def _key_mask(self, valid: torch.Tensor, use_keep: bool, static: bool) -> torch.Tensor:
        """Which keys a block may attend: the valid (and, for SPRINT, kept) cache entries, then the block's own
        valid tokens; over the whole capacity when shapes are static, else over the filled part."""
        cached = self._valid if static else self._valid[:, :self._len]
        if use_keep and self._keep is not None:
            keep = torch.ones_like(cached)
            keep[:, :self._keep.shape[1]] = self._keep
            cached = cached & keep
        return torch.cat([cached, valid], dim=1)

    def _past(self, static: bool) -> KVCache:
        if static:
            return list(zip(self._k, self._v, strict=True))
        return [(k[:, :, :self._len], v[:, :, :self._len]) for k, v in zip(self._k, self._v, strict=True)]

    def _step_function(self, kind: str, static: bool) -> StepFn:
        """The computation of one step, on device tensors: what a CUDA graph captures.

        ``block``: (hidden, K/V per layer); a head kind: (x0 and p stacked as float64 [2, T], so that one
        transfer brings both back)."""
        past = self._past(static)
        if kind == BLOCK:
            def block(ids: torch.Tensor, positions: torch.Tensor, key_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
                h, kv = self.backbone.forward_block(ids, positions, past, key_mask)
                return h, *(t for pair in kv for t in pair)
            return block

        def fused(ids: torch.Tensor, positions: torch.Tensor, key_mask: torch.Tensor, row_weights: torch.Tensor
                  ) -> tuple[torch.Tensor, ...]:
            h, _ = self.backbone.forward_block(ids, positions, past, key_mask)
            return (self._packed_greedy(kind, h, row_weights),)
        return fused

    def _packed_greedy(self, kind: str, h: torch.Tensor, row_weights: torch.Tensor) -> torch.Tensor:
        """The fused head's x0 and p as one float64 [2, T] tensor (x0 < 2**53: exact)."""
        x0, p = guided_greedy(self._head_logits(kind, h), row_weights)
        return torch.stack([x0.double(), p.double()])

    def _step(self, kind: str, ids: np.ndarray, positions: np.ndarray, valid: torch.Tensor, use_keep: bool,
              row_weights: np.ndarray | None = None, eager: bool = False) -> tuple[torch.Tensor, ...]:
        """One block step against the cache, eager or through the CUDA graph of its kind and shape (``eager``:
        never a graph, e.g. when the attention probes must run, which a replay would skip)."""
        static = self.static_shapes
        inputs = [self._t(ids), self._t(positions), self._key_mask(valid, use_keep, static)]
        if row_weights is not None:
            inputs.append(self._t(np.asarray(row_weights, np.float32)))
        step = self._step_function(kind, static)
        self._passes += 1
        if eager or not self.cuda_graphs:
            return step(*inputs)
        key = (kind, ids.shape[0], ids.shape[1], self._valid.shape[1])
        if key not in self._graphs:
            self._graphs[key] = self._capture(key, step, inputs)
        captured = self._graphs[key]
        if captured is None:  # capture failed earlier for this key: eager
            return step(*inputs)
        return captured.replay(inputs)

    def _capture(self, key: tuple[str, int, int, int], step: StepFn, inputs: list[torch.Tensor]
                 ) -> _CapturedStep | None:
        try:
            return _CapturedStep(step, inputs)
        except RuntimeError as exc:  # e.g. an op that syncs with the host: keep running, eagerly
            # capture_end only says "previous error during capture": the op that failed is the context
            causes = [exc, *([exc.__context__] if exc.__context__ is not None else [])]
            self.graph_fallbacks.append(f"{key}: " + " <- ".join(str(e).splitlines()[0] for e in causes))
            return None

    def _run_block(self, ids: np.ndarray, positions: np.ndarray, valid: np.ndarray, use_keep: bool,
                   eager: bool = False) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
        valid_t = self._t(valid).bool()
        if not self.kv_cache:
            return (*self._recompute_block(ids, positions, valid_t), valid_t)
        h, *flat_kv = self._step(BLOCK, ids, positions, valid_t, use_keep, eager=eager)
        return h, list(zip(flat_kv[0::2], flat_kv[1::2], strict=True)), valid_t

    def _recompute_block(self, ids: np.ndarray, positions: np.ndarray, valid: torch.Tensor
                         ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """No cache: the whole sequence so far, block-causal, and keep the last block's outputs."""
        if self._keep is not None:
            raise InputError("prefix pruning (SPRINT keep ratio < 1) needs the KV cache")
        parts = [*self._history, (self._t(ids), self._t(positions), valid)]
        all_ids, all_pos, all_valid = (torch.cat([p[i] for p in parts], dim=1) for i in range(3))
        h, kv = self.backbone.forward_full(all_ids, all_pos, all_valid, self._block_size)
        self._passes += 1
        t = ids.shape[1]
        return h[:, -t:], [(k[:, :, -t:], v[:, :, -t:]) for k, v in kv]

    @torch.inference_mode()
    def forward_block(self, ids: np.ndarray, positions: np.ndarray, valid: np.ndarray,
                      key_importance: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        probes: list[torch.Tensor] = []
        attentions = [layer.attention for layer in self.backbone.decoder_layers()]
        if key_importance and not self.kv_cache:
            raise InputError("SPRINT key importance needs the KV cache")
        for attn in attentions:
            attn.key_mass_probe = probes if key_importance else None
        try:
            h, _, _ = self._run_block(ids, positions, valid, use_keep=True, eager=key_importance)
        finally:
            for attn in attentions:
                attn.key_mass_probe = None
        importance = None
        if key_importance:
            importance = torch.stack(probes).mean(0)[:, :self._len].float().cpu().numpy()
        return h.float().cpu().numpy(), importance

    @torch.inference_mode()
    def forward_sample(self, kind: str, ids: np.ndarray, positions: np.ndarray, valid: np.ndarray,
                       row_weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        valid_t = self._t(valid).bool()
        if self.kv_cache:
            (packed,) = self._step(kind, ids, positions, valid_t, use_keep=True, row_weights=row_weights)
        else:
            h, _ = self._recompute_block(ids, positions, valid_t)
            packed = self._packed_greedy(kind, h, self._t(np.asarray(row_weights, np.float32)))
        x0, p = packed.cpu().numpy()  # the step's one host synchronisation
        return x0.astype(np.int64), p.astype(np.float32)

    @torch.inference_mode()
    def commit(self, ids: np.ndarray, positions: np.ndarray, valid: np.ndarray) -> None:
        # The committed block attends to the whole (unpruned) prefix so the cache stays exact.
        if not self.kv_cache:  # nothing to compute: the next step recomputes everything
            self._remember(ids, positions, self._t(valid).bool())
            return
        _, kv, valid_t = self._run_block(ids, positions, valid, use_keep=False)
        self._append(kv, valid_t)

    def set_cache_mask(self, keep: np.ndarray | None) -> None:
        self._keep = None if keep is None else self._t(keep).bool()

    # -- heads ----------------------------------------------------------------------------------

    @torch.inference_mode()
    def hidden_states(self, ids: np.ndarray, positions: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """Final hidden states of a whole sequence (block-causal, no cache): for accuracy checks."""
        h, _ = self.backbone.forward_full(self._t(ids), self._t(positions), self._t(valid).bool(), self._block_size)
        return h.float().cpu().numpy()

    @torch.inference_mode()
    def head_text(self, hidden: np.ndarray) -> np.ndarray:
        return self.backbone.logits(self._t(hidden).to(self.dtype)).cpu().numpy()

    @torch.inference_mode()
    def head_sample(self, kind: str, hidden: np.ndarray, row_weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Guided greedy scoring, the same function the exported ``head_*_sample`` graphs trace."""
        x0, p = guided_greedy(self._head_logits(kind, self._t(hidden).to(self.dtype)),
                              self._t(np.asarray(row_weights, np.float32)))
        return x0.cpu().numpy(), p.cpu().numpy()

    def _head_logits(self, kind: str, h: torch.Tensor) -> torch.Tensor:
        return self.backbone.image_logits(h) if kind == "image" else self.backbone.logits(h)

    @torch.inference_mode()
    def head_image(self, hidden: np.ndarray) -> np.ndarray:
        return self.backbone.image_logits(self._t(hidden).to(self.dtype)).cpu().numpy()

    # -- image side -----------------------------------------------------------------------------

    @torch.inference_mode()
    def tokenize_image(self, pixels: np.ndarray) -> np.ndarray:
        # fp32 whatever the backend dtype: the ids are an argmax over cosine similarities
        tokenizer = self._component("tokenizer", lambda: load_vision_tokenizer(self.ckpt, torch.float32))
        return tokenizer(self._t(pixels).float()).cpu().numpy().astype(np.int64)

    @torch.inference_mode()
    def sigvq(self, ids: np.ndarray) -> np.ndarray:
        sigvq = self._component("sigvq", lambda: load_sigvq(self.ckpt, self.dtype))
        return sigvq(self._t(ids).long()).float().cpu().numpy()

    @torch.inference_mode()
    def dit(self, mode: str, latent: np.ndarray, t: np.ndarray, cap: np.ndarray) -> np.ndarray:
        model = self._component(f"dit_{mode}", lambda: load_dit(self.ckpt, mode, self.dtype))
        return model(self._t(latent).float(), self._t(t).float(), self._t(cap).float()).float().cpu().numpy()

    @torch.inference_mode()
    def vae_decode(self, latent: np.ndarray) -> np.ndarray:
        vae = self._component("vae", lambda: load_vae(self.ckpt, self.dtype))
        return vae(self._t(latent).float()).float().cpu().numpy()
