"""``llada-edge stream``: checkpoint -> ONNX Runtime engines one component at a time, with bounded disk and memory.

``export`` then ``build`` keep every fp32 graph: for the real 16B backbone that is ~64 GB of disk before a single
engine exists. The streaming build runs, per component (the backbone one layer at a time):

    export (fp32 graph) -> the engine of every requested precision -> delete the fp32 graph

so peak disk is the finished build plus one component's fp32 graph, and peak memory is one component's (large
components are exported and rewritten in a fresh process each, :func:`~llada_edge.export.build.in_fresh_process`).

It uses the same keyed, atomic steps as ``export`` and ``build`` (:func:`~llada_edge.buildfolder.build_step`), so it
is resumable: an interrupted run continues with the first component whose engines are not all up to date, and a
partial file is never trusted (each step writes a temporary folder and renames it into place). A deleted export
stays in the manifest as a *dropped* entry: its key (which its engines are keyed by) and I/O contract, no files.
Components that no recipe rewrites (the embedding table, the VAE, the SigVQ embedding) keep their fp32 graph: the
runtime runs them as exported.

The accuracy report compares each engine with its fp32 graph, so it needs ``--keep-graphs`` (or a regular export).
"""

from __future__ import annotations

import json
import resource
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llada_edge.buildfolder import Artifact, Manifest, atomic_write_bytes, build_lock, is_up_to_date
from llada_edge.buildfolder.files import SOURCE_HASHES, FileHashCache
from llada_edge.buildfolder.manifest import record_component
from llada_edge.calibration.recipes import Recipe, get_recipe
from llada_edge.checkpoint import CheckpointFolder
from llada_edge.components import Component, Registry
from llada_edge.engines.build import ort_engine_key, ort_engine_step
from llada_edge.errors import InputError
from llada_edge.export.build import (
    DEFAULT_OPSET,
    FRESH_PROCESS_PEAKS,
    MOE_LOWERINGS,
    ValidationFailed,
    export_key,
    export_step,
    model_files_step,
    open_manifest,
    record_export_options,
)

Progress = Callable[[str], None]


@dataclass
class StreamStats:
    """What a streaming build cost: per-component seconds by stage, and the peaks it reached."""

    seconds: dict[str, dict[str, float]] = field(default_factory=dict)
    peak_disk_bytes: int = 0  # the build folder at its largest (checked after every step)
    final_disk_bytes: int = 0
    peak_rss_bytes: int = 0  # this process and the largest of its finished children
    skipped: list[str] = field(default_factory=list)  # components already up to date
    # each component's fresh processes (export, then one engine per precision when large): their peak RSS
    child_rss_bytes: dict[str, list[int]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"seconds": self.seconds, "peak_disk_bytes": self.peak_disk_bytes,
                "final_disk_bytes": self.final_disk_bytes, "peak_rss_bytes": self.peak_rss_bytes,
                "child_rss_bytes": self.child_rss_bytes, "skipped": self.skipped}


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def peak_rss_bytes() -> int:
    """Peak resident memory of this process and of the largest child it waited for (Linux reports KiB)."""
    return 1024 * max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                      resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)


def stream_build(checkpoint: str | Path, out: str | Path, precisions: list[str], moe: str = "ort",
                 components: list[str] | None = None, overrides: dict[str, str] | None = None,
                 keep_graphs: bool = False, validate: bool = True, opset: int = DEFAULT_OPSET,
                 progress: Progress = print) -> StreamStats:
    """``llada-edge stream``: export and build each component's ONNX Runtime engines for ``precisions`` (the same
    ``overrides`` for each), then delete its fp32 graph unless ``keep_graphs``; returns what it cost."""
    if moe not in MOE_LOWERINGS:
        raise InputError(f"unknown MoE lowering {moe!r} (expected one of {list(MOE_LOWERINGS)})")
    if not precisions:
        raise InputError("name at least one --precision to build")
    recipes = [get_recipe(p, overrides) for p in dict.fromkeys(precisions)]
    floats = [r.name for r in recipes if r.is_float or r.dtype != "fp32"]
    if floats:
        raise InputError(f"the streaming build makes ONNX Runtime engines of quantized recipes (fp8, int8, int4, "
                         f"mixed); {floats[0]} is not one (fp32 runs the exported graphs: use `llada-edge export`)")
    ckpt = CheckpointFolder(checkpoint)
    out = Path(out).absolute()
    selected = Registry(ckpt.config).select(components)
    open_manifest(out, ckpt)  # refuse a folder that is not a build before creating its lock file
    with build_lock(out, "streaming build"):
        return _stream_locked(ckpt, out, selected, recipes, moe, opset, validate, keep_graphs, progress)


