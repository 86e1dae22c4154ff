"""Deterministic synthetic checkpoints in the exact upstream layout (design.md §3).

Real weights cannot be downloaded on our machines, so tests and benchmarks run on folders written
here: the same file names, key names, shapes, dtypes, sharding, index file and special-token ids as
LLaDA2.0-Uni, filled with seeded random values.

Presets:

* ``tiny``: every structural feature (GQA, partial rotate-half RoPE, QK-norm, a dense layer 0, MoE
  layers with expert groups, a shared expert, a non-zero expert bias, ViT + VQ, a DiT with refiners,
  a 4-level VAE) at sizes where the whole test suite runs in minutes on 2 cores. The vocabulary keeps
  its real size (173568) so every special and image id is the real one.
* ``uni``: the real dimensions of model-spec.md; ``layers`` sets the depth of the backbone and caps
  the depth of the ViT and the DiT (all three at full depth would be ~50 GB).

Each tensor is drawn from its own generator seeded by (seed, component, key), so values do not
depend on the order of writing or on the number of layers. The folder is written under a temporary
name and renamed at the end: an interrupted run leaves nothing that looks like a checkpoint.
"""

from __future__ import annotations

import json
import shutil
import sys
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llada_edge import layout
from llada_edge.config import BackboneConfig, DecoderConfig, VisionTokenizerConfig
from llada_edge.errors import InputError

MASK_ID = 156895
EOS_ID = 156892
IMAGE_TOKEN_OFFSET = 157184
NUM_IMAGE_CODES = 16384

# Special tokens at the real ids (model-spec §3). The role markers, <uncondition> and the reserved
# grid tokens have no published ids; we place them in the free special range below the image codes.
SPECIAL_TOKENS: dict[str, int] = {
    "<|endoftext|>": EOS_ID,
    "<|mask|>": MASK_ID,
    "<role>": 156896,
    "</role>": 156897,
    "<uncondition>": 156898,
    "<|image|>": 156901,
    "<|/image|>": 156902,
    "<boi>": 156904,
}
RESERVED_TOKEN_BASE = 156906  # <|reserved_token_N|> for the grid sizes, N = 0..255
NUM_RESERVED_TOKENS = 256

COMPONENTS = ("backbone", "image_tokenizer", "decoder", "decoder-turbo", "vae")


# ----------------------------------------------------------------------------------------------
# Presets
# ----------------------------------------------------------------------------------------------


def _backbone_config(**dims: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "architectures": ["LLaDA2MoeModelLM"],
        "auto_map": {"AutoConfig": "configuration_llada2uni_moe.LLaDA2MoeConfig",
                     "AutoModelForCausalLM": "modeling_llada2uni_moe.LLaDA2MoeModelLM"},
        "model_type": "llada2_moe",
        "vocab_size": IMAGE_TOKEN_OFFSET + NUM_IMAGE_CODES,
        "image_token_offset": IMAGE_TOKEN_OFFSET,
        "hidden_act": "silu",
        "use_qkv_bias": False,
        "use_bias": False,
        "use_qk_norm": True,
        "rms_norm_eps": 1e-6,
        "rope_theta": 600000,
        "partial_rotary_factor": 0.5,
        "rope_parameters": {"rope_type": "default", "rope_theta": 600000, "partial_rotary_factor": 0.5},
        "max_position_embeddings": 8192,
        "tie_word_embeddings": False,
        "pad_token_id": EOS_ID,
        "routed_scaling_factor": 2.5,
        "torch_dtype": "bfloat16",
    }
    cfg.update(dims)
    return cfg


def _vae_config(block_out: list[int], layers_per_block: int, groups: int, sample_size: int) -> dict[str, Any]:
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 16,
        "block_out_channels": block_out,
        "layers_per_block": layers_per_block,
        "norm_num_groups": groups,
        "down_block_types": ["DownEncoderBlock2D"] * len(block_out),
        "up_block_types": ["UpDecoderBlock2D"] * len(block_out),
        "act_fn": "silu",
        "sample_size": sample_size,
        "scaling_factor": 0.3611,
        "shift_factor": 0.1159,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
        "mid_block_add_attention": True,
        "force_upcast": True,
    }


