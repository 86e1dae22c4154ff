"""The PyTorch reference backend: the reference modules of :mod:`llada_edge.model` behind the
:class:`~llada_edge.runtime.backend.Backend` protocol.

The KV cache is preallocated per request (``start``) with a fixed capacity and filled in place;
components load lazily on first use, so an understanding request never loads the image decoder.

``kv_cache=False`` is the upstream HF way: no cache, every step recomputes the whole sequence so far
with the block-causal mask. It exists to prove that the cached loop gives the same tokens.

``static_shapes=True`` runs every block step over the *full* preallocated cache with a key mask (no
slicing by the current length) and the static ``dense`` MoE lowering, so the shapes and addresses of a
step never change within a request: the precondition for CUDA graphs, and testable on the CPU.
``cuda_graphs=True`` (CUDA only, implies static shapes) then captures one graph per shape key
(rows x block tokens x capacity) after warm-up runs on a side stream, and replays it with the inputs
copied into static buffers; when capture fails it falls back to eager for that key and records why.
The capture/replay itself has not run on this project's machines (no GPU was available); its test skips
without a CUDA device.
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
from llada_edge.runtime.backends.engine_session import CacheCounters, check_capacity

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class _CapturedStep:
    """One CUDA graph for a block step of one shape: static inputs in, static outputs out.

    The KV cache tensors are captured by address (preallocated per request and only written in
    place), so a replay always sees the current cache. Inputs are copied into the static buffers.
    """

    def __init__(self, backbone: LLaDA2Backbone, past: KVCache, ids: torch.Tensor, positions: torch.Tensor,
                 key_mask: torch.Tensor) -> None:
        self.ids, self.positions, self.key_mask = ids.clone(), positions.clone(), key_mask.clone()

        def step() -> tuple:
            return backbone.forward_block(self.ids, self.positions, past, self.key_mask)

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):  # warm-up: allocator pools, lazy kernels, cuBLAS handles
                step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = step()

    def replay(self, ids: torch.Tensor, positions: torch.Tensor, key_mask: torch.Tensor) -> tuple:
        self.ids.copy_(ids)
        self.positions.copy_(positions)
        self.key_mask.copy_(key_mask)
        self.graph.replay()
        return self.out


class TorchBackend(CacheCounters):
    name = "torch"
    fused_head_kinds: tuple[str, ...] = ("text", "image")
    provides_key_importance = True  # attention mass per cached key, from probes in the reference attention

    def __init__(self, model_dir: str | Path, device: str = "cpu", dtype: str = "float32",
                 moe_impl: str = "loop", kv_cache: bool = True, static_shapes: bool = False,
                 cuda_graphs: bool = False) -> None:
        if dtype not in DTYPES:
            raise InputError(f"unknown dtype {dtype!r} for the torch backend (expected one of {sorted(DTYPES)})")
        self.ckpt = CheckpointFolder(model_dir)
        self.config = self.ckpt.config
        self.device = torch.device(device)
        self.dtype = DTYPES[dtype]
        self.moe_impl = moe_impl
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
        self.static_shapes = static_shapes or cuda_graphs
        if self.static_shapes:
            self.moe_impl = "dense"  # routing without data-dependent shapes or host syncs
        self._graphs: dict[tuple[int, int, int], _CapturedStep | None] = {}
        self.graph_fallbacks: list[str] = []
        self._history: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # kv_cache=False only

    # -- lazy components ----------------------------------------------------------------------

    @property
    def backbone(self) -> LLaDA2Backbone:
        if self._backbone is None:
            self._backbone = load_backbone(self.ckpt, self.dtype).to(self.device)
            self._backbone.set_moe_impl(self.moe_impl)
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
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device)

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

    def _past(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(k[:, :, :self._len], v[:, :, :self._len]) for k, v in zip(self._k, self._v, strict=True)]

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

    def _run_block(self, ids: np.ndarray, positions: np.ndarray, valid: np.ndarray, use_keep: bool
                   ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
        valid_t = self._t(valid).bool()
        if not self.kv_cache:
            return (*self._recompute_block(ids, positions, valid_t), valid_t)
        if self.static_shapes:
            return (*self._static_block(ids, positions, valid_t, use_keep), valid_t)
        cached = self._valid[:, :self._len]
        if use_keep and self._keep is not None:
            cached = cached & self._keep
        key_mask = torch.cat([cached, valid_t], dim=1)
        h, kv = self.backbone.forward_block(self._t(ids), self._t(positions), self._past(), key_mask)
        self._passes += 1
        return h, kv, valid_t

    def _static_block(self, ids: np.ndarray, positions: np.ndarray, valid: torch.Tensor, use_keep: bool
                      ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """A block step over the full-capacity cache (fixed shapes), eager or through a CUDA graph."""
        cached = self._valid
        if use_keep and self._keep is not None:
            keep = torch.ones_like(self._valid)
            keep[:, :self._keep.shape[1]] = self._keep
            cached = cached & keep
        key_mask = torch.cat([cached, valid], dim=1)
        ids_t, pos_t = self._t(ids), self._t(positions)
        past = list(zip(self._k, self._v, strict=True))
        self._passes += 1
        if not self.cuda_graphs:
            return self.backbone.forward_block(ids_t, pos_t, past, key_mask)
        key = (ids.shape[0], ids.shape[1], self._valid.shape[1])
        if key not in self._graphs:
            self._graphs[key] = self._capture(past, ids_t, pos_t, key_mask)
        step = self._graphs[key]
        if step is None:  # capture failed earlier for this shape: eager
            return self.backbone.forward_block(ids_t, pos_t, past, key_mask)
        return step.replay(ids_t, pos_t, key_mask)

    def _capture(self, past: list, ids: torch.Tensor, positions: torch.Tensor, key_mask: torch.Tensor
                 ) -> _CapturedStep | None:
        try:
            return _CapturedStep(self.backbone, past, ids, positions, key_mask)
        except RuntimeError as exc:  # e.g. an op that syncs with the host: keep running, eagerly
            self.graph_fallbacks.append(f"{tuple(ids.shape)}: {str(exc).splitlines()[0]}")
            return None

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
            h, _, _ = self._run_block(ids, positions, valid, use_keep=True)
        finally:
            for attn in attentions:
                attn.key_mass_probe = None
        importance = None
        if key_importance:
            importance = torch.stack(probes).mean(0)[:, :self._len].float().cpu().numpy()
        return h.float().cpu().numpy(), importance

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
        h = self._t(hidden).to(self.dtype)
        logits = self.backbone.image_logits(h) if kind == "image" else self.backbone.logits(h)
        x0, p = guided_greedy(logits, self._t(np.asarray(row_weights, np.float32)))
        return x0.cpu().numpy(), p.cpu().numpy()

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
