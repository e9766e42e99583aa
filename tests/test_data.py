"""Pretraining data: token shards and the mixture loader, against brute force."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from smolforge.cli import main
from smolforge.data.loader import PretrainLoader, SourceSpec, positions_and_documents
from smolforge.data.shards import ShardWriter, TokenShards, tokenize_corpus
from smolforge.errors import SmolforgeError
from smolforge.tokenizer import Tokenizer, train_tokenizer

EOS = 0


def write_shards(directory, documents: list[list[int]], shard_tokens: int = 10**9) -> TokenShards:
    writer = ShardWriter(directory, np.uint16, EOS, shard_tokens)
    for doc in documents:
        writer.add(doc)
    writer.finish({"split": "all"})
    return TokenShards(directory)


def stream_of(documents: list[list[int]]) -> np.ndarray:
    return np.array([t for doc in documents for t in [*doc, EOS]])


@pytest.fixture
def documents() -> list[list[int]]:
    rng = np.random.default_rng(0)
    return [list(rng.integers(1, 500, rng.integers(3, 40))) for _ in range(60)]


def test_shards_across_files_read_like_one_stream(documents, tmp_path):
    shards = write_shards(tmp_path / "s", documents, shard_tokens=100)
    assert len(shards.manifest["shards"]) > 3
    stream = stream_of(documents)
    assert shards.tokens == len(stream) and shards.documents == len(documents)
    for offset, length in [(0, 10), (95, 30), (len(stream) - 17, 17)]:
        assert shards.read(offset, length).tolist() == stream[offset : offset + length].tolist()


def test_windows_labels_positions_and_documents(documents, tmp_path):
    shards = write_shards(tmp_path / "s", documents)
    stream = stream_of(documents)
    T = 16
    loader = PretrainLoader([SourceSpec(shards)], seq_len=T, batch_size=4, seed=0)
    windows = (len(stream) - 1) // T
    seen = []
    for _ in range(windows // 4):
        batch = loader.next_batch()
        x, y = batch["input_ids"].numpy(), batch["labels"].numpy()
        for row in range(4):
            start = next(i for i in range(0, windows * T, T) if stream[i : i + T].tolist() == x[row].tolist()
                         and stream[i + 1 : i + T + 1].tolist() == y[row].tolist())
            seen.append(start)
            # brute force: position = tokens since the last EOS in this row; doc id = EOS count before.
            pos, doc = 0, 0
            for t in range(T):
                if t > 0 and x[row, t - 1] == EOS:
                    pos, doc = 0, doc + 1
                assert batch["position_ids"][row, t] == pos and batch["document_ids"][row, t] == doc
                pos += 1
    assert len(set(seen)) == len(seen)  # an epoch visits each window at most once


def test_positions_helper_restarts_after_eos():
    positions, documents = positions_and_documents(np.array([[5, 0, 7, 8, 0, 0, 3]]), EOS)
    assert positions.tolist() == [[0, 1, 0, 1, 2, 0, 0]]
    assert documents.tolist() == [[0, 0, 1, 1, 1, 2, 3]]


def test_mixture_weights_count_tokens(documents, tmp_path):
    a = write_shards(tmp_path / "a", documents)
    b = write_shards(tmp_path / "b", documents[:10])
    loader = PretrainLoader([SourceSpec(a, 3.0, "a"), SourceSpec(b, 1.0, "b")], seq_len=8, batch_size=50, seed=1)
    for _ in range(40):
        loader.next_batch()
    share_a = loader.counts[0] / sum(loader.counts)
    assert share_a == pytest.approx(0.75, abs=0.03)
    assert loader.epochs_seen()["b"] > 1  # the small source repeats, with a new order each epoch


def test_resume_gives_identical_batches_and_constant_state(documents, tmp_path):
    specs = [SourceSpec(write_shards(tmp_path / "a", documents), 2.0), SourceSpec(write_shards(tmp_path / "b", documents[:20]))]
    first = PretrainLoader(specs, seq_len=8, batch_size=5, seed=3)
    for _ in range(7):
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))
    size = len(json.dumps(state))
    second = PretrainLoader(specs, seq_len=8, batch_size=5, seed=3)
    second.load_state_dict(state)
    for _ in range(30):
        a, b = first.next_batch(), second.next_batch()
        assert all((a[k] == b[k]).all() for k in a)
    assert len(json.dumps(first.state_dict())) <= size + 8  # counters only, not a growing index


def test_ranks_partition_the_single_process_order(documents, tmp_path):
    specs = [SourceSpec(write_shards(tmp_path / "a", documents), 1.0), SourceSpec(write_shards(tmp_path / "b", documents[5:30]))]
    single = PretrainLoader(specs, seq_len=8, batch_size=6, seed=2)
    ranks = [PretrainLoader(specs, seq_len=8, batch_size=3, seed=2, rank=r, world_size=2) for r in range(2)]
    for _ in range(5):
        whole = single.next_batch()["input_ids"]
        parts = [r.next_batch()["input_ids"] for r in ranks]
        assert sorted(map(tuple, whole.tolist())) == sorted(map(tuple, parts[0].tolist() + parts[1].tolist()))


def test_epochs_are_reshuffled(documents, tmp_path):
    shards = write_shards(tmp_path / "s", documents)
    loader = PretrainLoader([SourceSpec(shards)], seq_len=8, batch_size=1, seed=0)
    windows = (shards.tokens - 1) // 8
    epoch = lambda: [tuple(loader.next_batch()["input_ids"][0].tolist()) for _ in range(windows)]  # noqa: E731
    one, two = epoch(), epoch()
    assert sorted(one) == sorted(two) and one != two


def test_source_shorter_than_a_sequence_is_refused(tmp_path):
    shards = write_shards(tmp_path / "s", [[1, 2, 3]])
    with pytest.raises(SmolforgeError, match="fewer than one sequence"):
        PretrainLoader([SourceSpec(shards, name="tiny")], seq_len=64, batch_size=1)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    (root / "c.txt").write_text("Some words and numbers 12345, again and again.\n" * 100)
    train_tokenizer([root / "c.txt"], vocab_size=384).save(root / "tok")
    return root / "tok"


def make_corpus(root):
    (root / "a.txt").write_text("A plain text document.\nWith two lines.")
    (root / "b.jsonl").write_text("\n".join(json.dumps({"text": f"json document {i}"}) for i in range(30)))
    pq.write_table(pa.table({"text": [f"parquet row {i}" for i in range(20)]}), root / "c.parquet")
    return [root / "a.txt", root / "b.jsonl", root / "c.parquet"]


def test_tokenize_counts_match_brute_force_and_workers_agree(tokenizer_dir, tmp_path):
    paths = make_corpus(tmp_path)
    tokenizer = Tokenizer.load(tokenizer_dir)
    texts = [paths[0].read_text()] + [f"json document {i}" for i in range(30)] + [f"parquet row {i}" for i in range(20)]
    manifest = tokenize_corpus(paths, tokenizer_dir, tmp_path / "one", workers=1, progress=False)
    assert manifest["documents"] == 51 and manifest["dtype"] == "uint16"
    assert manifest["tokens"] == sum(len(tokenizer.encode(t)) + 1 for t in texts)
    assert manifest["tokenizer_fingerprint"] == tokenizer.fingerprint
    tokenize_corpus(paths, tokenizer_dir, tmp_path / "two", workers=2, progress=False)
    assert (tmp_path / "one" / "shard_00000.bin").read_bytes() == (tmp_path / "two" / "shard_00000.bin").read_bytes()


def test_validation_split_is_by_document(tokenizer_dir, tmp_path):
    paths = make_corpus(tmp_path)
    tokenize_corpus(paths, tokenizer_dir, tmp_path / "out", workers=1, val_fraction=0.3, progress=False)
    train, val = TokenShards(tmp_path / "out" / "train"), TokenShards(tmp_path / "out" / "val")
    assert train.documents + val.documents == 51 and val.documents > 0
    decode = Tokenizer.load(tokenizer_dir).decode
    train_docs = set(decode(train.read(0, train.tokens).tolist()).split("<|endoftext|>"))
    val_docs = set(decode(val.read(0, val.tokens).tolist()).split("<|endoftext|>"))
    assert train_docs & val_docs <= {""}


def test_tokenize_errors_and_cli(tokenizer_dir, tmp_path, capsys):
    paths = make_corpus(tmp_path)
    tokenize_corpus(paths[:1], tokenizer_dir, tmp_path / "out", workers=1, progress=False)
    with pytest.raises(SmolforgeError, match="already exists"):
        tokenize_corpus(paths[:1], tokenizer_dir, tmp_path / "out", workers=1, progress=False)
    with pytest.raises(SmolforgeError, match="not a tokenized data directory"):
        TokenShards(tmp_path)
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": \n')
    with pytest.raises(SmolforgeError, match="bad.jsonl:2"):
        tokenize_corpus([tmp_path / "bad.jsonl"], tokenizer_dir, tmp_path / "bad", workers=1, progress=False)
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".tmp-*"))
    code = main(["data", "tokenize", str(paths[1]), "--tokenizer", str(tokenizer_dir),
                 "--out", str(tmp_path / "cli"), "--workers", "1"])
    assert code == 0 and TokenShards(tmp_path / "cli").documents == 30
    assert main(["data", "tokenize", str(tmp_path / "missing.txt"), "--tokenizer", str(tokenizer_dir),
                 "--out", str(tmp_path / "x")]) == 2
    assert "missing.txt" in capsys.readouterr().err
