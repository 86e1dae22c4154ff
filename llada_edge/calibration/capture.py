"""Calibration: capture each component's graph inputs inside the real sampling loops.

PTQ scales must come from the activations the engines will see: partially masked blocks at every
mask ratio (early steps are mostly masks, late steps mostly tokens), both CFG rows (the unconditional
row has left pads), understanding prompts with images, editing rows, decoder steps at every t. So the
calibration requests of ``calibration_set.json`` run through the PyTorch reference pipeline on a
:class:`RecordingBackend` (a wrapper around the torch backend that records what passes through it, plus
forward hooks on the reference layers) which keeps, every ``stride``-th denoising step, exactly the inputs
of each exported graph:

* ``layer_i``: hidden, positions, past_k/past_v, attn_mask (one sample per row; the cache is padded to
  one length with invalid keys so samples stack -- the batch-concatenated ``.npz`` ModelOpt reads);
* ``head_text`` / ``head_image``: the hidden states the heads received;
* ``dit_turbo`` / ``dit_normal``: latent, t, cap and the RoPE tables of each decoder evaluation;
* ``vision_tokenizer`` / ``sigvq``: the pixels and VQ ids of every image encoded or decoded.

Written to ``BUILD/calibration/<component>.npz`` (stackable components) or
``BUILD/calibration/<component>/NNNN.npz`` (one file per sample, for a calibration data reader), plus
``BUILD/calibration/expert_coverage.json``: tokens routed to each expert of each MoE layer.

Expert coverage fallback (defined, and reported): the ``dense`` MoE lowering that TensorRT quantizes
runs every expert on every token, so an expert's input statistics are collected on all tokens -- an
expert that no calibration token was routed to is calibrated on tokens it did not receive rather than
left at a default. The coverage file lists those experts so the choice is visible.

:func:`calibrate_build` runs it as a build step (``BUILD/calibration``, keyed by the checkpoint, the options
and the request set): what ``llada-edge calibrate`` and the TensorRT build use.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from llada_edge.buildfolder import (
    CALIBRATION,
    ComponentEntry,
    Manifest,
    StepOutput,
    build_lock,
    build_step,
    fingerprint,
    sha256_file,
)
from llada_edge.buildfolder.files import SOURCE_HASHES, FileHashCache
from llada_edge.calibration.requests import (
    CALIBRATION_SET,
    DEFAULT_MAX_SAMPLES,
    DEFAULT_STRIDE,
    load_request_set,
    procedural_image,
)
from llada_edge.checkpoint import CheckpointFolder
from llada_edge.components import Registry
from llada_edge.config import BLOCK_SIZE
from llada_edge.errors import InputError
from llada_edge.model.backbone import MoE
from llada_edge.runtime import Pipeline
from llada_edge.runtime.backends.torch_backend import TorchBackend
from llada_edge.runtime.text import TextTokenizer

CAPTURE_VERSION = 1  # bump when what is captured changes, so older calibration data is recaptured
Progress = Callable[[str], None]
Sample = dict[str, np.ndarray]


HEADS_UNFUSED = "the recording backend captures the heads' inputs through head_text/head_image only"


class RecordingBackend:
    """The torch reference backend, recording the inputs of every exported graph as the requests run.

    Block steps, heads, decoder evaluations and image tokenization are recorded as they pass through this
    wrapper; each decoder layer's inputs (hidden states, the cache it attends to, its mask) are only
    visible inside the reference model, so forward pre-hooks on its layers record those during the block
    steps this wrapper marks for recording.
    """

    name = "torch (recording)"

    def __init__(self, backend: TorchBackend, stride: int = DEFAULT_STRIDE,
                 max_samples: int = DEFAULT_MAX_SAMPLES) -> None:
        self.inner = backend
        self.config = backend.config
        self.fused_head_kinds: tuple[str, ...] = ()  # the heads' hidden states are what gets recorded
        self.fused_step_kinds: tuple[str, ...] = ()
        self.provides_key_importance = backend.provides_key_importance
        self.registry = Registry(backend.config)
        self.stride = stride
        self.max_samples = max_samples
        self.samples: dict[str, list[Sample]] = defaultdict(list)
        b = backend.config.backbone
        self.coverage = np.zeros((b.num_hidden_layers, b.num_experts), np.int64)
        self._step = 0
        self._recording = False
        self._positions: np.ndarray | None = None
        self._seen: dict[str, int] = defaultdict(int)
        self._rng = np.random.default_rng(0)
        self._handles: list[Any] = []
        for layer, graph in zip(backend.backbone.decoder_layers(), self.registry.layers, strict=True):
            self._handles.append(layer.register_forward_pre_hook(self._layer_hook(graph.name)))
            if isinstance(layer.mlp, MoE):
                self._handles.append(layer.mlp.gate.register_forward_hook(self._gate_hook(graph.index)))

    # -- recording ------------------------------------------------------------------------------

    def _add(self, name: str, sample: Sample) -> None:
        """Reservoir sampling: every captured step of every request is equally likely to be kept."""
        bucket = self.samples[name]
        self._seen[name] += 1
        if len(bucket) < self.max_samples:
            bucket.append(sample)
        else:
            j = int(self._rng.integers(0, self._seen[name]))
            if j < self.max_samples:
                bucket[j] = sample

    def _layer_hook(self, name: str) -> Callable[..., None]:
        def hook(_module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            if not self._recording or self._positions is None:
                return
            h, _cos, _sin, bias, past_k, past_v = args
            # the additive bias back to "may attend", [B, T, S+T] (block steps broadcast one key mask)
            mask = (bias[:, 0] == 0).expand(h.shape[0], h.shape[1], bias.shape[-1])
            for r in range(h.shape[0]):
                self._add(name, {
                    "hidden": h[r:r + 1].float().numpy(), "positions": self._positions[r:r + 1].astype(np.int64),
                    "past_k": past_k[r:r + 1].float().numpy(), "past_v": past_v[r:r + 1].float().numpy(),
                    "attn_mask": mask[r:r + 1].numpy()})
        return hook

    def _gate_hook(self, index: int) -> Callable[..., None]:
        def hook(_module: torch.nn.Module, _args: object, output: tuple[torch.Tensor, torch.Tensor]) -> None:
            _, idx = output
            self.coverage[index] += np.bincount(idx.reshape(-1).numpy(), minlength=self.coverage.shape[1])
        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    # -- the Backend protocol (delegated; recorded where a graph input passes) --------------------

    @property
    def cache_len(self) -> int:
        return self.inner.cache_len

    @property
    def forward_passes(self) -> int:
        return self.inner.forward_passes

    def start(self, rows: int, capacity: int, block_size: int = BLOCK_SIZE) -> None:
        self.inner.start(rows, capacity, block_size)

    def prefill(self, ids: np.ndarray, positions: np.ndarray, valid: np.ndarray) -> None:
        self.inner.prefill(ids, positions, valid)

    def forward_block(self, ids: np.ndarray, positions: np.ndarray, valid: np.ndarray,
                      key_importance: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        self._step += 1
        self._recording = self._step % self.stride == 0
        self._positions = positions
        try:
            return self.inner.forward_block(ids, positions, valid, key_importance)
        finally:
            self._recording = False

    def commit(self, ids: np.ndarray, positions: np.ndarray, valid: np.ndarray) -> None:
        self.inner.commit(ids, positions, valid)

    def set_cache_mask(self, keep: np.ndarray | None) -> None:
        self.inner.set_cache_mask(keep)

    def hidden_states(self, ids: np.ndarray, positions: np.ndarray, valid: np.ndarray) -> np.ndarray:
        return self.inner.hidden_states(ids, positions, valid)

    def _record_head(self, kind: str, hidden: np.ndarray) -> None:
        if self._step % self.stride == 0:
            head = self.registry.heads[kind]
            for row in hidden:
                self._add(head.name, head.feeds(row[None].astype(np.float32)))

    def head_text(self, hidden: np.ndarray) -> np.ndarray:
        self._record_head("text", hidden)
        return self.inner.head_text(hidden)

    def head_image(self, hidden: np.ndarray) -> np.ndarray:
        self._record_head("image", hidden)
        return self.inner.head_image(hidden)

    def head_sample(self, kind: str, hidden: np.ndarray, row_weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise InputError(HEADS_UNFUSED)

    def forward_sample(self, kind: str, ids: np.ndarray, positions: np.ndarray, valid: np.ndarray,
                       row_weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise InputError(HEADS_UNFUSED)

    def require(self, components: Sequence[str], task: str) -> None:
        self.inner.require(components, task)

    def tokenize_image(self, pixels: np.ndarray) -> np.ndarray:
        tokenizer = self.registry.vision_tokenizer
        self._add(tokenizer.name, tokenizer.feeds(pixels.astype(np.float32)))
        return self.inner.tokenize_image(pixels)

    def sigvq(self, ids: np.ndarray) -> np.ndarray:
        self._add(self.registry.sigvq.name, self.registry.sigvq.feeds(ids.astype(np.int64)))
        return self.inner.sigvq(ids)

    def dit(self, mode: str, latent: np.ndarray, t: np.ndarray, cap: np.ndarray) -> np.ndarray:
        dit = self.registry.dits[mode]
        self._add(dit.name, dit.feeds_for(latent, t, cap))
        return self.inner.dit(mode, latent, t, cap)

    def vae_decode(self, latent: np.ndarray) -> np.ndarray:
        return self.inner.vae_decode(latent)

    # -- output ---------------------------------------------------------------------------------

    def save(self, out_dir: Path) -> dict[str, int]:
        out_dir.mkdir(parents=True, exist_ok=True)
        counts = {}
        for name, samples in self.samples.items():
            if self.registry[name].stacked_calibration:
                if name in {layer.name for layer in self.registry.layers}:
                    samples = _pad_cache(samples)
                # ModelOpt's calibration_data format: a dict of arrays concatenated along axis 0
                stacked: dict[str, Any] = {k: np.concatenate([s[k] for s in samples]) for k in samples[0]}
                np.savez(out_dir / f"{name}.npz", **stacked)
            else:  # no common batch axis (tables, image sizes, code counts): one file per sample for a data reader
                folder = out_dir / name
                folder.mkdir(exist_ok=True)
                for i, sample in enumerate(samples):
                    arrays: dict[str, Any] = sample
                    np.savez(folder / f"{i:04d}.npz", **arrays)
            counts[name] = len(samples)
        (out_dir / "expert_coverage.json").write_text(json.dumps(self.coverage_report(), indent=2) + "\n")
        return counts

    def coverage_report(self) -> dict[str, Any]:
        layers = {}
        for layer in self.registry.layers:
            if not layer.is_moe:
                continue
            row = self.coverage[layer.index]
            layers[layer.name] = {"tokens_per_expert": row.tolist(), "min": int(row.min()), "max": int(row.max()),
                                  "experts_without_tokens": np.flatnonzero(row == 0).tolist()}
        unseen = sum(len(v["experts_without_tokens"]) for v in layers.values())
        return {"layers": layers, "experts_without_tokens": unseen,
                "fallback": "dense lowering: every expert is calibrated on all tokens (routed or not); experts "
                            "listed under experts_without_tokens saw no routed calibration token"}


def _pad_cache(samples: list[Sample]) -> list[Sample]:
    """Prepend invalid (masked, zero) cache entries so every sample has the longest cache length."""
    longest = max(s["past_k"].shape[2] for s in samples)
    out = []
    for s in samples:
        extra = longest - s["past_k"].shape[2]
        if extra:
            _, kv, _, hd = s["past_k"].shape
            zeros = np.zeros((1, kv, extra, hd), np.float32)
            t = s["attn_mask"].shape[1]
            s = dict(s, past_k=np.concatenate([zeros, s["past_k"]], axis=2),
                     past_v=np.concatenate([zeros, s["past_v"]], axis=2),
                     attn_mask=np.concatenate([np.zeros((1, t, extra), bool), s["attn_mask"]], axis=2))
        out.append(s)
    return out


def calibrate(checkpoint: str | Path, out_dir: str | Path, stride: int = DEFAULT_STRIDE,
              max_samples: int = DEFAULT_MAX_SAMPLES, image_size: int = 128, progress: Progress = print
              ) -> dict[str, int]:
    """Run the calibration requests on the torch reference and save every component's inputs."""
    data = load_request_set("calibration")
    recorder = RecordingBackend(TorchBackend(checkpoint), stride, max_samples)
    pipe = Pipeline(recorder, TextTokenizer.from_file(Path(checkpoint) / "tokenizer.json"))
    images = [Image.fromarray(procedural_image(image_size, image_size + 32, seed)) for seed in data.image_seeds]
    with torch.inference_mode():
        for i, prompt in enumerate(data.t2i):
            progress(f"calibrate: t2i {i + 1}/{len(data.t2i)}")
            pipe.generate_image(prompt, image_size, image_size, steps=4, decode_mode="turbo" if i % 2 else "normal",
                                decode_steps=None if i % 2 else 6, seed=i)
        for i, question in enumerate(data.understand):
            progress(f"calibrate: understand {i + 1}/{len(data.understand)}")
            pipe.understand(images[i % len(images)], question, max_new_tokens=32, steps=8)
        for i, message in enumerate(data.chat):
            progress(f"calibrate: chat {i + 1}/{len(data.chat)}")
            pipe.chat([{"role": "user", "content": message}], max_new_tokens=32, steps=8)
        for i, instruction in enumerate(data.edit):
            progress(f"calibrate: edit {i + 1}/{len(data.edit)}")
            pipe.edit(images[i % len(images)], instruction, steps=4, source_size=image_size,
                      cfg_image_scale=1.0 if i % 2 else 0.0)
    recorder.remove()
    return recorder.save(Path(out_dir))


