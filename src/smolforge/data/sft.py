"""SFT data: conversations read from files, converted, rendered with a chat template, mixed.

The pipeline, each step one function:
1. `read_conversations`: records from .jsonl / .json / .parquet (`iter_records`), converted from
   Alpaca (`instruction`, `input`, `output`), ShareGPT (`conversations: [{from, value}]`) or
   prompt/completion (strings or message lists) into the messages format (DESIGN.md "Data
   formats"); `format: auto` decides per record from its keys. Errors name file, line and field.
2. `render_source`: every conversation through the chat template (`chat.render_for_training`)
   into token ids and labels that are -100 outside assistant output; over-long ones are cut,
   dropped or refused (`data.truncation`). Template warnings (an assistant turn with no trained
   token, a field the template drops) are gathered per source and reported once with a count
   and the first locations, never per example and never silently.
3. `mix_sources`: sources weighted by **tokens**, not examples (playbook ch. 07: a source of long
   reasoning traces would otherwise dominate), by repeating or subsampling whole conversations
   in a seeded order.
4. `SFTLoader`: rows from `packing.pack_examples` (none / bfd / wrapped), reshuffled each epoch,
   served as micro-batches with the same keys as pretraining batches, so the one training loop
   runs both stages.
"""

from __future__ import annotations

import hashlib
import math
import random
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from smolforge.chat.render import IGNORE_INDEX, load_template, render_for_training
from smolforge.data.packing import PackedRow, collate, pack_examples, pack_row, plan_rows
from smolforge.data.sources import ReadStats, expand_paths, iter_records
from smolforge.errors import SmolforgeError

FORMATS = ("auto", "messages", "alpaca", "sharegpt", "prompt_completion")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "model": "assistant", "chatgpt": "assistant", "system": "system", "tool": "tool",
                  "function": "tool", "observation": "tool"}
SHOWN_LOCATIONS = 3  # locations listed per warning kind; the count covers the rest


@dataclass
class Conversation:
    messages: list[dict[str, Any]]
    chat_template_kwargs: dict[str, Any]
    location: str  # file:line, for every later message about this conversation


@dataclass
class SFTExample:
    input_ids: list[int]
    labels: list[int]  # unshifted: labels[i] == input_ids[i] where trained, else -100
    location: str
    cut_tokens: int = 0  # tokens removed by truncation


@dataclass
class SourceData:
    """One source after rendering, with what happened on the way (for `data check` and logs)."""

    name: str
    weight: float | None
    examples: list[SFTExample]
    read: ReadStats = field(default_factory=ReadStats)
    dropped: int = 0  # over-long conversations dropped (truncation: drop)
    truncated: int = 0  # over-long conversations cut (truncation: truncate)
    warnings: dict[str, list[str]] = field(default_factory=dict)  # message -> locations

    @property
    def tokens(self) -> int:
        return sum(len(e.input_ids) for e in self.examples)


# ---- 1. records -> conversations ---------------------------------------------------------------


def _bad(location: str, field_name: str, problem: str) -> SmolforgeError:
    return SmolforgeError(f"{location} field '{field_name}': {problem}")


def _string(record: dict, key: str, location: str, required: bool = True) -> str | None:
    value = record.get(key)
    if value is None:
        if required:
            raise _bad(location, key, f"missing (the record's keys: {', '.join(sorted(record)) or 'none'})")
        return None
    if not isinstance(value, str):
        raise _bad(location, key, f"must be a string, got {type(value).__name__}")
    return value


def detect_format(record: dict) -> str:
    """The format a record is in, from its keys (None-free detection for `format: auto`)."""
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    return ""


