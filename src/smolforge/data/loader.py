"""The pretraining data loader: a weighted mixture of token-shard sets, cut into windows.

Playbook ch. 06: the loader's memory must not grow with the step count (the nanosets bug), so
each source is a memory-mapped token stream and the only state is a few counters; windows are
shuffled at the sequence level with a new permutation every epoch. Ch. 04: documents are
packed back to back (each ends with EOS) and attention stays inside a document: the loader
returns `position_ids` that restart after every EOS and `document_ids` for the mask.

Windows: a source of N tokens holds (N - 1) // T windows of T + 1 tokens with stride T, so
window i covers tokens [i*T, i*T + T + 1): inputs are its first T tokens, labels its last T.

Determinism: the source of global sample k is drawn from a generator seeded by (seed, k // B)
(B = a fixed block size, so it never depends on batch size or world size), and that source
hands out its next window from a permutation seeded by (seed, source index, epoch). Rank r of
N takes samples k = r, r + N, ... so N processes see the same global order as one. Every rank
walks every global sample (counters only, no reads) so all ranks hold the same state.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from smolforge.data.shards import TokenShards
from smolforge.errors import SmolforgeError

STATE_VERSION = 1
_MIX_BLOCK = 4096  # uniforms drawn per generator for the source choice; part of the order
_MIX_STREAM = 0x6D6978  # keeps the mixture generator apart from the per-source permutations


@dataclass
class SourceSpec:
    """One shard set of the mixture; `weight` is its share of training tokens."""

    shards: TokenShards | str | Path
    weight: float = 1.0
    name: str = ""


class _Source:
    """One token stream cut into windows of seq_len + 1 tokens with stride seq_len."""

    def __init__(self, spec: SourceSpec, seq_len: int, index: int, seed: int) -> None:
        self.shards = spec.shards if isinstance(spec.shards, TokenShards) else TokenShards(spec.shards)
        self.name = spec.name or _default_name(self.shards.directory)
        self.weight = float(spec.weight)
        self.seq_len, self.index, self.seed = seq_len, index, seed
        self.windows = (self.shards.tokens - 1) // seq_len
        if self.windows < 1:
            raise SmolforgeError(
                f"source '{self.name}' ({self.shards.directory}) has {self.shards.tokens} tokens, fewer "
                f"than one sequence of seq_len + 1 = {seq_len + 1}: add data or lower data.seq_len")
        self._epoch, self._order = -1, np.empty(0, dtype=np.int64)

    def window(self, i: int) -> np.ndarray:
        return self.shards.read(i * self.seq_len, self.seq_len + 1)

    def shuffled_window(self, count: int) -> np.ndarray:
        """The `count`-th window this source hands out (0-based), across epochs."""
        epoch, offset = divmod(count, self.windows)
        if epoch != self._epoch:
            # One permutation per epoch: O(windows) memory, constant over steps. int32 halves it
            # for any source under 2**31 windows (~4T tokens at seq_len 2048).
            order = np.random.default_rng((self.seed, self.index, epoch)).permutation(self.windows)
            self._order = order.astype(np.int32) if self.windows < 2**31 else order
            self._epoch = epoch
        return self.window(int(self._order[offset]))


def _default_name(directory: Path) -> str:
    # `data tokenize --val-fraction` writes OUT/train and OUT/val: name those after OUT.
    if directory.name in ("train", "val") and directory.parent.name:
        return f"{directory.parent.name}/{directory.name}"
    return directory.name or str(directory)


def positions_and_documents(tokens: np.ndarray, eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Position ids restarting after each EOS, and a document index per token (per row).

    A token right after an EOS starts a new document; the first token of a row is position 0
    of document 0 even when its document began in an earlier window.
    """
    starts = np.zeros(tokens.shape, dtype=bool)
    starts[..., 1:] = tokens[..., :-1] == eos_id
    document_ids = np.cumsum(starts, axis=-1, dtype=np.int64)
    index = np.broadcast_to(np.arange(tokens.shape[-1], dtype=np.int64), tokens.shape)
    last_start = np.maximum.accumulate(np.where(starts, index, 0), axis=-1)
    return index - last_start, document_ids