@dataclass(frozen=True)
class Preset:
    name: str
    backbone: dict[str, Any]
    vision: dict[str, Any]
    decoder: dict[str, Any]
    vae: dict[str, Any]
    sigvq_dim: int
    shard_bytes: int
    default_layers: int
    max_vision_layers: int
    max_dit_layers: int
    preprocessor: dict[str, Any] = field(default_factory=lambda: {
        "image_processor_type": "ImagePreprocessor",
        "patch_size": 16,
        "temporal_patch_size": 1,
        "merge_size": 2,
        # The shipped mean/std are unverified (model-spec §5.1); these are the code's CLIP fallback.
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
    })


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        name="tiny",
        backbone=_backbone_config(
            hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, first_k_dense_replace=1, num_experts=16,
            num_experts_per_tok=4, num_shared_experts=1, moe_intermediate_size=32, n_group=4, topk_group=2),
        vision={"vision_config": {"model_type": "glm_image_vision", "hidden_size": 64, "depth": 2,
                                  "num_heads": 4, "intermediate_size": 128, "patch_size": 16,
                                  "image_size": 512, "in_channels": 3, "layer_norm_eps": 1e-6,
                                  "hidden_act": "gelu", "attention_bias": True, "spatial_merge_size": 1},
                "vq_config": {"model_type": "glm_image_vqmodel", "num_embeddings": NUM_IMAGE_CODES,
                              "embed_dim": 32, "latent_channels": 64}},
        decoder={"_class_name": "ZImageTransformer2DModel", "all_patch_size": [2], "all_f_patch_size": [1],
                 "in_channels": 16, "dim": 64, "n_layers": 2, "n_refiner_layers": 1, "n_heads": 2,
                 "n_kv_heads": 2, "norm_eps": 1e-5, "qk_norm": True, "siglip_feat_dim": None,
                 "rope_theta": 256.0, "t_scale": 1000.0, "axes_dims": [8, 12, 12],
                 "axes_lens": [32768, 1024, 1024],
                 # Synthetic-only: the upstream loader forces 4096; "_" keys are ignored upstream.
                 "_cap_feat_dim": 64},
        vae=_vae_config([16, 16, 32, 32], 1, 8, 256),
        sigvq_dim=64,
        shard_bytes=8 * 1024 * 1024,
        default_layers=3,
        max_vision_layers=2,
        max_dit_layers=2,
    ),
    "uni": Preset(
        name="uni",
        backbone=_backbone_config(
            hidden_size=2048, intermediate_size=5120, num_hidden_layers=20, num_attention_heads=16,
            num_key_value_heads=4, head_dim=128, first_k_dense_replace=1, num_experts=256,
            num_experts_per_tok=8, num_shared_experts=1, moe_intermediate_size=512, n_group=8, topk_group=4),
        vision={"vision_config": {"model_type": "glm_image_vision", "hidden_size": 1536, "depth": 40,
                                  "num_heads": 16, "intermediate_size": 6144, "patch_size": 16,
                                  "image_size": 2048, "in_channels": 3, "layer_norm_eps": 1e-6,
                                  "hidden_act": "gelu", "attention_bias": True, "spatial_merge_size": 1},
                "vq_config": {"model_type": "glm_image_vqmodel", "num_embeddings": NUM_IMAGE_CODES,
                              "embed_dim": 2048, "latent_channels": 1536}},
        decoder={"_class_name": "ZImageTransformer2DModel", "all_patch_size": [2], "all_f_patch_size": [1],
                 "in_channels": 16, "dim": 3840, "n_layers": 30, "n_refiner_layers": 2, "n_heads": 30,
                 "n_kv_heads": 30, "norm_eps": 1e-5, "qk_norm": True, "cap_feat_dim": 4096,
                 "siglip_feat_dim": None, "rope_theta": 256.0, "t_scale": 1000.0, "axes_dims": [32, 48, 48],
                 "axes_lens": [32768, 1024, 1024]},
        vae=_vae_config([128, 256, 512, 512], 2, 32, 1024),
        sigvq_dim=4096,
        shard_bytes=1024 * 1024 * 1024,
        default_layers=2,
        max_vision_layers=40,
        max_dit_layers=30,
    ),
}


# ----------------------------------------------------------------------------------------------
# Tensor values
# ----------------------------------------------------------------------------------------------


def _tensor_seed(seed: int, component: str, key: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(f"{component}/{key}".encode())) % (2**63)


