"""``Pipeline``: understanding, chat, text-to-image (with thinking mode), editing and decoding.

A thin orchestration layer: preprocessing and prompts (numpy/Pillow/tokenizers), the block-diffusion
sampler and the ODE decoder, all on one :class:`~llada_edge.runtime.backend.Backend`. Every result
carries its tokens, per-stage timings and the number of backbone forward passes.

    pipe = Pipeline.load("LLaDA2.0-Uni", backend="torch")
    pipe.generate_image("a red bicycle", 1024, 1024).image.save("bike.png")
"""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from llada_edge.errors import InputError
from llada_edge.runtime import prompts
from llada_edge.runtime.backend import Backend, create_backend, is_build_folder
from llada_edge.runtime.decode import DECODE_MODES, decode_tokens
from llada_edge.runtime.images import check_size, edit_source_image, load_image, smart_resize, to_pil, to_pixels
from llada_edge.runtime.sampler import BlockDiffusionSampler, GenerationResult, SamplingConfig, SprintConfig, left_pad
from llada_edge.runtime.text import TextTokenizer

Progress = Callable[[str, int, int], None]  # (stage, done, total)

T2I_MODES = ("normal", "thinking")


def stderr_progress(stage: str, done: int, total: int) -> None:
    """Progress on stderr (what the CLI uses): one updating line on a terminal, the final count otherwise."""
    if sys.stderr.isatty():
        print(f"\r{stage}: {done}/{total}", end="\n" if done >= total else "", file=sys.stderr, flush=True)
    elif done >= total:
        print(f"{stage}: {done}/{total}", file=sys.stderr, flush=True)


@dataclass
class TextResult:
    text: str
    tokens: list[int]
    timings: dict[str, float]
    forward_passes: int
    steps: int
    stop_token: int | None

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "tokens": self.tokens, "timings": self.timings,
                "forward_passes": self.forward_passes, "steps": self.steps, "stop_token": self.stop_token}


