"""The build folder's ``manifest.json``: what was built from what, and whether it is still intact.

Layout of a build folder (design.md §4)::

    BUILD/manifest.json        this file's subject
    BUILD/onnx/<component>/... reference graphs (external data for > 2 GB)
    BUILD/quant/<recipe>/...   quantized graphs
    BUILD/engines/<target>/... TensorRT plans or ORT models
    BUILD/reports/...          accuracy reports, validation logs

Every step is keyed by a hash of its inputs (:func:`fingerprint`) so a re-run skips what is up to date,
and every write is atomic (:meth:`Manifest.save`; :mod:`~llada_edge.buildfolder.files`) so an interrupted
step leaves no half-written file that a later run could mistake for a finished one.

Only the standard library and numpy are imported here: the runtime reads manifests without torch/onnx.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from llada_edge.buildfolder.files import atomic_write_bytes, sha256_file
from llada_edge.errors import LladaEdgeError

FORMAT = "llada-edge-build"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
_RERUN = "re-run `llada-edge export`"


class BuildError(LladaEdgeError):
    """A build folder is missing, from an incompatible version, or was changed after the build."""


# --------------------------------------------------------------------------------------------- hashing


def _canonical(obj: object) -> object:
    """JSON stand-ins for the non-JSON values that appear in cache keys; anything else is an error.

    Falling back to ``repr`` would make keys depend on memory addresses, so unknown types fail loudly.
    """
    if isinstance(obj, os.PathLike):
        return Path(obj).as_posix()
    if isinstance(obj, np.ndarray):
        data = np.ascontiguousarray(obj)
        return {"ndarray": str(data.dtype), "shape": list(data.shape), "sha256": hashlib.sha256(data.data).hexdigest()}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return {"bytes_sha256": hashlib.sha256(obj).hexdigest()}
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=lambda v: json.dumps(v, sort_keys=True, default=_canonical))
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {type(obj).__name__: dataclasses.asdict(obj)}
    raise TypeError(f"cannot fingerprint a {type(obj).__name__}: convert it to JSON-compatible data first")


def fingerprint(items: Iterable[object]) -> str:
    """A stable cache key: sha256 of the canonical JSON (sorted keys, no whitespace) of ``items``."""
    text = json.dumps(list(items), sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=_canonical)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def versions_of(packages: list[str]) -> dict[str, str | None]:
    """Installed distribution versions (None when absent), recorded so a build can be reproduced."""
    found: dict[str, str | None] = {}
    for name in packages:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def _own_version() -> str:
    try:
        return metadata.version("llada-edge")
    except metadata.PackageNotFoundError:  # running from a source tree that was never installed
        return "0+unknown"


def _utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# ------------------------------------------------------------------------------------------- entries


def _require(data: dict[str, Any], key: str, kind: type | tuple[type, ...], file: Path, where: str) -> Any:
    """Fetch ``data[key]`` or raise a BuildError naming the manifest and the key path."""
    if key not in data:
        raise BuildError(f"missing field; {_RERUN}", file=file, key=f"{where}{key}")
    value = data[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise BuildError(f"expected {_kind_name(kind)}, got {type(value).__name__}", file=file, key=f"{where}{key}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join("null" if k is type(None) else k.__name__ for k in kinds)


_SEGMENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+=-]*")


def check_relative_path(value: str, file: Path, key: str) -> str:
    """A name or path taken from a manifest must stay inside the build folder: posix segments of letters,
    digits and ``_ . + = -`` (so no ``..``, no absolute path, no separator tricks)."""
    if not value or not all(_SEGMENT.fullmatch(part) for part in value.split("/")):
        raise BuildError(f"{value!r} escapes the build folder or is not a plain relative path (segments of "
                         f"letters, digits and _.+=- only); {_RERUN}", file=file, key=key)
    return value


@dataclass
class FileEntry:
    """One file of a component: its path relative to the build folder (posix), sha256 and size."""

    path: str
    sha256: str
    size: int

    @classmethod
    def of(cls, build_dir: str | os.PathLike[str], file: str | os.PathLike[str]) -> FileEntry:
        """Hash and measure ``file`` (absolute, or relative to ``build_dir``) as it is on disk now."""
        root = Path(build_dir)
        path = Path(file) if Path(file).is_absolute() else root / file
        rel = path.resolve().relative_to(root.resolve()).as_posix()
        return cls(path=rel, sha256=sha256_file(path), size=path.stat().st_size)

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256, "size": self.size}

    @classmethod
    def from_dict(cls, data: Any, file: Path, where: str) -> FileEntry:
        if not isinstance(data, dict):
            raise BuildError(f"expected an object, got {type(data).__name__}", file=file, key=where.rstrip("."))
        return cls(
            path=check_relative_path(_require(data, "path", str, file, where), file, f"{where}path"),
            sha256=_require(data, "sha256", str, file, where),
            size=_require(data, "size", int, file, where),
        )


@dataclass
class ComponentEntry:
    """A built artifact (an ONNX graph, a quantized graph, an engine) and what it was built from.

    ``key`` is the :func:`fingerprint` of its inputs: a step whose key matches is up to date.
    ``inputs``/``outputs`` map tensor names to ``{"dtype", "shape"}``; ``meta`` is free-form (opset,
    MoE lowering, precision recipe); ``validation`` holds the accuracy summary once it was checked.
    """

    name: str
    kind: str
    files: list[FileEntry]
    key: str
    inputs: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    validation: dict[str, Any] | None = None

    @property
    def dropped(self) -> bool:
        """An fp32 export whose graph a streaming build deleted once the engines derived from it were built: the
        entry keeps its key (what those engines are keyed by) and its I/O contract, not its files."""
        return bool(self.meta.get("dropped"))

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "files": [f.to_dict() for f in self.files],
            "key": self.key,
            "inputs": self.inputs,
            "outputs": self.outputs,
            "meta": self.meta,
            "validation": self.validation,
        }

    @classmethod
    def from_dict(cls, data: Any, file: Path, where: str) -> ComponentEntry:
        if not isinstance(data, dict):
            raise BuildError(f"expected an object, got {type(data).__name__}", file=file, key=where.rstrip("."))
        files = _require(data, "files", list, file, where)
        dropped = isinstance(data.get("meta"), dict) and bool(data["meta"].get("dropped"))
        if not files and not dropped:  # every loaded file must be listed, so an entry without files cannot be trusted
            raise BuildError(f"an entry must list its files; {_RERUN}", file=file, key=f"{where}files")
        return cls(
            name=check_relative_path(_require(data, "name", str, file, where), file, f"{where}name"),
            kind=_require(data, "kind", str, file, where),
            files=[FileEntry.from_dict(f, file, f"{where}files[{i}].") for i, f in enumerate(files)],
            key=_require(data, "key", str, file, where),
            inputs=_require(data, "inputs", dict, file, where),
            outputs=_require(data, "outputs", dict, file, where),
            meta=_require(data, "meta", dict, file, where),
            validation=_require(data, "validation", (dict, type(None)), file, where),
        )


# ------------------------------------------------------------------------------------------ manifest


@dataclass
class Manifest:
    """What a build folder holds and what it was built from (checkpoint, options, library versions)."""

    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    created: str = field(default_factory=_utc_now)
    llada_edge_version: str = field(default_factory=_own_version)
    checkpoint: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    components: dict[str, ComponentEntry] = field(default_factory=dict)
    reports: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "format_version": self.format_version,
            "created": self.created,
            "llada_edge_version": self.llada_edge_version,
            "checkpoint": self.checkpoint,
            "versions": self.versions,
            "options": self.options,
            "components": {name: c.to_dict() for name, c in self.components.items()},
            "reports": self.reports,
        }

    @classmethod
    def from_dict(cls, data: Any, file: str | os.PathLike[str] = MANIFEST_NAME) -> Manifest:
        """Parse and check a manifest dict; ``file`` only names the source in error messages."""
        src = Path(file)
        if not isinstance(data, dict):
            raise BuildError(f"expected a JSON object at the top level; {_RERUN}", file=src)
        _check_format(data, src)
        components = _require(data, "components", dict, src, "")
        return cls(
            format=data["format"],
            format_version=data["format_version"],
            created=_require(data, "created", str, src, ""),
            llada_edge_version=_require(data, "llada_edge_version", str, src, ""),
            checkpoint=_require(data, "checkpoint", dict, src, ""),
            versions=_require(data, "versions", dict, src, ""),
            options=_require(data, "options", dict, src, ""),
            components=_entries(components, src),
            reports=_require(data, "reports", dict, src, ""),
        )

    @classmethod
    def load(cls, build_dir: str | os.PathLike[str]) -> Manifest:
        """Read ``BUILD/manifest.json``; every failure names the file and says how to fix it."""
        path = _manifest_path(build_dir)
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise BuildError(f"malformed manifest.json (not UTF-8: {e.reason}); {_RERUN}", file=path) from e
        except OSError as e:
            raise BuildError(f"cannot read manifest.json: {e.strerror}", file=path) from e
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            msg = f"malformed manifest.json (line {e.lineno}, column {e.colno}: {e.msg}); {_RERUN}"
            raise BuildError(msg, file=path) from e
        except RecursionError:
            raise BuildError(f"malformed manifest.json (nested too deeply); {_RERUN}", file=path) from None
        return cls.from_dict(data, path)

    def save(self, build_dir: str | os.PathLike[str]) -> Path:
        """Write atomically: a crash leaves either the old manifest or the new one, never a torn file."""
        root = Path(build_dir)
        root.mkdir(parents=True, exist_ok=True)
        path = root / MANIFEST_NAME
        text = json.dumps(self.to_dict(), indent=2, sort_keys=False, ensure_ascii=False) + "\n"
        atomic_write_bytes(path, text.encode("utf-8"))
        return path

    def verify(
        self,
        build_dir: str | os.PathLike[str],
        components: Iterable[str] | None = None,
        full_hash: bool = True,
    ) -> None:
        """Check that the listed files are still what was built (exist, same size, same sha256).

        ``full_hash=False`` checks existence and size only: enough to catch a truncated copy without
        reading gigabytes at every start-up.
        """
        root = Path(build_dir)
        names = list(self.components) if components is None else list(components)
        listed = {f.path for entry in self.components.values() for f in entry.files}
        for name in names:
            if name not in self.components:
                known = ", ".join(sorted(self.components)) or "none"
                msg = f"component not in the manifest (it has: {known}); {_RERUN}"
                raise BuildError(msg, file=root / MANIFEST_NAME, key=name)
            files = self.components[name].files
            hint = _rerun_hint(self.components[name].kind)
            if self.components[name].dropped:
                raise BuildError(f"the fp32 graph was deleted by the streaming build once its engines were built "
                                 f"({self.components[name].meta['dropped']}); re-run `llada-edge stream` with "
                                 "--keep-graphs, or `llada-edge export`, to have it again",
                                 file=root / MANIFEST_NAME, key=name)
            for entry in files:
                _verify_file(root, name, entry, full_hash, hint)
            _refuse_unlisted(root, name, {PurePosixPath(f.path).parent for f in files}, listed)


    def intact(self, build_dir: str | os.PathLike[str], name: str) -> bool:
        """Whether a component's files are all there with their recorded sha256, and nothing unlisted beside them."""
        try:
            self.verify(build_dir, [name])
        except BuildError:
            return False
        return True


