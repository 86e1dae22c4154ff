"""Build reference modules from a checkpoint folder, tensor by tensor.

Each loader validates the keys/shapes first (a clear :class:`CheckpointError` naming the file and
the key), builds the module on the meta device, then assigns the tensors read one at a time in the
requested dtype, so nothing is allocated twice.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from llada_edge import layout
from llada_edge.checkpoint import CheckpointFolder, validate
from llada_edge.errors import CheckpointError
from llada_edge.model.backbone import DecoderLayer, LLaDA2Backbone
from llada_edge.model.dit import ZImageDiT
from llada_edge.model.sigvq import SigVQ
from llada_edge.model.vae import VaeDecoder
from llada_edge.model.vision import SigLipVQTokenizer

Source = CheckpointFolder | str | Path
M = TypeVar("M", bound=nn.Module)


def _folder(source: Source) -> CheckpointFolder:
    return source if isinstance(source, CheckpointFolder) else CheckpointFolder(source)


def fill_module(module: M, read: Callable[[str], torch.Tensor], dtype: torch.dtype,
                prefix: str = "", defaults: dict[str, torch.Tensor] | None = None) -> M:
    """Assign every state-dict entry of a (meta) module from ``read(prefix + name)``, cast to dtype.

    ``defaults`` supplies entries the checkpoint may lack (e.g. a router bias the config disables).
    """
    defaults = defaults or {}
    state = {}
    for name in module.state_dict():
        key = prefix + name
        tensor = defaults[name] if name in defaults else read(key)
        state[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    module.load_state_dict(state, strict=True, assign=True)
    return module.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------
# Backbone
# ----------------------------------------------------------------------------------------------


def _expert_bias_defaults(ckpt: CheckpointFolder, layer: int) -> dict[str, torch.Tensor]:
    cfg = ckpt.config.backbone
    key = f"model.layers.{layer}.mlp.gate.expert_bias"
    if cfg.is_moe_layer(layer) and key not in ckpt.backbone and ckpt.expert_bias_optional():
        return {"mlp.gate.expert_bias": torch.zeros(cfg.num_experts)}
    return {}


def load_backbone(source: Source, dtype: torch.dtype = torch.float32, validate_keys: bool = True) -> LLaDA2Backbone:
    """The whole backbone (embeddings, every layer, norm, lm_head)."""
    ckpt = _folder(source)
    if validate_keys:
        ckpt.check(["backbone"])
    cfg = ckpt.config.backbone
    with torch.device("meta"):
        model = LLaDA2Backbone(cfg)
    reader = ckpt.backbone
    fill_module(model.model.word_embeddings, reader.get, dtype, "model.word_embeddings.")
    fill_module(model.model.norm, reader.get, dtype, "model.norm.")
    head_prefix = "model.word_embeddings." if cfg.tie_word_embeddings else "lm_head."
    fill_module(model.lm_head, reader.get, dtype, head_prefix)
    for i, layer in enumerate(model.model.layers):
        fill_module(layer, reader.get, dtype, f"model.layers.{i}.", _expert_bias_defaults(ckpt, i))
    return model.eval()


def load_backbone_layer(source: Source, index: int, dtype: torch.dtype = torch.float32) -> DecoderLayer:
    """One decoder layer from only that layer's tensors (bounded memory for per-layer export)."""
    ckpt = _folder(source)
    cfg = ckpt.config.backbone
    if not 0 <= index < cfg.num_hidden_layers:
        raise CheckpointError(f"layer {index} out of range (num_hidden_layers={cfg.num_hidden_layers})",
                              file=cfg.source, key="num_hidden_layers")
    expected = layout.backbone_layer_layout(cfg, index)
    present = {k: ckpt.backbone.info(k) for k in expected if k in ckpt.backbone}
    optional = [k for k in expected if k.endswith("expert_bias")] if ckpt.expert_bias_optional() else []
    validate(present, expected, f"backbone layer {index}", ckpt.backbone.source, optional).raise_if_failed()
    with torch.device("meta"):
        layer = DecoderLayer(cfg, index)
    return fill_module(layer, ckpt.backbone.get, dtype, f"model.layers.{index}.",
                       _expert_bias_defaults(ckpt, index))


# ----------------------------------------------------------------------------------------------
# Image tokenizer, SigVQ, decoder, VAE
# ----------------------------------------------------------------------------------------------


def load_vision_tokenizer(source: Source, dtype: torch.dtype = torch.float32,
                          order: str | None = None) -> SigLipVQTokenizer:
    """``order`` None follows ``merge_size`` in preprocessor_config.json (2 -> window, 1 -> raster)."""
    ckpt = _folder(source)
    ckpt.check(["vision"])
    with torch.device("meta"):
        model = SigLipVQTokenizer(ckpt.config.vision, order or ckpt.config.preprocessor.token_order)
    return fill_module(model, ckpt.vision.get, dtype)


def load_sigvq(source: Source, dtype: torch.dtype = torch.float32) -> SigVQ:
    ckpt = _folder(source)
    ckpt.check(["sigvq"])
    state = ckpt.load_sigvq_state()
    num_codes, dim = state["prior_token_embedding.weight"].shape
    with torch.device("meta"):
        model = SigVQ(num_codes, dim)
    return fill_module(model, state.__getitem__, dtype)


def load_dit(source: Source, mode: str = "turbo", dtype: torch.dtype = torch.float32) -> ZImageDiT:
    """``mode``: "turbo" (decoder-turbo/, the 8-step distilled one) or "normal" (decoder/)."""
    ckpt = _folder(source)
    reader = ckpt.decoder(mode)  # an unknown mode raises here (CheckpointFolder.decoder_dir)
    dec_cfg = ckpt.config.decoders[mode]  # every known mode has a config (ModelConfig.from_folder)
    validate(reader.tensors, layout.decoder_layout(dec_cfg), f"decoder ({mode})", reader.source).raise_if_failed()
    with torch.device("meta"):
        model = ZImageDiT(dec_cfg)
    return fill_module(model, reader.get, dtype)


def load_vae(source: Source, dtype: torch.dtype = torch.float32) -> VaeDecoder:
    from diffusers import AutoencoderKL

    ckpt = _folder(source)
    reader = ckpt.vae_weights
    config = ckpt.config.vae.raw
    validate(reader.tensors, layout.vae_layout(config), "VAE", reader.source).raise_if_failed()
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(config)
    return VaeDecoder(fill_module(vae, reader.get, dtype)).eval()
