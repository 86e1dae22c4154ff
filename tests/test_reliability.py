"""The defects a bad-input and fault probe found (issue 10), one section per finding, each kept as a reproduction.

Every case ends in exit code 2 and one line naming the file (and key) or the option, or in success; never a
traceback, never a write or read outside the folder it was given.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from llada_edge.cli import main


def _err(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    return err


def _one_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = _err(capsys)
    assert len(err.splitlines()) == 1, err
    return err


@pytest.fixture(scope="module")
def small_build(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two layers and SigVQ exported (no validation): small enough to copy for every test."""
    from llada_edge.export.build import export_build

    out = tmp_path_factory.mktemp("reliability") / "b"
    export_build(tiny_ckpt, out, ["layer_0", "layer_1", "sigvq"], moe="ort", validate=False, progress=lambda _m: None)
    return out


@pytest.fixture
def build(small_build: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "b"
    shutil.copytree(small_build, dst)
    return dst


def _manifest(build: Path) -> dict:
    return json.loads((build / "manifest.json").read_text())


def _save_manifest(build: Path, data: dict) -> None:
    (build / "manifest.json").write_text(json.dumps(data))


def _flip_byte(path: Path, at: int = 100) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0xFF]))


def _rewrite_header(shard: Path, change) -> None:
    """Rewrite a safetensors file's JSON header through ``change(header)``, keeping the data bytes."""
    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    change(header)
    text = json.dumps(header).encode()
    shard.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])


def _backbone_shard(ckpt: Path, key: str) -> Path:
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    return ckpt / index[key]


# ------------------------------------------------------------------------- 1: nothing outside the build folder


def test_1_build_never_writes_outside_the_build_folder(build: Path, tmp_path: Path, capsys) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    data = _manifest(build)
    entry = json.loads(json.dumps(data["components"]["layer_0"]))
    entry["name"] = "../victim"
    data["components"]["../victim"] = entry
    _save_manifest(build, data)
    assert main(["build", "--build", str(build), "--target", "onnxruntime", "--precision", "int8",
                 "--no-report"]) == 2
    assert "escapes the build folder" in _one_line(capsys)
    assert [p.name for p in victim.iterdir()] == ["precious.txt"]


# -------------------------------------------------------------------------- 2: nothing tampered is re-signed


def test_2_build_refuses_a_tampered_source(build: Path, capsys) -> None:
    _flip_byte(build / "onnx" / "layer_1" / "model.onnx.data")
    assert main(["build", "--build", str(build), "--target", "onnxruntime", "--precision", "int8",
                 "--no-report"]) == 2
    err = _one_line(capsys)
    assert "sha256 mismatch" in err and "layer_1" in err
    assert not any(name.startswith("onnxruntime/int8/") for name in _manifest(build)["components"])


# ------------------------------------------------------------------- 3: safetensors offsets as the format says


@pytest.mark.parametrize("change, reason", [
    (lambda e: e.update(data_offsets=[-4, e["data_offsets"][1]]), "not two non-negative integers"),
    (lambda e: e.update(data_offsets=[0, e["data_offsets"][1] - e["data_offsets"][0]]), "overlaps"),
    (lambda e: e.update(shape="abc"), "not a list of non-negative integers"),
    (lambda e: e.update(data_offsets=[float(o) for o in e["data_offsets"]]), "not two non-negative integers"),
])
def test_3_invalid_offsets_and_shapes_are_refused(tiny_copy: Path, capsys, change, reason: str) -> None:
    key = "model.layers.0.attention.dense.weight"
    shard = _backbone_shard(tiny_copy, key)

    def edit(header: dict) -> None:
        # the last tensor of the shard by offset, so that an entry moved to 0 overlaps another one
        last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
        change(header[last] if reason == "overlaps" else header[key])

    _rewrite_header(shard, edit)
    assert main(["inspect", str(tiny_copy)]) == 2
    err = _one_line(capsys)
    assert reason in err and shard.name in err


