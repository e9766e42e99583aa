"""Fixtures shared by several test modules (a module's own fixture of the same name wins)."""

from __future__ import annotations

import warnings

import pytest

from smolforge.data.synth import generate
from smolforge.tokenizer import Tokenizer, train_tokenizer

TINY_VOCAB = 384


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory) -> Tokenizer:
    """A byte-level BPE of TINY_VOCAB ids (fewer used) trained on one repeated English line."""
    root = tmp_path_factory.mktemp("tok")
    (root / "corpus.txt").write_text("the quick brown fox jumps over the lazy dog 0123456789\n" * 200)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tiny corpus yields fewer merges than asked for
        return train_tokenizer([root / "corpus.txt"], vocab_size=TINY_VOCAB)


@pytest.fixture(scope="session")
def synth_tokenizer(tmp_path_factory) -> Tokenizer:
    """A 512-id byte-level BPE trained on the text of smol-task conversations (`data synth`)."""
    root = tmp_path_factory.mktemp("synth-tok")
    samples = generate("all", 300, seed=1)
    text = "\n".join(m["content"] + m.get("reasoning_content", "") for s in samples for m in s["messages"])
    (root / "corpus.txt").write_text(text * 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return train_tokenizer([root / "corpus.txt"], vocab_size=512)
