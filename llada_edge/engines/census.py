"""The engine census: in which number format each GEMM of a TensorRT engine stores its weights, read from what
the builder reports, checked against what the recipe asked for.

A strongly typed engine should store a GEMM's weights exactly as its graph says, but a build can still end
up wider than the recipe meant: a Q/DQ pair that a graph rewrite lost, a weight-only INT4 GEMM whose
activations are fp32 (constant-folded to fp32 weights), a fusion the builder has no narrow kernel for. So after
each build, the engine's layers are listed and every GEMM that the recipe put in fp8/int4/int8 (or, in a half
graph, fp16/bf16) is looked up: the narrowest matrix constant among the engine layers that carry that ONNX
node or its weight's DequantizeLinear is the format its weights are stored in. A GEMM stored wider than
expected fails the build (:class:`CensusFailed`); its entry records per GEMM what was asked and what was found,
plus the math types (the GEMM layers' input types).

Where the layer list comes from:

* TensorRT-RTX (and TensorRT) at ``ProfilingVerbosity.DETAILED`` log the engine's layers after the build
  ("Layers:" then one ``Name: ..., LayerType: ..., Inputs: [...], Constants: [...], ..., Metadata: [ONNX Layer:
  ...]`` line per layer): :func:`parse_layer_log`. This needs no GPU and is what runs here.
* Full TensorRT's engine inspector (``IEngineInspector.get_engine_information``, JSON) needs the engine loaded,
  i.e. a GPU: :func:`parse_inspector_json`, written against the documented format and **not run here**.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from llada_edge.errors import LladaEdgeError

# Bits per element of the datatypes the builder names.
DATATYPE_BITS = {"Int4": 4, "FP4": 4, "FP8": 8, "Int8": 8, "UInt8": 8, "Half": 16, "BFloat16": 16, "BF16": 16,
                 "Float": 32}
FORMAT_BITS = {"int4": 4, "fp8": 8, "int8": 8, "fp16": 16, "bf16": 16, "fp32": 32}

_TENSOR = re.compile(r"\{ Name: ([^,]+), Dimensions: \[([^\]]*)\].*?Datatype: (\w+)")
_ONNX_LAYER = re.compile(r"\[ONNX Layer: ([^\]]+)\]")


class CensusFailed(LladaEdgeError):
    """An engine stores a GEMM's weights in a wider format than its recipe asked for."""


@dataclass(frozen=True)
class Tensor:
    name: str
    dims: tuple[int, ...]
    datatype: str

    @property
    def is_matrix(self) -> bool:
        return len(self.dims) >= 2 and sum(d > 1 for d in self.dims) >= 2


@dataclass
class EngineLayer:
    name: str
    kind: str
    inputs: list[Tensor] = field(default_factory=list)
    constants: list[Tensor] = field(default_factory=list)
    onnx_nodes: list[str] = field(default_factory=list)
    outputs: list[Tensor] = field(default_factory=list)


def _tensors(section: str) -> list[Tensor]:
    out = []
    for name, dims, datatype in _TENSOR.findall(section):
        shape = tuple(int(d) for d in dims.split(",") if d.strip().lstrip("-").isdigit())
        out.append(Tensor(name.strip(), shape, datatype))
    return out


def _section(line: str, label: str, following: str) -> str:
    start = line.find(f"{label}: [")
    end = line.find(f"], {following}:", start)
    return line[start:end] if start >= 0 and end > start else ""


def parse_layer_log(text: str) -> list[EngineLayer]:
    """The layers of the builder's "Layers:" message (one line per layer)."""
    layers = []
    for line in text.splitlines():
        match = re.match(r"Name: (.+?), LayerType: ([^,]+),", line)
        if not match:
            continue
        layers.append(EngineLayer(match.group(1), match.group(2),
                                  _tensors(_section(line, "Inputs", "Constants")),
                                  _tensors(_section(line, "Constants", "Outputs")),
                                  _ONNX_LAYER.findall(line), _tensors(_section(line, "Outputs", "TacticName"))))
    return layers


def parse_inspector_json(text: str) -> list[EngineLayer]:  # pragma: no cover - needs a GPU (full TensorRT)
    """The layers of ``IEngineInspector.get_engine_information(LayerInformationFormat.JSON)``."""
    # The inspector describes types as "Row major linear FP16 format", "... Int8 ...", "... FP32 ...".
    words = {"int4": "Int4", "fp4": "FP4", "fp8": "FP8", "int8": "Int8", "fp16": "Half", "half": "Half",
             "bf16": "BFloat16", "bfloat16": "BFloat16", "fp32": "Float", "float": "Float"}

    def datatype(entry: dict[str, Any]) -> str:
        described = str(entry.get("Format/Datatype", entry.get("Datatype", ""))).lower().replace("-", " ")
        return next((name for word, name in words.items() if word in described.split()), described)

    layers = []
    for raw in json.loads(text).get("Layers", []):
        if not isinstance(raw, dict):
            continue
        inputs = [Tensor(str(t.get("Name", "")), tuple(t.get("Dimensions", [])), datatype(t))
                  for t in raw.get("Inputs", [])]
        constants = [Tensor(str(t.get("Name", "")), tuple(t.get("Dimensions", [])), datatype(t))
                     for t in raw.get("Constants") or raw.get("Weights") or [] if isinstance(t, dict)]
        layers.append(EngineLayer(str(raw.get("Name", "")), str(raw.get("LayerType", "")), inputs, constants,
                                  _ONNX_LAYER.findall(str(raw.get("Metadata", "")))))
    return layers


