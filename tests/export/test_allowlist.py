"""The static TensorRT allow-list check on tiny hand-built graphs, and on a graph from our torch exporter."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from llada_edge.errors import LladaEdgeError
from llada_edge.export.allowlist import (
    Violation,
    assert_tensorrt_compatible,
    check_tensorrt_compatible,
    load_allowlist,
)

OPSET = 20

# The operators our exporter is expected to emit; all must be allowed.
_OUR_OPS_TEXT = """
MatMul Gemm Add Mul Sub Div Pow Sqrt Reciprocal ReduceMean ReduceSum ReduceMax Softmax Sigmoid Tanh Erf Exp Log Cos
Sin Neg Where Equal Less LessOrEqual Greater GreaterOrEqual Not And Or Cast Concat Slice Split Gather
GatherElements ScatterElements Reshape Transpose Unsqueeze Squeeze Expand Shape Range ConstantOfShape Constant TopK
ArgMax Conv Resize LayerNormalization InstanceNormalization GroupNormalization Einsum Trilu CumSum Max Min Clip
Identity Floor Mod If Loop
"""
OUR_OPS = tuple(_OUR_OPS_TEXT.split())


def _info(name: str, shape: list[int | str] | None, elem: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def _init(name: str, array: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(array, name)


def _model(
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    initializers: list[TensorProto] = (),  # type: ignore[assignment]
    *,
    opset: int = OPSET,
    extra_opsets: tuple[tuple[str, int], ...] = (),
    functions: list[onnx.FunctionProto] = (),  # type: ignore[assignment]
) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, v) for d, v in extra_opsets]
    model = helper.make_model(graph, opset_imports=opsets, functions=list(functions))
    model.ir_version = 10
    return model


def _reasons(model: onnx.ModelProto | Path) -> str:
    return "\n".join(str(v) for v in check_tensorrt_compatible(model))


def _clean_model() -> onnx.ModelProto:
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["mm"], name="mm"),
        helper.make_node("Add", ["mm", "b"], ["h"], name="add"),
        helper.make_node("Softmax", ["h"], ["p"], name="softmax", axis=-1),
        helper.make_node("TopK", ["p", "k"], ["values", "indices"], name="topk", axis=-1, sorted=1, largest=1),
        helper.make_node("ReduceMean", ["h", "axes"], ["mean"], name="mean", keepdims=1),
    ]
    inits = [
        _init("w", np.ones((8, 16), np.float32)),
        _init("b", np.zeros((16,), np.float32)),
        _init("k", np.array([3], np.int64)),
        _init("axes", np.array([-1], np.int64)),
    ]
    outputs = [_info("values", None), _info("indices", None, TensorProto.INT64), _info("mean", None)]
    return _model(nodes, [_info("x", [2, 4, 8])], outputs, inits)


# ------------------------------------------------------------------------------------------ the allow-list itself


def test_allowlist_records_its_source_and_covers_our_ops() -> None:
    allow = load_allowlist()
    source = allow["source"]
    assert source["repository"] == "onnx/onnx-tensorrt"
    assert source["path"] == "docs/operators.md"
    assert "10.15" in source["commit_or_version"]
    assert source["read_on"] == "2026-11-29"
    ops = allow["operators"]
    assert len(ops) > 150
    missing = [op for op in OUR_OPS if not ops.get(op, {}).get("supported")]
    assert missing == []
    assert all(isinstance(e["supported"], bool) and e["note"] for e in ops.values())
    assert allow["restrictions"]


def test_violation_str_is_readable() -> None:
    text = str(Violation("blk0/topk", "TopK", "sorted=0: no"))
    assert text == "blk0/topk (TopK): sorted=0: no"


# ------------------------------------------------------------------------------------------ passing graphs


def test_clean_graph_passes() -> None:
    assert check_tensorrt_compatible(_clean_model()) == []
    assert_tensorrt_compatible(_clean_model(), "clean")


def test_path_is_read_without_external_data(tmp_path: Path) -> None:
    model = _clean_model()
    path = tmp_path / "clean.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, location="clean.data", size_threshold=0)
    (tmp_path / "clean.data").unlink()  # if the check tried to read the weights it would fail
    assert check_tensorrt_compatible(path) == []
    assert check_tensorrt_compatible(str(path)) == []


def test_unreadable_path_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(LladaEdgeError, match=r"missing\.onnx"):
        check_tensorrt_compatible(tmp_path / "missing.onnx")


# ------------------------------------------------------------------------------------------ operators and domains


def test_contrib_domain_fails_naming_the_domain() -> None:
    nodes = [helper.make_node("FusedMatMul", ["x", "x"], ["y"], name="fused", domain="com.microsoft")]
    model = _model(nodes, [_info("x", [4, 4])], [_info("y", [4, 4])], extra_opsets=(("com.microsoft", 1),))
    violations = check_tensorrt_compatible(model)
    assert len(violations) == 1
    assert violations[0].node == "fused"
    assert violations[0].op_type == "com.microsoft::FusedMatMul"
    assert "com.microsoft" in violations[0].reason


@pytest.mark.parametrize(
    ("op_type", "expected"),
    [
        ("NonMaxSuppressionV99", "not in the TensorRT allow-list"),
        ("Unique", "not supported by TensorRT"),
        ("BitwiseAnd", "not supported by TensorRT"),
    ],
)
def test_unknown_or_unsupported_op_fails(op_type: str, expected: str) -> None:
    nodes = [helper.make_node(op_type, ["x", "x"] if op_type == "BitwiseAnd" else ["x"], ["y"], name="n")]
    model = _model(nodes, [_info("x", [4], TensorProto.INT32)], [_info("y", None, TensorProto.INT32)])
    assert expected in _reasons(model)
    assert f"n ({op_type})" in _reasons(model)


def test_opset_outside_parser_range_fails() -> None:
    model = _clean_model()
    model.opset_import[0].version = 26
    assert "opset 26" in _reasons(model)


def test_local_function_body_is_checked_instead_of_its_domain() -> None:
    def function(body_op: str) -> onnx.FunctionProto:
        return helper.make_function(
            "pkg.local",
            "Block",
            ["a"],
            ["b"],
            [helper.make_node(body_op, ["a"], ["b"], name="inner")],
            opset_imports=[helper.make_opsetid("", OPSET)],
        )

    call = helper.make_node("Block", ["x"], ["y"], name="call", domain="pkg.local")
    io = ([_info("x", [4])], [_info("y", None)])
    clean = _model([call], *io, extra_opsets=(("pkg.local", 1),), functions=[function("Relu")])
    assert check_tensorrt_compatible(clean) == []
    bad = _model([call], *io, extra_opsets=(("pkg.local", 1),), functions=[function("Unique")])
    assert "call/inner (Unique)" in _reasons(bad)


# ------------------------------------------------------------------------------------------ attributes


def test_topk_unsorted_fails() -> None:
    model = _clean_model()
    topk = next(n for n in model.graph.node if n.op_type == "TopK")
    next(a for a in topk.attribute if a.name == "sorted").i = 0
    violations = check_tensorrt_compatible(model)
    assert [(v.node, v.op_type) for v in violations] == [("topk", "TopK")]
    assert "sorted=0" in violations[0].reason


def test_topk_large_constant_k_fails() -> None:
    model = _clean_model()
    k = next(i for i in model.graph.initializer if i.name == "k")
    k.CopyFrom(_init("k", np.array([4096], np.int64)))
    assert "K=4096" in _reasons(model)


@pytest.mark.parametrize(
    ("op_type", "reduction", "fails"),
    [
        ("ScatterND", "add", True),
        ("ScatterND", "none", False),
        ("ScatterElements", "max", True),
        ("ScatterElements", "none", False),
    ],
)
def test_scatter_reduction(op_type: str, reduction: str, fails: bool) -> None:
    if op_type == "ScatterND":
        idx, upd = _init("idx", np.array([[0], [2]], np.int64)), _init("upd", np.ones((2, 4), np.float32))
    else:
        idx, upd = _init("idx", np.zeros((1, 4), np.int64)), _init("upd", np.ones((1, 4), np.float32))
    node = helper.make_node(op_type, ["x", "idx", "upd"], ["y"], name="scatter", reduction=reduction)
    model = _model([node], [_info("x", [4, 4])], [_info("y", [4, 4])], [idx, upd])
    text = _reasons(model)
    assert (f"reduction='{reduction}'" in text) is fails
    if not fails:
        assert text == ""


def test_resize_cubic_fails() -> None:
    node = helper.make_node("Resize", ["x", "", "scales"], ["y"], name="resize", mode="cubic")
    model = _model(
        [node], [_info("x", [1, 1, 4, 4])], [_info("y", None)], [_init("scales", np.array([1, 1, 2, 2], np.float32))]
    )
    assert "mode='cubic'" in _reasons(model)


def test_reduce_axes_must_be_constant() -> None:
    node = helper.make_node("ReduceSum", ["x", "axes"], ["y"], name="sum")
    dynamic = _model([node], [_info("x", [2, 3]), _info("axes", [1], TensorProto.INT64)], [_info("y", None)])
    assert "must be an initializer or a Constant output" in _reasons(dynamic)
    const = helper.make_node("Constant", [], ["axes"], value=_init("v", np.array([1], np.int64)))
    constant = _model([const, node], [_info("x", [2, 3])], [_info("y", None)])
    assert check_tensorrt_compatible(constant) == []


def test_layernorm_extra_output_used_fails() -> None:
    node = helper.make_node("LayerNormalization", ["x", "g"], ["y", "mean"], name="ln", axis=-1)
    inits = [_init("g", np.ones((8,), np.float32))]
    unused = _model([node], [_info("x", [2, 8])], [_info("y", None)], inits)
    assert check_tensorrt_compatible(unused) == []
    used = _model([node], [_info("x", [2, 8])], [_info("y", None), _info("mean", None)], inits)
    assert "Only the first output Y" in _reasons(used)


# ------------------------------------------------------------------------------------------ types and ranks


def test_double_input_fails() -> None:
    node = helper.make_node("Cast", ["x"], ["y"], name="cast", to=TensorProto.FLOAT)
    model = _model([node], [_info("x", [4], TensorProto.DOUBLE)], [_info("y", [4])])
    violations = check_tensorrt_compatible(model)
    assert any(v.node == "x" and v.op_type == "<graph input>" and "DOUBLE" in v.reason for v in violations)


def test_cast_to_double_fails() -> None:
    nodes = [
        helper.make_node("Cast", ["x"], ["d"], name="to_f64", to=TensorProto.DOUBLE),
        helper.make_node("Cast", ["d"], ["y"], name="to_f32", to=TensorProto.FLOAT),
    ]
    model = _model(nodes, [_info("x", [4])], [_info("y", [4])])
    violations = check_tensorrt_compatible(model)
    assert any(v.node == "to_f64" and "to=DOUBLE" in v.reason for v in violations)
    assert any(v.node == "d" and v.op_type == "<value_info>" for v in violations)  # found by shape inference


def test_double_initializer_and_constant_fail() -> None:
    nodes = [
        helper.make_node("Constant", [], ["c"], name="const", value=_init("v", np.ones((4,), np.float64))),
        helper.make_node("Add", ["x", "c"], ["y"], name="add"),
    ]
    model = _model(
        nodes,
        [_info("x", [4], TensorProto.DOUBLE)],
        [_info("y", [4], TensorProto.DOUBLE)],
        [_init("unused", np.ones((2,), np.float64))],
    )
    text = _reasons(model)
    assert "const (Constant): attribute 'value': DOUBLE tensor" in text
    assert "unused (<initializer>): DOUBLE tensor" in text


def test_non_tensorrt_types_fail() -> None:
    node = helper.make_node("Identity", ["x"], ["y"], name="id")
    model = _model([node], [_info("x", [4], TensorProto.INT16)], [_info("y", [4], TensorProto.INT16)])
    assert "INT16 is not a TensorRT data type" in _reasons(model)


def test_rank_nine_tensor_flagged() -> None:
    node = helper.make_node("Identity", ["x"], ["y"], name="id")
    model = _model([node], [_info("x", [1] * 9)], [_info("y", None)])
    assert "rank 9 exceeds" in _reasons(model)


def test_rank_nine_intermediate_found_by_shape_inference() -> None:
    nodes = [
        helper.make_node("Reshape", ["x", "shape"], ["r"], name="reshape"),
        helper.make_node("Reshape", ["r", "back"], ["y"], name="back"),
    ]
    inits = [_init("shape", np.ones((9,), np.int64)), _init("back", np.array([1], np.int64))]
    model = _model(nodes, [_info("x", [1])], [_info("y", [1])], inits)
    violations = check_tensorrt_compatible(model)
    assert [v.node for v in violations if "rank 9" in v.reason] == ["r"]


# ------------------------------------------------------------------------------------------ quantization


@pytest.mark.parametrize(("zero_point", "fails"), [(0, False), (3, True)])
def test_dequantize_zero_point(zero_point: int, fails: bool) -> None:
    node = helper.make_node("DequantizeLinear", ["q", "scale", "zp"], ["y"], name="dq")
    inits = [
        _init("q", np.ones((4,), np.int8)),
        _init("scale", np.array(0.5, np.float32)),
        _init("zp", np.array(zero_point, np.int8)),
    ]
    model = _model([node], [], [_info("y", [4])], inits)
    assert ("zero point 'zp' is non-zero" in _reasons(model)) is fails


def test_zero_point_in_external_data_is_skipped(tmp_path: Path) -> None:
    node = helper.make_node("QuantizeLinear", ["x", "scale", "zp"], ["y"], name="q")
    inits = [_init("scale", np.array(0.5, np.float32)), _init("zp", np.full((64,), 7, np.int8))]
    model = _model([node], [_info("x", [64])], [_info("y", [64], TensorProto.INT8)], inits)
    assert "non-zero" in _reasons(model)
    path = tmp_path / "q.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, location="q.data", size_threshold=16)
    assert "non-zero" not in _reasons(path)


# ------------------------------------------------------------------------------------------ subgraphs


def test_forbidden_op_inside_if_branch_is_found() -> None:
    then_graph = helper.make_graph(
        [helper.make_node("FusedGemm", ["x", "x"], ["t"], name="inner", domain="com.microsoft")],
        "then",
        [],
        [_info("t", [4, 4])],
    )
    else_graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["e"], name="keep")], "else", [], [_info("e", [4, 4])]
    )
    node = helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then_graph, else_branch=else_graph)
    model = _model(
        [node],
        [_info("cond", [], TensorProto.BOOL), _info("x", [4, 4])],
        [_info("y", [4, 4])],
        extra_opsets=(("com.microsoft", 1),),
    )
    violations = check_tensorrt_compatible(model)
    assert [v.node for v in violations] == ["branch/then_branch/inner"]
    assert "com.microsoft" in violations[0].reason


def test_forbidden_op_inside_loop_body_is_found() -> None:
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"], name="keep_going"),
            helper.make_node("Unique", ["v_in"], ["v_out"], name="uniq"),
        ],
        "body",
        [_info("iter", [], TensorProto.INT64), _info("cond_in", [], TensorProto.BOOL), _info("v_in", [4])],
        [_info("cond_out", [], TensorProto.BOOL), _info("v_out", [4])],
    )
    node = helper.make_node("Loop", ["trip", "", "x"], ["y"], name="loop", body=body)
    model = _model([node], [_info("x", [4])], [_info("y", [4])], [_init("trip", np.array(3, np.int64))])
    assert "loop/body/uniq (Unique)" in _reasons(model)


def test_double_inside_subgraph_is_found() -> None:
    body = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["t"], name="widen", to=TensorProto.DOUBLE)],
        "then",
        [],
        [_info("t", [4], TensorProto.DOUBLE)],
    )
    other = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["e"], to=TensorProto.DOUBLE)],
        "else",
        [],
        [_info("e", [4], TensorProto.DOUBLE)],
    )
    node = helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=body, else_branch=other)
    model = _model([node], [_info("cond", [], TensorProto.BOOL), _info("x", [4])], [_info("y", [4])])
    assert "branch/then_branch/widen (Cast): to=DOUBLE" in _reasons(model)


# ------------------------------------------------------------------------------------------ raising


def test_assert_raises_naming_the_graph(tmp_path: Path) -> None:
    model = _clean_model()
    topk = next(n for n in model.graph.node if n.op_type == "TopK")
    next(a for a in topk.attribute if a.name == "sorted").i = 0
    with pytest.raises(LladaEdgeError, match="'backbone_block'") as info:
        assert_tensorrt_compatible(model, "backbone_block")
    assert "topk (TopK): sorted=0" in str(info.value)
    path = tmp_path / "bad.onnx"
    onnx.save(model, str(path))
    with pytest.raises(LladaEdgeError) as info:
        assert_tensorrt_compatible(path, "from_disk")
    assert str(info.value).startswith(str(path))
    assert "'from_disk'" in str(info.value)


def test_assert_lists_only_the_first_violations() -> None:
    nodes = [helper.make_node("Unique", ["x"], [f"y{i}"], name=f"u{i}") for i in range(5)]
    model = _model(nodes, [_info("x", [4])], [_info(f"y{i}", None) for i in range(5)])
    with pytest.raises(LladaEdgeError) as info:
        assert_tensorrt_compatible(model, "many", max_listed=2)
    text = str(info.value)
    assert "5 problem(s)" in text and "u1 (Unique)" in text and "u2 (Unique)" not in text and "3 more" in text


# ------------------------------------------------------------------------------------------ our exporter


def test_torch_dynamo_export_passes(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(16, 32)
            self.norm = torch.nn.LayerNorm(32)

        def forward(self, x):
            h = self.norm(torch.nn.functional.gelu(self.proj(x)))
            probs = torch.softmax(h, dim=-1)
            values, indices = torch.topk(probs, 4, dim=-1)
            return values, indices

    path = tmp_path / "tiny.onnx"
    program = torch.onnx.export(Tiny().eval(), (torch.randn(2, 5, 16),), dynamo=True, verbose=False)
    program.save(str(path))
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert {"MatMul", "Softmax", "TopK", "LayerNormalization"} <= ops
    assert check_tensorrt_compatible(path) == []
