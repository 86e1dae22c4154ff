"""Static check that an ONNX graph only uses what TensorRT's ONNX parser can import.

TensorRT cannot be installed on the machines that export the graphs, so this module is the CPU-side guard: it reads
the graph (never its external weights), walks every node — including the bodies of ``If`` / ``Loop`` / ``Scan``
subgraphs and of model-local functions — and reports each problem as a :class:`Violation`:

* an operator that is missing from the allow-list or marked unsupported there;
* a node in a non-default domain (anything but ``""`` / ``"ai.onnx"``: ``com.microsoft`` contrib ops, ``ai.onnx.ml``,
  plugin domains), unless it calls a model-local function, whose body is checked instead;
* a default-domain opset outside the range the parser accepts;
* attribute values the parser rejects: ``TopK`` with ``sorted=0``, ``ScatterND`` / ``ScatterElements`` with a
  ``reduction`` other than ``"none"``, ``Resize`` modes, ``LSTM`` ``input_forget`` / ``layout``; ``TopK`` with a
  constant ``K`` of 3840 or more; ``Constant`` with sparse or string values;
* build-time-constant inputs (``Reduce*`` axes, ``CumSum`` axis) that are not an initializer or ``Constant`` output;
* a used ``Mean`` / ``InvStdDev`` output of ``LayerNormalization`` or ``Indices`` output of ``MaxPool``;
* any tensor of type DOUBLE (graph inputs/outputs, value_info, initializers, ``Cast`` ``to``, ``Constant`` values) or
  of a type TensorRT does not have at all (INT16, UINT32, STRING, COMPLEX...), and non-tensor values (sequences...);
* a non-zero ``QuantizeLinear`` / ``DequantizeLinear`` zero point, when it is a constant readable without external
  data (otherwise it is skipped);
* a tensor of rank greater than 8, where shape information is available (``onnx.shape_inference`` is run first when
  it can be).

The allow-list is ``tensorrt_onnx_ops.json`` next to this module. It transcribes the operator support matrix of
onnx/onnx-tensorrt ``docs/operators.md`` — the TensorRT 10.15 GA table (opset 9 to 24), read on 2026-11-29 — plus
the TensorRT 11.x release notes (11.0 to 11.5) and the parser changelog; its ``source`` block records exactly what
was read. DOUBLE is rejected as project policy: the parser would silently cast it to FLOAT.

Passing this check is necessary but not sufficient. Shape-dependent limits, dynamic-shape profiles, per-operator type
combinations and builder tactics are only verified by the real TensorRT parser and builder on a GPU machine, which
remains the final word.
"""

from __future__ import annotations

import json
from collections import ChainMap
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import AttributeProto, FunctionProto, GraphProto, ModelProto, NodeProto, TensorProto, ValueInfoProto

from llada_edge.errors import LladaEdgeError

ALLOWLIST_FILE = Path(__file__).with_name("tensorrt_onnx_ops.json")
DEFAULT_DOMAINS = frozenset({"", "ai.onnx"})

# Attributes that name an output element type, per operator.
_DTYPE_ATTRIBUTES = {
    "Cast": "to",
    "EyeLike": "dtype",
    "RandomNormal": "dtype",
    "RandomNormalLike": "dtype",
    "RandomUniform": "dtype",
    "RandomUniformLike": "dtype",
    "Multinomial": "dtype",
    "Bernoulli": "dtype",
}
_UNSUPPORTED_CONSTANT_ATTRIBUTES = ("sparse_value", "value_string", "value_strings")

Constants = Mapping[str, "TensorProto | None"]


@dataclass(frozen=True)
class Violation:
    """One reason the graph would not import into TensorRT: where it is, which operator, and why."""

    node: str
    op_type: str
    reason: str

    def __str__(self) -> str:
        return f"{self.node} ({self.op_type}): {self.reason}"


