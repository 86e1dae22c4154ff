"""Files of a build folder: streamed hashing and atomic writes (a crash leaves the old state or the new one).

Standard library only.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

_CHUNK = 8 << 20  # 8 MiB: large enough to stream multi-GB ONNX data quickly, small enough for any RAM.


def sha256_file(path: str | os.PathLike[str], chunk: int = _CHUNK) -> str:
    """The hex sha256 of a file, read in chunks so multi-GB weight files never sit in memory at once."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    """Make a rename durable; a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], payload: bytes) -> None:
    """Temp name, fsync, rename, fsync the folder: a crash leaves the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_tree(root: Path) -> None:
    """Flush every file under ``root`` before it is renamed into place (rename alone orders nothing)."""
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextlib.contextmanager
def atomic_dir(final_dir: str | os.PathLike[str], fsync: bool = True) -> Iterator[Path]:
    """Build a folder under a temporary sibling name and move it into place only when complete.

    Yields ``<parent>/.<name>.partial`` (emptied first: a stale one is a crashed earlier attempt). On
    success the old ``final_dir`` is swapped out and the new one renamed in; on any exception (Ctrl-C
    included) the temporary folder is deleted and the exception propagates, leaving ``final_dir``
    untouched. A crash mid-swap can at worst leave ``final_dir`` absent, which re-runs the step.
    """
    final = Path(final_dir)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.partial")
    old = final.with_name(f".{final.name}.old")
    for stale in (tmp, old):
        _remove(stale)
    tmp.mkdir()
    try:
        yield tmp
        if fsync:
            _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists() or final.is_symlink():
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    _remove(old)
