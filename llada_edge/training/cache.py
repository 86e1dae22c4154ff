"""Where the trained tiny checkpoint comes from: the cache, else the patch committed under ``artifacts/``, else a
training (10-20 minutes on 2 cores).

``<cache>/tiny-trained-<fingerprint>`` is written once and never half (built under a temporary name, renamed when
complete). A fresh clone has no cache; it finds ``artifacts/tiny-trained-<fingerprint>/``, a patch on the seeded
synthetic base (:mod:`~llada_edge.training.patch`), and rebuilds the folder from it in seconds, byte-for-byte (each
file's sha256 is checked). When the code that decides the trained values changes, the fingerprint changes, the
committed patch no longer matches and the checkpoint is trained again, until ``make tiny-trained-patch`` commits
a new patch.

CLI (``python -m llada_edge.training.cache``): ``make-patch`` writes the patch of the current fingerprint;
``check-patch`` trains afresh and sets the result beside the patched folder (the reproduction check).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

from llada_edge.buildfolder import atomic_dir, atomic_write_bytes
from llada_edge.buildfolder.lock import build_lock
from llada_edge.errors import InputError
from llada_edge.training.backbone import BackboneTraining
from llada_edge.training.patch import PATCH_NAME, PatchMismatch, apply_patch, compare_trainings, make_patch
from llada_edge.training.tiny_trained import REPORT_NAME, Progress, _stderr, fingerprint, train_tiny

# The repository's committed patches (absent from an installed wheel: there the checkpoint is trained).
SHIPPED_DIR = Path(__file__).resolve().parents[2] / "artifacts"
PRESET = "tiny"


def default_cache() -> Path:
    """``$LLADA_EDGE_CACHE`` or ``~/.cache/llada-edge``."""
    return Path(os.environ.get("LLADA_EDGE_CACHE", Path.home() / ".cache" / "llada-edge"))


def entry_name(seed: int = 0) -> str:
    """``tiny-trained-<fingerprint>`` of the current code, settings, corpus and torch version."""
    return f"tiny-trained-{fingerprint(seed, BackboneTraining())}"


def shipped_patch(seed: int = 0, shipped: Path | None = SHIPPED_DIR) -> Path | None:
    """The committed patch of the current fingerprint, if there is one."""
    if shipped is None:
        return None
    patch = shipped / entry_name(seed)
    return patch if (patch / PATCH_NAME).is_file() else None


def stale_patches(seed: int = 0, shipped: Path = SHIPPED_DIR) -> list[Path]:
    """Committed patches of other fingerprints (the code changed since they were made)."""
    return sorted(p for p in shipped.glob("tiny-trained-*") if p.name != entry_name(seed))


def _report(progress: Progress, message: str) -> None:
    """A committed patch that could not be used: said as progress and as a warning (pytest lists those at the end
    of a run, where progress output is not shown)."""
    progress(message)
    warnings.warn(message, stacklevel=3)


def cached_checkpoint(seed: int = 0, *, cache: str | Path | None = None, shipped: Path | None = SHIPPED_DIR,
                      progress: Progress = _stderr) -> Path:
    """``<cache>/tiny-trained-<fingerprint>``: from the cache, else rebuilt from the committed patch, else trained.

    The cache folder's lock makes a second process that would fill the same entry at the same time fail at once,
    naming the holder, rather than train it twice. A patch whose result does not match its recorded hashes, or a
    repository whose ``artifacts/`` has no patch for the current fingerprint, is reported (progress and a warning)
    and the checkpoint trained instead.
    """
    root = Path(cache) if cache is not None else default_cache()
    root.mkdir(parents=True, exist_ok=True)
    entry = root / entry_name(seed)
    if (entry / REPORT_NAME).is_file():
        return entry
    with build_lock(root, "writing the tiny-trained checkpoint"):
        if (entry / REPORT_NAME).is_file():
            return entry
        patch = shipped_patch(seed, shipped)
        if patch is not None:
            try:
                with atomic_dir(entry) as tmp:
                    apply_patch(patch, tmp)
                progress(f"tiny-trained: rebuilt {entry} from the committed patch {patch}")
                return entry
            except PatchMismatch as exc:
                _report(progress, f"tiny-trained: the committed patch does not reproduce the checkpoint ({exc}); "
                        "training")
        elif shipped is not None and shipped.is_dir():
            _report(progress, f"tiny-trained: {shipped} holds no patch for {entry.name} (the code that decides the "
                    "values changed since it was made); training. `make tiny-trained-patch` writes the new one")
        progress(f"tiny-trained: not cached; training into {entry} (10-20 minutes on 2 cores)")
        settings = BackboneTraining()
        with atomic_dir(entry) as tmp:
            report = train_tiny(tmp, seed, settings, progress)
            report["fingerprint"] = entry.name.rsplit("-", 1)[-1]
            atomic_write_bytes(tmp / REPORT_NAME, (json.dumps(report, indent=2) + "\n").encode())
        progress(f"tiny-trained: trained in {report['total_seconds']:.0f} s")
    return entry


def tiny_trained(out: str | Path, seed: int = 0, *, cache: str | Path | None = None, force: bool = False,
                 progress: Progress = _stderr) -> Path:
    """The trained tiny checkpoint at ``out``: copied from the cache, filled first if needed."""
    out = Path(out)
    if out.exists() and not force:
        raise InputError(f"{out} already exists (use --force to replace it)")
    entry = cached_checkpoint(seed, cache=cache, progress=progress)
    with atomic_dir(out, fsync=False) as tmp:
        shutil.copytree(entry, tmp, dirs_exist_ok=True)
    progress(f"synth: done, {out} (tiny-trained, from {entry})")
    return out


# ----------------------------------------------------------------------------------------------
# CLI: make the committed patch, check that a fresh training reproduces it
# ----------------------------------------------------------------------------------------------


def make_shipped_patch(cache: Path, shipped: Path = SHIPPED_DIR, seed: int = 0) -> Path:
    """Train (or take from ``cache``) the current fingerprint's checkpoint, write its patch under ``shipped``
    and remove the patches of other fingerprints."""
    entry = cached_checkpoint(seed, cache=cache, shipped=None)
    dest = shipped / entry.name
    make_patch(entry, dest, preset=PRESET, seed=seed, fingerprint=entry.name.rsplit("-", 1)[-1], progress=_stderr)
    for stale in stale_patches(seed, shipped):
        shutil.rmtree(stale)
        _stderr(f"patch: removed {stale} (another fingerprint)")
    return dest


def check_shipped_patch(shipped: Path = SHIPPED_DIR, seed: int = 0, tolerance: float = 0.05,
                        scratch: Path | None = None) -> tuple[bool, dict]:
    """Train afresh (10-20 minutes) and set it beside the folder the committed patch rebuilds.

    Passes when every image-side file (tokenizer, VAE, SigVQ, decoders) is byte-identical (that training is
    deterministic) and no figure of the training report moved by more than ``tolerance`` x max(1, |figure|) (the
    backbone's training is not byte-deterministic).
    """
    patch = shipped_patch(seed, shipped)
    if patch is None:
        raise InputError(f"{shipped}: no patch named {entry_name(seed)} (make tiny-trained-patch writes it)")
    with tempfile.TemporaryDirectory(prefix="llada-edge-check-", dir=scratch) as tmp:
        patched = Path(tmp) / "patched"
        apply_patch(patch, patched)
        fresh = cached_checkpoint(seed, cache=Path(tmp) / "cache", shipped=None)
        result = compare_trainings(patched, fresh, REPORT_NAME)
    worst = max((abs(d) for d in result["report_changes"].values()), default=0.0)
    image_side = [rel for rel in result["differ"] if not rel.startswith("model")]
    result.update(largest_report_change=worst, tolerance=tolerance, image_side_differ=image_side)
    return not image_side and worst <= tolerance, result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llada_edge.training.cache",
                                     description="The trained tiny checkpoint's committed patch (artifacts/).")
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("make-patch", help="train (or take from --cache) the current fingerprint's checkpoint, "
                                             "write its patch and remove the patches of other fingerprints")
    make.add_argument("--cache", type=Path, default=Path("build/cache"), help="trained-checkpoint cache folder")
    check = sub.add_parser("check-patch", help="train afresh and compare with the committed patch's checkpoint")
    check.add_argument("--tolerance", type=float, default=0.05,
                       help="largest accepted change of a training-report figure between the two trainings, "
                            "as a fraction of max(1, |figure|)")
    for p in (make, check):
        p.add_argument("--artifacts", type=Path, default=SHIPPED_DIR, help="where the committed patches live")
    args = parser.parse_args(argv)
    if args.command == "make-patch":
        make_shipped_patch(args.cache, args.artifacts)
        return 0
    ok, result = check_shipped_patch(args.artifacts, tolerance=args.tolerance)
    print(json.dumps(result, indent=1))
    print(f"{'PASS' if ok else 'FAIL'}: {len(result['identical'])} files byte-identical, differ: {result['differ']}; "
          f"largest report change {result['largest_report_change']:.4f} (tolerance {args.tolerance})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
