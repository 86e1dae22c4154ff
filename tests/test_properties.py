"""Property tests: random bytes, JSON and values into the checkpoint reader, the manifest loader and the request
validation give a clear error (the user-facing kind, exit code 2) or a result that keeps the invariants; never
another exception and never a path outside the folder."""

from __future__ import annotations

import json
import math
import struct
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llada_edge.buildfolder import BuildError, Manifest
from llada_edge.checkpoint import CheckpointError, TensorReader, read_header
from llada_edge.errors import InputError, LladaEdgeError
from llada_edge.layout import DTYPE_SIZES
from llada_edge.runtime.requests import EditOptions, T2IOptions, TextOptions
from llada_edge.runtime.sampler import SprintConfig

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)
offsets = st.lists(st.one_of(st.integers(-8, 64), st.floats(-1, 64), st.text(max_size=2)), max_size=3)
entries = st.fixed_dictionaries({
    "dtype": st.sampled_from([*DTYPE_SIZES, "X9", ""]) | json_values,
    "shape": st.lists(st.integers(-2, 6), max_size=3) | json_values,
    "data_offsets": offsets | json_values,
})


def _safetensors(header: dict[str, Any], data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def _read(raw: bytes) -> dict[str, Any] | None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.safetensors"
        path.write_bytes(raw)
        try:
            return read_header(path)
        except CheckpointError:
            return None


def _tiles(infos: dict[str, Any], size: int, data_start: int) -> bool:
    ranges = sorted((i.begin, i.end) for i in infos.values())
    position = data_start
    for begin, end in ranges:
        if begin != position:
            return False
        position = end
    return position == size


@SETTINGS
@given(st.binary(max_size=200))
def test_random_bytes_are_a_checkpoint_error_or_a_header(raw: bytes) -> None:
    infos = _read(raw)
    if infos is not None:
        (n,) = struct.unpack("<Q", raw[:8])
        assert _tiles(infos, len(raw), 8 + n)


@SETTINGS
@given(st.dictionaries(st.text(min_size=1, max_size=6), entries | json_values, max_size=4), st.binary(max_size=64))
def test_random_headers_read_only_ranges_that_tile_the_file(header: dict[str, Any], data: bytes) -> None:
    raw = _safetensors(header, data)
    infos = _read(raw)
    if infos is not None:
        (n,) = struct.unpack("<Q", raw[:8])
        assert _tiles(infos, len(raw), 8 + n)
        for info in infos.values():
            assert info.nbytes == info.numel * DTYPE_SIZES[info.dtype]


@SETTINGS
@given(st.dictionaries(st.text(max_size=6), st.text(max_size=24) | json_values, min_size=1, max_size=3))
def test_index_shards_never_leave_the_folder(weight_map: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "ckpt"
        folder.mkdir()
        index = folder / "model.safetensors.index.json"
        index.write_text(json.dumps({"weight_map": weight_map}))
        try:
            reader = TensorReader.from_index(index)
        except CheckpointError:
            return
        for path in reader.files:
            assert path.resolve().is_relative_to(folder.resolve())


def _valid_manifest() -> dict[str, Any]:
    entry = {"name": "layer_0", "kind": "onnx", "key": "k", "inputs": {}, "outputs": {}, "meta": {},
             "validation": None, "files": [{"path": "onnx/layer_0/model.onnx", "sha256": "0" * 64, "size": 1}]}
    return {"format": "llada-edge-build", "format_version": 1, "created": "t", "llada_edge_version": "0",
            "checkpoint": {}, "versions": {}, "options": {}, "components": {"layer_0": entry}, "reports": {}}


def _mutate(data: dict[str, Any], path: list[str | int], value: Any) -> dict[str, Any]:
    out = json.loads(json.dumps(data))
    target: Any = out
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    return out


MUTABLE = [["components", "layer_0", "name"], ["components", "layer_0", "files"],
           ["components", "layer_0", "files", 0, "path"], ["components", "layer_0", "files", 0, "size"],
           ["components", "layer_0", "kind"], ["components"], ["format_version"], ["reports"]]


@SETTINGS
@given(st.sampled_from(MUTABLE), json_values | st.sampled_from(["../x", "/etc", "a/../../b", "ok/name", "a//b"]))
def test_manifests_load_or_say_why_and_never_point_outside(path: list[str | int], value: Any) -> None:
    try:
        manifest = Manifest.from_dict(_mutate(_valid_manifest(), path, value))
    except BuildError:
        return
    for name, entry in manifest.components.items():
        for rel in [name, *(f.path for f in entry.files)]:
            parts = PurePosixPath(rel).parts
            assert parts and not PurePosixPath(rel).is_absolute() and ".." not in parts, rel


@SETTINGS
@given(json_values)
def test_random_json_is_a_manifest_error(data: Any) -> None:
    with pytest.raises(BuildError):
        Manifest.from_dict(data)


numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-(2**65), 2**65), st.booleans())


@SETTINGS
@given(steps=numbers, threshold=numbers, temperature=numbers, seed=numbers, max_new_tokens=numbers)
def test_text_options_are_valid_or_refused(**values: Any) -> None:
    try:
        options = TextOptions(**values)
    except InputError:
        return
    assert all(type(getattr(options, f)) is int for f in ("steps", "seed", "max_new_tokens"))
    assert 1 <= options.steps <= options.block_size and 0 <= options.threshold <= 1
    assert math.isfinite(options.temperature) and options.temperature >= 0
    assert 0 <= options.seed < 2**63 and options.max_new_tokens >= 1


@SETTINGS
@given(height=numbers, width=numbers, cfg_scale=numbers, decode_steps=numbers | st.none(),
       decode_mode=st.text(max_size=8) | st.sampled_from(["turbo", "normal"]))
def test_image_options_are_valid_or_refused(**values: Any) -> None:
    try:
        options = T2IOptions(**values)
    except InputError:
        return
    assert type(options.height) is int and type(options.width) is int
    assert options.height % 32 == 0 and options.width % 32 == 0 and options.height > 0 and options.width > 0
    assert math.isfinite(options.cfg_scale) and options.decode_mode in ("turbo", "normal")
    assert options.decode_steps is None or 1 <= options.decode_steps <= 200


@SETTINGS
@given(cfg_text_scale=numbers, cfg_image_scale=numbers, keep_ratio=numbers)
def test_edit_and_sprint_options_are_valid_or_refused(cfg_text_scale: Any, cfg_image_scale: Any,
                                                      keep_ratio: Any) -> None:
    for make in (lambda: EditOptions(cfg_text_scale=cfg_text_scale, cfg_image_scale=cfg_image_scale),
                 lambda: SprintConfig(keep_ratio=keep_ratio)):
        try:
            made = make()
        except LladaEdgeError:
            continue
        values = [getattr(made, f) for f in ("cfg_text_scale", "cfg_image_scale", "keep_ratio") if hasattr(made, f)]
        assert all(math.isfinite(v) for v in values)
