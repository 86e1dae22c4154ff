"""The upstream checkpoint layout: every tensor key, shape and stored dtype, per component.

Written from the tables of model-spec.md (§2.2 backbone, §5.4 image tokenizer, §6.1 SigVQ,
§6.2 Z-Image decoder). The synthetic writer generates exactly these tensors and the checkpoint
validator checks a folder against them, so the two can never drift apart; the library-parity tests
(transformers' GLM-Image tokenizer, diffusers' Z-Image transformer, both loaded with strict key
checks) confirm the names independently. The VAE layout is diffusers' own AutoencoderKL.

Pure Python (no torch): shapes and dtype names only; :func:`vae_layout` alone imports torch and
diffusers, when called.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llada_edge.config import BackboneConfig, DecoderConfig, VisionTokenizerConfig

# safetensors dtype names -> bytes per element
DTYPE_SIZES = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4,
               "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
FLOAT_DTYPES = frozenset({"BF16", "F16", "F32", "F8_E4M3"})


@dataclass(frozen=True)
class TensorSpec:
    """One expected tensor: its shape, the dtype we write, and how synthetic values are drawn."""

    shape: tuple[int, ...]
    dtype: str = "BF16"
    # Synthetic init: "linear" N(0, 1/fan_in), "norm" 1+0.1N, "bias" 0.02N, "embedding" N(0,1),
    # "small" 0.02N, "expert_bias" 0.1N.
    init: str = "linear"

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_SIZES[self.dtype]


Layout = dict[str, TensorSpec]


def _linear(out_f: int, in_f: int, dtype: str = "BF16") -> TensorSpec:
    return TensorSpec((out_f, in_f), dtype, "linear")


# ----------------------------------------------------------------------------------------------
# Backbone (root model-*.safetensors)
# ----------------------------------------------------------------------------------------------


def backbone_layer_layout(cfg: BackboneConfig, i: int, *, expert_dtype: str = "BF16",
                          with_expert_bias: bool = True) -> Layout:
    """Keys of decoder layer ``i`` (model-spec §2.2)."""
    h, hd = cfg.hidden_size, cfg.head_dim
    qkv_rows = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * hd
    p = f"model.layers.{i}."
    out: Layout = {
        p + "input_layernorm.weight": TensorSpec((h,), init="norm"),
        p + "attention.query_key_value.weight": _linear(qkv_rows, h),
    }
    if cfg.use_qk_norm:
        out[p + "attention.query_layernorm.weight"] = TensorSpec((hd,), init="norm")
        out[p + "attention.key_layernorm.weight"] = TensorSpec((hd,), init="norm")
    out[p + "attention.dense.weight"] = _linear(h, cfg.num_attention_heads * hd)
    out[p + "post_attention_layernorm.weight"] = TensorSpec((h,), init="norm")
    if not cfg.is_moe_layer(i):
        f = cfg.intermediate_size
        out[p + "mlp.gate_proj.weight"] = _linear(f, h)
        out[p + "mlp.up_proj.weight"] = _linear(f, h)
        out[p + "mlp.down_proj.weight"] = _linear(h, f)
        return out
    f = cfg.moe_intermediate_size
    out[p + "mlp.gate.weight"] = _linear(cfg.num_experts, h)
    if with_expert_bias:
        out[p + "mlp.gate.expert_bias"] = TensorSpec((cfg.num_experts,), "F32", "expert_bias")
    for e in range(cfg.num_experts):
        q = f"{p}mlp.experts.{e}."
        out[q + "gate_proj.weight"] = _linear(f, h, expert_dtype)
        out[q + "up_proj.weight"] = _linear(f, h, expert_dtype)
        out[q + "down_proj.weight"] = _linear(h, f, expert_dtype)
    if cfg.num_shared_experts:
        fs = f * cfg.num_shared_experts
        q = p + "mlp.shared_experts."
        out[q + "gate_proj.weight"] = _linear(fs, h)
        out[q + "up_proj.weight"] = _linear(fs, h)
        out[q + "down_proj.weight"] = _linear(h, fs)
    return out


def backbone_layout(cfg: BackboneConfig, *, expert_dtype: str = "BF16", with_expert_bias: bool = True) -> Layout:
    """All backbone keys in checkpoint order: embeddings, layers 0..L-1, final norm, lm_head."""
    out: Layout = {"model.word_embeddings.weight": TensorSpec((cfg.vocab_size, cfg.hidden_size), init="embedding")}
    for i in range(cfg.num_hidden_layers):
        out.update(backbone_layer_layout(cfg, i, expert_dtype=expert_dtype, with_expert_bias=with_expert_bias))
    out["model.norm.weight"] = TensorSpec((cfg.hidden_size,), init="norm")
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = _linear(cfg.vocab_size, cfg.hidden_size)
    return out


# ----------------------------------------------------------------------------------------------
# Image tokenizer (image_tokenizer/*.safetensors)
# ----------------------------------------------------------------------------------------------


def vision_layout(cfg: VisionTokenizerConfig) -> Layout:
    d, p = cfg.hidden_size, cfg.patch_size
    out: Layout = {
        "model.visual.patch_embed.proj.weight": TensorSpec((d, cfg.in_channels, p, p)),
        "model.visual.patch_embed.proj.bias": TensorSpec((d,), init="bias"),
        "model.visual.embeddings.position_embedding.weight": TensorSpec((cfg.pos_grid**2, d), init="embedding"),
    }
    for i in range(cfg.depth):
        b = f"model.visual.blocks.{i}."
        out.update({
            b + "norm1.weight": TensorSpec((d,), init="norm"),
            b + "norm1.bias": TensorSpec((d,), init="bias"),
            b + "norm2.weight": TensorSpec((d,), init="norm"),
            b + "norm2.bias": TensorSpec((d,), init="bias"),
            b + "attn.qkv.weight": _linear(3 * d, d),
            b + "attn.qkv.bias": TensorSpec((3 * d,), init="bias"),
            b + "attn.proj.weight": _linear(d, d),
            b + "attn.proj.bias": TensorSpec((d,), init="bias"),
            b + "mlp.fc1.weight": _linear(cfg.intermediate_size, d),
            b + "mlp.fc1.bias": TensorSpec((cfg.intermediate_size,), init="bias"),
            b + "mlp.fc2.weight": _linear(d, cfg.intermediate_size),
            b + "mlp.fc2.bias": TensorSpec((d,), init="bias"),
        })
    e, lat = cfg.embed_dim, cfg.latent_channels
    out.update({
        "model.vqmodel.quantize.embedding.weight": TensorSpec((cfg.num_embeddings, e), init="embedding"),
        "model.vqmodel.quant_conv.weight": TensorSpec((e, lat, 1, 1)),
        "model.vqmodel.quant_conv.bias": TensorSpec((e,), init="bias"),
        "model.vqmodel.post_quant_conv.weight": TensorSpec((lat, e, 1, 1)),
        "model.vqmodel.post_quant_conv.bias": TensorSpec((lat,), init="bias"),
    })
    return out


# ----------------------------------------------------------------------------------------------
# SigVQ (image_tokenizer/sigvq_embedding.pt)
# ----------------------------------------------------------------------------------------------


def sigvq_layout(num_codes: int, dim: int) -> Layout:
    return {
        "prior_token_embedding.weight": TensorSpec((num_codes, dim), init="embedding"),
        "prior_projector.net.0.proj.weight": _linear(dim, dim),
        "prior_projector.net.0.proj.bias": TensorSpec((dim,), init="bias"),
        "prior_projector.net.2.weight": _linear(dim, dim),
        "prior_projector.net.2.bias": TensorSpec((dim,), init="bias"),
    }


# ----------------------------------------------------------------------------------------------
# Z-Image decoder (decoder/model.safetensors, decoder-turbo/model.safetensors)
# ----------------------------------------------------------------------------------------------


def _dit_block(prefix: str, cfg: DecoderConfig, modulated: bool) -> Layout:
    d, hd, f = cfg.dim, cfg.head_dim, cfg.ffn_dim
    out: Layout = {
        prefix + "attention.to_q.weight": _linear(d, d),
        prefix + "attention.to_k.weight": _linear(d, d),
        prefix + "attention.to_v.weight": _linear(d, d),
        prefix + "attention.to_out.0.weight": _linear(d, d),
    }
    if cfg.qk_norm:
        out[prefix + "attention.norm_q.weight"] = TensorSpec((hd,), init="norm")
        out[prefix + "attention.norm_k.weight"] = TensorSpec((hd,), init="norm")
    out.update({
        prefix + "feed_forward.w1.weight": _linear(f, d),
        prefix + "feed_forward.w2.weight": _linear(d, f),
        prefix + "feed_forward.w3.weight": _linear(f, d),
        prefix + "attention_norm1.weight": TensorSpec((d,), init="norm"),
        prefix + "attention_norm2.weight": TensorSpec((d,), init="norm"),
        prefix + "ffn_norm1.weight": TensorSpec((d,), init="norm"),
        prefix + "ffn_norm2.weight": TensorSpec((d,), init="norm"),
    })
    if modulated:
        out[prefix + "adaLN_modulation.0.weight"] = TensorSpec((4 * d, cfg.adaln_dim), init="small")
        out[prefix + "adaLN_modulation.0.bias"] = TensorSpec((4 * d,), init="bias")
    return out


def decoder_layout(cfg: DecoderConfig) -> Layout:
    d, key = cfg.dim, f"{cfg.patch_size}-{cfg.f_patch_size}"
    out: Layout = {
        f"all_x_embedder.{key}.weight": _linear(d, cfg.patch_dim),
        f"all_x_embedder.{key}.bias": TensorSpec((d,), init="bias"),
        "t_embedder.mlp.0.weight": _linear(1024, 256),
        "t_embedder.mlp.0.bias": TensorSpec((1024,), init="bias"),
        "t_embedder.mlp.2.weight": _linear(cfg.adaln_dim, 1024),
        "t_embedder.mlp.2.bias": TensorSpec((cfg.adaln_dim,), init="bias"),
        "semantic_embedder.0.weight": TensorSpec((cfg.cap_feat_dim,), init="norm"),
        "semantic_embedder.1.weight": _linear(d, cfg.cap_feat_dim),
        "semantic_embedder.1.bias": TensorSpec((d,), init="bias"),
        "x_pad_token": TensorSpec((1, d), init="embedding"),
        "cap_pad_token": TensorSpec((1, d), init="embedding"),
    }
    for i in range(cfg.n_refiner_layers):
        out.update(_dit_block(f"noise_refiner.{i}.", cfg, modulated=True))
    for i in range(cfg.n_refiner_layers):
        out.update(_dit_block(f"context_refiner.{i}.", cfg, modulated=False))
    for i in range(cfg.n_layers):
        out.update(_dit_block(f"layers.{i}.", cfg, modulated=True))
    out.update({
        f"all_final_layer.{key}.linear.weight": TensorSpec((cfg.patch_dim, d), init="small"),
        f"all_final_layer.{key}.linear.bias": TensorSpec((cfg.patch_dim,), init="bias"),
        f"all_final_layer.{key}.adaLN_modulation.1.weight": TensorSpec((d, cfg.adaln_dim), init="small"),
        f"all_final_layer.{key}.adaLN_modulation.1.bias": TensorSpec((d,), init="bias"),
    })
    return out


def layout_bytes(layout: Layout) -> int:
    return sum(spec.nbytes for spec in layout.values())


def layout_params(layout: Layout) -> int:
    return sum(spec.numel for spec in layout.values())


def vae_layout(config: dict[str, Any]) -> Layout:
    """diffusers' AutoencoderKL keys and shapes for a vae/config.json (built on the meta device)."""
    import torch
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL.from_config(config)
    return {k: TensorSpec(tuple(v.shape)) for k, v in vae.state_dict().items()}
