"""The graphs TensorRT engines are built from: Q/DQ through NVIDIA ModelOpt's ONNX PTQ
(``modelopt.onnx.quantization.quantize``), then the recipe's half dtype (:mod:`llada_edge.engines.half`).

TensorRT 11 is strongly typed: precision lives in the graph as QuantizeLinear/DequantizeLinear pairs.
ModelOpt writes them from the *dense* fp32 graphs of a build with the captured calibration data
(:mod:`llada_edge.calibration.capture`), on the CPU:

* fp8: e4m3 Q/DQ on activations and weights (max calibration);
* int8: int8 Q/DQ (max calibration);
* int4: weight-only, block 128, symmetric (TensorRT rejects int4 zero points), by the recipe's ``int4_method``:
  AWQ with clip search (default), AWQ-lite, or round-to-nearest.

One mode per graph: a decoder layer takes the experts' format (they are 94% of its weights), so
``mixed`` (experts int4, rest fp8) gives int4 layers and fp8 decoder/tokenizer graphs. The router, the
lm_head and the VQ codebook search stay unquantized. ModelOpt quantizes with fp32 high precision (its int4 path
does not convert the rest of the graph); a GPU recipe's fp16/bf16 is then applied to the whole Q/DQ graph, so
INT4 weight-only GEMMs get half-precision activations (with fp32 ones TensorRT-RTX dequantizes the weights to
fp32: the engine census shows it). Every output graph is checked against the TensorRT operator allow-list.

Outputs ``BUILD/quant/<recipe>/<component>/model.onnx``.
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from llada_edge.buildfolder.memory import release_memory
from llada_edge.calibration.recipes import Recipe
from llada_edge.components import Component
from llada_edge.engines.census import Gemm
from llada_edge.engines.half import keep_fp32_nodes, to_half
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


def same_shape_samples(samples: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """The samples of the most common input-shape signature. ModelOpt's AWQ clip search concatenates each GEMM's
    activations across samples, so samples of different token counts (a DiT at several resolutions) cannot mix."""
    def signature(sample: dict[str, np.ndarray]) -> tuple[tuple[int, ...], ...]:
        return tuple(v.shape[1:] for _k, v in sorted(sample.items()))

    counts = Counter(map(signature, samples))
    common = counts.most_common(1)[0][0]
    return [s for s in samples if signature(s) == common]


def expected_gemms(classified: list[tuple[onnx.NodeProto, str, str]], fmt: str, recipe: Recipe, keep_fp32: set[str]
                   ) -> list[Gemm]:
    """What the engine census checks: the format each GEMM's weights must end up in."""
    def expected(node: str, kind: str) -> str:
        if fmt != "fp32" and recipe.format_of(kind) != "fp32":
            return fmt
        return "fp32" if node in keep_fp32 else recipe.dtype

    return [Gemm(node.name, weight, expected(node.name, kind)) for node, weight, kind in classified]


