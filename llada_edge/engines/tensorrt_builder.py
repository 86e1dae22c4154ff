"""TensorRT engines: one strongly typed plan per component (per decoder layer, so build memory stays bounded),
for either flavour of :mod:`llada_edge.engines.tensorrt_flavours`, with

* one optimisation profile from the component's spec (block rows 1/2/3 x 32 tokens, tokenizer and decoder
  resolutions), recorded at export;
* a timing cache per version and GPU, reused across builds (full TensorRT; TensorRT-RTX times nothing at build);
* engine names carrying the flavour, its version and the compute capabilities (``layer_3.trtrtx1.7.1.116.
  sm89+sm120.plan``);
* an engine census (:mod:`llada_edge.engines.census`) recorded in the manifest entry, which fails the build when a
  GEMM that the recipe put in fp8/int4 (or fp16/bf16) is stored wider.

TensorRT-RTX builds here without a GPU (``tensorrt_rtx``: engines for the named compute capabilities, compiled
just in time on the RTX GPU at load). Full TensorRT needs a GPU and cannot be installed on the development and
CI machines: its path (the GPU's own architecture, the census from the engine inspector) has not run here.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llada_edge.buildfolder import Artifact, ComponentEntry, Manifest, StepOutput, build_step, fingerprint
from llada_edge.calibration.recipes import Recipe
from llada_edge.engines.census import Gemm, check_census, parse_inspector_json, parse_layer_log, take_census
from llada_edge.engines.tensorrt_flavours import Flavour
from llada_edge.errors import InputError
from llada_edge.export.allowlist import assert_tensorrt_compatible

if TYPE_CHECKING:  # checked against stubs generated from tensorrt_rtx's binding: the API both flavours share
    import tensorrt_rtx as tensorrt

BUILDER_VERSION = 2

Progress = Callable[[str], None]
Shapes = dict[str, tuple[list[int], list[int], list[int]]]


def profile_shapes(entry: ComponentEntry) -> Shapes:
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


def _capturing_logger(trt: Any) -> Any:
    """An ILogger that keeps the builder's layer list (logged at VERBOSE) and prints warnings and errors."""

    class Logger(trt.ILogger):  # type: ignore[misc, name-defined, unused-ignore]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.layers = ""

        def log(self, severity: Any, msg: str) -> None:
            if msg.startswith("Layers:"):
                self.layers = msg
            elif severity <= trt.ILogger.WARNING and "Make sure input" not in msg:
                print(f"[{trt.__name__}] {msg}", file=sys.stderr)

    return Logger()


def _network(trt: Any, builder: tensorrt.Builder, onnx_path: Path, logger: Any
             ) -> tuple[tensorrt.INetworkDefinition, tensorrt.OnnxParser]:
    """The strongly typed network of a graph, and its parser (which owns the weights: keep it until the build)."""
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise InputError(f"{trt.__name__} could not parse the graph: {errors}", file=onnx_path)
    return network, parser


def _config(trt: Any, builder: tensorrt.Builder, flavour: Flavour, archs: tuple[str, ...], shapes: Shapes,
            cache_path: Path) -> tensorrt.IBuilderConfig:
    # No workspace limit: with one set, TensorRT-RTX building without a GPU tries to allocate all of it for some
    # fp32 tactics and fails ("OutOfMemory" for 256 MiB .. 8 GiB on the tiny fp32 layer_0); the default works.
    config = builder.create_builder_config()
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # the layer list the census reads
    if flavour.ahead_of_time:  # TensorRT-RTX: the GPUs to build for, not the one (if any) it runs on
        config.num_compute_capabilities = len(archs)
        for i, arch in enumerate(archs):
            config.set_compute_capability(getattr(trt.ComputeCapability, arch.upper()), i)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.set_shape(name, trt.Dims(lo), trt.Dims(opt), trt.Dims(hi))
    config.add_optimization_profile(profile)
    if not flavour.ahead_of_time:  # TensorRT-RTX does not time tactics at build (its kernels are JIT-compiled)
        cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    return config


def _host_bytes(memory: tensorrt.IHostMemory) -> bytes:
    """The bytes of a serialised plan or cache (IHostMemory has the buffer protocol; its stub does not say so)."""
    return bytes(memoryview(memory))  # type: ignore[arg-type]


