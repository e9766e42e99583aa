"""SFT packing (`none`, `bfd`, `wrapped`) against brute force and against the model itself."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from smolforge.data.loader import model_inputs
from smolforge.data.packing import (
    IGNORE_INDEX,
    PACKING_STRATEGIES,
    PackedRow,
    collate,
    count_trained,
    pack_examples,
    pack_row,
    packing_stats,
    padding_fraction,
    plan_rows,
    shift_labels,
)
from smolforge.model import Transformer, debug

PAD = 0
VOCAB = 97


def make_examples(seed: int, count: int, low: int = 1, high: int = 40) -> list[tuple[list[int], list[int]]]:
    """Random (input_ids, unshifted labels): random trained spans, first token sometimes trained."""
    rng = random.Random(seed)
    examples = []
    for _ in range(count):
        ids = [rng.randrange(1, VOCAB) for _ in range(rng.randint(low, high))]
        labels = [t if rng.random() < 0.5 else IGNORE_INDEX for t in ids]
        examples.append((ids, labels))
    return examples


def documents(row: PackedRow) -> list[tuple[int, int]]:
    """(start, end) of each document among the row's real tokens."""
    spans, start = [], 0
    for t in range(1, row.n_real_tokens + 1):
        if t == row.n_real_tokens or row.document_ids[t] != row.document_ids[t - 1]:
            spans.append((start, t))
            start = t
    return spans


def brute_force_bfd(lengths: list[int], capacity: int) -> list[list[int]]:
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    rooms: list[int] = []
    for i in order:
        fits = [(room, b) for b, room in enumerate(rooms) if room >= lengths[i]]
        if fits:
            _, b = min(fits)
            bins[b].append(i)
            rooms[b] -= lengths[i]
        else:
            bins.append([i])
            rooms.append(capacity - lengths[i])
    return bins


def first_fit_decreasing(lengths: list[int], capacity: int) -> int:
    rooms: list[int] = []
    for n in sorted(lengths, reverse=True):
        for b, room in enumerate(rooms):
            if room >= n:
                rooms[b] -= n
                break
        else:
            rooms.append(capacity - n)
    return len(rooms)


def test_shift_labels():
    assert shift_labels([5, -100, 7, 8]) == [-100, 7, 8, -100]
    assert shift_labels([3]) == [-100]
    assert shift_labels([]) == []


@pytest.mark.parametrize("strategy", ["none", "bfd"])
def test_whole_example_rows_hold_every_example_once_and_unsplit(strategy):
    examples = make_examples(0, 200)
    rows = pack_examples(examples, 64, strategy, PAD)
    seen = sorted(i for row in rows for i in row.example_indices)
    assert seen == list(range(len(examples)))
    for row in rows:
        assert len(row.input_ids) == 64 and row.n_real_tokens <= 64
        spans = documents(row)
        assert len(spans) == len(row.example_indices)
        for (start, end), i in zip(spans, row.example_indices):
            ids, labels = examples[i]
            assert row.input_ids[start:end] == ids
            assert row.labels[start:end] == shift_labels(labels)
        assert row.input_ids[row.n_real_tokens:] == [PAD] * (64 - row.n_real_tokens)
    if strategy == "bfd":
        assert len(rows) < len(examples) / 2  # it really packs


def test_bfd_matches_brute_force_and_first_fit_decreasing():
    rng = random.Random(1)
    for _ in range(400):
        capacity = rng.randint(1, 50)
        lengths = [rng.randint(1, capacity) for _ in range(rng.randint(0, 30))]
        plan = plan_rows(lengths, capacity, "bfd")
        assert plan == brute_force_bfd(lengths, capacity)
        assert len(plan) <= first_fit_decreasing(lengths, capacity)
        assert all(sum(lengths[i] for i in row) <= capacity for row in plan)


def test_bfd_fills_rows_on_a_realistic_length_distribution():
    rng = np.random.default_rng(2)
    lengths = np.clip(rng.lognormal(np.log(300), 0.9, 3000), 50, 1500).astype(int).tolist()
    plan = plan_rows(lengths, 2048, "bfd")
    assert plan == plan_rows(lengths, 2048, "bfd")  # deterministic
    used = sum(lengths) / (len(plan) * 2048)
    assert 1 - used < 0.05
    examples = [([1] * n, [1] * n) for n in lengths[:300]]
    assert padding_fraction(pack_examples(examples, 2048, "bfd", PAD)) < 0.05
    assert padding_fraction(pack_examples(examples, 2048, "none", PAD)) > 0.5


@pytest.mark.parametrize("strategy", PACKING_STRATEGIES)
def test_every_trained_token_with_a_predecessor_is_kept(strategy):
    examples = make_examples(3, 150, high=50)
    # Shifting drops only the first token's label: it has no earlier token in its document.
    expected = sum(sum(y != IGNORE_INDEX for y in labels[1:]) for _, labels in examples)
    assert any(labels[0] != IGNORE_INDEX for _, labels in examples)  # the case that matters
    rows = pack_examples(examples, 64, strategy, PAD)
    kept = sum(y != IGNORE_INDEX for row in rows for y in row.labels)
    assert kept == expected == count_trained(examples) == packing_stats(rows)["trained_tokens"]