def load_allowlist() -> dict[str, Any]:
    """The allow-list (``tensorrt_onnx_ops.json`` next to this module), freshly parsed."""
    try:
        return json.loads(ALLOWLIST_FILE.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise LladaEdgeError(f"cannot read the TensorRT allow-list: {exc}", file=ALLOWLIST_FILE) from exc


@dataclass
class _Context:
    allow: dict[str, Any]
    functions: dict[tuple[str, str], FunctionProto]
    used_names: set[str] = field(default_factory=set)


# --------------------------------------------------------------------------------------------------- loading


def _load_model(model: ModelProto | str | Path) -> ModelProto:
    if isinstance(model, ModelProto):
        return model
    path = Path(model)
    try:
        return onnx.load(str(path), load_external_data=False)
    except OSError as exc:
        raise LladaEdgeError(f"cannot read ONNX model: {exc}", file=path) from exc
    except Exception as exc:  # protobuf DecodeError and friends
        raise LladaEdgeError(f"not a readable ONNX model: {exc}", file=path) from exc


def _with_inferred_shapes(model: ModelProto) -> ModelProto:
    """The model with value_info filled in by ONNX shape inference, or the model itself when inference fails."""
    try:
        return onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=False)
    except Exception:  # too large, unknown ops, malformed graphs: the remaining rules still apply
        return model


# --------------------------------------------------------------------------------------------------- walking


def _node_label(node: NodeProto, index: int, prefix: str) -> str:
    name = node.name or f"{node.op_type}_{index}"
    return f"{prefix}{name}"


