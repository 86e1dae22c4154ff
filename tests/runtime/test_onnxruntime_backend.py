"""The pipeline on ONNX Runtime equals the torch reference; build folders are checked before use."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from llada_edge.calibration.requests import procedural_image
from llada_edge.cli import main
from llada_edge.runtime import Pipeline
from llada_edge.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend


def psnr(a: Image.Image, b: Image.Image) -> float:
    x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mse = ((x - y) ** 2).mean()
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.fixture(scope="module")
def pipes(tiny_ckpt: Path, tiny_build: Path) -> dict[str, Pipeline]:
    return {"torch": Pipeline.load(tiny_ckpt, backend="torch"), "ort": Pipeline.load(tiny_build)}


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("img") / "p.png"
    Image.fromarray(procedural_image(160, 224, seed=4)).save(path)
    return path


def test_auto_backend_picks_onnxruntime_for_a_build(pipes) -> None:
    assert isinstance(pipes["ort"].backend, OnnxRuntimeBackend)


def test_understanding_same_tokens(pipes, photo) -> None:
    a, b = (p.understand(photo, "Describe it.", max_new_tokens=48, steps=8) for p in pipes.values())
    assert a.tokens == b.tokens and a.text == b.text and a.forward_passes == b.forward_passes


def test_t2i_with_cfg_same_tokens_and_image(pipes, measure) -> None:
    a, b = (p.generate_image("a red kite", 192, 128, cfg_scale=3.0, steps=4) for p in pipes.values())
    assert a.vq_tokens == b.vq_tokens
    value = psnr(a.image, b.image)
    measure("ort_vs_torch_t2i_psnr_db", value)
    assert value >= 40.0


@pytest.mark.parametrize("image_scale", [0.0, 1.5])
def test_edit_same_tokens_and_image(pipes, photo, image_scale, measure) -> None:
    a, b = (p.edit(photo, "make it winter", cfg_image_scale=image_scale, steps=4, source_size=128)
            for p in pipes.values())
    assert a.vq_tokens == b.vq_tokens
    value = psnr(a.image, b.image)
    measure(f"ort_vs_torch_edit_psnr_db_image_scale_{image_scale}", value)
    assert value >= 40.0


def test_normal_decoder_matches(pipes, measure) -> None:
    tokens = list(range(0, 16384, 2731))[:6]
    a, b = (p.decode(tokens, 64, 96, mode="normal", steps=6) for p in pipes.values())
    value = psnr(a.image, b.image)
    measure("ort_vs_torch_normal_decode_psnr_db", value)
    assert value >= 40.0


def test_hot_loop_reuses_its_buffers(tiny_build: Path) -> None:
    backend = OnnxRuntimeBackend(tiny_build)
    backend.start(2, 96)
    ids = np.full((2, 32), 156895)
    pos = np.tile(np.arange(32), (2, 1))
    valid = np.ones((2, 32), bool)
    k_cache = backend._k[0]
    hidden, logits = [], []
    for _ in range(4):
        h, _ = backend.forward_block(ids, pos, valid)
        hidden.append(h)
        logits.append(backend.head_image(h))
    # hidden states ping-pong between two preallocated buffers; logits always land in the same one
    assert len({h.__array_interface__["data"][0] for h in hidden}) <= 2
    assert len({x.__array_interface__["data"][0] for x in logits}) == 1
    backend.commit(ids, pos, valid)
    assert backend._k[0] is k_cache and backend.cache_len == 32 and backend.forward_passes == 5


def test_sprint_pruning_needs_attention_scores(tiny_build: Path) -> None:
    from llada_edge.errors import InputError

    backend = OnnxRuntimeBackend(tiny_build)
    backend.start(1, 64)
    with pytest.raises(InputError, match="SPRINT"):
        backend.forward_block(np.zeros((1, 32), np.int64), np.zeros((1, 32), np.int64), np.ones((1, 32), bool),
                              key_importance=True)


def _copy_build(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("polygraphy"))
    return dst


def test_bad_build_folders_exit_2(tiny_build: Path, tiny_ckpt: Path, tmp_path: Path, capsys) -> None:
    args = ["run", "chat", "--prompt", "hi", "--quiet", "--max-new-tokens", "8"]
    assert main([*args, "--model", str(tiny_ckpt), "--backend", "onnxruntime"]) == 2
    assert "build folder" in capsys.readouterr().err
    old = _copy_build(tiny_build, tmp_path / "old")
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["format_version"] = 99
    (old / "manifest.json").write_text(json.dumps(manifest))
    assert main([*args, "--model", str(old)]) == 2
    assert "incompatible" in capsys.readouterr().err
    tampered = _copy_build(tiny_build, tmp_path / "tampered")
    data = tampered / "onnx" / "layer_1" / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    assert main([*args, "--model", str(tampered)]) == 2
    err = capsys.readouterr().err
    assert "sha256 mismatch" in err and "model.onnx.data" in err and len(err.strip().splitlines()) == 1


def test_onnxruntime_pipeline_runs_without_torch(tiny_build: Path) -> None:
    script = (
        "import sys\n"
        "class NoTorch:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' or name.startswith('torch.'):\n"
        "            raise ImportError('blocked')\n"
        "sys.meta_path.insert(0, NoTorch())\n"
        "from llada_edge.runtime import Pipeline\n"
        f"pipe = Pipeline.load({str(tiny_build)!r})\n"
        "res = pipe.generate_image('a boat', 64, 64, steps=4)\n"
        "assert res.image.size == (64, 64) and 'torch' not in sys.modules\n"
        "print('ok', res.forward_passes)\n")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("ok")


@pytest.mark.parametrize("backend_name", ["torch", "ort"])
def test_fused_sampling_head_gives_the_same_tokens(pipes, backend_name) -> None:
    """head_*_sample (CFG + argmax + p inside the graph) vs logits + host scoring."""
    from llada_edge.runtime import prompts
    from llada_edge.runtime.sampler import BlockDiffusionSampler, SamplingConfig, left_pad

    pipe = pipes[backend_name]
    assert "image" in pipe.backend.fused_head_kinds
    tok = pipe.tokenizer
    rows = left_pad([prompts.t2i_prompt(tok, "a red kite", 6, 4), prompts.t2i_unconditional_prompt(tok, 6, 4)],
                    pipe.config.backbone.mask_token_id)
    results = [BlockDiffusionSampler(pipe.backend, "image", SamplingConfig(steps=4, fused_head=fused)).generate(
        rows, 24, [3.0, -2.0]) for fused in (True, False)]
    assert results[0].tokens.tolist() == results[1].tokens.tolist()
    for r in results:
        assert 0.0 < r.engine_seconds <= r.loop_seconds and 0.0 <= r.host_fraction < 1.0
