"""Typed configs parsed from a checkpoint folder in the upstream LLaDA2.0-Uni layout.

Files read (model-spec.md §2.1, §5, §6):

* ``config.json``                         -> :class:`BackboneConfig`
* ``image_tokenizer/config.json``         -> :class:`VisionTokenizerConfig` (GLM-Image vision + VQ)
* ``image_tokenizer/preprocessor_config.json`` -> :class:`PreprocessorConfig`
* ``decoder/config.json``, ``decoder-turbo/config.json`` -> :class:`DecoderConfig`
* ``vae/config.json``                     -> :class:`VaeConfig`

Why every structural field is *required*: the upstream LLaDA2 config class has defaults that differ
from the Uni values (``use_bias=True``, ``rms_norm_eps=1e-5``, ``rope_theta=1e4``,
``first_k_dense_replace=0``, ``pad_token_id=126081``; model-spec §9), so a config.json that omits one
silently builds a different model upstream. We refuse instead and name the file and key. Fields that
the Uni config.json is known to omit (mask id, routing keys) get the Uni values explicitly, and the
defaults are listed in :data:`UNI_IMPLIED_DEFAULTS`.

This module needs only the standard library: the runtime imports it without torch.
"""

from __future__ import annotations

import builtins
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llada_edge.errors import ConfigError

# Block diffusion works on blocks of this many tokens (model-spec §2.3): the default of every sampler, the
# block-causal prefill mask and the token axis of the exported graphs' profiles all read it from here.
BLOCK_SIZE = 32

# Bounds on what a config may declare, so a corrupted or hostile file fails at once instead of sizing an
# unbounded model: layer and expert counts, any other integer (dimensions, vocabulary, positions, token ids),
# and the file itself. LLaDA2.0-Uni is 20 layers x 256 experts, vocabulary 173,568, 8,192 positions.
MAX_LAYERS = 1024
MAX_EXPERTS = 65536
MAX_DIMENSION = 1 << 24
MAX_CONFIG_BYTES = 16 << 20

# Values the Uni config.json omits; applied explicitly (model-spec §2.1, §3).
UNI_IMPLIED_DEFAULTS: dict[str, Any] = {
    "mask_token_id": 156895,
    "score_function": "sigmoid",
    "router_dtype": "fp32",
    "tie_word_embeddings": False,
}

# The upstream decoder loader overrides these two fields whatever config.json says (model-spec §6.2).
DECODER_FORCED_AXES_LENS = [32768, 1024, 1024]
DECODER_FORCED_CAP_FEAT_DIM = 4096

# Z-Image constructor defaults for the optional decoder fields (model-spec §6.2).
_DECODER_DEFAULTS: dict[str, Any] = {
    "all_patch_size": [2],
    "all_f_patch_size": [1],
    "n_kv_heads": None,
    "norm_eps": 1e-5,
    "qk_norm": True,
    "siglip_feat_dim": None,
    "rope_theta": 256.0,
    "t_scale": 1000.0,
    "axes_dims": [32, 48, 48],
}
_DECODER_REQUIRED = ("in_channels", "dim", "n_layers", "n_refiner_layers", "n_heads")
_DECODER_KNOWN = set(_DECODER_REQUIRED) | set(_DECODER_DEFAULTS) | {"cap_feat_dim", "axes_lens"}

# OpenAI-CLIP normalisation: the upstream code's fallback when preprocessor_config.json has none (§5.1).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ----------------------------------------------------------------------------------------------
# Field readers: each failure names the file and the key.
# ----------------------------------------------------------------------------------------------


def read_json(path: Path) -> dict[str, Any]:
    """Read a JSON object, failing with the file name when it is missing or malformed."""
    if not path.is_file():
        raise ConfigError("file not found" if not path.exists() else "not a regular file", file=path)
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"larger than {MAX_CONFIG_BYTES >> 20} MiB: not a config file", file=path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"not valid JSON ({exc})", file=path) from None
    except RecursionError:
        raise ConfigError("not valid JSON (nested too deeply)", file=path) from None
    if not isinstance(data, dict):
        raise ConfigError(f"expected a JSON object, got {type(data).__name__}", file=path)
    return data


