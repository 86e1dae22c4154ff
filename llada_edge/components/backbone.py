"""The backbone's graphs: the embedding, one graph per decoder layer, the heads and the fused sampling heads.

Shapes (B rows, T block tokens, S cached tokens; design.md §5 with the per-query layer mask):

| graph         | inputs                                                          | outputs                    |
|---------------|-----------------------------------------------------------------|----------------------------|
| embed         | ids [B,T] i64                                                   | hidden [B,T,D]             |
| layer_i       | hidden [B,T,D], positions [B,T] i64, past_k/past_v [B,Hkv,S,hd], | hidden_out, k_blk/v_blk    |
|               | attn_mask [B,T,S+T] bool                                        | [B,Hkv,T,hd]               |
| head_text     | hidden [B,T,D]                                                  | logits [B,T,vocab]         |
| head_image    | hidden [B,T,D]                                                  | logits [B,T,16384]         |
| head_*_sample | hidden [B,T,D], row_weights [B]                                 | x0 [T] i64, p [T]          |
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from llada_edge.components.base import Case, Component, float_inputs, settings
from llada_edge.components.specs import ComponentSpec, TensorSig, f32, i64
from llada_edge.config import BLOCK_SIZE, ModelConfig
from llada_edge.layout import backbone_layer_layout

if TYPE_CHECKING:
    from torch import nn

    from llada_edge.checkpoint import CheckpointFolder, TensorReader

ROWS_PROFILE = (1, 2, 3)  # 1 (plain), 2 (CFG), 3 (editing CFG)
HEAD_KINDS = ("text", "image")
EMBEDDING_KEY = "model.word_embeddings.weight"


class _BackboneComponent(Component):
    stacked_calibration = True

    def config_fingerprint(self) -> list[Any]:
        return [settings(self.config.backbone)]

    def _rows_tokens(self, block_only: bool) -> dict[str, tuple[int, int, int]]:
        """Profile of the row and token axes: a block (heads), or up to a whole prompt prefilled at once."""
        top = BLOCK_SIZE if block_only else self.config.backbone.max_position_embeddings
        return {"rows": ROWS_PROFILE, "tokens": (1, BLOCK_SIZE, top)}


class Embed(_BackboneComponent):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config, "embed")

    def _spec(self) -> ComponentSpec:
        d = self.config.backbone.hidden_size
        return ComponentSpec(self.name, {"ids": i64("rows", "tokens")}, {"hidden": f32("rows", "tokens", d)},
                             {"rows": 2, "tokens": 5}, self._rows_tokens(block_only=False))

    def tensors(self, ckpt: CheckpointFolder) -> tuple[TensorReader | None, list[str]]:
        return ckpt.backbone, [EMBEDDING_KEY]

    def build_module(self, ckpt: CheckpointFolder, moe: str = "dense") -> nn.Module:
        import torch
        from torch import nn

        from llada_edge.model.graphs import EmbedGraph

        weight = ckpt.backbone.get(EMBEDDING_KEY, torch.float32)
        return EmbedGraph(nn.Embedding.from_pretrained(weight, freeze=True)).eval()

    def validation_cases(self, rng: np.random.Generator) -> list[Case]:
        b = self.config.backbone
        ids = rng.integers(0, b.vocab_size, (2, BLOCK_SIZE))
        ids[1, :5] = b.mask_token_id
        return [("ids", {"ids": ids}), ("one row", {"ids": rng.integers(0, b.vocab_size, (1, 7))})]


class Layer(_BackboneComponent):
    """One decoder layer: the block attends to the past K/V plus itself, as ``attn_mask`` allows."""

    graph_kinds = ("experts", "dense")  # one Q/DQ mode per graph: the experts' (94% of a MoE layer's bytes)
    extra_kinds = ("router",)

    def __init__(self, config: ModelConfig, index: int) -> None:
        super().__init__(config, f"layer_{index}")
        self.index = index

    @property
    def is_moe(self) -> bool:
        return self.config.backbone.is_moe_layer(self.index)

    def _spec(self) -> ComponentSpec:
        b = self.config.backbone
        d, kv, hd = b.hidden_size, b.num_key_value_heads, b.head_dim
        max_pos = b.max_position_embeddings
        inputs = {"hidden": f32("rows", "tokens", d), "positions": i64("rows", "tokens"),
                  "past_k": f32("rows", kv, "past", hd), "past_v": f32("rows", kv, "past", hd),
                  "attn_mask": TensorSig("bool", ("rows", "tokens", "keys"))}
        outputs = {"hidden_out": f32("rows", "tokens", d), "k_blk": f32("rows", kv, "tokens", hd),
                   "v_blk": f32("rows", kv, "tokens", hd)}
        return ComponentSpec(self.name, inputs, outputs, {"rows": 2, "tokens": BLOCK_SIZE, "past": 48, "keys": 80},
                             {**self._rows_tokens(block_only=False), "past": (1, 1024, max_pos),
                              "keys": (2, 1024 + BLOCK_SIZE, 2 * max_pos)})

    def tensors(self, ckpt: CheckpointFolder) -> tuple[TensorReader | None, list[str]]:
        return ckpt.backbone, list(backbone_layer_layout(self.config.backbone, self.index))

    def moe_lowering(self, moe: str) -> str | None:
        return moe if self.is_moe else None

    def build_module(self, ckpt: CheckpointFolder, moe: str = "dense") -> nn.Module:
        from llada_edge.model import load_backbone_layer
        from llada_edge.model.backbone import MoE
        from llada_edge.model.graphs import LayerGraph

        layer = load_backbone_layer(ckpt, self.index)
        if isinstance(layer.mlp, MoE):  # exactly the MoE layers (layer 0 is dense)
            if moe == "ort":
                layer.mlp.pack_for_ort()
            else:
                layer.mlp.impl = "dense"
        return LayerGraph(layer, self.config.backbone).eval()

    def weight_kind(self, weight: str, feeds_argmax: bool) -> str:
        if "mlp.gate.weight" in weight:
            return "router"
        return "experts" if ".mlp.experts." in weight else "dense"  # per-expert matmuls of the dense lowering

    def validation_cases(self, rng: np.random.Generator) -> list[Case]:
        return [("block, 1 row", self._case(rng, [0], 64, BLOCK_SIZE, False)),
                ("block, CFG rows", self._case(rng, [0, 23], 64, BLOCK_SIZE, False)),
                ("block, edit rows", self._case(rng, [0, 5, 40], 96, BLOCK_SIZE, False)),
                ("prefill, CFG rows", self._case(rng, [0, 17], 1, 2 * BLOCK_SIZE, True))]

    def _case(self, rng: np.random.Generator, pads: list[int], past: int, tokens: int, prefill: bool
              ) -> dict[str, np.ndarray]:
        """Rows left-padded by ``pads`` (pads are invalid keys at position 0), as the runtime builds them."""
        b = self.config.backbone
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
            blk = np.arange(tokens) // BLOCK_SIZE
            mask[:, :, past:] &= (blk[None, :] <= blk[:, None])[None]
        return self.feeds(float_inputs(rng, rows, tokens, b.hidden_size), positions,
                          float_inputs(rng, rows, kv, past, hd), float_inputs(rng, rows, kv, past, hd), mask)


class _HeadBase(_BackboneComponent):
    def __init__(self, config: ModelConfig, kind: str, name: str) -> None:
        super().__init__(config, name)
        self.kind = kind  # "text" (every vocabulary row) or "image" (rows image_token_offset.. only)
        self.graph_kinds = ("image_head",) if kind == "image" else ("lm_head",)  # separate recipe kinds

    @property
    def vocab(self) -> int:
        b = self.config.backbone
        return b.num_image_tokens if self.kind == "image" else b.vocab_size

    def _weight_key(self) -> str:
        return EMBEDDING_KEY if self.config.backbone.tie_word_embeddings else "lm_head.weight"

    def tensors(self, ckpt: CheckpointFolder) -> tuple[TensorReader | None, list[str]]:
        return ckpt.backbone, ["model.norm.weight", self._weight_key()]

    def _norm_and_rows(self, ckpt: CheckpointFolder) -> tuple[nn.Module, Any]:
        import torch
        from torch import nn

        from llada_edge.model.common import RMSNorm

        b = self.config.backbone
        norm = RMSNorm(b.hidden_size, b.rms_norm_eps)
        norm.weight = nn.Parameter(ckpt.backbone.get("model.norm.weight", torch.float32), requires_grad=False)
        weight = ckpt.backbone.get(self._weight_key(), torch.float32)
        start = b.image_token_offset if self.kind == "image" else 0
        return norm, weight[start:].clone()


class Head(_HeadBase):
    """Final RMSNorm + lm_head rows: logits of the whole vocabulary (text) or of the image codes."""

    def __init__(self, config: ModelConfig, kind: str) -> None:
        super().__init__(config, kind, f"head_{kind}")

    def _spec(self) -> ComponentSpec:
        d = self.config.backbone.hidden_size
        return ComponentSpec(self.name, {"hidden": f32("rows", "tokens", d)},
                             {"logits": f32("rows", "tokens", self.vocab)}, {"rows": 2, "tokens": 5},
                             self._rows_tokens(block_only=True))

    def build_module(self, ckpt: CheckpointFolder, moe: str = "dense") -> nn.Module:
        from llada_edge.model.graphs import HeadGraph

        return HeadGraph(*self._norm_and_rows(ckpt)).eval()

    def validation_cases(self, rng: np.random.Generator) -> list[Case]:
        # few tokens: the saved text logits are rows x tokens x 173568 floats
        d = self.config.backbone.hidden_size
        return [(f"{rows} rows", self.feeds(float_inputs(rng, rows, 8, d))) for rows in (1, 3)]


class SampleHead(_HeadBase):
    """The head fused with CFG and greedy scoring: only (x0, p) per block position leave the graph."""

    # p = softmax(sum_r w_r logits_r)[x0] moves by p x (the guided logits' absolute error): its error scales
    # with p itself, and a flat distribution has a small max p. Measured on a trained tiny checkpoint: 1.1e-4 of
    # max p in the 1-row case (max p 0.025; 2.7e-6 absolute) with x0 exactly equal. 1e-3 of max p still fails a
    # wrong graph (x0 must match exactly in every case).
    validation_tolerances = {"p": 1e-3}  # noqa: RUF012

    def __init__(self, config: ModelConfig, kind: str) -> None:
        super().__init__(config, kind, f"head_{kind}_sample")

    def _spec(self) -> ComponentSpec:
        d = self.config.backbone.hidden_size
        return ComponentSpec(self.name, {"hidden": f32("rows", "tokens", d), "row_weights": f32("rows")},
                             {"x0": i64("tokens"), "p": f32("tokens")}, {"rows": 2, "tokens": 5},
                             self._rows_tokens(block_only=True))

    def build_module(self, ckpt: CheckpointFolder, moe: str = "dense") -> nn.Module:
        from llada_edge.model.graphs import SampleHeadGraph

        return SampleHeadGraph(*self._norm_and_rows(ckpt)).eval()

    def validation_cases(self, rng: np.random.Generator) -> list[Case]:
        d = self.config.backbone.hidden_size
        weights = {1: [1.0], 2: [3.0, -2.0], 3: [4.0, -1.5, -1.5]}
        return [(f"{rows} rows", self.feeds(float_inputs(rng, rows, BLOCK_SIZE, d),
                                            np.asarray(weights[rows], np.float32))) for rows in (1, 2, 3)]
