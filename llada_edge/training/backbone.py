"""Train the tiny backbone as a masked-diffusion model on the shipped text and captioned scenes.

The objective is LLaDA's: mask each answer token with probability t ~ U(0.05, 1), predict the
masked ones (cross-entropy), with the block-causal attention of inference. Four kinds of sequences,
each in the prompt format the runtime builds (``runtime.prompts``), so the pipelines exercise what
was trained:

* chat: ``What does json.dumps do?`` -> a docstring paragraph of the standard library;
* text: a docstring paragraph on its own (every token a target);
* understanding: a scene's VQ ids + a question -> its caption;
* text-to-image: a caption -> the scene's VQ ids (the image head).

Only the *live* vocabulary is trained: the byte ids the tokenizer produces, the special and grid
tokens, and the image codes the fitted codebook uses (about a thousand rows instead of 173,568).
Every other ``lm_head`` row is written as zeros, so its logit is exactly 0; the loss counts those
rows in the softmax as ``log(n_dead)`` (``exp(0)`` each), so it is the exact full-vocabulary
cross-entropy and the trained logits learn to beat them. Embedding rows of dead ids keep their
random values (nothing ever feeds them).

The routers get a small self-distillation term (binary cross-entropy pulling the sigmoid scores of
the chosen experts towards 1 and the others towards 0), so they prefer experts as trained routers
do; its effect is reported as routing entropy.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from llada_edge.config import BLOCK_SIZE, ModelConfig
from llada_edge.model.backbone import LLaDA2Backbone, MoE, block_causal_allowed, mask_to_bias
from llada_edge.model.loading import load_backbone
from llada_edge.runtime.text import TextTokenizer
from llada_edge.training import corpus
from llada_edge.training.sequences import (
    QUESTIONS,
    Example,
    SceneTokens,
    chat_example,
    t2i_example,
    text_example,
    understand_example,
)
from llada_edge.training.weights import rewrite_sharded

Progress = Callable[[str], None]

@dataclass(frozen=True)
class BackboneTraining:
    """Settings of :func:`train_backbone` (part of the tiny-trained fingerprint)."""

    steps: int = 2000
    batch: int = 16
    lr: float = 3e-3
    warmup: int = 60
    weight_decay: float = 0.01
    route_weight: float = 0.02
    min_mask_ratio: float = 0.05
    mix: tuple[float, float, float, float] = (0.35, 0.15, 0.25, 0.25)  # chat, text, understanding, t2i
    log_every: int = 100


@dataclass
class TrainingData:
    chat: list[Example] = field(default_factory=list)
    text: list[Example] = field(default_factory=list)
    understand: list[Example] = field(default_factory=list)
    t2i: list[Example] = field(default_factory=list)

    def kinds(self) -> list[list[Example]]:
        return [self.chat, self.text, self.understand, self.t2i]


# ----------------------------------------------------------------------------------------------
# Sequences
# ----------------------------------------------------------------------------------------------


def build_data(tok: TextTokenizer, passages: Sequence[corpus.Passage], understand: Sequence[SceneTokens],
               t2i: Sequence[SceneTokens], offset: int, seed: int) -> TrainingData:
    rng = np.random.default_rng(seed)
    data = TrainingData()
    for p in passages:
        data.chat.append(chat_example(tok, p))
        data.text.append(text_example(tok, p))
    for s in understand:
        data.understand.append(understand_example(tok, s, QUESTIONS[int(rng.integers(len(QUESTIONS)))], offset))
    data.t2i.extend(t2i_example(tok, s, offset) for s in t2i)
    return data


# ----------------------------------------------------------------------------------------------
# The live vocabulary
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LiveVocab:
    """The ids that are trained: ``ids`` sorted; ``image_slots`` the positions of image ids within them."""

    ids: torch.Tensor  # [n] int64, sorted
    vocab_size: int
    image_offset: int
    num_image_codes: int

    @classmethod
    def of(cls, cfg: ModelConfig, tok: TextTokenizer, data: TrainingData) -> LiveVocab:
        b = cfg.backbone
        live = set(range(256))  # the byte-level alphabet: every text the tokenizer encodes
        live.update(range(b.image_token_offset - 1024, b.image_token_offset))  # specials and grid tokens
        for kind in data.kinds():
            for ex in kind:
                live.update(ex.ids)
        live = {i for i in live if 0 <= i < b.vocab_size and (i < 256 or i >= tok.eos_id)}
        return cls(torch.tensor(sorted(live)), b.vocab_size, b.image_token_offset, b.num_image_tokens)

    @property
    def image_slots(self) -> torch.Tensor:
        return torch.nonzero(self.ids >= self.image_offset).squeeze(-1)

    def index(self) -> torch.Tensor:
        """full id -> live slot (-1 for dead ids)."""
        table = torch.full((self.vocab_size,), -1, dtype=torch.int64)
        table[self.ids] = torch.arange(len(self.ids))
        return table

    def dead_text(self) -> float:
        return math.log(self.vocab_size - len(self.ids))

    def dead_image(self) -> float:
        return math.log(self.num_image_codes - len(self.image_slots))


# ----------------------------------------------------------------------------------------------
# The model being trained
# ----------------------------------------------------------------------------------------------


class LiveBackbone(nn.Module):
    """The checkpoint's layers and final norm, with embedding and lm_head rows of the live ids only."""

    def __init__(self, backbone: LLaDA2Backbone, live: LiveVocab) -> None:
        super().__init__()
        self.backbone = backbone
        self.live = live
        self.register_buffer("slot", live.index(), persistent=False)
        self.embed = nn.Parameter(backbone.model.word_embeddings.weight[live.ids].detach().clone())
        self.head = nn.Parameter(backbone.lm_head.weight[live.ids].detach().clone())
        self.dead_rows_zero = False  # the dead lm_head rows: random as synthesized, zero once trained
        self.router_inputs: list[tuple[MoE, torch.Tensor]] = []
        for layer in backbone.decoder_layers():
            if isinstance(layer.mlp, MoE):
                layer.mlp.register_forward_pre_hook(self._record_router_input)

    def _record_router_input(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        assert isinstance(module, MoE)
        self.router_inputs.append((module, args[0].reshape(-1, args[0].shape[-1])))

    def hidden(self, ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        self.router_inputs = []
        slots = self.slot[ids]  # type: ignore[index]
        if bool((slots < 0).any()):
            raise ValueError("a sequence holds an id outside the live vocabulary")
        h = self.embed[slots]
        positions = torch.arange(ids.shape[1]).expand(ids.shape[0], -1)
        bias = mask_to_bias(block_causal_allowed(ids.shape[1], valid))
        h, _ = self.backbone.layers_forward(h, positions, bias)
        return self.backbone.model.norm(h)

    def log_probs(self, h: torch.Tensor, head: str) -> torch.Tensor:
        """Log-softmax over the live ids of a head, normalised as if over the full vocabulary."""
        if head == "image":
            slots = self.live.image_slots
            logits = h @ self.head[slots].t()
            dead = self.live.dead_image()
        else:
            logits = h @ self.head.t()
            dead = self.live.dead_text()
        norm = torch.logaddexp(torch.logsumexp(logits, dim=-1), torch.tensor(dead))
        return logits - norm.unsqueeze(-1)

    def target_slots(self, targets: torch.Tensor, head: str) -> torch.Tensor:
        slots = self.slot[targets]  # type: ignore[index]
        if head == "image":  # position within the image slots
            image_first = int(self.live.image_slots[0])
            return slots - image_first
        return slots

    def router_loss(self) -> torch.Tensor:
        """BCE of each router's sigmoid scores towards its own (detached) top-k choice."""
        total = torch.zeros(())
        for moe, x in self.router_inputs:
            logits = moe.gate.logits(x)
            _, chosen = moe.gate(x)
            target = torch.zeros_like(logits).scatter(1, chosen.detach(), 1.0)
            total = total + F.binary_cross_entropy_with_logits(logits, target)
        return total / max(len(self.router_inputs), 1)

    def full_head(self) -> torch.Tensor:
        """lm_head as the checkpoint holds it: the live rows, and the dead ones random (as synthesized) until
        ``dead_rows_zero`` is set (as :meth:`write_back` writes them)."""
        base = self.backbone.lm_head.weight.detach()
        full = torch.zeros_like(base) if self.dead_rows_zero else base.clone()
        full[self.live.ids] = self.head.detach()
        return full

    def write_back(self) -> dict[str, torch.Tensor]:
        """The updated checkpoint tensors (upstream key names)."""
        bb = self.backbone
        emb = bb.model.word_embeddings.weight.detach().clone()
        emb[self.live.ids] = self.embed.detach()
        head = torch.zeros_like(bb.lm_head.weight)
        head[self.live.ids] = self.head.detach()
        out = {"model.word_embeddings.weight": emb, "lm_head.weight": head}
        for name, tensor in bb.model.layers.state_dict().items():
            out[f"model.layers.{name}"] = tensor.detach()
        for name, tensor in bb.model.norm.state_dict().items():
            out[f"model.norm.{name}"] = tensor.detach()
        return out


# ----------------------------------------------------------------------------------------------
# Batches and the loop
# ----------------------------------------------------------------------------------------------


@dataclass
class Batch:
    ids: torch.Tensor  # masked input [B, L]
    valid: torch.Tensor  # [B, L] bool
    rows: torch.Tensor  # masked target coordinates
    cols: torch.Tensor
    targets: torch.Tensor
    head: str


def make_batch(examples: Sequence[Example], mask_id: int, pad_id: int, rng: np.random.Generator,
               ratios: Sequence[float] | None = None, min_ratio: float = 0.05) -> Batch:
    """Mask each example's targets at its own ratio (drawn unless given); pad to a block multiple."""
    length = max(len(e.ids) for e in examples)
    length = -(-length // BLOCK_SIZE) * BLOCK_SIZE
    ids = np.full((len(examples), length), pad_id, dtype=np.int64)
    valid = np.zeros((len(examples), length), dtype=bool)
    rows, cols, targets = [], [], []
    for i, ex in enumerate(examples):
        seq = np.asarray(ex.ids)
        ratio = float(rng.uniform(min_ratio, 1.0)) if ratios is None else ratios[i]
        masked = np.zeros(len(seq), dtype=bool)
        n = len(seq) - ex.start
        masked[ex.start:] = rng.random(n) < ratio
        if not masked.any():
            masked[ex.start + int(rng.integers(n))] = True
        where = np.flatnonzero(masked)
        rows.extend([i] * len(where))
        cols.extend(where.tolist())
        targets.extend(seq[where].tolist())
        seq = np.where(masked, mask_id, seq)
        ids[i, :len(seq)] = seq
        valid[i, :len(seq)] = True
    return Batch(torch.from_numpy(ids), torch.from_numpy(valid), torch.tensor(rows), torch.tensor(cols),
                 torch.tensor(targets), examples[0].head)


def batch_loss(model: LiveBackbone, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean NLL of the masked targets, per-target NLL)."""
    h = model.hidden(batch.ids, batch.valid)[batch.rows, batch.cols]
    logp = model.log_probs(h, batch.head)
    nll = -logp.gather(1, model.target_slots(batch.targets, batch.head).unsqueeze(-1)).squeeze(-1)
    return nll.mean(), nll


def _lr(step: int, settings: BackboneTraining) -> float:
    if step < settings.warmup:
        return settings.lr * (step + 1) / settings.warmup
    progress = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
    return settings.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_loop(model: LiveBackbone, data: TrainingData, tok: TextTokenizer, settings: BackboneTraining,
               seed: int, progress: Progress) -> list[float]:
    rng = np.random.default_rng(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay, betas=(0.9, 0.98))
    kinds = data.kinds()
    mix = np.asarray(settings.mix) * np.asarray([len(k) > 0 for k in kinds])
    mix = mix / mix.sum()
    losses: list[float] = []
    t0 = time.perf_counter()
    for step in range(settings.steps):
        kind = kinds[int(rng.choice(len(kinds), p=mix))]
        picks = rng.integers(len(kind), size=settings.batch)
        batch = make_batch([kind[int(i)] for i in picks], tok.mask_id, tok.eos_id, rng,
                           min_ratio=settings.min_mask_ratio)
        for group in opt.param_groups:
            group["lr"] = _lr(step, settings)
        loss, _ = batch_loss(model, batch)
        total = loss + settings.route_weight * model.router_loss()
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if (step + 1) % settings.log_every == 0 or step + 1 == settings.steps:
            recent = float(np.mean(losses[-settings.log_every:]))
            progress(f"  backbone: step {step + 1}/{settings.steps}, masked NLL {recent:.3f}, "
                     f"{time.perf_counter() - t0:.0f} s")
    return losses


# ----------------------------------------------------------------------------------------------
# Quality figures (before and after)
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def quality(model: LiveBackbone, examples: dict[str, list[Example]], tok: TextTokenizer, seed: int
            ) -> dict[str, float]:
    """Held-out figures at mask ratio 0.5: masked accuracy, perplexity, top-1/top-2 gap, routing."""
    rng = np.random.default_rng(seed)
    out: dict[str, float] = {}
    gaps_nats: list[float] = []
    gaps_sigma: list[float] = []
    entropy: list[float] = []
    margin: list[float] = []
    load = None
    for name, exs in examples.items():
        nll_all, correct = [], []
        for i in range(0, len(exs), 16):
            batch = make_batch(exs[i:i + 16], tok.mask_id, tok.eos_id, rng, ratios=[0.5] * len(exs[i:i + 16]))
            h = model.hidden(batch.ids, batch.valid)[batch.rows, batch.cols]
            logp = model.log_probs(h, batch.head)
            want = model.target_slots(batch.targets, batch.head)
            nll_all.append(-logp.gather(1, want.unsqueeze(-1)).squeeze(-1))
            correct.append(logp.argmax(-1) == want)
            gaps = _top_gaps(model, h, batch.head)
            gaps_nats.extend(gaps[0])
            gaps_sigma.extend(gaps[1])
            for moe, x in model.router_inputs:
                e, m, counts = _routing(moe, x)
                entropy.append(e)
                margin.append(m)
                load = counts if load is None else load + counts
        nll = torch.cat(nll_all)
        out[f"{name}_masked_accuracy"] = float(torch.cat(correct).float().mean())
        out[f"{name}_perplexity"] = float(torch.exp(nll.mean()))
    out["top1_top2_gap_nats"] = float(np.median(gaps_nats))
    out["top1_top2_gap_sigma"] = float(np.median(gaps_sigma))
    out["routing_entropy_nats"] = float(np.mean(entropy))
    out["routing_entropy_uniform_nats"] = math.log(model.backbone.cfg.num_experts)
    out["routing_kth_margin"] = float(np.mean(margin))
    if load is not None:
        out["expert_load_max_over_mean"] = float(load.max() / load.mean())
    return out


GAP_POSITIONS = 64  # masked positions per evaluation batch whose full-vocabulary logits are materialised


def _top_gaps(model: LiveBackbone, h: torch.Tensor, head: str) -> tuple[list[float], list[float]]:
    """Top-1 minus top-2 logit over the whole head as the checkpoint holds it (random dead rows before training,
    zero rows after), in nats and in units of the logits' standard deviation over the vocabulary."""
    full = model.full_head()
    if head == "image":
        full = full[model.live.image_offset:]
    logits = h[:GAP_POSITIONS] @ full.t()
    top = logits.topk(2, dim=-1).values
    gap = top[:, 0] - top[:, 1]
    return gap.tolist(), (gap / logits.std(dim=-1).clamp_min(1e-12)).tolist()


def _routing(moe: MoE, x: torch.Tensor) -> tuple[float, float, torch.Tensor]:
    """(mean entropy of the normalised sigmoid scores, mean k-th minus (k+1)-th biased score, expert counts)."""
    g = moe.gate
    scores = torch.sigmoid(g.logits(x))
    p = scores / scores.sum(-1, keepdim=True)
    entropy = float(-(p * p.clamp_min(1e-30).log()).sum(-1).mean())
    biased = (scores + g.expert_bias.float()).topk(g.top_k + 1, dim=-1).values
    margin = float((biased[:, -2] - biased[:, -1]).mean())
    _, idx = g(x)
    counts = torch.bincount(idx.flatten(), minlength=moe.num_experts).double()
    return entropy, margin, counts


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------


def train_backbone(ckpt_dir: Path, understand: Sequence[SceneTokens], t2i: Sequence[SceneTokens],
                   held_out: dict[str, list[SceneTokens]], settings: BackboneTraining | None = None,
                   seed: int = 0, progress: Progress | None = None) -> dict[str, Any]:
    """Train the backbone of ``ckpt_dir`` in place; returns the quality figures before and after.

    ``understand`` / ``t2i``: the training scenes as tokens; ``held_out``: {"understand": [...],
    "t2i": [...]} scenes never trained on (plus the corpus' held-out passages).
    """
    settings = settings or BackboneTraining()
    say = progress or (lambda _m: None)
    torch.manual_seed(seed)
    cfg = ModelConfig.from_folder(ckpt_dir)
    tok = TextTokenizer.from_file(ckpt_dir / "tokenizer.json")
    offset = cfg.backbone.image_token_offset
    data = build_data(tok, corpus.training_passages(), understand, t2i, offset, seed)
    evaluation = build_data(tok, corpus.held_out_passages()[:96], held_out.get("understand", []),
                            held_out.get("t2i", []), offset, seed + 1)
    # held-out ids the training never saw are dead rows (logit 0): they stay out of the live set
    model = LiveBackbone(load_backbone(ckpt_dir, torch.float32), LiveVocab.of(cfg, tok, data))
    model.backbone.requires_grad_(True)
    model.backbone.model.word_embeddings.requires_grad_(False)
    model.backbone.lm_head.requires_grad_(False)
    evaluation_sets = {k: [e for e in v if bool((model.slot[torch.tensor(e.ids)] >= 0).all())]  # type: ignore[index]
                       for k, v in (("chat", evaluation.chat), ("understand", evaluation.understand),
                                    ("t2i", evaluation.t2i))}
    evaluation_sets = {k: v for k, v in evaluation_sets.items() if v}
    say(f"  backbone: {len(model.live.ids)} live ids ({len(model.live.image_slots)} image codes); "
        f"{sum(len(k) for k in data.kinds())} training sequences")
    before = quality(model, evaluation_sets, tok, seed)
    t0 = time.perf_counter()
    losses = train_loop(model, data, tok, settings, seed, say)
    seconds = time.perf_counter() - t0
    model.dead_rows_zero = True
    after = quality(model, evaluation_sets, tok, seed)
    rewrite_sharded(ckpt_dir, model.write_back())
    return {"settings": asdict(settings), "seconds": seconds, "final_loss": float(np.mean(losses[-50:])),
            "live_ids": len(model.live.ids), "live_image_codes": len(model.live.image_slots),
            "held_out_sequences": {k: len(v) for k, v in evaluation_sets.items()}, "before": before, "after": after}