@dataclass(frozen=True)
class Gemm:
    """A GEMM of the graph the engine was built from, and the format the recipe gives its weights."""

    node: str
    weight: str
    expected: str  # fp32 / fp16 / bf16 / fp8 / int8 / int4


def _weight_types(layers_of: list[EngineLayer], producers: dict[str, EngineLayer], weight: str) -> list[str]:
    """The stored types of one GEMM's weight: a matrix constant named after it (``<weight>_constantHalf_myl0``,
    ``<weight>_i4_constantInt4_myl0``) where the builder kept the name; otherwise the matrix constants of the layers
    that carry the GEMM, and of the weight-only layers (no inputs: a dequantize of a constant) that produce their
    matrix inputs. The builder may fuse several GEMMs into one with a concatenated weight, whose dequantize then
    names only one of them, so following the data is what finds every GEMM's weights."""
    named = [t.datatype for layer in layers_of for t in layer.constants
             if t.is_matrix and t.name.startswith(weight) and t.datatype in DATATYPE_BITS]
    if named:
        return named
    types = []
    for layer in layers_of:
        sources = [layer]
        if layer.kind == "gemm":
            sources += [producers[t.name] for t in layer.inputs if t.is_matrix and t.name in producers
                        and not producers[t.name].inputs]
        types += [t.datatype for src in sources for t in src.constants if t.is_matrix and t.datatype in DATATYPE_BITS]
    if not types:  # weights the builder materialises from other inputs: the GEMMs' matrix inputs
        types = [t.datatype for layer in layers_of if layer.kind == "gemm" for t in layer.inputs
                 if t.is_matrix and t.datatype in DATATYPE_BITS]
    return types


def take_census(layers: list[EngineLayer], gemms: list[Gemm]) -> dict[str, Any]:
    """Per GEMM: the format asked, the narrowest stored weight type found, the math types; and the failures."""
    carriers: dict[str, list[EngineLayer]] = {}
    producers: dict[str, EngineLayer] = {}
    for layer in layers:
        for node in layer.onnx_nodes:
            carriers.setdefault(node, []).append(layer)
        for out in layer.outputs:
            producers[out.name] = layer
    found: dict[str, dict[str, Any]] = {}
    wider: list[str] = []
    narrowed: list[str] = []
    missing: list[str] = []
    for gemm in gemms:
        layers_of = carriers.get(gemm.node, []) + carriers.get(f"{gemm.weight}_DequantizeLinear", [])
        stored = _weight_types(layers_of, producers, gemm.weight)
        if not layers_of:
            missing.append(gemm.node)
            continue
        narrowest = min(stored, key=DATATYPE_BITS.__getitem__, default="none")
        math = sorted({t.datatype for layer in layers_of if layer.kind == "gemm" for t in layer.inputs})
        found[gemm.node] = {"expected": gemm.expected, "weights": narrowest, "math": math}
        if narrowest == "none" or DATATYPE_BITS[narrowest] > FORMAT_BITS[gemm.expected]:
            wider.append(gemm.node)
        elif gemm.expected == "fp32" and DATATYPE_BITS[narrowest] < 32:
            narrowed.append(gemm.node)  # a GEMM the precision policy keeps fp32 (router, codebook search)
    summary: dict[str, int] = {}
    for entry in found.values():
        key = f"{entry['expected']}->{entry['weights']}"
        summary[key] = summary.get(key, 0) + 1
    return {"layers": len(layers), "gemms": found, "summary": summary, "wider": wider, "narrowed": narrowed,
            "not_found": missing}


def check_census(census: dict[str, Any], component: str, recipe: str) -> None:
    """Raise :class:`CensusFailed` when a GEMM is stored wider than asked, when one the precision policy keeps fp32
    is stored narrower, or when a GEMM cannot be found in the engine at all."""
    if census["wider"]:
        node = census["wider"][0]
        got = census["gemms"][node]
        raise CensusFailed(f"{component}: recipe {recipe} asked for {got['expected']} weights in {node}, but the "
                           f"engine stores them as {got['weights']} ({len(census['wider'])} GEMM(s) wider than asked; "
                           f"see the census in the manifest)")
    if census["narrowed"]:
        node = census["narrowed"][0]
        raise CensusFailed(f"{component}: {node} must stay fp32 (router / codebook search), but the engine stores its "
                           f"weights as {census['gemms'][node]['weights']}")
    if census["not_found"]:
        raise CensusFailed(f"{component}: {len(census['not_found'])} GEMM(s) of the graph, e.g. "
                           f"{census['not_found'][0]}, appear in no layer of the engine's layer list, so their format "
                           "is unproven (was the build logged at ProfilingVerbosity.DETAILED?)")
