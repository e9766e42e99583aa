"""Packing SFT examples into fixed-length rows: `none`, `bfd` (best-fit decreasing), `wrapped`.

Smol Training Playbook ch. 07: best-fit-decreasing packing makes SFT 3-5x faster, but on small
data sets at batch 128 it cost about 10 IFEval points (fewer optimiser steps per epoch, and
short examples share rows with long ones), so the SFT baseline does not pack: `none` is the
default and `bfd` is the choice for large runs (SmolLM3's final SFT used it).

- `none`: one example per row, padded at the end to `max_length`.
- `bfd`: whole examples bin-packed into rows of capacity `max_length`; no example is split.
- `wrapped` (TRL's name): all examples concatenated in order and cut every `max_length`
  tokens; an example may be split, and each piece restarts at position 0 as its own document
  in its row (simple, and documented rather than hidden: the piece after a cut loses the
  context before it).

Labels. Examples arrive with UNshifted labels (as `chat.render.RenderedExample` makes them:
labels[i] == input_ids[i] where trained, else -100). Rows carry SHIFTED labels, as the `lm`
objective and `PretrainLoader` expect: labels[t] is the target of the logits at position t.
Each example is shifted on its own, so the last token of a document never predicts the first
token of the next one; the price is that an example's FIRST label is dropped (no token in that
document comes before it). So the trained tokens of a packed set number exactly
    sum over examples of #{i >= 1 : labels[i] != -100}
for every strategy. In `wrapped` rows the shift happens before the cut, so a piece's last
token still predicts the example's next token (which opens the next row): nothing is lost.

Attention. Rows come with `position_ids` restarting at 0 per document and `document_ids`
0, 1, 2, ... per document within the row. End padding shares the LAST document's id and keeps
counting its positions: causal attention already keeps real tokens from seeing later pads,
and so a one-example row looks exactly like an unpacked one (document_ids all 0, positions
0..T-1), which `loader.model_inputs` sends down the plain causal (fast) attention path.

Errors are `PackingError`, both a `ValueError` and a `SmolforgeError` (so the CLI prints it
without a traceback); each names the example index (DESIGN.md principle 3).
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from smolforge.errors import SmolforgeError

IGNORE_INDEX = -100  # the label cross-entropy skips (same value as train.objectives)
PACKING_STRATEGIES = ("none", "bfd", "wrapped")
DEFAULT_PACKING = "none"  # playbook ch. 07: no packing for the SFT baseline on small sets


class PackingError(SmolforgeError, ValueError):
    """A bad example or packing setting; the message names the example index."""


@dataclass
class PackedRow:
    """One row of exactly `max_length` tokens holding one or more documents.

    `labels` are shifted (labels[t] is the target for position t) and -100 on padding and on
    the last token of every document whose example ends there. `example_indices` lists the
    examples with tokens in this row, in row order (in `wrapped` rows an example may appear
    in several rows).
    """

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]
    document_ids: list[int]
    n_real_tokens: int
    example_indices: list[int] = field(default_factory=list)

    @property
    def n_documents(self) -> int:
        return self.document_ids[self.n_real_tokens - 1] + 1 if self.n_real_tokens else 0


def shift_labels(labels: Sequence[int]) -> list[int]:
    """Unshifted -> shifted: out[t] = labels[t + 1], and the last one is -100."""
    return [*labels[1:], IGNORE_INDEX] if len(labels) else []


def _check_strategy(strategy: str) -> None:
    if strategy not in PACKING_STRATEGIES:
        raise PackingError(f"unknown packing strategy {strategy!r}; valid ones: "
                           f"{', '.join(PACKING_STRATEGIES)}")


def _check_max_length(max_length: int) -> None:
    if max_length < 1:
        raise PackingError(f"packing max_length must be positive, got {max_length}")


def _check_fit(index: int, length: int, max_length: int) -> None:
    if length < 1:
        raise PackingError(f"example {index} is empty: drop it before packing")
    if length > max_length:
        raise PackingError(
            f"example {index} has {length} tokens, more than max_length {max_length}: "
            f"truncate or drop it before packing (whole-example packing never splits one)")


def _best_fit_decreasing(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Bins of example indices, by best-fit decreasing.

    Items go in order of decreasing length (ties: lower index first) into the open bin with the
    least room that still fits (ties: the bin opened first), else into a new bin. Rooms are
    integers in [0, max_length), so open bins are grouped by room: a sorted list of the
    distinct rooms (at most max_length entries, so its inserts stay cheap) and a heap of bin
    ids per room. Each item costs a bisect and two heap operations: O(n log n) overall.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    rooms: list[int] = []  # sorted distinct rooms of open bins
    by_room: dict[int, list[int]] = {}  # room -> heap of bin ids

    for i in order:
        n = lengths[i]
        k = bisect.bisect_left(rooms, n)
        if k == len(rooms):
            b, room = len(bins), max_length - n
            bins.append([i])
        else:
            old = rooms[k]
            heap = by_room[old]
            b = heapq.heappop(heap)
            if not heap:
                del by_room[old]
                rooms.pop(k)
            bins[b].append(i)
            room = old - n
        if room == 0:
            continue  # a full bin never takes another item (lengths are >= 1)
        if room not in by_room:
            by_room[room] = []
            bisect.insort(rooms, room)
        heapq.heappush(by_room[room], b)
    return bins


def plan_rows(lengths: Sequence[int], max_length: int, strategy: str) -> list[list[int]]:
    """Example indices per row for whole-example strategies (`none`, `bfd`).

    `wrapped` splits examples, so it has no plan of whole examples: use `pack_examples`.
    """
    _check_strategy(strategy)
    _check_max_length(max_length)
    if strategy == "wrapped":
        raise PackingError("plan_rows covers 'none' and 'bfd' only: 'wrapped' splits examples, "
                           "use pack_examples")
    for i, n in enumerate(lengths):
        _check_fit(i, n, max_length)
    if strategy == "none":
        return [[i] for i in range(len(lengths))]
    return _best_fit_decreasing(lengths, max_length)


def _validate(examples: Sequence[tuple[Sequence[int], Sequence[int]]], offset: int = 0) -> None:
    for i, (input_ids, labels) in enumerate(examples, start=offset):
        if len(input_ids) != len(labels):
            raise PackingError(f"example {i} has {len(input_ids)} input_ids but {len(labels)} "
                               f"labels: they must be the same length")


class _RowBuilder:
    """Appends documents to one row, then pads it to max_length."""

    def __init__(self, max_length: int) -> None:
        self.max_length = max_length
        self.input_ids: list[int] = []
        self.labels: list[int] = []
        self.position_ids: list[int] = []
        self.document_ids: list[int] = []
        self.example_indices: list[int] = []

    def __len__(self) -> int:
        return len(self.input_ids)

    def add(self, index: int, input_ids: Sequence[int], shifted: Sequence[int]) -> None:
        document = self.document_ids[-1] + 1 if self.document_ids else 0
        self.input_ids.extend(input_ids)
        self.labels.extend(shifted)
        self.position_ids.extend(range(len(input_ids)))
        self.document_ids.extend([document] * len(input_ids))
        self.example_indices.append(index)

    def finish(self, pad_id: int) -> PackedRow:
        real, pad = len(self.input_ids), self.max_length - len(self.input_ids)
        # Padding continues the last document (same id, next positions): see the module
        # docstring; a one-document row then takes model_inputs' unmasked fast path.
        last_pos = self.position_ids[-1] if real else -1
        document = self.document_ids[-1] if real else 0
        return PackedRow(
            input_ids=self.input_ids + [pad_id] * pad,
            labels=self.labels + [IGNORE_INDEX] * pad,
            position_ids=self.position_ids + list(range(last_pos + 1, last_pos + 1 + pad)),
            document_ids=self.document_ids + [document] * pad,
            n_real_tokens=real,
            example_indices=self.example_indices,
        )


def _pack_wrapped(examples: Sequence[tuple[Sequence[int], Sequence[int]]], max_length: int,
                  pad_id: int) -> list[PackedRow]:
    rows: list[PackedRow] = []
    row = _RowBuilder(max_length)
    for i, (input_ids, labels) in enumerate(examples):
        # Shift before cutting, so the token before a cut still predicts the one after it.
        shifted = shift_labels(labels)
        start = 0
        while start < len(input_ids):
            take = min(len(input_ids) - start, max_length - len(row))
            row.add(i, input_ids[start:start + take], shifted[start:start + take])
            start += take
            if len(row) == max_length:
                rows.append(row.finish(pad_id))
                row = _RowBuilder(max_length)
    if len(row):
        rows.append(row.finish(pad_id))
    return rows


def pack_examples(examples: Sequence[tuple[Sequence[int], Sequence[int]]], max_length: int,
                  strategy: str, pad_id: int) -> list[PackedRow]:
    """Pack (input_ids, unshifted labels) pairs into rows of exactly `max_length` tokens.

    `none` and `bfd` keep every example whole and raise on one longer than max_length
    (truncation is the caller's job); `wrapped` splits examples at row ends. Rows of `none` and
    `wrapped` follow the example order; `bfd` rows follow the packing plan (longest first).
    """
    _check_strategy(strategy)
    _check_max_length(max_length)
    _validate(examples)
    if strategy == "wrapped":
        for i, (input_ids, _) in enumerate(examples):
            if not len(input_ids):
                raise PackingError(f"example {i} is empty: drop it before packing")
        return _pack_wrapped(examples, max_length, pad_id)
    plan = plan_rows([len(ids) for ids, _ in examples], max_length, strategy)
    return [pack_row(examples, members, max_length, pad_id) for members in plan]


def pack_row(examples: Sequence[tuple[Sequence[int], Sequence[int]]], indices: Sequence[int],
             max_length: int, pad_id: int) -> PackedRow:
    """One row holding the whole examples `indices` (one entry of a `plan_rows` plan).

    For lazy loading: `pack_examples` builds every row up front, which for a large set in
    `none` mode is mostly padding held as Python lists (4 x max_length ints per row); a loader
    can keep only the plan and build each batch's rows when it needs them.
    """
    row = _RowBuilder(max_length)
    for i in indices:
        input_ids, labels = examples[i]
        if len(input_ids) != len(labels):
            _validate([examples[i]], offset=i)
        if len(row) + len(input_ids) > max_length:
            raise PackingError(f"example {i} ({len(input_ids)} tokens) does not fit in the row: "
                               f"examples {list(indices)} exceed max_length {max_length}")
        row.add(i, input_ids, shift_labels(labels))
    return row.finish(pad_id)


def collate(rows: Sequence[PackedRow]) -> dict[str, torch.Tensor]:
    """(B, max_length) int64 tensors with PretrainLoader's keys, ready for `model_inputs`."""
    if not rows:
        raise PackingError("collate needs at least one row")
    widths = {len(r.input_ids) for r in rows}
    if len(widths) != 1:
        raise PackingError(f"rows of different lengths {sorted(widths)} cannot share a batch: "
                           f"pack them with one max_length")
    return {key: torch.tensor([getattr(r, key) for r in rows], dtype=torch.int64)
            for key in ("input_ids", "labels", "position_ids", "document_ids")}


def padding_fraction(rows: Sequence[PackedRow]) -> float:
    """Pad tokens / all row tokens (0.0 for no rows)."""
    total = sum(len(r.input_ids) for r in rows)
    return (total - sum(r.n_real_tokens for r in rows)) / total if total else 0.0


def count_trained(examples: Sequence[tuple[Sequence[int], Sequence[int]]]) -> int:
    """Trained tokens that survive packing: labelled tokens with a predecessor (i >= 1)."""
    return sum(sum(1 for y in labels[1:] if y != IGNORE_INDEX) for _, labels in examples)


def packing_stats(rows: Sequence[PackedRow]) -> dict[str, float]:
    """Numbers worth logging once per run: rows, tokens, padding, documents per row."""
    n = len(rows)
    return {
        "rows": n,
        "real_tokens": sum(r.n_real_tokens for r in rows),
        "trained_tokens": sum(sum(1 for y in r.labels if y != IGNORE_INDEX) for r in rows),
        "padding_fraction": padding_fraction(rows),
        "documents_per_row": sum(r.n_documents for r in rows) / n if n else 0.0,
    }
