"""Sampler logic on a scripted backend: schedule, acceptance, CFG, pads, vocabularies, EOS, SPRINT."""

from __future__ import annotations

import math

import numpy as np
import pytest

from llada_edge.errors import InputError
from llada_edge.runtime.sampler import (
    BlockDiffusionSampler,
    SamplingConfig,
    SprintConfig,
    adaptive_k,
    guide,
    left_pad,
    score_tokens,
    select_baseline,
    select_sprint,
    step_schedule,
)

MASK, EOS = 156895, 156892


def random_logits(vocab: int, seed: int = 0, scale: float = 1.0):
    def fn(ids, positions, call):
        rng = np.random.default_rng(seed * 100003 + call)
        return (rng.standard_normal((*ids.shape, vocab)) * scale).astype(np.float32)

    return fn


def test_step_schedule() -> None:
    assert step_schedule(32, 8) == [4] * 8
    assert step_schedule(32, 5) == [7, 7, 6, 6, 6]
    assert step_schedule(32, 32) == [1] * 32
    for steps in range(1, 33):
        assert sum(step_schedule(32, steps)) == 32


def test_adaptive_k() -> None:
    assert [adaptive_k(32 - 4 * s, 8 - s) for s in range(8)] == [4] * 8
    assert adaptive_k(25, 4) == 7 and adaptive_k(1, 5) == 1 and adaptive_k(9, 1) == 9


def test_select_baseline_threshold_acceptance() -> None:
    active = np.array([True] * 8 + [False] * 2)
    conf = np.array([0.99, 0.97, 0.96, 0.1, 0.2, 0.98, 0.3, 0.96, 0.999, 0.999])
    # 5 active tokens above 0.95 >= k=4: all five, more than k; inactive ones never
    assert np.flatnonzero(select_baseline(conf, active, 4, 0.95)).tolist() == [0, 1, 2, 5, 7]
    # only 2 above 0.985 < k=4: exactly the top-4 active
    assert np.flatnonzero(select_baseline(conf, active, 4, 0.985)).tolist() == [0, 1, 2, 5]
    # k larger than the active count: all active
    assert select_baseline(conf, active, 20, 0.999).sum() == 8


def test_select_sprint_is_top_k_plus_threshold() -> None:
    active = np.ones(6, dtype=bool)
    conf = np.array([0.1, 0.9, 0.2, 0.95, 0.3, 0.99])
    prob = conf.copy()
    assert np.flatnonzero(select_sprint(conf, prob, active, 1, 0.93)).tolist() == [3, 5]
    assert np.flatnonzero(select_sprint(conf, prob, active, 3, 0.93)).tolist() == [1, 3, 5]


def test_guide_two_and_three_rows() -> None:
    rng = np.random.default_rng(0)
    c, u, n = (rng.standard_normal((4, 9)).astype(np.float32) for _ in range(3))
    np.testing.assert_allclose(guide(np.stack([c, u]), [2.5, -1.5]), u + 2.5 * (c - u), rtol=1e-5, atol=1e-6)
    st, si = 4.0, 1.5
    want = u + st * (c - u) + si * (u - n)
    np.testing.assert_allclose(guide(np.stack([c, u, n]), [st, 1 - st + si, -si]), want, rtol=1e-5, atol=1e-5)
    g = u + 2.0 * (c - u)
    rescaled = 0.7 * g * c.std(-1, keepdims=True) / g.std(-1, keepdims=True) + 0.3 * g
    np.testing.assert_allclose(guide(np.stack([c, u]), [2.0, -1.0], rescale=0.7), rescaled, rtol=1e-5, atol=1e-5)


def test_score_tokens_matches_softmax_formulas() -> None:
    logits = np.random.default_rng(1).standard_normal((5, 50)).astype(np.float32) * 3
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    x0, p, conf = score_tokens(logits, 0.0, None)
    assert (x0 == logits.argmax(-1)).all()
    np.testing.assert_allclose(p, probs.max(-1), rtol=1e-6)
    np.testing.assert_allclose(conf, p)
    _, _, margin = score_tokens(logits, 0.0, None, "top_k_margin")
    top2 = np.sort(probs, -1)[:, -2:]
    np.testing.assert_allclose(margin, top2[:, 1] - top2[:, 0], rtol=1e-5)
    _, _, negent = score_tokens(logits, 0.0, None, "neg_entropy")
    np.testing.assert_allclose(negent, (probs * np.log(probs)).sum(-1), rtol=1e-5)


def test_temperature_sampling_is_seeded_and_follows_the_distribution() -> None:
    logits = np.log(np.array([[0.7, 0.2, 0.1]] * 4000, dtype=np.float32))
    a, pa, _ = score_tokens(logits, 1.0, np.random.default_rng(5))
    b, _, _ = score_tokens(logits, 1.0, np.random.default_rng(5))
    assert (a == b).all()
    freq = np.bincount(a, minlength=3) / len(a)
    np.testing.assert_allclose(freq, [0.7, 0.2, 0.1], atol=0.03)
    np.testing.assert_allclose(pa[a == 0], 0.7, rtol=1e-5)


