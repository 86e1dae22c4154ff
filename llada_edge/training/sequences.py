"""The sequences the tiny checkpoint is trained on and the accuracy report measures on (numpy only).

Each is built with the runtime's own prompt builders (``runtime.prompts``), so training, the report and
the pipelines agree on the format. Positions from ``start`` on are the targets (masked and scored).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from llada_edge.config import BLOCK_SIZE
from llada_edge.runtime import prompts
from llada_edge.runtime.text import TextTokenizer
from llada_edge.training.corpus import Passage

# Understanding questions used in training. The report asks the held-out questions of calibration_set.json's
# "evaluation" set instead, none of which is here.
QUESTIONS = ("What is in this picture?", "Describe the image.", "What does the image show?",
             "Describe the colors and shapes in the image.", "What can you see here?")


@dataclass
class Example:
    """One sequence: positions >= ``start`` are targets, scored by ``head`` ("text" or "image")."""

    ids: list[int]
    start: int
    head: str


@dataclass
class SceneTokens:
    """A captioned scene as the image tokenizer sees it: ``ids`` in the order a prompt carries them."""

    caption: str
    ids: list[int]
    gh: int
    gw: int


def pad_to_block(start: int, ids: Sequence[int], eos: int) -> list[int]:
    """An answer that begins at index ``start``: + at least one EOS, padded with EOS up to the next block
    boundary of the whole sequence (the sampler's blocks are absolute): how LLaDA's SFT answers end."""
    out = [*ids, eos]
    while (start + len(out)) % BLOCK_SIZE:
        out.append(eos)
    return out


def chat_question(passage: Passage) -> str:
    return f"What does {passage.subject} do?"


def chat_example(tok: TextTokenizer, passage: Passage) -> Example:
    prompt = prompts.chat_prompt(tok, [{"role": "user", "content": chat_question(passage)}])
    return Example(prompt + pad_to_block(len(prompt), tok.encode(passage.text), tok.eos_id), len(prompt), "text")


def text_example(tok: TextTokenizer, passage: Passage) -> Example:
    return Example([*tok.encode(passage.text), tok.eos_id], 0, "text")


def understand_example(tok: TextTokenizer, scene: SceneTokens, question: str, offset: int) -> Example:
    prompt = prompts.understanding_prompt(tok, scene.ids, scene.gh, scene.gw, question, offset)
    return Example(prompt + pad_to_block(len(prompt), tok.encode(scene.caption), tok.eos_id), len(prompt),
                   "text")


def t2i_example(tok: TextTokenizer, scene: SceneTokens, offset: int) -> Example:
    """A caption, then the scene's codes in raster order (what the image head generates)."""
    prompt = prompts.t2i_prompt(tok, scene.caption, scene.gh, scene.gw)
    return Example(prompt + [q + offset for q in scene.ids], len(prompt), "image")


def window_to_raster(ids: Sequence[int] | np.ndarray, gh: int, gw: int) -> np.ndarray:
    """Ids in 2x2-window order (the tokenizer with merge_size 2) -> raster order (what the decoder reads).

    Text-to-image targets are the window-order tokenizer's ids put in raster order, in training (the
    backbone's and the decoder's) and in the accuracy report alike. (A raster-order tokenizer gives other
    ids, not just another order: its position embeddings line up with the patches differently.)
    """
    windows = np.asarray(ids).reshape(gh // 2, gw // 2, 2, 2)  # [window row, window col, row in, col in]
    return windows.transpose(0, 2, 1, 3).reshape(-1)
