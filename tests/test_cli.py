"""The ``llada-edge`` command line: synth, inspect, reference; exit code 2 with one line on bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from llada_edge.cli import main


def test_help_of_every_subcommand(capsys) -> None:
    for argv in (["--help"], ["synth", "--help"], ["inspect", "--help"], ["reference", "--help"]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 0
    assert "checkpoint" in capsys.readouterr().out


def test_synth_then_inspect(tmp_path: Path, capsys) -> None:
    out = tmp_path / "ck"
    assert main(["synth", "--preset", "tiny", "--layers", "2", "--seed", "3", "--out", str(out)]) == 0
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "backbone" in text and "2 layers" in text and "<|mask|>=156895" in text
    assert main(["inspect", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert {c["name"] for c in summary["components"]} >= {"backbone", "image tokenizer", "sigvq", "vae"}
    assert main(["synth", "--out", str(out)]) == 2  # exists, no --force
    assert "already exists" in capsys.readouterr().err


@pytest.mark.parametrize("breakage", ["not-a-folder", "missing-shard", "bad-config", "missing-tokenizer"])
def test_inspect_invalid_folder_exits_2_with_one_line(tiny_copy: Path, breakage: str, capsys) -> None:
    target = tiny_copy
    if breakage == "not-a-folder":
        target = tiny_copy / "config.json"
    elif breakage == "missing-shard":
        next(tiny_copy.glob("model-00002-*.safetensors")).unlink()
    elif breakage == "bad-config":
        (tiny_copy / "decoder" / "config.json").write_text('{"dim": 64}')
    else:
        (tiny_copy / "tokenizer.json").unlink()
    assert main(["inspect", str(target)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("llada-edge inspect: error:")
    assert "Traceback" not in err


def test_console_script_runs_reference(tiny_ckpt: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "llada_edge.cli", "reference", "--model", str(tiny_ckpt),
                          "--height", "64", "--width", "96", "--json"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    stages = {s["name"]: s for s in json.loads(res.stdout)}
    assert "24 ids" in stages["image tokenizer"]["output"]
    assert "image [1, 3, 64, 96]" in stages["vae decode"]["output"]


def test_reference_rejects_bad_size(tiny_ckpt: Path, capsys) -> None:
    assert main(["reference", "--model", str(tiny_ckpt), "--height", "100"]) == 2
    assert "multiples of 32" in capsys.readouterr().err
