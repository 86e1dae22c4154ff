"""Q/DQ graphs for TensorRT through NVIDIA ModelOpt's ONNX PTQ (``modelopt.onnx.quantization.quantize``).

TensorRT 11 is strongly typed: precision lives in the graph as QuantizeLinear/DequantizeLinear pairs.
ModelOpt writes them from the *dense* fp32 graphs of a build with the captured calibration data
(:mod:`llada_edge.calibration.capture`), on the CPU:

* fp8: e4m3 Q/DQ on activations and weights (max calibration);
* int8: int8 Q/DQ (max calibration);
* int4: AWQ-clip weight-only, block 128, symmetric (TensorRT rejects int4 zero points).

One mode per graph: a decoder layer takes the experts' format (they are 94% of its weights), so
``mixed`` (experts int4, rest fp8) gives int4 layers and fp8 decoder/tokenizer graphs. The router, the
lm_head and the VQ codebook search stay fp32. Every output graph is checked against the TensorRT
operator allow-list.

Outputs ``BUILD/quant/<recipe>/<component>/model.onnx``.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from llada_edge.calibration.recipes import Recipe
from llada_edge.components import Component
from llada_edge.engines.onnxruntime_builder import classify_matmuls, gemm_to_matmul
from llada_edge.errors import InputError

INSTALL_HINT = "TensorRT recipes need NVIDIA ModelOpt: pip install 'llada-edge[quant]' (nvidia-modelopt 0.47)"


def calibration_samples(calib_dir: Path, component: str) -> list[dict[str, np.ndarray]]:
    """Per-sample feeds from ``<component>.npz`` (split along axis 0) or ``<component>/*.npz``."""
    stacked = calib_dir / f"{component}.npz"
    if stacked.is_file():
        data = dict(np.load(stacked))
        n = next(iter(data.values())).shape[0]
        return [{k: v[i:i + 1] for k, v in data.items()} for i in range(n)]
    folder = calib_dir / component
    if folder.is_dir():
        return [dict(np.load(p)) for p in sorted(folder.glob("*.npz"))]
    raise InputError(f"no calibration data for {component} in {calib_dir}; run `llada-edge calibrate`")


class _Reader:
    """A calibration data reader over captured samples (shapes may differ per sample).

    The interface of ONNX Runtime's CalibrationDataReader plus ModelOpt's ``get_first``.
    """

    def __init__(self, samples: list[dict[str, np.ndarray]]) -> None:
        self._samples = samples
        self._it: Iterator[dict[str, np.ndarray]] = iter(samples)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def get_first(self) -> dict[str, np.ndarray]:
        return self._samples[0]

    def rewind(self) -> None:
        self._it = iter(self._samples)

    def __len__(self) -> int:
        return len(self._samples)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:  # ModelOpt's AWQ walks the reader directly
        return iter(self._samples)


def _excluded_nodes(model: onnx.ModelProto, component: Component, recipe: Recipe) -> list[str]:
    """Constant matmuls whose kind stays fp32 (router, lm_head, the codebook search)."""
    return [node.name for node, _weight, kind in classify_matmuls(model, component) if recipe.format_of(kind) == "fp32"]


def quantize_component(src: Path, dst: Path, component: Component, recipe: Recipe, calib_dir: Path) -> dict[str, Any]:
    """Write ``dst/model.onnx`` with ModelOpt Q/DQ for the component's format; returns metadata."""
    try:
        from modelopt.onnx.quantization import quantize
    except ImportError:
        raise InputError(INSTALL_HINT) from None
    fmt = recipe.graph_format(component.graph_kinds)
    if fmt == "fp32":
        raise InputError(f"{component.name} stays fp32 under recipe {recipe.name}; nothing to quantize")
    with tempfile.TemporaryDirectory() as tmp:
        model = onnx.load(str(src))
        gemm_to_matmul(model)  # Linear as MatMul [K, N]: ModelOpt blocks int4 along K correctly
        exclude = _excluded_nodes(model, component, recipe)
        staged = Path(tmp) / "model.onnx"
        onnx.save(model, str(staged), save_as_external_data=True, location="model.onnx.data", size_threshold=1024)
        del model
        reader = _Reader(calibration_samples(calib_dir, component.name))
        logging.getLogger("modelopt").setLevel(logging.WARNING)
        # int8/fp8: GEMMs only (weights + their input activations). ModelOpt would also quantize Adds,
        # including the attention-mask bias whose masked entries are float32 min -> NaN scales.
        options = {"calibration_method": "awq_clip", "block_size": recipe.int4_block} if fmt == "int4" else {
            "calibration_method": "max", "op_types_to_quantize": ["MatMul", "Gemm", "Conv"]}
        quantize(onnx_path=str(staged), quantize_mode=fmt, calibration_data_reader=reader, calibration_eps=["cpu"],
                 nodes_to_exclude=exclude, high_precision_dtype="fp32", use_external_data_format=True,
                 output_path=str(dst / "model.onnx"), log_level="WARNING", **options)
    _normalise_data_name(dst)
    return {"format": fmt, "excluded_nodes": exclude, "calibration_samples": len(reader)}


def _normalise_data_name(dst: Path) -> None:
    """ModelOpt names external data ``model.onnx_data``; keep the build's ``model.onnx.data`` convention."""
    odd = dst / "model.onnx_data"
    if odd.is_file():
        model = onnx.load(str(dst / "model.onnx"))
        odd.unlink()
        onnx.save(model, str(dst / "model.onnx"), save_as_external_data=True, location="model.onnx.data",
                  size_threshold=1024)
    for leftover in dst.glob("*.onnx_data"):
        leftover.unlink()
    for tmp in dst.glob("*_tmp*"):
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink()
