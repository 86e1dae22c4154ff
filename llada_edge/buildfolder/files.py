"""Files of a build folder: streamed hashing (remembered per process, and for source files across runs) and atomic
writes (a crash leaves the old state or the new one).

Standard library only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

_CHUNK = 8 << 20  # 8 MiB: large enough to stream multi-GB ONNX data quickly, small enough for any RAM.


# Hashes computed in this process, by file identity: (device, inode, size, mtime, ctime). Any write to a file
# changes its ctime (which no tool can set back), so an entry is only reused for the very same bytes; it spares
# re-reading gigabytes when a build verifies what it just wrote, or a backend what the build verified.
_HASHED: dict[tuple[int, int, int, int, int], str] = {}
_RACY_NS = 2_000_000_000


def sha256_file(path: str | os.PathLike[str], chunk: int = _CHUNK) -> str:
    """The hex sha256 of a file, read in chunks so multi-GB weight files never sit in memory at once."""
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        if identity in _HASHED:
            return _HASHED[identity]
        digest = hashlib.sha256()
        while block := f.read(chunk):
            digest.update(block)
    # Remembered only when unchanged while read and not changed within the last seconds: file timestamps are
    # coarse (milliseconds), so a write right after this one could keep the same identity ("racy" entries).
    if os.stat(path).st_ctime_ns == st.st_ctime_ns and time.time_ns() - st.st_ctime_ns > _RACY_NS:
        _HASHED[identity] = digest.hexdigest()
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


SOURCE_HASHES = ".source-hashes.json"  # where a build folder keeps its FileHashCache


class FileHashCache:
    """sha256 of source files (checkpoint shards) remembered across runs, by file identity (real path, inode, size,
    mtime, ctime), in a JSON file of the build folder. Cache keys built from content hashes stay the same when a
    checkpoint is copied elsewhere (its shards are hashed once more, then every step is found up to date), and
    change when a shard's bytes change even if its size and mtime were kept."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._known: dict[str, str] = {}
        try:
            loaded = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            loaded = {}  # missing or damaged: a cache only, rebuilt by hashing again
        if isinstance(loaded, dict):
            self._known = {k: v for k, v in loaded.items() if isinstance(k, str) and isinstance(v, str)}

    def sha256(self, file: str | os.PathLike[str]) -> str:
        real = os.path.realpath(file)
        st = os.stat(real)
        identity = f"{real}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}"
        if identity not in self._known:
            digest = sha256_file(real)
            if time.time_ns() - st.st_ctime_ns <= _RACY_NS:
                return digest  # too fresh to remember (see sha256_file)
            self._known[identity] = digest
            atomic_write_bytes(self.path, json.dumps(self._known, indent=0, sort_keys=True).encode("utf-8"))
        return self._known[identity]
