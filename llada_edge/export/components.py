"""Per component: how to build its graph module from the checkpoint (reading only its own tensors),
what invalidates a previous export of it (its fingerprint), and the inputs it is validated on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from llada_edge.checkpoint import CheckpointFolder, TensorReader
from llada_edge.config import ModelConfig
from llada_edge.errors import InputError
from llada_edge.export.graphs import (
    DiTGraph,
    EmbedGraph,
    HeadGraph,
    LayerGraph,
    SampleHeadGraph,
    SigVQGraph,
    VaeDecoderGraph,
    VisionTokenizerGraph,
)
from llada_edge.export.specs import BLOCK
from llada_edge.layout import backbone_layer_layout
from llada_edge.model import load_backbone_layer, load_dit, load_sigvq, load_vae, load_vision_tokenizer
from llada_edge.model.common import RMSNorm
from llada_edge.positions import dit_rope_tables

MOE_LOWERINGS = ("dense", "ort")
Case = tuple[str, dict[str, np.ndarray]]


def component_names(cfg: ModelConfig) -> list[str]:
    layers = [f"layer_{i}" for i in range(cfg.backbone.num_hidden_layers)]
    return ["vision_tokenizer", "sigvq", "dit_turbo", "dit_normal", "vae_decoder", "embed", *layers,
            "head_text", "head_image", "head_text_sample", "head_image_sample"]


def select_components(cfg: ModelConfig, requested: list[str] | None) -> list[str]:
    """Expand groups (``layers``, ``heads``, ``dit``, ``backbone``, ``image``) and check names."""
    names = component_names(cfg)
    if not requested:
        return names
    groups = {"layers": [n for n in names if n.startswith("layer_")],
              "heads": ["head_text", "head_image", "head_text_sample", "head_image_sample"],
              "dit": ["dit_turbo", "dit_normal"]}
    groups["backbone"] = ["embed", *groups["layers"], *groups["heads"]]
    groups["image"] = ["vision_tokenizer", "sigvq", *groups["dit"], "vae_decoder"]
    chosen: list[str] = []
    for item in requested:
        expansion = groups.get(item, [item])
        for name in expansion:
            if name not in names:
                raise InputError(f"unknown component {name!r} (components: {', '.join(names)}; groups: "
                                 f"{', '.join(groups)})")
            if name not in chosen:
                chosen.append(name)
    return [n for n in names if n in chosen]


# ----------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------


def _read(reader: TensorReader, key: str) -> torch.Tensor:
    return reader.get(key, torch.float32)


def build_module(ckpt: CheckpointFolder, name: str, moe: str = "dense") -> nn.Module:
    """The graph module of one component, in fp32, from only the tensors it needs."""
    cfg = ckpt.config
    b = cfg.backbone
    if name.startswith("layer_"):
        layer = load_backbone_layer(ckpt, int(name.split("_", 1)[1]))
        if b.is_moe_layer(layer.index):
            if moe == "ort":
                layer.mlp.pack_for_ort()
            else:
                layer.mlp.impl = "dense"
        return LayerGraph(layer, b).eval()
    if name == "embed":
        emb = nn.Embedding.from_pretrained(_read(ckpt.backbone, "model.word_embeddings.weight"), freeze=True)
        return EmbedGraph(emb).eval()
    if name.startswith("head_"):
        norm = RMSNorm(b.hidden_size, b.rms_norm_eps)
        norm.weight = nn.Parameter(_read(ckpt.backbone, "model.norm.weight"), requires_grad=False)
        weight = _read(ckpt.backbone, "model.word_embeddings.weight" if b.tie_word_embeddings else "lm_head.weight")
        start = b.image_token_offset if name.startswith("head_image") else 0
        graph = SampleHeadGraph if name.endswith("_sample") else HeadGraph
        return graph(norm, weight[start:].clone()).eval()
    if name == "vision_tokenizer":
        return VisionTokenizerGraph(load_vision_tokenizer(ckpt, torch.float32)).eval()
    if name == "sigvq":
        return SigVQGraph(load_sigvq(ckpt, torch.float32)).eval()
    if name.startswith("dit_"):
        return DiTGraph(load_dit(ckpt, name.split("_", 1)[1], torch.float32)).eval()
    if name == "vae_decoder":
        return VaeDecoderGraph(load_vae(ckpt, torch.float32)).eval()
    raise InputError(f"unknown component {name!r}")


# ----------------------------------------------------------------------------------------------
# Fingerprints: what a component was built from
# ----------------------------------------------------------------------------------------------


def _file_stat(path: Path) -> list:
    st = path.stat()
    return [path.name, st.st_size, st.st_mtime_ns]


def _tensors_fingerprint(reader: TensorReader, keys: list[str]) -> list:
    infos = [reader.info(k) for k in keys if k in reader]
    files = sorted({i.file for i in infos})
    return [[i.key, i.dtype, list(i.shape), i.file.name, i.begin, i.end] for i in infos] + [
        _file_stat(f) for f in files]


def component_tensors(ckpt: CheckpointFolder, name: str) -> tuple[TensorReader | None, list[str]]:
    """The reader and keys a component's graph is built from (None for SigVQ, a torch.save file)."""
    b = ckpt.config.backbone
    if name.startswith("layer_"):
        return ckpt.backbone, list(backbone_layer_layout(b, int(name.split("_", 1)[1])))
    if name == "embed":
        return ckpt.backbone, ["model.word_embeddings.weight"]
    if name.startswith("head_"):
        head = "model.word_embeddings.weight" if b.tie_word_embeddings else "lm_head.weight"
        return ckpt.backbone, ["model.norm.weight", head]
    if name == "vision_tokenizer":
        return ckpt.vision, ckpt.vision.keys()
    if name.startswith("dit_"):
        reader = ckpt.decoder(name.split("_", 1)[1])
        return reader, reader.keys()
    if name == "vae_decoder":
        return ckpt.vae_weights, ckpt.vae_weights.keys()
    if name == "sigvq":
        return None, []
    raise InputError(f"unknown component {name!r}")


