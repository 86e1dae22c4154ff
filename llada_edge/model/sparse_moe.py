"""Sparse routed experts with static shapes: what a CUDA graph can capture (torch only, not exported).

The eager ``loop`` lowering runs only the chosen experts but asks the host which experts were chosen
(``torch.unique(...).tolist()``), so its shapes depend on the data and every step synchronises; the
``dense`` lowering is static but evaluates all E experts for every token. The two lowerings here are
static *and* sparse in their bytes:

* ``grouped``: the block's N x k (token, expert) pairs are sorted by expert on the device, the token rows
  gathered in that order, and both expert GEMMs run as one grouped GEMM each (``torch._grouped_mm``,
  whose group boundaries are a device tensor of offsets): each expert's weights are read once, and only
  for the experts that were chosen. FP8 weights go through ``torch._scaled_grouped_mm`` on CUDA (Hopper
  kernels) and are emulated exactly on the CPU (fp8 operands, fp32 accumulation, scales after).
* ``padded``: the fallback where no grouped GEMM exists. Each expert gets a static slot of N rows
  ([E, N, D]) and two batched GEMMs run over all of them: the same arithmetic as ``dense``, but in two
  kernels instead of 3E, and no host sync.

Every shape depends only on N, k and E. The pairs are un-sorted with an index copy and summed over the k slots
in slot order (no atomics), so results are deterministic. The weights are the stacked layout of
:meth:`~llada_edge.model.backbone.MoE.stack_experts`: fc1 [E, 2F, D] (gate and up rows interleaved),
fc2 [E, D, F]; with FP8 they carry per-row scales fc1_scale [E, 2F] and fc2_scale [E, D].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llada_edge.model.fp8 import E4M3, quantize_activations

SPARSE_LOWERINGS = ("grouped", "padded")


@dataclass
class StackedExperts:
    """All routed experts of one layer, stacked; FP8 when the scales are set."""

    fc1: torch.Tensor  # [E, 2F, D]: rows gate_0, up_0, gate_1, up_1, ...
    fc2: torch.Tensor  # [E, D, F]
    fc1_scale: torch.Tensor | None = None  # [E, 2F] fp32, FP8 only
    fc2_scale: torch.Tensor | None = None  # [E, D] fp32
    activation_scaling: str = "token"  # FP8 only: "token" (one scale per row) or "tensor"

    @property
    def num_experts(self) -> int:
        return self.fc1.shape[0]

    @property
    def fp8(self) -> bool:
        return self.fc1.dtype == E4M3


@dataclass
class ExpertGroups:
    """Where each (token, slot) pair goes once the pairs are grouped by expert (all on the device)."""

    token: torch.Tensor  # [P] source token of the p-th grouped row
    expert: torch.Tensor  # [P] its expert
    order: torch.Tensor  # [P] flat pair index (token * k + slot) of the p-th grouped row
    offsets: torch.Tensor  # [E] int32 cumulative rows per expert (grouped GEMM group ends)
    rank: torch.Tensor  # [P] position of the row within its expert's group


def group_by_expert(idx: torch.Tensor, num_experts: int) -> ExpertGroups:
    """Sort the pairs of ``idx`` [N, k] by expert; a stable sort keeps token order inside a group."""
    n, k = idx.shape
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    expert = flat.index_select(0, order)
    # Rows per expert without bincount (whose output size would need the host): a static [P, E] compare.
    counts = (flat.unsqueeze(1) == torch.arange(num_experts, device=idx.device)).sum(0)
    ends = torch.cumsum(counts, 0)
    rank = torch.arange(n * k, device=idx.device) - (ends - counts).index_select(0, expert)
    return ExpertGroups(token=order // k, expert=expert, order=order, offsets=ends.to(torch.int32), rank=rank)


def swiglu_interleaved(h: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for fc1 outputs whose features alternate gate, up (the stacked layout)."""
    return F.silu(h[..., 0::2]) * h[..., 1::2]


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, groups: ExpertGroups,
                    activation_scaling: str) -> torch.Tensor:
    """x [P, in] (rows grouped by expert) times each row's expert weight [E, out, in]^T -> [P, out]."""
    if scale is None:
        return torch._grouped_mm(x, weight.transpose(1, 2), offs=groups.offsets)
    xq, xs = quantize_activations(x, activation_scaling)
    if x.is_cuda:  # Hopper-class kernels: fp8 operands, rowwise scales applied to the fp32 accumulator
        rows = x.shape[0]
        if rows == weight.shape[0]:
            # One scale per row would then have as many entries as there are groups, which newer torch versions
            # refuse as ambiguous (tensor-wise or row-wise?): one extra zero row, outside every group, lifts it.
            xq = torch.cat([xq, torch.zeros_like(xq.narrow(0, 0, 1))])
            xs = torch.cat([xs, torch.ones_like(xs.narrow(0, 0, 1))])
        out = torch._scaled_grouped_mm(xq, weight.transpose(1, 2), xs.squeeze(1), scale, offs=groups.offsets,
                                       out_dtype=x.dtype)
        return out.narrow(0, 0, rows)
    # The CPU has no FP8 grouped kernel: the same math in fp32 (fp8 values are exact in fp32; the CUDA
    # grouped GEMM takes bf16 only, so this emulation is for the CPU).
    acc = torch._grouped_mm(xq.float(), weight.float().transpose(1, 2), offs=groups.offsets)
    return (acc * xs * scale.index_select(0, groups.expert)).to(x.dtype)


