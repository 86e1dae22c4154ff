"""``llada-edge build``: engines for a target and precision from an exported build folder.

* ``onnxruntime``: ``BUILD/engines/onnxruntime/<precision>/<component>/model.onnx``, rewritten by
  :mod:`llada_edge.engines.onnxruntime_builder`; components a recipe never rewrites (embed, VAE) are read
  from ``BUILD/onnx``. Then the accuracy report (``BUILD/reports/accuracy-<precision>.{json,md}``).
* ``tensorrt`` / ``tensorrt-rtx``: :mod:`llada_edge.engines.tensorrt_builder` (full TensorRT needs a GPU;
  TensorRT-RTX builds ahead of time without one), from the graphs of :func:`ensure_gpu_graphs` (ModelOpt Q/DQ
  where the recipe quantizes, in the recipe's fp16/bf16; the fp32 export for the fp32 recipe), with an engine
  census per engine (:mod:`llada_edge.engines.census`).

Every step goes through :func:`~llada_edge.buildfolder.build_step`: keyed by its source graph, recipe and
builder, skipped when up to date, written to a temporary folder and renamed into place.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

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
from llada_edge.export.build import in_fresh_process, isolate

BUILDER_VERSION = 9
TARGETS = ("onnxruntime", "tensorrt", "tensorrt-rtx")
GPU_DEFAULT_DTYPE = "fp16"  # a quantized recipe's unquantized parts on a GPU target, unless the export says bf16

Progress = Callable[[str], None]


def build_engines(build_dir: str | Path, target: str = "onnxruntime", precision: str = "int4",
                  overrides: dict[str, str] | None = None, report: bool = True, progress: Progress = print,
                  sm: list[str] | None = None, components: list[str] | None = None) -> Manifest:
    """``llada-edge build``. ``sm``: tensorrt-rtx's compute capabilities; ``components``: names or groups to build
    (tensorrt targets; default all)."""
    build_dir = Path(build_dir).absolute()
    recipe = get_recipe(precision, overrides)
    if target not in TARGETS:
        raise InputError(f"unknown target {target!r} (expected one of {list(TARGETS)})")
    manifest = Manifest.load(build_dir)  # not a build folder: say so before taking its lock
    if target != "onnxruntime":
        return _build_tensorrt(build_dir, manifest, target, gpu_recipe(precision, overrides, manifest), sm,
                               components, progress)
    if components:
        raise InputError("--components applies to the tensorrt targets (onnxruntime builds every quantized graph)")
    if recipe.dtype != "fp32":
        raise InputError(f"recipe {recipe.name} ({recipe.dtype}) is for GPU targets (tensorrt, tensorrt-rtx); "
                         "onnxruntime runs fp32 and the fp8/int8/int4/mixed recipes")
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


def gpu_recipe(precision: str, overrides: dict[str, str] | None, manifest: Manifest) -> Recipe:
    """The recipe on a GPU target: a quantized one keeps its unquantized parts in the export's half dtype (``export
    --dtype``), else fp16, and its text head unquantized; the float recipes (fp32, fp16, bf16) and an explicit
    ``--override dtype=...`` / ``lm_head=...`` are what they say."""
    recipe = get_recipe(precision, overrides)
    if recipe.is_float:
        return recipe
    if recipe.lm_head != "fp32" and "lm_head" not in (overrides or {}):
        # The text head's int8 default was measured for ONNX Runtime's weight-only MatMulNBits; in a GPU graph it
        # would be W8A8 (activations too), unmeasured: it stays in the half dtype there unless asked.
        recipe = replace(recipe, lm_head="fp32")
    if "dtype" in (overrides or {}):
        return recipe
    exported = str(manifest.options.get("dtype", "fp32"))
    return recipe.in_dtype(exported if exported != "fp32" else GPU_DEFAULT_DTYPE)


def _build_tensorrt(build_dir: Path, manifest: Manifest, target: str, recipe: Recipe, sm: list[str] | None,
                    components: list[str] | None, progress: Progress) -> Manifest:
    from llada_edge.engines.tensorrt_builder import build_tensorrt_engines
    from llada_edge.engines.tensorrt_flavours import get_flavour

    flavour = get_flavour(target)
    trt = flavour.load()  # before any CPU work: without the library (or, for tensorrt, a GPU) stop at once
    archs = flavour.architectures(sm)
    recipe = flavour.fit(recipe, progress)
    selected = _selected(build_dir, manifest, components)
    flavour.check_recipe(recipe, selected, archs)
    with build_lock(build_dir, "building engines"):
        manifest = Manifest.load(build_dir)
        sources = ensure_gpu_graphs(build_dir, manifest, recipe, progress, [c.name for c in selected])
        return build_tensorrt_engines(build_dir, manifest, recipe, sources, flavour, trt, archs, progress)


def quantize_build(build_dir: str | Path, precision: str = "fp8", overrides: dict[str, str] | None = None,
                   progress: Progress = print) -> dict[str, Path]:
    """``llada-edge quantize``: the GPU graphs of a recipe (ModelOpt Q/DQ, in the recipe's dtype; CPU only;
    calibration captured if missing); returns the graph folder each TensorRT engine would be built from."""
    build_dir = Path(build_dir).absolute()
    recipe = gpu_recipe(precision, overrides, Manifest.load(build_dir))
    with build_lock(build_dir, "quantizing"):
        return ensure_gpu_graphs(build_dir, Manifest.load(build_dir), recipe, progress)


def verified_sources(build_dir: Path, manifest: Manifest) -> list[Component]:
    """The exported graphs a build step reads, after checking their sha256 like the runtime does: an engine
    derived from a tampered graph would otherwise be recorded, hashed and trusted as genuine."""
    components = Registry.of_build(build_dir).exported(manifest)
    manifest.verify(build_dir, [MODEL_FILES.entry, *(c.name for c in components)])
    return components


def _build_onnxruntime(build_dir: Path, manifest: Manifest, recipe: Recipe, progress: Progress) -> None:
    components = [c for c in verified_sources(build_dir, manifest) if c.quantized]
    for i, component in enumerate(components, start=1):
        entry, built = ort_engine_step(build_dir, manifest, recipe, component)
        where = f"build [{i}/{len(components)}] {component.name} ({recipe.name})"
        progress(f"{where}: {entry.meta['seconds']:.1f} s, {entry.meta['census']}" if built else f"{where}: up to date")


def rewrite_component(build_dir: str, name: str, src: str, tmp: str, recipe: Recipe) -> dict[str, int]:
    """:func:`~llada_edge.engines.onnxruntime_builder.build_component` by component name (picklable arguments, for a
    fresh process)."""
    from llada_edge.engines.onnxruntime_builder import build_component

    return build_component(Path(src), Path(tmp), Registry.of_build(build_dir)[name], recipe)


def ort_engine_key(manifest: Manifest, recipe: Recipe, component: Component) -> str:
    """An ONNX Runtime engine's key: the builder, the recipe and the key of the export it is rewritten from (not its
    files, so a streaming build that deleted the export can still tell that the engine is up to date)."""
    return fingerprint([BUILDER_VERSION, recipe.key_for(component.recipe_kinds),
                        manifest.components[component.name].key, versions_of(["onnxruntime"])])


def ort_engine_step(build_dir: Path, manifest: Manifest, recipe: Recipe, component: Component
                    ) -> tuple[ComponentEntry, bool]:
    """One component's ONNX Runtime engine for a recipe, as a build step (skipped when up to date)."""
    from llada_edge.engines.onnxruntime_builder import build_component

    def rewrite(src: Path, tmp: Path) -> dict[str, Any]:
        if isolate(src):
            census = in_fresh_process(rewrite_component, str(build_dir), component.name, str(src), str(tmp), recipe)
        else:
            census = build_component(src, tmp, component, recipe)
        return {"target": "onnxruntime", "recipe": recipe.to_dict(), "census": census, "source": component.name}

    return _derived_step(build_dir, manifest, Artifact.ort_engine(recipe.name, component.name), component,
                         ort_engine_key(manifest, recipe, component), rewrite)


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


