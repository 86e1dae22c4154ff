"""The component registry: one object per exported graph (vision tokenizer, embed, layer, heads, sampling
heads, SigVQ, DiT, VAE) owning its tensors, module builder, ONNX spec and profile, validation cases, recipe
kinds and feeds. Export, calibration, quantization, the engine builders and the runtime backends ask it
instead of parsing component names. Importing it needs numpy only (torch loads in ``build_module``).
"""

from llada_edge.components.backbone import Embed, Head, Layer, SampleHead
from llada_edge.components.base import Case, Component
from llada_edge.components.image import DiT, SigVQ, VaeDecoder, VisionTokenizer
from llada_edge.components.registry import Registry
from llada_edge.components.specs import ComponentSpec, TensorSig

__all__ = [
    "Case",
    "Component",
    "ComponentSpec",
    "DiT",
    "Embed",
    "Head",
    "Layer",
    "Registry",
    "SampleHead",
    "SigVQ",
    "TensorSig",
    "VaeDecoder",
    "VisionTokenizer",
]