def _check_format(data: dict[str, Any], file: Path) -> None:
    """Reject other files named manifest.json, and manifests this version cannot read."""
    if data.get("format") != FORMAT:
        raise BuildError(
            f"not a llada-edge build manifest (format is {data.get('format')!r}, expected {FORMAT!r}); {_RERUN}",
            file=file,
            key="format",
        )
    version = data.get("format_version")
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise BuildError(
            f"built by an incompatible llada-edge build format {version} (this version reads "
            f"{FORMAT_VERSION}); {_RERUN}",
            file=file,
            key="format_version",
        )


def _entries(components: dict[str, Any], src: Path) -> dict[str, ComponentEntry]:
    entries = {}
    for name, data in components.items():
        entry = ComponentEntry.from_dict(data, src, f"components.{name}.")
        if entry.name != name:
            raise BuildError(f"the entry is named {entry.name!r}; {_RERUN}", file=src, key=f"components.{name}")
        entries[name] = entry
    return entries


def is_build_folder(path: str | os.PathLike[str]) -> bool:
    """A folder with a manifest.json (what ``auto`` backends and ``export`` tell apart from a checkpoint);
    anything by that name counts, so a broken one is reported as such rather than taken for a checkpoint."""
    manifest = Path(path) / MANIFEST_NAME
    return manifest.exists() or manifest.is_symlink()


