"""Saved validation data must load with Polygraphy's own loaders, so the CLI can replay a CPU check on TRT."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from llada_edge.export import io as vio

polygraphy_json = pytest.importorskip("polygraphy.json")
comparator = pytest.importorskip("polygraphy.comparator")


def _feeds() -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [
        {
            "input_ids": rng.integers(0, 1000, size=(1, 7), dtype=np.int64),
            "/model/hidden.0": rng.standard_normal((1, 7, 5)).astype(np.float32),
            "mask": rng.random((1, 7)) > 0.5,
            "half": rng.standard_normal((3,)).astype(np.float16),
            "scalar": np.array(3.5, dtype=np.float64),
        }
        for _ in range(2)
    ]


def _assert_same(got: list[dict[str, np.ndarray]], want: list[dict[str, np.ndarray]]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert list(g) == list(w)  # order matters: Polygraphy matches inputs by name, then position
        for name in w:
            assert g[name].dtype == w[name].dtype, name
            assert g[name].shape == w[name].shape, name
            np.testing.assert_array_equal(g[name], w[name])


def test_inputs_load_with_polygraphy(tmp_path: Path) -> None:
    feeds = _feeds()
    path = vio.save_inputs(tmp_path / "inputs.json", feeds)
    # The loader behind `polygraphy run --load-inputs`.
    _assert_same([dict(f) for f in comparator.StreamingDataLoader([str(path)])], feeds)
    _assert_same([dict(f) for f in polygraphy_json.load_json(str(path))], feeds)
    assert not (tmp_path / "inputs.json.tmp").exists()


def test_outputs_load_with_polygraphy(tmp_path: Path) -> None:
    outputs = [{k: v for k, v in f.items() if k != "input_ids"} for f in _feeds()]
    path = vio.save_outputs(tmp_path / "outputs.json", outputs, runner_name="torch-reference")
    results = comparator.RunResults.load(str(path))
    assert list(results.keys()) == ["torch-reference"]
    _assert_same([dict(it.items()) for it in results["torch-reference"]], outputs)
    assert all(it.runner_name == "torch-reference" for it in results["torch-reference"])
    # The loader behind `polygraphy run --load-outputs` (streaming mode).
    streamed = [dict(run["torch-reference"][0].items()) for run in comparator.RunResults.load_streaming(str(path))]
    _assert_same(streamed, outputs)


def test_round_trip(tmp_path: Path) -> None:
    feeds = _feeds()
    vio.save_inputs(tmp_path / "in.json", feeds)
    vio.save_outputs(tmp_path / "out.json", feeds, runner_name="ref")
    _assert_same(vio.load_inputs(tmp_path / "in.json"), feeds)
    _assert_same(vio.load_outputs(tmp_path / "out.json"), feeds)
    _assert_same(vio.load_outputs(tmp_path / "out.json", runner_name="ref"), feeds)
    with pytest.raises(KeyError, match="no results for runner"):
        vio.load_outputs(tmp_path / "out.json", runner_name="trt")


def test_npz_twin(tmp_path: Path) -> None:
    feeds = _feeds()
    vio.save_inputs(tmp_path / "inputs.json", feeds)
    npz = vio.npz_path_for(tmp_path / "inputs.json")
    assert npz == tmp_path / "inputs.npz" and npz.is_file()
    with np.load(npz) as data:
        np.testing.assert_array_equal(data["1//model/hidden.0"], feeds[1]["/model/hidden.0"])
    _assert_same(vio.load_inputs(npz), feeds)


def test_polygraphy_saved_inputs_load_back(tmp_path: Path) -> None:
    """A file written by Polygraphy itself (``--save-inputs``) also reads back."""
    feeds = _feeds()
    polygraphy_json.save_json(feeds, str(tmp_path / "poly.json"))
    _assert_same(vio.load_inputs(tmp_path / "poly.json"), feeds)


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"expected a \.json file name"):
        vio.save_inputs(tmp_path / "inputs", _feeds())
    with pytest.raises(TypeError, match="list of dicts"):
        vio.save_inputs(tmp_path / "a.json", _feeds()[0])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least one iteration"):
        vio.save_outputs(tmp_path / "a.json", [])
    with pytest.raises(TypeError, match="object arrays"):
        vio.save_inputs(tmp_path / "a.json", [{"x": np.array([object()])}])
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------- CLI end to end


def _tiny_model(path: Path) -> None:
    """y = x * w + b, with an int64 side output, as a plain ONNX file (opset 17, ORT-friendly)."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.linspace(-1, 1, 4, dtype=np.float32), "w")
    b = numpy_helper.from_array(np.full(4, 0.25, dtype=np.float32), "b")
    nodes = [
        helper.make_node("Mul", ["x", "w"], ["xw"]),
        helper.make_node("Add", ["xw", "b"], ["y"]),
        helper.make_node("ArgMax", ["y"], ["idx"], axis=1, keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4]),
            helper.make_tensor_value_info("idx", TensorProto.INT64, [2]),
        ],
        initializer=[w, b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _polygraphy_cli() -> Path:
    cli = Path(sys.executable).parent / "polygraphy"
    if not cli.is_file():
        pytest.skip(f"polygraphy CLI not found next to {sys.executable}")
    pytest.importorskip("onnxruntime", reason="polygraphy --onnxrt needs onnxruntime")
    probe = subprocess.run([str(cli), "run", "-h"], capture_output=True, text=True, timeout=120)
    if probe.returncode != 0:
        pytest.skip(f"polygraphy CLI cannot run here: {probe.stderr.strip()[-300:]}")
    return cli


def _run_cli(cli: Path, model: Path, inputs: Path, outputs: Path) -> subprocess.CompletedProcess[str]:
    cmd = [str(cli), "run", str(model), "--onnxrt", "--load-inputs", str(inputs), "--load-outputs", str(outputs)]
    env = {**os.environ, "POLYGRAPHY_AUTOINSTALL_DEPS": "0"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def test_polygraphy_cli_replays_the_check(tmp_path: Path) -> None:
    cli = _polygraphy_cli()
    model = tmp_path / "tiny.onnx"
    _tiny_model(model)
    rng = np.random.default_rng(1)
    feeds = [{"x": rng.standard_normal((2, 4)).astype(np.float32)} for _ in range(3)]
    w, b = np.linspace(-1, 1, 4, dtype=np.float32), np.full(4, 0.25, dtype=np.float32)
    expected = [{"y": f["x"] * w + b, "idx": np.argmax(f["x"] * w + b, axis=1)} for f in feeds]

    inputs = vio.save_inputs(tmp_path / "inputs.json", feeds)
    good = vio.save_outputs(tmp_path / "good.json", expected)
    ok = _run_cli(cli, model, inputs, good)
    assert ok.returncode == 0, ok.stdout[-3000:] + ok.stderr[-3000:]
    assert "vs. torch-reference | Passed: 3/3 iterations" in ok.stdout + ok.stderr

    bad_outputs = [{"y": e["y"] + np.float32(0.01), "idx": e["idx"]} for e in expected]
    bad = vio.save_outputs(tmp_path / "bad.json", bad_outputs)
    failed = _run_cli(cli, model, inputs, bad)
    assert failed.returncode != 0, failed.stdout[-3000:]
    assert "vs. torch-reference | Passed: 0/3 iterations" in failed.stdout + failed.stderr  # a mismatch, not a crash
    assert json.loads(bad.read_text())["polygraphy_class"] == "RunResults"
