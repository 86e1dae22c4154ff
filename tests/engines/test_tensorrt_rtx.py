"""Real TensorRT-RTX engine builds on a CPU machine (tensorrt_rtx builds ahead of time without a GPU): half-precision
GPU graphs, the engine census per recipe, a planted fallback that the census must catch, and the recipes the target
cannot build."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from llada_edge.buildfolder import Artifact, Manifest
from llada_edge.cli import main
from llada_edge.engines.build import build_engines
from llada_edge.engines.census import CensusFailed, Gemm, check_census, parse_layer_log, take_census
from llada_edge.engines.tensorrt_builder import build_engine, profile_shapes
from llada_edge.engines.tensorrt_flavours import FLAVOURS

pytestmark = pytest.mark.skipif(importlib.util.find_spec("tensorrt_rtx") is None,
                                reason="tensorrt-rtx is not installed (pip install 'llada-edge[rtx]')")
SM = ["sm89"]  # one architecture keeps the builds short; fp8 needs 8.9+


@pytest.fixture(scope="module")
def rtx_build(tiny_build: Path, tmp_path_factory) -> Path:
    """A private copy of the dense build, with a small calibration capture (engines get added to it)."""
    dst = tmp_path_factory.mktemp("rtx") / "b"
    shutil.copytree(tiny_build, dst, ignore=shutil.ignore_patterns("polygraphy"))
    assert main(["calibrate", "--build", str(dst), "--max-samples", "16"]) == 0
    return dst


def _census(build: Path, precision: str, component: str) -> dict:
    entry = Manifest.load(build).components[Artifact.trt_engine("tensorrt-rtx", precision, component).entry]
    assert entry.files[0].path.endswith(f".trtrtx{entry.meta['version']}.sm89.plan")
    return entry.meta["census"]


@pytest.mark.parametrize(("precision", "components", "stored"), [
    ("fp16", ["layer_1"], "Half"),
    ("int4", ["layer_1"], "Int4"),
    ("fp8", ["dit_turbo"], "FP8"),
])
def test_engines_store_the_recipes_formats(rtx_build: Path, precision: str, components: list[str], stored: str,
                                           measure) -> None:
    build_engines(rtx_build, "tensorrt-rtx", precision, sm=SM, components=components, progress=lambda _m: None)
    census = _census(rtx_build, precision, components[0])
    formats = {g["weights"] for g in census["gemms"].values()}
    assert stored in formats and not census["wider"] and not census["narrowed"]
    measure(f"rtx_{precision}_{components[0]}_gemms", census["summary"])
    if components[0] == "layer_1":  # the router stays fp32 whatever the recipe (the half-precision policy)
        router = [g for g in census["gemms"].values() if g["expected"] == "fp32"]
        assert router and all(g["weights"] == "Float" for g in router)


def test_fp16_graphs_are_validated_against_fp32(rtx_build: Path) -> None:
    build_engines(rtx_build, "tensorrt-rtx", "fp16", sm=SM, components=["layer_1"], progress=lambda _m: None)
    entry = Manifest.load(rtx_build).components[Artifact.qdq_graph("fp16", "layer_1").entry]
    check = entry.meta["validation"]
    assert check["passed"] and check["rows_within"] >= check["min_rows_within"]
    graph = onnx.load(str(rtx_build / entry.files[0].path.rsplit("/", 1)[0] / "model.onnx"), load_external_data=False)
    inputs = {i.name: i.type.tensor_type.elem_type for i in graph.graph.input}
    assert inputs["hidden"] == onnx.TensorProto.FLOAT16 and inputs["past_k"] == onnx.TensorProto.FLOAT16
    assert inputs["positions"] == onnx.TensorProto.INT64  # only float tensors change type


def test_export_dtype_writes_half_graphs_and_sets_the_gpu_dtype(rtx_build: Path, tiny_ckpt: Path) -> None:
    from llada_edge.engines.build import gpu_recipe

    assert main(["export", "--checkpoint", str(tiny_ckpt), "--out", str(rtx_build), "--components", "sigvq",
                 "--dtype", "bf16"]) == 0
    manifest = Manifest.load(rtx_build)
    assert manifest.components[Artifact.qdq_graph("bf16", "sigvq").entry].meta["dtype"] == "bf16"
    assert manifest.options["dtype"] == "bf16"
    assert gpu_recipe("fp8", None, manifest).dtype == "bf16"  # quantized recipes follow the export
    assert gpu_recipe("fp16", None, manifest).dtype == "fp16"  # the float recipes are what they say
    assert gpu_recipe("fp8", {"dtype": "fp32"}, manifest).dtype == "fp32"  # and so does an explicit override
    manifest.options["dtype"] = "fp32"
    assert gpu_recipe("int4", None, manifest).dtype == "fp16"  # the GPU default
    manifest.save(rtx_build)


def _strip_one_dequantize(src: Path, dst: Path, node_name: str) -> None:
    """Replace the DequantizeLinear of one GEMM's weight by the dequantized weight itself (a lost Q/DQ pair)."""
    model = onnx.load(str(src / "model.onnx"))
    inits = {i.name: i for i in model.graph.initializer}
    producer = {out: n for n in model.graph.node for out in n.output}
    gemm = next(n for n in model.graph.node if n.name == node_name)
    dq = producer[gemm.input[1]]
    assert dq.op_type == "DequantizeLinear"
    q = numpy_helper.to_array(inits[dq.input[0]]).astype(np.float32)
    scale = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float32)
    dense = (q.reshape(scale.shape[0], -1, q.shape[-1]) * scale[:, None, :]).reshape(q.shape)
    model.graph.initializer.append(numpy_helper.from_array(dense.astype(np.float16), gemm.input[1] + "_plain"))
    gemm.input[1] = gemm.input[1] + "_plain"
    model.graph.node.remove(dq)
    dst.mkdir(parents=True)
    onnx.save(model, str(dst / "model.onnx"), save_as_external_data=True, location="model.onnx.data")