def make_tensor(spec: layout.TensorSpec, seed: int, component: str, key: str) -> Any:
    """Seeded values for one tensor, scaled by its kind, stored in its dtype."""
    import torch

    gen = torch.Generator().manual_seed(_tensor_seed(seed, component, key))
    x = torch.randn(spec.shape, generator=gen, dtype=torch.float32)
    if spec.init == "linear":
        fan_in = 1
        for d in spec.shape[1:]:
            fan_in *= d
        x *= fan_in**-0.5
    elif spec.init == "norm":
        x = 1.0 + 0.1 * x
    elif spec.init in ("bias", "small"):
        x *= 0.02
    elif spec.init == "expert_bias":
        x *= 0.1
    dtype = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32,
             "F8_E4M3": torch.float8_e4m3fn}[spec.dtype]
    return x.to(dtype)


def _vae_tensor_layout(config: dict[str, Any]) -> layout.Layout:
    out = {}
    for key, spec in layout.vae_layout(config).items():
        if len(spec.shape) == 1:
            init = "norm" if ("norm" in key and key.endswith("weight")) else "bias"
        else:
            init = "linear"
        out[key] = layout.TensorSpec(spec.shape, "BF16", init)
    return out


# ----------------------------------------------------------------------------------------------
# Writers
# ----------------------------------------------------------------------------------------------

Progress = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def plan_shards(specs: layout.Layout, shard_bytes: int) -> list[list[str]]:
    """Split keys (in order) into shards of at most ``shard_bytes`` (a bigger tensor gets its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for key, spec in specs.items():
        if shards[-1] and size + spec.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += spec.nbytes
    return shards


def write_safetensors(path: Path, specs: layout.Layout, keys: Iterable[str], seed: int, component: str,
                      metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    tensors = {key: make_tensor(specs[key], seed, component, key) for key in keys}
    save_file(tensors, str(path), metadata=metadata or {"format": "pt"})


def write_sharded(folder: Path, specs: layout.Layout, shard_bytes: int, seed: int, component: str,
                  progress: Progress) -> None:
    """``model-0000k-of-0000n.safetensors`` + ``model.safetensors.index.json``, one shard in memory at a time."""
    shards = plan_shards(specs, shard_bytes)
    weight_map = {}
    for i, keys in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(folder / name, specs, keys, seed, component)
        weight_map.update(dict.fromkeys(keys, name))
        progress(f"  {component}: wrote {name} ({len(keys)} tensors)")
    index = {"metadata": {"total_size": layout.layout_bytes(specs)}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _pseudo_words(count: int) -> list[str]:
    """Deterministic filler tokens so every text id decodes to something readable."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    words: list[str] = []
    n = 2
    while len(words) < count:
        total = len(letters) ** n
        for i in range(total):
            w, j = "", i
            for _ in range(n):
                w = letters[j % 26] + w
                j //= 26
            words.append("Ġ" + w)  # "Ġ" is the byte-level form of a leading space
            if len(words) == count:
                break
        n += 1
    return words


