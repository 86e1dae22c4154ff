"""ONNX Runtime CPU engines: the fp32 graphs of a build rewritten to the weight formats of a recipe.

* Routed experts (the ``com.microsoft.MoE`` node of the ``ort`` MoE lowering) become ``QMoE``:
  int4 with block-wise symmetric scales, or int8 with per-row scales, stored unsigned with the implicit
  zero point 8 / 128 (ORT's storage contract, checked against a numpy dequantization in the tests),
  SwiGLU interleaved, ``accuracy_level=4`` (int8 activations: the fast MLAS path).
* Other constant-weight matmuls become ``MatMulNBits`` (int4 block-wise / int8, symmetric,
  ``accuracy_level=4``) through ONNX Runtime's own ``MatMulNBitsQuantizer``.
* fp8 has no CPU kernel: weights are *stored* as float8 e4m3 with per-output-channel scales and a
  ``DequantizeLinear`` in front of the fp32 computation (numerics of fp8 weights, fp32 speed). That is
  what the fp8 accuracy report measures; TensorRT engines compute in fp8.
* The MoE router, the lm_head and the VQ codebook search stay fp32 unless the recipe asks otherwise.

Every rewrite is counted (:func:`precision_census`) so a recipe that silently left weights in fp32
is caught.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import load_external_data_for_model

from llada_edge.calibration.recipes import Recipe, int4_block_size
from llada_edge.components import Component
from llada_edge.errors import LladaEdgeError

FP8_MAX = 448.0  # largest finite float8 e4m3fn


# ----------------------------------------------------------------------------------------------
# Graph helpers
# ----------------------------------------------------------------------------------------------


def _inits(model: onnx.ModelProto) -> dict[str, TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def _consumers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            out.setdefault(name, []).append(node)
    return out


def _remove_unused_initializers(model: onnx.ModelProto) -> None:
    """Delete in place: copying the list would re-serialise every tensor, and a real expert stack
    ([256, 1024, 2048] fp32) is 2 GiB, protobuf's message limit."""
    used = {name for node in model.graph.node for name in node.input}
    inits = model.graph.initializer
    for i in reversed(range(len(inits))):
        if inits[i].name not in used:
            del inits[i]


def gemm_to_matmul(model: onnx.ModelProto) -> int:
    """Gemm(x, W[N,K], transB=1) with constant W (a torch Linear on 2-D input) -> MatMul(x, W^T) (+ Add bias).

    MatMulNBits and the fp8 rewrite handle MatMul with a [K, N] weight; this makes every Linear one.
    """
    inits = _inits(model)
    nodes, changed = [], 0
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (node.op_type != "Gemm" or node.input[1] not in inits or attrs.get("transA", 0)
                or attrs.get("transB", 0) != 1 or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0):
            nodes.append(node)
            continue
        weight = numpy_helper.to_array(inits[node.input[1]])
        name_t = node.input[1] + "_T"
        model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(weight.T), name_t))
        has_bias = len(node.input) > 2 and node.input[2]
        mm_out = node.output[0] + "_mm" if has_bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], name_t], [mm_out], name=node.name + "_mm"))
        if has_bias:
            nodes.append(helper.make_node("Add", [mm_out, node.input[2]], [node.output[0]], name=node.name + "_bias"))
        changed += 1
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    _remove_unused_initializers(model)
    return changed


def constant_matmuls(model: onnx.ModelProto) -> list[tuple[onnx.NodeProto, str]]:
    """MatMul nodes whose second input is a 2-D initializer: (node, weight name)."""
    inits = _inits(model)
    return [(n, n.input[1]) for n in model.graph.node
            if n.op_type == "MatMul" and n.input[1] in inits and len(inits[n.input[1]].dims) == 2]


# ----------------------------------------------------------------------------------------------
# Which weights are which kind
# ----------------------------------------------------------------------------------------------


def classify_matmuls(model: onnx.ModelProto, component: Component) -> list[tuple[onnx.NodeProto, str, str]]:
    """Every constant matmul of a component's graph with its recipe kind ("keep": never quantized)."""
    consumers = _consumers(model)
    return [(node, weight, component.weight_kind(weight, any(c.op_type == "ArgMax"
                                                             for c in consumers.get(node.output[0], []))))
            for node, weight in constant_matmuls(model)]


# ----------------------------------------------------------------------------------------------
# Rewrites
# ----------------------------------------------------------------------------------------------


MSE_CLIP_RATIOS = np.linspace(0.6, 8 / 7, 15)  # x amax; 8/7 puts amax exactly on the largest code (7 of -8..7)