def component_bytes(ckpt: CheckpointFolder, name: str) -> int:
    """Stored bytes of a component's weights (decides whether it is exported in its own process)."""
    reader, keys = component_tensors(ckpt, name)
    if reader is None:
        return ckpt.sigvq_path.stat().st_size
    return sum(reader.info(k).nbytes for k in keys if k in reader)


def source_fingerprint(ckpt: CheckpointFolder, name: str) -> list:
    """Everything a component's graph depends on: its config and its tensors (header entries plus the
    size and mtime of the files holding them -- a rewritten shard invalidates the components in it)."""
    cfg = ckpt.config
    reader, keys = component_tensors(ckpt, name)
    config: list = {"vision_tokenizer": [cfg.vision.__dict__, cfg.preprocessor.__dict__], "sigvq": [],
                    "vae_decoder": [cfg.vae.raw]}.get(name, [cfg.backbone.__dict__])
    if name.startswith("dit_"):
        config = [cfg.decoders[name.split("_", 1)[1]].__dict__]
    tensors = [_file_stat(ckpt.sigvq_path)] if reader is None else _tensors_fingerprint(reader, keys)
    return [*config, tensors]


# ----------------------------------------------------------------------------------------------
# Validation inputs (several per component, including the CFG and editing row layouts)
# ----------------------------------------------------------------------------------------------


def _layer_case(cfg: ModelConfig, rng: np.random.Generator, pads: list[int], past: int, tokens: int,
                prefill: bool) -> dict[str, np.ndarray]:
    """Rows left-padded by ``pads`` (pads are invalid keys at position 0), as the runtime builds them."""
    b = cfg.backbone
    rows = len(pads)
    kv, hd = b.num_key_value_heads, b.head_dim
    positions = np.zeros((rows, tokens), np.int64)
    key_valid = np.ones((rows, past + tokens), bool)
    for r, pad in enumerate(pads):
        if prefill:
            key_valid[r, :past] = False  # the one-slot dummy cache of a prefill
            key_valid[r, past:past + pad] = False
            positions[r, pad:] = np.arange(tokens - pad)
        else:
            key_valid[r, :pad] = False
            positions[r] = past - pad + np.arange(tokens)
    mask = np.broadcast_to(key_valid[:, None, :], (rows, tokens, past + tokens)).copy()
    if prefill:  # block-causal inside the prompt
        blk = np.arange(tokens) // BLOCK
        mask[:, :, past:] &= (blk[None, :] <= blk[:, None])[None]
    return {"hidden": rng.standard_normal((rows, tokens, b.hidden_size)).astype(np.float32),
            "positions": positions,
            "past_k": rng.standard_normal((rows, kv, past, hd)).astype(np.float32),
            "past_v": rng.standard_normal((rows, kv, past, hd)).astype(np.float32),
            "attn_mask": mask}


