"""PyTorch reference modules of every LLaDA2.0-Uni component and their loaders.

Each module is written to export cleanly (static control flow, no complex numbers); the loaders
build it on the meta device and fill it tensor by tensor from the checkpoint folder, so peak memory
is the module itself plus one tensor.
"""

from llada_edge.model.backbone import LLaDA2Backbone, noaux_tc_route
from llada_edge.model.dit import ZImageDiT
from llada_edge.model.loading import (
    load_backbone,
    load_backbone_layer,
    load_dit,
    load_sigvq,
    load_vae,
    load_vision_tokenizer,
)
from llada_edge.model.sigvq import SigVQ
from llada_edge.model.vae import VaeDecoder
from llada_edge.model.vision import SigLipVQTokenizer

__all__ = [
    "LLaDA2Backbone",
    "SigLipVQTokenizer",
    "SigVQ",
    "VaeDecoder",
    "ZImageDiT",
    "load_backbone",
    "load_backbone_layer",
    "load_dit",
    "load_sigvq",
    "load_vae",
    "load_vision_tokenizer",
    "noaux_tc_route",
]
