"""The HTTP bodies (OpenAI-style) and their translation into the runtime's typed requests.

Field names follow OpenAI's chat completions and images APIs where they exist; what LLaDA2.0-Uni adds (denoising
steps, thinking mode, the decoder) are extra fields of the same body. Unknown fields are an error, not silently
ignored: a client learns that its parameter has no effect here. Option defaults and limits are those of
:mod:`llada_edge.runtime.requests` (the CLI's), written nowhere else.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from llada_edge.errors import InputError
from llada_edge.runtime.requests import (
    ChatRequest,
    EditOptions,
    EditRequest,
    Request,
    T2IOptions,
    T2IRequest,
    TextOptions,
    UnderstandRequest,
)
from llada_edge.serve.files import read_image_url

ResponseFormat = Literal["b64_json", "path", "url"]  # "url": a file:// URL of the written file (as "path")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ImageURL(Strict):
    url: str
    detail: str | None = None  # OpenAI's resolution hint: accepted, the model has one preprocessing


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ImagePart(Strict):
    type: Literal["image_url"]
    image_url: ImageURL


class Message(Strict):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart | ImagePart]
    name: str | None = None


def _given(**values: Any) -> dict[str, Any]:
    """The options a body set (None: the runtime's default)."""
    return {k: v for k, v in values.items() if v is not None}


class ChatCompletionRequest(Strict):
    """``POST /v1/chat/completions``: text-only messages chat; a user message with one image is understanding."""

    messages: list[Message] = Field(min_length=1)
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens
    temperature: float | None = Field(None, ge=0)
    seed: int | None = None
    stream: bool = False
    n: int = Field(1, ge=1, le=1)  # one answer per request
    user: str | None = None
    # LLaDA2.0-Uni: denoising steps per 32-token block and the acceptance threshold
    steps: int | None = None
    threshold: float | None = None

    def options(self) -> TextOptions:
        return TextOptions(**_given(max_new_tokens=self.max_completion_tokens or self.max_tokens,
                                    temperature=self.temperature, seed=self.seed, steps=self.steps,
                                    threshold=self.threshold))

    def to_request(self, readable: Sequence[Path]) -> Request:
        images = [(i, part) for i, msg in enumerate(self.messages) if isinstance(msg.content, list)
                  for part in msg.content if isinstance(part, ImagePart)]
        if not images:
            return ChatRequest([{"role": m.role, "content": _text(m)} for m in self.messages], self.options())
        index, part = images[0]
        message = self.messages[index]
        if len(images) > 1 or len(self.messages) != 1 or message.role != "user":
            raise InputError("a request with an image takes one user message (the image and a question); "
                             "several images or a conversation around an image are not supported", key="messages")
        image = read_image_url(part.image_url.url, readable, f"messages[{index}].content image_url")
        question = _text(message)
        if not question.strip():
            raise InputError("the message with the image needs a text part (the question)", key="messages")
        return UnderstandRequest(image, question, self.options())


def _text(message: Message) -> str:
    if isinstance(message.content, str):
        return message.content
    return "".join(part.text for part in message.content if isinstance(part, TextPart))


def parse_size(size: str | None) -> dict[str, Any]:
    """OpenAI's ``"WIDTHxHEIGHT"``; None keeps the runtime's default size."""
    if size is None:
        return {}
    width, sep, height = size.lower().partition("x")
    if not sep or not width.isdigit() or not height.isdigit():
        raise InputError(f"size must be 'WIDTHxHEIGHT' in pixels (e.g. '1024x1024'), got {size!r}", key="size")
    if int(width) % 32 or int(height) % 32 or not int(width) or not int(height):  # said in the body's own order
        raise InputError(f"size {size!r}: width and height must be positive multiples of 32", key="size")
    return {"width": int(width), "height": int(height)}


class ImageBody(Strict):
    """What the two image endpoints share."""

    prompt: str = Field(min_length=1)
    model: str | None = None
    n: int = Field(1, ge=1, le=1)  # one answer per request
    response_format: ResponseFormat = "b64_json"
    seed: int | None = None
    user: str | None = None
    # LLaDA2.0-Uni
    steps: int | None = None
    guidance: float | None = None  # the (text) CFG scale
    decode_mode: Literal["turbo", "normal"] | None = None
    decode_steps: int | None = None


class ImageGenerationRequest(ImageBody):
    """``POST /v1/images/generations``."""

    size: str | None = None
    quality: str | None = None  # accepted for OpenAI clients; quality here is steps and decode_mode
    mode: Literal["normal", "thinking"] | None = None

    def to_request(self) -> T2IRequest:
        options = T2IOptions(**parse_size(self.size), **_given(
            seed=self.seed, steps=self.steps, cfg_scale=self.guidance, mode=self.mode,
            decode_mode=self.decode_mode, decode_steps=self.decode_steps))
        return T2IRequest(self.prompt, options)


class ImageEditForm(ImageBody):
    """``POST /v1/images/edits`` (multipart: these fields and the ``image`` file). No ``size``: the output has the
    grid of the centre-cropped source (``source_size``), decoded at twice its pixels."""

    source_size: int | None = None
    image_guidance: float | None = None  # 0: two CFG rows

    def to_request(self, image: Any) -> EditRequest:
        options = EditOptions(**_given(seed=self.seed, steps=self.steps, cfg_text_scale=self.guidance,
                                       source_size=self.source_size,
                                       cfg_image_scale=self.image_guidance, decode_mode=self.decode_mode,
                                       decode_steps=self.decode_steps))
        return EditRequest(image, self.prompt, options)