def _dit_case(cfg: ModelConfig, mode: str, rng: np.random.Generator, rows: int, gh: int, gw: int
              ) -> dict[str, np.ndarray]:
    dec = cfg.decoders[mode]
    factor = cfg.vae.downsample_factor
    lh, lw = gh * 32 // factor, gw * 32 // factor
    cap_len = 4 * gh * gw
    tables = dit_rope_tables(lh // dec.patch_size, lw // dec.patch_size, cap_len, dec.axes_dims, dec.rope_theta)
    cap = rng.standard_normal((rows, cap_len, dec.cap_feat_dim)).astype(np.float32)
    if rows == 2:
        cap[1] = 0.0  # the normal sampler's CFG batch: (features, zeros)
    return {"latent": rng.standard_normal((rows, dec.in_channels, 1, lh, lw)).astype(np.float32),
            "t": rng.uniform(0, 1, rows).astype(np.float32), "cap": cap,
            "img_cos": tables[0], "img_sin": tables[1], "cap_cos": tables[2], "cap_sin": tables[3]}


def validation_cases(cfg: ModelConfig, name: str, seed: int = 0) -> list[Case]:
    rng = np.random.default_rng(seed)
    b = cfg.backbone
    if name.startswith("layer_"):
        return [("block, 1 row", _layer_case(cfg, rng, [0], 64, BLOCK, False)),
                ("block, CFG rows", _layer_case(cfg, rng, [0, 23], 64, BLOCK, False)),
                ("block, edit rows", _layer_case(cfg, rng, [0, 5, 40], 96, BLOCK, False)),
                ("prefill, CFG rows", _layer_case(cfg, rng, [0, 17], 1, 2 * BLOCK, True))]
    if name == "embed":
        ids = rng.integers(0, b.vocab_size, (2, BLOCK))
        ids[1, :5] = b.mask_token_id
        return [("ids", {"ids": ids}), ("one row", {"ids": rng.integers(0, b.vocab_size, (1, 7))})]
    if name in ("head_text", "head_image"):  # few tokens: the saved text logits are rows x tokens x 173568
        return [(f"{rows} rows", {"hidden": rng.standard_normal((rows, 8, b.hidden_size)).astype(np.float32)})
                for rows in (1, 3)]
    if name.endswith("_sample"):
        weights = {1: [1.0], 2: [3.0, -2.0], 3: [4.0, -1.5, -1.5]}
        return [(f"{rows} rows", {"hidden": rng.standard_normal((rows, BLOCK, b.hidden_size)).astype(np.float32),
                                  "row_weights": np.asarray(weights[rows], np.float32)}) for rows in (1, 2, 3)]
    if name == "vision_tokenizer":
        pre = cfg.preprocessor
        cases = []
        for h, w in ((128, 192), (256, 128)):
            pixels = (rng.uniform(0, 1, (1, 3, h, w)) - np.asarray(pre.image_mean)[None, :, None, None]) / np.asarray(
                pre.image_std)[None, :, None, None]
            cases.append((f"{h}x{w}", {"pixels": pixels.astype(np.float32)}))
        return cases
    if name == "sigvq":
        return [(f"{n} codes", {"ids": rng.integers(0, cfg.vision.num_embeddings, n)}) for n in (64, 256)]
    if name.startswith("dit_"):
        mode = name.split("_", 1)[1]
        return [("1 row 2x3 grid", _dit_case(cfg, mode, rng, 1, 2, 3)),
                ("CFG rows 4x4 grid", _dit_case(cfg, mode, rng, 2, 4, 4))]
    if name == "vae_decoder":
        lat = cfg.vae.latent_channels
        return [(f"{h}x{w}", {"latent": rng.standard_normal((1, lat, h, w)).astype(np.float32)})
                for h, w in ((8, 12), (16, 16))]
    raise InputError(f"unknown component {name!r}")
