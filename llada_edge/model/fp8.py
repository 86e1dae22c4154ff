"""FP8 (e4m3) weights with per-output-channel scales for the torch backend's GEMMs (torch only).

A weight W [out, in] is stored as q = W / s rounded to e4m3 with one fp32 scale s per output row
(s = max|row| / 448), so W ~ q * s. Activations are quantized on the fly, on the device, either with
one scale per token row ("token") or one for the whole tensor ("tensor"; still passed per row, all
rows equal, because the rowwise kernel wants both operands scaled the same way). The product runs in
``torch._scaled_mm``: fp8 operands, fp32 accumulation, both scales applied to the accumulator, output in
the activation's dtype. On the CPU torch runs the same op (slowly), which is how the tests check it.

Kept out of FP8, as the toolchain's quantization recipes do: the router (fp32 by the model's rule),
the LM head (its argmax decides every token), norms, embeddings.
"""

from __future__ import annotations

import torch
from torch import nn

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
ACTIVATION_SCALINGS = ("token", "tensor")


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [..., out, in] -> (e4m3 [..., out, in], fp32 scale [..., out]) with weight ~ q * scale."""
    w = weight.float()
    scale = w.abs().amax(dim=-1).clamp_min(1e-12) / E4M3_MAX
    return (w / scale.unsqueeze(-1)).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


def quantize_activations(x: torch.Tensor, scaling: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3 [M, K], fp32 scale [M, 1]); computed on the device, no host sync."""
    if scaling not in ACTIVATION_SCALINGS:
        raise ValueError(f"unknown FP8 activation scaling {scaling!r} (expected one of {ACTIVATION_SCALINGS})")
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True) if scaling == "token" else xf.abs().amax().expand(x.shape[0], 1)
    scale = amax.clamp_min(1e-12) / E4M3_MAX
    return (xf / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale.contiguous()


class Fp8Linear(nn.Module):
    """A bias-free ``nn.Linear`` whose weight is e4m3 with per-row scales."""

    weight_fp8: torch.Tensor
    weight_scale: torch.Tensor
    in_features: int
    out_features: int
    activation_scaling: str

    def __init__(self, linear: nn.Linear, activation_scaling: str = "token") -> None:
        super().__init__()
        bias: torch.Tensor | None = linear.bias  # typed Tensor by torch, None when built with bias=False
        if bias is not None:
            raise ValueError("Fp8Linear covers the model's bias-free projections only")
        if activation_scaling not in ACTIVATION_SCALINGS:
            raise ValueError(f"unknown FP8 activation scaling {activation_scaling!r} "
                             f"(expected one of {ACTIVATION_SCALINGS})")
        q, scale = quantize_rows(linear.weight.detach())
        self.register_buffer("weight_fp8", q)
        self.register_buffer("weight_scale", scale.unsqueeze(0))  # [1, out]: the rowwise kernel's layout
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.activation_scaling = activation_scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        xq, xs = quantize_activations(flat, self.activation_scaling)
        # weight_fp8.t() is the column-major [in, out] operand the kernel wants, without a copy
        y = torch._scaled_mm(xq, self.weight_fp8.t(), scale_a=xs, scale_b=self.weight_scale, out_dtype=x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)


def fp8_supported(device: torch.device) -> bool:
    """Whether ``torch._scaled_mm`` has FP8 kernels here: compute capability >= 8.9 on CUDA; the CPU runs it too."""
    if device.type != "cuda":
        return True
    return torch.cuda.get_device_capability(device) >= (8, 9)
