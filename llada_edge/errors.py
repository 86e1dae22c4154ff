"""Errors that users see: each names the file (and key) that is wrong and what was expected.

The CLI turns any :class:`LladaEdgeError` into one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

from pathlib import Path


class LladaEdgeError(Exception):
    """A user-facing error: bad input, a broken checkpoint or build folder, a missing dependency."""

    def __init__(self, message: str, *, file: str | Path | None = None, key: str | None = None) -> None:
        self.file = str(file) if file is not None else None
        self.key = key
        where = ""
        if self.file is not None:
            where = f"{self.file}"
            if key is not None:
                where += f" [{key}]"
            where += ": "
        elif key is not None:
            where = f"[{key}]: "
        super().__init__(where + message)


class ConfigError(LladaEdgeError):
    """A config file is missing, unreadable, or has a missing/invalid field."""


class CheckpointError(LladaEdgeError):
    """A checkpoint folder is incomplete or corrupted (missing shard, truncated file, wrong keys/shapes)."""


class InputError(LladaEdgeError):
    """A request is invalid (image size, prompt, token budget, file type...)."""