def _selected(build_dir: Path, manifest: Manifest, names: list[str] | None) -> list[Component]:
    registry = Registry.of_build(build_dir)
    exported = registry.exported(manifest)
    wanted = {c.name for c in registry.select(names)}
    missing = [n for n in sorted(wanted) if n not in {c.name for c in exported}]
    if names and missing:
        raise InputError(f"{build_dir}: {missing[0]} was not exported (run `llada-edge export --components ...`)")
    return [c for c in exported if c.name in wanted]


def ensure_gpu_graphs(build_dir: Path, manifest: Manifest, recipe: Recipe, progress: Progress,
                      names: list[str] | None = None) -> dict[str, Path]:
    """The graph folder each TensorRT engine is built from: ModelOpt Q/DQ where the recipe quantizes, in the
    recipe's dtype (:func:`~llada_edge.engines.qdq.gpu_graph`); the fp32 export itself for the fp32 recipe.
    ``names``: only these components (default all exported)."""
    from llada_edge.engines.half import validate_half
    from llada_edge.engines.qdq import gpu_graph
    from llada_edge.export.allowlist import check_tensorrt_compatible

    components = [c for c in verified_sources(build_dir, manifest) if names is None or c.name in names]
    ort_layers = [c.name for c in components if manifest.components[c.name].meta.get("moe") == "ort"]
    if ort_layers:
        raise InputError(f"{build_dir}: {ort_layers[0]} uses the com.microsoft MoE lowering, which TensorRT cannot "
                         "parse; export with --moe dense for the tensorrt targets")
    sources: dict[str, Path] = {}
    calibration_key: str | None = None
    failures = []
    for i, component in enumerate(components, start=1):
        fmt = recipe.graph_format(component.graph_kinds)
        if fmt == "fp32" and recipe.dtype == "fp32":
            sources[component.name] = build_dir / Artifact.onnx(component.name).folder
            continue
        if fmt != "fp32":
            calibration_key = calibration_key or ensure_calibration(build_dir, manifest, progress)
        artifact = Artifact.qdq_graph(recipe.name, component.name)
        key = fingerprint([BUILDER_VERSION, recipe.key_for(component.recipe_kinds),
                           manifest.components[component.name].key, versions_of(["nvidia-modelopt"]),
                           calibration_key if fmt != "fp32" else None])

        def derive(src: Path, tmp: Path, component: Component = component, fmt: str = fmt) -> dict[str, Any]:
            meta = gpu_graph(src, tmp, component, recipe, build_dir / "calibration")
            meta["tensorrt_allowlist_violations"] = [str(v) for v in check_tensorrt_compatible(tmp / "model.onnx")]
            if fmt == "fp32" and recipe.dtype == "fp16":  # ONNX Runtime's CPU provider runs fp16, not bf16
                meta["validation"] = validate_half(src, tmp / "model.onnx",
                                                   component.validation_cases(np.random.default_rng(0)))
            return meta

        entry, built = _derived_step(build_dir, manifest, artifact, component, key, derive)
        sources[component.name] = build_dir / artifact.folder
        check = entry.meta.get("validation")
        if check and not check["passed"]:
            failures.append(f"{component.name} (max rel err {check['max_rel']:.1e}, {check['rows_within']:.0%} of rows "
                            f"within {check['tolerance_rel']:g})")
        what = f"{fmt} in {recipe.dtype}" if fmt != "fp32" else recipe.dtype
        where = f"gpu graph [{i}/{len(components)}] {component.name} ({what})"
        note = (f", vs fp32: {check['rows_within']:.1%} of rows within {check['tolerance_rel']:g}, worst "
                f"{check['max_rel']:.1e}") if check else ""
        progress(f"{where}: {entry.meta['seconds']:.1f} s{note}" if built else f"{where}: up to date")
    if failures:
        from llada_edge.export.build import ValidationFailed

        raise ValidationFailed(f"{recipe.dtype} graphs beyond tolerance vs fp32: {', '.join(failures)}", file=build_dir)
    return sources


def prepare_half_graphs(build_dir: str | Path, dtype: str, progress: Progress = print,
                        components: list[str] | None = None) -> dict[str, Path]:
    """``export --dtype fp16|bf16``: the build's half-precision GPU graphs (validated on ONNX Runtime for fp16),
    recorded as the export's GPU dtype, which quantized GPU recipes then keep their unquantized parts in."""
    build_dir = Path(build_dir).absolute()
    manifest = Manifest.load(build_dir)
    names = [c.name for c in _selected(build_dir, manifest, components)]
    with build_lock(build_dir, "writing half-precision graphs"):
        manifest = Manifest.load(build_dir)
        sources = ensure_gpu_graphs(build_dir, manifest, get_recipe(dtype), progress, names)
        manifest.options["dtype"] = dtype
        manifest.save(build_dir)
        return sources