def build_engine(trt: Any, flavour: Flavour, onnx_path: Path, plan_path: Path, shapes: Shapes,
                 archs: tuple[str, ...], cache_path: Path, gemms: list[Gemm]) -> dict[str, Any]:
    """Parse (strongly typed), build and serialise one plan; returns its census (not yet checked)."""
    logger = _capturing_logger(trt)
    builder: tensorrt.Builder = trt.Builder(logger)
    network, _parser = _network(trt, builder, onnx_path, logger)
    config = _config(trt, builder, flavour, archs, shapes, cache_path)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise InputError(f"{trt.__name__} failed to build the engine (see its log above)", file=onnx_path)
    plan_path.write_bytes(_host_bytes(plan))
    if not flavour.ahead_of_time:
        cache_path.write_bytes(_host_bytes(config.get_timing_cache().serialize()))
    if logger.layers:
        layers = parse_layer_log(logger.layers)
    else:  # pragma: no cover - full TensorRT on a GPU: ask the loaded engine
        engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
        layers = parse_inspector_json(engine.create_engine_inspector().get_engine_information(
            trt.LayerInformationFormat.JSON))
    return take_census(layers, gemms)


def source_gemms(build_dir: Path, manifest: Manifest, recipe: Recipe, name: str, source: Path) -> list[Gemm]:
    """What the census expects of one engine: the GEMM list its GPU graph recorded (none for the fp32 export)."""
    artifact = Artifact.qdq_graph(recipe.name, name)
    entry = manifest.components.get(artifact.entry)
    if entry is None or source != build_dir / artifact.folder:
        return []
    return [Gemm(**g) for g in entry.meta.get("gemms", [])]


def build_tensorrt_engines(build_dir: Path, manifest: Manifest, recipe: Recipe, sources: dict[str, Path],
                           flavour: Flavour, trt: Any, archs: tuple[str, ...], progress: Progress) -> Manifest:
    """One plan per component from ``sources`` (component -> the folder of its GPU graph), with the module of
    ``flavour`` (:meth:`Flavour.load`) for the compute capabilities ``archs``."""
    version = str(trt.__version__)
    engines_dir = build_dir / "engines" / flavour.target
    cache_path = engines_dir / f"timing.{flavour.tag}{version}.{'+'.join(archs)}.cache"
    engines_dir.mkdir(parents=True, exist_ok=True)
    for i, (name, source) in enumerate(sources.items(), start=1):
        onnx_path = source / "model.onnx"
        assert_tensorrt_compatible(onnx_path, name)
        exported = manifest.components[name]
        gemms = source_gemms(build_dir, manifest, recipe, name, source)
        key = fingerprint([BUILDER_VERSION, recipe.to_dict(), exported.key, flavour.target, version, archs,
                           str(source.relative_to(build_dir)), manifest.components.get(
                               Artifact.qdq_graph(recipe.name, name).entry, exported).key])

        def build(tmp: Path, name: str = name, source: Path = source, exported: ComponentEntry = exported,
                  gemms: list[Gemm] = gemms) -> StepOutput:
            census = build_engine(trt, flavour, source / "model.onnx", tmp / flavour.engine_name(name, version, archs),
                                  profile_shapes(exported), archs, cache_path, gemms)
            check_census(census, name, recipe.name)
            meta = {"target": flavour.target, "version": version, "architectures": list(archs),
                    "recipe": recipe.to_dict(), "source": str(source.relative_to(build_dir)), "census": census,
                    "weight_bytes": _weight_bytes(source)}
            return StepOutput(meta, exported.inputs, exported.outputs)

        entry, built = build_step(build_dir, manifest, Artifact.trt_engine(flavour.target, recipe.name, name), key,
                                  build)
        where = f"{flavour.target} [{i}/{len(sources)}] {name}"
        if built:
            summary = ", ".join(f"{k} x{n}" for k, n in sorted(entry.meta["census"]["summary"].items()))
            progress(f"{where}: {entry.meta['seconds']} s, {entry.files[0].size / 1e6:.1f} MB (graph weights "
                     f"{entry.meta['weight_bytes'] / 1e6:.1f} MB)" + (f", GEMM weights {summary}" if summary else ""))
        else:
            progress(f"{where}: up to date")
    return manifest


def _weight_bytes(source: Path) -> int:
    """The bytes of the graph's weights (its external data file): an engine's size is read against it."""
    data = source / "model.onnx.data"
    return data.stat().st_size if data.is_file() else 0
