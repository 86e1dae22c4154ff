"""The TensorRT backend's own logic end to end on the host stand-in (real TensorRT-RTX engines of the tiny build; cudart
calls checked against the real cuda-python binding, carried out on host memory; engines run as their graphs on ONNX
Runtime): the same tokens as the ONNX Runtime backend, CUDA graphs captured and replayed, engine-typed buffers."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from llada_edge.calibration.requests import procedural_image
from llada_edge.engines.build import build_engines
from llada_edge.runtime import Pipeline
from llada_edge.runtime.backends.tensorrt_backend import TensorRTBackend
from llada_edge.runtime.backends.tensorrt_host import HostCudart, StandInError, host_libraries

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("tensorrt_rtx") is None or importlib.util.find_spec("cuda") is None,
    reason="tensorrt-rtx and cuda-python are not installed (pip install 'llada-edge[rtx]')")


@pytest.fixture(scope="module")
def engines(tiny_build: Path, tmp_path_factory) -> Path:
    """fp32 TensorRT-RTX engines of every component (the graphs the ONNX Runtime backend runs)."""
    dst = tmp_path_factory.mktemp("trt-host") / "b"
    shutil.copytree(tiny_build, dst, ignore=shutil.ignore_patterns("polygraphy"))
    build_engines(dst, "tensorrt-rtx", "fp32", sm=["sm89"], progress=lambda _m: None)
    return dst


@pytest.fixture(scope="module")
def pipes(engines: Path) -> dict[str, Pipeline]:
    trt = Pipeline.load(engines, backend="tensorrt", libraries=host_libraries(engines))
    return {"tensorrt": trt, "ort": Pipeline.load(engines)}


def test_understanding_gives_the_onnxruntime_tokens(pipes, tmp_path: Path) -> None:
    photo = tmp_path / "p.png"
    Image.fromarray(procedural_image(160, 224, seed=4)).save(photo)
    a, b = (p.understand(photo, "Describe it.", max_new_tokens=48, steps=8) for p in pipes.values())
    assert a.tokens == b.tokens and a.forward_passes == b.forward_passes


def test_t2i_gives_the_onnxruntime_tokens_through_replayed_graphs(pipes, measure) -> None:
    trt = pipes["tensorrt"].backend
    assert isinstance(trt, TensorRTBackend) and trt.target == "tensorrt-rtx"
    launches = trt.cudart.calls["cudaGraphLaunch"]
    a, b = (p.generate_image("a red kite", 192, 128, cfg_scale=3.0, steps=4) for p in pipes.values())
    assert a.vq_tokens == b.vq_tokens
    x, y = np.asarray(a.image, np.float64), np.asarray(b.image, np.float64)
    measure("trt_host_vs_ort_t2i_max_pixel_diff", float(np.abs(x - y).max()))
    assert np.abs(x - y).max() <= 1.0
    assert trt.cudart.calls["cudaGraphLaunch"] > launches + 2  # block steps replay their captured graph
    assert trt.cudart.calls["cudaMemcpy2DAsync"] > 0 and not trt.graph_fallbacks  # strided commits
    captured = [key for key, step in trt._steps.items() if step.graph not in (None, "eager")]
    assert captured and all(tokens == 32 for _rows, tokens in captured)


def test_runtime_cache_is_saved_next_to_the_engines(pipes, engines: Path) -> None:
    saved = pipes["tensorrt"].backend.save_runtime_cache()
    assert saved is not None and saved.parent == engines / "engines" / "tensorrt-rtx" and saved.is_file()
    assert saved.name.startswith("runtime.") and saved.name.endswith(".sm89.cache")


def test_close_frees_every_buffer_and_graph(engines: Path) -> None:
    libraries = host_libraries(engines)
    pipe = Pipeline.load(engines, backend="tensorrt", libraries=libraries)
    pipe.generate_image("a red kite", 128, 128, cfg_scale=3.0, steps=2)
    cu = libraries[1]
    assert cu.live["buffers"] > 0 and cu.live["graphs"] > 0
    pipe.backend.close()
    assert cu.live == {"buffers": 0, "graphs": 0} and cu.calls["cudaStreamDestroy"] == 1


def test_buffers_take_the_engines_types(tiny_build: Path, tmp_path: Path) -> None:
    build = tmp_path / "b"
    shutil.copytree(tiny_build, build, ignore=shutil.ignore_patterns("polygraphy"))
    build_engines(build, "tensorrt-rtx", "fp16", sm=["sm89"], progress=lambda _m: None)
    backend = TensorRTBackend(build, "fp16", libraries=host_libraries(build))
    assert backend.float_dtype == np.float16
    pipe = Pipeline(backend, Pipeline.load(build).tokenizer)
    result = pipe.generate_image("a red kite", 128, 128, cfg_scale=3.0, steps=2)
    assert len(result.vq_tokens) == 16 and result.image.size == (128, 128)
    assert all(buf.dtype == np.float16 for buf in backend._k)  # the KV cache in the engines' half type
    step = next(iter(backend._steps.values()))
    assert step.hidden[0].dtype == np.float16 and step.ids.dtype == np.int64


def test_without_a_gpu_the_real_libraries_stop_clearly(engines: Path, capsys) -> None:
    from llada_edge.cli import main

    assert main(["run", "chat", "--model", str(engines), "--backend", "tensorrt", "--prompt", "hi", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "needs an NVIDIA GPU" in err and "cudaErrorInsufficientDriver" in err and err.count("\n") == 1


def test_the_stand_in_rejects_what_a_gpu_would() -> None:
    cu = HostCudart()
    with pytest.raises(TypeError):  # the real binding checks the argument count
        cu.cudaMemcpy2DAsync(0, 16, 0, 16, 16, cu.cudaMemcpyKind.cudaMemcpyDeviceToDevice, None)
    ptr = cu.cudaMalloc(64)[1]
    stream = cu.cudaStreamCreate()[1]
    src = np.zeros(16, np.float32)
    with pytest.raises(StandInError, match="outside every device buffer"):
        cu.cudaMemcpyAsync(ptr + 8, src.ctypes.data, 64, cu.cudaMemcpyKind.cudaMemcpyHostToDevice, stream)
    with pytest.raises(StandInError, match="outside"):  # a pitch that runs past the end
        cu.cudaMemcpy2DAsync(ptr, 56, ptr, 16, 16, 2, cu.cudaMemcpyKind.cudaMemcpyDeviceToDevice, stream)
    cu.cudaFree(ptr)
    with pytest.raises(StandInError, match="cudaFree"):
        cu.cudaFree(ptr)


def test_engine_types_map_to_numpy_bf16_included() -> None:
    import types

    import ml_dtypes
    import tensorrt_rtx as trt

    holder = types.SimpleNamespace(trt=trt)  # _numpy_type reads only the TensorRT module
    assert TensorRTBackend._numpy_type(holder, trt.DataType.HALF) == np.float16  # type: ignore[arg-type]
    assert TensorRTBackend._numpy_type(holder, trt.DataType.BF16) == ml_dtypes.bfloat16  # type: ignore[arg-type]
