"""Text that ships with every environment: the docstrings of the Python standard library.

The tiny trained checkpoint learns from them (``training``), and the accuracy report measures
perplexity and masked-token agreement on a held-out part of them (``held_out``). The split is by
module name (a fixed hash), so no sentence of a held-out module is ever trained on. The corpus is
read from this interpreter's own standard library; :func:`corpus_fingerprint` names exactly which
text was read, so a cached checkpoint is reused only for the same text.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import re
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

HELD_OUT_PERCENT = 10  # modules whose crc32 % 100 falls below this are held out
MAX_PASSAGE_CHARS = 240
MIN_PASSAGE_CHARS = 40


@dataclass(frozen=True)
class Passage:
    """One docstring paragraph: ``subject`` is the documented object (``json.dumps``), ``text`` the prose."""

    subject: str
    text: str


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py"))  # top-level modules: no tests, no site-packages, stable set
    return [p for p in files if not p.name.startswith("_")]


def _clean(paragraph: str) -> str:
    text = re.sub(r"\s+", " ", paragraph).strip()
    return text if text.isascii() else ""


def _passages_of(path: Path) -> list[Passage]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    module = path.stem
    out: list[Passage] = []
    nodes: list[tuple[str, ast.AST]] = [(module, tree)]
    nodes += [(f"{module}.{n.name}", n) for n in ast.walk(tree)
              if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and not n.name.startswith("_")]
    for subject, node in nodes:
        assert isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
        doc = ast.get_docstring(node)
        if not doc:
            continue
        for paragraph in doc.split("\n\n"):
            text = _clean(paragraph)[:MAX_PASSAGE_CHARS]
            if len(text) >= MIN_PASSAGE_CHARS and not text.startswith((">>>", "|", "--", "..")):
                out.append(Passage(subject, text))
    return out


def _held_out(module: str) -> bool:
    return zlib.crc32(module.encode()) % 100 < HELD_OUT_PERCENT


@functools.cache
def _split() -> tuple[tuple[Passage, ...], tuple[Passage, ...]]:
    train: list[Passage] = []
    held: list[Passage] = []
    for path in _stdlib_files():
        (held if _held_out(path.stem) else train).extend(_passages_of(path))
    return tuple(train), tuple(held)


def training_passages() -> tuple[Passage, ...]:
    return _split()[0]


def held_out_passages() -> tuple[Passage, ...]:
    """Never trained on: what the accuracy report measures perplexity and agreement on."""
    return _split()[1]


def corpus_fingerprint() -> str:
    """sha256 of every passage (both splits), so a change of Python version shows up as another corpus."""
    digest = hashlib.sha256()
    for part in _split():
        for p in part:
            digest.update(f"{p.subject}\0{p.text}\n".encode())
        digest.update(b"\1")
    return digest.hexdigest()
