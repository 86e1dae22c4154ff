"""CUDA graphs: the static-shape path they need (full-capacity cache + key mask, static MoE) is checked
on the CPU; capture and replay themselves run only where a CUDA device exists."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from llada_edge.errors import InputError
from llada_edge.runtime import Pipeline
from llada_edge.runtime.backends.torch_backend import TorchBackend

CUDA = torch.cuda.is_available()


def _tokens(pipe: Pipeline) -> tuple[list[int], list[int]]:
    image = pipe.generate_image("a tall ship", 192, 128, cfg_scale=3.0, steps=4)
    text = pipe.chat([{"role": "user", "content": "hello there"}], max_new_tokens=32, steps=8)
    return image.vq_tokens, text.tokens


@pytest.fixture(scope="module")
def loop_tokens(tiny_ckpt: Path) -> tuple[list[int], list[int]]:
    """The upstream loop lowering with a dynamic cache: what every static path must reproduce."""
    dynamic = Pipeline.load(tiny_ckpt, backend="torch")
    assert dynamic.backend.moe_impl == "loop"
    return _tokens(dynamic)


@pytest.mark.parametrize("moe_impl", [None, "padded", "dense"])
def test_static_shapes_give_the_same_tokens(tiny_ckpt: Path, loop_tokens, moe_impl: str | None) -> None:
    """Each static lowering (None: the default, grouped) against the loop."""
    static = Pipeline.load(tiny_ckpt, backend="torch", static_shapes=True, moe_impl=moe_impl)
    assert static.backend.moe_impl == (moe_impl or "grouped")
    assert _tokens(static) == loop_tokens


@pytest.mark.parametrize("static_shapes", [False, True])
def test_fused_step_equals_block_then_head(tiny_ckpt: Path, static_shapes: bool) -> None:
    backend = TorchBackend(tiny_ckpt, static_shapes=static_shapes)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 150000, (2, 64))
    pos = np.tile(np.arange(64), (2, 1))
    valid = np.ones((2, 64), bool)
    weights = np.array([3.0, -2.0], np.float32)
    results = []
    for fused in (False, True):
        backend.start(2, 96)
        backend.prefill(ids[:, :32], pos[:, :32], valid[:, :32])
        for kind in ("image", "text"):
            if fused:
                results.append(backend.forward_sample(kind, ids[:, 32:], pos[:, 32:], valid[:, 32:], weights))
            else:
                hidden, _ = backend.forward_block(ids[:, 32:], pos[:, 32:], valid[:, 32:])
                results.append(backend.head_sample(kind, hidden, weights))
    for (x_ref, p_ref), (x0, p) in zip(results[:2], results[2:], strict=True):
        assert x0.dtype == np.int64 and x0.shape == (32,)
        np.testing.assert_array_equal(x0, x_ref)
        np.testing.assert_allclose(p, p_ref, rtol=1e-6)
    assert backend.forward_passes == 6  # 2 x (prefill + 2 steps), fused or not


def test_backend_options_are_checked(tiny_ckpt: Path) -> None:
    for kwargs, message in (({"moe_impl": "scatter"}, "unknown MoE lowering 'scatter'"),
                            ({"static_shapes": True, "moe_impl": "loop"}, "static MoE lowering"),
                            ({"fp8": "token", "moe_impl": "dense"}, "grouped MoE lowering"),
                            ({"fp8": "channel"}, "FP8 activation scaling 'channel'")):
        with pytest.raises(InputError, match=message):
            TorchBackend(tiny_ckpt, **kwargs)
    assert TorchBackend(tiny_ckpt, fp8="token").moe_impl == "grouped"
    # CUDA's grouped GEMM is bf16-only (torch's fp32 fallback reads the offsets on the host): fp32 gets padded
    assert TorchBackend._pick_moe(None, True, None, cuda_fp32=True) == "padded"
    assert TorchBackend._pick_moe(None, True, None, cuda_fp32=False) == "grouped"


def test_cuda_graphs_need_a_cuda_device(tiny_ckpt: Path) -> None:
    if CUDA:
        pytest.skip("a CUDA device is present")
    with pytest.raises(InputError, match="CUDA device"):
        TorchBackend(tiny_ckpt, device="cpu", cuda_graphs=True)


@pytest.mark.skipif(not CUDA, reason="no CUDA device: CUDA-graph capture/replay runs on GPU machines only")
def test_graph_replay_matches_eager(tiny_ckpt: Path) -> None:  # pragma: no cover - GPU machines only
    eager = TorchBackend(tiny_ckpt, device="cuda", static_shapes=True)
    graphs = TorchBackend(tiny_ckpt, device="cuda", cuda_graphs=True)
    ids = np.full((2, 32), 156895)
    pos = np.tile(np.arange(32), (2, 1))
    valid = np.ones((2, 32), bool)
    outs = []
    for backend in (eager, graphs, graphs):  # the second graphs call replays the captured step
        backend.start(2, 96)
        outs.append(backend.forward_block(ids, pos, valid)[0])
    assert not graphs.graph_fallbacks
    np.testing.assert_allclose(outs[1], outs[0], atol=1e-4)
    np.testing.assert_allclose(outs[2], outs[0], atol=1e-4)


@pytest.mark.skipif(not CUDA, reason="no CUDA device: CUDA-graph capture/replay runs on GPU machines only")
def test_fused_graph_steps_give_the_eager_tokens(tiny_ckpt: Path) -> None:  # pragma: no cover - GPU machines only
    eager = Pipeline.load(tiny_ckpt, backend="torch", device="cuda", dtype="bfloat16", static_shapes=True)
    graphs = Pipeline.load(tiny_ckpt, backend="torch", device="cuda", dtype="bfloat16", cuda_graphs=True)
    a, b = (p.generate_image("a tall ship", 192, 128, cfg_scale=3.0, steps=4) for p in (eager, graphs))
    assert a.vq_tokens == b.vq_tokens and not graphs.backend.graph_fallbacks
    assert {key[0] for key in graphs.backend._graphs} == {"block", "image"}


def test_tensorrt_backend_without_engines_exits_2(tiny_build: Path, capsys) -> None:
    from llada_edge.cli import main

    assert main(["run", "chat", "--model", str(tiny_build), "--backend", "tensorrt", "--prompt", "hi",
                 "--quiet"]) == 2
    assert "no fp32 TensorRT engines; run `llada-edge build --target tensorrt-rtx" in capsys.readouterr().err


@pytest.mark.skipif(not CUDA, reason="no CUDA device: the TensorRT backend runs on GPU machines only")
def test_tensorrt_backend_matches_onnxruntime(tiny_build: Path) -> None:  # pragma: no cover - GPU machines only
    pytest.importorskip("tensorrt", reason="TensorRT is not installed")
    from llada_edge.engines.build import build_engines

    build_engines(tiny_build, "tensorrt", "fp8", progress=lambda _m: None)
    trt_pipe = Pipeline.load(tiny_build, backend="tensorrt", precision="fp8")
    result = trt_pipe.generate_image("a tall ship", 64, 64, steps=4)
    assert result.image.size == (64, 64) and not trt_pipe.backend.graph_fallbacks
