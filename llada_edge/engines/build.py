"""``llada-edge build``: engines for a target and precision from an exported build folder.

* ``onnxruntime``: ``BUILD/engines/onnxruntime/<precision>/<component>/model.onnx``, rewritten by
  :mod:`llada_edge.engines.onnxruntime_builder`; components a recipe leaves in fp32 (embed, VAE) are
  read from ``BUILD/onnx``. Then the accuracy report (``BUILD/reports/accuracy-<precision>.{json,md}``).
* ``tensorrt``: :mod:`llada_edge.engines.tensorrt_builder` (needs TensorRT and a GPU).

Steps are keyed like the export: a component whose source graph, recipe and builder are unchanged is
skipped; each is written to a temporary folder and renamed into place.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from llada_edge.calibration.recipes import Recipe, get_recipe
from llada_edge.engines.manifest import (
    ComponentEntry,
    FileEntry,
    Manifest,
    atomic_dir,
    fingerprint,
    record_component,
    versions_of,
)
from llada_edge.errors import InputError

BUILDER_VERSION = 1
TARGETS = ("onnxruntime", "tensorrt")
# Components whose graphs hold no weights a recipe rewrites (a Gather table, convolutions).
UNQUANTIZED = ("embed", "vae_decoder")

Progress = Callable[[str], None]


def engine_name(target: str, precision: str, component: str) -> str:
    return f"{target}/{precision}/{component}"


def onnx_components(manifest: Manifest) -> list[str]:
    return [name for name, entry in manifest.components.items() if entry.kind == "onnx"]


def build_engines(build_dir: str | Path, target: str = "onnxruntime", precision: str = "int4",
                  overrides: dict[str, str] | None = None, report: bool = True,
                  progress: Progress = print) -> Manifest:
    build_dir = Path(build_dir).absolute()
    manifest = Manifest.load(build_dir)
    recipe = get_recipe(precision, overrides)
    if target not in TARGETS:
        raise InputError(f"unknown target {target!r} (expected one of {list(TARGETS)})")
    if target == "tensorrt":
        from llada_edge.engines.tensorrt_builder import build_tensorrt_engines

        return build_tensorrt_engines(build_dir, manifest, recipe, progress)
    if recipe.is_float:
        progress("build: fp32 on onnxruntime runs the exported graphs as they are")
    else:
        _build_onnxruntime(build_dir, manifest, recipe, progress)
    if report and not recipe.is_float:
        from llada_edge.engines.accuracy import accuracy_report

        accuracy_report(build_dir, recipe.name, progress=progress)
    return Manifest.load(build_dir)


def _build_onnxruntime(build_dir: Path, manifest: Manifest, recipe: Recipe, progress: Progress) -> None:
    from llada_edge.engines.onnxruntime_builder import build_component

    names = [n for n in onnx_components(manifest) if n not in UNQUANTIZED]
    for i, name in enumerate(names, start=1):
        source = manifest.components[name]
        key = fingerprint([BUILDER_VERSION, recipe.to_dict(), source.key, versions_of(["onnxruntime"])])
        entry_name = engine_name("onnxruntime", recipe.name, name)
        entry = manifest.components.get(entry_name)
        target_dir = build_dir / "engines" / entry_name
        if entry is not None and entry.key == key and all(
                (build_dir / f.path).is_file() and (build_dir / f.path).stat().st_size == f.size for f in entry.files):
            progress(f"build [{i}/{len(names)}] {name} ({recipe.name}): up to date")
            continue
        start = time.perf_counter()
        with atomic_dir(target_dir) as tmp:
            census = build_component(build_dir / "onnx" / name / "model.onnx", tmp, name, recipe)
        files = [FileEntry.of(build_dir, p) for p in sorted(target_dir.iterdir())]
        meta = {"target": "onnxruntime", "recipe": recipe.to_dict(), "census": census, "source": name,
                "seconds": round(time.perf_counter() - start, 2)}
        record_component(build_dir, manifest, ComponentEntry(entry_name, "ort-engine", files, key, source.inputs,
                                                             source.outputs, meta, None))
        progress(f"build [{i}/{len(names)}] {name} ({recipe.name}): {meta['seconds']:.1f} s, {census}")


# ----------------------------------------------------------------------------------------------
# TensorRT inputs: calibration and Q/DQ graphs (CPU work, no TensorRT needed)
# ----------------------------------------------------------------------------------------------


def ensure_calibration(build_dir: Path, manifest: Manifest, progress: Progress) -> Path:
    """``BUILD/calibration`` from the build's checkpoint (torch reference), unless already there."""
    calib = build_dir / "calibration"
    if (calib / "expert_coverage.json").is_file():
        return calib
    checkpoint = manifest.checkpoint.get("path")
    if not checkpoint or not Path(checkpoint).is_dir():
        raise InputError(f"{build_dir}: no calibration data and the checkpoint {checkpoint!r} is not available; "
                         "run `llada-edge calibrate --checkpoint DIR --build BUILD`")
    from llada_edge.calibration.capture import calibrate

    with atomic_dir(calib) as tmp:
        counts = calibrate(checkpoint, tmp, progress=progress)
    progress(f"calibrate: {counts}")
    return calib


def ensure_qdq_graphs(build_dir: Path, manifest: Manifest, recipe: Recipe, progress: Progress) -> dict[str, Path]:
    """The graph each TensorRT engine is built from: ModelOpt Q/DQ where the recipe quantizes, else fp32."""
    from llada_edge.engines.qdq import component_format, quantize_component
    from llada_edge.export.allowlist import check_tensorrt_compatible

    names = onnx_components(manifest)
    ort_layers = [n for n in names if manifest.components[n].meta.get("moe") == "ort"]
    if ort_layers:
        raise InputError(f"{build_dir}: {ort_layers[0]} uses the com.microsoft MoE lowering, which TensorRT cannot "
                         "parse; export with --moe dense for the tensorrt target")
    sources: dict[str, Path] = {}
    calib = None
    for i, name in enumerate(names, start=1):
        fmt = component_format(name, recipe)
        if fmt == "fp32":
            sources[name] = build_dir / "onnx" / name
            continue
        calib = calib or ensure_calibration(build_dir, manifest, progress)
        entry_name = f"qdq/{recipe.name}/{name}"
        key = fingerprint([BUILDER_VERSION, recipe.to_dict(), manifest.components[name].key,
                           versions_of(["nvidia-modelopt"]), (calib / "expert_coverage.json").stat().st_mtime_ns])
        target = build_dir / "quant" / recipe.name / name
        sources[name] = target
        old = manifest.components.get(entry_name)
        if old is not None and old.key == key and all((build_dir / f.path).is_file() for f in old.files):
            progress(f"quantize [{i}/{len(names)}] {name} ({fmt}): up to date")
            continue
        start = time.perf_counter()
        with atomic_dir(target) as tmp:
            meta = quantize_component(build_dir / "onnx" / name / "model.onnx", tmp, name, recipe, calib)
        meta["tensorrt_allowlist_violations"] = [str(v) for v in check_tensorrt_compatible(target / "model.onnx")]
        meta["seconds"] = round(time.perf_counter() - start, 2)
        files = [FileEntry.of(build_dir, p) for p in sorted(target.iterdir())]
        source = manifest.components[name]
        record_component(build_dir, manifest, ComponentEntry(entry_name, "qdq", files, key, source.inputs,
                                                             source.outputs, {**meta, "profile": source.meta.get(
                                                                 "profile", {})}, None))
        progress(f"quantize [{i}/{len(names)}] {name} ({fmt}): {meta['seconds']:.1f} s")
    return sources