def test_left_pad_positions_and_validity() -> None:
    rows = left_pad([[5, 6, 7, 8], [9, 10]], MASK)
    assert rows.ids.tolist() == [[5, 6, 7, 8], [MASK, MASK, 9, 10]]
    assert rows.positions.tolist() == [[0, 1, 2, 3], [0, 0, 0, 1]]
    assert rows.valid.tolist() == [[True] * 4, [False, False, True, True]]
    with pytest.raises(InputError, match="empty prompt"):
        left_pad([[1], []], MASK)


def test_loop_follows_schedule_and_never_remasks(scripted) -> None:
    backend = scripted(random_logits(64))
    prompt = list(range(1, 41))  # 40 tokens: block 1 is mixed (8 prompt + 24 masks)
    sampler = BlockDiffusionSampler(backend, "text", SamplingConfig(steps=8, threshold=0.95))
    res = sampler.generate(left_pad([prompt], MASK), 60)
    blocks = [c for c in backend.calls if c[0] == "block"]
    seen: dict[int, int] = {}
    committed_per_step = []
    prev_masked = None
    for _, ids, positions in blocks:
        row = ids[0]
        for p, tok in zip(positions[0], row, strict=True):
            if tok != MASK:
                assert seen.setdefault(int(p), int(tok)) == tok, "a committed token changed"
            elif int(p) in seen:
                pytest.fail(f"position {p} was re-masked")
        masked = int((row == MASK).sum())
        if prev_masked is not None and masked < prev_masked:
            committed_per_step.append(prev_masked - masked)
        prev_masked = masked
    # random logits over 64 ids never pass 0.95: exactly k = 4 per step
    assert set(committed_per_step) == {4}
    assert res.tokens.shape == (60,) and not (res.tokens == MASK).any()
    assert res.step_counts == [6, 8, 8]  # 24 masks in the mixed block -> 6 steps, then full blocks
    # prefill of block 0, 22 steps, commits after blocks 1 and 2 (none after the last)
    assert res.forward_passes == 1 + 22 + 2
    assert [c[0] for c in backend.calls].count("commit") == 2


def test_confident_tokens_are_accepted_beyond_k(scripted) -> None:
    def peaked(ids, positions, call):
        logits = np.zeros((*ids.shape, 16), np.float32)
        logits[..., 3] = 30.0  # p ~ 1 everywhere
        return logits

    backend = scripted(peaked)
    res = BlockDiffusionSampler(backend, "text", SamplingConfig(steps=8)).generate(left_pad([[1] * 32], MASK), 64)
    assert res.step_counts == [1, 1]  # each block fully accepted in one step
    assert (res.tokens == 3).all()


def test_eos_early_stop_and_cut(scripted) -> None:
    vocab = EOS + 1

    def eos_at_five(ids, positions, call):
        logits = np.zeros((*ids.shape, vocab), np.float32)
        logits[..., 7] = 20.0
        logits[..., EOS] = np.where(positions == 32 + 5, 40.0, 0.0)  # generated index 5 is EOS
        return logits

    backend = scripted(eos_at_five)
    res = BlockDiffusionSampler(backend, "text", SamplingConfig(steps=8)).generate(
        left_pad([[1] * 32], MASK), 200, stop_ids=[EOS])
    assert res.tokens.tolist() == [7] * 5 and res.stop_token == EOS
    assert res.blocks == 1 and res.forward_passes == 2  # prefill + one step that fills the block
    assert not [c for c in backend.calls if c[0] == "commit"]


def test_cfg_rows_get_the_guided_tokens(scripted) -> None:
    vocab, scale = 32, 3.0

    def per_row(ids, positions, call):
        rng = np.random.default_rng(call)
        return rng.standard_normal((*ids.shape, vocab)).astype(np.float32)

    backend = scripted(per_row)
    rows = left_pad([[1, 2, 3, 4, 5, 6], [9, 9]], MASK)
    res = BlockDiffusionSampler(backend, "image", SamplingConfig(steps=4)).generate(rows, 10, [scale, 1 - scale])
    offset = backend.config.backbone.image_token_offset
    _, _ids, positions = next(c for c in backend.calls if c[0] == "block")
    last_ids = [c for c in backend.calls if c[0] == "block"][-1][1]
    # committed generated tokens are identical in both rows, written with the image offset
    gen = last_ids[:, 6:16]
    assert (gen[0] == gen[1]).all() and ((gen == MASK) | (gen >= offset)).all()
    assert (res.tokens >= 0).all() and (res.tokens < vocab).all()
    # the uncond row continues its own positions after its 2 real tokens
    assert positions[1, 6] == 2 and positions[0, 6] == 6