def model_inputs(batch: dict[str, torch.Tensor], device: torch.device,
                 document_masking: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(the batch on `device`, the forward's keyword arguments besides input_ids).

    Every tensor crosses to the device once. The document mask is passed only when a row really
    holds several documents, checked on the host copy so that no device sync is needed:
    single-document batches take the plain causal attention path, which is faster."""
    packed = document_masking and bool(batch["document_ids"][:, -1].any())
    on_device = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    kwargs = {k: on_device[k] for k in ("position_ids", "document_ids")} if packed else {}
    return on_device, kwargs


class PretrainLoader:
    """Batches of packed windows from a weighted mixture of token-shard sets.

    `next_batch()` returns `input_ids`, `labels` (the next tokens), `position_ids` and
    `document_ids`, all (batch_size, seq_len) int64 tensors on the CPU.
    """

    def __init__(self, sources: list[SourceSpec], seq_len: int, batch_size: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1) -> None:
        if not sources:
            raise SmolforgeError("no data sources given: list at least one directory written by "
                                 "`smolforge data tokenize`")
        if seq_len < 1 or batch_size < 1:
            raise SmolforgeError(f"seq_len and batch_size must be positive, got {seq_len} and {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise SmolforgeError(f"rank {rank} is outside world_size {world_size}")
        self.sources = [_Source(s, seq_len, i, seed) for i, s in enumerate(sources)]
        self._dedupe_names()
        self.eos_id = self._common_eos()
        weights = np.array([s.weight for s in self.sources], dtype=np.float64)
        if not np.isfinite(weights).all() or (weights < 0).any() or weights.sum() <= 0:
            raise SmolforgeError(f"source weights must be finite, >= 0 and not all 0, got "
                                 f"{dict(zip(self.names, weights.tolist()))}")
        self.probs = weights / weights.sum()
        self._cdf = np.cumsum(self.probs)
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.tokens_per_batch = batch_size * seq_len  # this rank's input tokens per batch
        self.sample = 0  # global samples consumed (all ranks)
        self.counts = [0] * len(self.sources)  # windows handed out per source (all ranks)
        self._block, self._block_choices = -1, np.empty(0, dtype=np.int64)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sources]

    def _dedupe_names(self) -> None:
        seen: dict[str, int] = {}
        for source in self.sources:
            seen[source.name] = seen.get(source.name, 0) + 1
            if seen[source.name] > 1:
                source.name = f"{source.name}#{seen[source.name]}"

    def _common_eos(self) -> int:
        eos = {s.shards.eos_id for s in self.sources}
        prints = {s.shards.manifest.get("tokenizer_fingerprint") for s in self.sources} - {None}
        if len(eos) != 1 or len(prints) > 1:
            listing = ", ".join(f"{s.name}: {s.shards.manifest.get('tokenizer_dir', '?')}" for s in self.sources)
            raise SmolforgeError(f"the sources were tokenized with different tokenizers ({listing}): "
                                 f"tokenize them all with the same one")
        return eos.pop()

    # --- the global order -------------------------------------------------------------------

    def _source_of(self, k: int) -> int:
        """Source of global sample k: a function of (seed, k) only."""
        if len(self.sources) == 1:
            return 0
        block, offset = divmod(k, _MIX_BLOCK)
        if block != self._block:
            u = np.random.default_rng((self.seed, _MIX_STREAM, block)).random(_MIX_BLOCK)
            choices = np.searchsorted(self._cdf, u, side="right")
            self._block_choices = np.minimum(choices, len(self.sources) - 1)
            self._block = block
        return int(self._block_choices[offset])

    def _batch(self, rows: list[np.ndarray]) -> dict[str, torch.Tensor]:
        windows = np.stack(rows).astype(np.int64)
        inputs = np.ascontiguousarray(windows[:, :-1])
        labels = np.ascontiguousarray(windows[:, 1:])
        positions, documents = positions_and_documents(inputs, self.eos_id)
        return {"input_ids": torch.from_numpy(inputs), "labels": torch.from_numpy(labels),
                "position_ids": torch.from_numpy(positions), "document_ids": torch.from_numpy(documents)}

    def next_batch(self) -> dict[str, torch.Tensor]:
        # One global batch = batch_size * world_size samples; every rank walks all of them so
        # all ranks end the call with the same state (any rank's state_dict resumes every rank).
        rows = []
        for _ in range(self.batch_size * self.world_size):
            source = self._source_of(self.sample)
            if self.sample % self.world_size == self.rank:
                rows.append(self.sources[source].shuffled_window(self.counts[source]))
            self.counts[source] += 1
            self.sample += 1
        return self._batch(rows)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            yield self.next_batch()

    # --- resuming ---------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Counters only (JSON-serialisable, constant size): enough to resume exactly."""
        return {"version": STATE_VERSION, "sample": self.sample, "counts": list(self.counts),
                "seed": self.seed, "world_size": self.world_size, "names": self.names,
                "windows": [s.windows for s in self.sources]}

    def load_state_dict(self, state: dict) -> None:
        counts = state.get("counts")
        if not isinstance(counts, list) or "sample" not in state:
            raise SmolforgeError("the saved data-loader state is not one written by PretrainLoader.state_dict()")
        if len(counts) != len(self.sources):
            raise SmolforgeError(f"the saved data position has {len(counts)} sources but the "
                                 f"recipe lists {len(self.sources)}: resume with the same data.train")
        if "seed" in state and int(state["seed"]) != self.seed:
            raise SmolforgeError(f"the saved data position was made with seed {state['seed']} but this run "
                                 f"uses seed {self.seed}: resume with the same run.seed")
        windows = state.get("windows")
        if windows is not None and list(windows) != [s.windows for s in self.sources]:
            changed = [s.name for s, w in zip(self.sources, windows) if w != s.windows]
            raise SmolforgeError(f"the data of source(s) {', '.join(changed)} changed since the checkpoint "
                                 f"(window counts {windows} now {[s.windows for s in self.sources]}, "
                                 f"or data.seq_len changed): resume with the same data and seq_len")
        sample, counts = int(state["sample"]), [int(c) for c in counts]
        if sum(counts) != sample or min(counts) < 0:
            raise SmolforgeError(f"the saved data position is inconsistent (sample {sample}, counts {counts})")
        self.sample, self.counts = sample, counts

    def manifest(self) -> list[dict]:
        """What identifies the data in smolforge.json: each source's weight and shard manifest."""
        return [{"weight": s.weight, **s.shards.manifest} for s in self.sources]

    def epochs_seen(self) -> dict[str, float]:
        """Epochs of each source consumed so far (all ranks), for logging."""
        return {s.name: c / s.windows for s, c in zip(self.sources, self.counts)}

    # --- validation -------------------------------------------------------------------------

    def eval_batches(self) -> int:
        """Number of batches in a full `iter_eval` pass (all ranks together)."""
        return math.ceil(sum(s.windows for s in self.sources) / self.batch_size)

    def iter_eval(self, max_batches: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """Every window of every source, in order, in batches (the last may be smaller).

        Deterministic and independent of the training position. With world_size > 1, rank r
        takes batches r, r + world_size, ... so the ranks together make one full pass;
        `max_batches` counts batches over all ranks.
        """
        limit = self.eval_batches() if max_batches is None else min(max_batches, self.eval_batches())
        rows: list[np.ndarray] = []
        batch_index = 0

        def windows() -> Iterator[tuple[_Source, int]]:
            for source in self.sources:
                for i in range(source.windows):
                    yield source, i

        for n, (source, i) in enumerate(windows()):
            if batch_index >= limit:
                return
            if batch_index % self.world_size == self.rank:
                rows.append(source.window(i))
            if (n + 1) % self.batch_size == 0:
                if rows:
                    yield self._batch(rows)
                rows, batch_index = [], batch_index + 1
        if rows and batch_index < limit:
            yield self._batch(rows)
