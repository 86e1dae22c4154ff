"""Validation inputs and reference outputs on disk, in the formats the Polygraphy CLI loads.

A numeric check made on a CPU machine (PyTorch reference vs ONNX Runtime) can be replayed against
TensorRT on a GPU machine without torch or the checkpoint there::

    polygraphy run model.onnx --trt --load-inputs inputs.json --load-outputs outputs.json

The formats (read from polygraphy 0.53.6: ``polygraphy/json/serde.py``, ``polygraphy/comparator/struct.py``,
``polygraphy/comparator/data_loader.py``):

* an array is ``{"array": base64(np.save(arr, allow_pickle=False)), "polygraphy_class": "ndarray"}``;
* ``--load-inputs`` reads a JSON list of feed dicts (``{input_name: array}``), one per iteration
  (``StreamingDataLoader`` → ``iterate_json_list``);
* ``--load-outputs`` reads a ``RunResults``: ``{"lst": [[runner_name, [IterationResult, ...]]],
  "polygraphy_class": "RunResults"}`` where an ``IterationResult`` is ``{"outputs": {name: LazyArray},
  "runtime": null, "runner_name": ..., "polygraphy_class": "IterationResult"}`` and a ``LazyArray`` is
  ``{"values": array, "polygraphy_class": "LazyArray"}``.

Polygraphy's own encoder and loaders write and read them (a pure-Python package, pinned with the export
dependencies). Every JSON file also gets an ``.npz`` twin (keys ``"<iteration>/<tensor name>"``) for
plain numpy users. Writes are atomic.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llada_edge.buildfolder import atomic_write_bytes

Feed = dict[str, np.ndarray]



# --------------------------------------------------------------------------------------------- public


def save_inputs(path: str | os.PathLike[str], feeds: Sequence[Mapping[str, Any]]) -> Path:
    """Save one feed dict per iteration for ``polygraphy run --load-inputs``; returns the JSON path."""
    json_path = _json_path(path)
    clean = _clean_iterations(feeds, "feeds")
    atomic_write_bytes(json_path, _polygraphy_to_json(clean).encode("utf-8"))
    _save_npz(npz_path_for(json_path), clean)
    return json_path


def save_outputs(
    path: str | os.PathLike[str],
    outputs: Sequence[Mapping[str, Any]],
    runner_name: str = "torch-reference",
) -> Path:
    """Save one output dict per iteration as a Polygraphy ``RunResults`` (``--load-outputs``)."""
    json_path = _json_path(path)
    clean = _clean_iterations(outputs, "outputs")
    atomic_write_bytes(json_path, _polygraphy_run_results_json(clean, runner_name).encode("utf-8"))
    _save_npz(npz_path_for(json_path), clean)
    return json_path


def load_inputs(path: str | os.PathLike[str]) -> list[Feed]:
    """Read feeds saved by :func:`save_inputs` (or by ``polygraphy run --save-inputs``), or their ``.npz``."""
    src = Path(path)
    if src.suffix == ".npz":
        return _load_npz(src)
    obj = _polygraphy_load_json(src)
    items = obj if isinstance(obj, list) else [obj]  # polygraphy also accepts a single feed dict
    return [_plain_dict(item, src) for item in items]


def load_outputs(path: str | os.PathLike[str], runner_name: str | None = None) -> list[Feed]:
    """Read the iterations of one runner (default: the first) from a ``RunResults`` file, or an ``.npz``."""
    src = Path(path)
    if src.suffix == ".npz":
        return _load_npz(src)
    runs = _polygraphy_load_runs(src)
    if not runs:
        raise ValueError(f"{src}: holds no runner results")
    if runner_name is None:
        return runs[0][1]
    for name, iterations in runs:
        if name == runner_name:
            return iterations
    raise KeyError(f"{src}: no results for runner {runner_name!r} (it has: {[name for name, _ in runs]})")


def npz_path_for(json_path: str | os.PathLike[str]) -> Path:
    """Where the numpy twin of a saved JSON file lives: same folder and stem, ``.npz`` suffix."""
    return Path(json_path).with_suffix(".npz")


# ------------------------------------------------------------------------------------------- checks


def _json_path(path: str | os.PathLike[str]) -> Path:
    """Insist on a ``.json`` name: Polygraphy reads an extensionless path as a folder of iterations."""
    out = Path(path)
    if out.suffix != ".json":
        raise ValueError(f"{out}: expected a .json file name (the .npz twin is written next to it)")
    return out


def _clean_iterations(iterations: Sequence[Mapping[str, Any]], what: str) -> list[Feed]:
    """Copy to plain ``{str: ndarray}`` dicts, failing early on what JSON or np.save cannot hold."""
    if isinstance(iterations, Mapping):
        raise TypeError(f"{what}: expected a list of dicts (one per iteration), got a single dict")
    clean = []
    for i, it in enumerate(iterations):
        if not isinstance(it, Mapping):
            raise TypeError(f"{what}[{i}]: expected a dict of name -> array, got {type(it).__name__}")
        clean.append({_check_name(name, what, i): _check_array(arr, what, i, name) for name, arr in it.items()})
    if not clean:
        raise ValueError(f"{what}: at least one iteration is needed (Polygraphy would run none)")
    return clean


def _check_name(name: object, what: str, i: int) -> str:
    if not isinstance(name, str):
        raise TypeError(f"{what}[{i}]: tensor names must be str, got {name!r}")
    return name


def _check_array(arr: object, what: str, i: int, name: str) -> np.ndarray:
    out = np.asarray(arr)
    if out.dtype.hasobject:
        raise TypeError(f"{what}[{i}][{name!r}]: object arrays cannot be saved without pickle")
    return out


def _plain_dict(obj: object, src: Path) -> Feed:
    if not isinstance(obj, Mapping):
        raise ValueError(f"{src}: expected feed dicts, found a {type(obj).__name__}")
    return {str(k): np.asarray(v) for k, v in obj.items()}


# --------------------------------------------------------------------------------------- polygraphy


def _polygraphy_to_json(obj: object) -> str:
    from polygraphy.json import to_json

    return str(to_json(obj))


def _polygraphy_run_results_json(outputs: list[Feed], runner_name: str) -> str:
    from polygraphy.comparator import RunResults

    results = RunResults()
    results.add(outputs, runner_name=runner_name)
    return str(results.to_json())


def _polygraphy_load_json(src: Path) -> Any:
    from polygraphy.json import load_json

    return load_json(str(src))


def _polygraphy_load_runs(src: Path) -> list[tuple[str, list[Feed]]]:
    from polygraphy.comparator import RunResults

    results = RunResults.load(str(src))
    return [(name, [dict(it.items()) for it in iterations]) for name, iterations in results.items()]


# ----------------------------------------------------------------------------------------------- npz


def _save_npz(path: Path, iterations: list[Feed]) -> None:
    arrays: dict[str, Any] = {f"{i}/{name}": arr for i, it in enumerate(iterations) for name, arr in it.items()}
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def _load_npz(src: Path) -> list[Feed]:
    with np.load(src, allow_pickle=False) as data:
        iterations: dict[int, Feed] = {}
        for key in data.files:
            index, _, name = key.partition("/")
            iterations.setdefault(int(index), {})[name] = data[key]
    return [iterations[i] for i in sorted(iterations)]
