"""Block-diffusion sampling over a :class:`~llada_edge.runtime.backend.Backend` (model-spec §4), numpy only.

The sequence is the prompt followed by mask tokens, cut into 32-token blocks aligned to absolute
positions; the prompt's last partial block is the first one denoised. The complete prompt blocks are
prefilled into the KV cache once; each block is then denoised in up to ``steps`` forward passes of
that block against the cache, and its final tokens are committed (one more pass writes their K/V).

Per step (baseline, the LLaDA2 ``generate`` loop):

* logits of the block -> (guided by CFG when there are several rows) -> x0 = argmax (temperature 0)
  or a seeded sample, p = its probability;
* k = the fixed schedule ``[B//steps + (s < B%steps)]``; if at least k masked positions have
  p > threshold, all of them are committed, else exactly the top-k; committed tokens never change;
* text: stop once an EOS is committed with everything before it unmasked, or after a block that
  contains one.

CFG: rows are the conditional prompt and its companions (unconditional, no-image), left-padded with
mask tokens to one length; pads are invalid keys and take position 0, real tokens of each row count
from 0, and every committed token is written into all rows. The guided logits are a weighted sum of
the rows (``row_weights``): t2i ``u + s(c - u)``, editing ``u + s_t(c - u) + s_i(u - n)``.

SPRINT (model-spec §4.5, internals inferred): adaptive k = ceil(remaining / steps_left), acceptance
of top-k plus every token above the threshold, a choice of confidence measures, and after the
warm-up steps of each block, pruning of the cached prefix to the most important tokens per modality
(importance = alpha * attention mass + (1 - alpha) * the token's own confidence).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from llada_edge.config import BLOCK_SIZE
from llada_edge.errors import InputError
from llada_edge.runtime.backend import Backend

STRATEGIES = ("low_confidence", "top_k_margin", "neg_entropy")
MAX_BLOCK_SIZE = 1024
T = TypeVar("T")


def check_integer(name: str, value: int, low: int, high: int | None = None) -> None:
    """An integer (not a bool, not a float) within [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f"{low}..{high}" if high is not None else f">= {low}"
        raise InputError(f"{name} must be an integer in {bound}, got {value!r}")


def check_range(name: str, value: float, low: float, high: float | None) -> None:
    """A finite number within [low, high] (NaN and infinities fail every comparison, so they are named)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"{name} must be a finite number, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f"[{low:g}, {high:g}]" if high is not None else f">= {low:g}"
        raise InputError(f"{name} must be {'in ' if high is not None else ''}{bound}, got {value:g}")


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SamplingConfig:
    """How the unmasking loop runs; the request options of :mod:`llada_edge.runtime.requests` extend it."""

    steps: int = 8  # denoising steps per block
    threshold: float = 0.95
    temperature: float = 0.0  # 0 = argmax with p = softmax(logits)[argmax]
    seed: int = 0
    block_size: int = BLOCK_SIZE
    cfg_rescale: float | None = None  # SGO's 0.7 "CFG rescale"; unverified upstream, so off by default
    fused_head: bool = True  # use the backend's head_*_sample graph (CFG + argmax + p inside) when it can

    def __post_init__(self) -> None:
        check_integer("block size", self.block_size, 1, MAX_BLOCK_SIZE)
        check_integer("steps per block", self.steps, 1, self.block_size)
        check_range("threshold", self.threshold, 0.0, 1.0)
        check_range("temperature", self.temperature, 0.0, None)
        if self.cfg_rescale is not None:
            check_range("cfg_rescale", self.cfg_rescale, 0.0, 1.0)
        check_integer("seed", self.seed, 0, 2**63 - 1)


@dataclass(frozen=True)
class SprintConfig:
    keep_ratio: float = 0.7
    image_keep_ratio: float | None = None  # None: keep_ratio
    text_keep_ratio: float | None = None
    cache_warmup_steps: int = 2
    confidence_alpha: float = 0.5
    threshold: float = 0.93
    strategy: str = "low_confidence"

    def __post_init__(self) -> None:
        for name in ("keep_ratio", "image_keep_ratio", "text_keep_ratio", "confidence_alpha", "threshold"):
            value = getattr(self, name)
            if value is not None:
                check_range(f"SPRINT {name}", value, 0.0, 1.0)
        if self.cache_warmup_steps < 1:
            raise InputError("SPRINT cache_warmup_steps must be >= 1 (pruning scores come from a warm-up pass)")
        if self.strategy not in STRATEGIES:
            raise InputError(f"unknown SPRINT strategy {self.strategy!r} (expected one of {list(STRATEGIES)})")

    def ratio(self, image: bool) -> float:
        specific = self.image_keep_ratio if image else self.text_keep_ratio
        return self.keep_ratio if specific is None else specific

    @property
    def prunes(self) -> bool:
        return self.ratio(True) < 1.0 or self.ratio(False) < 1.0


# ----------------------------------------------------------------------------------------------
# Pure functions (unit tested directly)
# ----------------------------------------------------------------------------------------------


def step_schedule(block_size: int, steps: int) -> list[int]:
    """Tokens committed per step: ``[B//steps + (s < B%steps)]`` (32/8 -> [4]*8; 32/5 -> [7,7,6,6,6])."""
    return [block_size // steps + (s < block_size % steps) for s in range(steps)]


def adaptive_k(remaining: int, steps_left: int) -> int:
    """SPRINT's per-step budget: ceil(remaining / steps_left)."""
    return math.ceil(remaining / max(steps_left, 1))


def select_baseline(conf: np.ndarray, active: np.ndarray, k: int, threshold: float) -> np.ndarray:
    """If >= k active tokens have conf > threshold take all of them, else exactly the top-k active."""
    k = min(k, int(active.sum()))
    above = active & (conf > threshold)
    if above.sum() >= k:
        return above
    return _top_k_mask(conf, active, k)


def select_sprint(conf: np.ndarray, prob: np.ndarray, active: np.ndarray, k: int, threshold: float) -> np.ndarray:
    """SPRINT batch acceptance: the top-k by confidence plus every active token with p > threshold."""
    return _top_k_mask(conf, active, min(k, int(active.sum()))) | (active & (prob > threshold))


def _top_k_mask(conf: np.ndarray, active: np.ndarray, k: int) -> np.ndarray:
    sel = np.zeros(conf.shape, dtype=bool)
    if k <= 0:
        return sel
    masked = np.where(active, conf, -np.inf)
    order = np.argsort(-masked, kind="stable")[:k]  # ties: the earlier position first
    sel[order] = True
    return sel & active


def guide(logits: np.ndarray, row_weights: Sequence[float], rescale: float | None = None) -> np.ndarray:
    """CFG as a weighted sum of rows: logits [R, T, V] -> [T, V] (row 0 is the conditional one).

    ``rescale`` phi: ``phi * g * std(c) / std(g) + (1 - phi) * g``, std over the vocabulary.
    """
    if len(row_weights) != logits.shape[0]:
        raise ValueError(f"{len(row_weights)} row weights for {logits.shape[0]} rows")
    if len(row_weights) == 1 and row_weights[0] == 1.0:
        return logits[0]
    g = np.tensordot(np.asarray(row_weights, dtype=np.float32), logits, axes=1)
    if rescale:
        ratio = logits[0].std(axis=-1, keepdims=True) / np.maximum(g.std(axis=-1, keepdims=True), 1e-12)
        g = rescale * g * ratio + (1.0 - rescale) * g
    return g


def score_tokens(logits: np.ndarray, temperature: float, rng: np.random.Generator | None,
                 strategy: str = "low_confidence") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """logits [T, V] -> (x0 [T], p [T], confidence [T]).

    p is the probability of x0 (after temperature); confidence follows ``strategy``: p, the margin
    p1 - p2, or the negative entropy. One float32 exp pass over the logits (this runs every step over
    up to 173568 entries per position, so it avoids float64 copies); p itself is float64.
    """
    z = logits.astype(np.float32, copy=False)
    if temperature > 0:
        z = z / np.float32(temperature)
    top = z.max(axis=-1, keepdims=True)
    e = np.exp(z - top)
    total = e.sum(axis=-1, dtype=np.float64)
    if temperature > 0:
        assert rng is not None
        cdf = np.cumsum(e, axis=-1, dtype=np.float64)
        draws = rng.random(z.shape[0]) * total
        x0 = np.minimum((cdf < draws[:, None]).sum(axis=-1), z.shape[-1] - 1)
    else:
        x0 = z.argmax(axis=-1)
    p = np.take_along_axis(e, x0[:, None], axis=-1)[:, 0].astype(np.float64) / total
    if strategy == "low_confidence":
        conf = p
    elif strategy == "top_k_margin":
        second = np.partition(e, -2, axis=-1)[:, -2].astype(np.float64) / total
        conf = e.max(axis=-1).astype(np.float64) / total - second
    elif strategy == "neg_entropy":
        # -H = sum p log p = sum(e (z - top)) / total - log(total)
        conf = (e * (z - top)).sum(axis=-1, dtype=np.float64) / total - np.log(total)
    else:
        raise InputError(f"unknown confidence strategy {strategy!r}")
    return x0.astype(np.int64), p, conf


# ----------------------------------------------------------------------------------------------
# Rows
# ----------------------------------------------------------------------------------------------


@dataclass
class Rows:
    """Prompt rows left-padded to one length: ids, positions, key validity [B, L]."""

    ids: np.ndarray
    positions: np.ndarray
    valid: np.ndarray

    @property
    def length(self) -> int:
        return self.ids.shape[1]

    @property
    def real_lengths(self) -> np.ndarray:
        return self.valid.sum(axis=1)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> Rows:
    """Left-pad prompts with ``pad_id`` (the mask id upstream); pads: invalid, position 0."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise InputError("empty prompt")
    length = max(len(p) for p in prompts)
    ids = np.full((len(prompts), length), pad_id, dtype=np.int64)
    positions = np.zeros((len(prompts), length), dtype=np.int64)
    valid = np.zeros((len(prompts), length), dtype=bool)
    for r, p in enumerate(prompts):
        pad = length - len(p)
        ids[r, pad:] = p
        positions[r, pad:] = np.arange(len(p))
        valid[r, pad:] = True
    return Rows(ids, positions, valid)


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------


@dataclass
class GenerationResult:
    tokens: np.ndarray  # generated ids (image heads: un-offset VQ codes), cut at the stop token for text
    confidences: np.ndarray  # p of each generated token when it was committed
    stop_token: int | None  # the stop id that ended text generation, if any
    steps: int  # denoising steps run
    forward_passes: int  # backbone passes (prefill + steps + commits)
    blocks: int
    pruned_fraction: float = 0.0  # SPRINT: mean share of valid prefix keys pruned
    step_counts: list[int] = field(default_factory=list)  # denoising steps per block
    step_seconds: list[float] = field(default_factory=list)  # wall time of each denoising step
    engine_seconds: float = 0.0  # time inside backend calls
    loop_seconds: float = 0.0  # wall time of the whole loop; loop - engine = host work (selection, copies)

    @property
    def host_fraction(self) -> float:
        return 1.0 - self.engine_seconds / self.loop_seconds if self.loop_seconds else 0.0


Progress = Callable[[int, int], None]  # (blocks done, blocks total)


class BlockDiffusionSampler:
    """Runs the unmasking loop for one request on a backend.

    ``head``: "text" (full vocabulary; ids as generated) or "image" (the 16384 image codes; returns
    un-offset VQ ids and writes ``code + image_token_offset`` into the sequence).
    """

    def __init__(self, backend: Backend, head: str, sampling: SamplingConfig,
                 sprint: SprintConfig | None = None, progress: Progress | None = None) -> None:
        if head not in ("text", "image"):
            raise ValueError(f"head must be 'text' or 'image', got {head!r}")
        if sprint is not None and sprint.prunes and not backend.provides_key_importance:
            raise InputError(f"SPRINT prefix pruning needs attention scores, which the {backend.name} backend does "
                             "not provide; use keep ratio 1.0 there, or the torch backend")
        self.backend = backend
        self.head = head
        self.sampling = sampling
        self.sprint = sprint
        self.progress = progress
        cfg = backend.config.backbone
        self.mask_id = cfg.mask_token_id
        self.offset = cfg.image_token_offset if head == "image" else 0
        self.max_positions = cfg.max_position_embeddings
        self.strategy = sprint.strategy if sprint is not None else "low_confidence"
        self._engine_seconds = 0.0

    def _logits(self, hidden: np.ndarray) -> np.ndarray:
        return self.backend.head_image(hidden) if self.head == "image" else self.backend.head_text(hidden)

    def _use_fused_head(self) -> bool:
        """The fused graph computes greedy p; sampling, rescale and other confidence measures need logits."""
        s = self.sampling
        return (s.fused_head and s.temperature == 0 and not s.cfg_rescale and self.strategy == "low_confidence"
                and self.head in self.backend.fused_head_kinds)

    def _use_fused_step(self, want_importance: bool) -> bool:
        """Block step and fused head in one backend call, when the head fuses and no attention scores are wanted."""
        return not want_importance and self._use_fused_head() and self.head in self.backend.fused_step_kinds

    def _timed(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self._engine_seconds += time.perf_counter() - start

    def _score(self, hidden: np.ndarray, active: np.ndarray, row_weights: Sequence[float],
               rng: np.random.Generator | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """x0, p, confidence for every block position (confidence -inf where not active)."""
        bs = active.shape[0]
        if self._use_fused_head():
            return self._greedy(*self._timed(self.backend.head_sample, self.head, hidden,
                                             np.asarray(row_weights, np.float32)), active)
        # Only masked positions are scored: the head output of the others is never used.
        where = np.flatnonzero(active)
        g = guide(self._timed(self._logits, hidden)[:, where], row_weights, self.sampling.cfg_rescale)
        x0, p, conf = np.zeros(bs, np.int64), np.zeros(bs), np.full(bs, -np.inf)
        x0[where], p[where], conf[where] = score_tokens(g, self.sampling.temperature, rng, self.strategy)
        return x0, p, conf

    @staticmethod
    def _greedy(x0: np.ndarray, p: np.ndarray, active: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A fused head's (x0, p) as x0, p, confidence (-inf where not active)."""
        p = p.astype(np.float64)
        return x0.astype(np.int64), p, np.where(active, p, -np.inf)

    def generate(self, rows: Rows, gen_length: int, row_weights: Sequence[float] = (1.0,),
                 stop_ids: Sequence[int] = ()) -> GenerationResult:
        s = self.sampling
        bs = s.block_size
        if gen_length <= 0:
            raise InputError(f"nothing to generate (gen_length={gen_length})")
        prompt_len = rows.length
        n_blocks = math.ceil((prompt_len + gen_length) / bs)
        total = n_blocks * bs
        needed = int(rows.real_lengths.max()) + total - prompt_len
        if needed > self.max_positions:
            raise InputError(f"request needs {needed} positions (prompt {prompt_len} + {gen_length} generated, "
                             f"rounded up to {bs}-token blocks), more than max_position_embeddings="
                             f"{self.max_positions}")
        n_rows = rows.ids.shape[0]
        x = np.full((n_rows, total), self.mask_id, dtype=np.int64)
        x[:, :prompt_len] = rows.ids
        pos = np.zeros((n_rows, total), dtype=np.int64)
        pos[:, :prompt_len] = rows.positions
        pos[:, prompt_len:] = rows.real_lengths[:, None] + np.arange(total - prompt_len)[None, :]
        valid = np.ones((n_rows, total), dtype=bool)
        valid[:, :prompt_len] = rows.valid
        masked = np.zeros(total, dtype=bool)  # generated positions not yet committed
        masked[prompt_len:] = True
        conf_of = np.ones(total, dtype=np.float64)  # prompt tokens count as fully confident (SPRINT)
        rng = np.random.default_rng(s.seed) if s.temperature > 0 else None
        stop = np.asarray(list(stop_ids), dtype=np.int64)
        sprint = self.sprint

        first_block = prompt_len // bs
        loop_start = time.perf_counter()
        self._engine_seconds = 0.0
        self.backend.start(n_rows, total, bs)
        passes0 = self.backend.forward_passes
        if first_block:
            self._timed(self.backend.prefill, x[:, :first_block * bs], pos[:, :first_block * bs],
                        valid[:, :first_block * bs])
        schedule = step_schedule(bs, s.steps)
        steps_run, step_counts, pruned, step_times = 0, [], [], []
        stop_token: int | None = None
        for b in range(first_block, n_blocks):
            lo, hi = b * bs, (b + 1) * bs
            block_steps = 0
            for step in range(s.steps):
                active = masked[lo:hi]
                if not active.any():
                    break
                step_start = time.perf_counter()
                want_importance = sprint is not None and sprint.prunes and step == sprint.cache_warmup_steps - 1
                if self._use_fused_step(want_importance):
                    importance = None
                    x0, p, conf = self._greedy(*self._timed(
                        self.backend.forward_sample, self.head, x[:, lo:hi], pos[:, lo:hi], valid[:, lo:hi],
                        np.asarray(row_weights, np.float32)), active)
                else:
                    hidden, importance = self._timed(self.backend.forward_block, x[:, lo:hi], pos[:, lo:hi],
                                                     valid[:, lo:hi], key_importance=want_importance)
                    x0, p, conf = self._score(hidden, active, row_weights, rng)
                if not np.isfinite(p[active]).all():
                    raise InputError(f"the backbone produced non-finite scores (NaN or inf) in block {b}, step "
                                     f"{step}: the checkpoint's weights hold NaN/inf values, or a guidance scale "
                                     "is not finite")
                if sprint is not None:
                    k = adaptive_k(int(active.sum()), s.steps - step)
                    sel = select_sprint(conf, p, active, k, sprint.threshold)
                else:
                    sel = select_baseline(conf, active, schedule[step], s.threshold)
                x[:, lo:hi][:, sel] = x0[sel] + self.offset  # committed into every row
                masked[lo:hi][sel] = False
                conf_of[lo:hi][sel] = p[sel]
                block_steps += 1
                step_times.append(time.perf_counter() - step_start)
                if importance is not None and self.backend.cache_len:
                    pruned.append(self._prune(importance, x[0, :self.backend.cache_len],
                                              conf_of[:self.backend.cache_len], valid[:, :self.backend.cache_len]))
                if stop.size and (stop_token := self._early_stop(x[0], masked, prompt_len, stop)) is not None:
                    break
            steps_run += block_steps
            step_counts.append(block_steps)
            self.backend.set_cache_mask(None)
            if self.progress:
                self.progress(b - first_block + 1, n_blocks - first_block)
            if stop_token is None and stop.size:
                stop_token = self._block_stop(x[0, lo:hi], masked[lo:hi], stop)
            if stop_token is not None or b == n_blocks - 1:
                break
            self._timed(self.backend.commit, x[:, lo:hi], pos[:, lo:hi], valid[:, lo:hi])

        out = x[0, prompt_len:prompt_len + gen_length]
        confs = conf_of[prompt_len:prompt_len + gen_length]
        if stop.size:
            hits = np.flatnonzero(np.isin(out, stop))
            if hits.size:
                stop_token = int(out[hits[0]])
                out, confs = out[:hits[0]], confs[:hits[0]]
        return GenerationResult(tokens=out - self.offset, confidences=confs, stop_token=stop_token,
                                steps=steps_run, forward_passes=self.backend.forward_passes - passes0,
                                blocks=len(step_counts), pruned_fraction=float(np.mean(pruned)) if pruned else 0.0,
                                step_counts=step_counts, step_seconds=step_times, engine_seconds=self._engine_seconds,
                                loop_seconds=time.perf_counter() - loop_start)

    # -- stopping -------------------------------------------------------------------------------

    @staticmethod
    def _early_stop(seq: np.ndarray, masked: np.ndarray, prompt_len: int, stop: np.ndarray) -> int | None:
        """A committed stop token with everything generated before it unmasked ends generation."""
        gen = seq[prompt_len:]
        hits = np.flatnonzero(np.isin(gen, stop) & ~masked[prompt_len:])
        if hits.size and not masked[prompt_len:prompt_len + hits[0]].any():
            return int(gen[hits[0]])
        return None

    @staticmethod
    def _block_stop(block: np.ndarray, block_masked: np.ndarray, stop: np.ndarray) -> int | None:
        hits = np.flatnonzero(np.isin(block, stop) & ~block_masked)
        return int(block[hits[0]]) if hits.size else None

    # -- SPRINT pruning -----------------------------------------------------------------------

    def _prune(self, importance: np.ndarray, cached_ids: np.ndarray, cached_conf: np.ndarray,
               cached_valid: np.ndarray) -> float:
        """Keep the top share of prefix keys per modality; returns the pruned fraction of valid keys.

        Scores are shared by all rows (their blocks are aligned); a key is kept for every row.
        """
        sp = self.sprint
        assert sp is not None
        attn = importance.mean(axis=0)
        attn = attn / max(float(attn.max()), 1e-12)
        score = sp.confidence_alpha * attn + (1.0 - sp.confidence_alpha) * cached_conf
        any_valid = cached_valid.any(axis=0)
        is_image = cached_ids >= self.backend.config.backbone.image_token_offset
        keep = np.zeros_like(any_valid)
        for modality in (True, False):
            members = np.flatnonzero(any_valid & (is_image == modality))
            n_keep = math.ceil(sp.ratio(modality) * members.size)
            if n_keep:
                order = members[np.argsort(-score[members], kind="stable")[:n_keep]]
                keep[order] = True
        self.backend.set_cache_mask(np.broadcast_to(keep, cached_valid.shape).copy())
        n_valid = int(any_valid.sum())
        return 1.0 - int(keep.sum()) / n_valid if n_valid else 0.0
