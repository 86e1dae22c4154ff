"""A trained checkpoint stored as a patch on its seeded synthetic base, so the repository can carry it.

Training the tiny preset takes 10-20 minutes on 2 cores, and every fresh clone (CI included) paid it. The trained
folder is 53 MB, but it differs from ``synthesize("tiny", seed)`` only in the tensors training rewrote, and of its
two 22 MB vocabulary matrices only about a thousand live rows changed (the text head's dead rows became zeros, the
embedding's dead rows keep their seeded random values). So a patch holds:

* ``patch.safetensors``: each tensor that differs from the base, either whole or as the rows that differ over a
  base of the synthetic tensor or of zeros (whichever needs fewer rows);
* ``files/``: any other file that differs or is new (``training_report.json``), copied whole;
* ``patch.json``: the fingerprint, seed and preset, how each tensor is stored, and every file's sha256.

:func:`apply_patch` synthesizes the base, writes the stored tensors through the writers training itself used
(:mod:`llada_edge.training.weights`), and checks every file of the result against the recorded sha256: a
reconstruction that is not byte-for-byte the trained folder raises :class:`PatchMismatch` naming the file, and the
caller trains instead. :func:`compare_trainings` is the reproduction check: it sets a fresh training beside the
patched one (``make check-tiny-trained-patch``, :mod:`~llada_edge.training.cache`).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from llada_edge.buildfolder import atomic_dir, atomic_write_bytes, sha256_file
from llada_edge.errors import CheckpointError

Progress = Callable[[str], None]

PATCH_NAME = "patch.json"
TENSORS_NAME = "patch.safetensors"
FILES_DIR = "files"
PATCH_VERSION = 1
WHOLE, OVER_BASE, OVER_ZEROS = "whole", "rows-over-base", "rows-over-zeros"
_SEP = "::"  # between a file's relative path, a tensor key and a part name in patch.safetensors keys


class PatchMismatch(CheckpointError):
    """The patched folder is not byte-identical to the trained one it was made from (or the patch is damaged);
    ``rel`` names the file that came out different, where one did."""

    def __init__(self, message: str, rel: str | None = None) -> None:
        super().__init__(message)
        self.rel = rel


def _quiet(_msg: str) -> None:
    pass


def _files(folder: Path) -> dict[str, Path]:
    return {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    return state


def _row_bytes(t: torch.Tensor) -> torch.Tensor:
    """[rows, bytes per row] as uint8 (a 0-d tensor is one row): rows compare by their bits, so -0.0 and 0.0 (or
    two NaNs) never pass as equal or unequal wrongly."""
    return t.contiguous().reshape(t.shape[0] if t.dim() else 1, -1).view(torch.uint8)


def _encode(new: torch.Tensor, base: torch.Tensor) -> tuple[str, torch.Tensor | None, torch.Tensor] | None:
    """How to store ``new`` given the base's tensor: None if bit-identical, else (mode, rows, values)."""
    if new.shape != base.shape or new.dtype != base.dtype:
        return WHOLE, None, new.contiguous()
    new_rows = _row_bytes(new)
    changed = (new_rows != _row_bytes(base)).any(dim=1).nonzero().flatten()
    if changed.numel() == 0:
        return None
    nonzero = new_rows.any(dim=1).nonzero().flatten()
    mode, rows = (OVER_BASE, changed) if changed.numel() <= nonzero.numel() else (OVER_ZEROS, nonzero)
    if rows.numel() <= new_rows.shape[0] // 2:
        return mode, rows, new[rows].contiguous()
    return WHOLE, None, new.contiguous()


def _tensor_diff(trained: Path, base: Path, rel: str, store: dict[str, torch.Tensor]) -> dict[str, str] | None:
    """The tensors of one weight file that differ, added to ``store``; None if the key sets differ (copy whole)."""
    new, old = _read_tensors(trained), _read_tensors(base)
    if set(new) != set(old):
        return None
    modes = {}
    for key in sorted(new):
        encoded = _encode(new[key], old[key])
        if encoded is None:
            continue
        mode, rows, values = encoded
        modes[key] = mode
        store[_SEP.join((rel, key, "values"))] = values
        if rows is not None:
            store[_SEP.join((rel, key, "rows"))] = rows.to(torch.int64)
    return modes


