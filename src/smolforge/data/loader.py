"""The pretraining data loader: a weighted mixture of token-shard sets, cut into windows.

Playbook ch. 06: the loader's memory must not grow with the step count (the nanosets bug), so
each source is a memory-mapped token stream and the only state is a few counters; windows are
shuffled at the sequence level with a new permutation every epoch. Ch. 04: documents are
packed back to back (each ends with EOS) and attention stays inside a document: the loader
returns `position_ids` that restart after every EOS and `document_ids` for the mask.

Determinism: global sample k draws its source from a generator seeded by (seed, k), and takes
that source's next window from a per-epoch permutation seeded by (seed, source, epoch). Rank r
of N takes samples k = r, r + N, ... so N processes see the same global order as one.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from smolforge.data.shards import TokenShards
from smolforge.errors import SmolforgeError


@dataclass
class SourceSpec:
    shards: TokenShards | str | Path
    weight: float = 1.0
    name: str = ""


class _Source:
    """One token stream cut into windows of seq_len + 1 tokens with stride seq_len."""

    def __init__(self, spec: SourceSpec, seq_len: int, index: int, seed: int) -> None:
        self.shards = spec.shards if isinstance(spec.shards, TokenShards) else TokenShards(spec.shards)
        self.name = spec.name or self.shards.directory.name
        self.seq_len, self.index, self.seed = seq_len, index, seed
        self.windows = (self.shards.tokens - 1) // seq_len
        if self.windows < 1:
            raise SmolforgeError(
                f"source '{self.name}' ({self.shards.directory}) has {self.shards.tokens} tokens, fewer "
                f"than one sequence of {seq_len + 1}: add data or lower data.seq_len")
        self._epoch, self._order = -1, np.empty(0, dtype=np.int64)

    def window(self, i: int) -> np.ndarray:
        return self.shards.read(i * self.seq_len, self.seq_len + 1)

    def shuffled_window(self, count: int) -> np.ndarray:
        """The `count`-th window this source hands out (0-based), across epochs."""
        epoch, offset = divmod(count, self.windows)
        if epoch != self._epoch:
            rng = np.random.default_rng((self.seed, self.index, epoch))
            self._order, self._epoch = rng.permutation(self.windows), epoch
        return self.window(int(self._order[offset]))


def positions_and_documents(tokens: np.ndarray, eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Position ids restarting after each EOS, and a document index per token (per row)."""
    starts = np.zeros(tokens.shape, dtype=bool)
    starts[..., 1:] = tokens[..., :-1] == eos_id
    document_ids = np.cumsum(starts, axis=-1)
    index = np.broadcast_to(np.arange(tokens.shape[-1]), tokens.shape)
    last_start = np.maximum.accumulate(np.where(starts, index, 0), axis=-1)
    return index - last_start, document_ids


def model_inputs(batch: dict[str, torch.Tensor], device: torch.device,
                 document_masking: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(input_ids, forward kwargs) on `device`. The document mask is passed only when a row
    really holds several documents (checked on the host copy): single-document batches take
    the plain causal attention path, which is faster."""
    kwargs = {}
    if document_masking and bool(batch["document_ids"][:, -1].any()):
        kwargs = {"position_ids": batch["position_ids"].to(device, non_blocking=True),
                  "document_ids": batch["document_ids"].to(device, non_blocking=True)}
    return batch["input_ids"].to(device, non_blocking=True), kwargs


class PretrainLoader:
    def __init__(self, sources: list[SourceSpec], seq_len: int, batch_size: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1) -> None:
        if not sources:
            raise SmolforgeError("no data sources given")
        self.sources = [_Source(s, seq_len, i, seed) for i, s in enumerate(sources)]
        eos = {s.shards.eos_id for s in self.sources}
        if len(eos) != 1:
            raise SmolforgeError(f"sources were tokenized with different tokenizers (EOS ids {sorted(eos)}): "
                                 f"tokenize them all with the same one")
        self.eos_id = eos.pop()
        weights = np.array([s.weight for s in sources], dtype=np.float64)
        self.probs = weights / weights.sum()
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.sample = 0  # global samples consumed (all ranks)
        self.counts = [0] * len(self.sources)  # windows handed out per source (all ranks)
        self.tokens_per_batch = batch_size * seq_len

    def _source_of(self, k: int) -> int:
        if len(self.sources) == 1:
            return 0
        u = np.random.default_rng((self.seed, 1_000_003, k)).random()
        return int(min(np.searchsorted(np.cumsum(self.probs), u, side="right"), len(self.sources) - 1))

    def _batch(self, rows: list[np.ndarray]) -> dict[str, torch.Tensor]:
        windows = np.stack(rows).astype(np.int64)
        inputs, labels = windows[:, :-1], windows[:, 1:]
        positions, documents = positions_and_documents(inputs, self.eos_id)
        return {"input_ids": torch.from_numpy(np.ascontiguousarray(inputs)),
                "labels": torch.from_numpy(np.ascontiguousarray(labels)),
                "position_ids": torch.from_numpy(positions),
                "document_ids": torch.from_numpy(documents)}

    def next_batch(self) -> dict[str, torch.Tensor]:
        rows = []
        # Every rank walks all global samples (cheap counters) so that per-source counts agree.
        while len(rows) < self.batch_size:
            source = self._source_of(self.sample)
            if self.sample % self.world_size == self.rank:
                rows.append(self.sources[source].shuffled_window(self.counts[source]))
            self.counts[source] += 1
            self.sample += 1
        return self._batch(rows)

    def state_dict(self) -> dict:
        return {"sample": self.sample, "counts": list(self.counts), "seed": self.seed,
                "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        if len(state["counts"]) != len(self.sources):
            raise SmolforgeError(f"the saved data position has {len(state['counts'])} sources but the "
                                 f"recipe lists {len(self.sources)}: resume with the same data.train")
        self.sample, self.counts = int(state["sample"]), [int(c) for c in state["counts"]]

    def epochs_seen(self) -> dict[str, float]:
        return {s.name: c / s.windows for s, c in zip(self.sources, self.counts)}

    def iter_eval(self, max_batches: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """All windows of every source in order (validation); leaves training state alone."""
        rows, produced = [], 0
        for source in self.sources:
            for i in range(source.windows):
                rows.append(source.window(i))
                if len(rows) == self.batch_size:
                    yield self._batch(rows)
                    rows, produced = [], produced + 1
                    if max_batches is not None and produced >= max_batches:
                        return
        if rows:
            yield self._batch(rows)