# ---------------------------------------------------------------------------------- 4: one writer per folder


def _hold_lock(build: Path) -> subprocess.Popen:
    script = textwrap.dedent(f"""
        import sys, time
        from llada_edge.buildfolder import build_lock
        with build_lock({str(build)!r}):
            print("locked", flush=True)
            time.sleep(60)
    """)
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
    return holder


def test_4_a_second_writer_or_a_reader_is_refused_while_one_writes(build: Path, tiny_ckpt: Path, capsys) -> None:
    holder = _hold_lock(build)
    try:
        assert main(["export", "--checkpoint", str(tiny_ckpt), "--out", str(build), "--components", "embed"]) == 2
        assert f"in use by PID {holder.pid}" in _one_line(capsys)
        assert main(["run", "chat", "--model", str(build), "--prompt", "hi"]) == 2
        assert f"being written by PID {holder.pid}" in _one_line(capsys)
    finally:
        holder.kill()
        holder.wait()
    assert "embed" not in _manifest(build)["components"]


# ------------------------------------------------------------------ 5: every loaded file listed and checked


def test_5_an_entry_without_files_is_refused(build: Path, capsys) -> None:
    data = _manifest(build)
    data["components"]["layer_1"]["files"] = []
    _save_manifest(build, data)
    assert main(["run", "chat", "--model", str(build), "--prompt", "hi"]) == 2
    assert "must list its files" in _one_line(capsys)


def test_5_a_linked_or_unlisted_file_in_a_graph_folder_is_refused(build: Path, tmp_path: Path, capsys) -> None:
    data_file = build / "onnx" / "layer_1" / "model.onnx.data"
    outside = tmp_path / "outside.data"
    shutil.copy(data_file, outside)
    data_file.unlink()
    data_file.symlink_to(outside)  # same bytes, same hash: only the link itself is wrong
    assert main(["run", "chat", "--model", str(build), "--prompt", "hi"]) == 2
    assert "not a regular file" in _one_line(capsys)
    data_file.unlink()
    shutil.copy(outside, data_file)
    (build / "onnx" / "layer_1" / "extra.onnx.data").write_bytes(b"x")
    assert main(["run", "chat", "--model", str(build), "--prompt", "hi"]) == 2
    assert "not listed in manifest.json" in _one_line(capsys)


# ---------------------------------------------------------------------------------- 6: up-to-date checks


def test_6_a_same_size_corruption_is_rebuilt_by_a_rerun(build: Path, tiny_ckpt: Path) -> None:
    from llada_edge.buildfolder import Manifest
    from llada_edge.export.build import export_build

    _flip_byte(build / "onnx" / "layer_0" / "model.onnx.data")
    log: list[str] = []
    export_build(tiny_ckpt, build, ["layer_0", "layer_1"], moe="ort", validate=False, progress=log.append)
    assert "up to date" not in log[0] and log[1].endswith("layer_1: up to date")
    Manifest.load(build).verify(build)  # what the runtime checks passes again


def test_6_a_copied_checkpoint_is_up_to_date(build: Path, tiny_ckpt: Path, tmp_path: Path) -> None:
    from llada_edge.export.build import export_build

    copy = tmp_path / "copied-ckpt"
    shutil.copytree(tiny_ckpt, copy, copy_function=shutil.copy)  # new paths, new mtimes, same bytes
    log: list[str] = []
    export_build(copy, build, ["layer_0", "layer_1", "sigvq"], moe="ort", validate=False, progress=log.append)
    assert len(log) == 3 and all(line.endswith("up to date") for line in log), log


# ---------------------------------------------------------------- 7: one line where a traceback used to be