def _stream_locked(ckpt: CheckpointFolder, out: Path, selected: list[Component], recipes: list[Recipe], moe: str,
                   opset: int, validate: bool, keep_graphs: bool, progress: Progress) -> StreamStats:
    manifest = open_manifest(out, ckpt)
    model_files_step(ckpt, out, manifest)
    hashes = FileHashCache(out / SOURCE_HASHES)
    stats = StreamStats(peak_disk_bytes=folder_bytes(out))
    failures = []
    for i, component in enumerate(selected, start=1):
        where = f"stream [{i}/{len(selected)}] {component.name}"
        if _up_to_date(ckpt, out, manifest, component, recipes, moe, opset, validate, hashes):
            if component.quantized and not keep_graphs and not manifest.components[component.name].dropped:
                _drop_export(out, manifest, component, [r.name for r in recipes])  # a run stopped before this
            stats.skipped.append(component.name)
            progress(f"{where}: up to date")
            continue
        seconds: dict[str, float] = {}
        FRESH_PROCESS_PEAKS.clear()
        start = time.perf_counter()
        validation, _ = export_step(ckpt, out, manifest, component, moe, opset, validate, hashes)
        seconds["export"] = time.perf_counter() - start
        stats.peak_disk_bytes = max(stats.peak_disk_bytes, folder_bytes(out))
        if validation is not None and not validation["passed"]:
            failures.append(component.name)  # engines of a graph that disagrees with the reference are not built
            progress(f"{where}: export FAILED validation (max rel err {validation['max_rel']:.1e})")
            continue
        if component.quantized:
            for recipe in recipes:
                start = time.perf_counter()
                ort_engine_step(out, manifest, recipe, component)
                seconds[recipe.name] = time.perf_counter() - start
                stats.peak_disk_bytes = max(stats.peak_disk_bytes, folder_bytes(out))
            if not keep_graphs:
                _drop_export(out, manifest, component, [r.name for r in recipes])
        stats.seconds[component.name] = {k: round(v, 1) for k, v in seconds.items()}
        stats.child_rss_bytes[component.name] = [peak for _, peak in FRESH_PROCESS_PEAKS]
        stats.peak_rss_bytes = peak_rss_bytes()
        children = ", ".join(f"{peak / 1e9:.2f}" for _, peak in FRESH_PROCESS_PEAKS)
        progress(f"{where}: " + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items())
                 + f"; build folder {folder_bytes(out) / 1e9:.2f} GB, peak RSS {stats.peak_rss_bytes / 1e9:.2f} GB"
                 + (f" (fresh processes: {children} GB)" if children else ""))
    record_export_options(manifest, ckpt, moe, opset)
    manifest.options["streamed"] = {"precisions": [r.name for r in recipes], "kept_graphs": keep_graphs}
    manifest.save(out)
    stats.final_disk_bytes = folder_bytes(out)
    stats.peak_rss_bytes = peak_rss_bytes()
    _record_stats(out, stats)
    if failures:
        raise ValidationFailed(f"validation failed for {', '.join(failures)} (see reports/validation.md in the build "
                               "folder); their engines were not built", file=out)
    return stats


STATS_FILE = "reports/stream.json"


def _record_stats(out: Path, stats: StreamStats) -> None:
    """BUILD/reports/stream.json: the cost of the whole build over all its runs (a resumed run adds the components it
    built to those of earlier runs; peaks are the largest seen), what `make bench FULL=` reports."""
    path = out / STATS_FILE
    merged = stats.to_dict()
    if path.is_file():
        try:
            earlier = json.loads(path.read_text(encoding="utf-8"))
            merged["seconds"] = {**earlier.get("seconds", {}), **stats.seconds}
            merged["child_rss_bytes"] = {**earlier.get("child_rss_bytes", {}), **stats.child_rss_bytes}
            for key in ("peak_disk_bytes", "peak_rss_bytes"):
                merged[key] = max(int(earlier.get(key, 0)), merged[key])
        except (ValueError, AttributeError, TypeError):
            pass  # a damaged record is replaced by this run's
    merged.pop("skipped", None)
    atomic_write_bytes(path, (json.dumps(merged, indent=2) + "\n").encode("utf-8"))


def _up_to_date(ckpt: CheckpointFolder, out: Path, manifest: Manifest, component: Component, recipes: list[Recipe],
                moe: str, opset: int, validate: bool, hashes: FileHashCache) -> bool:
    """Whether nothing is left to do for a component: its export is recorded under the key it would have now
    (files kept, or dropped after its engines were built) and every requested engine is up to date."""
    entry = manifest.components.get(component.name)
    if entry is None or entry.key != export_key(ckpt, component, moe, opset, hashes):
        return False
    if validate and entry.validation is None:
        return False
    if not entry.dropped and not manifest.intact(out, component.name):
        return False
    if not component.quantized:
        return not entry.dropped
    return all(is_up_to_date(out, manifest, Artifact.ort_engine(r.name, component.name).entry,
                             ort_engine_key(manifest, r, component)) for r in recipes)


def _drop_export(out: Path, manifest: Manifest, component: Component, kept: list[str]) -> None:
    """Delete a component's fp32 graph, keeping its entry (key, I/O) marked dropped. The folder goes first: a crash
    in between leaves an entry whose files are missing, which a re-run treats as not built (never as intact)."""
    entry = manifest.components[component.name]
    shutil.rmtree(out / Artifact.onnx(component.name).folder, ignore_errors=True)
    entry.files = []
    entry.meta = {**entry.meta, "dropped": f"kept engines: {', '.join(kept)}"}
    record_component(out, manifest, entry)
