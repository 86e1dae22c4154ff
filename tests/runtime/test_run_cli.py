"""``llada-edge run``: every task end to end on the tiny checkpoint; bad input exits 2 with one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from llada_edge.calibration.requests import procedural_image
from llada_edge.cli import main


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("in") / "photo.png"
    Image.fromarray(procedural_image(96, 128, seed=1)).save(path)
    return path


def run_json(capsys, *argv: str) -> dict:
    assert main(["run", *argv, "--json", "--quiet"]) == 0
    return json.loads(capsys.readouterr().out)


def test_understand_and_chat_print_text(tiny_ckpt, photo, capsys) -> None:
    out = run_json(capsys, "understand", "--model", str(tiny_ckpt), "--image", str(photo), "--prompt",
                   "What is this?", "--steps", "8", "--max-new-tokens", "32")
    assert out["task"] == "understand" and out["text"].strip() and out["tokens"]
    assert out["forward_passes"] > 0 and out["timings"]["total"] > 0
    assert main(["run", "chat", "--model", str(tiny_ckpt), "--prompt", "hi", "--steps", "8",
                 "--max-new-tokens", "16", "--quiet"]) == 0
    assert capsys.readouterr().out.strip()


def test_t2i_and_edit_write_pngs(tiny_ckpt, photo, tmp_path, capsys) -> None:
    t2i = run_json(capsys, "t2i", "--model", str(tiny_ckpt), "--prompt", "a lighthouse", "--height", "64",
                   "--width", "96", "--steps", "4", "--out", str(tmp_path / "t2i.png"))
    with Image.open(t2i["outputs"][0]) as img:
        assert img.format == "PNG" and img.size == (96, 64)
    assert len(t2i["tokens"]) == 2 * 3 and t2i["grid"] == [2, 3]
    edit = run_json(capsys, "edit", "--model", str(tiny_ckpt), "--image", str(photo), "--prompt", "make it night",
                    "--steps", "4", "--out", str(tmp_path / "edit.png"))
    with Image.open(edit["outputs"][0]) as img:
        assert img.format == "PNG" and img.size[0] % 32 == 0
    sprint = run_json(capsys, "t2i", "--model", str(tiny_ckpt), "--prompt", "a lighthouse", "--height", "64",
                      "--width", "64", "--steps", "4", "--sprint", "--out", str(tmp_path / "s.png"))
    assert len(sprint["tokens"]) == 4


@pytest.mark.parametrize(("argv", "reason"), [
    (["t2i", "--prompt", "x", "--height", "100"], "multiples of 32"),
    (["t2i", "--prompt", "x", "--height", "4096", "--width", "4096"], "max_position_embeddings"),
    (["understand", "--prompt", "x", "--image", "/nonexistent/cat.png"], "file not found"),
    (["understand", "--prompt", "x", "--image", "NOT_AN_IMAGE"], "not an image"),
    (["t2i", "--prompt", "   "], "empty"),
    (["chat", "--prompt", "hi", "--backend", "nope"], "unknown backend"),
    (["edit", "--prompt", "x"], "needs --image"),
])
def test_bad_input_exits_2_with_one_line(tiny_ckpt, tmp_path, capsys, argv, reason) -> None:
    if "NOT_AN_IMAGE" in argv:
        text = tmp_path / "notes.png"
        text.write_text("just text")
        argv = [str(text) if a == "NOT_AN_IMAGE" else a for a in argv]
    code = main(["run", *argv, "--model", str(tiny_ckpt), "--quiet", "--out", str(tmp_path / "o.png")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("llada-edge run: error:") and reason in err
    assert not (tmp_path / "o.png").exists()


def test_missing_model_folder(tmp_path, capsys) -> None:
    assert main(["run", "chat", "--model", str(tmp_path / "none"), "--prompt", "hi", "--quiet"]) == 2
    assert "not a directory" in capsys.readouterr().err