def _turns(value: Any, role: str, location: str, key: str) -> list[dict[str, Any]]:
    """A prompt/completion side: a string (one `role` message) or a list of messages."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list):
        return value
    raise _bad(location, key, f"must be a string or a list of messages, got {type(value).__name__}")


def to_conversation(record: Any, location: str, fmt: str = "auto") -> Conversation:
    """One record of any supported format as a Conversation; errors name the location and field."""
    if not isinstance(record, dict):
        raise SmolforgeError(f"{location}: expected a JSON object, got {type(record).__name__}")
    kind = detect_format(record) if fmt == "auto" else fmt
    if not kind:
        raise SmolforgeError(f"{location}: cannot tell the format from the keys "
                             f"({', '.join(sorted(record)) or 'none'}); expected messages, "
                             f"conversations (ShareGPT), instruction+output (Alpaca) or prompt+completion")
    kwargs = record.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise _bad(location, "chat_template_kwargs", f"must be an object, got {type(kwargs).__name__}")
    if kind == "messages":
        messages = record.get("messages")
        if not isinstance(messages, list):
            raise _bad(location, "messages", f"must be a list of messages, got {type(messages).__name__}")
    elif kind == "alpaca":
        instruction = _string(record, "instruction", location)
        extra = _string(record, "input", location, required=False)
        prompt = f"{instruction}\n\n{extra}" if extra else instruction
        system = _string(record, "system", location, required=False)
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": _string(record, "output", location)}]
    elif kind == "sharegpt":
        turns = record.get("conversations")
        if not isinstance(turns, list):
            raise _bad(location, "conversations", f"must be a list, got {type(turns).__name__}")
        messages = []
        system = _string(record, "system", location, required=False)
        if system:
            messages.append({"role": "system", "content": system})
        for i, turn in enumerate(turns):
            if not isinstance(turn, dict):
                raise _bad(location, f"conversations[{i}]", "must be an object with 'from' and 'value'")
            speaker = turn.get("from")
            if speaker not in SHAREGPT_ROLES:
                raise _bad(location, f"conversations[{i}].from",
                           f"unknown speaker {speaker!r}; known: {', '.join(SHAREGPT_ROLES)}")
            messages.append({"role": SHAREGPT_ROLES[speaker], "content": turn.get("value")})
    elif kind == "prompt_completion":
        messages = (_turns(record.get("prompt"), "user", location, "prompt")
                    + _turns(record.get("completion"), "assistant", location, "completion"))
    else:
        raise SmolforgeError(f"{location}: unknown format {kind!r}; choose one of {', '.join(FORMATS)}")
    return Conversation(messages=messages, chat_template_kwargs=kwargs, location=location)


def read_conversations(paths: Sequence[str | Path], fmt: str = "auto", stats: ReadStats | None = None,
                       skip_invalid: bool = False) -> Iterator[Conversation]:
    """Every conversation of every file `paths` expands to; bad records raise (or are counted)."""
    for path in expand_paths(paths):
        for location, record in iter_records(path, stats, skip_invalid):
            try:
                conversation = to_conversation(record, location, fmt)
            except SmolforgeError:
                if not skip_invalid:
                    raise
                if stats is not None:
                    stats.skipped += 1
                continue
            if stats is not None:
                stats.documents += 1
            yield conversation


# ---- 2. conversations -> token ids and labels ----------------------------------------------------


def resolve_template(name: str, tokenizer: Any) -> str:
    """`auto` = the tokenizer's own template when it has one, else smolforge's smollm3 template."""
    if name == "auto":
        name = "tokenizer" if getattr(tokenizer, "chat_template", None) else "smollm3"
    return load_template(name, tokenizer)


def render_conversation(conversation: Conversation, tokenizer: Any, template: str,
                        kwargs: dict[str, Any], collect: dict[str, list[str]]) -> SFTExample:
    """Render one conversation; template warnings are added to `collect` under its location."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            rendered = render_for_training(tokenizer, conversation.messages, template,
                                           **{**kwargs, **conversation.chat_template_kwargs})
        except SmolforgeError as exc:
            raise SmolforgeError(f"{conversation.location} {exc}") from None
    for warning in caught:
        collect.setdefault(str(warning.message), []).append(conversation.location)
    return SFTExample(rendered.input_ids, rendered.labels, conversation.location)


