"""LLaDA2 MoE backbone (``LLaDA2MoeModelLM``), PyTorch reference (model-spec §2).

Written to export cleanly later: static control flow in every ``forward`` that an exporter traces
(attention, layer, routing, the dense MoE lowering), no complex numbers, masks passed in as tensors.
The eager ``loop`` MoE path (the upstream way: run only the selected experts) is data dependent and
is what the benchmarks call "PyTorch eager"; ``dense`` evaluates every expert and weights them with a
[T, E] matrix that is zero outside the top-k, which is exact and traceable.

Rounding order follows upstream (model-spec §2.3, §9): RMSNorm in fp32, cast back, then times the
weight; softmax in fp32; router in fp32 with the expert bias rounded to the model dtype first; the
routed-expert sum in fp32 cast back to the model dtype; the shared expert and residuals in the model
dtype; lm_head in the model dtype, then cast to fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llada_edge.config import BLOCK_SIZE, BackboneConfig
from llada_edge.model.common import RMSNorm
from llada_edge.model.fp8 import Fp8Linear, quantize_rows
from llada_edge.model.sparse_moe import SPARSE_LOWERINGS, StackedExperts, sparse_experts, swiglu_interleaved

# ----------------------------------------------------------------------------------------------
# Partial rotate-half RoPE
# ----------------------------------------------------------------------------------------------


def rope_inv_freq(cfg: BackboneConfig, device: torch.device | None = None) -> torch.Tensor:
    """Made where it is used: a host-to-device copy inside a step would break CUDA-graph capture."""
    rot = cfg.rotary_dim
    return 1.0 / (cfg.rope_theta ** (torch.arange(0, rot, 2, dtype=torch.int64, device=device).float() / rot))


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """positions [B, T] -> cos, sin [B, 1, T, rotary_dim], computed in fp32, cast to ``dtype``."""
    freqs = positions.float().unsqueeze(-1) * inv_freq  # [B, T, rot/2]
    emb = torch.cat([freqs, freqs], dim=-1).unsqueeze(1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_partial_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``rot`` dims of each head in NeoX rotate-half layout; the rest pass through."""
    rot = cos.shape[-1]
    half = rot // 2
    xr, xp = x[..., :rot], x[..., rot:]
    rotated = torch.cat([-xr[..., half:], xr[..., :half]], dim=-1)
    return torch.cat([xr * cos + rotated * sin, xp], dim=-1)


# ----------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------


def mask_to_bias(allowed: torch.Tensor) -> torch.Tensor:
    """Boolean "may attend" mask -> additive fp32 bias.

    A finite minimum instead of -inf: a query row with no allowed key (a CFG pad row) then gets
    uniform weights instead of NaN, and NaN cannot leak into real rows through 0 * NaN. Both values are made
    on the mask's device: a CPU scalar would be copied to the GPU inside the step, which breaks CUDA-graph capture.
    """
    zero = torch.zeros((), dtype=torch.float32, device=allowed.device)
    return torch.where(allowed, zero, torch.full((), torch.finfo(torch.float32).min, device=allowed.device))


