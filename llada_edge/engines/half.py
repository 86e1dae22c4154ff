"""Half-precision GPU graphs: an fp32 graph (exported, or a ModelOpt Q/DQ graph) converted to fp16 or bf16 by
ModelOpt's AutoCast (``modelopt.onnx.autocast``), with the operations listed below kept in fp32.

TensorRT (and TensorRT-RTX) build strongly typed networks: the graph's types *are* the engine's types, so this
list is the whole precision policy of a GPU engine outside its quantized GEMMs. The graph's inputs and outputs
become half too (the KV cache, hidden states and logits are the bytes a step moves); integer and boolean inputs
are untouched.

fp16 graphs run on ONNX Runtime's CPU provider, so they are validated there against the fp32 graph; ONNX
Runtime has no CPU kernels for most bf16 operators, so for a bf16 graph only the float types of its initializers
are recorded (``float_tensors``), and the engine build and its census are what prove it.
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from llada_edge.errors import InputError

FLOAT_DTYPES = ("fp32", "fp16", "bf16")

# Operations that stay fp32 in a half graph, and why. AutoCast inserts the casts around them.
KEEP_FP32_OPS: dict[str, str] = {
    "Softmax": "attention probabilities: fp16 exp overflows for logits above ~11 and small probabilities vanish",
    "TopK": "expert selection: ties between near-equal router scores would flip in half precision",
    "ReduceMean": "RMSNorm/LayerNorm statistics: the mean of squares overflows fp16 once |x| > 256",
    "Pow": "the square inside RMSNorm (same reason as ReduceMean)",
    "Sqrt": "the norm's denominator",
    "Reciprocal": "the norm's denominator",
    "Sin": "RoPE / timestep tables: the angle (position x frequency) needs fp32 to place positions > 2048; the "
           "nodes computing the angle are kept too (keep_fp32_nodes)",
    "Cos": "RoPE / timestep tables (as Sin)",
    "ArgMax": "sampled token ids: ties in half-precision logits would change the argmax",
    "CumSum": "running sums grow past fp16's 11-bit mantissa",
}
# GEMMs that stay fp32: the MoE router and any GEMM whose output is argmax-ed directly (the VQ codebook search of
# the tokenizer: a cosine-similarity argmax). The router is kept with its whole routing subgraph (every node
# downstream of it up to the expert GEMMs' outputs): the group-limited top-k compares scores with thresholds
# taken from the same scores (``score >= kth``), and with one side rounded to fp16 a token loses experts it
# should keep (measured: 12% of a layer's tokens within tolerance, 100% with the subgraph in fp32); a lone
# fp32 router GEMM between casts is also folded back to half by the builder (seen in the engine census).
KEEP_FP32_KINDS = ("router",)
_ROUTING_DEPTH = 64
_ANGLE_DEPTH = 16  # Sin/Cos inputs are a few elementwise ops from the positions or the timestep
# AutoCast can also keep nodes whose values exceed a bound in a reference run on ONNX Runtime; that run holds the
# whole fp32 graph in ORT next to AutoCast's own copy (a real-dimension MoE layer, 3.3 GB of weights, was killed
# for memory on a 24 GB machine), so it is off: the list above is the policy, initializers beyond fp16's range
# stay fp32 (AutoCast's init_max), and the fp16 graphs are validated against fp32 afterwards.
DATA_MAX = float("inf")


def keep_fp32_nodes(model: onnx.ModelProto, classified: list[tuple[onnx.NodeProto, str, str]]) -> list[str]:
    """The nodes a half graph keeps in fp32 besides :data:`KEEP_FP32_OPS`: router GEMMs with their elementwise
    tails (up to the top-k), and GEMMs that feed an ArgMax. ``classified``: ``classify_matmuls`` of ``model``."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    producers = {out: node for node in model.graph.node for out in node.output}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    keep = []
    for node, _weight, kind in classified:
        if any(c.op_type == "ArgMax" for c in consumers.get(node.output[0], [])):
            keep.append(node.name)
        elif kind in KEEP_FP32_KINDS:
            keep += routing_subgraph(node, consumers, producers)
    for node in model.graph.node:
        if node.op_type in ("Sin", "Cos"):
            keep += _angle_nodes(node, producers)
    return list(dict.fromkeys(keep))


def _angle_nodes(trig: onnx.NodeProto, producers: dict[str, onnx.NodeProto]) -> list[str]:
    """The nodes that compute a Sin/Cos input from graph inputs and constants (position x inverse frequency,
    timestep x 1000): in fp16 a position above 2048 is rounded to a multiple of 2 before it is ever rotated."""
    found, frontier = [], [trig]
    for _depth in range(_ANGLE_DEPTH):
        frontier = [producers[i] for n in frontier for i in n.input
                    if i in producers and producers[i].op_type not in ("MatMul", "Gemm")]
        if not frontier:
            break
        found += [n.name for n in frontier]
    return found