def fit_length(example: SFTExample, seq_len: int, truncation: str) -> SFTExample | None:
    """An example within `seq_len`: as is, cut (`truncate`), None (`drop`) or an error (`error`).

    A cut that leaves no trained token also gives None: the example is dropped and counted.
    """
    excess = len(example.input_ids) - seq_len
    if excess <= 0:
        return example
    if truncation == "error":
        raise SmolforgeError(f"{example.location}: the conversation is {len(example.input_ids)} tokens, "
                             f"over data.seq_len={seq_len}; raise seq_len or set data.truncation to "
                             f"truncate or drop")
    if truncation == "drop":
        return None
    labels = example.labels[:seq_len]
    if all(label == IGNORE_INDEX for label in labels):
        return None  # the cut removed every trained token: nothing left to learn from
    return SFTExample(example.input_ids[:seq_len], labels, example.location, excess)


def render_source(source: Any, tokenizer: Any, template: str, seq_len: int, truncation: str,
                  kwargs: dict[str, Any] | None = None, skip_invalid: bool = False) -> SourceData:
    """Read and render one `SFTSourceConfig`; nothing is printed, everything is counted."""
    data = SourceData(name=source.name or Path(source.path).stem, weight=source.weight, examples=[])
    merged = {**(kwargs or {}), **source.chat_template_kwargs}
    for conversation in read_conversations([source.path], source.format, data.read, skip_invalid):
        example = render_conversation(conversation, tokenizer, template, merged, data.warnings)
        fitted = fit_length(example, seq_len, truncation)
        if fitted is None:
            data.dropped += 1
            continue
        data.truncated += fitted.cut_tokens > 0
        data.examples.append(fitted)
    if not data.examples:
        raise SmolforgeError(f"{source.path}: no usable conversation ({data.read.skipped} skipped as "
                             f"invalid, {data.dropped} dropped as longer than data.seq_len={seq_len})")
    return data


def report_warnings(data: SourceData) -> None:
    """One warning per kind of template problem, with its count and first locations."""
    for message, locations in data.warnings.items():
        shown = ", ".join(locations[:SHOWN_LOCATIONS])
        more = f" and {len(locations) - SHOWN_LOCATIONS} more" if len(locations) > SHOWN_LOCATIONS else ""
        warnings.warn(f"{data.name}: {len(locations)} conversation(s): {message} (at {shown}{more})",
                      stacklevel=2)


# ---- 3. mixing by tokens --------------------------------------------------------------------------


def split_validation(examples: list[SFTExample], fraction: float, seed: int) -> tuple[list, list]:
    """(train, val) with `fraction` of the examples (at least one, if any) held out, seeded."""
    if fraction <= 0 or len(examples) < 2:
        return examples, []
    order = random.Random(seed).sample(range(len(examples)), len(examples))
    n_val = max(1, round(fraction * len(examples)))
    held = set(order[:n_val])
    return ([e for i, e in enumerate(examples) if i not in held],
            [e for i, e in enumerate(examples) if i in held])


def mix_sources(sources: Sequence[SourceData], seed: int) -> tuple[list[SFTExample], dict[str, float]]:
    """One epoch of the mixture and each source's epochs per mixture epoch.

    Without weights every example appears once. With weights, source i supplies a share
    w_i / sum(w) of the total token count, taking whole conversations in a seeded order and
    starting over when it runs out (so a small source is repeated, a large one subsampled).
    """
    weights = [s.weight for s in sources]
    if all(w is None for w in weights):
        return [e for s in sources for e in s.examples], {s.name: 1.0 for s in sources}
    if any(w is None for w in weights):
        missing = [s.name for s in sources if s.weight is None]
        raise SmolforgeError(f"data.train: set weight on every source or on none (missing on "
                             f"{', '.join(missing)})")
    total_tokens = sum(s.tokens for s in sources)
    total_weight = sum(weights)
    mixture: list[SFTExample] = []
    epochs: dict[str, float] = {}
    rng = random.Random(seed)
    for source, weight in zip(sources, weights):
        target = total_tokens * weight / total_weight
        order = rng.sample(range(len(source.examples)), len(source.examples))
        taken = 0
        i = 0
        while taken < target:
            example = source.examples[order[i % len(order)]]
            if taken + len(example.input_ids) / 2 > target:  # stop where the total is closest
                break
            mixture.append(example)
            taken += len(example.input_ids)
            i += 1
        epochs[source.name] = taken / max(source.tokens, 1)
    return mixture, epochs


