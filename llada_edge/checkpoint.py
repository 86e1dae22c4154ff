"""Lazy, streaming reading of safetensors checkpoints (sharded through an index, or single files).

Why our own read path instead of ``safetensors.safe_open``: ``safe_open`` memory-maps each shard and
keeps the mapping open, so every page a read touches stays resident and the process RSS grows to
the size of the checkpoint as one walks through it. Here a tensor is one ``pread`` of exactly its
bytes into a fresh buffer: peak memory is one tensor, whatever the model size (measured in
``tests/test_checkpoint.py``). The format itself is trivial (8-byte little-endian header length, a
JSON header with dtype/shape/data_offsets, then the raw data), and writing still goes through the
``safetensors`` library.

Every failure names the file, and where it applies the key: a missing shard, a truncated or
corrupted shard, an index pointing at a key its shard lacks, a tensor whose byte length does not
match its shape. :func:`validate` compares the keys and shapes against an expected
:mod:`llada_edge.layout` and lists what is missing, unexpected or mis-shaped.

Header parsing and validation need no torch; :meth:`TensorReader.get` imports it.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from llada_edge.errors import CheckpointError
from llada_edge.layout import DTYPE_SIZES, FLOAT_DTYPES, Layout

if TYPE_CHECKING:
    import torch

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors limit


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, dtype, shape and absolute byte range."""

    key: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def read_header(path: str | Path) -> dict[str, TensorInfo]:
    """Parse one safetensors file's header and check it the way the format defines it: every entry a dtype, a
    shape of non-negative integers and ``data_offsets`` [begin, end] matching them, and the byte ranges tiling
    the data area exactly (from 0, no gap, no overlap, up to the end of the file), as the safetensors library
    requires. Anything else would read garbage or other tensors' bytes."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError("file not found" if not path.exists() else "not a regular file", file=path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        raw_len = fh.read(8)
        if len(raw_len) < 8:
            raise CheckpointError(f"truncated safetensors file ({size} bytes, no header)", file=path)
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
            raise CheckpointError(f"corrupted or truncated safetensors header (the header length does not fit "
                                  f"the file's {size} bytes)", file=path)
        raw = fh.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"corrupted safetensors header ({exc})", file=path) from None
    except RecursionError:
        raise CheckpointError("corrupted safetensors header (nested too deeply)", file=path) from None
    if not isinstance(header, dict):
        raise CheckpointError("corrupted safetensors header (not a JSON object)", file=path)
    data_start = 8 + header_len
    out = {key: _tensor_info(path, key, entry, data_start) for key, entry in header.items() if key != "__metadata__"}
    _check_tiling(path, sorted(out.values(), key=lambda i: (i.begin, i.end)), data_start, size)
    return out


def _is_index(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _tensor_info(path: Path, key: str, entry: object, data_start: int) -> TensorInfo:
    if not isinstance(entry, dict):
        raise CheckpointError("corrupted header entry (not an object)", file=path, key=key)
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise CheckpointError(f"unsupported dtype {dtype!r}", file=path, key=key)
    if not isinstance(shape, list) or not all(_is_index(d) for d in shape):
        raise CheckpointError(f"corrupted header entry: shape {shape!r} is not a list of non-negative integers",
                              file=path, key=key)
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_index(o) for o in offsets):
        raise CheckpointError(f"corrupted header entry: data_offsets {offsets!r} is not two non-negative integers",
                              file=path, key=key)
    begin, end = offsets
    info = TensorInfo(key, path, dtype, tuple(shape), data_start + begin, data_start + end)
    if begin > end or info.nbytes != info.numel * DTYPE_SIZES[dtype]:
        raise CheckpointError(f"byte range {begin}..{end} does not match shape {list(shape)} {dtype}",
                              file=path, key=key)
    return info


def _check_tiling(path: Path, infos: list[TensorInfo], data_start: int, size: int) -> None:
    position = data_start
    for info in infos:
        if info.begin != position:
            what = "overlaps the previous tensor" if info.begin < position else "leaves a gap before it"
            raise CheckpointError(f"invalid data_offsets: the byte range {what}", file=path, key=info.key)
        position = info.end
    if position > size:
        key = infos[-1].key if infos else None
        raise CheckpointError(f"truncated: tensor needs bytes up to {position}, file has {size}", file=path, key=key)
    if position < size:
        raise CheckpointError(f"invalid data_offsets: {size - position} bytes after the last tensor belong to none",
                              file=path)


def _inside(relative: str) -> bool:
    """A relative path that stays in its folder (links are the user's own business: hub caches use them)."""
    norm = os.path.normpath(relative)
    return bool(relative) and not os.path.isabs(relative) and norm != ".." and not norm.startswith(("../", "..\\"))


def bf16_to_float32(raw: np.ndarray) -> np.ndarray:
    """bfloat16 bits (uint16) -> float32, exactly (bf16 is the top half of an fp32)."""
    return (raw.astype(np.uint32) << 16).view(np.float32)


_NUMPY_DTYPES = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "I64": np.int64, "I32": np.int32,
                 "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


@dataclass
class TensorReader:
    """A set of safetensors files read as one key space, one tensor at a time.

    Build it with :meth:`from_folder` (index.json, else model.safetensors) or :meth:`from_files`.
    """

    tensors: dict[str, TensorInfo]
    source: Path
    files: list[Path] = field(default_factory=list)

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def from_files(cls, files: Iterable[str | Path], source: str | Path | None = None) -> TensorReader:
        paths = [Path(f) for f in files]
        tensors: dict[str, TensorInfo] = {}
        for f in paths:
            for key, info in read_header(f).items():
                if key in tensors:
                    raise CheckpointError(f"key also stored in {tensors[key].file.name}", file=f, key=key)
                tensors[key] = info
        return cls(tensors, Path(source) if source else (paths[0].parent if paths else Path(".")), paths)

    @classmethod
    def from_folder(cls, folder: str | Path, index_name: str = INDEX_NAME,
                    single_name: str = SINGLE_NAME) -> TensorReader:
        """The root backbone layout: ``model.safetensors.index.json`` + shards, or one file."""
        folder = Path(folder)
        index = folder / index_name
        if index.is_file():
            return cls.from_index(index)
        if (folder / single_name).is_file():
            return cls.from_files([folder / single_name], source=folder / single_name)
        raise CheckpointError(f"no {index_name} or {single_name} found", file=folder)

    @classmethod
    def from_index(cls, index: Path) -> TensorReader:
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
            raise CheckpointError("not a valid safetensors index (expected a 'weight_map' object)",
                                  file=index) from None
        by_shard: dict[str, list[str]] = {}
        for key, shard in weight_map.items():
            if not isinstance(shard, str) or not _inside(shard):
                raise CheckpointError(f"shard {shard!r} is not a file of the checkpoint folder", file=index, key=key)
            by_shard.setdefault(shard, []).append(key)
        tensors: dict[str, TensorInfo] = {}
        files = []
        for shard, keys in by_shard.items():
            path = index.parent / shard
            if not path.is_file():
                raise CheckpointError(f"shard listed in {index.name} is missing (holds {len(keys)} tensors)",
                                      file=path, key=keys[0])
            header = read_header(path)
            files.append(path)
            for key in keys:
                if key not in header:
                    raise CheckpointError(f"{index.name} maps this key to the shard, which does not contain it",
                                          file=path, key=key)
                tensors[key] = header[key]
        return cls(tensors, index, files)

    # -- access --------------------------------------------------------------------------------

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def __len__(self) -> int:
        return len(self.tensors)

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def keys(self) -> list[str]:
        return list(self.tensors)

    def info(self, key: str) -> TensorInfo:
        try:
            return self.tensors[key]
        except KeyError:
            raise CheckpointError("tensor not found", file=self.source, key=key) from None

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def read_bytes(self, key: str) -> bytearray:
        info = self.info(key)
        buf = bytearray(info.nbytes)
        fd = os.open(info.file, os.O_RDONLY)
        try:
            view, offset = memoryview(buf), info.begin
            while view:
                n = os.preadv(fd, [view], offset)
                if n <= 0:
                    raise CheckpointError("truncated while reading", file=info.file, key=key)
                view, offset = view[n:], offset + n
        finally:
            os.close(fd)
        return buf

    def get(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """One tensor as a torch tensor (own memory), optionally cast."""
        import torch

        info = self.info(key)
        torch_dtype = _torch_dtype(info.dtype)
        if info.numel == 0:
            t = torch.empty(info.shape, dtype=torch_dtype)
        else:
            t = torch.frombuffer(self.read_bytes(key), dtype=torch_dtype).reshape(info.shape)
        if dtype is not None and t.dtype != dtype:
            t = t.to(dtype)
        return t

    def get_numpy(self, key: str) -> np.ndarray:
        """One tensor as numpy; bf16 is widened to float32 exactly (numpy has no bf16)."""
        info = self.info(key)
        raw = self.read_bytes(key)
        if info.dtype == "BF16":
            return bf16_to_float32(np.frombuffer(raw, dtype=np.uint16)).reshape(info.shape)
        if info.dtype not in _NUMPY_DTYPES:
            raise CheckpointError(f"dtype {info.dtype} needs torch to decode; use get()", file=info.file, key=key)
        return np.frombuffer(raw, dtype=_NUMPY_DTYPES[info.dtype]).reshape(info.shape)


def _torch_dtype(name: str) -> torch.dtype:
    import torch

    table = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
             "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
             "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
    return table[name]


# ----------------------------------------------------------------------------------------------
# Validation against the expected layout
# ----------------------------------------------------------------------------------------------


@dataclass
class ValidationReport:
    component: str
    source: Path
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    misshaped: list[str] = field(default_factory=list)  # "key: expected [..], found [..]"
    bad_dtype: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.misshaped or self.bad_dtype)

    def summary(self, limit: int = 5) -> str:
        parts = []
        for label, items in (("missing", self.missing), ("unexpected", self.unexpected),
                             ("mis-shaped", self.misshaped), ("wrong dtype", self.bad_dtype)):
            if items:
                shown = ", ".join(items[:limit]) + (f", ... ({len(items) - limit} more)" if len(items) > limit
                                                    else "")
                parts.append(f"{len(items)} {label}: {shown}")
        return "; ".join(parts)

    def raise_if_failed(self) -> None:
        if not self.ok:
            first = (self.missing or self.unexpected or self.misshaped or self.bad_dtype)[0].split(":")[0]
            raise CheckpointError(f"{self.component} tensors do not match the expected layout: {self.summary()}",
                                  file=self.source, key=first)


def validate(tensors: dict[str, Any], expected: Layout, component: str, source: Path,
             optional: Iterable[str] = ()) -> ValidationReport:
    """Compare keys/shapes (``TensorInfo`` or anything with ``.shape``) against an expected layout.

    Stored float dtypes may differ from the layout's (bf16/fp16/fp32/fp8 are all read), but a float
    tensor must stay a float tensor.
    """
    optional = set(optional)
    report = ValidationReport(component, Path(source))
    for key, spec in expected.items():
        if key not in tensors:
            if key not in optional:
                report.missing.append(key)
            continue
        found = tuple(tensors[key].shape)
        if found != spec.shape:
            report.misshaped.append(f"{key}: expected {list(spec.shape)}, found {list(found)}")
        dtype = getattr(tensors[key], "dtype", None)
        if isinstance(dtype, str) and spec.dtype in FLOAT_DTYPES and dtype not in FLOAT_DTYPES:
            report.bad_dtype.append(f"{key}: expected a float dtype, found {dtype}")
    report.unexpected = [k for k in tensors if k not in expected]
    return report


# ----------------------------------------------------------------------------------------------
# A whole checkpoint folder
# ----------------------------------------------------------------------------------------------

TOKENIZER_NAME = "tokenizer.json"
SIGVQ_NAME = "sigvq_embedding.pt"
VAE_WEIGHTS = "diffusion_pytorch_model.safetensors"


class CheckpointFolder:
    """A checkpoint folder in the upstream layout (design.md §3): configs plus lazy tensor readers."""

    def __init__(self, root: str | Path) -> None:
        from llada_edge.config import ModelConfig

        self.root = Path(root)
        self.config = ModelConfig.from_folder(self.root)
        self._readers: dict[str, TensorReader] = {}

    # -- paths ---------------------------------------------------------------------------------

    @property
    def tokenizer_path(self) -> Path:
        return self.root / TOKENIZER_NAME

    @property
    def sigvq_path(self) -> Path:
        return self.root / "image_tokenizer" / SIGVQ_NAME

    @property
    def vae_dir(self) -> Path:
        return self.root / "vae"

    def decoder_dir(self, mode: str) -> Path:
        from llada_edge.config import DECODER_DIRS

        if mode not in DECODER_DIRS:
            raise CheckpointError(f"unknown decoder mode {mode!r} (expected one of {sorted(DECODER_DIRS)})",
                                  file=self.root)
        return self.root / DECODER_DIRS[mode]

    # -- readers -------------------------------------------------------------------------------

    def _reader(self, name: str, build: Callable[[], TensorReader]) -> TensorReader:
        if name not in self._readers:
            self._readers[name] = build()
        return self._readers[name]

    @property
    def backbone(self) -> TensorReader:
        return self._reader("backbone", lambda: TensorReader.from_folder(self.root))

    @property
    def vision(self) -> TensorReader:
        folder = self.root / "image_tokenizer"

        def build() -> TensorReader:
            files = sorted(folder.glob("*.safetensors"))
            if not files:
                raise CheckpointError("no *.safetensors weights for the image tokenizer", file=folder)
            return TensorReader.from_files(files, source=folder)

        return self._reader("vision", build)

    def decoder(self, mode: str) -> TensorReader:
        path = self.decoder_dir(mode) / "model.safetensors"
        return self._reader(f"decoder:{mode}", lambda: TensorReader.from_files([path], source=path))

    @property
    def vae_weights(self) -> TensorReader:
        path = self.vae_dir / VAE_WEIGHTS
        return self._reader("vae", lambda: TensorReader.from_files([path], source=path))

    def load_sigvq_state(self) -> dict[str, torch.Tensor]:
        """The SigVQ state dict (a torch.save file upstream; memory-mapped, weights only)."""
        import pickle
        import zipfile

        import torch

        path = self.sigvq_path
        if not path.is_file():
            raise CheckpointError("file not found", file=path)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except (RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, ValueError) as exc:
            raise CheckpointError(f"cannot read the SigVQ state dict ({str(exc).splitlines()[0]})",
                                  file=path) from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError("expected a state dict of tensors", file=path)
        return state

    # -- validation ----------------------------------------------------------------------------

    def expert_bias_optional(self) -> bool:
        """A missing expert_bias is an error unless config.json says the router has no bias (§9)."""
        return self.config.backbone.moe_router_enable_expert_bias is False

    def validate(self, components: Iterable[str] = ("backbone", "vision", "sigvq", "decoder", "vae")
                 ) -> list[ValidationReport]:
        """Check keys and shapes of each component against the layout its config implies."""
        from llada_edge import layout

        cfg = self.config
        reports = []
        components = set(components)
        if "backbone" in components:
            expected = layout.backbone_layout(cfg.backbone)
            optional = [k for k in expected if k.endswith(".mlp.gate.expert_bias")] \
                if self.expert_bias_optional() else []
            reports.append(validate(self.backbone.tensors, expected, "backbone", self.backbone.source, optional))
        if "vision" in components:
            reports.append(validate(self.vision.tensors, layout.vision_layout(cfg.vision), "image tokenizer",
                                    self.vision.source))
        if "sigvq" in components:
            state = self.load_sigvq_state()
            dim = cfg.decoders["turbo"].cap_feat_dim
            reports.append(validate(state, layout.sigvq_layout(cfg.vision.num_embeddings, dim), "SigVQ",
                                    self.sigvq_path))
        if "decoder" in components:
            for mode, dec in cfg.decoders.items():
                reader = self.decoder(mode)
                reports.append(validate(reader.tensors, layout.decoder_layout(dec), f"decoder ({mode})",
                                        reader.source))
        if "vae" in components:
            reader = self.vae_weights  # header parse: missing / truncated file errors name the file
            try:
                expected = layout.vae_layout(cfg.vae.raw)
            except ImportError:  # no torch/diffusers: headers were still checked
                pass
            else:
                reports.append(validate(reader.tensors, expected, "VAE", reader.source))
        return reports

    def check(self, components: Iterable[str] = ("backbone", "vision", "sigvq", "decoder", "vae")) -> None:
        for report in self.validate(components):
            report.raise_if_failed()