@dataclass
class ImageResult:
    image: Image.Image
    vq_tokens: list[int]  # un-offset VQ codes, raster over the grid
    grid: tuple[int, int]
    timings: dict[str, float]
    forward_passes: int
    steps: int
    thinking: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def save(self, path: str | Path) -> Path:
        """Write a PNG atomically (temporary name, then rename)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.partial")
        self.image.save(tmp, format="PNG")
        tmp.replace(path)
        return path

    def to_dict(self) -> dict[str, Any]:
        return {"tokens": self.vq_tokens, "grid": list(self.grid), "size": list(self.image.size),
                "timings": self.timings, "forward_passes": self.forward_passes, "steps": self.steps,
                "thinking": self.thinking, **self.extra}


class Pipeline:
    def __init__(self, backend: Backend, tokenizer: TextTokenizer, progress: Progress | None = None) -> None:
        self.backend = backend
        self.tokenizer = tokenizer
        self.progress = progress
        self.config = backend.config

    @classmethod
    def load(cls, path: str | Path, backend: str = "auto", progress: Progress | None = None,
             **backend_options: Any) -> Pipeline:
        """Open a checkpoint folder (torch) or a build folder (onnxruntime); ``auto`` picks by folder."""
        path = Path(path)
        if not path.is_dir():
            raise InputError(f"{path}: not a directory (expected a checkpoint or build folder)")
        engine = create_backend(backend, path, **backend_options)
        model_dir = path / "model" if is_build_folder(path) else path
        return cls(engine, TextTokenizer.from_file(model_dir / "tokenizer.json"), progress)

    # -- helpers --------------------------------------------------------------------------------

    def _sampler(self, head: str, sampling: SamplingConfig, sprint: SprintConfig | None,
                 stage: str) -> BlockDiffusionSampler:
        report = (lambda d, t: self.progress(stage, d, t)) if self.progress else None
        return BlockDiffusionSampler(self.backend, head, sampling, sprint, report)

    def _encode_image(self, image: Any, edit_size: int | None = None) -> tuple[np.ndarray, int, int, float]:
        """Preprocess (smart_resize, or var_center_crop at ``edit_size`` for editing) and tokenize:
        ids, gh, gw, seconds."""
        img = load_image(image)
        img = edit_source_image(img, edit_size) if edit_size else smart_resize(img)
        pre = self.config.preprocessor
        pixels = to_pixels(img, pre.image_mean, pre.image_std)
        t0 = time.perf_counter()
        ids = self.backend.tokenize_image(pixels)
        gh, gw = pixels.shape[2] // pre.patch_size, pixels.shape[3] // pre.patch_size
        return ids, gh, gw, time.perf_counter() - t0

    def _text(self, prompt_ids: list[int], sampling: SamplingConfig, sprint: SprintConfig | None,
              max_new_tokens: int, stop_ids: Sequence[int], stage: str) -> GenerationResult:
        rows = left_pad([prompt_ids], self.config.backbone.mask_token_id)
        return self._sampler("text", sampling, sprint, stage).generate(rows, max_new_tokens, stop_ids=stop_ids)

    def _text_result(self, gen: GenerationResult, timings: dict[str, float]) -> TextResult:
        return TextResult(self.tokenizer.decode(gen.tokens.tolist()), gen.tokens.tolist(), timings,
                          gen.forward_passes, gen.steps, gen.stop_token)

    # -- text out -------------------------------------------------------------------------------

    def understand(self, image: Any, question: str, *, max_new_tokens: int = 512, steps: int = 32,
                   threshold: float = 0.95, temperature: float = 0.0, seed: int = 0,
                   sprint: SprintConfig | None = None) -> TextResult:
        """Answer a question about an image (smart_resize to 128²..800² pixels, tokenizer, text loop)."""
        start = time.perf_counter()
        ids, gh, gw, t_tok = self._encode_image(image)
        prompt = prompts.understanding_prompt(self.tokenizer, ids.tolist(), gh, gw, question,
                                              self.config.backbone.image_token_offset)
        t0 = time.perf_counter()
        gen = self._text(prompt, SamplingConfig(steps, threshold, temperature, seed), sprint, max_new_tokens,
                         [self.tokenizer.eos_id], "understand")
        timings = {"tokenizer": t_tok, "backbone": time.perf_counter() - t0, "total": time.perf_counter() - start}
        return self._text_result(gen, timings)

    def chat(self, messages: Sequence[dict[str, str]], *, max_new_tokens: int = 512, steps: int = 32,
             threshold: float = 0.95, temperature: float = 0.0, seed: int = 0,
             sprint: SprintConfig | None = None) -> TextResult:
        """Reply to a conversation ([{"role": "user"|"assistant"|"system", "content": ...}, ...])."""
        start = time.perf_counter()
        prompt = prompts.chat_prompt(self.tokenizer, messages)
        gen = self._text(prompt, SamplingConfig(steps, threshold, temperature, seed), sprint, max_new_tokens,
                         [self.tokenizer.eos_id], "chat")
        elapsed = time.perf_counter() - start
        return self._text_result(gen, {"backbone": elapsed, "total": elapsed})

    # -- images out -----------------------------------------------------------------------------

    def _image_tokens(self, rows_prompts: list[list[int]], row_weights: list[float], n_tokens: int,
                      sampling: SamplingConfig, sprint: SprintConfig | None, stage: str) -> GenerationResult:
        rows = left_pad(rows_prompts, self.config.backbone.mask_token_id)
        return self._sampler("image", sampling, sprint, stage).generate(rows, n_tokens, row_weights)

    def _finish_image(self, gen: GenerationResult, gh: int, gw: int, decode_mode: str, decode_steps: int | None,
                      seed: int, timings: dict[str, float], start: float, passes: int, steps: int,
                      thinking: str | None = None) -> ImageResult:
        report = (lambda d, t: self.progress(f"decode ({decode_mode})", d, t)) if self.progress else None
        dec = decode_tokens(self.backend, gen.tokens, gh, gw, decode_mode, decode_steps, seed, progress=report)
        timings.update(dec.timings)
        timings["total"] = time.perf_counter() - start
        return ImageResult(to_pil(dec.image), gen.tokens.tolist(), (gh, gw), timings, passes, steps, thinking,
                           {"dit_evaluations": dec.dit_evaluations, "pruned_fraction": gen.pruned_fraction})

    def generate_image(self, prompt: str, height: int = 1024, width: int = 1024, *, steps: int = 8,
                       cfg_scale: float = 2.0, mode: str = "normal", decode_mode: str = "turbo",
                       decode_steps: int | None = None, threshold: float = 0.95, temperature: float = 0.0,
                       seed: int = 0, sprint: SprintConfig | None = None, cfg_rescale: float | None = None,
                       thinking_max_tokens: int = 512) -> ImageResult:
        """Text-to-image: (thinking) -> image tokens with two-row CFG -> decoder -> PIL image.

        The token grid is (height/32) x (width/32); the decoder renders it at height x width.
        """
        check_size(height, width)
        if mode not in T2I_MODES:
            raise InputError(f"unknown t2i mode {mode!r} (expected one of {list(T2I_MODES)})")
        if decode_mode not in DECODE_MODES:
            raise InputError(f"unknown decode mode {decode_mode!r} (expected one of {sorted(DECODE_MODES)})")
        start = time.perf_counter()
        gh, gw = height // 32, width // 32
        tok = self.tokenizer
        timings: dict[str, float] = {}
        passes, thinking = 0, None
        sampling = SamplingConfig(steps, threshold, temperature, seed, cfg_rescale=cfg_rescale)
        if mode == "thinking":
            t0 = time.perf_counter()
            phase1 = prompts.thinking_prompt(tok, prompt)
            gen = self._text(phase1, SamplingConfig(32, threshold, temperature, seed), None, thinking_max_tokens,
                             [tok.eos_id, tok.image_start_id, tok.boi_id], "thinking")
            timings["thinking"] = time.perf_counter() - t0
            passes += gen.forward_passes
            thinking = tok.decode(gen.tokens.tolist())
            # [I] The model writes its own image header after the reasoning; we cut there and append the
            # header of the requested size so the grid is always the one asked for.
            cond = phase1 + gen.tokens.tolist() + prompts.image_header(tok, gh, gw)
            uncond = prompts.thinking_unconditional_prompt(tok, gh, gw)
        else:
            cond = prompts.t2i_prompt(tok, prompt, gh, gw)
            uncond = prompts.t2i_unconditional_prompt(tok, gh, gw)
        rows, weights = ([cond], [1.0]) if cfg_scale == 1.0 else ([cond, uncond], [cfg_scale, 1.0 - cfg_scale])
        t0 = time.perf_counter()
        gen = self._image_tokens(rows, weights, gh * gw, sampling, sprint, "t2i")
        timings["backbone"] = time.perf_counter() - t0
        passes += gen.forward_passes
        return self._finish_image(gen, gh, gw, decode_mode, decode_steps, seed, timings, start, passes, gen.steps,
                                  thinking)

    def edit(self, image: Any, instruction: str, *, cfg_text_scale: float = 4.0, cfg_image_scale: float = 0.0,
             steps: int = 8, decode_mode: str = "turbo", decode_steps: int | None = None, threshold: float = 0.95,
             temperature: float = 0.0, seed: int = 0, sprint: SprintConfig | None = None,
             cfg_rescale: float | None = None, source_size: int = 512) -> ImageResult:
        """Edit an image: three-way CFG (full / no-text / no-image); the output grid is the source grid.

        The source is centre-cropped to the best-matching aspect within (source_size/32)² patches of
        32 px (512 upstream: a 512² crop is a 32x32 grid, decoded at 1024²).

        With ``cfg_image_scale`` 0 the no-image row drops out (two rows). SPRINT is not used with
        editing CFG: like upstream, a ``sprint`` config falls back to the baseline loop (with a warning).
        """
        if decode_mode not in DECODE_MODES:
            raise InputError(f"unknown decode mode {decode_mode!r} (expected one of {sorted(DECODE_MODES)})")
        if sprint is not None:
            warnings.warn("SPRINT is not supported with editing CFG; running the baseline loop", stacklevel=2)
        start = time.perf_counter()
        ids, gh, gw, t_tok = self._encode_image(image, source_size)
        branches = prompts.edit_prompts(self.tokenizer, ids.tolist(), gh, gw, instruction,
                                        self.config.backbone.image_token_offset)
        st, si = cfg_text_scale, cfg_image_scale
        if si == 0.0:
            rows, weights = [branches.full, branches.no_text], [st, 1.0 - st]
        else:
            rows, weights = [branches.full, branches.no_text, branches.no_image], [st, 1.0 - st + si, -si]
        sampling = SamplingConfig(steps, threshold, temperature, seed, cfg_rescale=cfg_rescale)
        t0 = time.perf_counter()
        gen = self._image_tokens(rows, weights, gh * gw, sampling, None, "edit")
        timings = {"tokenizer": t_tok, "backbone": time.perf_counter() - t0}
        result = self._finish_image(gen, gh, gw, decode_mode, decode_steps, seed, timings, start,
                                    gen.forward_passes, gen.steps)
        result.extra["source_tokens"] = ids.tolist()
        return result

    def decode(self, tokens: Sequence[int], height: int, width: int, mode: str = "turbo",
               steps: int | None = None, seed: int = 0) -> ImageResult:
        """Render un-offset VQ ids on a (height/32) x (width/32) grid into a height x width image."""
        check_size(height, width)
        gh, gw = height // 32, width // 32
        start = time.perf_counter()
        report = (lambda d, t: self.progress(f"decode ({mode})", d, t)) if self.progress else None
        dec = decode_tokens(self.backend, np.asarray(tokens), gh, gw, mode, steps, seed, progress=report)
        dec.timings["total"] = time.perf_counter() - start
        return ImageResult(to_pil(dec.image), list(map(int, tokens)), (gh, gw), dec.timings, 0, 0,
                           extra={"dit_evaluations": dec.dit_evaluations})
