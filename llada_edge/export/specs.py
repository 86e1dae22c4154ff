"""One spec per exported component (TensorRT demoDiffusion style): I/O names, dtypes, which axes are
dynamic, the sizes used to trace them, and the min/opt/max shapes a TensorRT profile should cover.

Named dims (strings in a shape) are dynamic. Trace sizes are distinct and > 1 so the exporter keeps
them symbolic (torch.export specialises 0/1-sized dims and merges equal ones).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llada_edge.config import ModelConfig

BLOCK = 32


@dataclass(frozen=True)
class TensorSig:
    dtype: str  # numpy dtype name: float32, int64, bool
    shape: tuple[int | str, ...]

    def resolve(self, dims: dict[str, int]) -> tuple[int, ...]:
        return tuple(dims[d] if isinstance(d, str) else d for d in self.shape)

    def to_dict(self) -> dict:
        return {"dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class ComponentSpec:
    name: str
    inputs: dict[str, TensorSig]
    outputs: dict[str, TensorSig]
    trace_dims: dict[str, int]
    # TensorRT optimisation profile per named dim: (min, opt, max), around the runtime's shapes.
    profile: dict[str, tuple[int, int, int]] = field(default_factory=dict)

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {name: {i: d for i, d in enumerate(sig.shape) if isinstance(d, str)}
                for name, sig in self.inputs.items()}

    def io_dict(self) -> dict:
        return {"inputs": {k: v.to_dict() for k, v in self.inputs.items()},
                "outputs": {k: v.to_dict() for k, v in self.outputs.items()},
                "profile": {k: list(v) for k, v in self.profile.items()}}


def _f(*shape: int | str) -> TensorSig:
    return TensorSig("float32", shape)


def _i(*shape: int | str) -> TensorSig:
    return TensorSig("int64", shape)


def backbone_specs(cfg: ModelConfig) -> dict[str, ComponentSpec]:
    b = cfg.backbone
    d, kv, hd = b.hidden_size, b.num_key_value_heads, b.head_dim
    max_pos = b.max_position_embeddings
    rows = {"rows": (1, 2, 3)}  # 1 (plain), 2 (CFG), 3 (editing CFG)
    tokens = {"tokens": (1, BLOCK, max_pos)}  # a 32-token block; prompts prefill in one pass
    specs = {
        "embed": ComponentSpec("embed", {"ids": _i("rows", "tokens")}, {"hidden": _f("rows", "tokens", d)},
                               {"rows": 2, "tokens": 5}, {**rows, **tokens}),
        "head_text": ComponentSpec("head_text", {"hidden": _f("rows", "tokens", d)},
                                   {"logits": _f("rows", "tokens", b.vocab_size)}, {"rows": 2, "tokens": 5},
                                   {**rows, "tokens": (1, BLOCK, BLOCK)}),
        "head_image": ComponentSpec("head_image", {"hidden": _f("rows", "tokens", d)},
                                    {"logits": _f("rows", "tokens", b.num_image_tokens)}, {"rows": 2, "tokens": 5},
                                    {**rows, "tokens": (1, BLOCK, BLOCK)}),
    }
    for kind in ("text", "image"):  # the fused sampling heads: (x0, p) instead of logits
        specs[f"head_{kind}_sample"] = ComponentSpec(
            f"head_{kind}_sample", {"hidden": _f("rows", "tokens", d), "row_weights": _f("rows")},
            {"x0": _i("tokens"), "p": _f("tokens")}, {"rows": 2, "tokens": 5}, {**rows, "tokens": (1, BLOCK, BLOCK)})
    layer_inputs = {"hidden": _f("rows", "tokens", d), "positions": _i("rows", "tokens"),
                    "past_k": _f("rows", kv, "past", hd), "past_v": _f("rows", kv, "past", hd),
                    "attn_mask": TensorSig("bool", ("rows", "tokens", "keys"))}
    layer_outputs = {"hidden_out": _f("rows", "tokens", d), "k_blk": _f("rows", kv, "tokens", hd),
                     "v_blk": _f("rows", kv, "tokens", hd)}
    for i in range(b.num_hidden_layers):
        specs[f"layer_{i}"] = ComponentSpec(
            f"layer_{i}", layer_inputs, layer_outputs, {"rows": 2, "tokens": BLOCK, "past": 48, "keys": 80},
            {**rows, **tokens, "past": (1, 1024, max_pos), "keys": (2, 1024 + BLOCK, 2 * max_pos)})
    return specs


def image_specs(cfg: ModelConfig) -> dict[str, ComponentSpec]:
    c = cfg.decoders["turbo"].cap_feat_dim
    lat = cfg.vae.latent_channels
    half = cfg.decoders["turbo"].head_dim // 2
    factor = cfg.vae.downsample_factor
    specs = {
        "vision_tokenizer": ComponentSpec(
            "vision_tokenizer", {"pixels": _f(1, 3, "height", "width")}, {"ids": _i("patches")},
            {"height": 64, "width": 96}, {"height": (128, 512, 800), "width": (128, 512, 800)}),
        "sigvq": ComponentSpec("sigvq", {"ids": _i("codes")}, {"feats": _f("codes", c)}, {"codes": 24},
                               {"codes": (64, 4096, 4096)}),
        "vae_decoder": ComponentSpec(
            "vae_decoder", {"latent": _f(1, lat, "lh", "lw")}, {"image": _f(1, 3, "height", "width")},
            {"lh": 8, "lw": 12}, {"lh": (16, 128, 128), "lw": (16, 128, 128)}),
    }
    for mode in ("turbo", "normal"):
        specs[f"dit_{mode}"] = ComponentSpec(
            f"dit_{mode}",
            {"latent": _f("rows", lat, 1, "lh", "lw"), "t": _f("rows"), "cap": _f("rows", "cap_len", c),
             "img_cos": _f("img_len", half), "img_sin": _f("img_len", half),
             "cap_cos": _f("cap_pad", half), "cap_sin": _f("cap_pad", half)},
            {"velocity": _f("rows", lat, 1, "lh", "lw")},
            {"rows": 2, "lh": 8, "lw": 12, "cap_len": 40, "img_len": 32, "cap_pad": 64},
            {"rows": (1, 2 if mode == "normal" else 1, 2), "lh": (16, 1024 // factor, 1024 // factor),
             "lw": (16, 1024 // factor, 1024 // factor), "cap_len": (64, 4096, 4096),
             "img_len": (64, 4096, 4096), "cap_pad": (64, 4096, 4096)})
    return specs


def all_specs(cfg: ModelConfig) -> dict[str, ComponentSpec]:
    """Every component in build order: image side first (small), then the backbone."""
    return {**image_specs(cfg), **backbone_specs(cfg)}
