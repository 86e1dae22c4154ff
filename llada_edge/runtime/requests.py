"""Typed requests: each run option with its default written once.

The option classes extend :class:`~llada_edge.runtime.sampler.SamplingConfig` (steps, threshold,
temperature, seed, CFG rescale: the sampler reads them directly) with what each task adds. The
:class:`~llada_edge.runtime.pipeline.Pipeline` methods take them (or keyword overrides of them), and the
CLI's flags map onto their fields, so a default lives here and nowhere else.

    Pipeline.run(T2IRequest("a lighthouse", T2IOptions(height=512, width=512, cfg_scale=3.0)))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, TypeVar

from llada_edge.errors import InputError
from llada_edge.runtime.decode import DECODE_MODES, MAX_DECODE_STEPS
from llada_edge.runtime.images import check_size
from llada_edge.runtime.sampler import SamplingConfig, SprintConfig, check_integer, check_range

T2I_MODES = ("normal", "thinking")
MAX_GUIDANCE = 100.0  # |CFG scale|: upstream uses 1..5; beyond this the logits are noise
Options = TypeVar("Options", bound=SamplingConfig)


@dataclass(frozen=True)
class TextOptions(SamplingConfig):
    """Understanding and chat: text generated in blocks, 32 steps per block by default."""

    steps: int = 32
    max_new_tokens: int = 512
    sprint: SprintConfig | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_integer("max_new_tokens", self.max_new_tokens, 1)


@dataclass(frozen=True)
class ImageOptions(SamplingConfig):
    """What every image-producing task shares: the image-token loop (8 steps per block) and the decoder."""

    decode_mode: str = "turbo"  # the 8-step distilled decoder, or "normal" (50 steps with CFG)
    decode_steps: int | None = None  # None: the mode's default (turbo 8, normal 50)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.decode_mode not in DECODE_MODES:
            raise InputError(f"unknown decode mode {self.decode_mode!r} (expected one of {sorted(DECODE_MODES)})")
        if self.decode_steps is not None:
            check_integer("decode_steps", self.decode_steps, 1, MAX_DECODE_STEPS)


@dataclass(frozen=True)
class T2IOptions(ImageOptions):
    """Text-to-image: two-row CFG (scale 1 runs one row), optionally after a thinking phase."""

    height: int = 1024  # pixels, a multiple of 32: the token grid is (height/32) x (width/32)
    width: int = 1024
    cfg_scale: float = 2.0
    mode: str = "normal"  # or "thinking": the model first writes its reasoning, then the image
    thinking_max_tokens: int = 512
    sprint: SprintConfig | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_size(self.height, self.width)
        if self.mode not in T2I_MODES:
            raise InputError(f"unknown t2i mode {self.mode!r} (expected one of {list(T2I_MODES)})")
        check_range("cfg_scale", self.cfg_scale, -MAX_GUIDANCE, MAX_GUIDANCE)
        check_integer("thinking_max_tokens", self.thinking_max_tokens, 1)


@dataclass(frozen=True)
class EditOptions(ImageOptions):
    """Editing: three-way CFG (full / no-text / no-image); with ``cfg_image_scale`` 0 the no-image row drops out.

    The source is centre-cropped to the best-matching aspect within (source_size/32)² patches of 32 px
    (512 upstream: a 512² crop is a 32x32 grid, decoded at 1024²). SPRINT is not used with editing CFG: like
    upstream, a ``sprint`` config falls back to the baseline loop (with a warning).
    """

    cfg_text_scale: float = 4.0
    cfg_image_scale: float = 0.0
    source_size: int = 512
    sprint: SprintConfig | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("cfg_text_scale", self.cfg_text_scale, -MAX_GUIDANCE, MAX_GUIDANCE)
        check_range("cfg_image_scale", self.cfg_image_scale, -MAX_GUIDANCE, MAX_GUIDANCE)
        check_size(self.source_size, self.source_size)


def resolve_options(kind: type[Options], given: Options | None, overrides: dict[str, Any]) -> Options:
    """``given`` (or the defaults of ``kind``) with keyword ``overrides`` applied; unknown names are an error."""
    unknown = set(overrides) - {f.name for f in fields(kind)}
    if unknown:
        raise TypeError(f"unknown {kind.__name__} field(s): {', '.join(sorted(unknown))}")
    return replace(given if given is not None else kind(), **overrides)


@dataclass(frozen=True)
class UnderstandRequest:
    image: Any  # a path, PIL image or uint8 array
    question: str
    options: TextOptions = field(default_factory=TextOptions)


@dataclass(frozen=True)
class ChatRequest:
    messages: Sequence[dict[str, str]]  # [{"role": "user"|"assistant"|"system", "content": ...}, ...]
    options: TextOptions = field(default_factory=TextOptions)


@dataclass(frozen=True)
class T2IRequest:
    prompt: str
    options: T2IOptions = field(default_factory=T2IOptions)


@dataclass(frozen=True)
class EditRequest:
    image: Any
    instruction: str
    options: EditOptions = field(default_factory=EditOptions)


Request = UnderstandRequest | ChatRequest | T2IRequest | EditRequest
