"""Backbone reference: cached block forward == full forward, routing, GQA, partial RoPE, rounding order."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from llada_edge.config import BLOCK_SIZE
from llada_edge.model import load_backbone
from llada_edge.model.backbone import (
    Attention,
    apply_partial_rope,
    mask_to_bias,
    noaux_tc_route,
    rope_cos_sin,
    rope_inv_freq,
)
from llada_edge.model.common import RMSNorm


@pytest.fixture(scope="module")
def backbone(tiny_ckpt: Path):
    return load_backbone(tiny_ckpt, torch.float32)


def _cfg_rows(length: int, pad: int) -> tuple[torch.Tensor, ...]:
    """Two rows: a conditional row and an unconditional row left-padded by ``pad`` masked tokens
    (pads excluded from attention, positions 0 for pads then 0.. for real tokens; model-spec §2.3)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 157184, (2, length), generator=g)
    ids[1, :pad] = 156895
    pos = torch.arange(length).repeat(2, 1)
    pos[1, :pad] = 0
    pos[1, pad:] = torch.arange(length - pad)
    valid = torch.ones(2, length, dtype=torch.bool)
    valid[1, :pad] = False
    return ids, pos, valid


@pytest.mark.parametrize("moe_impl", ["loop", "dense"])
def test_cached_block_forward_equals_full_block_causal_forward(backbone, moe_impl: str, measure) -> None:
    backbone.set_moe_impl(moe_impl)
    length, pad = 3 * BLOCK_SIZE + 20, 37
    ids, pos, valid = _cfg_rows(length, pad)
    with torch.no_grad():
        full_h, _ = backbone.forward_full(ids, pos, valid)
        full = backbone.logits(full_h)
        worst = 0.0
        for b in range(1, 4):  # blocks 1..3 against the cached prefix of blocks 0..b-1
            s, e = b * BLOCK_SIZE, min((b + 1) * BLOCK_SIZE, length)
            _, kv = backbone.forward_full(ids[:, :s], pos[:, :s], valid[:, :s])
            blk_h, _ = backbone.forward_block(ids[:, s:e], pos[:, s:e], kv, valid[:, :e])
            worst = max(worst, (backbone.logits(blk_h) - full[:, s:e]).abs().max().item())
    backbone.set_moe_impl("loop")
    measure(f"backbone_cached_vs_full_max_abs_logits_{moe_impl}", worst)
    assert worst <= 1e-5


def test_moe_loop_and_dense_lowering_agree(backbone) -> None:
    moe = backbone.model.layers[1].mlp
    x = torch.randn(2, 40, backbone.cfg.hidden_size)
    with torch.no_grad():
        moe.impl = "loop"
        a = moe(x)
        moe.impl = "dense"
        b = moe(x)
    moe.impl = "loop"
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_image_head_is_the_image_rows_of_the_full_head(backbone) -> None:
    h = torch.randn(1, 5, backbone.cfg.hidden_size)
    with torch.no_grad():
        full, img = backbone.logits(h), backbone.image_logits(h)
    assert img.shape[-1] == 16384
    torch.testing.assert_close(img, full[..., backbone.cfg.image_token_offset:])


# ----------------------------------------------------------------------------------------------
# Routing against a straightforward per-token implementation of model-spec §2.3
# ----------------------------------------------------------------------------------------------


def _route_one_token(logits: np.ndarray, bias: np.ndarray, n_group: int, topk_group: int, top_k: int,
                     scaling: float) -> dict[int, float]:
    scores = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    biased = scores + bias
    per_group = len(scores) // n_group
    group_score = []
    for g in range(n_group):
        members = sorted(biased[g * per_group:(g + 1) * per_group], reverse=True)
        group_score.append(members[0] + members[1])
    kept_groups = sorted(range(n_group), key=lambda g: -group_score[g])[:topk_group]
    candidates = [e for g in kept_groups for e in range(g * per_group, (g + 1) * per_group)]
    chosen = sorted(candidates, key=lambda e: -biased[e])[:top_k]
    total = sum(scores[e] for e in chosen)
    return {e: scaling * scores[e] / (total + 1e-20) for e in chosen}


