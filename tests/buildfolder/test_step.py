"""The one keyed, atomic build step that every producer of a build folder uses."""

from __future__ import annotations

from pathlib import Path

import pytest

from llada_edge.buildfolder import Artifact, BuildError, Manifest, StepOutput, build_step


def _writer(calls: list[str], payload: bytes = b"graph") -> object:
    def produce(tmp: Path) -> StepOutput:
        calls.append(tmp.name)
        (tmp / "model.onnx").write_bytes(payload)
        return StepOutput(meta={"note": "made"}, inputs={"x": {"dtype": "float32", "shape": [1]}})

    return produce


def test_second_run_with_the_same_key_is_skipped(tmp_path: Path) -> None:
    manifest, calls = Manifest(), []
    entry, built = build_step(tmp_path, manifest, Artifact.onnx("embed"), "k1", _writer(calls))
    assert built and calls == [".embed.partial"]
    assert entry.meta["note"] == "made" and "seconds" in entry.meta and entry.inputs == {"x": {"dtype": "float32",
                                                                                                "shape": [1]}}
    assert [f.path for f in entry.files] == ["onnx/embed/model.onnx"]
    assert Manifest.load(tmp_path).components["embed"].key == "k1"  # recorded at once
    again, built = build_step(tmp_path, manifest, Artifact.onnx("embed"), "k1", _writer(calls))
    assert not built and again is entry and len(calls) == 1


@pytest.mark.parametrize("change", ["key", "missing file", "size", "refused"])
def test_changed_inputs_or_files_rebuild(tmp_path: Path, change: str) -> None:
    manifest, calls = Manifest(), []
    art = Artifact.ort_engine("int4", "layer_1")
    build_step(tmp_path, manifest, art, "k1", _writer(calls))
    path = tmp_path / "engines/onnxruntime/int4/layer_1/model.onnx"
    key = "k2" if change == "key" else "k1"
    if change == "missing file":
        path.unlink()
    elif change == "size":
        path.write_bytes(b"truncated")
    reuse = (lambda _entry: False) if change == "refused" else None
    _, built = build_step(tmp_path, manifest, art, key, _writer(calls, b"new graph"), reuse=reuse)
    assert built and len(calls) == 2 and path.read_bytes() == b"new graph"
    assert manifest.components[art.entry].key == key


def test_a_failing_step_leaves_no_files_and_no_record(tmp_path: Path) -> None:
    manifest = Manifest()

    def crash(tmp: Path) -> StepOutput:
        (tmp / "model.onnx").write_bytes(b"half")
        raise RuntimeError("exporter crashed")

    with pytest.raises(RuntimeError, match="exporter crashed"):
        build_step(tmp_path, manifest, Artifact.qdq_graph("fp8", "dit_turbo"), "k", crash)
    assert "qdq/fp8/dit_turbo" not in manifest.components
    assert not (tmp_path / "quant").exists() or not any((tmp_path / "quant").rglob("*.onnx"))


@pytest.mark.parametrize("folder", ["../victim", "/tmp/victim", "onnx/../../victim", ""])
def test_an_artifact_folder_outside_the_build_is_refused(tmp_path: Path, folder: str) -> None:
    build = tmp_path / "build"
    with pytest.raises(BuildError, match="escapes the build folder"):
        build_step(build, Manifest(), Artifact("x", "onnx", folder), "k", _writer([]))
    assert not (tmp_path / "victim").exists()