def _synthesize_base(out: Path, preset: str, seed: int) -> None:
    from llada_edge.synthetic import synthesize

    synthesize(out, preset, seed=seed, force=True, progress=_quiet)


def make_patch(trained: str | Path, dest: str | Path, *, preset: str, seed: int, fingerprint: str,
               progress: Progress = _quiet) -> dict[str, Any]:
    """Write the patch that turns ``synthesize(preset, seed)`` into the ``trained`` folder (atomically); returns
    its record (``patch.json``).

    The patch is applied once before it is moved into place; a weight file whose rebuilt bytes differ (another
    writer or other metadata than :mod:`~llada_edge.training.weights` uses) is then stored whole, so a written
    patch always reproduces the folder.
    """
    trained, dest = Path(trained), Path(dest)
    with tempfile.TemporaryDirectory(prefix="llada-edge-patch-") as scratch:
        base = Path(scratch) / "base"
        progress(f"patch: synthesizing the {preset} base (seed {seed}) ...")
        _synthesize_base(base, preset, seed)
        new_files, base_files = _files(trained), _files(base)
        missing = sorted(set(base_files) - set(new_files))
        if missing:
            raise CheckpointError(f"{trained}: has no {missing[0]} (the synthetic base has it); not a trained "
                                  f"{preset} folder")
        changed = [rel for rel, path in new_files.items()
                   if rel not in base_files or sha256_file(path) != sha256_file(base_files[rel])]
        whole = {rel for rel in changed if rel not in base_files or Path(rel).suffix not in (".safetensors", ".pt")}
        record = {"version": PATCH_VERSION, "preset": preset, "seed": seed, "fingerprint": fingerprint,
                  "sha256": {rel: sha256_file(path) for rel, path in new_files.items()}}
        for _attempt in range(len(changed) + 1):
            store: dict[str, torch.Tensor] = {}
            tensors: dict[str, dict[str, str]] = {}
            for rel in changed:
                modes = None if rel in whole else _tensor_diff(new_files[rel], base_files[rel], rel, store)
                if modes is None:
                    whole.add(rel)
                else:
                    tensors[rel] = modes
            record.update(tensors=tensors, whole_files=sorted(whole))
            trial = Path(scratch) / f"patch-{_attempt}"
            _write_patch(trial, record, store, new_files)
            try:
                apply_patch(trial, Path(scratch) / f"trial-{_attempt}")
                break
            except PatchMismatch as exc:
                if exc.rel is None or exc.rel in whole:
                    raise
                progress(f"patch: {exc.rel} does not rebuild byte-for-byte from its tensors; storing it whole")
                whole.add(exc.rel)
        with atomic_dir(dest) as tmp:
            shutil.copytree(trial, tmp, dirs_exist_ok=True)
    stored = sum(t.numel() * t.element_size() for t in store.values())
    progress(f"patch: {dest}: {len(store)} arrays ({stored / 1e6:.1f} MB) in {len(tensors)} weight files, "
             f"{len(whole)} whole files")
    return record


def _write_patch(folder: Path, record: dict[str, Any], store: dict[str, torch.Tensor],
                 files: dict[str, Path]) -> None:
    from safetensors.torch import save

    folder.mkdir(parents=True)
    atomic_write_bytes(folder / TENSORS_NAME, save(store))
    for rel in record["whole_files"]:
        target = folder / FILES_DIR / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(files[rel], target)
    atomic_write_bytes(folder / PATCH_NAME, (json.dumps(record, indent=1, sort_keys=True) + "\n").encode())


def read_patch(patch: str | Path) -> dict[str, Any]:
    path = Path(patch) / PATCH_NAME
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise PatchMismatch(f"{path}: unreadable patch record ({exc})") from exc
    if record.get("version") != PATCH_VERSION:
        raise PatchMismatch(f"{path}: patch version {record.get('version')!r}, this code reads {PATCH_VERSION}")
    return record