def _round(blocks: np.ndarray, scale: np.ndarray, half: int) -> np.ndarray:
    return np.clip(np.rint(blocks / scale), -half, half - 1)


def _block_scales(blocks: np.ndarray, half: int, method: str) -> np.ndarray:
    """Per-block scales: ``max`` amax / half; ``mse`` the clip ratio (:data:`MSE_CLIP_RATIOS`) with the least squared
    error of the block (clipping a few outliers buys a finer grid for all the others)."""
    tiny = np.finfo(np.float32).tiny
    amax = np.abs(blocks).max(axis=-1, keepdims=True)
    best = np.maximum(amax / half, tiny)
    if method == "max":
        return best
    best_err = ((_round(blocks, best, half) * best - blocks) ** 2).sum(-1, keepdims=True)
    for ratio in MSE_CLIP_RATIOS:
        scale = np.maximum(amax * ratio / half, tiny)
        err = ((_round(blocks, scale, half) * scale - blocks) ** 2).sum(-1, keepdims=True)
        better = err < best_err
        best, best_err = np.where(better, scale, best), np.where(better, err, best_err)
    return best


def _quantize_rows(w: np.ndarray, bits: int, block: int | None, scale_method: str = "max"
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric quantization of [..., N, K] along K (blocks of ``block``, or the whole row).

    Returns (unsigned storage [..., N, K*bits/8] with zero point 2^(bits-1), scales [..., N(, K/block)]).
    """
    half = 2 ** (bits - 1)
    k = w.shape[-1]
    blocks = w.reshape(*w.shape[:-1], k // block, block) if block else w[..., None, :]
    scale = _block_scales(blocks, half, scale_method)
    q = _round(blocks, scale, half).astype(np.int16).reshape(w.shape)
    u = (q + half).astype(np.uint8)
    packed = (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8) if bits == 4 else u
    scale = scale[..., 0].astype(np.float32)
    return packed, (scale if block else scale[..., 0])


EXPERTS_PER_CHUNK = 16  # a real expert stack is 2 GiB in fp32: quantize it a slice at a time, not all at once


def _quantize_experts(stack: _ExpertStack, bits: int, block: int | None, scale_method: str
                      ) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_quantize_rows` of an [E, N, K] stack, EXPERTS_PER_CHUNK experts at a time (identical result; the
    temporaries of rounding a whole real stack would be several times its 2 GiB)."""
    parts = [_quantize_rows(stack.read(i, i + EXPERTS_PER_CHUNK), bits, block, scale_method)
             for i in range(0, stack.shape[0], EXPERTS_PER_CHUNK)]
    return np.concatenate([q for q, _ in parts]), np.concatenate([s for _, s in parts])


class _ExpertStack:
    """An [E, N, K] expert weight taken out of the graph, read as fp32 a slice of experts at a time: from its
    external data file when the model was loaded without it (nothing of it stays in memory), else from the tensor."""

    def __init__(self, model: onnx.ModelProto, tensor: TensorProto, base_dir: Path | None) -> None:
        self.shape = tuple(tensor.dims)
        self._array: np.ndarray | None = None
        self._file: tuple[Path, int] | None = None
        if tensor.data_location == TensorProto.EXTERNAL:
            if base_dir is None:
                raise LladaEdgeError(f"{tensor.name}: external data, but no folder to read it from")
            info = {e.key: e.value for e in tensor.external_data}
            if tensor.data_type != TensorProto.FLOAT:
                raise LladaEdgeError(f"{tensor.name}: expected an fp32 expert stack, got data type {tensor.data_type}")
            self._file = (base_dir / info["location"], int(info.get("offset", 0)))
        else:
            self._array = np.asarray(numpy_helper.to_array(tensor), dtype=np.float32)
        inits = model.graph.initializer
        del inits[next(i for i, t in enumerate(inits) if t.name == tensor.name)]

    def read(self, start: int, stop: int) -> np.ndarray:
        stop = min(stop, self.shape[0])
        if self._array is not None:
            return self._array[start:stop]
        assert self._file is not None
        path, offset = self._file
        per_expert = int(np.prod(self.shape[1:]))
        count = (stop - start) * per_expert
        data = np.fromfile(path, np.float32, count=count, offset=offset + start * per_expert * 4)
        if data.size != count:
            raise LladaEdgeError(f"{path}: truncated external data ({data.size} of {count} values)")
        return data.reshape(stop - start, *self.shape[1:])


def dequantize_rows(packed: np.ndarray, scales: np.ndarray, bits: int, block: int | None) -> np.ndarray:
    """Inverse of the QMoE storage (the numpy reference the tests compare ORT's QMoE against)."""
    half = 2 ** (bits - 1)
    if bits == 4:
        u = np.empty((*packed.shape[:-1], packed.shape[-1] * 2), np.int16)
        u[..., 0::2], u[..., 1::2] = packed & 0x0F, packed >> 4
    else:
        u = packed.astype(np.int16)
    q = (u - half).astype(np.float32)
    if block:
        q = q.reshape(*q.shape[:-1], q.shape[-1] // block, block) * scales[..., None]
        return q.reshape(*q.shape[:-2], -1)
    return q * scales[..., None]


def quantize_moe(model: onnx.ModelProto, fmt: str, int4_block: int, int4_scale: str = "max",
                 base_dir: Path | None = None) -> int:
    """Rewrite every ``com.microsoft.MoE`` node for ``fmt`` (int4/int8 -> QMoE, fp8 -> fp8 storage + DQ).

    ``base_dir``: where the external data of a model loaded without it lies; the expert stacks are then read from
    the file a slice of experts at a time, never whole (a real one is 2 GiB in fp32)."""
    inits = _inits(model)
    count = 0
    for idx, node in enumerate(list(model.graph.node)):
        if node.op_type != "MoE" or node.domain != "com.microsoft":
            continue
        fc1 = _ExpertStack(model, inits.pop(node.input[2]), base_dir)  # [E, 2F, D]
        fc2 = _ExpertStack(model, inits.pop(node.input[4]), base_dir)  # [E, D, F]
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if fmt == "fp8":
            _fp8_storage(model, node, 2, fc1.read(0, fc1.shape[0]))
            _fp8_storage(model, node, 4, fc2.read(0, fc2.shape[0]))
        else:
            bits = 4 if fmt == "int4" else 8
            # int8 QMoE uses per-row scales (block-wise int8 did not reproduce on the CPU kernel here)
            block = min(int4_block_size(fc1.shape[-1], int4_block), int4_block_size(fc2.shape[-1], int4_block)) \
                if bits == 4 else None
            method = int4_scale if bits == 4 else "max"
            w1, s1 = _quantize_experts(fc1, bits, block, method)
            w2, s2 = _quantize_experts(fc2, bits, block, method)
            names = [f"{node.name}_{n}" for n in ("w1", "s1", "w2", "s2")]
            for name, arr in zip(names, (w1, s1, w2, s2), strict=True):
                model.graph.initializer.append(numpy_helper.from_array(arr, name))
            extra: dict[str, Any] = {"block_size": block} if block else {}
            qmoe = helper.make_node(
                "QMoE", [node.input[0], node.input[1], names[0], names[1], "", names[2], names[3]], list(node.output),
                name=node.name + "_q", domain="com.microsoft", k=attrs["k"], activation_type="swiglu",
                swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0, normalize_routing_weights=0,
                expert_weight_bits=bits, quant_type="int", accuracy_level=4, **extra)
            model.graph.node.remove(node)
            model.graph.node.insert(idx, qmoe)
        count += 1
    _remove_unused_initializers(model)
    return count


def _fp8_storage(model: onnx.ModelProto, node: onnx.NodeProto, slot: int, weight: np.ndarray) -> None:
    """Replace a constant input by float8 e4m3 storage (per-row scales) + DequantizeLinear (+ Reshape)."""
    import ml_dtypes

    shape = weight.shape
    rows = weight.reshape(-1, shape[-1]) if weight.ndim > 2 else weight
    axis = 0 if weight.ndim > 2 else 1  # per output channel: rows of a flattened 3-D weight, columns of [K, N]
    amax = np.abs(rows).max(axis=1 - axis)
    scale = (np.maximum(amax, np.finfo(np.float32).tiny) / FP8_MAX).astype(np.float32)
    if axis == 0:  # rows of a (large) expert stack: a slice at a time, not a full-size fp32 temporary
        q = np.empty(rows.shape, ml_dtypes.float8_e4m3fn)
        step = max(1, len(rows) // 16)
        for i in range(0, len(rows), step):
            q[i:i + step] = (rows[i:i + step] / scale[i:i + step, None]).astype(ml_dtypes.float8_e4m3fn)
    else:
        q = (rows / scale[None, :]).astype(ml_dtypes.float8_e4m3fn)
    base = f"{node.input[slot]}_fp8"
    model.graph.initializer.append(helper.make_tensor(base, TensorProto.FLOAT8E4M3FN, q.shape,
                                                      q.view(np.uint8).tobytes(), raw=True))
    model.graph.initializer.append(numpy_helper.from_array(scale, base + "_scale"))
    deq = base + "_dq"
    new_nodes = [helper.make_node("DequantizeLinear", [base, base + "_scale"], [deq], name=base + "_DQ", axis=axis)]
    if weight.ndim > 2:
        model.graph.initializer.append(numpy_helper.from_array(np.asarray(shape, np.int64), base + "_shape"))
        new_nodes.append(helper.make_node("Reshape", [deq, base + "_shape"], [deq + "_r"], name=base + "_reshape"))
        deq += "_r"
    node.input[slot] = deq
    position = list(model.graph.node).index(node)
    for offset, new in enumerate(new_nodes):
        model.graph.node.insert(position + offset, new)


def quantize_matmuls(model: onnx.ModelProto, component: Component, recipe: Recipe) -> Counter[str]:
    """Rewrite constant matmuls by kind: int4/int8 -> MatMulNBits, fp8 -> fp8 storage + DQ."""
    done: Counter[str] = Counter()
    by_format: dict[str, list[tuple[onnx.NodeProto, str]]] = {}
    for node, weight, kind in classify_matmuls(model, component):
        by_format.setdefault(recipe.format_of(kind), []).append((node, weight))
    inits = _inits(model)
    for node, weight in by_format.get("fp8", []):
        _fp8_storage(model, node, 1, numpy_helper.to_array(inits[weight]).astype(np.float32))
        done["fp8"] += 1
    for fmt in ("int4", "int8"):
        groups: dict[int, list[str]] = {}
        for node, weight in by_format.get(fmt, []):
            k = inits[weight].dims[0]
            block = int4_block_size(k, recipe.int4_block if fmt == "int4" else 128, exact=False)
            groups.setdefault(block, []).append(node.name)
        for block, names in groups.items():
            model = _nbits(model, names, 4 if fmt == "int4" else 8, block)
            done[fmt] += len(names)
    _remove_unused_initializers(model)
    return done


def _nbits(model: onnx.ModelProto, names: list[str], bits: int, block: int) -> onnx.ModelProto:
    import logging

    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    # nodes_to_include is OR-ed with the op type upstream, so restrict by excluding every other MatMul.
    others = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in set(names)]
    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=block, is_symmetric=True, accuracy_level=4,
                                     nodes_to_exclude=others, op_types_to_quantize=("MatMul",))
    quantizer.process()
    result = quantizer.model.model
    if result is not model:  # the quantizer works in place on our proto; keep one object
        model.CopyFrom(result)
    return model


# ----------------------------------------------------------------------------------------------
# One component
# ----------------------------------------------------------------------------------------------


def precision_census(model: onnx.ModelProto) -> dict[str, int]:
    """What the graph computes with: quantized ops, fp8-stored weights, and fp32 constant matmuls left."""
    inits = _inits(model)
    ops = Counter(n.op_type for n in model.graph.node)
    fp8 = sum(1 for t in inits.values() if t.data_type == TensorProto.FLOAT8E4M3FN)
    return {"QMoE": ops["QMoE"], "MoE": ops["MoE"], "MatMulNBits": ops["MatMulNBits"], "fp8_weights": fp8,
            "fp32_const_matmuls": len(constant_matmuls(model))}


def build_component(src: Path, dst: Path, component: Component, recipe: Recipe) -> dict[str, int]:
    """Rewrite one fp32 graph for ``recipe``; writes ``dst/model.onnx`` (+ external data)."""
    # Loaded without its weights first: the expert stacks are quantized straight from the file, a slice at a time,
    # and only the rest (attention, shared expert, norms) is then loaded into memory.
    model = onnx.load(str(src), load_external_data=False)
    if recipe.experts != "fp32":  # the com.microsoft.MoE node of an `ort`-lowered MoE layer, if any
        quantize_moe(model, recipe.experts, recipe.int4_block, recipe.int4_scale, src.parent)
    load_external_data_for_model(model, str(src.parent))
    gemm_to_matmul(model)
    quantize_matmuls(model, component, recipe)
    if any(t.data_type == TensorProto.FLOAT8E4M3FN for t in model.graph.initializer):
        _require_opset(model, 19)  # DequantizeLinear on float8
    onnx.save(model, str(dst / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="model.onnx.data", size_threshold=1024)
    return precision_census(model)


def _require_opset(model: onnx.ModelProto, minimum: int) -> None:
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version < minimum:
            raise LladaEdgeError(f"fp8 storage needs opset >= {minimum}, the graph has {opset.version}; "
                                 f"re-export with --opset {minimum} or later")
