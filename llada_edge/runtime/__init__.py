"""The lean runtime: numpy + tokenizers + Pillow, no torch (engines come in through backends).

    from llada_edge.runtime import Pipeline
    pipe = Pipeline.load("path/to/LLaDA2.0-Uni", backend="torch")
    print(pipe.understand("cat.png", "What is in the picture?").text)

* ``pipeline``: :class:`Pipeline` (understand, chat, t2i with thinking, edit, decode);
* ``requests``: typed options and requests, every run default written once;
* ``sampler``: the block-diffusion loop (CFG, SPRINT) over the :class:`Backend` protocol (``backend``);
* ``decode``: the turbo / normal ODE samplers and the VAE; ``prompts``, ``text``, ``images``: the model's I/O;
* ``backends/``: torch, onnxruntime and tensorrt implementations, created by :func:`create_backend`.
"""

from llada_edge.runtime.backend import Backend
from llada_edge.runtime.backends import BACKENDS, BackendOptions, create_backend
from llada_edge.runtime.pipeline import ImageResult, Pipeline, TextResult
from llada_edge.runtime.requests import (
    ChatRequest,
    EditOptions,
    EditRequest,
    T2IOptions,
    T2IRequest,
    TextOptions,
    UnderstandRequest,
)
from llada_edge.runtime.sampler import BlockDiffusionSampler, SamplingConfig, SprintConfig

__all__ = [
    "BACKENDS",
    "Backend",
    "BackendOptions",
    "BlockDiffusionSampler",
    "ChatRequest",
    "EditOptions",
    "EditRequest",
    "ImageResult",
    "Pipeline",
    "SamplingConfig",
    "SprintConfig",
    "T2IOptions",
    "T2IRequest",
    "TextOptions",
    "TextResult",
    "UnderstandRequest",
    "create_backend",
]