# ---- 4. batches ----------------------------------------------------------------------------------


class EpochLoader:
    """The epoch bookkeeping shared by SFT and preference loaders (subclasses give `__len__` and
    `_batch(indices)`).

    Items are reshuffled every epoch with a seed derived from (seed, epoch); the state is two
    counters, so a resumed run continues with the exact batches it would have seen.

    Under torchrun (`world_size` > 1) `batch_size` is this rank's share: each call walks the
    global micro-batch of `batch_size x world_size` items, the one a single process would take,
    and keeps items rank, rank + world_size, ... (as `PretrainLoader` does). The counters stay
    global, the same on every rank, so a checkpoint from any rank resumes any number of ranks.
    """

    def __init__(self, batch_size: int, seed: int, manifest: list[dict[str, Any]] | None,
                 rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.batch_size, self.seed = batch_size, seed
        self.rank, self.world_size = rank, world_size
        self._manifest = manifest or []
        self.epoch, self.position = 0, 0
        self._order = self._shuffled(0)

    def __len__(self) -> int:
        raise NotImplementedError

    def _batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _shuffled(self, epoch: int) -> list[int]:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self)).tolist()

    def next_batch(self) -> dict[str, torch.Tensor]:
        picked = []
        while len(picked) < self.batch_size * self.world_size:
            if self.position == len(self._order):
                self.epoch += 1
                self.position = 0
                self._order = self._shuffled(self.epoch)
            picked.append(self._order[self.position])
            self.position += 1
        return self._batch(picked[self.rank::self.world_size])

    def steps_per_epoch(self, grad_accum: int) -> float:
        return len(self) / (self.batch_size * self.world_size * grad_accum)

    def epochs_done(self) -> float:
        return self.epoch + self.position / len(self)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._shuffled(self.epoch)

    def iter_eval(self, max_batches: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
        count = math.ceil(len(self) / self.batch_size)
        for b in range(min(count, max_batches) if max_batches else count):
            yield self._batch(range(b * self.batch_size, min((b + 1) * self.batch_size, len(self))))

    def manifest(self) -> list[dict[str, Any]]:
        return self._manifest


class SFTLoader(EpochLoader):
    """Micro-batches of packed rows: `input_ids`, shifted `labels`, `position_ids`, `document_ids`
    (the keys of pretraining batches) plus `real_tokens` (non-padding tokens per row)."""

    trim_padding = True  # cut all-padding columns per batch; benchmarks switch it off for a baseline

    def __init__(self, examples: Sequence[SFTExample], seq_len: int, batch_size: int, packing: str,
                 pad_id: int, seed: int = 0, source_epochs: dict[str, float] | None = None,
                 manifest: list[dict[str, Any]] | None = None, rank: int = 0, world_size: int = 1) -> None:
        pairs = [(e.input_ids, e.labels) for e in examples]
        try:
            if packing == "wrapped":
                rows = pack_examples(pairs, seq_len, packing, pad_id)
                self._row: Callable[[int], PackedRow] = rows.__getitem__
                self.row_tokens = [row.n_real_tokens for row in rows]
            else:
                # Whole-example rows are built per batch from the plan: held up front, `none` rows
                # would be mostly padding stored as Python lists.
                plan = plan_rows([len(ids) for ids, _ in pairs], seq_len, packing)
                self._row = lambda k: pack_row(pairs, plan[k], seq_len, pad_id)
                self.row_tokens = [sum(len(pairs[i][0]) for i in members) for members in plan]
        except ValueError as exc:
            raise SmolforgeError(f"packing ({packing}) failed: {exc}") from None
        if not self.row_tokens:
            raise SmolforgeError("no SFT examples to train on")
        self.seq_len = seq_len
        self.tokens_per_batch = batch_size * seq_len  # upper bound; real counts come per batch
        self.source_epochs = source_epochs or {}
        super().__init__(batch_size, seed, manifest, rank, world_size)

    def __len__(self) -> int:
        return len(self.row_tokens)

    @property
    def padding_fraction(self) -> float:
        """Share of the rows' seq_len slots that hold padding (before per-batch trimming)."""
        return 1 - sum(self.row_tokens) / (len(self.row_tokens) * self.seq_len)

    def _batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        rows = [self._row(k) for k in indices]
        batch = collate(rows)
        # Padding sits at the end of rows: cut the columns no row uses (dynamic padding).
        if self.trim_padding:
            used = max(row.n_real_tokens for row in rows)
            batch = {k: v[:, :used].contiguous() for k, v in batch.items()}
        batch["real_tokens"] = torch.tensor([row.n_real_tokens for row in rows], dtype=torch.int64)
        return batch

    def epochs_seen(self) -> dict[str, float]:
        return {name: self.epochs_done() * per_epoch for name, per_epoch in self.source_epochs.items()}


def source_manifest(data: SourceData, path: str) -> dict[str, Any]:
    """What identifies a source's data in smolforge.json: its files' hashes, sizes and counts."""
    digest = hashlib.sha256()
    for file in expand_paths([path]):
        digest.update(file.read_bytes())
    return {"name": data.name, "path": path, "weight": data.weight, "sha256": digest.hexdigest(),
            "examples": len(data.examples), "tokens": data.tokens}


def describe_sources(sources: Sequence[SourceData]) -> str:
    """A one-line-per-source summary printed when SFT starts."""
    lines = []
    total = sum(s.tokens for s in sources) or 1
    for s in sources:
        extra = []
        if s.read.skipped:
            extra.append(f"{s.read.skipped} invalid skipped")
        if s.truncated:
            extra.append(f"{s.truncated} truncated")
        if s.dropped:
            extra.append(f"{s.dropped} dropped as too long")
        lines.append(f"  {s.name}: {len(s.examples):,} conversations, {s.tokens:,} tokens "
                     f"({100 * s.tokens / total:.1f}%)" + (f" [{', '.join(extra)}]" if extra else ""))
    return "\n".join(lines)


def build_sft_loaders(data_cfg: Any, tokenizer: Any, batch_size: int, seed: int, rank: int = 0,
                      world_size: int = 1) -> tuple[SFTLoader, SFTLoader | None]:
    """Training and validation loaders for an `SFTDataConfig`.

    `batch_size` is the global rows per micro-batch; under torchrun the training loader serves
    this `rank`'s share of it, the validation loader stays whole (every rank evaluates all of it).

    The chat template used is also set on `tokenizer`, so the checkpoints the stage writes carry
    the template the model was trained with (chat, serving and evaluation render with it).
    """
    if not data_cfg.train:
        raise SmolforgeError("data.train is empty: list at least one file of conversations")
    template = resolve_template(data_cfg.template, tokenizer)
    tokenizer.chat_template = template

    def render(source: Any) -> SourceData:
        data = render_source(source, tokenizer, template, data_cfg.seq_len, data_cfg.truncation,
                             data_cfg.chat_template_kwargs, data_cfg.skip_invalid)
        report_warnings(data)
        return data

    sources = [render(s) for s in data_cfg.train]
    if data_cfg.val:
        val_examples = [e for v in data_cfg.val for e in render(v).examples]
    else:
        val_examples = []
        for i, source in enumerate(sources):
            source.examples, held = split_validation(source.examples, data_cfg.val_fraction, seed + i)
            val_examples += held
    mixture, epochs = mix_sources(sources, seed)
    print(describe_sources(sources))
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    manifest = [source_manifest(s, c.path) for s, c in zip(sources, data_cfg.train)]
    train = SFTLoader(mixture, data_cfg.seq_len, batch_size // world_size, data_cfg.packing, pad_id, seed,
                      source_epochs=epochs, manifest=manifest, rank=rank, world_size=world_size)
    val = (SFTLoader(val_examples, data_cfg.seq_len, batch_size, data_cfg.packing, pad_id, seed)
           if val_examples else None)
    print(f"  {len(train):,} training rows ({data_cfg.packing} packing, {100 * train.padding_fraction:.1f}% "
          f"padding), {len(val_examples):,} validation conversations")
    return train, val