def routing_subgraph(router: onnx.NodeProto, consumers: dict[str, list[onnx.NodeProto]],
                      producers: dict[str, onnx.NodeProto]) -> list[str]:
    """The router and every node downstream of it that is not a GEMM and does not take a GEMM's output (the
    expert outputs the routing weights multiply: there the routing ends)."""
    def takes_gemm_output(node: onnx.NodeProto) -> bool:
        return any(producers[i].op_type in ("MatMul", "Gemm") and producers[i] is not router
                   for i in node.input if i in producers)

    found, frontier = [router.name], [router]
    seen = {router.name}
    for _depth in range(_ROUTING_DEPTH):
        frontier = [c for n in frontier for out in n.output for c in consumers.get(out, [])
                    if c.name not in seen and c.op_type not in ("MatMul", "Gemm") and not takes_gemm_output(c)]
        if not frontier:
            break
        for c in frontier:
            seen.add(c.name)
            found.append(c.name)
    return found


def to_half(src: Path, dst: Path, dtype: str, keep_nodes: list[str]) -> dict[str, Any]:
    """Write ``dst/model.onnx`` (+ ``model.onnx.data``): ``src`` with its float tensors in ``dtype``, except the
    operations of :data:`KEEP_FP32_OPS` and the nodes ``keep_nodes``."""
    if dtype not in ("fp16", "bf16"):
        raise InputError(f"half-precision graphs are fp16 or bf16, not {dtype!r}")
    try:
        from modelopt.onnx.autocast import convert_to_mixed_precision
    except ImportError:
        raise InputError("half-precision graphs need NVIDIA ModelOpt: pip install 'llada-edge[quant]'") from None
    logging.getLogger("modelopt").setLevel(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()):
        model = convert_to_mixed_precision(str(src), low_precision_type=dtype, nodes_to_exclude=keep_nodes,
                                           op_types_to_exclude=list(KEEP_FP32_OPS), data_max=DATA_MAX,
                                           keep_io_types=False)
    onnx.save(model, str(dst / "model.onnx"), save_as_external_data=True, location="model.onnx.data",
              size_threshold=1024)
    return {"dtype": dtype, "kept_fp32_ops": sorted(KEEP_FP32_OPS), "kept_fp32_nodes": keep_nodes,
            "float_tensors": float_census(model)}


def float_census(model: onnx.ModelProto) -> dict[str, int]:
    """How many initializers of each float type the graph holds (a structural check of the conversion)."""
    names = {onnx.TensorProto.FLOAT: "fp32", onnx.TensorProto.FLOAT16: "fp16", onnx.TensorProto.BFLOAT16: "bf16"}
    counts: dict[str, int] = {}
    for init in model.graph.initializer:
        if init.data_type in names:
            counts[names[init.data_type]] = counts.get(names[init.data_type], 0) + 1
    return counts


# fp16 has an 11-bit mantissa (eps 9.8e-4); a whole layer or decoder accumulates a few dozen roundings.
HALF_TOLERANCE = 2e-2
# The share of rows (tokens, pixels: the last axis is one row) that must be within HALF_TOLERANCE. Not all: where
# two experts' router scores are within rounding of each other, the fp16 attention before the (fp32) router
# legitimately picks the other expert, and that token's row then differs by a whole expert's output. Random-weight
# routers are near ties everywhere (issue 12): measured 99% of the tiny layer_2's tokens within, the rest flipped.
# A precision bug is not a few rows: the routing subgraph in fp16 left 12% of the rows within.
MIN_ROWS_WITHIN = 0.95


def validate_half(reference_graph: Path, half_graph: Path, cases: list[tuple[str, dict[str, np.ndarray]]]
                  ) -> dict[str, Any]:
    """Run the fp32 and the fp16 graph on ONNX Runtime's CPU provider with the same inputs. Per float output, each
    row's relative error max|half - fp32| / max|fp32|: at least MIN_ROWS_WITHIN of the rows within HALF_TOLERANCE
    passes (the worst row is reported too). Per integer output, the fraction of equal elements (recorded:
    random-weight logits are near ties, so sampled ids may flip)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.enable_mem_reuse = False  # ORT 1.32's CPU provider mis-reuses fp16 buffers across dynamic shapes
    ref = ort.InferenceSession(str(reference_graph), opts, providers=["CPUExecutionProvider"])
    half = ort.InferenceSession(str(half_graph), opts, providers=["CPUExecutionProvider"])
    inputs = {i.name: i.type for i in half.get_inputs()}
    names = [o.name for o in ref.get_outputs()]
    worst_rel, rows_within, agreement = 0.0, 1.0, 1.0
    for _label, feeds in cases:
        want = dict(zip(names, ref.run(None, feeds), strict=True))
        got = dict(zip(names, half.run(None, {k: v.astype(np.float16) if inputs[k] == "tensor(float16)" else v
                                              for k, v in feeds.items()}), strict=True))
        for name in names:
            if np.issubdtype(want[name].dtype, np.floating):
                scale = float(np.abs(want[name]).max()) or 1.0
                diff = np.abs(got[name].astype(np.float32) - want[name]) / scale
                rows = diff.reshape(-1, diff.shape[-1]).max(axis=1) if diff.ndim else diff.reshape(1)
                worst_rel = max(worst_rel, float(rows.max()) if not np.isnan(rows).any() else float("inf"))
                rows_within = min(rows_within, float((rows <= HALF_TOLERANCE).mean()))
            else:
                agreement = min(agreement, float((got[name] == want[name]).mean()))
    return {"passed": rows_within >= MIN_ROWS_WITHIN, "max_rel": worst_rel, "rows_within": rows_within,
            "tolerance_rel": HALF_TOLERANCE, "min_rows_within": MIN_ROWS_WITHIN, "integer_agreement": agreement}
