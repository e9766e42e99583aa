"""The pretraining loader against brute force on small synthetic shard sets (no tokenizer)."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pytest

from smolforge.data.loader import PretrainLoader, SourceSpec
from smolforge.data.shards import TokenShards, write_documents
from smolforge.errors import SmolforgeError

EOS = 0


def make_set(directory, documents, shard_tokens: int = 10**9) -> TokenShards:
    write_documents(directory, documents, EOS, vocab_size=1024, shard_tokens=shard_tokens)
    return TokenShards(directory)


def random_documents(seed: int, count: int, low: int = 1, high: int = 500) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(low, high, rng.integers(1, 30)).tolist() for _ in range(count)]


def stream_of(documents) -> list[int]:
    return [t for doc in documents for t in [*doc, EOS]]


def rows(batch) -> list[tuple[int, ...]]:
    """Whole windows (inputs + last label) of a batch."""
    x, y = batch["input_ids"].tolist(), batch["labels"].tolist()
    return [tuple(a + b[-1:]) for a, b in zip(x, y)]


def test_one_epoch_visits_every_window_once_across_shard_files(tmp_path):
    documents = random_documents(0, 50)
    shards = make_set(tmp_path / "s", documents, shard_tokens=40)
    assert len(shards.manifest["shards"]) > 5
    stream, T = stream_of(documents), 8
    expected = [tuple(stream[i * T : i * T + T + 1]) for i in range((len(stream) - 1) // T)]
    loader = PretrainLoader([SourceSpec(shards)], seq_len=T, batch_size=1, seed=5)
    seen = [rows(loader.next_batch())[0] for _ in expected]
    assert sorted(seen) == sorted(expected) and seen != expected  # all windows, shuffled


def test_labels_positions_and_document_ids_match_brute_force(tmp_path):
    documents = random_documents(1, 40)
    documents[3] = []  # an empty document: EOS right after EOS
    loader = PretrainLoader([SourceSpec(make_set(tmp_path / "s", documents))], seq_len=12, batch_size=4)
    for _ in range(5):
        batch = loader.next_batch()
        assert all(batch[k].dtype.is_floating_point is False and batch[k].shape == (4, 12) for k in batch)
        x, y = batch["input_ids"].numpy(), batch["labels"].numpy()
        assert (x[:, 1:] == y[:, :-1]).all()
        for r in range(4):
            pos, doc = 0, 0
            for t in range(12):
                if t > 0 and x[r, t - 1] == EOS:
                    pos, doc = 0, doc + 1
                assert batch["position_ids"][r, t] == pos and batch["document_ids"][r, t] == doc
                pos += 1


def test_document_bounds_match_eos_positions(tmp_path):
    documents = random_documents(2, 30)
    shards = make_set(tmp_path / "s", documents, shard_tokens=25)
    stream = np.array(stream_of(documents))
    for offset, length in [(0, len(stream)), (7, 50), (len(stream) - 9, 9), (30, 0)]:
        ends = [i + 1 for i in range(offset, offset + length) if stream[i] == EOS]
        assert shards.document_bounds(offset, length).tolist() == ends


def test_mixture_token_shares_follow_weights(tmp_path):
    # Disjoint token ranges per source, so each row tells which source it came from.
    weights, T = [1.0, 2.0, 5.0], 8
    specs = [SourceSpec(make_set(tmp_path / f"s{i}", random_documents(i, 20 + 10 * i, 100 * i + 1, 100 * i + 99)),
                        weight=w, name=f"s{i}") for i, w in enumerate(weights)]
    loader = PretrainLoader(specs, seq_len=T, batch_size=64, seed=3)
    tokens = np.zeros(3)
    for _ in range(60):
        for row in loader.next_batch()["input_ids"].numpy():
            source = {int(t) // 100 for t in row if t != EOS}
            assert len(source) == 1
            tokens[source.pop()] += len(row)
    assert tokens / tokens.sum() == pytest.approx(np.array(weights) / sum(weights), abs=0.02)
    seen = loader.epochs_seen()
    assert set(seen) == {"s0", "s1", "s2"} and seen["s2"] > 1


def test_source_order_does_not_depend_on_batch_size(tmp_path):
    specs = [SourceSpec(make_set(tmp_path / "a", random_documents(3, 30)), 1.0),
             SourceSpec(make_set(tmp_path / "b", random_documents(4, 30)), 3.0)]
    small = PretrainLoader(specs, seq_len=6, batch_size=4, seed=9)
    large = PretrainLoader(specs, seq_len=6, batch_size=6, seed=9)
    a = [r for _ in range(6) for r in rows(small.next_batch())]
    b = [r for _ in range(4) for r in rows(large.next_batch())]
    assert a == b


def test_resume_gives_identical_batches(tmp_path):
    specs = [SourceSpec(make_set(tmp_path / "a", random_documents(5, 40)), 2.0, "a"),
             SourceSpec(make_set(tmp_path / "b", random_documents(6, 8)), 1.0, "b")]
    first = PretrainLoader(specs, seq_len=8, batch_size=5, seed=3)
    for _ in range(11):
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))
    second = PretrainLoader(specs, seq_len=8, batch_size=5, seed=3)
    second.load_state_dict(state)
    for _ in range(40):  # crosses epochs of the small source
        a, b = first.next_batch(), second.next_batch()
        assert all(bool((a[k] == b[k]).all()) for k in a)
    assert first.state_dict() == second.state_dict()


def test_resume_refuses_other_data_or_seed(tmp_path):
    specs = [SourceSpec(make_set(tmp_path / "a", random_documents(5, 40)))]
    loader = PretrainLoader(specs, seq_len=8, batch_size=2, seed=1)
    loader.next_batch()
    state = loader.state_dict()
    with pytest.raises(SmolforgeError, match="seq_len"):
        PretrainLoader(specs, seq_len=7, batch_size=2, seed=1).load_state_dict(state)
    with pytest.raises(SmolforgeError, match="seed"):
        PretrainLoader(specs, seq_len=8, batch_size=2, seed=2).load_state_dict(state)
    with pytest.raises(SmolforgeError, match="sources"):
        PretrainLoader(specs * 2, seq_len=8, batch_size=2, seed=1).load_state_dict(state)


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_interleave_the_single_process_order(tmp_path, world_size):
    specs = [SourceSpec(make_set(tmp_path / "a", random_documents(7, 40)), 1.0),
             SourceSpec(make_set(tmp_path / "b", random_documents(8, 15)), 1.5)]
    single = PretrainLoader(specs, seq_len=8, batch_size=2 * world_size, seed=2)
    ranks = [PretrainLoader(specs, seq_len=8, batch_size=2, seed=2, rank=r, world_size=world_size)
             for r in range(world_size)]
    for _ in range(8):
        whole = rows(single.next_batch())
        parts = [rows(r.next_batch()) for r in ranks]
        # global sample k goes to rank k % world_size, in order
        assert whole == [parts[k % world_size][k // world_size] for k in range(len(whole))]
    position = {k: single.state_dict()[k] for k in ("sample", "counts")}
    assert all({k: r.state_dict()[k] for k in position} == position for r in ranks)


def test_each_epoch_is_reshuffled(tmp_path):
    shards = make_set(tmp_path / "s", random_documents(9, 30))
    loader = PretrainLoader([SourceSpec(shards)], seq_len=8, batch_size=1, seed=0)
    windows = (shards.tokens - 1) // 8

    def epoch():
        return [rows(loader.next_batch())[0] for _ in range(windows)]

    one, two, three = epoch(), epoch(), epoch()
    assert sorted(one) == sorted(two) == sorted(three)
    assert one != two and two != three
    assert loader.epochs_seen() == {"s": 3.0}


def test_state_and_memory_do_not_grow_with_steps(tmp_path):
    specs = [SourceSpec(make_set(tmp_path / "a", random_documents(10, 60)), 1.0),
             SourceSpec(make_set(tmp_path / "b", random_documents(11, 10)), 1.0)]
    loader = PretrainLoader(specs, seq_len=8, batch_size=8, seed=0)
    for _ in range(20):
        loader.next_batch()
    early = loader.state_dict()
    tracemalloc.start()
    for _ in range(50):
        loader.next_batch()
    before = tracemalloc.get_traced_memory()[0]
    for _ in range(400):
        loader.next_batch()
    grown = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    late = loader.state_dict()
    assert grown < 64 * 1024
    assert early.keys() == late.keys() and late["sample"] > early["sample"]
    # Only the counters' digits may change: the state holds no per-sample list.
    assert abs(len(json.dumps(late)) - len(json.dumps(early))) <= 8


def test_iter_eval_is_sequential_and_leaves_training_alone(tmp_path):
    docs_a, docs_b = random_documents(12, 20), random_documents(13, 10)
    specs = [SourceSpec(make_set(tmp_path / "a", docs_a)), SourceSpec(make_set(tmp_path / "b", docs_b))]
    T = 8
    expected = []
    for docs in (docs_a, docs_b):
        stream = stream_of(docs)
        expected += [tuple(stream[i * T : i * T + T + 1]) for i in range((len(stream) - 1) // T)]
    loader = PretrainLoader(specs, seq_len=T, batch_size=3, seed=0)
    loader.next_batch()
    state = loader.state_dict()
    assert [r for b in loader.iter_eval(None) for r in rows(b)] == expected
    assert len(list(loader.iter_eval(2))) == 2
    assert loader.state_dict() == state
    # two ranks split the pass by batches; together they cover it once
    parts = [[rows(b) for b in PretrainLoader(specs, T, 3, rank=r, world_size=2).iter_eval(None)] for r in range(2)]
    merged = [row for j in range(len(parts[0]) + len(parts[1])) for row in parts[j % 2][j // 2]]
    assert merged == expected


def test_source_shorter_than_a_sequence_is_refused(tmp_path):
    shards = make_set(tmp_path / "s", [[1, 2, 3]])
    with pytest.raises(SmolforgeError, match=r"'tiny'.* 4 tokens"):
        PretrainLoader([SourceSpec(shards, name="tiny")], seq_len=64, batch_size=1)


def test_bad_weights_and_mixed_tokenizers_are_refused(tmp_path):
    a = make_set(tmp_path / "a", random_documents(14, 10))
    with pytest.raises(SmolforgeError, match="weights"):
        PretrainLoader([SourceSpec(a, 0.0), SourceSpec(a, 0.0)], seq_len=4, batch_size=1)
    write_documents(tmp_path / "b", random_documents(15, 10), eos_id=1)
    with pytest.raises(SmolforgeError, match="different tokenizers"):
        PretrainLoader([SourceSpec(a), SourceSpec(tmp_path / "b")], seq_len=4, batch_size=1)