def gpu_graph(src: Path, dst: Path, component: Component, recipe: Recipe, calib_dir: Path) -> dict[str, Any]:
    """Write ``dst/model.onnx``, the graph a TensorRT engine of ``recipe`` is built from: Linear as MatMul, ModelOpt
    Q/DQ where the recipe quantizes the component, then the recipe's half dtype (:func:`half.to_half`).
    Returns metadata, including the GEMMs and the format each must keep (the engine census's expectation)."""
    fmt = recipe.graph_format(component.graph_kinds)
    if fmt == "fp32" and recipe.dtype == "fp32":
        raise InputError(f"{component.name} stays fp32 under recipe {recipe.name}; the exported graph is the source")
    with tempfile.TemporaryDirectory() as tmp:
        model = onnx.load(str(src))
        gemm_to_matmul(model)  # Linear as MatMul [K, N]: ModelOpt blocks int4 along K correctly
        classified = classify_matmuls(model, component)
        exclude = [node.name for node, _w, kind in classified if recipe.format_of(kind) == "fp32"]
        keep = keep_fp32_nodes(model, classified)
        gemms = expected_gemms(classified, fmt, recipe, set(keep))
        stage = Path(tmp) / "staged"
        stage.mkdir()
        onnx.save(model, str(stage / "model.onnx"), save_as_external_data=True, location="model.onnx.data",
                  size_threshold=1024)
        del model, classified
        release_memory()  # each stage below loads the graph again: give this copy back to the OS first
        meta: dict[str, Any] = {"format": fmt, "dtype": recipe.dtype}
        if fmt != "fp32":
            quantized = dst if recipe.dtype == "fp32" else Path(tmp) / "qdq"
            quantized.mkdir(exist_ok=True)
            meta.update(_quantize(stage / "model.onnx", quantized, component, recipe, fmt, exclude, calib_dir))
            stage = quantized
            gemms, meta["left_unquantized"] = _as_quantized(gemms, stage / "model.onnx", recipe.dtype)
            release_memory()
        meta["gemms"] = [asdict(g) for g in gemms]
        if recipe.dtype != "fp32":
            meta["half"] = to_half(stage / "model.onnx", dst, recipe.dtype, keep)
            release_memory()
    _normalise_data_name(dst)
    return meta


def _as_quantized(gemms: list[Gemm], graph: Path, dtype: str) -> tuple[list[Gemm], list[str]]:
    """The expectation after ModelOpt: a GEMM the recipe quantizes but ModelOpt left without a DequantizeLinear
    on its weight (it skips some, e.g. the DiT's one-row timestep and adaLN GEMMs) is expected in ``dtype``, and
    listed, so the census checks what the graph holds and the entry says what ModelOpt declined."""
    model = onnx.load(str(graph), load_external_data=False)
    producer = {out: node.op_type for node in model.graph.node for out in node.output}
    dequantized = {node.name for node in model.graph.node
                   if len(node.input) > 1 and producer.get(node.input[1]) == "DequantizeLinear"}
    left = [g.node for g in gemms if g.expected in ("fp8", "int8", "int4") and g.node not in dequantized]
    return [replace(g, expected=dtype) if g.node in left else g for g in gemms], left


def _quantize(staged: Path, dst: Path, component: Component, recipe: Recipe, fmt: str, exclude: list[str],
              calib_dir: Path) -> dict[str, Any]:
    """ModelOpt PTQ of one fp32 graph in ``fmt`` (the recipe's unquantized parts stay fp32 here; a half dtype is
    applied afterwards, to the whole graph, by the same conversion as the unquantized recipes')."""
    try:
        from modelopt.onnx.quantization import quantize
    except ImportError:
        raise InputError(INSTALL_HINT) from None
    samples = calibration_samples(calib_dir, component.name)
    reader = _Reader(same_shape_samples(samples) if fmt == "int4" else samples)
    logging.getLogger("modelopt").setLevel(logging.WARNING)
    # int8/fp8: GEMMs only (weights + their input activations). ModelOpt would also quantize Adds,
    # including the attention-mask bias whose masked entries are float32 min -> NaN scales.
    options = {"calibration_method": recipe.int4_method, "block_size": recipe.int4_block} if fmt == "int4" else {
        "calibration_method": "max", "op_types_to_quantize": ["MatMul", "Gemm", "Conv"]}
    # ModelOpt reads nodes_to_exclude as regular expressions matched at the start of each node name: a bare
    # "node_linear" would also exclude node_linear_3_mm and every other GEMM after it (it did: an int4 layer with
    # its dense GEMMs left fp16 came out with no int4 expert), so each name is escaped and anchored at both ends.
    patterns = [f"^{re.escape(name)}$" for name in exclude]
    quantize(onnx_path=str(staged), quantize_mode=fmt, calibration_data_reader=reader, calibration_eps=["cpu"],
             nodes_to_exclude=patterns, high_precision_dtype="fp32", use_external_data_format=True,
             output_path=str(dst / "model.onnx"), log_level="WARNING", **options)
    return {"excluded_nodes": exclude, "calibration_samples": len(reader)}


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