@pytest.mark.parametrize("strategy", ["none", "bfd"])
def test_labels_stay_inside_documents_and_positions_restart(strategy):
    rows = pack_examples(make_examples(4, 120), 64, strategy, PAD)
    for row in rows:
        for start, end in documents(row):
            assert row.position_ids[start:end] == list(range(end - start))
            assert row.labels[end - 1] == IGNORE_INDEX  # never predicts the next document
            for t in range(start, end - 1):
                assert row.labels[t] in (IGNORE_INDEX, row.input_ids[t + 1])
        n, last = row.n_real_tokens, row.position_ids[row.n_real_tokens - 1]
        # Padding continues the last document, so a one-document row is a plain causal row.
        assert row.document_ids[n:] == [row.document_ids[n - 1]] * (64 - n)
        assert row.position_ids[n:] == list(range(last + 1, last + 1 + 64 - n))
        assert set(row.labels[n:]) <= {IGNORE_INDEX}


def test_wrapped_rows_are_full_and_concatenate_to_the_examples():
    examples = make_examples(5, 60, high=100)
    rows = pack_examples(examples, 48, "wrapped", PAD)
    assert all(len(row.input_ids) == 48 for row in rows)
    assert all(row.n_real_tokens == 48 for row in rows[:-1])
    real = [t for row in rows for t in row.input_ids[: row.n_real_tokens]]
    assert real == [t for ids, _ in examples for t in ids]
    labels = [y for row in rows for y in row.labels[: row.n_real_tokens]]
    assert labels == [y for _, lab in examples for y in shift_labels(lab)]
    assert len(rows) == -(-len(real) // 48)
    for row in rows:
        for start, end in documents(row):
            assert row.position_ids[start:end] == list(range(end - start))


def test_packed_logits_equal_logits_alone():
    torch.manual_seed(0)
    model = Transformer(debug().model_copy(update={"vocab_size": VOCAB})).eval()
    examples = make_examples(6, 12, low=3, high=30)
    for strategy in ("bfd", "none"):
        rows = pack_examples(examples, 64, strategy, PAD)
        batch, kwargs = model_inputs(collate(rows), torch.device("cpu"))
        assert ("document_ids" in kwargs) == (strategy == "bfd")
        with torch.no_grad():
            logits = model(batch["input_ids"], **kwargs).logits
            for r, row in enumerate(rows):
                for (start, end), i in zip(documents(row), row.example_indices):
                    alone = model(torch.tensor([examples[i][0]])).logits[0]
                    torch.testing.assert_close(logits[r, start:end], alone, atol=1e-5, rtol=0)


def test_none_rows_take_the_unmasked_path():
    rows = pack_examples(make_examples(7, 8), 64, "none", PAD)
    batch = collate(rows)
    assert set(batch) == {"input_ids", "labels", "position_ids", "document_ids"}
    assert all(t.dtype == torch.int64 and t.shape == (8, 64) for t in batch.values())
    assert not batch["document_ids"][:, -1].any()
    assert torch.equal(batch["position_ids"], torch.arange(64).expand(8, 64))
    assert model_inputs(batch, torch.device("cpu"))[1] == {}


def test_pack_row_builds_one_row_of_a_plan():
    examples = make_examples(8, 30)
    plan = plan_rows([len(ids) for ids, _ in examples], 64, "bfd")
    assert [pack_row(examples, p, 64, PAD) for p in plan] == pack_examples(examples, 64, "bfd", PAD)
    with pytest.raises(ValueError, match="max_length 64"):
        pack_row(examples, list(range(30)), 64, PAD)


@pytest.mark.parametrize(("strategy", "examples", "message"), [
    ("bfd", [([1, 2], [1, 2]), ([1] * 9, [1] * 9)], r"example 1 has 9 tokens"),
    ("none", [([1] * 9, [1] * 9)], r"example 0 has 9 tokens"),
    ("bfd", [([1, 2], [1, 2]), ([], [])], r"example 1 is empty"),
    ("wrapped", [([1, 2], [1, 2]), ([], [])], r"example 1 is empty"),
    ("bfd", [([1], [1]), ([1], [1]), ([1, 2], [1])], r"example 2 has 2 input_ids but 1 labels"),
    ("wrapped", [([1, 2, 3], [1, 2])], r"example 0 has 3 input_ids but 2 labels"),
    ("bfd_packing", [([1], [1])], r"valid ones: none, bfd, wrapped"),
])
def test_bad_inputs_raise_naming_the_example(strategy, examples, message):
    with pytest.raises(ValueError, match=message):
        pack_examples(examples, 8, strategy, PAD)


def test_bad_settings_raise():
    with pytest.raises(ValueError, match="unknown packing strategy 'ffd'"):
        plan_rows([1, 2], 8, "ffd")
    with pytest.raises(ValueError, match="wrapped"):
        plan_rows([1, 2], 8, "wrapped")
    with pytest.raises(ValueError, match="positive"):
        pack_examples([([1], [1])], 0, "none", PAD)
    rows = pack_examples([([1], [1])], 4, "none", PAD) + pack_examples([([1], [1])], 8, "none", PAD)
    with pytest.raises(ValueError, match="different lengths"):
        collate(rows)
