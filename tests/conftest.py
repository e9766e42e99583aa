"""Fixtures shared by several test modules (a module's own fixture of the same name wins)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from smolforge.data.shards import tokenize_corpus
from smolforge.data.synth import generate
from smolforge.model import ModelConfig, Transformer, debug
from smolforge.quickstart import bundled_text
from smolforge.tokenizer import Tokenizer, train_tokenizer
from smolforge.train import checkpoint as ckpt
from smolforge.train.checkpoint import save_checkpoint

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


@pytest.fixture
def crash_on_call():
    """`wrap(real, n)`: `real` whose n-th call raises RuntimeError("injected crash"), for the
    tests that interrupt a run and resume it."""
    def wrap(real, n: int):
        calls = 0

        def crashing(*args, **kwargs):
            nonlocal calls
            calls += 1
            if calls == n:
                raise RuntimeError("injected crash")
            return real(*args, **kwargs)
        return crashing
    return wrap


def write_preference_run(root: Path, pairs: list[dict], words: list[str]) -> Path:
    """`root` with pairs.jsonl and a random tiny base checkpoint (`base/`) whose tokenizer was
    trained on the pairs' words: the start of a preference run."""
    (root / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    (root / "c.txt").write_text(" ".join(f"say {w} {w} {w} no {w}" for w in words) * 20)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tokenizer = train_tokenizer([root / "c.txt"], vocab_size=TINY_VOCAB)
    torch.manual_seed(0)
    save_checkpoint(root / "base", Transformer(ModelConfig(**{**debug().model_dump(), "vocab_size": TINY_VOCAB})),
                    tokenizer)
    return root


@pytest.fixture(scope="session")
def prepared(tmp_path_factory) -> Path:
    """A tokenizer and train/val shards from 80 kB of the bundled text (pretraining runs)."""
    root = tmp_path_factory.mktemp("prepared")
    text = bundled_text()[:80_000]
    (root / "train.txt").write_text(text[:72_000])
    (root / "val.txt").write_text(text[72_000:])
    train_tokenizer([root / "train.txt"], vocab_size=512).save(root / "tok")
    tokenize_corpus([root / "train.txt"], root / "tok", root / "train", workers=1, progress=False)
    tokenize_corpus([root / "val.txt"], root / "tok", root / "val", workers=1, progress=False)
    return root


@pytest.fixture
def crash_after_checkpoint(monkeypatch):
    """`run_crashed(start, step)`: call `start()` with a KeyboardInterrupt raised right after the
    checkpoint of `step` is written (where a kill -9 would leave the run), then save normally again."""
    def run_crashed(start, step: int) -> None:
        real = ckpt.save_run_checkpoint

        def save_then_crash(run_dir, at, *args, **kwargs):
            path = real(run_dir, at, *args, **kwargs)
            if at == step:
                raise KeyboardInterrupt(f"simulated crash after step {step}")
            return path
        monkeypatch.setattr(ckpt, "save_run_checkpoint", save_then_crash)
        with pytest.raises(KeyboardInterrupt):
            start()
        monkeypatch.setattr(ckpt, "save_run_checkpoint", real)
    return run_crashed


def assert_same_weights(a: Path, b: Path) -> None:
    """The two checkpoints hold bit-identical weights."""
    first, _ = ckpt.load_model(a)
    second, _ = ckpt.load_model(b)
    for (name, p), q in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(p, q), name