def write_text_tokenizer(folder: Path) -> None:
    """A byte-level BPE ``tokenizer.json`` whose special tokens sit at the real ids (model-spec §3).

    Text encodes byte by byte (ids 0..255); every other text id decodes to a pseudo-word, so a
    random model's output is still readable text.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    first_special = min(SPECIAL_TOKENS.values())
    for i, word in enumerate(_pseudo_words(first_special - len(vocab))):
        vocab[word] = len(alphabet) + i
    specials = dict(SPECIAL_TOKENS)
    specials.update({f"<|reserved_token_{n}|>": RESERVED_TOKEN_BASE + n for n in range(NUM_RESERVED_TOKENS)})
    vocab.update(specials)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>", "mask_token": "<|mask|>"}, indent=2) + "\n")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------
# The entry point
# ----------------------------------------------------------------------------------------------


def preset_configs(preset: str, layers: int | None = None) -> dict[str, dict[str, Any]]:
    """The config.json contents a preset writes, with ``layers`` applied."""
    if preset not in PRESETS:
        raise InputError(f"unknown preset {preset!r} (expected one of {sorted(PRESETS)})")
    p = PRESETS[preset]
    n = p.default_layers if layers is None else layers
    if n < 1:
        raise InputError(f"--layers must be >= 1, got {n}")
    backbone = dict(p.backbone, num_hidden_layers=n)
    vision = json.loads(json.dumps(p.vision))
    vision["vision_config"]["depth"] = min(n, p.max_vision_layers)
    decoder = dict(p.decoder, n_layers=min(n, p.max_dit_layers))
    return {"backbone": backbone, "vision": vision, "preprocessor": dict(p.preprocessor), "decoder": decoder,
            "vae": dict(p.vae)}


def synthesize(out: str | Path, preset: str = "tiny", *, layers: int | None = None, seed: int = 0,
               expert_dtype: str = "bf16", components: Iterable[str] = COMPONENTS, force: bool = False,
               progress: Progress = _stderr) -> Path:
    """Write a synthetic checkpoint folder; returns its path.

    ``components`` selects which weights to write (all configs and the tokenizer are always written,
    so a backbone-only folder still parses). ``expert_dtype`` "fp8" stores the routed experts as
    float8_e4m3fn, like the upstream -FP8 checkpoint.
    """
    out = Path(out)
    components = tuple(components)
    unknown = set(components) - set(COMPONENTS)
    if unknown:
        raise InputError(f"unknown components {sorted(unknown)} (expected some of {list(COMPONENTS)})")
    if expert_dtype not in ("bf16", "fp8"):
        raise InputError(f"--experts-dtype must be bf16 or fp8, got {expert_dtype!r}")
    if out.exists() and not force:
        raise InputError(f"{out} already exists (use --force to replace it)")
    if out.exists() and not _replaceable(out):  # --force replaces a checkpoint, never just any folder
        raise InputError(f"{out} is not a checkpoint folder (no config.json with safetensors weights); --force only "
                         "replaces a checkpoint or an empty folder")
    configs = preset_configs(preset, layers)  # validates the preset name
    p = PRESETS[preset]
    tmp = out.with_name(f".{out.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    progress(f"synth: preset {preset}, {configs['backbone']['num_hidden_layers']} backbone layers, "
             f"seed {seed} -> {out}")
    try:
        _write_all(tmp, p, configs, seed, expert_dtype, components, progress)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    progress(f"synth: done, {out}")
    return out


def _replaceable(out: Path) -> bool:
    if out.is_symlink() or not out.is_dir():
        return False
    return not any(out.iterdir()) or ((out / "config.json").is_file() and any(out.glob("*.safetensors*")))


def _write_all(root: Path, p: Preset, configs: dict[str, dict[str, Any]], seed: int, expert_dtype: str,
               components: tuple[str, ...], progress: Progress) -> None:
    import torch

    _write_json(root / "config.json", configs["backbone"])
    write_text_tokenizer(root)
    _write_json(root / "image_tokenizer" / "config.json", configs["vision"])
    _write_json(root / "image_tokenizer" / "preprocessor_config.json", configs["preprocessor"])
    for sub in ("decoder", "decoder-turbo"):
        _write_json(root / sub / "config.json", configs["decoder"])
    vae_cfg = dict(configs["vae"])
    _write_json(root / "vae" / "config.json", vae_cfg)

    if "backbone" in components:
        cfg = BackboneConfig.from_dict(configs["backbone"], root / "config.json")
        specs = layout.backbone_layout(cfg, expert_dtype="F8_E4M3" if expert_dtype == "fp8" else "BF16")
        write_sharded(root, specs, p.shard_bytes, seed, "backbone", progress)
    if "image_tokenizer" in components:
        vcfg = VisionTokenizerConfig.from_dict(configs["vision"], root / "image_tokenizer" / "config.json")
        specs = layout.vision_layout(vcfg)
        write_safetensors(root / "image_tokenizer" / "model.safetensors", specs, specs, seed, "image_tokenizer")
        sig = layout.sigvq_layout(vcfg.num_embeddings, p.sigvq_dim)
        torch.save({k: make_tensor(s, seed, "sigvq", k) for k, s in sig.items()},
                   root / "image_tokenizer" / "sigvq_embedding.pt")
        progress("  image_tokenizer: wrote model.safetensors, sigvq_embedding.pt")
    for sub in ("decoder", "decoder-turbo"):
        if sub in components:
            dcfg = DecoderConfig.from_dict(configs["decoder"], root / sub / "config.json")
            specs = layout.decoder_layout(dcfg)
            write_safetensors(root / sub / "model.safetensors", specs, specs, seed, sub)
            progress(f"  {sub}: wrote model.safetensors ({layout.layout_params(specs):,} params)")
    if "vae" in components:
        specs = _vae_tensor_layout(vae_cfg)
        write_safetensors(root / "vae" / "diffusion_pytorch_model.safetensors", specs, specs, seed, "vae")
        progress("  vae: wrote diffusion_pytorch_model.safetensors")