def test_census_catches_a_planted_fallback(rtx_build: Path, tmp_path: Path) -> None:
    build_engines(rtx_build, "tensorrt-rtx", "int4", sm=SM, components=["layer_1"], progress=lambda _m: None)
    manifest = Manifest.load(rtx_build)
    graph = manifest.components[Artifact.qdq_graph("int4", "layer_1").entry]
    gemms = [Gemm(**g) for g in graph.meta["gemms"]]
    victim = next(g for g in gemms if g.expected == "int4" and ".experts." in g.weight)
    _strip_one_dequantize(rtx_build / "quant" / "int4" / "layer_1", tmp_path / "planted", victim.node)
    census = build_engine(FLAVOURS["tensorrt-rtx"].load(), FLAVOURS["tensorrt-rtx"],
                          tmp_path / "planted" / "model.onnx", tmp_path / "planted.plan",
                          profile_shapes(manifest.components["layer_1"]), ("sm89",), tmp_path / "cache", gemms)
    assert census["wider"] == [victim.node]
    with pytest.raises(CensusFailed, match=f"int4 weights in {victim.node}.*stores them as Half"):
        check_census(census, "layer_1", "int4")


def test_int8_recipe_and_old_gpus_are_refused(rtx_build: Path, capsys) -> None:
    assert main(["build", "--build", str(rtx_build), "--target", "tensorrt-rtx", "--precision", "int8"]) == 2
    err = capsys.readouterr().err
    assert "recipe int8 puts it in int8, which tensorrt-rtx cannot build" in err and err.count("\n") == 1
    assert main(["build", "--build", str(rtx_build), "--target", "tensorrt-rtx", "--precision", "fp8",
                 "--sm", "sm86"]) == 2
    assert "fp8 needs compute capability 8.9+" in capsys.readouterr().err


def test_census_parses_the_builders_layer_list() -> None:
    log = ("Layers:\nName: gemm_0, LayerType: gemm, Inputs: [ { Name: x, Dimensions: [-1,64], Datatype: FP8, Format: "
           "(Linear) Row major linear format }], Constants: [ { Name: w, Dimensions: [64,128], Datatype: FP8, Format: "
           "(Linear) Row major linear format }], Outputs: [ { Name: y, Dimensions: [-1,128], Datatype: Half, Format: "
           "(Linear) Row major }], TacticName: t, StreamId: 0, Metadata: [ONNX Layer: node_a][ONNX Layer: node_b]\n"
           "Name: dq_1, LayerType: kgen, Inputs: [], Constants: [ { Name: s, Dimensions: [1,64], Datatype: Half, "
           "Format: x }, { Name: q, Dimensions: [64,64], Datatype: Int4, Format: x }], Outputs: [ { Name: wq, "
           "Dimensions: [64,64], Datatype: Half, Format: x }], TacticName: t, StreamId: 0, Metadata: [ONNX Layer: "
           "w2_DequantizeLinear]\n"
           "Name: gemm_2, LayerType: gemm, Inputs: [ { Name: y, Dimensions: [-1,64], Datatype: Half, Format: x }, { "
           "Name: wq, Dimensions: [64,64], Datatype: Half, Format: x }], Constants: [], Outputs: [ { Name: z, "
           "Dimensions: [-1,64], Datatype: Half, Format: x }], TacticName: t, StreamId: 0, Metadata: [ONNX Layer: "
           "node_c]\n")
    layers = parse_layer_log(log)
    assert [layer.onnx_nodes for layer in layers] == [["node_a", "node_b"], ["w2_DequantizeLinear"], ["node_c"]]
    census = take_census(layers, [Gemm("node_a", "w", "fp8"), Gemm("node_c", "w9", "int4"), Gemm("gone", "w", "fp8")])
    assert census["gemms"]["node_a"]["weights"] == "FP8"
    assert census["gemms"]["node_c"]["weights"] == "Int4"  # followed from the GEMM's input to its dequantize
    assert census["not_found"] == ["gone"] and not census["wider"]
    assert take_census(layers, [Gemm("node_a", "w", "int4")])["wider"] == ["node_a"]  # fp8 is wider than int4
    fused = parse_layer_log(
        "Name: f, LayerType: runtime_fusion, Inputs: [], Constants: [ { Name: wx_constantHalf_myl0, Dimensions: "
        "[64,64], Datatype: Half, Format: x }, { Name: __mye1_dconst_myl0, Dimensions: [64,64], Datatype: Int4, "
        "Format: x }], Outputs: [], TacticName: t, StreamId: 0, Metadata: [ONNX Layer: node_x][ONNX Layer: node_y]")
    # a constant named after the GEMM's weight decides; the fused layer's other (narrower) weight does not
    assert take_census(fused, [Gemm("node_x", "wx", "int4")])["wider"] == ["node_x"]
