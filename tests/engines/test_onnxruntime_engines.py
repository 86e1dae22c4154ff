"""ONNX Runtime CPU engines per recipe: QMoE storage vs numpy, no silent fp32 fallback, pipeline + report."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from llada_edge.buildfolder import Manifest
from llada_edge.calibration.recipes import RECIPES, get_recipe, int4_block_size, parse_overrides
from llada_edge.engines.build import build_engines
from llada_edge.engines.onnxruntime_builder import _quantize_rows, dequantize_rows
from llada_edge.errors import InputError
from llada_edge.runtime import Pipeline


def _qmoe_graph(w1, s1, w2, s2, tokens, hidden, experts, k, bits, block, accuracy_level) -> bytes:
    extra = {"block_size": block} if block else {}
    node = helper.make_node("QMoE", ["x", "router", "w1", "s1", "", "w2", "s2"], ["y"], domain="com.microsoft", k=k,
                            activation_type="swiglu", swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0,
                            normalize_routing_weights=0, expert_weight_bits=bits, quant_type="int",
                            accuracy_level=accuracy_level, **extra)
    graph = helper.make_graph(
        [node], "qmoe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [tokens, hidden]),
                         helper.make_tensor_value_info("router", TensorProto.FLOAT, [tokens, experts])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [tokens, hidden])],
        [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (s1, "s1"), (w2, "w2"), (s2, "s2"))])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20),
                                                   helper.make_opsetid("com.microsoft", 1)]).SerializeToString()


@pytest.mark.parametrize(("bits", "block"), [(4, 32), (4, 128), (8, None)])
def test_qmoe_matches_numpy_dequantized_reference(bits, block, measure) -> None:
    rng = np.random.default_rng(bits)
    experts, hidden, inner, tokens, k = 8, 256, 128, 6, 2
    fc1 = rng.standard_normal((experts, 2 * inner, hidden)).astype(np.float32)
    fc2 = rng.standard_normal((experts, hidden, inner)).astype(np.float32)
    w1, s1 = _quantize_rows(fc1, bits, block)
    w2, s2 = _quantize_rows(fc2, bits, block)
    d1, d2 = dequantize_rows(w1, s1, bits, block), dequantize_rows(w2, s2, bits, block)
    assert np.abs(d1 - fc1).max() < np.abs(fc1).max() * (0.2 if bits == 4 else 0.02)  # it is a quantization
    x = rng.standard_normal((tokens, hidden)).astype(np.float32)
    # the runtime's router logits: log(normalised weight) on the chosen experts, -1e9 elsewhere
    weights = np.zeros((tokens, experts), np.float32)
    for t in range(tokens):
        chosen = rng.choice(experts, k, replace=False)
        weights[t, chosen] = rng.dirichlet(np.ones(k))
    router = np.where(weights > 0, np.log(np.maximum(weights, 1e-30)), -1e9).astype(np.float32)
    session = ort.InferenceSession(_qmoe_graph(w1, s1, w2, s2, tokens, hidden, experts, k, bits, block, 0))
    got = session.run(None, {"x": x, "router": router})[0]
    want = np.zeros((tokens, hidden))
    for t in range(tokens):
        for e in np.flatnonzero(weights[t]):
            h = d1[e] @ x[t]
            want[t] += weights[t, e] * (d2[e] @ (h[0::2] / (1 + np.exp(-h[0::2])) * h[1::2]))
    rel = np.abs(got - want).max() / np.abs(want).max()
    measure(f"qmoe_int{bits}_block{block}_vs_numpy_max_rel", float(rel))
    assert rel <= 1e-4


def test_mse_scales_lower_the_int4_error_and_keep_the_storage() -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_t(4, size=(2, 64, 128)).astype(np.float32)  # heavy tails: outliers set amax
    errors = {}
    for method in ("max", "mse"):
        packed, scales = _quantize_rows(w, 4, 32, method)
        assert packed.shape == (2, 64, 64) and scales.shape == (2, 64, 4)
        errors[method] = float(((dequantize_rows(packed, scales, 4, 32) - w) ** 2).mean())
    assert errors["mse"] < 0.9 * errors["max"]


def test_recipes_and_overrides() -> None:
    assert RECIPES["mixed"].experts == "int4" and RECIPES["mixed"].dense == "fp8"
    r = get_recipe("int4", parse_overrides(["dit=fp8"]))
    assert r.dit == "fp8" and r.experts == "int4" and r.name == "int4+dit=fp8"
    assert r.router == "fp32" and r.lm_head == "int8" and r.image_head == "fp32"
    assert RECIPES["int8"].lm_head == "fp32" and RECIPES["mixed"].lm_head == "int8"
    r = get_recipe("int4", parse_overrides(["int4_block=32", "int4_scale=mse"]))
    assert r.int4_block == 32 and r.int4_scale == "mse" and r.name == "int4+int4_block=32+int4_scale=mse"
    with pytest.raises(InputError, match="int4_block must be one of"):
        get_recipe("int4", {"int4_block": "abc"})
    with pytest.raises(InputError, match="int4_scale='minmax' is not one of"):
        get_recipe("int4", {"int4_scale": "minmax"})
    with pytest.raises(InputError, match="unknown precision"):
        get_recipe("int3")
    with pytest.raises(InputError, match="unknown weight kinds"):
        get_recipe("int4", {"attention": "int8"})
    assert int4_block_size(2048) == 128 and int4_block_size(64) == 64 and int4_block_size(170, exact=False) == 128


@pytest.fixture(scope="module")
def engines(trained_build_ort: Path) -> dict[str, Manifest]:
    out = {}
    for precision in ("int4", "int8", "fp8", "mixed"):
        out[precision] = build_engines(trained_build_ort, "onnxruntime", precision, progress=lambda _m: None)
    return out


@pytest.mark.parametrize("precision", ["int4", "int8", "fp8", "mixed"])
def test_no_weight_silently_left_in_fp32(engines, precision) -> None:
    manifest = engines[precision]
    recipe = RECIPES[precision]
    for name in ("layer_1", "layer_2"):  # MoE layers
        census = manifest.components[f"onnxruntime/{precision}/{name}"].meta["census"]
        if recipe.experts in ("int4", "int8"):
            assert census["QMoE"] == 1 and census["MoE"] == 0
        else:
            assert census["MoE"] == 1 and census["fp8_weights"] >= 2  # fp8-stored experts in front of MoE
        assert census["fp32_const_matmuls"] == 1  # the router only
        if recipe.dense in ("int4", "int8"):
            assert census["MatMulNBits"] == 5  # fused QKV, attention out, shared expert gate/up/down
    layer0 = manifest.components[f"onnxruntime/{precision}/layer_0"].meta["census"]
    assert layer0["fp32_const_matmuls"] == 0
    dit = manifest.components[f"onnxruntime/{precision}/dit_turbo"].meta["census"]
    assert dit["fp32_const_matmuls"] == 0 and (dit["MatMulNBits"] > 0 or dit["fp8_weights"] > 0)
    text_heads = [manifest.components[f"onnxruntime/{precision}/{name}"].meta["census"]
                  for name in ("head_text", "head_text_sample")]
    if recipe.lm_head == "int8":  # int4 and mixed: the text head in MatMulNBits int8
        assert all(h["MatMulNBits"] == 1 and h["fp32_const_matmuls"] == 0 for h in text_heads)
    else:
        assert all(h["fp32_const_matmuls"] == 1 for h in text_heads)
    image_head = manifest.components[f"onnxruntime/{precision}/head_image"].meta["census"]
    assert image_head["fp32_const_matmuls"] == 1  # the image head stays fp32 unless asked


@pytest.mark.parametrize("precision", ["int4", "int8", "fp8", "mixed"])
def test_each_recipe_runs_the_pipeline_and_passes_its_report(engines, trained_build_ort, precision, measure) -> None:
    report = engines[precision].reports[f"accuracy-{precision}"]
    assert (trained_build_ort / report["path"]).is_file()
    for metric in ("logit_cosine", "top1_agreement", "top1_agreement_t2i", "perplexity_ratio", "expert_agreement",
                   "expert_agreement_layer_1", "expert_agreement_layer_2", "masked_accuracy",
                   "generated_agreement_understand", "generated_agreement_t2i", "tokenizer_id_agreement",
                   "dit_velocity_rel_error", "decode_psnr_db", "t2i_psnr_db"):
        assert np.isfinite(report[metric]), metric
        measure(f"accuracy_{precision}_{metric}", report[metric])
    assert report["passed"], report
    pipe = Pipeline.load(trained_build_ort, precision=precision)
    result = pipe.generate_image("a quiet harbour", 64, 64, steps=4)
    assert result.image.size == (64, 64) and len(result.vq_tokens) == 4


def test_missing_precision_is_a_clear_error(tiny_build: Path) -> None:
    with pytest.raises(InputError, match="no int8 engines"):
        Pipeline.load(tiny_build, precision="int8")


def test_engine_graphs_load_external_data(engines, trained_build_ort) -> None:
    path = trained_build_ort / "engines" / "onnxruntime" / "int4" / "layer_1" / "model.onnx"
    model = onnx.load(str(path), load_external_data=False)
    assert any(t.data_location == TensorProto.EXTERNAL for t in model.graph.initializer)


def _wrong_scale(quantize):
    """Stored scales disagree with the ones the codes were rounded with (amax/8 vs amax/7: two conventions mixed)."""
    def broken(w, bits, block, *method):
        packed, scales = quantize(w, bits, block, *method)
        return packed, scales * (2 ** (bits - 1)) / (2 ** (bits - 1) - 1)
    return broken


def _transposed_block(quantize):
    """Each row's K blocks written in reverse order (a layout bug: a block lands where another belongs)."""
    def broken(w, bits, block, *method):
        size = block or w.shape[-1] // 2
        blocks = w.reshape(*w.shape[:-1], w.shape[-1] // size, size)
        return quantize(np.ascontiguousarray(blocks[..., ::-1, :].reshape(w.shape)), bits, block, *method)
    return broken


@pytest.mark.parametrize("breakage", [_wrong_scale, _transposed_block], ids=["wrong-scale", "transposed-block"])
def test_a_broken_recipe_fails_its_report(trained_build_ort, engines, breakage, tmp_path, monkeypatch, measure) -> None:
    """The thresholds separate a shipped recipe (every one passes above) from the same recipe with a bug in the
    expert quantizer: the int4 engines of a copy of the build are rebuilt with the bug, then reported on."""
    import shutil

    from llada_edge.engines import build, onnxruntime_builder

    copy = tmp_path / "build"
    shutil.copytree(trained_build_ort, copy, ignore=shutil.ignore_patterns(".lock"))
    monkeypatch.setattr(onnxruntime_builder, "_quantize_rows", breakage(onnxruntime_builder._quantize_rows))
    monkeypatch.setattr(build, "BUILDER_VERSION", f"{build.BUILDER_VERSION}-broken")  # not "up to date"
    report = build_engines(copy, "onnxruntime", "int4", progress=lambda _m: None).reports["accuracy-int4"]
    measure(f"accuracy_int4_{breakage.__name__.strip('_')}_top1_agreement", report["top1_agreement"])
    assert not report["passed"], report
