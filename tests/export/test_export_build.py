"""``llada-edge export``: every graph validated, TensorRT-parsable operators, idempotent and crash-safe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llada_edge.buildfolder import Manifest
from llada_edge.cli import main
from llada_edge.export import build as build_module
from llada_edge.export.allowlist import check_tensorrt_compatible
from llada_edge.export.build import export_build


def test_every_component_exported_and_validated(tiny_build: Path, measure) -> None:
    manifest = Manifest.load(tiny_build)
    manifest.verify(tiny_build)
    expected = {"vision_tokenizer", "sigvq", "dit_turbo", "dit_normal", "vae_decoder", "embed", "layer_0",
                "layer_1", "layer_2", "head_text", "head_image", "head_text_sample", "head_image_sample"}
    assert expected <= set(manifest.components)
    for name in expected:
        v = manifest.components[name].validation
        assert v is not None and v["passed"], name
        assert len(v["cases"]) >= 2
        measure(f"onnx_vs_torch_max_rel_{name}", v["max_rel"])
        for side in ("inputs", "outputs"):
            assert (tiny_build / v["polygraphy"][side]).is_file()
    layer_cases = [c["case"] for c in manifest.components["layer_1"].validation["cases"]]
    assert any("CFG" in c for c in layer_cases) and any("edit" in c for c in layer_cases)
    assert any("prefill" in c for c in layer_cases)
    assert (tiny_build / "reports" / "validation.md").is_file()
    assert manifest.options["moe"] == "dense" and manifest.versions["onnxruntime"]


def test_dense_graphs_pass_the_tensorrt_allowlist(tiny_build: Path) -> None:
    graphs = sorted(tiny_build.glob("onnx/*/model.onnx"))
    assert len(graphs) == 13  # 11 components + the two fused sampling heads
    for path in graphs:
        assert check_tensorrt_compatible(path) == [], path.parent.name


@pytest.fixture(scope="module")
def ort_layers(tiny_ckpt: Path, tmp_path_factory) -> tuple[Path, list[str]]:
    out = tmp_path_factory.mktemp("ortbuild") / "b"
    log: list[str] = []
    export_build(tiny_ckpt, out, ["layers"], moe="ort", progress=log.append)
    return out, log


def test_ort_moe_lowering_matches_reference(ort_layers, measure) -> None:
    out, _ = ort_layers
    manifest = Manifest.load(out)
    for name in ("layer_1", "layer_2"):  # the MoE layers (layer 0 is dense)
        v = manifest.components[name].validation
        measure(f"ort_moe_lowering_max_rel_{name}", v["max_rel"])
        assert v["passed"] and v["max_rel"] <= 1e-4
        assert manifest.components[name].meta["moe"] == "ort"
    violations = check_tensorrt_compatible(out / "onnx" / "layer_1" / "model.onnx")
    assert any("com.microsoft" in str(v) for v in violations)  # ORT-only graph: the check says so
    assert manifest.components["layer_0"].meta["moe"] is None


def test_reexport_skips_what_is_up_to_date_and_rebuilds_what_changed(ort_layers, tiny_ckpt) -> None:
    out, _ = ort_layers
    log: list[str] = []
    export_build(tiny_ckpt, out, ["layers"], moe="ort", progress=log.append)
    assert all(line.endswith("up to date") for line in log) and len(log) == 3
    log.clear()
    export_build(tiny_ckpt, out, ["layer_0", "layer_1"], moe="dense", progress=log.append)
    assert log[0].endswith("layer_0: up to date")  # the dense layer does not depend on the MoE lowering
    assert "layer_1:" in log[1] and "up to date" not in log[1]
    assert Manifest.load(out).components["layer_1"].meta["moe"] == "dense"


def test_changed_checkpoint_rebuilds_only_affected_components(tiny_copy: Path, tmp_path: Path) -> None:
    out = tmp_path / "b"
    export_build(tiny_copy, out, ["embed", "layer_0"], validate=False, progress=lambda _m: None)
    index = json.loads((tiny_copy / "model.safetensors.index.json").read_text())["weight_map"]
    shard = tiny_copy / index["model.layers.0.input_layernorm.weight"]
    assert index["model.word_embeddings.weight"] != shard.name
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x01  # a rewritten shard: new bytes (the key follows content, not mtimes or paths)
    shard.write_bytes(bytes(data))
    log: list[str] = []
    export_build(tiny_copy, out, ["embed", "layer_0"], validate=False, progress=log.append)
    assert log[0].endswith("embed: up to date") and "up to date" not in log[1]


def test_interrupted_export_leaves_nothing_trusted(tiny_ckpt: Path, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "b"

    def crash(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(build_module, "validate_component", crash)
    with pytest.raises(KeyboardInterrupt):
        export_build(tiny_ckpt, out, ["sigvq"], progress=lambda _m: None)
    assert not (out / "onnx" / "sigvq").exists()
    assert not list(out.rglob("*.partial"))  # the temporary folder went with the crash
    assert "sigvq" not in Manifest.load(out).components
    monkeypatch.undo()
    export_build(tiny_ckpt, out, ["sigvq"], progress=lambda _m: None)
    assert Manifest.load(out).components["sigvq"].validation["passed"]


def test_an_output_may_carry_its_own_tolerance(tiny_ckpt: Path) -> None:
    """The sample head's p (see SampleHead.validation_tolerances): 2.7e-6 off a max of 0.025 fails the default
    1e-4 of max |reference| and passes p's own 1e-3; integer ids stay exact whatever the tolerances."""
    import numpy as np

    from llada_edge.components import Registry
    from llada_edge.config import ModelConfig
    from llada_edge.export.validate import compare

    reference = {"x0": np.array([3, 7]), "p": np.array([0.025, 0.01], np.float32)}
    actual = {"x0": np.array([3, 7]), "p": np.array([0.025 + 2.7e-6, 0.01], np.float32)}
    assert not compare(reference, actual)["p"]["passed"]
    tolerances = Registry(ModelConfig.from_folder(tiny_ckpt))["head_text_sample"].validation_tolerances
    stats = compare(reference, actual, tolerances)
    assert stats["p"]["passed"] and stats["p"]["max_rel"] == pytest.approx(2.7e-6 / 0.025, rel=1e-2)
    assert not compare(reference, {**actual, "x0": np.array([3, 8])}, tolerances)["x0"]["passed"]