def test_first_step_uses_guided_argmax(scripted) -> None:
    vocab, scale = 8, 2.0
    cond = np.array([0.0, 1.0, 0.5, 0, 0, 0, 0, 0], np.float32)
    uncond = np.array([0.0, 1.2, 0.0, 0, 0, 0, 0, 0], np.float32)

    def fixed(ids, positions, call):
        out = np.zeros((*ids.shape, vocab), np.float32)
        out[0], out[1] = cond, uncond
        return out

    backend = scripted(fixed)
    res = BlockDiffusionSampler(backend, "image", SamplingConfig(steps=1)).generate(
        left_pad([[1, 2], [3]], MASK), 4, [scale, 1 - scale])
    # guided = u + 2 (c - u) = [0, 0.8, 1.0, ...]: argmax 2 (cond alone would pick 1)
    assert res.tokens.tolist() == [2, 2, 2, 2]


def test_too_many_positions_is_an_input_error(scripted) -> None:
    backend = scripted(random_logits(8))
    sampler = BlockDiffusionSampler(backend, "text", SamplingConfig())
    with pytest.raises(InputError, match="max_position_embeddings"):
        sampler.generate(left_pad([[1] * 100], MASK), 9000)


def test_sprint_with_keep_ratio_one_equals_baseline(scripted) -> None:
    prompt = list(range(1, 65))  # block-aligned prompt: every denoised block is full
    outs = []
    for sprint in (None, SprintConfig(keep_ratio=1.0, threshold=0.95)):
        backend = scripted(random_logits(48, seed=3))
        outs.append(BlockDiffusionSampler(backend, "image", SamplingConfig(steps=8), sprint).generate(
            left_pad([prompt, prompt[:50]], MASK), 96, [2.0, -1.0]))
        assert not [m for m in backend.masks if m is not None]  # keep ratio 1: nothing pruned
    assert (outs[0].tokens == outs[1].tokens).all()
    assert outs[0].step_counts == outs[1].step_counts == [8, 8, 8]


def test_sprint_prunes_per_modality(scripted) -> None:
    prompt = [5] * 20 + [157184 + i for i in range(44)]  # 20 text tokens then 44 image tokens
    backend = scripted(random_logits(48, seed=4))
    sprint = SprintConfig(image_keep_ratio=0.25, text_keep_ratio=0.5, cache_warmup_steps=2)
    res = BlockDiffusionSampler(backend, "image", SamplingConfig(steps=8), sprint).generate(
        left_pad([prompt], MASK), 64)
    keep = next(m for m in backend.masks if m is not None)[0]
    assert keep[:20].sum() == 10 and keep[20:64].sum() == math.ceil(0.25 * 44)
    # importance decreases along the prefix and prompt confidence is 1: the earliest keys are kept
    assert keep[:10].all() and keep[20:31].all()
    assert 0.0 < res.pruned_fraction < 1.0
    # pruning starts after the warm-up: the cache mask is set once per block, then cleared
    assert backend.masks[-1] is None


def test_sprint_config_validation() -> None:
    with pytest.raises(InputError, match="keep_ratio"):
        SprintConfig(keep_ratio=1.5)
    with pytest.raises(InputError, match="warmup"):
        SprintConfig(cache_warmup_steps=0)
    with pytest.raises(InputError, match="steps per block"):
        SamplingConfig(steps=0)


def test_block_size_reaches_the_backend_and_shapes_every_block(scripted) -> None:
    backend = scripted(random_logits(64))
    starts: list[int] = []
    start = backend.start
    backend.start = lambda rows, capacity, block_size=32: (starts.append(block_size), start(rows, capacity))
    res = BlockDiffusionSampler(backend, "text", SamplingConfig(steps=4, block_size=16)).generate(
        left_pad([list(range(1, 21))], MASK), 28)  # 20 prompt tokens: one prefilled block of 16
    assert starts == [16]
    assert [c[1].shape[1] for c in backend.calls if c[0] in ("prefill", "block", "commit")] == [16] + [16] * (
        len([c for c in backend.calls if c[0] in ("block", "commit")]))
    assert res.tokens.shape == (28,) and res.step_counts == [3, 4]  # 12 masks in the mixed block, then 16


def test_sprint_pruning_needs_a_backend_with_attention_mass(scripted) -> None:
    backend = scripted(random_logits(64))
    backend.provides_key_importance = False
    with pytest.raises(InputError, match="scripted backend does not provide"):
        BlockDiffusionSampler(backend, "text", SamplingConfig(), SprintConfig(keep_ratio=0.5))
    BlockDiffusionSampler(backend, "text", SamplingConfig(), SprintConfig(keep_ratio=1.0))  # nothing to prune
