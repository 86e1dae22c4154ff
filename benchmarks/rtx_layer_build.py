"""Real-dimension TensorRT-RTX engines on this CPU: one MoE layer of the ``uni`` preset (layer 1 of a 2-layer
synthetic checkpoint, dense MoE lowering) built at several precisions; per precision the GPU-graph time (ModelOpt
Q/DQ and/or AutoCast), the engine build time, the peak RSS of the whole build, the engine's size next to the bytes
its weights take at that precision, and the census summary.

    python benchmarks/rtx_layer_build.py --workdir /tmp/rtx-uni --out benchmarks/results [--precisions fp16 fp8 int4]

Each precision builds in a fresh process (so its peak RSS is its own). Calibration: this measures build cost, not
accuracy, so the layer's calibration samples are its validation inputs (real shapes: 1-3 rows x 32 tokens against a
64-96 token cache); a backbone-only checkpoint cannot run the shipped calibration requests, which need the image side.
Engines are built for sm89 (one architecture; each more adds about the same again).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CHILD = """
import json, resource, sys, time
from llada_edge.calibration.recipes import parse_overrides
from llada_edge.engines.build import build_engines
start = time.perf_counter()
build_engines(sys.argv[1], "tensorrt-rtx", sys.argv[2], parse_overrides(sys.argv[3:]), sm=["sm89"],
              components=["layer_1"], progress=lambda m: print(m, flush=True))
seconds = time.perf_counter() - start
hwm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
print("RESULT", json.dumps({"seconds": seconds, "peak_rss": max(hwm, children)}))
"""
# Bytes per weight at each precision (int4: 4 bits + one fp16 scale per block of 128).
BYTES_PER_WEIGHT = {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0, "fp8": 1.0, "int4": 0.5 + 2 / 128}


def prepare(workdir: Path) -> Path:
    """A 2-layer backbone-only ``uni`` checkpoint, layer 1 exported (dense lowering), and its calibration samples."""
    from llada_edge.buildfolder import CALIBRATION, Manifest, StepOutput, build_lock, build_step, fingerprint
    from llada_edge.components import Registry
    from llada_edge.export.build import export_build
    from llada_edge.synthetic import synthesize

    ckpt, build = workdir / "uni2", workdir / "uni2-dense"
    if not (ckpt / "config.json").is_file():
        synthesize(ckpt, "uni", layers=2, components=["backbone"], force=True, progress=print)
    export_build(ckpt, build, ["layer_1"], moe="dense", validate=False, progress=print)
    layer = Registry.of_build(build)["layer_1"]
    with build_lock(build, "writing calibration samples"):
        manifest = Manifest.load(build)

        def write(tmp: Path) -> StepOutput:
            cases = [feeds for _label, feeds in layer.validation_cases(np.random.default_rng(0))]
            for i, feeds in enumerate(cases[:3]):  # the block cases (the prefill one has another token count)
                (tmp / "layer_1").mkdir(exist_ok=True)
                np.savez(tmp / "layer_1" / f"{i:03d}.npz", **feeds)  # type: ignore[arg-type]
            return StepOutput({"source": "validation inputs (benchmark)"})

        build_step(build, manifest, CALIBRATION, fingerprint(["benchmark-validation-inputs", 1]), write)
    return build


def layer_weights(build: Path) -> int:
    """The number of weights in layer 1's GEMMs (the bytes an engine stores at each precision)."""
    import onnx

    model = onnx.load(str(build / "onnx" / "layer_1" / "model.onnx"), load_external_data=False)
    return sum(int(np.prod(init.dims)) for init in model.graph.initializer if len(init.dims) == 2)


def recipe_of(spec: str) -> tuple[str, list[str], str]:
    """``int4:int4_method=rtn_dq`` -> ("int4", ["int4_method=rtn_dq"], the recipe's name in the build)."""
    from llada_edge.calibration.recipes import get_recipe, parse_overrides

    precision, *overrides = spec.split(":")
    return precision, overrides, get_recipe(precision, parse_overrides(overrides)).name