def _patched_tensor(base: torch.Tensor, mode: str, stored: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
    values = stored[prefix + "values"]
    if mode == WHOLE:
        return values
    out = base.clone() if mode == OVER_BASE else torch.zeros_like(base)
    out[stored[prefix + "rows"]] = values
    return out


def apply_patch(patch: str | Path, out: str | Path) -> None:
    """Rebuild the trained folder into ``out`` (new or empty): the synthetic base, the patched tensors, the whole
    files; then every file is checked against its recorded sha256 (:class:`PatchMismatch` names the first that
    differs)."""
    from safetensors.torch import load_file

    from llada_edge.training.weights import rewrite_safetensors, rewrite_torch_state

    patch, out = Path(patch), Path(out)
    record = read_patch(patch)
    _synthesize_base(out, record["preset"], record["seed"])
    try:
        stored = load_file(str(patch / TENSORS_NAME))
    except Exception as exc:  # safetensors raises its own error types for truncated or damaged files
        raise PatchMismatch(f"{patch / TENSORS_NAME}: unreadable ({exc})") from exc
    for rel, modes in record["tensors"].items():
        target = out / rel
        base = _read_tensors(target)
        updates = {key: _patched_tensor(base[key], mode, stored, _SEP.join((rel, key, "")))
                   for key, mode in modes.items()}
        (rewrite_safetensors if target.suffix == ".safetensors" else rewrite_torch_state)(target, updates)
    for rel in record["whole_files"]:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(patch / FILES_DIR / rel, out / rel)
    verify(out, record["sha256"], source=patch)


def verify(folder: Path, expected: dict[str, str], source: Path) -> None:
    """Every file of ``folder`` has the sha256 the patch recorded, and there are no others."""
    have = _files(folder)
    extra, missing = sorted(set(have) - set(expected)), sorted(set(expected) - set(have))
    if extra or missing:
        raise PatchMismatch(f"{source}: the patched folder {'has an extra' if extra else 'lacks'} "
                            f"{(extra or missing)[0]}")
    for rel, digest in expected.items():
        got = sha256_file(have[rel])
        if got != digest:
            raise PatchMismatch(f"{source}: {rel} came out different from the trained file it was made from "
                                f"(sha256 {got[:12]} vs {digest[:12]})", rel)


# ----------------------------------------------------------------------------------------------
# The reproduction check: a fresh training beside the committed one
# ----------------------------------------------------------------------------------------------


def _report_figures(report: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The training report's numbers (seconds excluded: they measure the machine), flattened to dotted names."""
    out: dict[str, float] = {}
    for key, value in report.items():
        name = f"{prefix}{key}"
        if "second" in key or key.endswith("_s"):  # seconds (``seconds``, ``vae_s``...)
            continue
        if isinstance(value, dict):
            out.update(_report_figures(value, name + "."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def compare_trainings(shipped: Path, fresh: Path, report_name: str) -> dict[str, Any]:
    """Which files of two trainings of one fingerprint are byte-identical, and how far their report figures lie
    apart, each change scaled by max(1, |value|) (the backbone's training is not byte-deterministic; the image
    side is)."""
    a, b = _files(shipped), _files(fresh)
    identical = sorted(rel for rel in a
                       if rel in b and rel != report_name and sha256_file(a[rel]) == sha256_file(b[rel]))
    differ = sorted(rel for rel in set(a) | set(b) if rel not in identical and rel != report_name)
    fa = _report_figures(json.loads(a[report_name].read_text()))
    fb = _report_figures(json.loads(b[report_name].read_text()))
    # Scaled by max(1, |value|): accuracies and entropies compare absolutely, perplexities relatively.
    changes = {name: (fb[name] - fa[name]) / max(1.0, abs(fa[name])) for name in sorted(set(fa) & set(fb))}
    return {"identical": identical, "differ": differ, "report_changes": changes}