class _Fields:
    """Typed access to one JSON object; errors carry the file and the (dotted) key."""

    def __init__(self, data: dict[str, Any], file: Path, prefix: str = "") -> None:
        self.data = data
        self.file = file
        self.prefix = prefix

    def _name(self, key: str) -> str:
        return f"{self.prefix}{key}"

    def has(self, key: str) -> bool:
        return key in self.data and self.data[key] is not None

    def raw(self, key: str, default: Any = ..., required: bool = True) -> Any:
        if key not in self.data or self.data[key] is None:
            if default is not ...:
                return default
            if required:
                raise ConfigError("required field is missing", file=self.file, key=self._name(key))
            return None
        return self.data[key]

    def int(self, key: str, default: Any = ..., minimum: int | None = 0, maximum: int = MAX_DIMENSION) -> int:
        value = self.raw(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"expected an integer, got {value!r}", file=self.file, key=self._name(key))
        if minimum is not None and value < minimum:
            raise ConfigError(f"expected an integer >= {minimum}, got {value}", file=self.file,
                              key=self._name(key))
        if value > maximum:
            raise ConfigError(f"expected an integer <= {maximum}, got {value}", file=self.file, key=self._name(key))
        return value

    def float(self, key: str, default: Any = ..., positive: bool = False) -> float:
        value = self.raw(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"expected a number, got {value!r}", file=self.file, key=self._name(key))
        if positive and value <= 0:
            raise ConfigError(f"expected a positive number, got {value}", file=self.file, key=self._name(key))
        return float(value)

    def bool(self, key: str, default: Any = ...) -> bool:
        value = self.raw(key, default)
        if not isinstance(value, bool):
            raise ConfigError(f"expected true/false, got {value!r}", file=self.file, key=self._name(key))
        return value

    def str(self, key: str, default: Any = ..., choices: tuple[str, ...] | None = None) -> str:
        value = self.raw(key, default)
        if not isinstance(value, str):
            raise ConfigError(f"expected a string, got {value!r}", file=self.file, key=self._name(key))
        if choices is not None and value not in choices:
            raise ConfigError(f"expected one of {list(choices)}, got {value!r}", file=self.file,
                              key=self._name(key))
        return value

    # The methods above shadow int/str/float in this class body: annotations below spell out ``builtins``.
    def int_list(self, key: builtins.str, default: Any = ...,
                 length: builtins.int | None = None) -> list[builtins.int]:
        value = self.raw(key, default)
        if isinstance(value, int) and not isinstance(value, bool):
            value = [value]
        if (not isinstance(value, (list, tuple)) or not value
                or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
            raise ConfigError(f"expected a list of positive integers, got {value!r}", file=self.file,
                              key=self._name(key))
        if length is not None and len(value) != length:
            raise ConfigError(f"expected {length} values, got {len(value)}", file=self.file, key=self._name(key))
        return list(value)

    def float_list(self, key: builtins.str, default: Any = ...,
                   length: builtins.int | None = None) -> list[builtins.float]:
        value = self.raw(key, default)
        if (not isinstance(value, (list, tuple))
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
            raise ConfigError(f"expected a list of numbers, got {value!r}", file=self.file, key=self._name(key))
        if length is not None and len(value) != length:
            raise ConfigError(f"expected {length} values, got {len(value)}", file=self.file, key=self._name(key))
        return [float(v) for v in value]

    def sub(self, key: builtins.str) -> _Fields:
        value = self.raw(key)
        if not isinstance(value, dict):
            raise ConfigError("expected a JSON object", file=self.file, key=self._name(key))
        return _Fields(value, self.file, prefix=f"{self._name(key)}.")

    def fail(self, key: builtins.str, message: builtins.str) -> ConfigError:
        return ConfigError(message, file=self.file, key=self._name(key))


# ----------------------------------------------------------------------------------------------
# Backbone
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BackboneConfig:
    """LLaDA2 MoE backbone (root ``config.json``; model-spec §2.1)."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    first_k_dense_replace: int
    num_experts: int
    num_experts_per_tok: int
    num_shared_experts: int
    moe_intermediate_size: int
    n_group: int
    topk_group: int
    routed_scaling_factor: float
    rms_norm_eps: float
    rope_theta: float
    partial_rotary_factor: float
    max_position_embeddings: int
    use_qk_norm: bool
    tie_word_embeddings: bool
    pad_token_id: int
    eos_token_id: int
    mask_token_id: int
    image_token_offset: int
    # None = decide from the checkpoint (an ``expert_bias`` key present or not), see model-spec §2.2.
    moe_router_enable_expert_bias: bool | None = None
    source: str = ""

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def num_image_tokens(self) -> int:
        """Size of the image-token vocabulary appended after the text vocabulary."""
        return self.vocab_size - self.image_token_offset

    @property
    def kv_bytes_per_token(self) -> int:
        """bf16 K+V bytes per token over all layers."""
        return self.num_hidden_layers * 2 * self.num_key_value_heads * self.head_dim * 2

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.first_k_dense_replace

    @classmethod
    def from_dict(cls, data: dict[str, Any], file: Path) -> BackboneConfig:
        f = _Fields(data, file)
        rope = f.data.get("rope_parameters") or {}
        rope_f = _Fields(rope if isinstance(rope, dict) else {}, file, prefix="rope_parameters.")
        # rope_theta / partial_rotary_factor: top-level keys, else the newer rope_parameters block.
        def rope_field(key: str) -> float:
            source = rope_f if not f.has(key) and rope_f.has(key) else f
            return source.float(key, positive=True)

        rope_theta = rope_field("rope_theta")
        partial = rope_field("partial_rotary_factor")

        hidden = f.int("hidden_size", minimum=1)
        heads = f.int("num_attention_heads", minimum=1)
        head_dim = f.int("head_dim", minimum=1) if f.has("head_dim") else hidden // heads
        score = f.str("score_function", UNI_IMPLIED_DEFAULTS["score_function"], choices=("sigmoid",))
        del score  # only sigmoid scoring exists for this model; anything else is rejected above
        f.str("router_dtype", UNI_IMPLIED_DEFAULTS["router_dtype"], choices=("fp32", "float32"))
        f.str("hidden_act", choices=("silu",))
        for flag in ("use_qkv_bias", "use_bias"):
            if f.bool(flag):
                raise f.fail(flag, "biases are not part of LLaDA2.0-Uni (expected false)")
        pad = f.int("pad_token_id")
        cfg = cls(
            vocab_size=f.int("vocab_size", minimum=1),
            hidden_size=hidden,
            num_hidden_layers=f.int("num_hidden_layers", minimum=1, maximum=MAX_LAYERS),
            num_attention_heads=heads,
            num_key_value_heads=f.int("num_key_value_heads", minimum=1),
            head_dim=head_dim,
            intermediate_size=f.int("intermediate_size", minimum=1),
            first_k_dense_replace=f.int("first_k_dense_replace"),
            num_experts=f.int("num_experts", minimum=1, maximum=MAX_EXPERTS),
            num_experts_per_tok=f.int("num_experts_per_tok", minimum=1),
            num_shared_experts=f.int("num_shared_experts"),
            moe_intermediate_size=f.int("moe_intermediate_size", minimum=1),
            n_group=f.int("n_group", minimum=1),
            topk_group=f.int("topk_group", minimum=1),
            routed_scaling_factor=f.float("routed_scaling_factor", positive=True),
            rms_norm_eps=f.float("rms_norm_eps", positive=True),
            rope_theta=rope_theta,
            partial_rotary_factor=partial,
            max_position_embeddings=f.int("max_position_embeddings", minimum=1),
            use_qk_norm=f.bool("use_qk_norm"),
            tie_word_embeddings=f.bool("tie_word_embeddings", UNI_IMPLIED_DEFAULTS["tie_word_embeddings"]),
            pad_token_id=pad,
            eos_token_id=f.int("eos_token_id", pad),
            mask_token_id=f.int("mask_token_id", UNI_IMPLIED_DEFAULTS["mask_token_id"]),
            image_token_offset=f.int("image_token_offset", minimum=1),
            moe_router_enable_expert_bias=(f.bool("moe_router_enable_expert_bias")
                                           if f.has("moe_router_enable_expert_bias") else None),
            source=str(file),
        )
        cfg._check(f)
        return cfg

    def _check(self, f: _Fields) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise f.fail("num_key_value_heads", f"must divide num_attention_heads={self.num_attention_heads}")
        if self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.head_dim:
            raise f.fail("partial_rotary_factor", f"gives rotary dim {self.rotary_dim} for head_dim "
                         f"{self.head_dim} (must be even and within the head)")
        if self.num_experts % self.n_group:
            raise f.fail("n_group", f"must divide num_experts={self.num_experts}")
        per_group = self.num_experts // self.n_group
        if self.topk_group > self.n_group:
            raise f.fail("topk_group", f"must be <= n_group={self.n_group}")
        if per_group < 2:
            raise f.fail("n_group", "group scores sum the top-2 experts of each group: need >= 2 per group")
        if self.num_experts_per_tok > self.topk_group * per_group:
            raise f.fail("num_experts_per_tok", f"cannot exceed topk_group*experts_per_group="
                         f"{self.topk_group * per_group}")
        if self.first_k_dense_replace > self.num_hidden_layers:
            raise f.fail("first_k_dense_replace", f"exceeds num_hidden_layers={self.num_hidden_layers}")
        if not 0 < self.image_token_offset < self.vocab_size:
            raise f.fail("image_token_offset", f"must lie inside the vocabulary (vocab_size={self.vocab_size})")
        for key in ("pad_token_id", "eos_token_id", "mask_token_id"):
            if not 0 <= getattr(self, key) < self.image_token_offset:
                raise f.fail(key, f"must be a text id below image_token_offset={self.image_token_offset}")


# ----------------------------------------------------------------------------------------------
# Image tokenizer (SigLIP-VQ, GLM-Image architecture)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VisionTokenizerConfig:
    """``image_tokenizer/config.json``: ``vision_config`` and ``vq_config`` blocks.

    The field names are those of transformers' ``GlmImageVisionConfig`` / ``GlmImageVQVAEConfig``
    (the tokenizer *is* the GLM-Image tokenizer; model-spec §5). The block layout of the real file is
    not published; we read this GLM-Image-style layout.
    """

    hidden_size: int
    depth: int
    num_heads: int
    intermediate_size: int
    patch_size: int
    image_size: int
    in_channels: int
    layer_norm_eps: float
    spatial_merge_size: int
    num_embeddings: int
    embed_dim: int
    latent_channels: int
    source: str = ""

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def pos_grid(self) -> int:
        """Side of the learned position-embedding grid (128 for image_size 2048, patch 16)."""
        return self.image_size // self.patch_size

    @classmethod
    def from_dict(cls, data: dict[str, Any], file: Path) -> VisionTokenizerConfig:
        f = _Fields(data, file)
        v, q = f.sub("vision_config"), f.sub("vq_config")
        v.str("hidden_act", "gelu", choices=("gelu",))
        if not v.bool("attention_bias", True):
            raise v.fail("attention_bias", "the SigLIP-VQ tokenizer has attention biases (expected true)")
        cfg = cls(
            hidden_size=v.int("hidden_size", minimum=1),
            depth=v.int("depth", minimum=1, maximum=MAX_LAYERS),
            num_heads=v.int("num_heads", minimum=1),
            intermediate_size=v.int("intermediate_size", minimum=1),
            patch_size=v.int("patch_size", minimum=1),
            image_size=v.int("image_size", minimum=1),
            in_channels=v.int("in_channels", 3, minimum=1),
            layer_norm_eps=v.float("layer_norm_eps", positive=True),
            spatial_merge_size=v.int("spatial_merge_size", 1, minimum=1),
            num_embeddings=q.int("num_embeddings", minimum=1),
            embed_dim=q.int("embed_dim", minimum=1),
            latent_channels=q.int("latent_channels", minimum=1),
            source=str(file),
        )
        if cfg.hidden_size % cfg.num_heads:
            raise v.fail("num_heads", f"must divide hidden_size={cfg.hidden_size}")
        if cfg.latent_channels != cfg.hidden_size:
            raise q.fail("latent_channels", f"must equal vision_config.hidden_size={cfg.hidden_size}")
        if cfg.image_size % cfg.patch_size:
            raise v.fail("image_size", f"must be a multiple of patch_size={cfg.patch_size}")
        if cfg.spatial_merge_size != 1:
            raise v.fail("spatial_merge_size", "ViT position ids are raster (expected 1; model-spec §5.1)")
        return cfg


@dataclass(frozen=True)
class PreprocessorConfig:
    """``image_tokenizer/preprocessor_config.json`` (model-spec §5.1)."""

    patch_size: int
    temporal_patch_size: int
    merge_size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    source: str = ""

    @property
    def token_order(self) -> str:
        """``window`` (2x2 windows, what the official code does with merge_size 2) or ``raster``."""
        return "window" if self.merge_size == 2 else "raster"

    @classmethod
    def from_dict(cls, data: dict[str, Any], file: Path) -> PreprocessorConfig:
        f = _Fields(data, file)
        # Required: the upstream code falls back to 14/2/2 when they are absent, which is wrong for
        # this tokenizer (model-spec §9) -- refuse rather than guess.
        cfg = cls(
            patch_size=f.int("patch_size", minimum=1),
            temporal_patch_size=f.int("temporal_patch_size", minimum=1),
            merge_size=f.int("merge_size", minimum=1),
            image_mean=tuple(f.float_list("image_mean", list(CLIP_MEAN), length=3)),  # type: ignore[arg-type]
            image_std=tuple(f.float_list("image_std", list(CLIP_STD), length=3)),  # type: ignore[arg-type]
            source=str(file),
        )
        if cfg.temporal_patch_size != 1:
            raise f.fail("temporal_patch_size", "must be 1 for single images (2 doubles the token count)")
        if cfg.merge_size not in (1, 2):
            raise f.fail("merge_size", "expected 1 (raster order) or 2 (2x2 window order)")
        if any(s <= 0 for s in cfg.image_std):
            raise f.fail("image_std", "must be positive")
        return cfg


# ----------------------------------------------------------------------------------------------
# Image decoder (Z-Image DiT), VAE
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DecoderConfig:
    """``decoder/config.json`` or ``decoder-turbo/config.json`` (Z-Image DiT, model-spec §6.2).

    Like the upstream loader, ``axes_lens`` and ``cap_feat_dim`` are *forced* to 32768/1024/1024 and
    4096. The one exception is the private key ``_cap_feat_dim`` (``_``-prefixed keys are ignored
    upstream), which the synthetic ``tiny`` preset uses to keep its SigVQ width small.
    """

    in_channels: int
    dim: int
    n_layers: int
    n_refiner_layers: int
    n_heads: int
    patch_size: int
    f_patch_size: int
    norm_eps: float
    qk_norm: bool
    rope_theta: float
    t_scale: float
    axes_dims: list[int]
    axes_lens: list[int]
    cap_feat_dim: int
    siglip_feat_dim: int | None = None
    source: str = ""

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_dim(self) -> int:
        return int(self.dim / 3 * 8)

    @property
    def adaln_dim(self) -> int:
        return min(self.dim, 256)

    @property
    def patch_dim(self) -> int:
        return self.f_patch_size * self.patch_size * self.patch_size * self.in_channels

    @classmethod
    def from_dict(cls, data: dict[str, Any], file: Path) -> DecoderConfig:
        f = _Fields(data, file)
        for key in data:
            if not key.startswith("_") and key not in _DECODER_KNOWN:
                raise f.fail(key, "unknown decoder config key (the upstream constructor rejects it)")
        d = _DECODER_DEFAULTS
        patch = f.int_list("all_patch_size", d["all_patch_size"])
        fpatch = f.int_list("all_f_patch_size", d["all_f_patch_size"])
        if len(patch) != 1 or len(fpatch) != 1:
            raise f.fail("all_patch_size", "exactly one patch size is supported (Z-Image basic mode)")
        cap_feat_dim = DECODER_FORCED_CAP_FEAT_DIM
        if f.has("_cap_feat_dim"):
            cap_feat_dim = f.int("_cap_feat_dim", minimum=1)
        siglip = f.raw("siglip_feat_dim", None, required=False)
        if siglip is not None:
            raise f.fail("siglip_feat_dim", "must be null: LLaDA2.0-Uni's decoder has no SigLIP branch")
        cfg = cls(
            in_channels=f.int("in_channels", minimum=1),
            dim=f.int("dim", minimum=1),
            n_layers=f.int("n_layers", minimum=1, maximum=MAX_LAYERS),
            n_refiner_layers=f.int("n_refiner_layers", maximum=MAX_LAYERS),
            n_heads=f.int("n_heads", minimum=1),
            patch_size=patch[0],
            f_patch_size=fpatch[0],
            norm_eps=f.float("norm_eps", d["norm_eps"], positive=True),
            qk_norm=f.bool("qk_norm", d["qk_norm"]),
            rope_theta=f.float("rope_theta", d["rope_theta"], positive=True),
            t_scale=f.float("t_scale", d["t_scale"], positive=True),
            axes_dims=f.int_list("axes_dims", d["axes_dims"], length=3),
            axes_lens=list(DECODER_FORCED_AXES_LENS),
            cap_feat_dim=cap_feat_dim,
            siglip_feat_dim=None,
            source=str(file),
        )
        if cfg.dim % cfg.n_heads:
            raise f.fail("n_heads", f"must divide dim={cfg.dim}")
        if sum(cfg.axes_dims) != cfg.head_dim:
            raise f.fail("axes_dims", f"must sum to head_dim={cfg.head_dim}, got {sum(cfg.axes_dims)}")
        if any(a % 2 for a in cfg.axes_dims):
            raise f.fail("axes_dims", "each RoPE axis needs an even number of dims")
        if cfg.f_patch_size != 1:
            raise f.fail("all_f_patch_size", "only f_patch_size 1 (single images) is supported")
        return cfg


@dataclass(frozen=True)
class VaeConfig:
    """``vae/config.json`` (diffusers AutoencoderKL, FLUX.1 16-channel variant; model-spec §6.4)."""

    latent_channels: int
    block_out_channels: list[int]
    scaling_factor: float
    shift_factor: float
    raw: dict[str, Any] = field(default_factory=dict, repr=False)
    source: str = ""

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_dict(cls, data: dict[str, Any], file: Path) -> VaeConfig:
        f = _Fields(data, file)
        cfg = cls(
            latent_channels=f.int("latent_channels", minimum=1),
            block_out_channels=f.int_list("block_out_channels"),
            scaling_factor=f.float("scaling_factor", positive=True),
            shift_factor=f.float("shift_factor"),
            raw=dict(data),
            source=str(file),
        )
        groups = f.int("norm_num_groups", 32, minimum=1)
        for ch in cfg.block_out_channels:
            if ch % groups:
                raise f.fail("norm_num_groups", f"must divide every block_out_channels entry (got {ch})")
        return cfg


# ----------------------------------------------------------------------------------------------
# The whole folder
# ----------------------------------------------------------------------------------------------

DECODER_DIRS = {"turbo": "decoder-turbo", "normal": "decoder"}


@dataclass(frozen=True)
class ModelConfig:
    """Every config of a checkpoint folder, cross-checked (image vocab = VQ codebook size...)."""

    root: Path
    backbone: BackboneConfig
    vision: VisionTokenizerConfig
    preprocessor: PreprocessorConfig
    decoders: dict[str, DecoderConfig]
    vae: VaeConfig

    @classmethod
    def from_folder(cls, root: str | Path) -> ModelConfig:
        root = Path(root)
        if not root.is_dir():
            raise ConfigError("not a directory (expected a checkpoint folder)", file=root)
        backbone = load_backbone_config(root)
        vision = VisionTokenizerConfig.from_dict(read_json(root / "image_tokenizer" / "config.json"),
                                                 root / "image_tokenizer" / "config.json")
        pre_path = root / "image_tokenizer" / "preprocessor_config.json"
        preprocessor = PreprocessorConfig.from_dict(read_json(pre_path), pre_path)
        decoders = {}
        for mode, sub in DECODER_DIRS.items():
            path = root / sub / "config.json"
            decoders[mode] = DecoderConfig.from_dict(read_json(path), path)
        vae_path = root / "vae" / "config.json"
        vae = VaeConfig.from_dict(read_json(vae_path), vae_path)
        cfg = cls(root, backbone, vision, preprocessor, decoders, vae)
        cfg._cross_check()
        return cfg

    def _cross_check(self) -> None:
        if self.backbone.num_image_tokens != self.vision.num_embeddings:
            raise ConfigError(
                f"vocab_size - image_token_offset = {self.backbone.num_image_tokens} image ids, but the "
                f"VQ codebook has {self.vision.num_embeddings} entries", file=self.backbone.source,
                key="image_token_offset")
        if self.preprocessor.patch_size != self.vision.patch_size:
            raise ConfigError(f"differs from the ViT patch_size={self.vision.patch_size}",
                              file=self.preprocessor.source, key="patch_size")
        for dec in self.decoders.values():
            if dec.in_channels != self.vae.latent_channels:
                raise ConfigError(f"in_channels={dec.in_channels} differs from the VAE latent_channels="
                                  f"{self.vae.latent_channels}", file=dec.source, key="in_channels")


def load_backbone_config(root: str | Path) -> BackboneConfig:
    path = Path(root) / "config.json"
    return BackboneConfig.from_dict(read_json(path), path)