def test_failed_validation_is_never_up_to_date(tiny_ckpt: Path, tmp_path: Path, monkeypatch) -> None:
    """A graph that failed its validation is exported and judged again on the next run (exit 1 each time), never
    skipped as up to date; once it passes (here: the tolerance restored) it is kept."""
    from llada_edge.export import validate

    out = tmp_path / "b"
    monkeypatch.setattr(validate, "RELATIVE_TOLERANCE", 1e-12)  # sigvq's fp32 graph differs by ~1e-7
    for _ in range(2):
        log: list[str] = []
        with pytest.raises(build_module.ValidationFailed, match="sigvq"):
            export_build(tiny_ckpt, out, ["sigvq"], progress=log.append)
        assert log[-1].endswith("FAILED")
    monkeypatch.undo()
    export_build(tiny_ckpt, out, ["sigvq"], progress=lambda _m: None)
    log = []
    export_build(tiny_ckpt, out, ["sigvq"], progress=log.append)
    assert log[-1].endswith("sigvq: up to date")


def test_export_cli_errors(tmp_path: Path, tiny_ckpt: Path, capsys) -> None:
    assert main(["export", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "b")]) == 2
    assert "config.json" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(tiny_ckpt), "--out", str(tmp_path / "b"), "--components",
                 "layer_99"]) == 2
    assert "unknown component 'layer_99'" in capsys.readouterr().err
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("x")
    assert main(["export", "--checkpoint", str(tiny_ckpt), "--out", str(tmp_path / "junk")]) == 2
    assert "no manifest.json" in capsys.readouterr().err


def test_large_components_export_in_their_own_process(tiny_ckpt: Path, tmp_path: Path, monkeypatch) -> None:
    """Components above ISOLATE_BYTES run in a spawned process (memory bounded by process exit)."""
    monkeypatch.setattr(build_module, "ISOLATE_BYTES", 0)
    out = tmp_path / "b"
    export_build(tiny_ckpt, out, ["sigvq", "layer_1"], progress=lambda _m: None)
    manifest = Manifest.load(out)
    assert manifest.components["layer_1"].validation["passed"]
    assert manifest.components["sigvq"].validation["passed"]
    assert not list((out / "onnx").glob(".*"))


def test_export_with_relative_paths(tiny_ckpt: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """What `make engines` does: relative --checkpoint and --out."""
    import shutil

    shutil.copytree(tiny_ckpt, tmp_path / "ck")
    monkeypatch.chdir(tmp_path)
    assert main(["export", "--checkpoint", "ck", "--out", "build/b", "--components", "sigvq"]) == 0
    assert "1 components" in capsys.readouterr().out
    Manifest.load(tmp_path / "build" / "b").verify(tmp_path / "build" / "b")
