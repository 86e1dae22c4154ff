"""Prompt builders: the token ids the backbone sees for each task.

Sources (model-spec §3 unless said otherwise; spaces matter and are copied from the spec):

* text-to-image, conditional and unconditional: §3 "t2i" (verified in two upstream ports);
* thinking text-to-image: the phase-2 CFG unconditional is the exact §3 string (no spaces around
  the role markers). The phase-1 prompt is **partly inferred**: §3 gives only its system sentence,
  so it is written with the spacing of the plain t2i prompt;
* understanding: §3 "Understanding", image block inside the HUMAN turn before the question (§4.2);
* editing: §3 "Editing" and §4.4 (three branches, each followed by the output image header);
* chat: **inferred**, model-spec gives no chat template (see :func:`chat_prompt`).

The image block is ``<|image|><|reserved_token_{h}|><|reserved_token_{w}|><boi>`` + the VQ codes
shifted by ``image_token_offset`` + ``<|/image|>`` (§3, §4.6). Template text is encoded one segment
at a time around the image ids; user text is part of its segment exactly as upstream concatenates
strings, so special-token strings typed by a user are not escaped (same as upstream).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from numbers import Integral

from llada_edge.errors import InputError
from llada_edge.runtime.text import IMAGE_START_TOKEN, UNCONDITION_TOKEN, TextTokenizer

SYSTEM = "<role>SYSTEM</role>"
HUMAN = "<role>HUMAN</role>"
ASSISTANT = "<role>ASSISTANT</role>"

T2I_SYSTEM = "You are a text-to-image generation assistant."
T2I_THINKING_SYSTEM = "You are a text-to-image generation assistant with a thinking process."
UNDERSTANDING_SYSTEM = "You are a multimodal understanding assistant."
EDIT_SYSTEM = "You are an image editing assistant."

CHAT_ROLES = ("system", "user", "assistant")


def _system_turn(sentence: str) -> str:
    """``<role>SYSTEM</role> {sentence} <role>HUMAN</role>``: the spaced form of every §3 template."""
    return f"{SYSTEM} {sentence} {HUMAN}"


def _require_text(text: str, what: str) -> None:
    """Refuse empty user text (the model would see a prompt the templates never contain) and text that is not
    Unicode (undecodable bytes from a command line arrive as lone surrogates, which no tokenizer accepts)."""
    if not isinstance(text, str) or not text.strip():
        raise InputError(f"empty prompt: the {what} is empty")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(f"the {what} is not valid UTF-8 text (it holds undecodable bytes)") from None


# ----------------------------------------------------------------------------------------------
# Image block
# ----------------------------------------------------------------------------------------------


def image_header(tok: TextTokenizer, gh: int, gw: int) -> list[int]:
    """``<|image|><|reserved_token_{gh}|><|reserved_token_{gw}|><boi>``: opens an image of gh x gw codes."""
    for name, n in (("gh", gh), ("gw", gw)):
        if isinstance(n, bool) or not isinstance(n, (int, Integral)) or n < 1:
            raise InputError(f"image grid {name} must be a positive integer, got {n!r}")
    return [tok.image_start_id, tok.reserved_token_id(int(gh)), tok.reserved_token_id(int(gw)), tok.boi_id]


def image_block(tok: TextTokenizer, vq_ids: Sequence[int], gh: int, gw: int, image_token_offset: int) -> list[int]:
    """A whole image in the sequence: header, the h*w codes in raster order + offset, ``<|/image|>``."""
    codes = [int(q) for q in vq_ids]
    if len(codes) != gh * gw:
        raise ValueError(f"image block: got {len(codes)} VQ ids for a {gh}x{gw} grid (expected {gh * gw})")
    if any(q < 0 for q in codes):
        raise ValueError("image block: VQ ids must be non-negative codebook indices (before the offset)")
    return [*image_header(tok, gh, gw), *(q + image_token_offset for q in codes), tok.image_end_id]


# ----------------------------------------------------------------------------------------------
# Text-to-image
# ----------------------------------------------------------------------------------------------


def _t2i(tok: TextTokenizer, user_text: str, gh: int, gw: int) -> list[int]:
    return tok.encode(f"{_system_turn(T2I_SYSTEM)}{user_text}{ASSISTANT}") + image_header(tok, gh, gw)


def t2i_prompt(tok: TextTokenizer, prompt: str, gh: int, gw: int) -> list[int]:
    """Conditional text-to-image prompt, ending with ``<boi>`` so the model fills gh*gw codes (§3)."""
    _require_text(prompt, "prompt")
    return _t2i(tok, prompt, gh, gw)


def t2i_unconditional_prompt(tok: TextTokenizer, gh: int, gw: int) -> list[int]:
    """The CFG unconditional row: the same template with the prompt replaced by ``<uncondition>`` (§3)."""
    return _t2i(tok, UNCONDITION_TOKEN, gh, gw)


def thinking_prompt(tok: TextTokenizer, prompt: str) -> list[int]:
    """Phase 1 of thinking t2i: no image header, the model writes its reasoning and the header itself.

    Inferred spacing: §3 gives only the system sentence; it is laid out like the plain t2i prompt.
    """
    _require_text(prompt, "prompt")
    return tok.encode(f"{_system_turn(T2I_THINKING_SYSTEM)}{prompt}{ASSISTANT}")


def thinking_unconditional_prompt(tok: TextTokenizer, gh: int, gw: int) -> list[int]:
    """Phase-2 CFG unconditional of thinking t2i: the exact §3 string, with no spaces around the roles."""
    text = f"{SYSTEM}{T2I_THINKING_SYSTEM}{HUMAN}{UNCONDITION_TOKEN}{ASSISTANT}"
    return tok.encode(text) + image_header(tok, gh, gw)


# ----------------------------------------------------------------------------------------------
# Understanding and editing
# ----------------------------------------------------------------------------------------------


def understanding_prompt(tok: TextTokenizer, vq_ids: Sequence[int], gh: int, gw: int, question: str,
                         image_token_offset: int) -> list[int]:
    """Image question answering: the image block sits in the HUMAN turn before the question (§3, §4.2)."""
    _require_text(question, "question")
    return (tok.encode(_system_turn(UNDERSTANDING_SYSTEM))
            + image_block(tok, vq_ids, gh, gw, image_token_offset)
            + tok.encode(f"{question}{ASSISTANT}"))


@dataclass(frozen=True)
class EditPrompts:
    """The three CFG branches of image editing (§4.4), each ending with the output image header.

    ``full`` = image + instruction, ``no_text`` = image + ``<uncondition>``, ``no_image`` = the bare
    ``<|image|>`` token + instruction.
    """

    full: list[int]
    no_text: list[int]
    no_image: list[int]


def edit_prompts(tok: TextTokenizer, vq_ids: Sequence[int], gh: int, gw: int, instruction: str,
                 image_token_offset: int) -> EditPrompts:
    """Editing prompts; the output grid equals the source grid, so one header serves all three (§3)."""
    _require_text(instruction, "instruction")
    head = tok.encode(_system_turn(EDIT_SYSTEM))
    block = image_block(tok, vq_ids, gh, gw, image_token_offset)
    out = image_header(tok, gh, gw)
    full = head + block + tok.encode(f"{instruction}{ASSISTANT}") + out
    no_text = head + block + tok.encode(f"{UNCONDITION_TOKEN}{ASSISTANT}") + out
    no_image = tok.encode(f"{_system_turn(EDIT_SYSTEM)}{IMAGE_START_TOKEN}{instruction}{ASSISTANT}") + out
    return EditPrompts(full=full, no_text=no_text, no_image=no_image)


# ----------------------------------------------------------------------------------------------
# Chat
# ----------------------------------------------------------------------------------------------


def _check_messages(messages: Sequence[Mapping[str, str]]) -> None:
    """Fail early with a message the user can act on rather than feed the model a malformed turn list."""
    if not messages:
        raise InputError("chat: the message list is empty")
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping):
            raise InputError(f"chat: message {i} must be an object with 'role' and 'content'")
        role = msg.get("role")
        if role not in CHAT_ROLES:
            raise InputError(f"chat: message {i} has unknown role {role!r} (expected one of {list(CHAT_ROLES)})")
        if role == "system" and i != 0:
            raise InputError(f"chat: message {i} is a system message; only the first message may be one")
        content = msg.get("content")
        if not isinstance(content, str) or not content.strip():
            raise InputError(f"chat: message {i} ({role}) has empty content")
        _require_text(content, f"chat message {i} ({role})")
    if messages[-1]["role"] != "user":
        raise InputError("chat: the conversation must end with a user message")


def chat_prompt(tok: TextTokenizer, messages: Sequence[Mapping[str, str]]) -> list[int]:
    """A text-only conversation, ending with ``<role>ASSISTANT</role>`` for the model's reply.

    Inferred template: model-spec gives no chat template. This one extends the §3 understanding
    prompt: ``<role>SYSTEM</role> {system} `` (the understanding system sentence unless the first
    message is a system message), then ``<role>HUMAN</role>{content}`` for each user turn and
    ``<role>ASSISTANT</role>{content}`` for each assistant turn, with no role-end token (§3 says no
    Uni template uses one), and a final ``<role>ASSISTANT</role>``.
    """
    _check_messages(messages)
    system = UNDERSTANDING_SYSTEM
    turns = list(messages)
    if turns[0]["role"] == "system":
        system = turns.pop(0)["content"]
    parts = [f"{SYSTEM} {system} "]
    for msg in turns:
        parts.append((HUMAN if msg["role"] == "user" else ASSISTANT) + msg["content"])
    parts.append(ASSISTANT)
    return tok.encode("".join(parts))

