"""``llada-edge inspect``: validate a checkpoint folder and summarise it.

Reads headers only (no tensor data, except the small SigVQ state dict which is a torch.save file),
so it is fast and light on any model size.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from llada_edge.checkpoint import CheckpointFolder, TensorReader
from llada_edge.errors import CheckpointError

# Token strings the runtime relies on, with the ids model-spec §3 gives (None: no published id).
REQUIRED_SPECIAL_TOKENS: dict[str, int | None] = {
    "<|endoftext|>": 156892,
    "<|mask|>": 156895,
    "<|image|>": 156901,
    "<|/image|>": 156902,
    "<boi>": 156904,
    "<role>": None,
    "</role>": None,
    "<uncondition>": None,
}


@dataclass
class ComponentSummary:
    name: str
    params: int
    bytes: int
    dtypes: dict[str, int]  # dtype -> number of tensors
    files: int
    detail: str = ""


@dataclass
class CheckpointSummary:
    root: Path
    components: list[ComponentSummary] = field(default_factory=list)
    special_tokens: dict[str, int] = field(default_factory=dict)

    @property
    def total_params(self) -> int:
        return sum(c.params for c in self.components)

    def to_dict(self) -> dict:
        return {"root": str(self.root), "total_params": self.total_params,
                "components": [c.__dict__ for c in self.components], "special_tokens": self.special_tokens}

    def format(self) -> str:
        lines = [f"checkpoint: {self.root}"]
        for c in self.components:
            dtypes = ", ".join(f"{d} x{n}" for d, n in sorted(c.dtypes.items()))
            lines.append(f"  {c.name:<18} {c.params / 1e6:>12,.1f} M params  {c.bytes / 2**30:>8.2f} GiB  "
                         f"{c.files} file(s)  [{dtypes}]  {c.detail}")
        lines.append(f"  {'total':<18} {self.total_params / 1e6:>12,.1f} M params")
        toks = ", ".join(f"{t}={i}" for t, i in self.special_tokens.items())
        lines.append(f"  tokenizer.json: {toks}")
        return "\n".join(lines)


def _reader_summary(name: str, reader: TensorReader, detail: str = "") -> ComponentSummary:
    infos = reader.tensors.values()
    return ComponentSummary(name, sum(i.numel for i in infos), sum(i.nbytes for i in infos),
                            dict(Counter(i.dtype for i in infos)), len(reader.files), detail)


def check_special_tokens(path: Path) -> dict[str, int]:
    """Load tokenizer.json with ``tokenizers`` and check the special tokens the runtime needs."""
    from tokenizers import Tokenizer

    if not path.is_file():
        raise CheckpointError("file not found", file=path)
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on malformed files
        raise CheckpointError(f"not a valid tokenizers file ({exc})", file=path) from None
    found = {}
    for token, expected in REQUIRED_SPECIAL_TOKENS.items():
        got = tok.token_to_id(token)
        if got is None:
            raise CheckpointError("special token missing", file=path, key=token)
        if expected is not None and got != expected:
            raise CheckpointError(f"special token has id {got}, expected {expected}", file=path, key=token)
        found[token] = got
    return found


def summarize_checkpoint(root: str | Path) -> CheckpointSummary:
    """Validate every component of a checkpoint folder and summarise it (raises on any problem)."""
    ckpt = CheckpointFolder(root)
    ckpt.check()
    cfg = ckpt.config
    b = cfg.backbone
    out = CheckpointSummary(ckpt.root)
    out.components.append(_reader_summary(
        "backbone", ckpt.backbone,
        f"{b.num_hidden_layers} layers, {b.num_experts} experts top-{b.num_experts_per_tok}, hidden {b.hidden_size}"))
    v = cfg.vision
    out.components.append(_reader_summary(
        "image tokenizer", ckpt.vision,
        f"ViT {v.depth}x{v.hidden_size}, codebook {v.num_embeddings}x{v.embed_dim}, "
        f"{cfg.preprocessor.token_order} order"))
    state = ckpt.load_sigvq_state()
    out.components.append(ComponentSummary(
        "sigvq", sum(t.numel() for t in state.values()), sum(t.numel() * t.element_size() for t in state.values()),
        dict(Counter(str(t.dtype).replace("torch.", "") for t in state.values())), 1))
    for mode, dec in cfg.decoders.items():
        out.components.append(_reader_summary(
            f"decoder ({mode})", ckpt.decoder(mode), f"DiT {dec.n_layers}+2x{dec.n_refiner_layers} x {dec.dim}"))
    out.components.append(_reader_summary("vae", ckpt.vae_weights, f"{cfg.vae.latent_channels}-ch latent"))
    out.special_tokens = check_special_tokens(ckpt.tokenizer_path)
    return out
