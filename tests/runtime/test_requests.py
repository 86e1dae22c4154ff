"""Typed requests: defaults live in the option classes; the CLI and the Pipeline keywords map onto them."""

from __future__ import annotations

import pytest

from llada_edge.cli import build_parser, run_request
from llada_edge.errors import InputError
from llada_edge.runtime.requests import (
    ChatRequest,
    EditOptions,
    EditRequest,
    T2IOptions,
    T2IRequest,
    TextOptions,
    UnderstandRequest,
    resolve_options,
)
from llada_edge.runtime.sampler import SprintConfig


def _request(*argv: str):
    return run_request(build_parser().parse_args(["run", *argv, "--model", "m", "--prompt", "p"]))


def test_a_bare_command_line_gets_the_option_defaults() -> None:
    assert _request("t2i") == T2IRequest("p", T2IOptions())
    assert _request("understand", "--image", "x.png") == UnderstandRequest("x.png", "p", TextOptions())
    assert _request("edit", "--image", "x.png") == EditRequest("x.png", "p", EditOptions())
    chat = _request("chat")
    assert isinstance(chat, ChatRequest) and chat.options == TextOptions()
    assert chat.messages == [{"role": "user", "content": "p"}]
    assert TextOptions().steps == 32 and T2IOptions().steps == 8  # the per-task defaults


def test_flags_map_onto_fields() -> None:
    req = _request("t2i", "--height", "256", "--width", "512", "--steps", "4", "--cfg-scale", "3", "--mode",
                   "thinking", "--decode-mode", "normal", "--seed", "7", "--sprint", "--keep-ratio", "0.5",
                   "--sprint-threshold", "0.9")
    assert req == T2IRequest("p", T2IOptions(height=256, width=512, steps=4, cfg_scale=3.0, mode="thinking",
                                             decode_mode="normal", seed=7,
                                             sprint=SprintConfig(keep_ratio=0.5, threshold=0.9)))
    text = _request("understand", "--image", "x.png", "--max-new-tokens", "16", "--threshold", "0.9")
    assert text.options == TextOptions(max_new_tokens=16, threshold=0.9)


def test_bad_options_are_input_errors() -> None:
    with pytest.raises(InputError, match="multiples of 32, got 100x1024"):
        T2IOptions(height=100)
    with pytest.raises(InputError, match="unknown decode mode"):
        EditOptions(decode_mode="fast")
    with pytest.raises(InputError, match="unknown t2i mode"):
        T2IOptions(mode="dreaming")
    with pytest.raises(InputError, match="steps per block"):
        TextOptions(steps=64)
    with pytest.raises(InputError, match="needs --image"):
        _request("edit")


def test_keyword_overrides_apply_to_given_options() -> None:
    base = T2IOptions(height=256, width=256)
    assert resolve_options(T2IOptions, base, {"steps": 4}) == T2IOptions(height=256, width=256, steps=4)
    assert resolve_options(TextOptions, None, {}) == TextOptions()
    with pytest.raises(TypeError, match=r"unknown TextOptions field.*cfg_scale"):
        resolve_options(TextOptions, None, {"cfg_scale": 2.0})
