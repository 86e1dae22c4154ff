"""The two TensorRT flavours behind one seam: ``tensorrt`` (data-centre and Jetson GPUs) and ``tensorrt-rtx``
(TensorRT for RTX: GeForce/RTX PRO desktops and laptops, DGX Spark). Both have the same builder, network,
ONNX parser and runtime API; they differ in what they are installed as, which GPUs they build for, and which
number formats they build.

* ``tensorrt`` builds for the GPU it runs on (its compute capability, read through cuda-python), so it needs one.
* ``tensorrt-rtx`` builds ahead of time for the compute capabilities it is given, with **no GPU**; its engines
  are compiled just in time on the RTX GPU at load (a runtime cache kept next to the engines saves that work).
  It builds fp16/bf16, FP8 on 8.9+ and INT4 weight-only GEMMs; not INT8 activations (the ``int8`` recipe).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from llada_edge.calibration.recipes import KINDS, Recipe
from llada_edge.components import Component
from llada_edge.errors import InputError
from llada_edge.runtime.backends.gpu_libs import import_cudart, import_tensorrt

# TensorRT-RTX's ComputeCapability values, as the build's --sm names them.
RTX_ARCHITECTURES = ("sm75", "sm80", "sm86", "sm89", "sm120", "sm121")
DEFAULT_RTX_ARCHITECTURES = ("sm89", "sm120")  # RTX 40 and RTX 50 series
FP8_MIN_SM = 89
BF16_MIN_SM = 80  # Turing (sm75) has no bf16 tensor cores


@dataclass(frozen=True)
class Flavour:
    target: str  # the build's --target (its Python module: gpu_libs.TENSORRT_MODULES)
    tag: str  # in engine file names
    ahead_of_time: bool  # builds for named compute capabilities without a GPU
    formats: tuple[str, ...]  # Q/DQ formats its builder takes

    def load(self) -> Any:
        """The flavour's module, or a clear InputError (exit code 2) naming what to install."""
        return import_tensorrt(self.target)

    def architectures(self, requested: list[str] | None) -> tuple[str, ...]:
        """The compute capabilities the engines are built for: the GPU's own (``tensorrt``) or the requested
        ones (``tensorrt-rtx``; default :data:`DEFAULT_RTX_ARCHITECTURES`)."""
        if not self.ahead_of_time:
            if requested:
                raise InputError("--sm applies to --target tensorrt-rtx; tensorrt builds for the GPU it runs on")
            return (gpu_sm(),)
        archs = tuple(dict.fromkeys(requested or DEFAULT_RTX_ARCHITECTURES))
        unknown = [a for a in archs if a not in RTX_ARCHITECTURES]
        if unknown:
            raise InputError(f"--sm {unknown[0]}: TensorRT-RTX builds for {', '.join(RTX_ARCHITECTURES)}")
        return archs

    def fit(self, recipe: Recipe, progress: Callable[[str], None]) -> Recipe:
        """A stock recipe whose *secondary* kinds use a format this flavour lacks (``int4`` keeps the tokenizer's
        ViT in int8) leaves those kinds unquantized here, and says so; a recipe whose experts' format is missing
        (``int8``) is not rewritten: :meth:`check_recipe` then refuses it."""
        if recipe.format_of("experts") not in (*self.formats, "fp32"):
            return recipe
        missing: dict[str, Any] = {k: "fp32" for k in KINDS if recipe.format_of(k) not in (*self.formats, "fp32")}
        if not missing:
            return recipe
        progress(f"{self.target} builds no {'/'.join(sorted({recipe.format_of(k) for k in missing}))} Q/DQ: "
                 f"{', '.join(sorted(missing))} stay {recipe.dtype} under {recipe.name}")
        return replace(recipe, **missing)  # same name: the engines of `int4` on this target (the entry records it)

    def check_recipe(self, recipe: Recipe, components: list[Component], archs: tuple[str, ...]) -> None:
        """Stop before any work when a component's format is one this flavour cannot build (one line, naming the
        component, the recipe and what the target supports)."""
        old = [a for a in archs if recipe.dtype == "bf16" and int(a[2:]) < BF16_MIN_SM]
        if old:
            raise InputError(f"recipe {recipe.name} runs in bf16, which {old[0]} does not have (bf16 needs compute "
                             "capability 8.0+): choose --sm from sm80 up, or fp16")
        for component in components:
            fmt = recipe.graph_format(component.graph_kinds)
            if fmt == "fp32":
                continue
            if fmt not in self.formats:
                raise InputError(f"{component.name}: recipe {recipe.name} puts it in {fmt}, which {self.target} "
                                 f"cannot build (it builds {', '.join(self.formats)} Q/DQ graphs and fp32/fp16/bf16)")
            old = [a for a in archs if fmt == "fp8" and int(a[2:]) < FP8_MIN_SM]
            if old:
                raise InputError(f"{component.name}: recipe {recipe.name} needs fp8, which {old[0]} does not have "
                                 f"(fp8 needs compute capability 8.9+): choose --sm from sm89, sm120, sm121")

    def engine_name(self, component: str, version: str, archs: tuple[str, ...]) -> str:
        """``layer_3.trtrtx1.7.1.116.sm89+sm120.plan``: the flavour, its version and the GPUs it runs on."""
        return f"{component}.{self.tag}{version}.{'+'.join(archs)}.plan"


FLAVOURS = {
    "tensorrt": Flavour("tensorrt", "trt", ahead_of_time=False, formats=("fp8", "int8", "int4")),
    "tensorrt-rtx": Flavour("tensorrt-rtx", "trtrtx", ahead_of_time=True, formats=("fp8", "int4")),
}


def get_flavour(target: str) -> Flavour:
    if target not in FLAVOURS:
        raise InputError(f"unknown TensorRT target {target!r} (expected one of {list(FLAVOURS)})")
    return FLAVOURS[target]


def gpu_sm() -> str:
    """``sm90`` for an H100/H200: full-TensorRT engines are specific to the GPU architecture."""
    cudart = import_cudart()
    err, props = cudart.cudaGetDeviceProperties(0)
    if int(err) != 0:
        raise InputError(f"no CUDA device available (cudaGetDeviceProperties returned {err})")
    return f"sm{props.major}{props.minor}"
