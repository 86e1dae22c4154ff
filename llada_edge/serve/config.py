"""``ServeConfig``: what one server (or one Ray Serve replica) is started with; the CLI's flags map onto it."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from llada_edge.errors import InputError


@dataclass(frozen=True)
class ServeConfig:
    model: str  # a build folder (onnxruntime, tensorrt) or a checkpoint folder (torch)
    backend: str = "auto"
    precision: str = "fp32"  # which engines of a build
    device: str = "cpu"  # torch backend
    workers: int = 1  # pipelines, each with its own backend (engine sessions, KV cache), one request at a time
    queue_size: int = 8  # requests that may wait for a worker; one more is answered 429
    timeout: float = 600.0  # seconds per request, waiting included
    image_dirs: tuple[str, ...] = ()  # folders whose images a request may name by path
    output_dir: str | None = None  # where response_format "path" writes images
    model_name: str | None = None  # the id clients see (default: the model folder's name)
    # ONNX Runtime threads per worker. None: the CPUs this process may use, shared among its workers (a Ray
    # replica: its declared CPUs); without it every worker's sessions would take one thread per core.
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise InputError(f"workers must be >= 1, got {self.workers}")
        if self.queue_size < 0:
            raise InputError(f"queue size must be >= 0, got {self.queue_size}")
        if self.threads is not None and self.threads < 1:
            raise InputError(f"threads must be >= 1, got {self.threads}")
        if not self.timeout > 0:
            raise InputError(f"timeout must be > 0 seconds, got {self.timeout}")
        if not Path(self.model).is_dir():
            raise InputError(f"{self.model}: not a directory (expected a build or checkpoint folder)")
        for folder in self.image_dirs:
            if not Path(folder).is_dir():
                raise InputError(f"--image-dir {folder}: not a directory")

    @property
    def name(self) -> str:
        return self.model_name or Path(self.model).resolve().name

    @property
    def worker_threads(self) -> int:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        return self.threads or max(1, cpus // self.workers)

    @property
    def readable(self) -> tuple[Path, ...]:
        return tuple(Path(folder).resolve() for folder in self.image_dirs)

    @property
    def output(self) -> Path | None:
        return Path(self.output_dir).resolve() if self.output_dir else None

    def to_dict(self) -> dict[str, Any]:
        """Plain values (Ray passes this to each replica, a serve config file holds it)."""
        data = asdict(self)
        data["image_dirs"] = list(self.image_dirs)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ServeConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"unknown server option(s): {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        if "image_dirs" in data:
            data = {**data, "image_dirs": tuple(data["image_dirs"])}
        return cls(**data)
