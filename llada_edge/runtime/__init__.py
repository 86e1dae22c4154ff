"""The lean runtime: numpy + tokenizers + Pillow, no torch (engines come in through backends).

    from llada_edge.runtime import Pipeline
    pipe = Pipeline.load("path/to/LLaDA2.0-Uni", backend="torch")
    print(pipe.understand("cat.png", "What is in the picture?").text)
"""

from llada_edge.runtime.backend import BACKENDS, Backend, create_backend
from llada_edge.runtime.pipeline import ImageResult, Pipeline, TextResult
from llada_edge.runtime.sampler import BlockDiffusionSampler, SamplingConfig, SprintConfig

__all__ = [
    "BACKENDS",
    "Backend",
    "BlockDiffusionSampler",
    "ImageResult",
    "Pipeline",
    "SamplingConfig",
    "SprintConfig",
    "TextResult",
    "create_backend",
]
