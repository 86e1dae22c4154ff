"""Bounded memory between the stages of a build step."""

from __future__ import annotations

import contextlib
import ctypes
import gc


def release_memory() -> None:
    """Collect, then hand freed heap back to the OS (glibc keeps large freed arenas otherwise, and a process that
    loads one large graph after another would grow by each instead of staying at the largest)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
