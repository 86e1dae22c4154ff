"""The accuracy report of the GPU graphs (ModelOpt Q/DQ in fp16, what TensorRT engines are built from), run on ONNX
Runtime's CPU provider, on the trained tiny checkpoint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from llada_edge.cli import main
from llada_edge.engines.accuracy import accuracy_report
from llada_edge.engines.build import quantize_build
from llada_edge.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend


@pytest.fixture(scope="module")
def trained_build_dense(tiny_trained_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from llada_edge.export.build import export_build

    out = tmp_path_factory.mktemp("build-dense") / "tiny-trained"
    export_build(tiny_trained_ckpt, out, moe="dense", validate=False, progress=lambda _m: None)
    assert main(["calibrate", "--build", str(out), "--max-samples", "16"]) == 0
    return out


def test_fp8_gpu_graphs_pass_their_report(trained_build_dense: Path, measure) -> None:
    quantize_build(trained_build_dense, "fp8", progress=lambda _m: None)
    backend = OnnxRuntimeBackend(trained_build_dense, "fp8", graphs="gpu")
    assert backend.float_dtype == np.float16  # the half graphs' own type: buffers and KV cache follow it
    report = accuracy_report(trained_build_dense, "fp8", progress=lambda _m: None, graphs="gpu")
    metrics = report["metrics"]
    for name in ("top1_agreement", "perplexity_ratio", "expert_agreement", "decode_psnr_db"):
        assert np.isfinite(metrics[name]), name
        measure(f"accuracy_gpu_fp8_{name}", metrics[name])
    assert {"expert_agreement_layer_1", "expert_agreement_layer_2"} <= set(metrics)  # the dense lowering's probes
    assert report["passed"], report["thresholds"]
    assert (trained_build_dense / "reports" / "accuracy-gpu-fp8.md").is_file()


def test_report_cli_says_which_graphs_are_missing(trained_build_dense: Path, capsys) -> None:
    assert main(["report", "--build", str(trained_build_dense), "--precision", "int4", "--graphs", "gpu"]) == 2
    assert "no int4 GPU graphs in this build" in capsys.readouterr().err