def calibrate_build(build_dir: str | Path, manifest: Manifest | None = None, checkpoint: str | Path | None = None,
                    stride: int = DEFAULT_STRIDE, max_samples: int = DEFAULT_MAX_SAMPLES,
                    progress: Progress = print) -> ComponentEntry:
    """``BUILD/calibration`` as a build step: captured from ``checkpoint`` (default: the one the build was exported
    from), skipped when the same weights, options and request set were captured already."""
    build_dir = Path(build_dir).absolute()
    if manifest is None:
        Manifest.load(build_dir)  # not a build folder: say so before taking its lock
    with build_lock(build_dir, "calibrating"):
        manifest = manifest if manifest is not None else Manifest.load(build_dir)
        source = checkpoint or manifest.checkpoint.get("path")
        if not source or not Path(source).is_dir():
            raise InputError(f"{build_dir}: the checkpoint {source!r} the build was exported from is not available; "
                             "pass --checkpoint DIR")
        ckpt = CheckpointFolder(source)  # a broken checkpoint fails here, naming the file and key
        hashes = FileHashCache(build_dir / SOURCE_HASHES)
        weights = [c.source_fingerprint(ckpt, hashes.sha256) for c in Registry(ckpt.config)]  # content, not paths
        key = fingerprint([CAPTURE_VERSION, weights, stride, max_samples, sha256_file(CALIBRATION_SET)])

        def capture(tmp: Path) -> StepOutput:
            counts = calibrate(ckpt.root, tmp, stride=stride, max_samples=max_samples, progress=progress)
            return StepOutput({"samples": counts, "stride": stride, "max_samples": max_samples,
                               "checkpoint": str(ckpt.root)})

        entry, built = build_step(build_dir, manifest, CALIBRATION, key, capture)
    counts = entry.meta["samples"]
    progress(f"calibrate: {', '.join(f'{k} {v}' for k, v in counts.items())}" + ("" if built else " (up to date)"))
    return entry