def test_7_deeply_nested_json_is_a_clear_error(tiny_copy: Path, build: Path, capsys) -> None:
    (tiny_copy / "config.json").write_text("[" * 200_000 + "]" * 200_000)
    assert main(["inspect", str(tiny_copy)]) == 2
    assert "nested too deeply" in _one_line(capsys)
    (build / "manifest.json").write_text("{\"a\":" * 100_000 + "1" + "}" * 100_000)
    assert main(["run", "chat", "--model", str(build), "--prompt", "hi"]) == 2
    assert "nested too deeply" in _one_line(capsys)


@pytest.mark.parametrize("argv, reason", [
    (["run", "chat", "--prompt", "caf\udcc3"], "not valid UTF-8"),
    (["run", "t2i", "--prompt", "x", "--seed", "-1"], "seed must be"),
    (["run", "t2i", "--prompt", "x", "--out", "/nonexistent-folder/x.png"], "does not exist"),
    (["run", "t2i", "--prompt", "x", "--out", "out.gif.unknown"], "unknown image format"),
])
def test_7_bad_requests_fail_before_generating(tiny_ckpt: Path, capsys, argv: list[str], reason: str) -> None:
    assert main([*argv, "--model", str(tiny_ckpt)]) == 2
    assert reason in _one_line(capsys)


def test_7_an_output_that_is_a_folder_fails_first_and_leaves_nothing(tiny_ckpt: Path, tmp_path: Path,
                                                                      capsys) -> None:
    target = tmp_path / "adir.png"
    target.mkdir()
    assert main(["run", "t2i", "--model", str(tiny_ckpt), "--prompt", "x", "--out", str(target)]) == 2
    assert "is a folder" in _one_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir.png"]


def test_7_a_full_disk_and_an_internal_error_are_one_line(tiny_ckpt: Path, tmp_path: Path, capsys,
                                                          monkeypatch) -> None:
    from llada_edge.export import build as export_module

    def full_disk(*_args, **_kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "b" / "onnx"))

    monkeypatch.setattr(export_module, "export_onnx", full_disk)
    assert main(["export", "--checkpoint", str(tiny_ckpt), "--out", str(tmp_path / "b"), "--components",
                 "sigvq"]) == 2
    assert "No space left on device" in _one_line(capsys)
    assert not list((tmp_path / "b").rglob("*.partial"))

    def bug(*_args, **_kwargs):
        raise ValueError("an invariant broke")

    monkeypatch.setattr(export_module, "export_onnx", bug)
    assert main(["export", "--checkpoint", str(tiny_ckpt), "--out", str(tmp_path / "c"), "--components",
                 "sigvq"]) == 1
    err = _one_line(capsys)
    assert "internal error: ValueError: an invariant broke" in err and "--debug" in err
    with pytest.raises(ValueError, match="invariant"):
        main(["--debug", "export", "--checkpoint", str(tiny_ckpt), "--out", str(tmp_path / "d"), "--components",
              "sigvq"])


# ------------------------------------------------------------------------------------ 8: resource bounds


def test_8_a_huge_layer_count_is_refused_at_once(tiny_copy: Path, capsys) -> None:
    config = json.loads((tiny_copy / "config.json").read_text())
    config["num_hidden_layers"] = 1_000_000_000_000
    (tiny_copy / "config.json").write_text(json.dumps(config))
    assert main(["inspect", str(tiny_copy)]) == 2
    err = _one_line(capsys)
    assert "num_hidden_layers" in err and "<= 1024" in err


def test_8_a_huge_image_is_refused_before_decoding(tiny_ckpt: Path, tmp_path: Path, capsys) -> None:
    path = tmp_path / "huge.png"
    Image.new("1", (12000, 12000)).save(path)  # a small file declaring 144 Mpx
    assert path.stat().st_size < 1_000_000
    assert main(["run", "understand", "--model", str(tiny_ckpt), "--image", str(path), "--prompt", "what?"]) == 2
    assert "larger than the limit" in _one_line(capsys)


