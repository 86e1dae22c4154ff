"""Precision recipes: which weights get which number format, per kind of weight (typed configs).

Kinds of weights:

* ``experts``  routed MoE experts (~94% of the backbone's bytes; what decides memory traffic);
* ``dense``    attention projections, the shared expert, the dense layer-0 MLP;
* ``dit``      the Z-Image decoder transformers (turbo and normal);
* ``vision``   the SigLIP ViT of the image tokenizer (its VQ codebook search always stays fp32, ids
               are an argmax over cosine similarities and would flip);
* ``router``   the MoE gate (fp32 unless asked: routing decides which experts run at all);
* ``lm_head``  the text head: every vocabulary row (173,568 x 2048, 1.4 GB in fp32 at real size, read whole on
               every text step). int8 (MatMulNBits, a scale per 128 weights along K) in ``int4`` and ``mixed`` on
               ONNX Runtime; fp32 otherwise, and on GPU targets unless asked.
* ``image_head`` the image head: the 16,384 image-code rows of the same matrix (fp32 unless asked: t2i's margins
               between codes are the thinnest, and its bytes are 1/11 of the text head's).

Formats: ``fp32`` (not quantized: the weight stays in the recipe's float ``dtype``); ``fp8`` (e4m3,
per-output-channel scale); ``int8`` (symmetric, per output channel);
``int4`` (symmetric, block-wise along the input dimension, block 128 or the largest power of two
that divides a smaller dimension). ``int4`` is experts int4 with the other weights int8, ``mixed`` experts
int4 with everything else fp8. Components may override any kind: ``Recipe.with_overrides(dit="fp8")``
gives "backbone int4, decoder fp8".

``dtype`` is the float type of everything a recipe does not quantize (activations, norms, unquantized weights,
the KV cache): ``fp32`` on the CPU reference and ONNX Runtime, ``fp16``/``bf16`` for GPU graphs
(:mod:`llada_edge.engines.half`). The ``fp16`` and ``bf16`` recipes quantize nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from llada_edge.errors import InputError

FORMATS = ("fp32", "fp8", "int8", "int4")
DTYPES = ("fp32", "fp16", "bf16")
# ModelOpt's int4 weight methods for the TensorRT targets: AWQ with clip search (the default: the most accurate,
# slow on a CPU at real dimensions), AWQ-lite (scales only), round-to-nearest (no calibration; seconds).
INT4_METHODS = ("awq_clip", "awq_lite", "rtn_dq")
# How the onnxruntime target's int4 expert weights (QMoE) get their block scales: ``max`` (amax / 8, round to
# nearest) or ``mse`` (per block, the clip ratio in [0.6, 8/7] x amax that minimises the block's squared error).
INT4_SCALES = ("max", "mse")
INT4_BLOCKS = (16, 32, 64, 128)
SETTINGS = ("dtype", "int4_method", "int4_scale", "int4_block")  # what --override may set besides the formats
KINDS = ("experts", "dense", "dit", "vision", "router", "lm_head", "image_head")


@dataclass(frozen=True)
class Recipe:
    name: str
    experts: str
    dense: str
    dit: str
    vision: str
    router: str = "fp32"
    lm_head: str = "fp32"
    image_head: str = "fp32"
    int4_block: int = 128
    dtype: str = "fp32"
    int4_method: str = "awq_clip"
    int4_scale: str = "max"

    def __post_init__(self) -> None:
        if self.int4_scale not in INT4_SCALES:
            raise InputError(f"recipe {self.name!r}: int4_scale={self.int4_scale!r} is not one of {list(INT4_SCALES)}")
        if self.int4_block not in INT4_BLOCKS:
            raise InputError(f"recipe {self.name!r}: int4_block={self.int4_block!r} is not one of {list(INT4_BLOCKS)}")
        if self.int4_method not in INT4_METHODS:
            raise InputError(f"recipe {self.name!r}: int4_method={self.int4_method!r} is not one of "
                             f"{list(INT4_METHODS)}")
        if self.dtype not in DTYPES:
            raise InputError(f"recipe {self.name!r}: dtype={self.dtype!r} is not one of {list(DTYPES)}")
        for kind in KINDS:
            if getattr(self, kind) not in FORMATS:
                raise InputError(f"recipe {self.name!r}: {kind}={getattr(self, kind)!r} is not one of {list(FORMATS)}")

    def with_overrides(self, **kinds: str) -> Recipe:
        """Other formats for some kinds (and the :data:`SETTINGS`), under a name that says so."""
        unknown = set(kinds) - {*KINDS, *SETTINGS}
        if unknown:
            raise InputError(f"unknown weight kinds {sorted(unknown)} (expected some of {[*KINDS, *SETTINGS]})")
        changes: dict[str, Any] = {"name": self.name + "".join(f"+{k}={v}" for k, v in sorted(kinds.items())), **kinds}
        if "int4_block" in kinds:
            try:
                changes["int4_block"] = int(kinds["int4_block"])
            except ValueError:
                raise InputError(f"int4_block must be one of {list(INT4_BLOCKS)}, got {kinds['int4_block']!r}"
                                 ) from None
        return replace(self, **changes)

    def to_dict(self) -> dict[str, str | int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def key_for(self, kinds: tuple[str, ...]) -> dict[str, str | int]:
        """What of the recipe a graph whose weights are ``kinds`` depends on (for its build step's key): their formats
        and the settings, not the name or other kinds' formats, so ``--override lm_head=int8`` rebuilds the heads
        only."""
        return {k: v for k, v in self.to_dict().items() if k in kinds or k in SETTINGS}

    @property
    def is_float(self) -> bool:
        """Quantizes nothing (fp32, fp16, bf16)."""
        return all(getattr(self, k) == "fp32" for k in KINDS)

    def in_dtype(self, dtype: str) -> Recipe:
        """The recipe with its unquantized parts in ``dtype``, under the same name (a GPU target's graphs and
        engines of ``fp8`` are the ``fp8`` ones of that build, whatever their half type; the entry records it)."""
        if dtype == self.dtype:
            return self
        return get_recipe(dtype) if self.is_float else replace(self, dtype=dtype)

    def format_of(self, kind: str) -> str:
        """The format of one kind of weight; "keep" (weights no recipe touches) is fp32."""
        return "fp32" if kind == "keep" else str(getattr(self, kind))

    def graph_format(self, kinds: tuple[str, ...]) -> str:
        """The single Q/DQ mode of a graph whose weights are ``kinds`` (a component's ``graph_kinds``): the
        first kind the recipe does not leave in fp32, else fp32."""
        return next((fmt for fmt in map(self.format_of, kinds) if fmt != "fp32"), "fp32")


RECIPES: dict[str, Recipe] = {
    "fp32": Recipe("fp32", experts="fp32", dense="fp32", dit="fp32", vision="fp32"),
    "fp16": Recipe("fp16", experts="fp32", dense="fp32", dit="fp32", vision="fp32", dtype="fp16"),
    "bf16": Recipe("bf16", experts="fp32", dense="fp32", dit="fp32", vision="fp32", dtype="bf16"),
    "fp8": Recipe("fp8", experts="fp8", dense="fp8", dit="fp8", vision="fp8"),
    "int8": Recipe("int8", experts="int8", dense="int8", dit="int8", vision="int8"),
    # int4 where the bytes are: the routed experts (~94% of the backbone's weights, what each step reads). Decided
    # from the accuracy report on the trained tiny checkpoint (README, "int4: before and after"): int4 attention /
    # shared-expert weights cost top-1 agreement 0.97 -> 0.92 (t2i 0.92 -> 0.79) for 1.7% of the backbone's bytes,
    # and an int4 DiT cost decode PSNR 40 -> 15.5 dB, so those stay int8. The ViT stays int8 too: its output is an
    # argmax over a 16384-entry codebook. "int4 everywhere" is one override away: --override dense=int4 dit=int4.
    # (int4_scale=mse was measured too: +0.002 top-1 overall, -0.02 on t2i; not clearly better, so not the default.)
    # The text head is int8 in both: on the trained tiny checkpoint (README, "The text head on a budget") int8 cost
    # top-1 agreement 0.985 -> 0.982 on chat, none on understanding (0.958 -> 0.959), perplexity ratio 1.0005 ->
    # 1.0008, for 4x fewer bytes read per text step (1.4 GB -> 0.36 GB at real size). int4 failed the report
    # (top-1 0.78). Quantizing the image head too cost t2i top-1 0.916 -> 0.895, for 0.13 GB: it stays fp32.
    "int4": Recipe("int4", experts="int4", dense="int8", dit="int8", vision="int8", lm_head="int8"),
    "mixed": Recipe("mixed", experts="int4", dense="fp8", dit="fp8", vision="fp8", lm_head="int8"),
}


def get_recipe(name: str, overrides: dict[str, str] | None = None) -> Recipe:
    if name not in RECIPES:
        raise InputError(f"unknown precision {name!r} (expected one of {list(RECIPES)})")
    recipe = RECIPES[name]
    return recipe.with_overrides(**overrides) if overrides else recipe


def parse_overrides(items: list[str] | None) -> dict[str, str]:
    """``["dit=fp8", "lm_head=int8"]`` -> {"dit": "fp8", "lm_head": "int8"}."""
    out = {}
    for item in items or []:
        kind, sep, fmt = item.partition("=")
        if not sep:
            raise InputError(f"expected KIND=FORMAT, got {item!r}")
        out[kind] = fmt
    return out


def int4_block_size(k: int, preferred: int = 128, exact: bool = True) -> int:
    """Block along K: ``preferred`` when it divides K, else the largest power of two >= 16 that does.

    ``exact=False`` (MatMulNBits, which pads a partial last block): the largest power of two >= 16 that
    is <= min(K, preferred) when nothing divides K.
    """
    block = preferred
    while block >= 16:
        if k % block == 0:
            return block
        block //= 2
    if not exact and k >= 16:
        block = 16
        while block * 2 <= min(k, preferred):
            block *= 2
        return block
    raise InputError(f"no int4 block size (power of two >= 16) divides K={k}")
