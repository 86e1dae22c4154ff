"""``llada-edge build``: engines for a target and precision from an exported build folder.

* ``onnxruntime``: ``BUILD/engines/onnxruntime/<precision>/<component>/model.onnx``, rewritten by
  :mod:`llada_edge.engines.onnxruntime_builder`; components a recipe never rewrites (embed, VAE) are read
  from ``BUILD/onnx``. Then the accuracy report (``BUILD/reports/accuracy-<precision>.{json,md}``).
* ``tensorrt``: :mod:`llada_edge.engines.tensorrt_builder` (needs TensorRT and a GPU), from the graphs of
  :func:`ensure_qdq_graphs` (ModelOpt Q/DQ where the recipe quantizes, else the fp32 export).

Every step goes through :func:`~llada_edge.buildfolder.build_step`: keyed by its source graph, recipe and
builder, skipped when up to date, written to a temporary folder and renamed into place.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from llada_edge.buildfolder import (
    CALIBRATION,
    MODEL_FILES,
    Artifact,
    ComponentEntry,
    Manifest,
    StepOutput,
    build_lock,
    build_step,
    fingerprint,
    is_up_to_date,
    versions_of,
)
from llada_edge.calibration.recipes import Recipe, get_recipe
from llada_edge.components import Component, Registry
from llada_edge.errors import InputError

BUILDER_VERSION = 1
TARGETS = ("onnxruntime", "tensorrt")

Progress = Callable[[str], None]


def build_engines(build_dir: str | Path, target: str = "onnxruntime", precision: str = "int4",
                  overrides: dict[str, str] | None = None, report: bool = True,
                  progress: Progress = print) -> Manifest:
    build_dir = Path(build_dir).absolute()
    recipe = get_recipe(precision, overrides)
    if target not in TARGETS:
        raise InputError(f"unknown target {target!r} (expected one of {list(TARGETS)})")
    Manifest.load(build_dir)  # not a build folder: say so before taking its lock
    if target == "tensorrt":
        from llada_edge.engines.tensorrt_builder import build_tensorrt_engines, gpu_sm, import_tensorrt

        trt, sm = import_tensorrt(), gpu_sm()  # before any CPU work: without TensorRT or a GPU, stop at once
        with build_lock(build_dir, "building engines"):
            manifest = Manifest.load(build_dir)
            sources = ensure_qdq_graphs(build_dir, manifest, recipe, progress)
            return build_tensorrt_engines(build_dir, manifest, recipe, sources, trt, sm, progress)
    with build_lock(build_dir, "building engines"):
        manifest = Manifest.load(build_dir)
        if recipe.is_float:
            progress("build: fp32 on onnxruntime runs the exported graphs as they are")
        else:
            _build_onnxruntime(build_dir, manifest, recipe, progress)
        if report and not recipe.is_float:
            from llada_edge.engines.accuracy import accuracy_report

            accuracy_report(build_dir, recipe.name, progress=progress)
        return Manifest.load(build_dir)


def quantize_build(build_dir: str | Path, precision: str = "fp8", overrides: dict[str, str] | None = None,
                   progress: Progress = print) -> dict[str, Path]:
    """``llada-edge quantize``: the ModelOpt Q/DQ graphs of a recipe (CPU only; calibration captured if missing);
    returns the graph folder each TensorRT engine would be built from."""
    build_dir = Path(build_dir).absolute()
    recipe = get_recipe(precision, overrides)
    Manifest.load(build_dir)
    with build_lock(build_dir, "quantizing"):
        return ensure_qdq_graphs(build_dir, Manifest.load(build_dir), recipe, progress)


def verified_sources(build_dir: Path, manifest: Manifest) -> list[Component]:
    """The exported graphs a build step reads, after checking their sha256 like the runtime does: an engine
    derived from a tampered graph would otherwise be recorded, hashed and trusted as genuine."""
    components = Registry.of_build(build_dir).exported(manifest)
    manifest.verify(build_dir, [MODEL_FILES.entry, *(c.name for c in components)])
    return components


def _build_onnxruntime(build_dir: Path, manifest: Manifest, recipe: Recipe, progress: Progress) -> None:
    from llada_edge.engines.onnxruntime_builder import build_component

    components = [c for c in verified_sources(build_dir, manifest) if c.quantized]
    for i, component in enumerate(components, start=1):
        key = fingerprint([BUILDER_VERSION, recipe.to_dict(), manifest.components[component.name].key,
                           versions_of(["onnxruntime"])])

        def rewrite(src: Path, tmp: Path, component: Component = component) -> dict[str, Any]:
            census = build_component(src, tmp, component, recipe)
            return {"target": "onnxruntime", "recipe": recipe.to_dict(), "census": census, "source": component.name}

        entry, built = _derived_step(build_dir, manifest, Artifact.ort_engine(recipe.name, component.name), component,
                                     key, rewrite)
        where = f"build [{i}/{len(components)}] {component.name} ({recipe.name})"
        progress(f"{where}: {entry.meta['seconds']:.1f} s, {entry.meta['census']}" if built else f"{where}: up to date")


def _derived_step(build_dir: Path, manifest: Manifest, artifact: Artifact, component: Component, key: str,
                  derive: Callable[[Path, Path], dict[str, Any]]) -> tuple[ComponentEntry, bool]:
    """A build step that rewrites a component's exported graph (same I/O contract and profile):
    ``derive(source model.onnx, temporary folder)`` writes the new graph and returns its metadata."""
    exported = manifest.components[component.name]

    def produce(tmp: Path) -> StepOutput:
        meta = derive(build_dir / Artifact.onnx(component.name).folder / "model.onnx", tmp)
        return StepOutput({**meta, "profile": exported.meta.get("profile", {})}, exported.inputs, exported.outputs)

    return build_step(build_dir, manifest, artifact, key, produce)


# ----------------------------------------------------------------------------------------------
# TensorRT inputs: calibration and Q/DQ graphs (CPU work, no TensorRT needed)
# ----------------------------------------------------------------------------------------------


def ensure_calibration(build_dir: Path, manifest: Manifest, progress: Progress) -> str:
    """The build's calibration data (as `llada-edge calibrate` captured it, whatever its options), else a capture
    with the default options from the build's checkpoint (torch reference); returns the step's key."""
    entry = manifest.components.get(CALIBRATION.entry)
    if entry is not None and is_up_to_date(build_dir, manifest, CALIBRATION.entry, entry.key):
        return entry.key
    from llada_edge.calibration.capture import calibrate_build

    return calibrate_build(build_dir, manifest, progress=progress).key


def ensure_qdq_graphs(build_dir: Path, manifest: Manifest, recipe: Recipe, progress: Progress) -> dict[str, Path]:
    """The graph folder each TensorRT engine is built from: ModelOpt Q/DQ where the recipe quantizes, else fp32."""
    from llada_edge.engines.qdq import quantize_component
    from llada_edge.export.allowlist import check_tensorrt_compatible

    components = verified_sources(build_dir, manifest)
    ort_layers = [c.name for c in components if manifest.components[c.name].meta.get("moe") == "ort"]
    if ort_layers:
        raise InputError(f"{build_dir}: {ort_layers[0]} uses the com.microsoft MoE lowering, which TensorRT cannot "
                         "parse; export with --moe dense for the tensorrt target")
    sources: dict[str, Path] = {}
    calibration_key: str | None = None
    for i, component in enumerate(components, start=1):
        fmt = recipe.graph_format(component.graph_kinds)
        if fmt == "fp32":
            sources[component.name] = build_dir / Artifact.onnx(component.name).folder
            continue
        calibration_key = calibration_key or ensure_calibration(build_dir, manifest, progress)
        artifact = Artifact.qdq_graph(recipe.name, component.name)
        key = fingerprint([BUILDER_VERSION, recipe.to_dict(), manifest.components[component.name].key,
                           versions_of(["nvidia-modelopt"]), calibration_key])

        def quantize(src: Path, tmp: Path, component: Component = component) -> dict[str, Any]:
            meta = quantize_component(src, tmp, component, recipe, build_dir / "calibration")
            meta["tensorrt_allowlist_violations"] = [str(v) for v in check_tensorrt_compatible(tmp / "model.onnx")]
            return meta

        entry, built = _derived_step(build_dir, manifest, artifact, component, key, quantize)
        sources[component.name] = build_dir / artifact.folder
        where = f"quantize [{i}/{len(components)}] {component.name} ({fmt})"
        progress(f"{where}: {entry.meta['seconds']:.1f} s" if built else f"{where}: up to date")
    return sources
