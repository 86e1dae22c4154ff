"""The shipped training text and the sequence formats shared by training and the accuracy report."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from llada_edge.config import BLOCK_SIZE
from llada_edge.model.vision import window_order
from llada_edge.runtime.text import TextTokenizer
from llada_edge.training import corpus
from llada_edge.training.sequences import SceneTokens, chat_example, t2i_example, understand_example, window_to_raster


def test_held_out_modules_are_never_trained_on() -> None:
    train, held = corpus.training_passages(), corpus.held_out_passages()
    assert len(train) > 1000 and len(held) > 50
    train_modules = {p.subject.split(".")[0] for p in train}
    held_modules = {p.subject.split(".")[0] for p in held}
    assert not train_modules & held_modules
    assert all(corpus.MIN_PASSAGE_CHARS <= len(p.text) <= corpus.MAX_PASSAGE_CHARS and p.text.isascii()
               for p in train + held)
    assert corpus.corpus_fingerprint() == corpus.corpus_fingerprint()


def test_answers_end_with_eos_at_a_block_boundary(tiny_ckpt: Path) -> None:
    tok = TextTokenizer.from_file(tiny_ckpt / "tokenizer.json")
    passage = corpus.held_out_passages()[0]
    ex = chat_example(tok, passage)
    answer = ex.ids[ex.start:]
    assert len(ex.ids) % BLOCK_SIZE == 0 and answer[-1] == tok.eos_id and len(answer) > len(passage.text)
    assert tok.decode(answer) == passage.text  # EOS is special: decoding skips it
    scene = SceneTokens("a red disc at the center", list(range(16)), 4, 4)
    und = understand_example(tok, scene, "What is it?", 1000)
    assert tok.decode(und.ids[und.start:]) == scene.caption
    t2i = t2i_example(tok, scene, 1000)
    assert t2i.head == "image" and t2i.ids[t2i.start:] == [1000 + q for q in range(16)]


def test_window_to_raster_inverts_the_tokenizers_window_order() -> None:
    gh, gw = 4, 6
    raster = np.arange(gh * gw) * 7
    window = raster[window_order(gh, gw)]  # what the window-order tokenizer emits for these patches
    assert not np.array_equal(window, raster)
    np.testing.assert_array_equal(window_to_raster(window, gh, gw), raster)
