"""``Pipeline``: understanding, chat, text-to-image (with thinking mode), editing and decoding.

A thin orchestration layer: preprocessing and prompts (numpy/Pillow/tokenizers), the block-diffusion
sampler and the ODE decoder, all on one :class:`~llada_edge.runtime.backend.Backend`. Every result
carries its tokens, per-stage timings and the number of backbone forward passes. Run options and their
defaults are the typed options of :mod:`llada_edge.runtime.requests`; each method takes an options
object, keyword overrides of its fields, or both.

    pipe = Pipeline.load("LLaDA2.0-Uni", backend="torch")
    pipe.generate_image("a red bicycle", 1024, 1024).image.save("bike.png")
    pipe.understand("bike.png", "What is leaning on the wall?", max_new_tokens=64)
"""

from __future__ import annotations

import functools
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

import numpy as np
from PIL import Image

from llada_edge.buildfolder import is_build_folder
from llada_edge.errors import InputError
from llada_edge.runtime import prompts
from llada_edge.runtime.backend import Backend
from llada_edge.runtime.backends import BackendOptions, create_backend
from llada_edge.runtime.decode import decode_tokens
from llada_edge.runtime.images import (
    check_size,
    edit_source_image,
    load_image,
    save_image,
    smart_resize,
    to_pil,
    to_pixels,
)
from llada_edge.runtime.requests import (
    ChatRequest,
    EditOptions,
    ImageOptions,
    Request,
    T2IOptions,
    T2IRequest,
    TextOptions,
    UnderstandRequest,
    resolve_options,
)
from llada_edge.runtime.sampler import BlockDiffusionSampler, GenerationResult, SamplingConfig, SprintConfig, left_pad
from llada_edge.runtime.text import TextTokenizer

Progress = Callable[[str, int, int], None]  # (stage, done, total)
F = TypeVar("F", bound=Callable[..., Any])


TOKENIZER = "vision_tokenizer"  # the graphs a task needs beyond the backbone, by registry name


def decoder_graphs(mode: str) -> list[str]:
    """What decoding in ``mode`` ("turbo" or "normal") runs: SigVQ, that DiT, the VAE."""
    return ["sigvq", f"dit_{mode}", "vae_decoder"]


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
    step_seconds: list[float] = field(default_factory=list)  # wall time of each denoising step
    prompt_tokens: int = 0  # the prompt's length in tokens (image tokens included)

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "tokens": self.tokens, "timings": self.timings,
                "forward_passes": self.forward_passes, "steps": self.steps, "stop_token": self.stop_token,
                "step_seconds": self.step_seconds, "prompt_tokens": self.prompt_tokens}


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
        """Write atomically, in the format of the suffix (.png, .jpg, ...)."""
        return save_image(self.image, path)

    def to_dict(self) -> dict[str, Any]:
        return {"tokens": self.vq_tokens, "grid": list(self.grid), "size": list(self.image.size),
                "timings": self.timings, "forward_passes": self.forward_passes, "steps": self.steps,
                "thinking": self.thinking, **self.extra}


