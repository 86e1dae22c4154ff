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


def test_static_shapes_give_the_same_tokens(tiny_ckpt: Path) -> None:
    dynamic = Pipeline.load(tiny_ckpt, backend="torch")
    static = Pipeline.load(tiny_ckpt, backend="torch", static_shapes=True)
    assert static.backend.moe_impl == "dense"
    a, b = (p.generate_image("a tall ship", 192, 128, cfg_scale=3.0, steps=4) for p in (dynamic, static))
    assert a.vq_tokens == b.vq_tokens
    ta, tb = (p.chat([{"role": "user", "content": "hello there"}], max_new_tokens=32, steps=8)
              for p in (dynamic, static))
    assert ta.tokens == tb.tokens


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