def forget(build: Path, precision: str) -> None:
    """Drop this precision's GPU graph and engine of layer 1, so the measurement is a whole build."""
    import shutil

    from llada_edge.buildfolder import Artifact, Manifest, build_lock

    with build_lock(build, "clearing a benchmark's artifacts"):
        manifest = Manifest.load(build)
        for artifact in (Artifact.qdq_graph(precision, "layer_1"), Artifact.trt_engine("tensorrt-rtx", precision,
                                                                                       "layer_1")):
            manifest.components.pop(artifact.entry, None)
            shutil.rmtree(build / artifact.folder, ignore_errors=True)
        manifest.save(build)


def measure(build: Path, spec: str, weights: int) -> dict:
    from llada_edge.buildfolder import Artifact, Manifest

    fmt, overrides, precision = recipe_of(spec)
    forget(build, precision)
    proc = subprocess.run([sys.executable, "-c", CHILD, str(build), fmt, *overrides], capture_output=True, text=True)
    if proc.returncode != 0:
        said = [line for line in (proc.stderr + proc.stdout).splitlines() if "llada-edge" in line or "Error" in line]
        return {"precision": precision, "error": (said or [f"exit code {proc.returncode}"])[-1][:300]}
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    manifest = Manifest.load(build)
    engine = manifest.components[Artifact.trt_engine("tensorrt-rtx", precision, "layer_1").entry]
    graph = manifest.components.get(Artifact.qdq_graph(precision, "layer_1").entry)
    expected = weights * BYTES_PER_WEIGHT[fmt]
    return {"precision": precision, "total_s": round(result["seconds"], 1),
            "gpu_graph_s": graph.meta["seconds"] if graph else 0.0, "engine_s": engine.meta["seconds"],
            "peak_rss_gb": round(result["peak_rss"] / 1e9, 2), "engine_mb": round(engine.files[0].size / 1e6, 1),
            "weights_at_precision_mb": round(expected / 1e6, 1),
            "engine_vs_weights": round(engine.files[0].size / expected, 3), "census": engine.meta["census"]["summary"]}


def write(out: Path, report: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "rtx_layer_build.json").write_text(json.dumps(report, indent=1))
    lines = ["# TensorRT-RTX engines of one real-dimension MoE layer (uni preset, layer 1, dense lowering)", "",
             f"{report['weights'] / 1e6:.0f} M GEMM weights; built for sm89 on this CPU (no GPU); "
             f"`python benchmarks/rtx_layer_build.py`.", "",
             "| precision | GPU graph s | engine build s | total s | peak RSS GB | engine MB | weights at precision MB "
             "| engine / weights | GEMM weights (census) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        if "error" in r:
            lines.append(f"| {r['precision']} | failed: {r['error']} |||||||")
            continue
        census = ", ".join(f"{k} x{n}" for k, n in sorted(r["census"].items()))
        lines.append(f"| {r['precision']} | {r['gpu_graph_s']} | {r['engine_s']} | {r['total_s']} | {r['peak_rss_gb']} "
                     f"| {r['engine_mb']} | {r['weights_at_precision_mb']} | {r['engine_vs_weights']} | {census} |")
    (out / "rtx_layer_build.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/rtx-uni"), help="checkpoint and build (reused)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--precisions", nargs="+", default=["fp16", "fp8", "int4:int4_method=rtn_dq", "int4"],
                        help="recipes, each with optional :KIND=FORMAT / :int4_method=... overrides")
    args = parser.parse_args()
    start = time.perf_counter()
    build = prepare(args.workdir)
    weights = layer_weights(build)
    rows = []
    for precision in args.precisions:
        rows.append(measure(build, precision, weights))
        print(rows[-1], flush=True)
    write(args.out, {"weights": weights, "rows": rows, "seconds": round(time.perf_counter() - start, 1),
                     "self_peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6})


if __name__ == "__main__":
    main()
