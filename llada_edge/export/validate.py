"""Numeric validation of exported graphs: ONNX Runtime CPU (fp32) against the PyTorch reference module.

Each component runs on several inputs (:func:`validation_cases`: CFG and editing row layouts, prefill,
several resolutions); the max abs and relative errors per output go to ``BUILD/reports`` and the
manifest, and the inputs and reference outputs are saved in Polygraphy's format so the very same
comparison can be rerun against a TensorRT engine on a GPU machine::

    polygraphy run BUILD/onnx/layer_3/model.onnx --trt \\
        --load-inputs BUILD/reports/polygraphy/layer_3.inputs.json \\
        --load-outputs BUILD/reports/polygraphy/layer_3.outputs.json --atol 1e-3 --rtol 1e-3
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from llada_edge.buildfolder import atomic_write_bytes
from llada_edge.components import Case
from llada_edge.export.io import save_inputs, save_outputs

# fp32 ONNX vs fp32 torch: only reassociation differs. Relative error = max |diff| / max |reference|.
RELATIVE_TOLERANCE = 1e-4
# Integer outputs (VQ ids from an argmax) must be identical.


def run_reference(module: nn.Module, feeds: dict[str, np.ndarray], output_names: list[str]) -> dict[str, np.ndarray]:
    with torch.inference_mode():  # copies: feeds may be read-only (shared RoPE tables)
        out = module(*(torch.from_numpy(np.array(v, order="C")) for v in feeds.values()))
    out = out if isinstance(out, tuple) else (out,)
    return {name: t.detach().cpu().numpy() for name, t in zip(output_names, out, strict=True)}


def compare(reference: dict[str, np.ndarray], actual: dict[str, np.ndarray],
            tolerances: dict[str, float] | None = None) -> dict[str, dict[str, float]]:
    """Per output: Polygraphy's comparator decides (``passed``), with every element within ``RELATIVE_TOLERANCE``
    (or the output's entry in ``tolerances``) x max|reference| (integer ids: exactly equal); the statistics are
    what the reports show (relative to max|reference|, whatever the tolerance)."""
    tolerances = tolerances or {}
    from polygraphy.comparator import IterationResult
    from polygraphy.comparator.compare import SimpleCompareFunc
    from polygraphy.logger import G_LOGGER

    stats: dict[str, dict[str, float]] = {}
    atol: dict[str, float] = {}
    for name, ref in reference.items():
        got = actual[name]
        if ref.shape != got.shape:
            stats[name] = {"shape_mismatch": 1.0, "passed": False}
        elif np.issubdtype(ref.dtype, np.integer):
            stats[name] = {"mismatch_fraction": float((ref != got).mean()) if ref.size else 0.0}
            atol[name] = 0.0
        else:
            atol[name] = tolerances.get(name, RELATIVE_TOLERANCE) * (float(np.abs(ref).max()) if ref.size else 0.0)
    judge = SimpleCompareFunc(atol=atol, rtol=0.0, check_error_stat="elemwise")
    with G_LOGGER.verbosity(G_LOGGER.CRITICAL):
        verdicts = judge(  # Polygraphy views arrays in place: it needs them contiguous
            IterationResult({n: np.ascontiguousarray(reference[n]) for n in atol}, runner_name="torch-reference"),
            IterationResult({n: np.ascontiguousarray(actual[n]) for n in atol}, runner_name="onnxruntime"))
    for name, verdict in verdicts.items():
        if name not in stats:  # a float output
            scale = atol[name] / tolerances.get(name, RELATIVE_TOLERANCE)
            max_abs = float(verdict.max_absdiff)
            stats[name] = {"max_abs": max_abs, "max_rel": max_abs / scale if scale else max_abs}
        stats[name]["passed"] = bool(verdict)
    return stats


def passed(stats: dict[str, dict[str, float]]) -> bool:
    return all(bool(s["passed"]) for s in stats.values())


def reference_outputs(module: nn.Module, cases: list[Case], output_names: list[str]) -> list[dict[str, np.ndarray]]:
    """The reference side of the comparison, computed first so the module can be freed before ORT loads."""
    return [run_reference(module, feed, output_names) for _, feed in cases]


def validate_component(name: str, onnx_path: Path, cases: list[Case], references: list[dict[str, np.ndarray]],
                       output_names: list[str], reports_dir: Path,
                       tolerances: dict[str, float] | None = None) -> dict:
    """Run every case through ORT and compare with the references; save Polygraphy files; summarise."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.enable_cpu_mem_arena = False  # give the memory back when the session closes (bounded export memory)
    session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    results: list[dict[str, Any]] = []
    feeds: list[dict[str, np.ndarray]] = []
    for (label, feed), ref in zip(cases, references, strict=True):
        got = dict(zip(output_names, session.run(output_names, feed), strict=True))
        stats = compare(ref, got, tolerances)
        results.append({"case": label, "outputs": stats, "passed": passed(stats)})
        feeds.append(feed)
    del session
    poly = reports_dir / "polygraphy"
    poly.mkdir(parents=True, exist_ok=True)
    save_inputs(poly / f"{name}.inputs.json", feeds)
    save_outputs(poly / f"{name}.outputs.json", references)
    worst = {"max_abs": 0.0, "max_rel": 0.0, "mismatch_fraction": 0.0}
    for r in results:
        for st in r["outputs"].values():
            for key in worst:
                worst[key] = max(worst[key], st.get(key, 0.0))
    return {"passed": all(r["passed"] for r in results), "tolerance_rel": RELATIVE_TOLERANCE,
            "output_tolerances_rel": dict(tolerances or {}), **worst,
            "cases": results, "polygraphy": {"inputs": f"reports/polygraphy/{name}.inputs.json",
                                             "outputs": f"reports/polygraphy/{name}.outputs.json"}}


def write_reports(reports_dir: Path, validation: dict[str, dict]) -> None:
    """``validation.json`` and a Markdown table, one row per component."""
    import json

    text = json.dumps(validation, indent=2, sort_keys=True) + "\n"
    atomic_write_bytes(reports_dir / "validation.json", text.encode())
    lines = ["# ONNX Runtime CPU (fp32) vs PyTorch reference", "",
             f"Relative error = max |onnx - torch| / max |torch| per output; tolerance {RELATIVE_TOLERANCE:g}.", "",
             "| component | cases | max abs | max rel | id mismatch | result |", "|---|---|---|---|---|---|"]
    for name, v in validation.items():
        own = ", ".join(f"{out} {tol:g}" for out, tol in v.get("output_tolerances_rel", {}).items())
        lines.append(f"| {name} | {len(v['cases'])} | {v['max_abs']:.2e} | {v['max_rel']:.2e} | "
                     f"{v['mismatch_fraction']:.3f} | {'pass' if v['passed'] else 'FAIL'}"
                     f"{f' (tolerance {own})' if own else ''} |")
    atomic_write_bytes(reports_dir / "validation.md", ("\n".join(lines) + "\n").encode())
