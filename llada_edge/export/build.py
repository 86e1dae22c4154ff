"""``llada-edge export``: a checkpoint folder -> a self-contained build folder of ONNX graphs.

    BUILD/manifest.json                 what was built from what (design.md §4)
    BUILD/model/                        the configs and tokenizer.json the runtime needs (no weights)
    BUILD/onnx/<component>/model.onnx   (+ model.onnx.data: weights as external data)
    BUILD/reports/                      validation.json / .md, polygraphy/<component>.{inputs,outputs}.json

Bounded memory: each component is built from only its own tensors, exported, validated and released
before the next one (the backbone one layer at a time), so peak memory is about one component.

Idempotent: each component is a :func:`~llada_edge.buildfolder.build_step` keyed by a hash of what it
depends on (its tensors' header entries, the sha256 of the shards holding them, its config fields, the
export options, the exporter version). An unchanged key with its files intact is skipped; a changed
checkpoint or option rebuilds only what it affects, and a copied checkpoint nothing. A component is written to a
temporary folder and renamed into place, then recorded in the manifest, so an interrupted export
leaves nothing that a later run (or the runtime) would trust.
"""

from __future__ import annotations

import contextlib
import io
import logging
import multiprocessing
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from llada_edge.buildfolder import (
    MANIFEST_NAME,
    MODEL_FILES,
    Artifact,
    BuildError,
    Manifest,
    StepOutput,
    build_lock,
    build_step,
    fingerprint,
    sha256_file,
    versions_of,
)
from llada_edge.buildfolder.files import SOURCE_HASHES, FileHashCache
from llada_edge.buildfolder.lock import LOCK_NAME
from llada_edge.buildfolder.memory import release_memory
from llada_edge.checkpoint import CheckpointFolder
from llada_edge.components import Component, ComponentSpec, Registry
from llada_edge.errors import InputError, LladaEdgeError
from llada_edge.export.validate import reference_outputs, validate_component, write_reports

MOE_LOWERINGS = ("dense", "ort")
EXPORTER_VERSION = 2  # bump when a graph changes, so older exports are rebuilt
ISOLATE_BYTES = 256 * 1024 * 1024  # components above this are exported in a fresh process
DEFAULT_OPSET = 20
# What the runtime needs from the checkpoint (no weights), copied to BUILD/model.
MODEL_FILES_COPIED = ["config.json", "tokenizer.json", "tokenizer_config.json", "image_tokenizer/config.json",
                      "image_tokenizer/preprocessor_config.json", "decoder/config.json", "decoder-turbo/config.json",
                      "vae/config.json"]
LIBRARIES = ["llada-edge", "torch", "onnx", "onnxruntime", "onnxscript", "nvidia-modelopt", "tensorrt"]

Progress = Callable[[str], None]
T = TypeVar("T")


class ValidationFailed(LladaEdgeError):
    """An exported graph disagrees with the reference beyond the tolerance (the files are kept)."""


# Peak resident memory of each fresh process, by the function it ran (what a streaming build reports per stage).
FRESH_PROCESS_PEAKS: list[tuple[str, int]] = []


def in_fresh_process(function: Callable[..., T], *args: Any) -> T:
    """``function(*args)`` in a spawned process (module-level function, picklable arguments): what a large
    component's export or rewrite leaves allocated (traced weights, protobuf copies, glibc arenas) goes with the
    process, so a build's peak memory stays at its largest single component. The child's peak RSS is appended to
    :data:`FRESH_PROCESS_PEAKS`."""
    ctx = multiprocessing.get_context("spawn")
    # A Pool, not a ProcessPoolExecutor: leaving its block on Ctrl-C terminates the child at once, where the
    # executor would wait for a minute-long export to finish first.
    pool = ctx.Pool(1)
    try:
        result, peak = pool.apply(_measured, (function, *args))
        pool.close()  # a clean exit: terminate() would leave the pool's semaphores for the resource tracker
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()
    FRESH_PROCESS_PEAKS.append((function.__name__, peak))
    return result


