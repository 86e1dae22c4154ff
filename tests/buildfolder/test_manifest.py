"""The build manifest: round trip, clear load errors, tamper detection, atomic folders and cache keys."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from llada_edge.buildfolder.files import atomic_dir, sha256_file
from llada_edge.buildfolder.manifest import (
    FORMAT,
    FORMAT_VERSION,
    BuildError,
    ComponentEntry,
    FileEntry,
    Manifest,
    fingerprint,
    record_component,
    versions_of,
)
from llada_edge.errors import LladaEdgeError


def _component(build: Path, name: str = "backbone", payload: bytes = b"graph-bytes" * 100) -> ComponentEntry:
    """Write a fake ONNX file plus external data under BUILD/onnx/<name>/ and describe it."""
    folder = build / "onnx" / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.onnx").write_bytes(payload)
    (folder / "model.onnx.data").write_bytes(bytes(range(256)) * 4)
    files = [FileEntry.of(build, folder / "model.onnx"), FileEntry.of(build, f"onnx/{name}/model.onnx.data")]
    return ComponentEntry(
        name=name,
        kind="onnx",
        files=files,
        key=fingerprint([name, {"opset": 17}]),
        inputs={"input_ids": {"dtype": "int64", "shape": ["batch", "seq"]}},
        outputs={"logits": {"dtype": "float32", "shape": ["batch", "seq", 64]}},
        meta={"opset": 17, "moe": "dense-gather"},
        validation={"max_abs": 1.5e-6, "passed": True},
    )


@pytest.fixture
def build(tmp_path: Path) -> tuple[Path, Manifest]:
    root = tmp_path / "build" / "tiny"
    manifest = Manifest(
        checkpoint={"path": "/ckpt/tiny", "fingerprint": "abc123"},
        versions=versions_of(["numpy", "surely-not-installed-pkg"]),
        options={"precision": "fp32"},
    )
    record_component(root, manifest, _component(root))
    return root, manifest


def _write_manifest(root: Path, data: object) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "manifest.json").write_text(json.dumps(data))


# ------------------------------------------------------------------------------------------ round trip


def test_round_trip(build: tuple[Path, Manifest]) -> None:
    root, manifest = build
    loaded = Manifest.load(root)
    assert loaded == manifest
    assert Manifest.from_dict(manifest.to_dict()) == manifest
    assert loaded.format == FORMAT and loaded.format_version == FORMAT_VERSION
    assert loaded.created.endswith("Z")
    assert loaded.components["backbone"].files[0].path == "onnx/backbone/model.onnx"
    assert loaded.versions["numpy"] == np.__version__
    assert loaded.versions["surely-not-installed-pkg"] is None
    assert sorted(p.name for p in root.iterdir()) == ["manifest.json", "onnx"]  # no manifest.json.tmp left
    loaded.verify(root)


def test_save_replaces_and_records(build: tuple[Path, Manifest]) -> None:
    root, manifest = build
    record_component(root, manifest, _component(root, "vae", b"vae"))
    assert set(Manifest.load(root).components) == {"backbone", "vae"}
    assert not (root / "manifest.json.tmp").exists()


# ---------------------------------------------------------------------------------------- load errors


def test_load_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="not a build folder") as info:
        Manifest.load(tmp_path / "nope")
    assert info.value.file == str(tmp_path / "nope")
    assert isinstance(info.value, LladaEdgeError)


def test_load_folder_without_manifest(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match=r"not a build folder: no manifest.json; run `llada-edge export` first"):
        Manifest.load(tmp_path)


def test_load_malformed_json(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text('{"format": "llada-edge-build",')
    with pytest.raises(BuildError, match=r"malformed manifest\.json") as info:
        Manifest.load(tmp_path)
    assert info.value.file == str(tmp_path / "manifest.json")


def test_load_wrong_format_version(build: tuple[Path, Manifest]) -> None:
    root, manifest = build
    _write_manifest(root, {**manifest.to_dict(), "format_version": FORMAT_VERSION + 1})
    with pytest.raises(BuildError, match="incompatible") as info:
        Manifest.load(root)
    assert f"format {FORMAT_VERSION + 1} (this version reads {FORMAT_VERSION})" in str(info.value)
    assert "re-run `llada-edge export`" in str(info.value)


def test_load_wrong_format(tmp_path: Path) -> None:
    _write_manifest(tmp_path, {"format": "something-else", "format_version": 1})
    with pytest.raises(BuildError, match="not a llada-edge build manifest"):
        Manifest.load(tmp_path)


def test_load_missing_field_names_key(build: tuple[Path, Manifest]) -> None:
    root, manifest = build
    data = manifest.to_dict()
    del data["components"]["backbone"]["files"][0]["sha256"]
    _write_manifest(root, data)
    with pytest.raises(BuildError, match="missing field") as info:
        Manifest.load(root)
    assert info.value.key == "components.backbone.files[0].sha256"


# ------------------------------------------------------------------------------------------- verify


def test_verify_detects_flipped_byte(build: tuple[Path, Manifest]) -> None:
    root, manifest = build
    target = root / "onnx" / "backbone" / "model.onnx.data"
    data = bytearray(target.read_bytes())
    data[100] ^= 0x01
    target.write_bytes(bytes(data))
    manifest.verify(root, full_hash=False)  # same size: only the hash can tell
    with pytest.raises(BuildError, match=r"sha256 mismatch \(file changed after the build\)") as info:
        manifest.verify(root)
    assert info.value.file == str(target)


def test_verify_detects_missing_file(build: tuple[Path, Manifest]) -> None:
    root, manifest = build
    (root / "onnx" / "backbone" / "model.onnx").unlink()
    with pytest.raises(BuildError, match="missing") as info:
        manifest.verify(root, components=["backbone"], full_hash=False)
    assert info.value.file.endswith("model.onnx")


def test_verify_detects_size_change(build: tuple[Path, Manifest]) -> None:
    root, manifest = build
    with open(root / "onnx" / "backbone" / "model.onnx", "ab") as f:
        f.write(b"x")
    with pytest.raises(BuildError, match="size differs"):
        manifest.verify(root, full_hash=False)


def test_verify_unknown_component_and_escaping_path(build: tuple[Path, Manifest]) -> None:
    root, manifest = build
    with pytest.raises(BuildError, match="component not in the manifest") as info:
        manifest.verify(root, components=["dit"])
    assert info.value.key == "dit"
    manifest.components["backbone"].files[0].path = "../outside.onnx"
    with pytest.raises(BuildError, match="escapes the build folder"):
        manifest.verify(root)


# --------------------------------------------------------------------------------------- atomic_dir


def test_atomic_dir_leaves_nothing_on_exception(tmp_path: Path) -> None:
    final = tmp_path / "engines" / "cpu"
    with pytest.raises(RuntimeError, match="boom"), atomic_dir(final) as tmp:
        (tmp / "half.onnx").write_bytes(b"half")
        raise RuntimeError("boom")
    assert not final.exists()
    assert list((tmp_path / "engines").iterdir()) == []


def test_atomic_dir_keeps_old_on_interrupt(tmp_path: Path) -> None:
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_dir(final) as tmp:
        (tmp / "new.txt").write_text("new")
        raise KeyboardInterrupt
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert (final / "old.txt").read_text() == "old"


def test_atomic_dir_replaces_existing_on_success(tmp_path: Path) -> None:
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    stale = tmp_path / ".out.partial"
    stale.mkdir()
    (stale / "junk").write_text("from a crashed run")
    with atomic_dir(final) as tmp:
        assert tmp == stale and list(tmp.iterdir()) == []  # the stale attempt was cleared
        (tmp / "sub").mkdir()
        (tmp / "sub" / "new.txt").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert sorted(str(p.relative_to(final)) for p in final.rglob("*")) == ["sub", "sub/new.txt"]


# ------------------------------------------------------------------------------------ hashes, keys


def test_sha256_file_streams(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    payload = np.random.default_rng(0).bytes(100_003)
    path.write_bytes(payload)
    expected = hashlib.sha256(payload).hexdigest()
    assert sha256_file(path) == expected
    assert sha256_file(path, chunk=4096) == expected


def test_fingerprint_is_canonical(tmp_path: Path) -> None:
    a = fingerprint([{"b": 1, "a": [1, 2]}, tmp_path / "x", np.float32(0.5), np.arange(4)])
    b = fingerprint([{"a": [1, 2], "b": 1}, str(tmp_path / "x"), 0.5, np.arange(4)])
    assert a == b and len(a) == 64
    assert fingerprint([1, 2]) != fingerprint([2, 1])
    assert fingerprint([np.arange(4)]) != fingerprint([np.arange(4, dtype=np.int32)])
    with pytest.raises(TypeError, match="cannot fingerprint"):
        fingerprint([object()])