@pytest.mark.parametrize("flags, reason", [
    (["--decode-steps", "100000"], "decode_steps must be"),
    (["--threshold", "nan"], "threshold must be a finite number"),
    (["--threshold", "-1"], "threshold must be in [0, 1]"),
    (["--threshold", "2"], "threshold must be in [0, 1]"),
    (["--temperature", "nan"], "temperature must be a finite number"),
    (["--temperature", "inf"], "temperature must be a finite number"),
    (["--cfg-scale", "nan"], "cfg_scale must be a finite number"),
    (["--cfg-scale", "inf"], "cfg_scale must be a finite number"),
])
def test_8_request_parameters_are_range_checked(tiny_ckpt: Path, capsys, flags: list[str], reason: str) -> None:
    assert main(["run", "t2i", "--model", str(tiny_ckpt), "--prompt", "x", *flags]) == 2
    assert reason in _one_line(capsys)


def test_8_nan_weights_are_named_as_the_cause(tiny_copy: Path, tmp_path: Path, capsys) -> None:
    key = "model.norm.weight"
    shard = _backbone_shard(tiny_copy, key)
    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    begin, end = json.loads(raw[8:8 + n])[key]["data_offsets"]
    start = 8 + n + begin
    nan = np.full((end - begin) // 2, 0x7FC0, np.uint16).tobytes()  # bf16 NaN
    shard.write_bytes(raw[:start] + nan + raw[start + len(nan):])
    assert main(["run", "t2i", "--model", str(tiny_copy), "--prompt", "x", "--height", "64", "--width", "64",
                 "--steps", "2", "--out", str(tmp_path / "x.png")]) == 2
    assert "non-finite scores" in _one_line(capsys)


# ----------------------------------------------------------------------------------------------- 9: smaller


def test_9_one_pipeline_serves_four_threads_like_serial_runs(tiny_build: Path) -> None:
    from llada_edge.runtime import Pipeline

    pipe = Pipeline.load(tiny_build)
    serial = [pipe.generate_image("a boat", 64, 64, steps=4, seed=s).vq_tokens for s in range(4)]
    results: dict[int, list[int]] = {}

    def worker(seed: int) -> None:
        results[seed] = pipe.generate_image("a boat", 64, 64, steps=4, seed=seed).vq_tokens

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[s] for s in range(4)] == serial


def test_9_index_shards_stay_in_the_checkpoint(tiny_copy: Path, capsys) -> None:
    index_path = tiny_copy / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    key = next(iter(index["weight_map"]))
    index["weight_map"][key] = "../../etc/passwd"
    index_path.write_text(json.dumps(index))
    assert main(["inspect", str(tiny_copy)]) == 2
    err = _one_line(capsys)
    assert "is not a file of the checkpoint folder" in err and key in err


def test_9_synth_force_replaces_only_a_checkpoint(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "todo.txt").write_text("mine")
    assert main(["synth", "--preset", "tiny", "--force", "--out", str(folder)]) == 2
    assert "not a checkpoint folder" in _one_line(capsys)
    assert (folder / "todo.txt").read_text() == "mine"


def test_9_the_output_suffix_picks_the_format(tiny_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "x.jpg"
    assert main(["run", "t2i", "--model", str(tiny_ckpt), "--prompt", "x", "--height", "64", "--width", "64",
                 "--steps", "2", "--out", str(out), "--quiet"]) == 0
    assert out.read_bytes()[:2] == b"\xff\xd8"  # JPEG, not PNG bytes under a .jpg name


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_9_a_manifest_that_is_not_a_file_is_named(build: Path, capsys) -> None:
    (build / "manifest.json").unlink()
    os.mkfifo(build / "manifest.json")  # never opened: reading it would block
    assert main(["run", "chat", "--model", str(build), "--prompt", "hi"]) == 2
    assert "manifest.json is not a regular file" in _one_line(capsys)


def test_limits_are_stated_in_help(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "40,000,000 pixels" in text and "decoder steps up to 200" in text
