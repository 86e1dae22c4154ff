"""`make bench` in miniature: the report's fields exist and are finite (speed is measured by benchmarks)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_smoke_writes_a_complete_report(tiny_build: Path, tiny_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--smoke", "--build", str(tiny_build),
                          "--checkpoint", str(tiny_ckpt), "--out", str(out), "--workdir", str(tmp_path / "w")],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads((out / "bench.json").read_text())
    assert report["bandwidth"]["read_gbs"] > 0
    backends = [r["backend"] for r in report["tiny"]]
    assert backends == ["torch eager", "onnxruntime fp32"]
    for row in report["tiny"]:
        for key in ("step_ms_median", "step_ms_p90", "tokens_per_forward", "understand_tokens_per_s",
                    "host_fraction", "step_speedup_vs_torch", "peak_rss_bytes"):
            assert math.isfinite(row[key]) and row[key] >= 0, key
        assert {"backbone", "dit", "vae", "total"} <= set(row["t2i_stages_ms"])
    assert (out / "bench.md").read_text().startswith("# llada-edge latency benchmark")
    assert (out / "bench.png").stat().st_size > 1000


def test_gpu_check_without_cuda_exits_0_with_a_note(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():  # pragma: no cover - GPU machines run the real check
        return
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().count("\n") == 0 and "no CUDA device" in res.stdout
    assert json.loads((tmp_path / "gpu_check.json").read_text())["cuda"] is False


def test_gpu_check_in_miniature_on_the_cpu(tmp_path: Path) -> None:
    """The device script's own code, end to end on the tiny preset: every section runs and reports."""
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--out", str(out),
                          "--device", "cpu", "--preset", "tiny", "--layers", "2", "--short-layers", "1",
                          "--context", "64", "--steps", "2", "--rows", "1", "2", "--image-size", "64",
                          "--workdir", str(tmp_path / "w")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["failed_checks"] == []
    assert report["replay_vs_eager"]["tokens_generated"] == 64
    for scaling in ("token", "tensor"):
        assert 0.9 < report["fp8_vs_bf16"][scaling]["logit_cosine"] <= 1.0
    latency = report["step_latency"]
    assert latency["layers"] == [1, 2] and set(latency["variants"]) == {"upstream_eager", "cached_loop_eager", "eager"}
    for per_rows in latency["variants"].values():
        for tokens in ("32", "64"):
            row = per_rows[tokens]
            assert row["2_layers"]["median_ms"] > 0 and math.isfinite(row["extrapolated_20_layers_ms"])
    assert report["decoder"]["turbo_8_steps_s"] > 0 and report["decoder"]["vae_s"] > 0
    assert report["t2i"]["eager_total_s"] > report["t2i"]["eager_backbone_s"] > 0
    assert (out / "gpu_check.md").read_text().startswith("# gpu_check: cpu")


def test_moe_kernel_times_the_layers_qmoe_alone_over_more_and_more_experts(tmp_path: Path) -> None:
    """The QMoE sweep of ``benchmarks/moe_kernel.py`` on a small QMoE graph: the node it times keeps the layer
    node's attributes and weight shapes, and only the expert bytes grow along the sweep."""
    import importlib.util

    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    spec = importlib.util.spec_from_file_location("moe_kernel", ROOT / "benchmarks" / "moe_kernel.py")
    assert spec and spec.loader
    moe_kernel = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(moe_kernel)

    experts, hidden, inner, block = 8, 64, 32, 32
    shapes = {"w1": (experts, 2 * inner, hidden // 2), "s1": (experts, 2 * inner, hidden // block),
              "w2": (experts, hidden, inner // 2), "s2": (experts, hidden, inner // block)}
    weights = [numpy_helper.from_array(np.zeros(shape, np.uint8 if name[0] == "w" else np.float32), name)
               for name, shape in shapes.items()]
    node = helper.make_node("QMoE", ["h", "r", "w1", "s1", "", "w2", "s2"], ["out"], domain="com.microsoft",
                            k=2, block_size=block, expert_weight_bits=4, activation_type="swiglu", swiglu_fusion=1,
                            accuracy_level=4, normalize_routing_weights=0, quant_type="int")
    layer = helper.make_model(helper.make_graph(
        [node], "layer", [helper.make_tensor_value_info("h", TensorProto.FLOAT, [32, hidden]),
                          helper.make_tensor_value_info("r", TensorProto.FLOAT, [32, experts])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], weights),
        opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])

    path, found = moe_kernel.qmoe_alone(layer, 32, tmp_path)
    alone = next(n for n in onnx.load(str(path)).graph.node if n.op_type == "QMoE")
    assert list(alone.attribute) == list(node.attribute) and list(alone.input[2:]) == list(node.input[2:])
    assert found == {"experts": experts, "hidden": hidden, "top_k": 2,
                     "bytes_per_expert": sum(int(np.prod(s[1:])) * (1 if n[0] == "w" else 4)
                                             for n, s in shapes.items())}
    sweep = moe_kernel.qmoe_sweep(layer, threads=1, repeats=2, distinct=(2, 8))
    assert [r["distinct_experts"] for r in sweep] == [2, 8]
    assert sweep[1]["expert_mb"] == 4 * sweep[0]["expert_mb"] and all(r["ms"] > 0 for r in sweep)
