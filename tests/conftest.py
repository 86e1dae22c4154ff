"""Shared fixtures: one tiny synthetic checkpoint per session (and the trained one, cached), and a recorder for
measured figures.

Figures recorded with ``measure(name, value)`` (parity errors, peak RSS...) are printed at the end of
the run and written to ``build/test-measurements.json`` so reports can quote them.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from llada_edge.synthetic import synthesize

_MEASUREMENTS: dict[str, float | int | str] = {}
MEASUREMENTS_PATH = Path(__file__).resolve().parent.parent / "build" / "test-measurements.json"


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny preset, seed 0 (read-only: copy it with ``tiny_copy`` before modifying)."""
    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    synthesize(out, "tiny", progress=lambda _msg: None)
    return out


@pytest.fixture
def tiny_copy(tiny_ckpt: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny checkpoint that a test may break."""
    dst = tmp_path / "tiny"
    shutil.copytree(tiny_ckpt, dst)
    return dst


@pytest.fixture(scope="session")
def measure():
    def record(name: str, value: float | int | str) -> None:
        _MEASUREMENTS[name] = value

    return record


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _MEASUREMENTS:
        return
    terminalreporter.section("measurements")
    for name, value in sorted(_MEASUREMENTS.items()):
        shown = f"{value:.3e}" if isinstance(value, float) else str(value)
        terminalreporter.write_line(f"{name}: {shown}")
    MEASUREMENTS_PATH.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(MEASUREMENTS_PATH.read_text()) if MEASUREMENTS_PATH.is_file() else {}
    previous.update(_MEASUREMENTS)
    MEASUREMENTS_PATH.write_text(json.dumps(previous, indent=2, sort_keys=True) + "\n")


@pytest.fixture(scope="session")
def tiny_build(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every component of the tiny checkpoint exported (dense MoE: the TensorRT-bound lowering) and validated.

    Read-only: tests that modify a build export their own.
    """
    from llada_edge.export.build import export_build

    out = tmp_path_factory.mktemp("build") / "tiny"
    export_build(tiny_ckpt, out, moe="dense", progress=lambda _m: None)
    return out


@pytest.fixture(scope="session")
def tiny_trained_ckpt() -> Path:
    """``synth --preset tiny-trained`` (read-only) in the cache: $LLADA_EDGE_CACHE, else the repository's
    build/cache (`make clean` drops it). A fresh clone rebuilds it from the patch committed under artifacts/; when
    that patch is of another fingerprint (the code changed), the run trains it (10-20 minutes) and warns."""
    from llada_edge.training.cache import cached_checkpoint

    cache = os.environ.get("LLADA_EDGE_CACHE", str(Path(__file__).resolve().parent.parent / "build" / "cache"))
    return cached_checkpoint(0, cache=cache, progress=lambda _m: None)  # warns when it has to train


@pytest.fixture(scope="session")
def trained_build_ort(tiny_trained_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trained tiny checkpoint exported with the com.microsoft.MoE lowering (the ONNX Runtime CPU path),
    unvalidated (the export tests validate): engine tests add their engines and accuracy reports to this folder."""
    from llada_edge.export.build import export_build

    out = tmp_path_factory.mktemp("build-ort") / "tiny-trained"
    export_build(tiny_trained_ckpt, out, moe="ort", validate=False, progress=lambda _m: None)
    return out
