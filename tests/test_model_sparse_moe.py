"""The torch backend's fast path on the CPU: the static sparse MoE lowerings and the FP8 projections.

A CUDA graph can only capture a step whose shapes never depend on the data and that never reads a
device value on the host. Fake tensors (shapes and dtypes, no values) check exactly that on a CPU: an
op such as ``unique`` or ``nonzero`` or a ``.tolist()`` raises under them. With fake *CUDA* tensors
the meta kernels also apply the CUDA kernels' operand checks (dtypes, layouts, scale shapes).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import DynamicOutputShapeException, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from llada_edge.model import load_backbone
from llada_edge.model.backbone import guided_greedy
from llada_edge.model.fp8 import Fp8Linear, quantize_activations, quantize_rows
from llada_edge.model.sparse_moe import group_by_expert, grouped_linear


def test_group_by_expert_on_a_hand_example() -> None:
    idx = torch.tensor([[2, 0], [0, 3], [2, 1]])  # 3 tokens, k = 2, 4 experts
    g = group_by_expert(idx, 4)
    assert g.expert.tolist() == [0, 0, 1, 2, 2, 3]
    assert g.token.tolist() == [0, 1, 2, 0, 2, 1]  # token order kept inside a group
    assert g.order.tolist() == [1, 2, 5, 0, 4, 3]  # token * k + slot
    assert g.offsets.tolist() == [2, 3, 5, 6] and g.offsets.dtype == torch.int32
    assert g.rank.tolist() == [0, 1, 0, 0, 1, 0]


def _block(backbone, rows: int = 2, cached: int = 64, seed: int = 3) -> tuple:
    cfg = backbone.cfg
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (rows, 32), generator=g)
    positions = torch.arange(cached, cached + 32).repeat(rows, 1)
    shape = (rows, cfg.num_key_value_heads, cached, cfg.head_dim)
    past = [(torch.randn(shape, generator=g).to(backbone.dtype), torch.randn(shape, generator=g).to(backbone.dtype))
            for _ in range(cfg.num_hidden_layers)]
    return ids, positions, past, torch.ones(rows, cached + 32, dtype=torch.bool)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lowering", ["grouped", "padded"])
def test_sparse_lowerings_equal_the_upstream_loop(tiny_ckpt: Path, lowering: str, dtype: torch.dtype,
                                                  measure) -> None:
    loop = load_backbone(tiny_ckpt, dtype)
    sparse = load_backbone(tiny_ckpt, dtype)
    sparse.set_moe_impl(lowering)
    inputs = _block(loop)
    with torch.inference_mode():
        (h_loop, kv_loop), (h_sparse, kv_sparse) = (m.forward_block(*inputs) for m in (loop, sparse))
        logits_loop, logits_sparse = loop.logits(h_loop), sparse.logits(h_sparse)
    worst = (h_sparse.float() - h_loop.float()).abs().max().item() / h_loop.float().abs().max().item()
    measure(f"sparse_moe_{lowering}_{str(dtype).removeprefix('torch.')}_max_rel_hidden", worst)
    assert worst <= (1e-5 if dtype == torch.float32 else 1e-2)
    assert torch.equal(logits_sparse.argmax(-1), logits_loop.argmax(-1))
    assert torch.allclose(kv_sparse[-1][0].float(), kv_loop[-1][0].float(), atol=1e-2)


@pytest.mark.parametrize("lowering", ["grouped", "padded", "dense"])
def test_static_lowerings_have_no_data_dependent_shapes(tiny_ckpt: Path, lowering: str) -> None:
    backbone = load_backbone(tiny_ckpt, torch.bfloat16)
    backbone.set_moe_impl(lowering)
    with FakeTensorMode(allow_non_fake_inputs=True):
        h, kv = backbone.forward_block(*_block(backbone))
        assert h.shape == (2, 32, backbone.cfg.hidden_size) and len(kv) == backbone.cfg.num_hidden_layers


class _HostTensors(TorchDispatchMode):
    """Records every op that receives a CPU tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        flat, _ = tree_flatten((args, kwargs or {}))
        if any(isinstance(t, torch.Tensor) and t.device.type == "cpu" for t in flat):
            self.ops.add(str(func))
        return func(*args, **(kwargs or {}))


