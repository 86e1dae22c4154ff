"""Calibration: capture each component's graph inputs inside the real sampling loops.

PTQ scales must come from the activations the engines will see: partially masked blocks at every
mask ratio (early steps are mostly masks, late steps mostly tokens), both CFG rows (the unconditional
row has left pads), understanding prompts with images, editing rows, decoder steps at every t. So the
calibration requests of ``calibration_set.json`` run through the PyTorch reference pipeline while hooks
record, every ``stride``-th denoising step, exactly the inputs of each exported graph:

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
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from llada_edge.positions import dit_rope_tables
from llada_edge.reference import procedural_image
from llada_edge.runtime import Pipeline
from llada_edge.runtime.backends.torch_backend import TorchBackend

CALIBRATION_SET = Path(__file__).resolve().parent / "calibration_set.json"
Progress = Callable[[str], None]


class ActivationCapture:
    """Hooks on a :class:`TorchBackend` that record graph inputs during block steps."""

    def __init__(self, backend: TorchBackend, stride: int = 2, max_samples: int = 64) -> None:
        self.backend = backend
        self.stride = stride
        self.max_samples = max_samples
        self.samples: dict[str, list[dict[str, np.ndarray]]] = defaultdict(list)
        cfg = backend.config.backbone
        self.coverage = np.zeros((cfg.num_hidden_layers, cfg.num_experts), np.int64)
        self._step = 0
        self._recording = False
        self._positions: np.ndarray | None = None
        self._handles = []
        self._seen: dict[str, int] = defaultdict(int)
        self._rng = np.random.default_rng(0)
        self._install()

    # -- hooks ----------------------------------------------------------------------------------

    def _install(self) -> None:
        backbone = self.backend.backbone
        for i, layer in enumerate(backbone.model.layers):
            self._handles.append(layer.register_forward_pre_hook(self._layer_hook(i)))
            if hasattr(layer.mlp, "gate"):
                self._handles.append(layer.mlp.gate.register_forward_hook(self._gate_hook(i)))
        original_block, original_text, original_image, original_dit = (
            self.backend.forward_block, self.backend.head_text, self.backend.head_image, self.backend.dit)
        original_tokenize, original_sigvq = self.backend.tokenize_image, self.backend.sigvq

        def forward_block(ids, positions, valid, key_importance=False):
            self._step += 1
            self._recording = self._step % self.stride == 0
            self._positions = positions
            try:
                return original_block(ids, positions, valid, key_importance)
            finally:
                self._recording = False

        def head(name, fn):
            def run(hidden):
                if self._step % self.stride == 0:
                    for row in hidden:
                        self._add(name, {"hidden": row[None].astype(np.float32)})
                return fn(hidden)

            return run

        def dit(mode, latent, t, cap):
            dec = self.backend.config.decoders[mode]
            tables = dit_rope_tables(latent.shape[3] // dec.patch_size, latent.shape[4] // dec.patch_size,
                                     cap.shape[1], dec.axes_dims, dec.rope_theta)
            self._add(f"dit_{mode}", {"latent": latent.astype(np.float32), "t": t.astype(np.float32),
                                      "cap": cap.astype(np.float32), "img_cos": tables[0], "img_sin": tables[1],
                                      "cap_cos": tables[2], "cap_sin": tables[3]})
            return original_dit(mode, latent, t, cap)

        def tokenize_image(pixels):
            self._add("vision_tokenizer", {"pixels": pixels.astype(np.float32)})
            return original_tokenize(pixels)

        def sigvq(ids):
            self._add("sigvq", {"ids": ids.astype(np.int64)})
            return original_sigvq(ids)

        self.backend.forward_block = forward_block
        self.backend.tokenize_image = tokenize_image
        self.backend.sigvq = sigvq
        self.backend.head_text = head("head_text", original_text)
        self.backend.head_image = head("head_image", original_image)
        self.backend.dit = dit

    def _layer_hook(self, index: int) -> Callable:
        def hook(_module, args):
            if not self._recording or self._positions is None:
                return
            h, _cos, _sin, bias, past_k, past_v = args
            # the additive bias back to "may attend", [B, T, S+T] (block steps broadcast one key mask)
            mask = (bias[:, 0] == 0).expand(h.shape[0], h.shape[1], bias.shape[-1])
            for r in range(h.shape[0]):
                self._add(f"layer_{index}", {
                    "hidden": h[r:r + 1].float().numpy(), "positions": self._positions[r:r + 1].astype(np.int64),
                    "past_k": past_k[r:r + 1].float().numpy(), "past_v": past_v[r:r + 1].float().numpy(),
                    "attn_mask": mask[r:r + 1].numpy()})
        return hook

    def _gate_hook(self, index: int) -> Callable:
        def hook(_module, _args, output):
            _, idx = output
            self.coverage[index] += np.bincount(idx.reshape(-1).numpy(), minlength=self.coverage.shape[1])
        return hook

    def _add(self, name: str, sample: dict[str, np.ndarray]) -> None:
        """Reservoir sampling: every captured step of every request is equally likely to be kept."""
        bucket = self.samples[name]
        self._seen[name] += 1
        if len(bucket) < self.max_samples:
            bucket.append(sample)
        else:
            j = int(self._rng.integers(0, self._seen[name]))
            if j < self.max_samples:
                bucket[j] = sample

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    # -- output ---------------------------------------------------------------------------------

    def save(self, out_dir: Path) -> dict[str, int]:
        out_dir.mkdir(parents=True, exist_ok=True)
        counts = {}
        for name, samples in self.samples.items():
            if name.startswith("layer_"):
                samples = _pad_cache(samples)
            if name.startswith("dit_") or name in ("vision_tokenizer", "sigvq"):
                # no common batch axis (tables, image sizes, code counts): one file per sample for a data reader
                folder = out_dir / name
                folder.mkdir(exist_ok=True)
                for i, sample in enumerate(samples):
                    np.savez(folder / f"{i:04d}.npz", **sample)
            else:  # ModelOpt's calibration_data format: a dict of arrays concatenated along axis 0
                np.savez(out_dir / f"{name}.npz", **{k: np.concatenate([s[k] for s in samples]) for k in samples[0]})
            counts[name] = len(samples)
        (out_dir / "expert_coverage.json").write_text(json.dumps(self.coverage_report(), indent=2) + "\n")
        return counts

    def coverage_report(self) -> dict:
        cfg = self.backend.config.backbone
        layers = {}
        for i in range(cfg.num_hidden_layers):
            if not cfg.is_moe_layer(i):
                continue
            row = self.coverage[i]
            layers[f"layer_{i}"] = {"tokens_per_expert": row.tolist(), "min": int(row.min()), "max": int(row.max()),
                                    "experts_without_tokens": np.flatnonzero(row == 0).tolist()}
        unseen = sum(len(v["experts_without_tokens"]) for v in layers.values())
        return {"layers": layers, "experts_without_tokens": unseen,
                "fallback": "dense lowering: every expert is calibrated on all tokens (routed or not); experts "
                            "listed under experts_without_tokens saw no routed calibration token"}


def _pad_cache(samples: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
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


def calibrate(checkpoint: str | Path, out_dir: str | Path, stride: int = 2, max_samples: int = 64,
              image_size: int = 128, progress: Progress = print) -> dict[str, int]:
    """Run the calibration requests on the torch reference and save every component's inputs."""
    data = json.loads(CALIBRATION_SET.read_text())["calibration"]
    backend = TorchBackend(checkpoint)
    capture = ActivationCapture(backend, stride, max_samples)
    pipe = Pipeline(backend, _tokenizer(checkpoint))
    images = [Image.fromarray(procedural_image(image_size, image_size + 32, seed)) for seed in data["image_seeds"]]
    with torch.inference_mode():
        for i, prompt in enumerate(data["t2i"]):
            progress(f"calibrate: t2i {i + 1}/{len(data['t2i'])}")
            pipe.generate_image(prompt, image_size, image_size, steps=4, decode_mode="turbo" if i % 2 else "normal",
                                decode_steps=None if i % 2 else 6, seed=i)
        for i, question in enumerate(data["understand"]):
            progress(f"calibrate: understand {i + 1}/{len(data['understand'])}")
            pipe.understand(images[i % len(images)], question, max_new_tokens=32, steps=8)
        for i, message in enumerate(data["chat"]):
            progress(f"calibrate: chat {i + 1}/{len(data['chat'])}")
            pipe.chat([{"role": "user", "content": message}], max_new_tokens=32, steps=8)
        for i, instruction in enumerate(data["edit"]):
            progress(f"calibrate: edit {i + 1}/{len(data['edit'])}")
            pipe.edit(images[i % len(images)], instruction, steps=4, source_size=image_size,
                      cfg_image_scale=1.0 if i % 2 else 0.0)
    capture.remove()
    return capture.save(Path(out_dir))


def _tokenizer(checkpoint: str | Path):
    from llada_edge.runtime.text import TextTokenizer

    return TextTokenizer.from_file(Path(checkpoint) / "tokenizer.json")
