"""TensorRT engines: one strongly typed plan per component (per decoder layer, so build memory stays
bounded), optimisation profiles from the component specs (block rows 1/2/3 x 32 tokens, tokenizer and
decoder resolutions), a timing cache reused across builds, engine names carrying the TensorRT version
and the GPU's SM, and manifest entries.

Written against the TensorRT Python API (10.x / 11.x) and import-guarded: without TensorRT the build
stops with a clear message (exit code 2). TensorRT cannot be installed on the CPU development and CI
machines, so this module has not run there; its tests skip with that reason.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from llada_edge.buildfolder import Artifact, ComponentEntry, Manifest, StepOutput, build_step, fingerprint
from llada_edge.calibration.recipes import Recipe
from llada_edge.errors import InputError
from llada_edge.export.allowlist import assert_tensorrt_compatible

INSTALL_HINT = ("TensorRT is not installed: the tensorrt target needs the tensorrt Python package (from NVIDIA's "
                "index: pip install tensorrt) and an NVIDIA GPU; on this machine build --target onnxruntime")
WORKSPACE_BYTES = 8 << 30

Progress = Callable[[str], None]


def import_tensorrt() -> Any:
    try:
        import tensorrt as trt
    except ImportError:
        raise InputError(INSTALL_HINT) from None
    return trt


def gpu_sm() -> str:
    """``sm90`` for an H100/H200: engines are specific to the GPU architecture."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError:
            raise InputError("cuda-python is needed to name engines by GPU architecture: pip install cuda-python") \
                from None
    err, props = cudart.cudaGetDeviceProperties(0)
    if int(err) != 0:
        raise InputError(f"no CUDA device available (cudaGetDeviceProperties returned {err})")
    return f"sm{props.major}{props.minor}"


def engine_file_name(component: str, trt_version: str, sm: str) -> str:
    return f"{component}.trt{trt_version}.{sm}.plan"


def profile_shapes(entry: ComponentEntry) -> dict[str, tuple[list[int], list[int], list[int]]]:
    """min/opt/max input shapes from the spec recorded at export (named dims -> profile values)."""
    profile = entry.meta.get("profile", {})
    shapes = {}
    for name, sig in entry.inputs.items():
        dims: list[list[int]] = [[], [], []]
        for d in sig["shape"]:
            for i in range(3):
                dims[i].append(profile[d][i] if isinstance(d, str) else d)
        shapes[name] = (dims[0], dims[1], dims[2])
    return shapes


def build_engine(trt: Any, onnx_path: Path, plan_path: Path, shapes: dict[str, tuple[list[int], list[int], list[int]]],
                 cache_path: Path) -> None:
    """Parse (strongly typed), set one optimisation profile, reuse the timing cache, serialise the plan."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):  # the only mode in TensorRT 11
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise InputError(f"TensorRT could not parse the graph: {errors}", file=onnx_path)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise InputError("TensorRT failed to build the engine (see the TensorRT log above)", file=onnx_path)
    plan_path.write_bytes(bytes(plan))
    cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))


def build_tensorrt_engines(build_dir: Path, manifest: Manifest, recipe: Recipe, sources: dict[str, Path], trt: Any,
                           sm: str, progress: Progress) -> Manifest:
    """One plan per component from ``sources`` (component -> the folder of the graph to build from), with the
    ``tensorrt`` module of :func:`import_tensorrt` for the GPU architecture ``sm`` (:func:`gpu_sm`)."""
    cache_path = build_dir / "engines" / "tensorrt" / f"timing.trt{trt.__version__}.{sm}.cache"
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    for i, (name, source) in enumerate(sources.items(), start=1):
        onnx_path = source / "model.onnx"
        assert_tensorrt_compatible(onnx_path, name)
        exported = manifest.components[name]
        key = fingerprint([recipe.to_dict(), exported.key, trt.__version__, sm, str(source)])

        def build(tmp: Path, name: str = name, onnx_path: Path = onnx_path, exported: ComponentEntry = exported
                  ) -> StepOutput:
            build_engine(trt, onnx_path, tmp / engine_file_name(name, trt.__version__, sm), profile_shapes(exported),
                         cache_path)
            meta = {"target": "tensorrt", "tensorrt": trt.__version__, "sm": sm, "recipe": recipe.to_dict()}
            return StepOutput(meta, exported.inputs, exported.outputs)

        entry, built = build_step(build_dir, manifest, Artifact.trt_engine(recipe.name, name), key, build)
        progress(f"tensorrt [{i}/{len(sources)}] {name}: " + (f"{entry.meta['seconds']} s" if built else "up to date"))
    return manifest