class Attention(nn.Module):
    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        rows = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        self.query_key_value = nn.Linear(cfg.hidden_size, rows, bias=False)
        self.use_qk_norm = cfg.use_qk_norm
        if cfg.use_qk_norm:
            self.query_layernorm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.key_layernorm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.dense = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=False)
        # Eager-only instrumentation: when a list, ``attend`` appends the attention mass per key
        # [B, Tk] (mean over heads and queries) -- SPRINT's importance score. None when tracing.
        self.key_mass_probe: list[torch.Tensor] | None = None

    def project_qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x [B,T,D] -> q [B,H,T,hd], k and v [B,Hkv,T,hd]; QK-norm before the partial RoPE."""
        b, t, _ = x.shape
        qkv = self.query_key_value(x).view(b, t, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        q, k, v = qkv.split([self.num_heads, self.num_kv_heads, self.num_kv_heads], dim=2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if self.use_qk_norm:
            q, k = self.query_layernorm(q), self.key_layernorm(k)
        return apply_partial_rope(q, cos, sin), apply_partial_rope(k, cos, sin), v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """q [B,H,Tq,hd] over k, v [B,Hkv,Tk,hd] with additive bias [B,1,Tq,Tk] -> [B,Tq,H*hd].

        GQA without repeating K/V: query head h reads kv head h // rep, so the rep query heads of one kv head
        are stacked into one [rep*Tq, hd] matrix against that head's K/V. Each score is the same dot product
        as with K/V expanded to every head, but no graph copies the cache 4x and the GEMMs get taller: the real
        int4 MoE layer at T=32 over a 1024-token cache went from 29.0 to 26.2 ms on ONNX Runtime (2 threads,
        ``benchmarks/moe_kernel.py --baseline``), with bit-identical outputs.
        """
        b, h, tq, hd = q.shape
        rep = self.num_heads // self.num_kv_heads
        tk = k.shape[2]
        grouped = q.reshape(b, self.num_kv_heads, rep * tq, hd)
        scores = torch.matmul(grouped, k.transpose(-1, -2)).view(b, self.num_kv_heads, rep, tq, tk)
        scores = scores.float() * (hd**-0.5) + bias.unsqueeze(1)
        probs = torch.softmax(scores, dim=-1)
        if self.key_mass_probe is not None:
            self.key_mass_probe.append(probs.mean(dim=(1, 2, 3)))
        probs = probs.to(v.dtype).view(b, self.num_kv_heads, rep * tq, tk)
        out = torch.matmul(probs, v).view(b, h, tq, hd)
        return out.transpose(1, 2).reshape(b, tq, h * hd)


# ----------------------------------------------------------------------------------------------
# MLPs and MoE
# ----------------------------------------------------------------------------------------------


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)): the dense layer-0 MLP, each routed expert and the shared expert."""

    def __init__(self, hidden: int, inner: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def noaux_tc_route(logits: torch.Tensor, expert_bias: torch.Tensor, n_group: int, topk_group: int,
                   top_k: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """LLaDA2 / DeepSeek-V3 "noaux_tc" routing (model-spec §2.3), all in fp32.

    logits [N, E] -> (weights [N, k] fp32, expert ids [N, k] int64). The bias only *selects*; the
    weights are the unbiased sigmoid scores of the chosen experts, renormalised, times ``scaling``.
    """
    n, e = logits.shape
    scores = torch.sigmoid(logits.float())
    biased = scores + expert_bias.float()
    group_scores = biased.view(n, n_group, e // n_group).topk(2, dim=-1).values.sum(dim=-1)  # [N, G]
    top_groups = group_scores.topk(topk_group, dim=-1).indices
    group_keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter(1, top_groups, True)
    expert_keep = group_keep.unsqueeze(-1).expand(n, n_group, e // n_group).reshape(n, e)
    masked = biased.masked_fill(~expert_keep, float("-inf"))
    idx = masked.topk(top_k, dim=-1).indices
    weights = scores.gather(1, idx)
    weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * scaling, idx


def guided_greedy(logits: torch.Tensor, row_weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CFG as row weights, then greedy scoring: logits [B, T, V] -> (x0 [T], p = softmax(guided)[x0]).

    The math of the fused ``head_*_sample`` graphs (and of the torch backend's fused head).
    """
    guided = (logits.float() * row_weights.float()[:, None, None]).sum(dim=0)
    top = guided.max(dim=-1, keepdim=True).values
    return guided.argmax(dim=-1), 1.0 / torch.exp(guided - top).sum(dim=-1)


class Gate(nn.Module):
    expert_bias: torch.Tensor  # registered as a buffer in __init__

    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size))
        # A buffer upstream too (state-dict key ``mlp.gate.expert_bias``), in the model dtype.
        self.register_buffer("expert_bias", torch.zeros(cfg.num_experts))
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.top_k, self.scaling = cfg.num_experts_per_tok, cfg.routed_scaling_factor

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Router logits, always in fp32 (``router_dtype``)."""
        return F.linear(x.float(), self.weight.float())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return noaux_tc_route(self.logits(x), self.expert_bias, self.n_group, self.topk_group, self.top_k,
                              self.scaling)


def threshold_combine_weights(logits: torch.Tensor, expert_bias: torch.Tensor, n_group: int, topk_group: int,
                              top_k: int, scaling: float) -> torch.Tensor:
    """The routing of :func:`noaux_tc_route` as a dense [N, E] fp32 weight matrix, zero outside the top-k.

    Written for export: the kept groups and experts are found by comparing with the k-th largest
    value instead of scattering TopK indices (no ScatterElements, one less op TensorRT must support).
    Identical to the index form unless two scores tie exactly at the k-th place.
    """
    n, e = logits.shape
    scores = torch.sigmoid(logits.float())
    biased = scores + expert_bias.float()
    group_scores = biased.view(n, n_group, e // n_group).topk(2, dim=-1).values.sum(dim=-1)
    group_kth = group_scores.topk(topk_group, dim=-1).values[:, -1:]
    group_keep = (group_scores >= group_kth).unsqueeze(-1).expand(n, n_group, e // n_group).reshape(n, e)
    masked = torch.where(group_keep, biased, torch.full_like(biased, float("-inf")))
    expert_kth = masked.topk(top_k, dim=-1).values[:, -1:]
    chosen = torch.where(masked >= expert_kth, scores, torch.zeros_like(scores))
    return chosen / (chosen.sum(dim=-1, keepdim=True) + 1e-20) * scaling


class MoE(nn.Module):
    """Routed experts + shared expert, with interchangeable lowerings (``impl``):

    * ``loop``: eager, runs only the selected experts (the upstream way; "PyTorch eager" in benchmarks);
    * ``dense``: every expert on every token, weighted by :func:`threshold_combine_weights`; exact,
      standard ONNX only, one 2-D MatMul per expert matrix (design.md §6);
    * ``ort``: ONNX Runtime's ``com.microsoft.MoE`` (SwiGLU, interleaved fc1 [E, 2F, D]) when exported;
      the routing stays in plain fp32 ONNX and reaches the op as router logits that are log(weight) on
      the chosen experts and -1e9 elsewhere, so the op's softmax + top-k return exactly those weights.
      Call :meth:`pack_for_ort` first (it moves the expert weights into the stacked layout).
    * ``grouped`` / ``padded``: sparse with static shapes, for the torch backend's CUDA graphs
      (:mod:`llada_edge.model.sparse_moe`); they run on the stacked layout too (:meth:`stack_experts`).
    """

    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__()
        self.num_experts = cfg.num_experts
        self.top_k = cfg.num_experts_per_tok
        self.gate = Gate(cfg)
        self.experts = nn.ModuleList(GatedMLP(cfg.hidden_size, cfg.moe_intermediate_size)
                                     for _ in range(cfg.num_experts))
        self.shared_experts = (GatedMLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.num_shared_experts)
                               if cfg.num_shared_experts else None)
        self.impl = "loop"
        self.stacked: StackedExperts | None = None  # set by stack_experts(): the ort and sparse lowerings' layout

    def _expert(self, e: int) -> GatedMLP:
        expert = self.experts[e]
        if not isinstance(expert, GatedMLP):  # an nn.Identity left by stack_experts
            raise RuntimeError("the expert weights are already stacked (stack_experts() ran before)")
        return expert

    def stack_experts(self) -> StackedExperts:
        """Stack the expert weights (fc1 [E, 2F, D] with gate and up rows interleaved, fc2 [E, D, F]: ONNX
        Runtime's MoE layout, also the grouped GEMMs' operand), freeing each expert as it is copied."""
        if self.stacked is not None:
            return self.stacked
        first = self._expert(0)
        f, d = first.gate_proj.weight.shape
        w = first.gate_proj.weight
        fc1 = torch.empty(self.num_experts, 2 * f, d, dtype=w.dtype, device=w.device)
        fc2 = torch.empty(self.num_experts, d, f, dtype=w.dtype, device=w.device)
        for e in range(self.num_experts):
            expert = self._expert(e)
            fc1[e, 0::2] = expert.gate_proj.weight
            fc1[e, 1::2] = expert.up_proj.weight
            fc2[e] = expert.down_proj.weight
            self.experts[e] = nn.Identity()  # release the per-expert copy
        self.stacked = StackedExperts(fc1, fc2)
        return self.stacked

    def pack_for_ort(self) -> None:
        """Stack the expert weights into the ORT MoE layout and use the ``ort`` lowering."""
        self.stack_experts()
        self.impl = "ort"

    def experts_to_fp8(self, activation_scaling: str) -> None:
        """Routed experts as e4m3 with per-row scales (the grouped lowering runs them)."""
        s = self.stack_experts()
        if not s.fp8:
            (s.fc1, s.fc1_scale), (s.fc2, s.fc2_scale) = quantize_rows(s.fc1), quantize_rows(s.fc2)
        s.activation_scaling = activation_scaling

    def routed_loop(self, flat: torch.Tensor) -> torch.Tensor:
        weights, idx = self.gate(flat)
        out = torch.zeros(flat.shape, dtype=torch.float32, device=flat.device)
        for e in torch.unique(idx).tolist():
            rows, slot = (idx == e).nonzero(as_tuple=True)
            out.index_add_(0, rows, weights[rows, slot].unsqueeze(-1) * self.experts[e](flat[rows]).float())
        return out

    def combine(self, flat: torch.Tensor) -> torch.Tensor:
        g = self.gate
        return threshold_combine_weights(g.logits(flat), g.expert_bias, g.n_group, g.topk_group, g.top_k, g.scaling)

    def routed_dense(self, flat: torch.Tensor) -> torch.Tensor:
        combine = self.combine(flat)
        outs = torch.stack([expert(flat).float() for expert in self.experts], dim=-1)  # [N, D, E]
        return torch.matmul(outs, combine.unsqueeze(-1)).squeeze(-1)

    def _stacked(self, lowering: str) -> StackedExperts:
        if self.stacked is None:
            raise RuntimeError(f"call stack_experts() (or pack_for_ort()) before using the {lowering} lowering")
        return self.stacked

    def routed_ort(self, flat: torch.Tensor) -> torch.Tensor:
        stacked = self._stacked("ort")
        scaling = self.gate.scaling
        combine = self.combine(flat) / scaling  # renormalised weights, summing to 1 per token
        if not torch.onnx.is_in_onnx_export():  # eager twin of the op: same weights, same experts
            x = flat.float()
            h = torch.einsum("nd,efd->enf", x, stacked.fc1.float())
            y = torch.einsum("enf,edf->end", swiglu_interleaved(h), stacked.fc2.float())
            return torch.einsum("end,ne->nd", y, combine) * scaling
        router = torch.where(combine > 0, torch.log(combine.clamp_min(1e-30)), torch.full_like(combine, -1e9))
        out = torch.onnx.ops.symbolic(
            "com.microsoft::MoE", (flat.float(), router, stacked.fc1.float(), None, stacked.fc2.float()),
            {"k": self.top_k, "activation_type": "swiglu", "swiglu_fusion": 1, "activation_alpha": 1.0,
             "activation_beta": 0.0, "normalize_routing_weights": 0},
            dtype=torch.float32, shape=flat.shape, version=1)
        return out * scaling

    def routed_sparse(self, flat: torch.Tensor) -> torch.Tensor:
        weights, idx = self.gate(flat)
        return sparse_experts(self.impl, flat, weights, idx, self._stacked(self.impl))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        routed = (self.routed_sparse if self.impl in SPARSE_LOWERINGS else
                  {"loop": self.routed_loop, "dense": self.routed_dense, "ort": self.routed_ort}[self.impl])
        y = routed(flat).to(x.dtype)
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat)
        return y.reshape(shape)


# ----------------------------------------------------------------------------------------------
# Layers and the model
# ----------------------------------------------------------------------------------------------


class DecoderLayer(nn.Module):
    def __init__(self, cfg: BackboneConfig, index: int) -> None:
        super().__init__()
        self.index = index
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attention = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp: nn.Module = (MoE(cfg) if cfg.is_moe_layer(index)
                               else GatedMLP(cfg.hidden_size, cfg.intermediate_size))

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bias: torch.Tensor,
                past_k: torch.Tensor | None = None, past_v: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One layer over T new tokens that attend to ``past`` K/V (S entries) plus themselves.

        bias: additive [B, 1, T, S+T]. Returns the new hidden states and this block's K/V (post norm
        and RoPE: exactly what a KV cache stores).
        """
        q, k, v = self.attention.project_qkv(self.input_layernorm(h), cos, sin)
        k_all = k if past_k is None else torch.cat([past_k, k], dim=2)
        v_all = v if past_v is None else torch.cat([past_v, v], dim=2)
        h = h + self.attention.dense(self.attention.attend(q, k_all, v_all, bias))
        h = h + self.mlp(self.post_attention_layernorm(h))
        return h, k, v


class _Trunk(nn.Module):
    """Holds the ``model.*`` keys (word_embeddings, layers, norm)."""

    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


KVCache = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: k, v [B, Hkv, S, hd]


def block_causal_allowed(length: int, key_valid: torch.Tensor, block_size: int = BLOCK_SIZE) -> torch.Tensor:
    """[B, 1, L, L] bool: i may attend j iff block(j) <= block(i) (by sequence index) and j is valid."""
    blk = torch.arange(length, device=key_valid.device) // block_size
    causal = blk.unsqueeze(0) <= blk.unsqueeze(1)  # [L(query), L(key)]
    return causal.unsqueeze(0).unsqueeze(0) & key_valid.bool()[:, None, None, :]


class LLaDA2Backbone(nn.Module):
    """The masked-diffusion LM. Keys: ``model.word_embeddings``, ``model.layers.{i}``, ``model.norm``,
    ``lm_head`` (model-spec §2.2)."""

    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = _Trunk(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def decoder_layers(self) -> list[DecoderLayer]:
        """The layers, typed (``nn.ModuleList`` items are plain modules to a type checker)."""
        return [layer for layer in self.model.layers if isinstance(layer, DecoderLayer)]

    def moe_blocks(self) -> list[MoE]:
        return [layer.mlp for layer in self.decoder_layers() if isinstance(layer.mlp, MoE)]

    def set_moe_impl(self, impl: str) -> None:
        """"loop" (eager), "dense" (exportable), "grouped" or "padded" (static and sparse, for CUDA graphs; they
        stack the experts, after which loop and dense no longer run); see :class:`MoE` ("ort": pack_for_ort)."""
        allowed = ("loop", "dense", *SPARSE_LOWERINGS)
        if impl not in allowed:
            raise ValueError(f"unknown MoE implementation {impl!r} (expected one of {allowed})")
        for moe in self.moe_blocks():
            if impl in SPARSE_LOWERINGS:
                moe.stack_experts()
            elif moe.stacked is not None:
                raise RuntimeError(f"the experts are stacked: the {impl} lowering needs them per expert")
            moe.impl = impl

    def to_fp8(self, activation_scaling: str = "token") -> None:
        """Every projection of the layers in FP8 (attention, MLPs, shared and routed experts), in place.

        The router, the LM head, norms and embeddings keep the model dtype (see :mod:`llada_edge.model.fp8`);
        the routed experts need the grouped lowering (set it first)."""
        for layer in self.decoder_layers():
            blocks: list[nn.Module] = [layer.attention]
            if isinstance(layer.mlp, MoE):
                if layer.mlp.impl != "grouped":
                    raise RuntimeError("FP8 routed experts run in the grouped MoE lowering: set_moe_impl('grouped') "
                                       "first")
                layer.mlp.experts_to_fp8(activation_scaling)
                if layer.mlp.shared_experts is not None:
                    blocks.append(layer.mlp.shared_experts)
            else:
                blocks.append(layer.mlp)
            for block in blocks:
                for name, child in list(block.named_children()):
                    if isinstance(child, nn.Linear):
                        setattr(block, name, Fp8Linear(child, activation_scaling))

    # -- pieces ------------------------------------------------------------------------------

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.word_embeddings(ids)

    def layers_forward(self, h: torch.Tensor, positions: torch.Tensor, bias: torch.Tensor,
                       past: KVCache | None = None) -> tuple[torch.Tensor, KVCache]:
        # inv_freq is recomputed (a constant under tracing) so meta-device loading needs no buffer fix-up.
        cos, sin = rope_cos_sin(positions, rope_inv_freq(self.cfg, h.device), h.dtype)
        new_kv: KVCache = []
        for i, layer in enumerate(self.model.layers):
            pk, pv = past[i] if past is not None else (None, None)
            h, k, v = layer(h, cos, sin, bias, pk, pv)
            new_kv.append((k, v))
        return h, new_kv

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits (fp32)."""
        return self.lm_head(self.model.norm(h)).float()

    def image_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Logits over the image codes only: rows ``image_token_offset..`` of lm_head (fp32).

        Exactly the upstream "text logits = -inf" restriction, ~10x cheaper.
        """
        w = self.lm_head.weight[self.cfg.image_token_offset:]
        return F.linear(self.model.norm(h), w).float()

    # -- whole-sequence and cached-block forwards -----------------------------------------------

    def forward_full(self, ids: torch.Tensor, positions: torch.Tensor, key_valid: torch.Tensor,
                     block_size: int = BLOCK_SIZE) -> tuple[torch.Tensor, KVCache]:
        """All L tokens with the block-causal mask (no cache). Returns final hidden [B,L,D] and K/V."""
        bias = mask_to_bias(block_causal_allowed(ids.shape[1], key_valid, block_size))
        return self.layers_forward(self.embed(ids), positions, bias)

    def forward_block(self, ids: torch.Tensor, positions: torch.Tensor, past: KVCache | None,
                      key_mask: torch.Tensor) -> tuple[torch.Tensor, KVCache]:
        """T block tokens against a cached prefix: key_mask [B, S+T] marks the valid keys."""
        bias = mask_to_bias(key_mask.bool()[:, None, None, :])
        return self.layers_forward(self.embed(ids), positions, bias, past)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
        h, _ = self.forward_full(ids, positions, key_valid)
        return self.logits(h)
