"""The TensorRT path on a CPU machine: calibration capture, ModelOpt Q/DQ graphs that pass the TensorRT
allow-list and run (as fake quantization) on ONNX Runtime; the builder itself needs TensorRT."""

from __future__ import annotations

import importlib.util
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from llada_edge.buildfolder import Manifest
from llada_edge.calibration.recipes import RECIPES
from llada_edge.cli import main
from llada_edge.components import Registry
from llada_edge.engines.build import ensure_gpu_graphs
from llada_edge.export.allowlist import check_tensorrt_compatible

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None
HAVE_MODELOPT = importlib.util.find_spec("modelopt") is not None


@pytest.fixture(scope="module")
def dense_build(tiny_build: Path, tmp_path_factory) -> Path:
    """A private copy of the dense (TensorRT-bound) build: Q/DQ graphs and calibration get added to it."""
    dst = tmp_path_factory.mktemp("trt") / "b"
    shutil.copytree(tiny_build, dst, ignore=shutil.ignore_patterns("polygraphy"))
    return dst


def test_calibration_capture_covers_rows_ratios_and_experts(dense_build: Path) -> None:
    assert main(["calibrate", "--build", str(dense_build), "--max-samples", "48"]) == 0
    calib = dense_build / "calibration"
    layer = np.load(calib / "layer_1.npz")
    n = layer["hidden"].shape[0]
    assert n == 48 and layer["attn_mask"].shape[:2] == (n, 32)
    cache = layer["past_k"].shape[2]
    invalid_keys = (~layer["attn_mask"][:, 0, :cache]).sum(axis=1)
    assert invalid_keys.min() != invalid_keys.max()  # rows with different pads / cache lengths
    assert len(set(map(int, layer["positions"][:, 0]))) > 5  # many blocks of many requests
    coverage = __import__("json").loads((calib / "expert_coverage.json").read_text())
    assert set(coverage["layers"]) == {"layer_1", "layer_2"}
    assert all(len(v["tokens_per_expert"]) == 16 and v["max"] > 0 for v in coverage["layers"].values())
    assert "fallback" in coverage
    assert (calib / "dit_turbo").is_dir() and (calib / "vision_tokenizer").is_dir()


@pytest.mark.skipif(not HAVE_MODELOPT, reason="nvidia-modelopt is not installed (pip install 'llada-edge[quant]')")
@pytest.mark.parametrize("precision", ["fp8", "int8", "mixed"])
def test_qdq_graphs_pass_the_allowlist_and_run(dense_build: Path, precision: str, measure) -> None:
    manifest = Manifest.load(dense_build)
    # fp32 graphs (the feeds below are fp32); the text head unquantized, as gpu_recipe keeps it on a GPU.
    recipe = replace(RECIPES[precision], lm_head="fp32")
    sources = ensure_gpu_graphs(dense_build, manifest, recipe, progress=lambda _m: None)
    quantized = {n: p for n, p in sources.items() if "quant" in p.parts}
    assert {"layer_1", "dit_turbo", "vision_tokenizer"} <= set(quantized)
    cfg = __import__("llada_edge.config", fromlist=["ModelConfig"]).ModelConfig.from_folder(dense_build / "model")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    for name in ("layer_1", "dit_turbo"):
        path = quantized[name] / "model.onnx"
        assert check_tensorrt_compatible(path) == [], name
        _, feed = Registry(cfg)[name].validation_cases(np.random.default_rng(0))[0]
        ref = ort.InferenceSession(str(dense_build / "onnx" / name / "model.onnx"), opts).run(None, feed)[0]
        got = ort.InferenceSession(str(path), opts).run(None, feed)[0]
        cosine = float((ref * got).sum() / np.linalg.norm(ref) / np.linalg.norm(got))
        measure(f"qdq_{precision}_{name}_cosine_vs_fp32", cosine)
        assert cosine > 0.97, (name, cosine)
        ops = {n.op_type for n in __import__("onnx").load(str(path), load_external_data=False).graph.node}
        assert "DequantizeLinear" in ops  # the precision lives in the graph (strongly typed TensorRT)


@pytest.mark.skipif(HAVE_TRT, reason="TensorRT is installed: the install-hint path does not apply")
def test_tensorrt_target_without_tensorrt_exits_2(dense_build: Path, capsys) -> None:
    assert main(["build", "--build", str(dense_build), "--target", "tensorrt", "--precision", "fp8"]) == 2
    assert "TensorRT is not installed" in capsys.readouterr().err


@pytest.mark.skipif(not HAVE_TRT, reason="TensorRT is not installed (NVIDIA's index; GPU machines only)")
def test_tensorrt_engines_build(dense_build: Path) -> None:  # pragma: no cover - GPU machines only
    from llada_edge.engines.build import build_engines

    manifest = build_engines(dense_build, "tensorrt", "fp8", progress=lambda _m: None)
    plans = [e for n, e in manifest.components.items() if n.startswith("tensorrt/fp8/")]
    assert plans and all(f.path.endswith(".plan") for e in plans for f in e.files)