def test_a_device_step_makes_no_host_tensor(tiny_ckpt: Path) -> None:
    """A block step plus the fused head with everything on the meta device: no op may see a CPU tensor (a CPU
    scalar made inside the step is a host-to-device copy on a GPU, which CUDA-graph capture refuses)."""
    backbone = load_backbone(tiny_ckpt, torch.bfloat16)
    backbone.set_moe_impl("grouped")
    backbone.to("meta")
    for moe in backbone.moe_blocks():
        assert moe.stacked is not None
        moe.stacked.fc1, moe.stacked.fc2 = moe.stacked.fc1.to("meta"), moe.stacked.fc2.to("meta")
    ids, positions, past, key_mask = (t.to("meta") if isinstance(t, torch.Tensor) else t
                                      for t in _block(backbone))
    past = [(k.to("meta"), v.to("meta")) for k, v in past]
    host = _HostTensors()
    with torch.inference_mode(), host:
        h, _ = backbone.forward_block(ids, positions, past, key_mask)
        x0, _p = guided_greedy(backbone.image_logits(h), torch.ones(2, device="meta"))
    assert x0.shape == (32,) and x0.device.type == "meta"
    assert host.ops == set()


def test_the_loop_lowering_is_caught_by_the_same_check(tiny_ckpt: Path) -> None:
    """The control: the upstream loop asks the host which experts were chosen, which the fake run refuses."""
    backbone = load_backbone(tiny_ckpt, torch.bfloat16)
    with pytest.raises(DynamicOutputShapeException), FakeTensorMode(allow_non_fake_inputs=True):
        backbone.forward_block(*_block(backbone))


def test_grouped_gemms_meet_the_cuda_kernels_checks() -> None:
    """Fake CUDA tensors run the CUDA meta kernels of _grouped_mm (bf16) and _scaled_grouped_mm (FP8) on the
    operands the grouped lowering passes them: the layouts, dtypes and scale shapes those kernels accept."""
    with FakeTensorMode():
        fc1 = torch.randn(16, 128, 256, device="cuda", dtype=torch.bfloat16)  # [E, out, in], as stacked
        q, scale = quantize_rows(fc1)
        for tokens in (64, 2):  # 2 tokens x 8 = 16 pairs: as many row scales as experts, the ambiguous case
            groups = group_by_expert(torch.randint(0, 16, (tokens, 8), device="cuda"), 16)
            rows = torch.randn(tokens * 8, 256, device="cuda", dtype=torch.bfloat16)
            assert grouped_linear(rows, fc1, None, groups, "token").shape == (tokens * 8, 128)
            for scaling in ("token", "tensor"):
                out = grouped_linear(rows, q, scale, groups, scaling)
                assert out.shape == (tokens * 8, 128) and out.dtype == torch.bfloat16


def test_fp8_linear_is_the_scaled_product() -> None:
    g = torch.Generator().manual_seed(0)
    linear = nn.Linear(64, 48, bias=False)
    nn.init.normal_(linear.weight, generator=g)
    x = torch.randn(5, 7, 64, generator=g)
    for scaling in ("token", "tensor"):
        fp8 = Fp8Linear(linear, scaling)
        wq, ws = quantize_rows(linear.weight.detach())
        xq, xs = quantize_activations(x.reshape(-1, 64), scaling)
        expected = ((xq.float() @ wq.float().t()) * xs * ws).reshape(5, 7, 48)
        torch.testing.assert_close(fp8(x), expected, rtol=1e-5, atol=1e-5)
        exact = linear(x)
        rel = ((fp8(x) - exact).abs().max() / exact.abs().max()).item()
        assert 0 < rel < 0.08  # e4m3 keeps 3 mantissa bits: a few percent, never zero
    with pytest.raises(ValueError, match="activation scaling"):
        Fp8Linear(linear, "channel")


def test_fp8_conversion_keeps_router_and_head(tiny_ckpt: Path) -> None:
    backbone = load_backbone(tiny_ckpt, torch.bfloat16)
    with pytest.raises(RuntimeError, match="grouped"):
        backbone.to_fp8()
    backbone.set_moe_impl("grouped")
    backbone.to_fp8("token")
    layers = backbone.decoder_layers()
    assert isinstance(layers[0].attention.query_key_value, Fp8Linear)
    assert isinstance(layers[0].mlp.down_proj, Fp8Linear)  # layer 0: the dense MLP
    moe = backbone.moe_blocks()[0]
    assert moe.stacked is not None and moe.stacked.fp8
    assert isinstance(moe.shared_experts.gate_proj, Fp8Linear)
    assert moe.gate.weight.dtype == torch.bfloat16 and isinstance(backbone.lm_head, nn.Linear)
    with pytest.raises(RuntimeError, match="stacked"):
        backbone.set_moe_impl("loop")
