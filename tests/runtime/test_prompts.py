"""Text tokenizer wrapper and prompt templates (model-spec §3) on the synthetic tokenizer.json.

Expected strings are copied from model-spec §3, not from the module, so a template drift fails here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from llada_edge.errors import CheckpointError, InputError
from llada_edge.runtime.prompts import (
    chat_prompt,
    edit_prompts,
    image_block,
    image_header,
    t2i_prompt,
    t2i_unconditional_prompt,
    thinking_prompt,
    thinking_unconditional_prompt,
    understanding_prompt,
)
from llada_edge.runtime.text import TextTokenizer
from llada_edge.synthetic import IMAGE_TOKEN_OFFSET, RESERVED_TOKEN_BASE, SPECIAL_TOKENS

OFFSET = IMAGE_TOKEN_OFFSET


@pytest.fixture(scope="module")
def tok(tiny_ckpt: Path) -> TextTokenizer:
    return TextTokenizer.from_file(tiny_ckpt / "tokenizer.json")


def text_of(tok: TextTokenizer, ids: list[int]) -> str:
    return tok.decode(ids, skip_special_tokens=False)


# ----------------------------------------------------------------------------------------------
# TextTokenizer
# ----------------------------------------------------------------------------------------------


def test_special_ids_are_the_real_ones(tok: TextTokenizer) -> None:
    assert tok.mask_id == 156895 == SPECIAL_TOKENS["<|mask|>"]
    assert tok.eos_id == 156892
    assert tok.image_start_id == 156901
    assert tok.image_end_id == 156902
    assert tok.boi_id == 156904
    assert tok.uncondition_id == SPECIAL_TOKENS["<uncondition>"]
    assert tok.reserved_token_id(0) == RESERVED_TOKEN_BASE
    assert tok.reserved_token_id(32) == RESERVED_TOKEN_BASE + 32


def test_encode_maps_special_tokens_and_adds_nothing(tok: TextTokenizer) -> None:
    ids = tok.encode("<role>HUMAN</role>hi<|image|>")
    assert ids[0] == SPECIAL_TOKENS["<role>"]
    assert ids[-1] == tok.image_start_id
    assert SPECIAL_TOKENS["</role>"] in ids
    assert tok.eos_id not in ids
    assert len(tok.encode("a")) == 1  # no BOS/EOS around a single byte


def test_decode_roundtrip_and_unknown_ids(tok: TextTokenizer) -> None:
    ids = tok.encode("hello world")
    assert tok.decode(ids) == "hello world"
    # Image codes, out-of-vocabulary and negative ids are skipped instead of crashing.
    noisy = [*ids[:3], OFFSET + 7, 10**9, -1, *ids[3:]]
    assert tok.decode(noisy) == "hello world"
    assert tok.decode([tok.mask_id, *ids]) == "hello world"
    assert tok.decode([tok.mask_id], skip_special_tokens=False) == "<|mask|>"


def test_missing_token_names_file_and_token(tok: TextTokenizer) -> None:
    with pytest.raises(CheckpointError) as err:
        tok.token_id("<|no_such_token|>")
    assert "tokenizer.json" in str(err.value) and "<|no_such_token|>" in str(err.value)
    with pytest.raises(CheckpointError, match=r"reserved_token_256"):
        tok.reserved_token_id(256)
    with pytest.raises(InputError):
        tok.reserved_token_id(-1)


def test_from_file_errors(tmp_path: Path) -> None:
    missing = tmp_path / "tokenizer.json"
    with pytest.raises(CheckpointError, match="not found") as err:
        TextTokenizer.from_file(missing)
    assert str(missing) in str(err.value)
    missing.write_text("{not json")
    with pytest.raises(CheckpointError, match=r"not a valid tokenizer\.json") as err:
        TextTokenizer.from_file(missing)
    assert err.value.file == str(missing)


# ----------------------------------------------------------------------------------------------
# Image block
# ----------------------------------------------------------------------------------------------


def test_image_header_and_block_layout(tok: TextTokenizer) -> None:
    header = image_header(tok, 2, 3)
    assert header == [156901, RESERVED_TOKEN_BASE + 2, RESERVED_TOKEN_BASE + 3, 156904]
    assert text_of(tok, header) == "<|image|><|reserved_token_2|><|reserved_token_3|><boi>"
    assert image_header(tok, np.int64(2), np.int32(3)) == header  # grids computed with numpy are fine
    vq = [0, 5, 16383, 1, 2, 3]
    block = image_block(tok, vq, 2, 3, OFFSET)
    assert block[:4] == header
    assert block[4:-1] == [157184, 157189, 173567, 157185, 157186, 157187]  # raster order kept
    assert block[-1] == 156902
    assert len(block) == 2 * 3 + 5


def test_image_block_checks(tok: TextTokenizer) -> None:
    with pytest.raises(ValueError, match="expected 6"):
        image_block(tok, [0] * 5, 2, 3, OFFSET)
    with pytest.raises(ValueError, match="non-negative"):
        image_block(tok, [-1], 1, 1, OFFSET)
    with pytest.raises(InputError):
        image_header(tok, 0, 4)


# ----------------------------------------------------------------------------------------------
# Templates
# ----------------------------------------------------------------------------------------------


def test_t2i_templates(tok: TextTokenizer) -> None:
    ids = t2i_prompt(tok, "a red cat", 32, 32)
    assert text_of(tok, ids) == (
        "<role>SYSTEM</role> You are a text-to-image generation assistant. <role>HUMAN</role>a red cat"
        "<role>ASSISTANT</role><|image|><|reserved_token_32|><|reserved_token_32|><boi>")
    assert ids[-4:] == image_header(tok, 32, 32)
    unc = t2i_unconditional_prompt(tok, 32, 16)
    assert text_of(tok, unc) == (
        "<role>SYSTEM</role> You are a text-to-image generation assistant. <role>HUMAN</role><uncondition>"
        "<role>ASSISTANT</role><|image|><|reserved_token_32|><|reserved_token_16|><boi>")
    assert unc.count(tok.uncondition_id) == 1


def test_thinking_templates(tok: TextTokenizer) -> None:
    ids = thinking_prompt(tok, "a red cat")
    assert text_of(tok, ids) == (
        "<role>SYSTEM</role> You are a text-to-image generation assistant with a thinking process. "
        "<role>HUMAN</role>a red cat<role>ASSISTANT</role>")
    assert tok.boi_id not in ids and tok.image_start_id not in ids  # phase 1: no image header
    unc = thinking_unconditional_prompt(tok, 8, 4)
    assert text_of(tok, unc) == (
        "<role>SYSTEM</role>You are a text-to-image generation assistant with a thinking process."
        "<role>HUMAN</role><uncondition><role>ASSISTANT</role><|image|><|reserved_token_8|>"
        "<|reserved_token_4|><boi>")


def test_understanding_template(tok: TextTokenizer) -> None:
    vq = [3, 1, 4, 1]
    ids = understanding_prompt(tok, vq, 2, 2, "What is this?", OFFSET)
    # Image codes are not text tokens: decode skips them, leaving the template around the block.
    assert text_of(tok, ids) == (
        "<role>SYSTEM</role> You are a multimodal understanding assistant. <role>HUMAN</role>"
        "<|image|><|reserved_token_2|><|reserved_token_2|><boi><|/image|>What is this?<role>ASSISTANT</role>")
    start = ids.index(tok.image_start_id)
    assert ids[start:start + 9] == image_block(tok, vq, 2, 2, OFFSET)
    assert ids.index(tok.image_end_id) < len(ids) - len(tok.encode("What is this?<role>ASSISTANT</role>"))
    assert ids[-len(tok.encode("<role>ASSISTANT</role>")):] == tok.encode("<role>ASSISTANT</role>")


def test_edit_branches(tok: TextTokenizer) -> None:
    vq = list(range(6))
    p = edit_prompts(tok, vq, 2, 3, "make it blue", OFFSET)
    header = image_header(tok, 2, 3)
    for branch in (p.full, p.no_text, p.no_image):
        assert branch[-4:] == header  # output grid = source grid
    prefix = "<role>SYSTEM</role> You are an image editing assistant. <role>HUMAN</role>"
    out = "<|image|><|reserved_token_2|><|reserved_token_3|><boi>"
    src = "<|image|><|reserved_token_2|><|reserved_token_3|><boi><|/image|>"
    assert text_of(tok, p.full) == f"{prefix}{src}make it blue<role>ASSISTANT</role>{out}"
    assert text_of(tok, p.no_text) == f"{prefix}{src}<uncondition><role>ASSISTANT</role>{out}"
    assert text_of(tok, p.no_image) == f"{prefix}<|image|>make it blue<role>ASSISTANT</role>{out}"
    block = image_block(tok, vq, 2, 3, OFFSET)
    assert p.full[len(tok.encode(prefix)):][:len(block)] == block
    assert p.no_text[:len(tok.encode(prefix)) + len(block)] == p.full[:len(tok.encode(prefix)) + len(block)]
    # The no-image branch keeps only the bare <|image|> of the source block: no codes, no <|/image|>.
    assert not any(i >= OFFSET for i in p.no_image)
    assert tok.image_end_id not in p.no_image
    assert p.no_image.count(tok.image_start_id) == 2  # the bare source token + the output header


@pytest.mark.parametrize("text", ["", "   ", "\n\t"])
def test_empty_text_is_refused(tok: TextTokenizer, text: str) -> None:
    with pytest.raises(InputError, match="empty prompt"):
        t2i_prompt(tok, text, 4, 4)
    with pytest.raises(InputError, match="empty prompt"):
        thinking_prompt(tok, text)
    with pytest.raises(InputError, match="empty prompt"):
        understanding_prompt(tok, [0], 1, 1, text, OFFSET)
    with pytest.raises(InputError, match="empty prompt"):
        edit_prompts(tok, [0], 1, 1, text, OFFSET)


# ----------------------------------------------------------------------------------------------
# Chat
# ----------------------------------------------------------------------------------------------


def test_chat_default_and_custom_system(tok: TextTokenizer) -> None:
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "How are you?"}]
    assert text_of(tok, chat_prompt(tok, msgs)) == (
        "<role>SYSTEM</role> You are a multimodal understanding assistant. <role>HUMAN</role>Hi"
        "<role>ASSISTANT</role>Hello.<role>HUMAN</role>How are you?<role>ASSISTANT</role>")
    custom = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert text_of(tok, chat_prompt(tok, custom)) == (
        "<role>SYSTEM</role> Be brief. <role>HUMAN</role>Hi<role>ASSISTANT</role>")


@pytest.mark.parametrize(("messages", "message"), [
    ([], "empty"),
    ([{"role": "bot", "content": "x"}], "unknown role"),
    ([{"role": "user", "content": "  "}], "empty content"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "end with a user"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}, {"role": "user", "content": "c"}],
     "only the first"),
    (["hello"], "must be an object"),
])
def test_chat_validation(tok: TextTokenizer, messages: list, message: str) -> None:
    with pytest.raises(InputError, match=message):
        chat_prompt(tok, messages)
