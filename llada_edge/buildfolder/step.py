"""One keyed, atomic build step: what every producer of a build folder (export, calibration, ONNX Runtime
engines, ModelOpt Q/DQ graphs, TensorRT plans) goes through.

A step has an :class:`Artifact` (its manifest entry, its kind and its folder) and a key, the
:func:`~llada_edge.buildfolder.manifest.fingerprint` of everything it is built from. :func:`build_step`

1. skips it when the manifest records the same key and every recorded file is still there with its
   recorded sha256 and nothing unlisted beside them (:func:`is_up_to_date`, the one definition of "up to
   date": the same check as the runtime's, so whatever the runtime refuses, a re-run rebuilds);
2. otherwise runs ``produce(tmp)`` into a temporary folder that is renamed into place only once complete
   (:func:`~llada_edge.buildfolder.files.atomic_dir`);
3. hashes the files and records the entry in the manifest at once (saved atomically), so a crash later
   cannot lose the record and a crash earlier leaves nothing that a re-run would trust.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from llada_edge.buildfolder.files import atomic_dir
from llada_edge.buildfolder.manifest import (
    MANIFEST_NAME,
    ComponentEntry,
    FileEntry,
    Manifest,
    check_relative_path,
    record_component,
)


@dataclass(frozen=True)
class Artifact:
    """Where a step's output lives: its manifest entry, its kind, and its folder (relative, posix)."""

    entry: str
    kind: str
    folder: str

    @classmethod
    def onnx(cls, component: str) -> Artifact:
        """An exported fp32 graph: ``onnx/<component>/model.onnx``."""
        return cls(component, "onnx", f"onnx/{component}")

    @classmethod
    def ort_engine(cls, precision: str, component: str) -> Artifact:
        """A graph rewritten for an ONNX Runtime precision recipe."""
        return cls(f"onnxruntime/{precision}/{component}", "ort-engine", f"engines/onnxruntime/{precision}/{component}")

    @classmethod
    def qdq_graph(cls, precision: str, component: str) -> Artifact:
        """A GPU graph (ModelOpt Q/DQ and/or fp16/bf16), the input of a TensorRT engine."""
        return cls(f"qdq/{precision}/{component}", "qdq", f"quant/{precision}/{component}")

    @classmethod
    def trt_engine(cls, target: str, precision: str, component: str) -> Artifact:
        """A TensorRT plan of a target (``tensorrt`` or ``tensorrt-rtx``)."""
        return cls(f"{target}/{precision}/{component}", "trt-engine", f"engines/{target}/{precision}/{component}")


MODEL_FILES = Artifact("model", "files", "model")  # configs + tokenizer: what the runtime needs from the checkpoint
CALIBRATION = Artifact("calibration", "calibration", "calibration")  # activations captured in the sampling loops


@dataclass
class StepOutput:
    """What ``produce`` reports about the files it wrote (recorded in the manifest entry)."""

    meta: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, Any] = field(default_factory=dict)
    validation: dict[str, Any] | None = None


def is_up_to_date(build_dir: Path, manifest: Manifest, name: str, key: str) -> bool:
    """Same key, and the entry's files intact (sha256; hashes are remembered per process, see ``files``)."""
    entry = manifest.components.get(name)
    return entry is not None and entry.key == key and manifest.intact(build_dir, name)


def artifact_dir(build_dir: Path, artifact: Artifact) -> Path:
    """The artifact's folder, refusing any name that would climb out of the build folder (the manifest's rule)."""
    check_relative_path(artifact.folder, build_dir / MANIFEST_NAME, artifact.entry)
    return build_dir.joinpath(*PurePosixPath(artifact.folder).parts)


def build_step(build_dir: Path, manifest: Manifest, artifact: Artifact, key: str,
               produce: Callable[[Path], StepOutput],
               reuse: Callable[[ComponentEntry], bool] | None = None) -> tuple[ComponentEntry, bool]:
    """Run one step unless it is up to date; returns (its manifest entry, whether it was built now).

    ``reuse`` can refuse an up-to-date entry for a reason the key does not capture (an export that was
    not validated, when validation is now asked for).
    """
    existing = manifest.components.get(artifact.entry)
    if existing is not None and is_up_to_date(build_dir, manifest, artifact.entry, key) and (
            reuse is None or reuse(existing)):
        return existing, False
    folder = artifact_dir(build_dir, artifact)
    start = time.perf_counter()
    with atomic_dir(folder) as tmp:
        out = produce(tmp)
    files = [FileEntry.of(build_dir, p) for p in sorted(folder.rglob("*")) if p.is_file()]
    meta = {**out.meta, "seconds": round(time.perf_counter() - start, 2)}
    entry = ComponentEntry(artifact.entry, artifact.kind, files, key, out.inputs, out.outputs, meta, out.validation)
    record_component(build_dir, manifest, entry)
    return entry, True
