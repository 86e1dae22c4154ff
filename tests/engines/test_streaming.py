"""The streaming build (`llada-edge stream`): same engines as export + build, bounded disk, resumable, clear errors."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from llada_edge.buildfolder import Artifact, BuildError, Manifest
from llada_edge.calibration.recipes import RECIPES
from llada_edge.cli import main
from llada_edge.engines import streaming
from llada_edge.engines.build import build_engines
from llada_edge.engines.streaming import StreamStats, stream_build
from llada_edge.errors import InputError
from llada_edge.export.build import export_build
from llada_edge.runtime import Pipeline
from llada_edge.synthetic import synthesize

ROOT = Path(__file__).resolve().parents[2]
COMPONENTS = ["backbone"]  # embedding, layers and the two heads: what a chat request needs
CHAT = [{"role": "user", "content": "What does json.dumps do?"}]


def _quiet(_message: str) -> None:
    pass


def _chat_tokens(build: Path, precision: str) -> list[int]:
    return Pipeline.load(build, precision=precision).chat(CHAT, max_new_tokens=32).tokens


def _graph_values(folder: Path) -> dict[str, np.ndarray]:
    model = onnx.load(str(folder / "model.onnx"))
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


@pytest.fixture(scope="module")
def streamed(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, StreamStats]:
    out = tmp_path_factory.mktemp("stream") / "build"
    return out, stream_build(tiny_ckpt, out, ["int4"], components=COMPONENTS, progress=_quiet)


def test_streamed_engines_equal_export_then_build(streamed, tiny_ckpt: Path, tmp_path: Path, measure) -> None:
    out, stats = streamed
    regular = tmp_path / "regular"
    export_build(tiny_ckpt, regular, COMPONENTS, moe="ort", validate=False, progress=_quiet)
    build_engines(regular, "onnxruntime", "int4", report=False, progress=_quiet)
    manifest = Manifest.load(out)
    quantized = [n for n in ("layer_0", "layer_1", "layer_2", "head_text", "head_image")]
    for name in quantized:  # the same weights and graph, whatever the order in the file
        ours = _graph_values(out / Artifact.ort_engine("int4", name).folder)
        theirs = _graph_values(regular / Artifact.ort_engine("int4", name).folder)
        assert ours.keys() == theirs.keys()
        assert all(np.array_equal(ours[k], theirs[k]) for k in ours), name
        assert manifest.components[name].dropped and not (out / "onnx" / name).exists()
    assert not manifest.components["embed"].dropped  # no recipe rewrites the embedding table: it runs as exported
    assert _chat_tokens(out, "int4") == _chat_tokens(regular, "int4")
    # peak disk: the finished build plus the largest single fp32 graph, never all of them at once
    largest = max(sum(p.stat().st_size for p in (regular / "onnx" / n).iterdir()) for n in quantized)
    assert stats.peak_disk_bytes <= stats.final_disk_bytes + largest
    assert stats.final_disk_bytes < sum(p.stat().st_size for p in regular.rglob("*") if p.is_file())
    measure("stream_tiny_peak_disk_over_final", stats.peak_disk_bytes / stats.final_disk_bytes)


def test_dropped_graphs_are_a_clear_error(streamed) -> None:
    out, _ = streamed
    with pytest.raises(BuildError, match="deleted by the streaming build"):
        Pipeline.load(out, precision="fp32")
    with pytest.raises(BuildError, match="deleted by the streaming build"):  # another recipe needs the graphs
        build_engines(out, "onnxruntime", "int8", report=False, progress=_quiet)


def test_a_task_whose_graphs_are_missing_fails_before_any_work(streamed, tiny_copy: Path) -> None:
    from PIL import Image

    out, _ = streamed  # the backbone only: no image tokenizer, no decoder
    pipe = Pipeline.load(out, precision="int4")
    with pytest.raises(InputError, match="text-to-image needs sigvq, dit_turbo, vae_decoder, which this build lacks"):
        pipe.generate_image("a lighthouse", 64, 64)
    with pytest.raises(InputError, match="understanding needs vision_tokenizer"):
        pipe.understand(Image.new("RGB", (64, 64)), "What is in this picture?")
    assert pipe.backend.forward_passes == 0  # refused up front, not after generating the tokens
    (tiny_copy / "decoder" / "model.safetensors").unlink()  # the torch reference, on a checkpoint without it
    with pytest.raises(InputError, match="dit_normal, whose weights this checkpoint lacks"):
        Pipeline.load(tiny_copy, backend="torch").generate_image("a lighthouse", 64, 64, decode_mode="normal")


def test_a_rerun_does_nothing(streamed, tiny_ckpt: Path) -> None:
    out, _ = streamed
    lines: list[str] = []
    stats = stream_build(tiny_ckpt, out, ["int4"], components=COMPONENTS, progress=lines.append)
    assert lines and all(line.endswith("up to date") for line in lines)
    assert len(stats.skipped) == len(lines)


def test_full_model_benchmark_reports_a_streamed_build(streamed, tmp_path: Path) -> None:
    """`make bench FULL=BUILD` in miniature: every figure of each request is there and finite."""
    out, _ = streamed
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "full_model.py"), "--build", str(out), "--out",
                          str(tmp_path), "--max-new-tokens", "16", "--t2i-size", "64", "--repeats", "2"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads((tmp_path / "full_model.json").read_text())
    assert report["build"]["stream"]["peak_disk_bytes"] >= report["build"]["stream"]["final_disk_bytes"] > 0
    rows = {r["task"]: r for r in report["requests"]}
    assert "skipped" in rows["understand"]  # a backbone-only build
    for task in ("chat", "t2i"):
        for key in ("load_s", "step_ms_median", "step_ms_p90", "tokens_per_forward", "tokens_per_s", "peak_rss_bytes"):
            assert math.isfinite(rows[task][key]) and rows[task][key] > 0, (task, key)
    assert report["reference_layer"]["speedup_vs_bf16"] > 0
    assert "| chat |" in (tmp_path / "full_model.md").read_text()


def test_interrupted_stream_resumes_and_never_trusts_a_partial_file(tmp_path: Path, monkeypatch) -> None:
    """On the FP8-experts checkpoint variant: interrupted in layer 2's engine, resumed after layer 2's kept fp32
    graph was truncated (a file a crash could have left): it is exported again, and the result runs."""
    ckpt = synthesize(tmp_path / "fp8", "tiny", expert_dtype="fp8", progress=_quiet)
    out = tmp_path / "build"
    real_step = streaming.ort_engine_step

    def interrupted(build_dir, manifest, recipe, component):
        if component.name == "layer_2":
            raise KeyboardInterrupt
        return real_step(build_dir, manifest, recipe, component)

    monkeypatch.setattr(streaming, "ort_engine_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        stream_build(ckpt, out, ["int4"], components=COMPONENTS, validate=False, progress=_quiet)
    monkeypatch.setattr(streaming, "ort_engine_step", real_step)
    data = out / "onnx" / "layer_2" / "model.onnx.data"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    lines: list[str] = []
    stream_build(ckpt, out, ["int4"], components=COMPONENTS, validate=False, progress=lines.append)
    done = {line.split()[2].rstrip(":"): line for line in lines}
    assert done["embed"].endswith("up to date") and done["layer_1"].endswith("up to date")
    assert "export" in done["layer_2"] and not done["layer_2"].endswith("up to date")
    assert not list(out.rglob("*.partial"))
    assert len(_chat_tokens(out, "int4")) > 0


def test_cli_stream_help_and_bad_precision(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["stream", "--help"])
    assert "Resumable" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["stream", "--checkpoint", "x", "--out", "y", "--precision", "fp16"])
    assert "invalid choice" in capsys.readouterr().err


def test_a_recipe_change_rebuilds_only_the_components_it_affects(tiny_ckpt: Path, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "build"
    names = ["layer_1", "head_text", "head_image"]
    stream_build(tiny_ckpt, out, ["int4"], components=names, keep_graphs=True, validate=False, progress=_quiet)
    monkeypatch.setitem(RECIPES, "int4", replace(RECIPES["int4"], lm_head="fp32"))  # the text head's format changes
    lines: list[str] = []
    stream_build(tiny_ckpt, out, ["int4"], components=names, keep_graphs=True, validate=False, progress=lines.append)
    done = {line.split()[2].rstrip(":"): line for line in lines}
    assert done["layer_1"].endswith("up to date") and done["head_image"].endswith("up to date")
    assert "int4" in done["head_text"] and not done["head_text"].endswith("up to date")
    census = Manifest.load(out).components["onnxruntime/int4/head_text"].meta["census"]
    assert census["fp32_const_matmuls"] == 1 and census["MatMulNBits"] == 0