def _graph_constants(graph: GraphProto) -> dict[str, TensorProto | None]:
    """Names whose value is fixed at build time: initializers and Constant outputs (value or None if not a tensor)."""
    constants: dict[str, TensorProto | None] = {init.name: init for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in DEFAULT_DOMAINS and node.output:
            value = next((a.t for a in node.attribute if a.name == "value" and a.type == AttributeProto.TENSOR), None)
            constants[node.output[0]] = value
    return constants


def _collect_used_names(graph: GraphProto, used: set[str]) -> None:
    used.update(out.name for out in graph.output)
    for node in graph.node:
        used.update(name for name in node.input if name)
        for attr in node.attribute:
            for sub in _subgraphs(attr):
                _collect_used_names(sub, used)


def _subgraphs(attr: AttributeProto) -> list[GraphProto]:
    if attr.type == AttributeProto.GRAPH:
        return [attr.g]
    if attr.type == AttributeProto.GRAPHS:
        return list(attr.graphs)
    return []


def _walk(
    graph: GraphProto, prefix: str, outer: Constants, ctx: _Context, seen_functions: frozenset[tuple[str, str]]
) -> Iterator[Violation]:
    """Run the graph rules on ``graph`` and the node rules on each node, recursing into subgraphs and functions."""
    constants: Constants = ChainMap(_graph_constants(graph), outer)  # type: ignore[arg-type]
    yield from _check_graph_tensors(graph, prefix, ctx)
    for index, node in enumerate(graph.node):
        label = _node_label(node, index, prefix)
        yield from _check_node(node, label, constants, ctx)
        for attr in node.attribute:
            for position, sub in enumerate(_subgraphs(attr)):
                suffix = attr.name if attr.type == AttributeProto.GRAPH else f"{attr.name}[{position}]"
                yield from _walk(sub, f"{label}/{suffix}/", constants, ctx, seen_functions)
        key = (node.domain, node.op_type)
        if node.domain not in DEFAULT_DOMAINS and key in ctx.functions and key not in seen_functions:
            yield from _walk_function(ctx.functions[key], f"{label}/", ctx, seen_functions | {key})


def _walk_function(
    function: FunctionProto, prefix: str, ctx: _Context, seen_functions: frozenset[tuple[str, str]]
) -> Iterator[Violation]:
    body = onnx.helper.make_graph(list(function.node), function.name, [], [])
    yield from _walk(body, prefix, {}, ctx, seen_functions)


# --------------------------------------------------------------------------------------------------- node rules


def _check_node(node: NodeProto, label: str, constants: Constants, ctx: _Context) -> Iterator[Violation]:
    for rule in _NODE_RULES:
        for reason in rule(node, constants, ctx):
            yield Violation(label, _op_name(node), reason)


def _op_name(node: NodeProto) -> str:
    return node.op_type if node.domain in DEFAULT_DOMAINS else f"{node.domain}::{node.op_type}"


def _rule_operator(node: NodeProto, constants: Constants, ctx: _Context) -> Iterator[str]:
    """The operator must be a default-domain op that the allow-list marks supported (or a local function call)."""
    if node.domain not in DEFAULT_DOMAINS:
        if (node.domain, node.op_type) not in ctx.functions:
            yield (
                f"node is in domain '{node.domain}'; TensorRT's ONNX parser imports only default-domain ('' / "
                f"'ai.onnx') operators, anything else needs a TensorRT plugin (none are used here)"
            )
        return
    entry = ctx.allow["operators"].get(node.op_type)
    if entry is None:
        yield f"operator '{node.op_type}' is not in the TensorRT allow-list"
    elif not entry.get("supported", False):
        yield f"operator '{node.op_type}' is not supported by TensorRT's ONNX parser: {entry.get('note', '')}".rstrip()


def _attribute_value(node: NodeProto, name: str) -> Any:
    for attr in node.attribute:
        if attr.name == name:
            value = onnx.helper.get_attribute_value(attr)
            return value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    return None


def _rule_attribute_constraints(node: NodeProto, constants: Constants, ctx: _Context) -> Iterator[str]:
    """Enumerated attribute values from the allow-list (TopK sorted, Scatter reduction, Resize modes, LSTM...)."""
    if node.domain not in DEFAULT_DOMAINS:
        return
    for constraint in ctx.allow.get("attribute_constraints", {}).get(node.op_type, []):
        value = _attribute_value(node, constraint["attribute"])
        if value is None:
            value = constraint["default"]
        if value not in constraint["allowed"]:
            yield f"{constraint['attribute']}={value!r}: {constraint['reason']}"


def _constant_array(name: str, constants: Constants) -> np.ndarray | None:
    """The value of a build-time constant, or None if unknown or only reachable through external data."""
    tensor = constants.get(name)
    if tensor is None or tensor.data_location == TensorProto.EXTERNAL:
        return None
    try:
        return onnx.numpy_helper.to_array(tensor)
    except Exception:
        return None


def _rule_topk_k(node: NodeProto, constants: Constants, ctx: _Context) -> Iterator[str]:
    """TensorRT's TopK needs K < 3840; checked when K is a constant."""
    if node.op_type != "TopK" or node.domain not in DEFAULT_DOMAINS:
        return
    limit = int(ctx.allow.get("topk_max_k_exclusive", 3840))
    k_values: list[int] = []
    if len(node.input) > 1 and node.input[1]:
        array = _constant_array(node.input[1], constants)
        if array is not None:
            k_values = [int(v) for v in np.asarray(array).reshape(-1)]
    else:
        k_attr = _attribute_value(node, "k")
        if k_attr is not None:
            k_values = [int(k_attr)]
    for k in k_values:
        if k >= limit:
            yield f"K={k}: TensorRT's TopK requires K < {limit}"


def _type_name(elem_type: int) -> str:
    try:
        return TensorProto.DataType.Name(elem_type)
    except ValueError:
        return f"type {elem_type}"


def _dtype_problem(elem_type: int, ctx: _Context) -> str | None:
    """Why an ONNX element type cannot be used, or None when it can (or is unknown)."""
    if elem_type == TensorProto.UNDEFINED:
        return None
    types = ctx.allow["tensor_types"]
    name = _type_name(elem_type)
    if name in types.get("forbidden_by_policy", {}):
        return f"{name} tensor: {types['forbidden_by_policy'][name]}"
    if name not in types["supported"]:
        return f"{name} is not a TensorRT data type"
    return None


def _tensor_problems(tensor: TensorProto, ctx: _Context) -> Iterator[str]:
    problem = _dtype_problem(tensor.data_type, ctx)
    if problem:
        yield problem
    if len(tensor.dims) > int(ctx.allow["max_rank"]):
        yield f"rank {len(tensor.dims)} exceeds TensorRT's maximum rank {ctx.allow['max_rank']}"


def _rule_attribute_types(node: NodeProto, constants: Constants, ctx: _Context) -> Iterator[str]:
    """DOUBLE or non-TensorRT types named by Cast ``to``-style attributes or held by tensor-valued attributes."""
    if node.domain not in DEFAULT_DOMAINS:
        return
    dtype_attr = _DTYPE_ATTRIBUTES.get(node.op_type)
    for attr in node.attribute:
        if attr.name == dtype_attr and attr.type == AttributeProto.INT:
            problem = _dtype_problem(attr.i, ctx)
            if problem:
                yield f"{attr.name}={_type_name(attr.i)}: {problem}"
        elif attr.type == AttributeProto.TENSOR:
            for problem in _tensor_problems(attr.t, ctx):
                yield f"attribute '{attr.name}': {problem}"
        elif attr.type == AttributeProto.TENSORS:
            for tensor in attr.tensors:
                for problem in _tensor_problems(tensor, ctx):
                    yield f"attribute '{attr.name}': {problem}"


def _rule_constant_attributes(node: NodeProto, constants: Constants, ctx: _Context) -> Iterator[str]:
    """Constant with sparse or string payloads cannot be imported."""
    if node.op_type != "Constant" or node.domain not in DEFAULT_DOMAINS:
        return
    for attr in node.attribute:
        if attr.name in _UNSUPPORTED_CONSTANT_ATTRIBUTES:
            yield f"Constant attribute '{attr.name}' is not supported by TensorRT"


def _rule_quantize_zero_point(node: NodeProto, constants: Constants, ctx: _Context) -> Iterator[str]:
    """Q/DQ zero points must be zero; checked when the zero point is a constant stored inside the model file."""
    if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or node.domain not in DEFAULT_DOMAINS:
        return
    if len(node.input) < 3 or not node.input[2]:
        return
    array = _constant_array(node.input[2], constants)
    if array is None:
        return
    try:
        nonzero = bool(np.any(np.asarray(array, dtype=np.float64) != 0))
    except (TypeError, ValueError):
        return
    if nonzero:
        yield f"zero point '{node.input[2]}' is non-zero; TensorRT supports only symmetric quantization (zero point 0)"


def _rule_constant_inputs(node: NodeProto, constants: Constants, ctx: _Context) -> Iterator[str]:
    """Inputs TensorRT needs at build time (Reduce* axes, CumSum axis) must be initializers or Constant outputs."""
    if node.domain not in DEFAULT_DOMAINS:
        return
    spec = ctx.allow.get("constant_inputs", {}).get("ops", {}).get(node.op_type)
    if spec is None:
        return
    index = int(spec["index"])
    if len(node.input) > index and node.input[index] and node.input[index] not in constants:
        yield (
            f"input '{spec['name']}' ({node.input[index]}) must be an initializer or a Constant output: "
            f"TensorRT needs it at build time"
        )


def _rule_first_output_only(node: NodeProto, constants: Constants, ctx: _Context) -> Iterator[str]:
    """LayerNormalization Mean/InvStdDev and MaxPool Indices outputs must not be used."""
    if node.domain not in DEFAULT_DOMAINS:
        return
    why = ctx.allow.get("first_output_only", {}).get(node.op_type)
    if why is None:
        return
    used = [name for name in node.output[1:] if name and name in ctx.used_names]
    if used:
        yield f"extra output(s) {', '.join(used)} are used: {why}"


_NODE_RULES = (
    _rule_operator,
    _rule_attribute_constraints,
    _rule_topk_k,
    _rule_attribute_types,
    _rule_constant_attributes,
    _rule_quantize_zero_point,
    _rule_constant_inputs,
    _rule_first_output_only,
)


# --------------------------------------------------------------------------------------------------- tensor rules


def _value_info_problems(value: ValueInfoProto, ctx: _Context) -> Iterator[str]:
    kind = value.type.WhichOneof("value")
    if kind is None:
        return
    if kind != "tensor_type":
        yield f"{kind.replace('_type', '')} values are not TensorRT tensors"
        return
    tensor_type = value.type.tensor_type
    problem = _dtype_problem(tensor_type.elem_type, ctx)
    if problem:
        yield problem
    if tensor_type.HasField("shape") and len(tensor_type.shape.dim) > int(ctx.allow["max_rank"]):
        yield f"rank {len(tensor_type.shape.dim)} exceeds TensorRT's maximum rank {ctx.allow['max_rank']}"


def _check_graph_tensors(graph: GraphProto, prefix: str, ctx: _Context) -> Iterator[Violation]:
    """Types and ranks of the graph's inputs, outputs, value_info and initializers."""
    groups: Iterable[tuple[str, Iterable[ValueInfoProto]]] = (
        ("graph input", graph.input),
        ("graph output", graph.output),
        ("value_info", graph.value_info),
    )
    for kind, values in groups:
        for value in values:
            for reason in _value_info_problems(value, ctx):
                yield Violation(f"{prefix}{value.name}", f"<{kind}>", reason)
    for init in graph.initializer:
        for reason in _tensor_problems(init, ctx):
            yield Violation(f"{prefix}{init.name}", "<initializer>", reason)


# --------------------------------------------------------------------------------------------------- model rules


def _check_opset(model: ModelProto, ctx: _Context) -> Iterator[Violation]:
    bounds = ctx.allow.get("opset", {})
    low, high = int(bounds.get("min", 9)), int(bounds.get("max", 24))
    for opset in model.opset_import:
        if opset.domain in DEFAULT_DOMAINS and not low <= opset.version <= high:
            yield Violation(
                "<model>",
                "opset_import",
                f"default-domain opset {opset.version} is outside the range TensorRT's parser accepts ({low}..{high})",
            )


def check_tensorrt_compatible(model: ModelProto | str | Path) -> list[Violation]:
    """Every reason (by the allow-list) why TensorRT's ONNX parser would reject ``model``; empty when none is found.

    ``model`` is a loaded ``ModelProto`` or a path; a path is read without its external data.
    """
    proto = _with_inferred_shapes(_load_model(model))
    ctx = _Context(
        allow=load_allowlist(),
        functions={(fn.domain, fn.name): fn for fn in proto.functions},
    )
    _collect_used_names(proto.graph, ctx.used_names)
    for fn in proto.functions:
        ctx.used_names.update(name for node in fn.node for name in node.input if name)
        ctx.used_names.update(fn.output)
    violations = [*_check_opset(proto, ctx), *_walk(proto.graph, "", {}, ctx, frozenset())]
    return list(dict.fromkeys(violations))


def assert_tensorrt_compatible(model: ModelProto | str | Path, name: str, *, max_listed: int = 10) -> None:
    """Raise :class:`LladaEdgeError` naming graph ``name`` and its first violations if any are found."""
    violations = check_tensorrt_compatible(model)
    if not violations:
        return
    source = load_allowlist().get("source", {})
    listed = "\n  ".join(str(v) for v in violations[:max_listed])
    more = len(violations) - max_listed
    tail = f"\n  ... and {more} more" if more > 0 else ""
    file = None if isinstance(model, ModelProto) else model
    raise LladaEdgeError(
        f"ONNX graph '{name}' is not TensorRT-compatible: {len(violations)} problem(s) against the allow-list from "
        f"{source.get('repository', '?')}/{source.get('path', '?')}:\n  {listed}{tail}",
        file=file,
    )
