"""`smolforge data tokenize`: token shards and manifests against brute force, with a tiny tokenizer."""

from __future__ import annotations

import argparse
import json
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from smolforge.data import shards as shards_module
from smolforge.data.shards import (
    TokenShards,
    dtype_for_vocab,
    register,
    tokenize_corpus,
    write_documents,
)
from smolforge.errors import SmolforgeError
from smolforge.tokenizer import Tokenizer, train_tokenizer

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi".split()


def sentence(i: int) -> str:
    rng = np.random.default_rng(i)
    return " ".join(rng.choice(WORDS, rng.integers(2, 12))) + f" {i}."


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    (root / "corpus.txt").write_text("\n".join(sentence(i) for i in range(400)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "fewer tokens than vocab_size" on this tiny corpus
        train_tokenizer([root / "corpus.txt"], vocab_size=384).save(root / "tok")
    return root / "tok"


@pytest.fixture
def corpus(tmp_path):
    """txt (2 documents, one with a non-UTF-8 byte) + jsonl (25) + parquet (15); the texts in order."""
    root = tmp_path / "corpus"
    root.mkdir()
    (root / "a.txt").write_text(sentence(1000) + "\nsecond line")
    (root / "b.txt").write_bytes(sentence(1001).encode() + b" \xff bad byte")
    jsonl = [sentence(2000 + i) for i in range(25)]
    (root / "c.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in jsonl) + "\n")
    rows = [sentence(3000 + i) for i in range(15)]
    pq.write_table(pa.table({"text": rows}), root / "d.parquet")
    texts = [(root / "a.txt").read_text(), (root / "b.txt").read_bytes().decode(errors="replace"), *jsonl, *rows]
    return [root / "a.txt", root / "b.txt", root / "c.jsonl", root / "d.parquet"], texts


def test_manifest_and_shards_match_brute_force(tokenizer_dir, corpus, tmp_path, capsys):
    paths, texts = corpus
    tokenizer = Tokenizer.load(tokenizer_dir)
    encoded = [tokenizer.encode(t) + [tokenizer.eos_id] for t in texts]
    manifest = tokenize_corpus(paths, tokenizer_dir, tmp_path / "out", workers=1, shard_tokens=150, progress=False)
    assert manifest["documents"] == len(texts) == 42
    assert manifest["tokens"] == sum(map(len, encoded))
    assert manifest["dtype"] == "uint16" and manifest["vocab_size"] == tokenizer.vocab_size
    assert manifest["tokenizer_fingerprint"] == tokenizer.fingerprint
    assert len(manifest["shards"]) > 1
    per_file = [encoded[:1], encoded[1:2], encoded[2:27], encoded[27:]]
    text_per_file = [texts[:1], texts[1:2], texts[2:27], texts[27:]]
    for source, docs, strings, path in zip(manifest["sources"], per_file, text_per_file, paths):
        assert source["path"] == str(path) and source["documents"] == len(docs)
        assert source["tokens"] == sum(map(len, docs))
        assert source["bytes"] == sum(len(s.encode()) for s in strings)
        assert source["skipped"] == 0
    assert [s["replaced_bytes_lines"] for s in manifest["sources"]] == [0, 1, 0, 0]
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == manifest

    shards = TokenShards(tmp_path / "out")
    stream = [t for doc in encoded for t in doc]
    assert shards.read(0, shards.tokens).tolist() == stream
    assert shards.document_bounds(0, shards.tokens).tolist() == np.cumsum(list(map(len, encoded))).tolist()
    for shard in manifest["shards"]:  # every shard: its .bin, and its .idx as a .npy of uint64 ends
        ends = np.load(tmp_path / "out" / shard["file"].replace(".bin", ".idx"))
        assert ends.dtype == np.uint64 and len(ends) == shard["documents"] and ends[-1] == shard["tokens"]
    out = capsys.readouterr().out
    assert "42 documents" in out and "b.txt: 1 documents/lines had non-UTF-8 bytes" in out


def test_worker_count_does_not_change_the_bytes(tokenizer_dir, corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(shards_module, "DOCS_PER_CHUNK", 4)  # many chunks in flight
    paths, _ = corpus
    for workers in (1, 2):
        tokenize_corpus(paths, tokenizer_dir, tmp_path / f"w{workers}", workers=workers, shard_tokens=100,
                        val_fraction=0.25, seed=1, progress=False)
    files = sorted(p.relative_to(tmp_path / "w1") for p in (tmp_path / "w1").rglob("*") if p.is_file())
    assert len(files) > 6
    assert files == sorted(p.relative_to(tmp_path / "w2") for p in (tmp_path / "w2").rglob("*") if p.is_file())
    for file in files:
        assert (tmp_path / "w1" / file).read_bytes() == (tmp_path / "w2" / file).read_bytes(), file


def test_dtype_follows_the_vocabulary(tmp_path):
    assert dtype_for_vocab(384) == np.uint16 and dtype_for_vocab(65536) == np.uint16
    assert dtype_for_vocab(65537) == np.uint32
    write_documents(tmp_path / "big", [[70_000, 5], [1]], eos_id=2, vocab_size=100_000)
    shards = TokenShards(tmp_path / "big")
    assert shards.dtype == np.uint32 and shards.read(0, 5).tolist() == [70_000, 5, 2, 1, 2]
    with pytest.raises(SmolforgeError, match="does not fit uint16"):
        write_documents(tmp_path / "small", [[70_000]], eos_id=2, vocab_size=384)


def test_validation_split_holds_out_whole_documents(tokenizer_dir, corpus, tmp_path):
    paths, texts = corpus
    eos = Tokenizer.load(tokenizer_dir).eos_id
    manifest = tokenize_corpus(paths, tokenizer_dir, tmp_path / "out", workers=1, val_fraction=0.2, progress=False)
    train, val = TokenShards(tmp_path / "out" / "train"), TokenShards(tmp_path / "out" / "val")
    assert val.documents == round(0.2 * 42) and train.documents + val.documents == 42
    assert manifest["splits"]["val"]["documents"] == val.documents
    assert manifest["tokens"] == train.tokens + val.tokens
    assert sum(s["documents"] for s in val.manifest["sources"]) == val.documents

    def documents(shards):
        ids = shards.read(0, shards.tokens).tolist()
        docs, current = [], []
        for t in ids:
            current.append(t)
            if t == eos:
                docs.append(tuple(current))
                current = []
        return docs

    tokenizer = Tokenizer.load(tokenizer_dir)
    every = sorted(tuple(tokenizer.encode(t) + [eos]) for t in texts)
    assert sorted(documents(train) + documents(val)) == every  # each document in exactly one split
    assert not set(documents(train)) & set(documents(val))
    with pytest.raises(SmolforgeError, match="train/validation split"):
        TokenShards(tmp_path / "out")
    again = tokenize_corpus(paths, tokenizer_dir, tmp_path / "again", workers=1, val_fraction=0.2, progress=False)
    other = tokenize_corpus(paths, tokenizer_dir, tmp_path / "other", workers=1, val_fraction=0.2, seed=7,
                            progress=False)
    assert again["splits"] == manifest["splits"]
    assert documents(TokenShards(tmp_path / "other" / "val")) != documents(val)
    assert other["splits"]["val"]["documents"] == val.documents


def test_existing_output_is_refused_unless_overwrite(tokenizer_dir, corpus, tmp_path):
    paths, _ = corpus
    tokenize_corpus(paths[:1], tokenizer_dir, tmp_path / "out", workers=1, progress=False)
    with pytest.raises(SmolforgeError, match="already exists"):
        tokenize_corpus(paths, tokenizer_dir, tmp_path / "out", workers=1, progress=False)
    assert TokenShards(tmp_path / "out").documents == 1
    tokenize_corpus(paths, tokenizer_dir, tmp_path / "out", workers=1, progress=False, overwrite=True)
    assert TokenShards(tmp_path / "out").documents == 42
    assert not list(tmp_path.glob(".tmp-*"))


def test_empty_and_invalid_corpora(tokenizer_dir, tmp_path):
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(SmolforgeError, match="no documents"):
        tokenize_corpus([tmp_path / "blank.jsonl"], tokenizer_dir, tmp_path / "out", workers=1, progress=False)
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"txt": "wrong field"}\n{"text": "also fine"}\n')
    with pytest.raises(SmolforgeError, match="bad.jsonl:2"):
        tokenize_corpus([tmp_path / "bad.jsonl"], tokenizer_dir, tmp_path / "out", workers=1, progress=False)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".tmp-*"))
    manifest = tokenize_corpus([tmp_path / "bad.jsonl"], tokenizer_dir, tmp_path / "out", workers=1,
                               skip_invalid=True, progress=False)
    assert manifest["documents"] == 2 and manifest["sources"][0]["skipped"] == 1


def test_reader_refuses_missing_or_damaged_sets(tmp_path):
    with pytest.raises(SmolforgeError, match="smolforge data tokenize"):
        TokenShards(tmp_path / "nowhere")
    write_documents(tmp_path / "s", [[1, 2, 3], [4]], eos_id=0)
    (tmp_path / "s" / "shard_00000.bin").write_bytes(b"\x01\x00")
    with pytest.raises(SmolforgeError, match="truncated"):
        TokenShards(tmp_path / "s")
    (tmp_path / "s" / "manifest.json").write_text("{not json")
    with pytest.raises(SmolforgeError, match="not a valid manifest"):
        TokenShards(tmp_path / "s")


def test_cli_through_register(tokenizer_dir, corpus, tmp_path):
    paths, _ = corpus
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["data", "tokenize", *map(str, paths), "--tokenizer", str(tokenizer_dir),
                              "--out", str(tmp_path / "cli"), "--workers", "1", "--val-fraction", "0.1",
                              "--seed", "3", "--no-progress"])
    assert args.func(args) == 0
    assert TokenShards(tmp_path / "cli" / "train").documents + TokenShards(tmp_path / "cli" / "val").documents == 42
    args = parser.parse_args(["data", "tokenize", str(paths[0]), "--tokenizer", str(tokenizer_dir),
                              "--out", str(tmp_path / "x"), "--val-fraction", "1.5"])
    with pytest.raises(SmolforgeError, match="--val-fraction"):
        args.func(args)
    args = parser.parse_args(["data"])
    assert args.func(args) == 2  # `smolforge data` alone prints its subcommands