def _manifest_path(build_dir: str | os.PathLike[str]) -> Path:
    root = Path(build_dir)
    hint = "run `llada-edge export` first"
    if not root.exists():
        raise BuildError(f"not a build folder: the folder does not exist; {hint}", file=root)
    if not root.is_dir():
        raise BuildError(f"not a build folder: it is a file, not a folder; {hint}", file=root)
    path = root / MANIFEST_NAME
    if not (path.exists() or path.is_symlink()):
        raise BuildError(f"not a build folder: no manifest.json; {hint}", file=path)
    if path.is_symlink() or not path.is_file():
        raise BuildError(f"manifest.json is not a regular file; {_RERUN}", file=path)
    return path


def _rerun_hint(entry_kind: str) -> str:
    command = {"onnx": "export", "files": "export", "calibration": "calibrate"}.get(entry_kind, "build")
    return f"re-run `llada-edge {command}`"


def _verify_file(root: Path, component: str, entry: FileEntry, full_hash: bool, hint: str = _RERUN) -> None:
    check_relative_path(entry.path, root / MANIFEST_NAME, component)  # checked at load; entries can be edited
    path = root.joinpath(*PurePosixPath(entry.path).parts)
    try:
        st = path.lstat()
    except OSError:
        raise BuildError(f"missing (listed in manifest.json for {component!r}); {hint}", file=path,
                         key=component) from None
    if not stat.S_ISREG(st.st_mode):  # a symlink could point anywhere: the build holds its own files only
        raise BuildError(f"not a regular file (a link or a device); {hint}", file=path, key=component)
    if not path.resolve().is_relative_to(root.resolve()):  # a linked parent folder
        raise BuildError(f"resolves outside the build folder; {hint}", file=path, key=component)
    if st.st_size != entry.size:
        msg = f"size differs: {st.st_size} bytes on disk, {entry.size} recorded (file changed after the build); {hint}"
        raise BuildError(msg, file=path, key=component)
    if full_hash and sha256_file(path) != entry.sha256:
        raise BuildError(f"sha256 mismatch (file changed after the build); {hint}", file=path, key=component)


def _refuse_unlisted(root: Path, component: str, folders: set[PurePosixPath], listed: set[str]) -> None:
    """Every file in a component's folders must be one the manifest lists: a graph loads its external data by
    name from its folder, so an unlisted file there would be loaded unchecked."""
    for folder in folders:
        if str(folder) == ".":
            continue
        base = root.joinpath(*folder.parts)
        for dirpath, dirnames, filenames in os.walk(base, followlinks=False):
            here = Path(dirpath)
            linked_dirs = [d for d in dirnames if (here / d).is_symlink()]
            for name in [*filenames, *linked_dirs]:
                rel = (here / name).relative_to(root).as_posix()
                if rel not in listed:
                    raise BuildError(f"not listed in manifest.json (the build did not write it); remove it or "
                                     f"{_RERUN}", file=here / name, key=component)


def record_component(build_dir: str | os.PathLike[str], manifest: Manifest, entry: ComponentEntry) -> None:
    """Register a finished component and persist at once, so a later crash cannot lose the record."""
    manifest.components[entry.name] = entry
    manifest.save(build_dir)