def grouped_experts(flat: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor, experts: StackedExperts
                    ) -> torch.Tensor:
    """Routed-expert output [N, D] in fp32, the sum over k of weight x expert(token)."""
    n, k = idx.shape
    groups = group_by_expert(idx, experts.num_experts)
    rows = flat.index_select(0, groups.token)  # [P, D], grouped by expert
    h = grouped_linear(rows, experts.fc1, experts.fc1_scale, groups, experts.activation_scaling)
    y = grouped_linear(swiglu_interleaved(h), experts.fc2, experts.fc2_scale, groups, experts.activation_scaling)
    return _combine(y, groups, weights, n, k)


def padded_experts(flat: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor, experts: StackedExperts
                   ) -> torch.Tensor:
    """The same result as :func:`grouped_experts` with two batched GEMMs over [E, N] padded slots."""
    if experts.fp8:
        raise RuntimeError("the padded MoE lowering runs bf16/fp32 experts only (FP8 needs the grouped lowering)")
    n, k = idx.shape
    e, d = experts.num_experts, flat.shape[1]
    groups = group_by_expert(idx, e)
    slot = groups.expert * n + groups.rank  # row of each pair in the [E * N] slots
    slots = torch.zeros(e * n, d, dtype=flat.dtype, device=flat.device)
    slots = slots.index_copy(0, slot, flat.index_select(0, groups.token)).view(e, n, d)
    h = torch.bmm(slots, experts.fc1.transpose(1, 2))
    out = torch.bmm(swiglu_interleaved(h), experts.fc2.transpose(1, 2))  # [E, N, D]
    return _combine(out.reshape(e * n, d).index_select(0, slot), groups, weights, n, k)


def _combine(y: torch.Tensor, groups: ExpertGroups, weights: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Grouped rows back to (token, slot) order, weighted, summed over the slots in fp32."""
    per_pair = torch.empty(n * k, y.shape[1], dtype=torch.float32, device=y.device).index_copy(0, groups.order,
                                                                                                y.float())
    return (per_pair.view(n, k, -1) * weights.unsqueeze(-1)).sum(dim=1)


def sparse_experts(lowering: str, flat: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor,
                   experts: StackedExperts) -> torch.Tensor:
    if lowering == "grouped":
        return grouped_experts(flat, weights, idx, experts)
    if lowering == "padded":
        return padded_experts(flat, weights, idx, experts)
    raise ValueError(f"unknown sparse MoE lowering {lowering!r} (expected one of {SPARSE_LOWERINGS})")
