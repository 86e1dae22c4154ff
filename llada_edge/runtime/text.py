"""The text tokenizer of the runtime: a thin wrapper over the ``tokenizers`` library (model-spec §3).

The runtime must work without torch or transformers, so it reads ``tokenizer.json`` directly. The
wrapper adds what the generation code needs on top of plain encode/decode: the special ids by name
(mask, EOS, image markers, grid tokens) with errors that name the file, and a decode that tolerates
ids the text vocabulary does not have (image codes, padding), because a random or partly trained
model can emit any id of its 173568-way head.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import cached_property
from numbers import Integral
from pathlib import Path

from tokenizers import Tokenizer

from llada_edge.errors import CheckpointError, InputError

MASK_TOKEN = "<|mask|>"
EOS_TOKEN = "<|endoftext|>"
IMAGE_START_TOKEN = "<|image|>"
IMAGE_END_TOKEN = "<|/image|>"
BOI_TOKEN = "<boi>"
UNCONDITION_TOKEN = "<uncondition>"


def reserved_token(n: int) -> str:
    """The grid-size token string ``<|reserved_token_{n}|>`` (model-spec §3)."""
    return f"<|reserved_token_{n}|>"


class TextTokenizer:
    """Encode/decode text and look up special ids of one ``tokenizer.json``."""

    def __init__(self, tokenizer: Tokenizer, source: str | Path) -> None:
        self._tok = tokenizer
        self.source = str(source)

    @classmethod
    def from_file(cls, path: str | Path) -> TextTokenizer:
        """Load ``tokenizer.json``; a missing or unreadable file is a broken checkpoint, not a crash."""
        path = Path(path)
        if not path.is_file():
            raise CheckpointError("tokenizer file not found", file=path)
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as exc:  # the Rust side raises a bare Exception for any parse error
            raise CheckpointError(f"not a valid tokenizer.json ({exc})", file=path) from exc
        return cls(tok, path)

    # ------------------------------------------------------------------------------------------
    # Encode / decode
    # ------------------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; special tokens written in it map to their ids, no BOS/EOS is added.

        The prompt templates of model-spec §3 are plain strings with special tokens inline, so the
        special-token matching is what turns ``<role>`` or ``<|image|>`` into one id each.
        """
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; ids outside the vocabulary (image codes, negatives) are skipped, not fatal."""
        known = [i for i in (int(x) for x in ids) if i >= 0 and self._tok.id_to_token(i) is not None]
        return self._tok.decode(known, skip_special_tokens=skip_special_tokens)

    @property
    def vocab_size(self) -> int:
        """Number of entries of the text vocabulary, added tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    # ------------------------------------------------------------------------------------------
    # Special ids
    # ------------------------------------------------------------------------------------------

    def token_id(self, token: str) -> int:
        """The id of one token string; a tokenizer that lacks it cannot run this model."""
        tid = self._tok.token_to_id(token)
        if tid is None:
            raise CheckpointError(f"token {token!r} is not in the vocabulary", file=self.source)
        return int(tid)

    def reserved_token_id(self, n: int) -> int:
        """Id of ``<|reserved_token_{n}|>``, the token that spells a grid size ``n`` (model-spec §3)."""
        if isinstance(n, bool) or not isinstance(n, (int, Integral)) or n < 0:
            raise InputError(f"grid size must be a non-negative integer, got {n!r}")
        n = int(n)
        tid = self._tok.token_to_id(reserved_token(n))
        if tid is None:
            raise CheckpointError(f"token {reserved_token(n)!r} is not in the vocabulary, so a grid size of "
                                  f"{n} cannot be written (the image is too large for this tokenizer)",
                                  file=self.source)
        return int(tid)

    @cached_property
    def mask_id(self) -> int:
        return self.token_id(MASK_TOKEN)

    @cached_property
    def eos_id(self) -> int:
        return self.token_id(EOS_TOKEN)

    @cached_property
    def image_start_id(self) -> int:
        return self.token_id(IMAGE_START_TOKEN)

    @cached_property
    def image_end_id(self) -> int:
        return self.token_id(IMAGE_END_TOKEN)

    @cached_property
    def boi_id(self) -> int:
        return self.token_id(BOI_TOKEN)

    @cached_property
    def uncondition_id(self) -> int:
        return self.token_id(UNCONDITION_TOKEN)
