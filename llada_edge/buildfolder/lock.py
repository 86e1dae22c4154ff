"""One writer per build folder: ``export``, ``build``, ``calibrate`` and ``quantize`` hold an exclusive lock on
``BUILD/.lock`` (``flock``; the kernel releases it when the process dies, so a crash leaves no stale lock), and
a backend opening the folder checks that no writer holds it.

Two writers would otherwise each save a manifest that lacks the other's components, or collide in the same
temporary folder. Within one process the lock is re-entrant (``build`` runs ``calibrate``).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from llada_edge.buildfolder.manifest import BuildError

LOCK_NAME = ".lock"
_held: dict[str, tuple[int, int]] = {}  # resolved build folder -> (fd, depth) held by this process


def _holder(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 64).decode("ascii", "replace").strip()
    return f"PID {text}" if text.isdigit() else "another process"


@contextlib.contextmanager
def build_lock(build_dir: str | os.PathLike[str], what: str = "writing") -> Iterator[None]:
    """Hold the folder's exclusive lock for the duration, or fail at once naming the holder."""
    root = Path(build_dir).resolve()
    key = str(root)
    if key in _held:
        fd, depth = _held[key]
        _held[key] = (fd, depth + 1)
        try:
            yield
        finally:
            _held[key] = (fd, _held[key][1] - 1)
        return
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BuildError(f"the build folder is in use by {_holder(fd)} (an export, build or calibration); "
                             f"wait for it to finish before {what}", file=root) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _held[key] = (fd, 1)
        try:
            yield
        finally:
            del _held[key]
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # closing releases the lock


def check_not_being_written(build_dir: str | os.PathLike[str]) -> None:
    """A reader's check: refuse a folder that a writer (another process) is changing right now."""
    root = Path(build_dir).resolve()
    path = root / LOCK_NAME
    if str(root) in _held or not path.is_file():
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BuildError(f"the build folder is being written by {_holder(fd)}; run it once that finishes",
                             file=root) from None
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