def _one_at_a_time(method: F) -> F:
    """A request holds the pipeline's lock: a backend has one KV cache and one set of step buffers."""

    @functools.wraps(method)
    def locked(self: Pipeline, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return method(self, *args, **kwargs)

    return cast(F, locked)


class Pipeline:
    """Runs requests on one backend. Thread-safe: concurrent calls from several threads run one after the other
    (each request owns the backend's KV cache while it runs), so every result equals that of a lone run."""

    def __init__(self, backend: Backend, tokenizer: TextTokenizer, progress: Progress | None = None) -> None:
        self.backend = backend
        self.tokenizer = tokenizer
        self.progress = progress
        self.config = backend.config
        self._lock = threading.RLock()

    @classmethod
    def load(cls, path: str | Path, backend: str = "auto", progress: Progress | None = None,
             options: BackendOptions | None = None, **backend_options: Any) -> Pipeline:
        """Open a checkpoint folder (torch) or a build folder (onnxruntime); ``auto`` picks by folder.

        ``options`` carries the user's precision / device / dtype (each backend takes what applies to it);
        ``backend_options`` are keywords of the backend class itself.
        """
        path = Path(path)
        if not path.is_dir():
            raise InputError(f"{path}: not a directory (expected a checkpoint or build folder)")
        engine = create_backend(backend, path, options, **backend_options)
        model_dir = path / "model" if is_build_folder(path) else path
        return cls(engine, TextTokenizer.from_file(model_dir / "tokenizer.json"), progress)

    @_one_at_a_time
    def run(self, request: Request) -> TextResult | ImageResult:
        """Run one typed request (what the CLI does)."""
        if isinstance(request, UnderstandRequest):
            return self.understand(request.image, request.question, request.options)
        if isinstance(request, ChatRequest):
            return self.chat(request.messages, request.options)
        if isinstance(request, T2IRequest):
            return self.generate_image(request.prompt, options=request.options)
        return self.edit(request.image, request.instruction, request.options)

    # -- helpers --------------------------------------------------------------------------------

    def _report(self, stage: str) -> Callable[[int, int], None] | None:
        progress = self.progress
        return (lambda done, total: progress(stage, done, total)) if progress is not None else None

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

    def _generate(self, head: str, prompts_rows: list[list[int]], n_tokens: int, sampling: SamplingConfig,
                  sprint: SprintConfig | None, stage: str, row_weights: Sequence[float] = (1.0,),
                  stop_ids: Sequence[int] = ()) -> GenerationResult:
        rows = left_pad(prompts_rows, self.config.backbone.mask_token_id)
        sampler = BlockDiffusionSampler(self.backend, head, sampling, sprint, self._report(stage))
        return sampler.generate(rows, n_tokens, row_weights, stop_ids)

    def _text_result(self, gen: GenerationResult, timings: dict[str, float], prompt: list[int]) -> TextResult:
        return TextResult(self.tokenizer.decode(gen.tokens.tolist()), gen.tokens.tolist(), timings,
                          gen.forward_passes, gen.steps, gen.stop_token, gen.step_seconds, len(prompt))

    # -- text out -------------------------------------------------------------------------------

    @_one_at_a_time
    def understand(self, image: Any, question: str, options: TextOptions | None = None,
                   **overrides: Any) -> TextResult:
        """Answer a question about an image (smart_resize to 128²..800² pixels, tokenizer, text loop)."""
        opts = resolve_options(TextOptions, options, overrides)
        self.backend.require([TOKENIZER], "understanding")
        start = time.perf_counter()
        ids, gh, gw, t_tok = self._encode_image(image)
        prompt = prompts.understanding_prompt(self.tokenizer, ids.tolist(), gh, gw, question,
                                              self.config.backbone.image_token_offset)
        t0 = time.perf_counter()
        gen = self._generate("text", [prompt], opts.max_new_tokens, opts, opts.sprint, "understand",
                             stop_ids=[self.tokenizer.eos_id])
        timings = {"tokenizer": t_tok, "backbone": time.perf_counter() - t0, "total": time.perf_counter() - start}
        return self._text_result(gen, timings, prompt)

    @_one_at_a_time
    def chat(self, messages: Sequence[dict[str, str]], options: TextOptions | None = None,
             **overrides: Any) -> TextResult:
        """Reply to a conversation ([{"role": "user"|"assistant"|"system", "content": ...}, ...])."""
        opts = resolve_options(TextOptions, options, overrides)
        start = time.perf_counter()
        prompt = prompts.chat_prompt(self.tokenizer, messages)
        gen = self._generate("text", [prompt], opts.max_new_tokens, opts, opts.sprint, "chat",
                             stop_ids=[self.tokenizer.eos_id])
        elapsed = time.perf_counter() - start
        return self._text_result(gen, {"backbone": elapsed, "total": elapsed}, prompt)

    # -- images out -----------------------------------------------------------------------------

    def _finish_image(self, gen: GenerationResult, grid: tuple[int, int], options: ImageOptions,
                      timings: dict[str, float], started: float, thinking: GenerationResult | None = None
                      ) -> ImageResult:
        """Decode the generated grid and assemble the result (forward passes include a thinking phase)."""
        mode = options.decode_mode
        dec = decode_tokens(self.backend, gen.tokens, *grid, mode, options.decode_steps, options.seed,
                            progress=self._report(f"decode ({mode})"))
        timings.update(dec.timings)
        timings["total"] = time.perf_counter() - started
        passes = gen.forward_passes + (thinking.forward_passes if thinking is not None else 0)
        text = self.tokenizer.decode(thinking.tokens.tolist()) if thinking is not None else None
        return ImageResult(to_pil(dec.image), gen.tokens.tolist(), grid, timings, passes, gen.steps, text,
                           {"dit_evaluations": dec.dit_evaluations, "pruned_fraction": gen.pruned_fraction,
                            "step_seconds": gen.step_seconds})

    @_one_at_a_time
    def generate_image(self, prompt: str, height: int | None = None, width: int | None = None,
                       options: T2IOptions | None = None, **overrides: Any) -> ImageResult:
        """Text-to-image: (thinking) -> image tokens with two-row CFG -> decoder -> PIL image.

        The token grid is (height/32) x (width/32); the decoder renders it at height x width (default
        :class:`~llada_edge.runtime.requests.T2IOptions`: 1024 x 1024).
        """
        size = {k: v for k, v in (("height", height), ("width", width)) if v is not None}
        opts = resolve_options(T2IOptions, options, {**size, **overrides})
        self.backend.require(decoder_graphs(opts.decode_mode), "text-to-image")
        start = time.perf_counter()
        gh, gw = opts.height // 32, opts.width // 32
        tok = self.tokenizer
        timings: dict[str, float] = {}
        thinking = None
        if opts.mode == "thinking":
            t0 = time.perf_counter()
            phase1 = prompts.thinking_prompt(tok, prompt)
            text_sampling = SamplingConfig(TextOptions().steps, opts.threshold, opts.temperature, opts.seed)
            thinking = self._generate("text", [phase1], opts.thinking_max_tokens, text_sampling, None, "thinking",
                                      stop_ids=[tok.eos_id, tok.image_start_id, tok.boi_id])
            timings["thinking"] = time.perf_counter() - t0
            # [I] The model writes its own image header after the reasoning; we cut there and append the
            # header of the requested size so the grid is always the one asked for.
            cond = phase1 + thinking.tokens.tolist() + prompts.image_header(tok, gh, gw)
            uncond = prompts.thinking_unconditional_prompt(tok, gh, gw)
        else:
            cond = prompts.t2i_prompt(tok, prompt, gh, gw)
            uncond = prompts.t2i_unconditional_prompt(tok, gh, gw)
        s = opts.cfg_scale
        rows, weights = ([cond], [1.0]) if s == 1.0 else ([cond, uncond], [s, 1.0 - s])
        t0 = time.perf_counter()
        gen = self._generate("image", rows, gh * gw, opts, opts.sprint, "t2i", weights)
        timings["backbone"] = time.perf_counter() - t0
        return self._finish_image(gen, (gh, gw), opts, timings, start, thinking)

    @_one_at_a_time
    def edit(self, image: Any, instruction: str, options: EditOptions | None = None,
             **overrides: Any) -> ImageResult:
        """Edit an image with three-way CFG; the output grid is the source grid (see
        :class:`~llada_edge.runtime.requests.EditOptions`)."""
        opts = resolve_options(EditOptions, options, overrides)
        self.backend.require([TOKENIZER, *decoder_graphs(opts.decode_mode)], "editing")
        if opts.sprint is not None:
            warnings.warn("SPRINT is not supported with editing CFG; running the baseline loop", stacklevel=2)
        start = time.perf_counter()
        ids, gh, gw, t_tok = self._encode_image(image, opts.source_size)
        branches = prompts.edit_prompts(self.tokenizer, ids.tolist(), gh, gw, instruction,
                                        self.config.backbone.image_token_offset)
        st, si = opts.cfg_text_scale, opts.cfg_image_scale
        if si == 0.0:
            rows, weights = [branches.full, branches.no_text], [st, 1.0 - st]
        else:
            rows, weights = [branches.full, branches.no_text, branches.no_image], [st, 1.0 - st + si, -si]
        t0 = time.perf_counter()
        gen = self._generate("image", rows, gh * gw, opts, None, "edit", weights)
        timings = {"tokenizer": t_tok, "backbone": time.perf_counter() - t0}
        result = self._finish_image(gen, (gh, gw), opts, timings, start)
        result.extra["source_tokens"] = ids.tolist()
        return result

    @_one_at_a_time
    def decode(self, tokens: Sequence[int], height: int, width: int, mode: str = "turbo",
               steps: int | None = None, seed: int = 0) -> ImageResult:
        """Render un-offset VQ ids on a (height/32) x (width/32) grid into a height x width image."""
        check_size(height, width)
        self.backend.require(decoder_graphs(mode), "decoding")
        gh, gw = height // 32, width // 32
        start = time.perf_counter()
        dec = decode_tokens(self.backend, np.asarray(tokens), gh, gw, mode, steps, seed,
                            progress=self._report(f"decode ({mode})"))
        dec.timings["total"] = time.perf_counter() - start
        return ImageResult(to_pil(dec.image), list(map(int, tokens)), (gh, gw), dec.timings, 0, 0,
                           extra={"dit_evaluations": dec.dit_evaluations})