@pytest.mark.parametrize(("experts", "n_group", "topk_group", "top_k"), [(256, 8, 4, 8), (16, 4, 2, 4)])
def test_routing_matches_direct_implementation(experts: int, n_group: int, topk_group: int, top_k: int) -> None:
    g = torch.Generator().manual_seed(experts)
    logits = torch.randn(64, experts, generator=g) * 2
    bias = torch.randn(experts, generator=g) * 0.5  # large enough to change selections
    weights, idx = noaux_tc_route(logits, bias, n_group, topk_group, top_k, 2.5)
    changed_by_bias = 0
    for t in range(logits.shape[0]):
        ref = _route_one_token(logits[t].numpy(), bias.numpy(), n_group, topk_group, top_k, 2.5)
        got = dict(zip(idx[t].tolist(), weights[t].tolist(), strict=True))
        assert set(got) == set(ref)
        for e in ref:
            assert math.isclose(got[e], ref[e], rel_tol=1e-5)
        no_bias = _route_one_token(logits[t].numpy(), np.zeros(experts), n_group, topk_group, top_k, 2.5)
        changed_by_bias += set(no_bias) != set(ref)
    assert changed_by_bias > 0  # the test would notice a dropped bias
    assert torch.allclose(weights.sum(-1), torch.full((64,), 2.5))


# ----------------------------------------------------------------------------------------------
# GQA, partial RoPE, RMSNorm rounding against direct formulas
# ----------------------------------------------------------------------------------------------


def test_gqa_attention_matches_per_head_formula(backbone) -> None:
    attn: Attention = backbone.model.layers[0].attention
    cfg = backbone.cfg
    b, tq, tk, hd = 2, 5, 9, cfg.head_dim
    q = torch.randn(b, cfg.num_attention_heads, tq, hd)
    k, v = torch.randn(b, cfg.num_key_value_heads, tk, hd), torch.randn(b, cfg.num_key_value_heads, tk, hd)
    allowed = torch.rand(b, 1, tq, tk) > 0.3
    allowed[..., 0] = True
    out = attn.attend(q, k, v, mask_to_bias(allowed))
    rep = cfg.num_attention_heads // cfg.num_key_value_heads
    for bi in range(b):
        for h in range(cfg.num_attention_heads):
            kv = h // rep  # query head h reads kv head h // rep
            s = q[bi, h] @ k[bi, kv].T / math.sqrt(hd)
            s = s.masked_fill(~allowed[bi, 0], float("-inf"))
            ref = torch.softmax(s, -1) @ v[bi, kv]
            torch.testing.assert_close(out[bi, :, h * hd:(h + 1) * hd], ref, rtol=1e-5, atol=1e-6)


def test_partial_rope_matches_pairwise_rotation(backbone) -> None:
    cfg = backbone.cfg
    rot, hd, half = cfg.rotary_dim, cfg.head_dim, cfg.rotary_dim // 2
    x = torch.randn(1, 2, 6, hd, dtype=torch.float64)
    pos = torch.tensor([[0, 1, 5, 31, 32, 4000]])
    cos, sin = rope_cos_sin(pos, rope_inv_freq(cfg).double(), torch.float64)
    out = apply_partial_rope(x, cos, sin)
    ref = x.clone()
    for ti, p in enumerate(pos[0].tolist()):
        for d in range(half):  # pairs (d, d + rot/2) rotate by pos * theta^(-2d/rot)
            ang = p * cfg.rope_theta ** (-2 * d / rot)
            a, b = x[..., ti, d], x[..., ti, d + half]
            ref[..., ti, d] = a * math.cos(ang) - b * math.sin(ang)
            ref[..., ti, d + half] = b * math.cos(ang) + a * math.sin(ang)
    # inv_freq is fp32 as upstream: at position 4000 that is ~5e-6 of angle error
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=2e-5)
    assert torch.equal(out[..., rot:], x[..., rot:])  # dims past the rotary part pass through


def test_rmsnorm_rounds_before_the_weight() -> None:
    norm = RMSNorm(8, 1e-6).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, 8))
    x = torch.randn(3, 8).to(torch.bfloat16)
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
    assert torch.equal(norm(x), norm.weight * normed)