def _measured(function: Callable[..., T], *args: Any) -> tuple[T, int]:
    """``function(*args)`` and this process's peak resident memory in bytes (VmHWM)."""
    result = function(*args)
    with open("/proc/self/status", encoding="ascii") as status:
        peak = next((int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:")), 0)
    return result, peak


def isolate(graph: Path) -> bool:
    """Whether a graph's weights are large enough to process in a fresh process (:data:`ISOLATE_BYTES`)."""
    data = graph.with_name(graph.name + ".data")
    return data.is_file() and data.stat().st_size > ISOLATE_BYTES


def _trace_inputs(spec: ComponentSpec, cfg_vocab: int) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(0)
    out = {}
    for name, sig in spec.inputs.items():
        shape = sig.resolve(spec.trace_dims)
        if sig.dtype == "int64":
            out[name] = torch.from_numpy(rng.integers(0, min(cfg_vocab, 100), shape))
        elif sig.dtype == "bool":
            out[name] = torch.ones(shape, dtype=torch.bool)
        else:
            out[name] = torch.from_numpy(rng.standard_normal(shape).astype(np.float32))
    return out


def export_onnx(module: nn.Module, spec: ComponentSpec, path: Path, opset: int, vocab: int) -> None:
    """torch.onnx (dynamo) export with the spec's dynamic axes; weights as external data."""
    from torch.export import Dim

    args = _trace_inputs(spec, vocab)
    dynamic = {name: {axis: Dim.AUTO for axis in axes} for name, axes in spec.dynamic_axes().items()}
    # The exporter logs every missing optional library (torchvision...) and prints its progress.
    for name in ("torch.onnx", "onnxscript", "onnx_ir"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(module, tuple(args.values()), str(path), dynamo=True, input_names=list(spec.inputs),
                          output_names=list(spec.outputs), dynamic_shapes=dynamic, opset_version=opset,
                          external_data=True, optimize=True)
    _check_dynamic(spec, path)


def _check_dynamic(spec: ComponentSpec, path: Path) -> None:
    """Every axis the spec calls dynamic must be symbolic in the graph (the exporter may specialise)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    graph_inputs = {i.name: i for i in model.graph.input}
    for name, axes in spec.dynamic_axes().items():
        dims = graph_inputs[name].type.tensor_type.shape.dim
        fixed = [a for a in axes if dims[a].HasField("dim_value")]
        if fixed:
            raise BuildError(f"exporter fixed dynamic axes {fixed} of input {name!r}", file=path)


def model_files_step(ckpt: CheckpointFolder, out: Path, manifest: Manifest) -> None:
    """BUILD/model: the configs and tokenizer the runtime needs, keyed by their content."""
    sources = [rel for rel in MODEL_FILES_COPIED if (ckpt.root / rel).is_file()]

    def copy(tmp: Path) -> StepOutput:
        for rel in sources:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ckpt.root / rel, tmp / rel)
        return StepOutput()

    key = fingerprint([[rel, sha256_file(ckpt.root / rel)] for rel in sources])
    build_step(out, manifest, MODEL_FILES, key, copy)


def open_manifest(out: Path, ckpt: CheckpointFolder) -> Manifest:
    if out.exists() and not out.is_dir():
        raise InputError(f"{out} is a file, not a folder: choose another --out")
    if (out / MANIFEST_NAME).exists():
        return Manifest.load(out)  # an incompatible or broken manifest is an error, not silently replaced
    if out.is_dir() and any(p.name not in (LOCK_NAME, SOURCE_HASHES) for p in out.iterdir()):
        raise InputError(f"{out} exists, is not empty and has no {MANIFEST_NAME}: choose another --out")
    return Manifest(checkpoint={"path": str(ckpt.root)})


def export_component(checkpoint: str, name: str, moe: str, opset: int, validate: bool, reports_dir: str,
                     tmp_dir: str) -> dict[str, Any] | None:
    """Build, export and validate one component into ``tmp_dir``; returns its validation summary.

    Module-level (and picklable arguments only) so it can run in a spawned process.
    """
    ckpt = CheckpointFolder(checkpoint)
    component = Registry(ckpt.config)[name]
    spec = component.spec
    path = Path(tmp_dir) / "model.onnx"
    module = component.build_module(ckpt, moe)
    export_onnx(module, spec, path, opset, ckpt.config.backbone.vocab_size)
    cases = component.validation_cases(np.random.default_rng(0)) if validate else []
    references = reference_outputs(module, cases, list(spec.outputs))
    del module  # before ORT loads the same weights: one copy in memory at a time
    release_memory()
    if not validate:
        return None
    return validate_component(name, path, cases, references, list(spec.outputs), Path(reports_dir),
                              component.validation_tolerances)


def export_key(ckpt: CheckpointFolder, component: Component, moe: str, opset: int, hashes: FileHashCache) -> str:
    """An export's key: the exporter, the component, its MoE lowering, the opset, its I/O and its source tensors."""
    return fingerprint([EXPORTER_VERSION, component.name, component.moe_lowering(moe), opset, component.spec.io_dict(),
                        component.source_fingerprint(ckpt, hashes.sha256)])


def export_step(ckpt: CheckpointFolder, out: Path, manifest: Manifest, component: Component, moe: str,
                 opset: int, validate: bool, hashes: FileHashCache) -> tuple[dict[str, Any] | None, bool]:
    """One component's export as a build step; returns (its validation summary, whether it ran now)."""
    spec = component.spec
    lowering = component.moe_lowering(moe)
    key = export_key(ckpt, component, moe, opset, hashes)
    job = (str(ckpt.root), component.name, moe, opset, validate, str(out / "reports"))

    def export(tmp: Path) -> StepOutput:
        if component.weight_bytes(ckpt) > ISOLATE_BYTES:
            # A fresh process per large component: the exporter keeps references to the weights it
            # traced, so only process exit bounds the memory to one component at a time.
            validation = in_fresh_process(export_component, *job, str(tmp))
        else:
            validation = export_component(*job, str(tmp))
        io = spec.io_dict()
        return StepOutput({"opset": opset, "moe": lowering, "profile": io["profile"]}, io["inputs"], io["outputs"],
                          validation)

    entry, built = build_step(out, manifest, Artifact.onnx(component.name), key, export,
                              reuse=lambda e: not validate or (e.validation is not None and e.validation["passed"]))
    return entry.validation, built


def record_export_options(manifest: Manifest, ckpt: CheckpointFolder, moe: str, opset: int) -> None:
    """What the exported graphs were made from and with (the checkpoint's fingerprint is its exports' keys)."""
    manifest.checkpoint = {"path": str(ckpt.root.resolve()), "fingerprint": fingerprint(
        [e.key for n, e in sorted(manifest.components.items()) if e.kind == "onnx"])}
    manifest.versions = versions_of(LIBRARIES)
    manifest.options = {"moe": moe, "opset": opset, "precision": "fp32"}


def export_build(checkpoint: str | Path, out: str | Path, components: list[str] | None = None, moe: str = "dense",
                 opset: int = DEFAULT_OPSET, validate: bool = True, progress: Progress = print) -> Manifest:
    """Export (and validate) the selected components; returns the saved manifest."""
    if moe not in MOE_LOWERINGS:
        raise InputError(f"unknown MoE lowering {moe!r} (expected one of {list(MOE_LOWERINGS)})")
    ckpt = CheckpointFolder(checkpoint)
    out = Path(out).absolute()
    selected = Registry(ckpt.config).select(components)
    open_manifest(out, ckpt)  # before the lock file is created: refuse a folder that is not a build
    with build_lock(out, "exporting"):
        return _export_locked(ckpt, out, selected, moe, opset, validate, progress)


def _export_locked(ckpt: CheckpointFolder, out: Path, selected: list[Component], moe: str, opset: int,
                   validate: bool, progress: Progress) -> Manifest:
    manifest = open_manifest(out, ckpt)
    model_files_step(ckpt, out, manifest)
    failures = []
    hashes = FileHashCache(out / SOURCE_HASHES)
    for i, component in enumerate(selected, start=1):
        validation, built = export_step(ckpt, out, manifest, component, moe, opset, validate, hashes)
        where = f"export [{i}/{len(selected)}] {component.name}"
        if not built:
            progress(f"{where}: up to date")
            continue
        summary = "" if validation is None else (
            f", max rel err {validation['max_rel']:.1e}" + ("" if validation["passed"] else " FAILED"))
        progress(f"{where}: {manifest.components[component.name].meta['seconds']:.1f} s{summary}")
        if validation is not None and not validation["passed"]:
            failures.append(component.name)
    record_export_options(manifest, ckpt, moe, opset)
    validations = {n: e.validation for n, e in manifest.components.items() if e.validation is not None}
    if validations:
        write_reports(out / "reports", validations)
        manifest.reports["validation"] = "reports/validation.json"
    manifest.save(out)
    if failures:
        raise ValidationFailed(f"validation failed for {', '.join(failures)} (see reports/validation.md)",
                               file=out)
    return manifest
