"""The build folder, bottom layer of the toolchain (design.md §4): imported by export, calibration, engines and
the runtime, importing none of them (standard library and numpy only).

* :mod:`~llada_edge.buildfolder.files`: streamed sha256, atomic file and folder writes;
* :mod:`~llada_edge.buildfolder.manifest`: ``manifest.json`` (entries, file hashes, verification, cache keys);
* :mod:`~llada_edge.buildfolder.step`: artifact names and the one keyed, atomic :func:`build_step`;
* :mod:`~llada_edge.buildfolder.lock`: one writer per folder (``build_lock``), readers refuse a folder being written.
"""

from llada_edge.buildfolder.files import atomic_dir, atomic_write_bytes, sha256_file
from llada_edge.buildfolder.lock import build_lock, check_not_being_written
from llada_edge.buildfolder.manifest import (
    MANIFEST_NAME,
    BuildError,
    ComponentEntry,
    FileEntry,
    Manifest,
    fingerprint,
    is_build_folder,
    versions_of,
)
from llada_edge.buildfolder.step import CALIBRATION, MODEL_FILES, Artifact, StepOutput, build_step, is_up_to_date

__all__ = [
    "CALIBRATION",
    "MANIFEST_NAME",
    "MODEL_FILES",
    "Artifact",
    "BuildError",
    "ComponentEntry",
    "FileEntry",
    "Manifest",
    "StepOutput",
    "atomic_dir",
    "atomic_write_bytes",
    "build_lock",
    "build_step",
    "check_not_being_written",
    "fingerprint",
    "is_build_folder",
    "is_up_to_date",
    "sha256_file",
    "versions_of",
]
