"""Preference data: (prompt, chosen, rejected) rendered like SFT, with reference log-probs attached.

Records (DESIGN.md "Data formats"): `{"prompt" | "messages", "chosen", "rejected"}` where the
prompt is a string (one user turn) or a list of messages, and each response is a string (one
assistant turn) or a list of assistant messages (a list that repeats the prompt first, as
conversational datasets often store it, has the prompt stripped). Both responses are rendered
after the same prompt with the chat template; only the response tokens are labelled, exactly as
SFT labels assistant output (`chat.render_for_training` spans).

Reference log-probs (the denominator of DPO's implicit reward) are computed once before training
and cached in the run directory (`reference_logps.pt`, keyed by the reference checkpoint and the
rendered data), so the reference model does not stay in memory; `data.reference: online`
keeps it and recomputes them for every batch instead (the measured trade-off is in
docs/benchmarks.md). Either way batches carry `ref_logps`, and the training loop is the SFT one.
"""

from __future__ import annotations

import hashlib
import random
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer as HFTokenizer

from smolforge.chat.render import IGNORE_INDEX, render_for_training, render_messages
from smolforge.data.packing import collate, pack_row
from smolforge.data.sft import SHOWN_LOCATIONS, EpochLoader, resolve_template
from smolforge.data.sources import ReadStats, expand_paths, iter_records
from smolforge.errors import SmolforgeError
from smolforge.train.distributed import barrier
from smolforge.train.preference import reference_logps

CACHE_FILE = "reference_logps.pt"


@dataclass
class PreferencePair:
    prompt: list[dict[str, Any]]
    chosen: list[dict[str, Any]]
    rejected: list[dict[str, Any]]
    chat_template_kwargs: dict[str, Any]
    location: str


@dataclass
class RenderedPair:
    chosen: tuple[list[int], list[int]]  # (input_ids, unshifted labels), labels only on the response
    rejected: tuple[list[int], list[int]]
    location: str


@dataclass
class PreferenceSource:
    name: str
    pairs: list[RenderedPair]
    read: ReadStats = field(default_factory=ReadStats)
    dropped: int = 0
    truncated: int = 0
    warnings: dict[str, list[str]] = field(default_factory=dict)


# ---- records -> pairs ----------------------------------------------------------------------------


def _bad(location: str, key: str, problem: str) -> SmolforgeError:
    return SmolforgeError(f"{location} field '{key}': {problem}")


def _messages(value: Any, role: str, location: str, key: str) -> list[dict[str, Any]]:
    if isinstance(value, str):
        if not value.strip():
            raise _bad(location, key, "is empty")
        return [{"role": role, "content": value}]
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        return value
    raise _bad(location, key, f"must be a non-empty string or list of messages, got {type(value).__name__}")


def to_pair(record: Any, location: str) -> PreferencePair:
    """One record as a PreferencePair; bad fields raise naming the location and field."""
    if not isinstance(record, dict):
        raise SmolforgeError(f"{location}: expected a JSON object, got {type(record).__name__}")
    key = "prompt" if "prompt" in record else "messages" if "messages" in record else None
    if key is None:
        raise SmolforgeError(f"{location} field 'prompt': missing (the record's keys: "
                             f"{', '.join(sorted(record)) or 'none'}); expected prompt or messages, "
                             f"chosen and rejected")
    prompt = _messages(record[key], "user", location, key)
    sides = {}
    for side in ("chosen", "rejected"):
        if side not in record:
            raise _bad(location, side, "missing")
        messages = _messages(record[side], "assistant", location, side)
        if messages[: len(prompt)] == prompt and len(messages) > len(prompt):
            messages = messages[len(prompt):]  # stored as the whole conversation: keep the response
        if any(m.get("role") != "assistant" for m in messages):
            raise _bad(location, side, "must hold assistant messages only (the response to the prompt)")
        sides[side] = messages
    kwargs = record.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise _bad(location, "chat_template_kwargs", f"must be an object, got {type(kwargs).__name__}")
    return PreferencePair(prompt, sides["chosen"], sides["rejected"], kwargs, location)


# ---- pairs -> token ids ---------------------------------------------------------------------------


def _response_labels(backend: HFTokenizer, rendered: Any, prompt_chars: int) -> list[int]:
    """Labels on the tokens of the generation blocks that start after the prompt's text."""
    spans = [(a, b) for a, b in rendered.spans if a >= prompt_chars]
    offsets = backend.encode(rendered.text, add_special_tokens=False).offsets
    labels = []
    for token, (start, end), label in zip(rendered.input_ids, offsets, rendered.labels):
        inside = label != IGNORE_INDEX and any(start < b and end > a for a, b in spans)
        labels.append(token if inside else IGNORE_INDEX)
    return labels


def render_pair(pair: PreferencePair, tokenizer: Any, template: str, kwargs: dict[str, Any],
                seq_len: int, truncation: str, collect: dict[str, list[str]]) -> RenderedPair | None:
    """Both sides rendered after the prompt; None when the pair cannot fit (counted by the caller)."""
    merged = {**kwargs, **pair.chat_template_kwargs}
    prompt_chars = len(render_messages(template, pair.prompt, **merged))
    sides = []
    for response in (pair.chosen, pair.rejected):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                rendered = render_for_training(tokenizer, pair.prompt + response, template, **merged)
            except SmolforgeError as exc:
                raise SmolforgeError(f"{pair.location} {exc}") from None
        for warning in caught:
            collect.setdefault(str(warning.message), []).append(pair.location)
        labels = _response_labels(tokenizer.backend, rendered, prompt_chars)
        ids = rendered.input_ids
        if len(ids) > seq_len:
            if truncation == "error":
                raise SmolforgeError(f"{pair.location}: a response is {len(ids)} tokens with its prompt, "
                                     f"over data.seq_len={seq_len}; raise seq_len or set data.truncation")
            if truncation == "drop":
                return None
            ids, labels = ids[:seq_len], labels[:seq_len]
        if sum(label != IGNORE_INDEX for label in labels[1:]) == 0:
            return None  # nothing of the response survives (prompt too long, or an empty response)
        sides.append((ids, labels))
    if sides[0] == sides[1]:
        collect.setdefault("chosen and rejected are identical (the pair teaches nothing)", []).append(pair.location)
    return RenderedPair(sides[0], sides[1], pair.location)


def render_source(source: Any, tokenizer: Any, template: str, seq_len: int, truncation: str,
                  kwargs: dict[str, Any] | None = None, skip_invalid: bool = False) -> PreferenceSource:
    data = PreferenceSource(name=source.name or Path(source.path).stem, pairs=[])
    merged = {**(kwargs or {}), **source.chat_template_kwargs}
    for path in expand_paths([source.path]):
        for location, record in iter_records(path, data.read, skip_invalid):
            try:
                pair = to_pair(record, location)
            except SmolforgeError:
                if not skip_invalid:
                    raise
                data.read.skipped += 1
                continue
            rendered = render_pair(pair, tokenizer, template, merged, seq_len, truncation, data.warnings)
            if rendered is None:
                data.dropped += 1
                continue
            data.truncated += any(len(s[0]) == seq_len for s in (rendered.chosen, rendered.rejected))
            data.pairs.append(rendered)
    if not data.pairs:
        raise SmolforgeError(f"{source.path}: no usable preference pair ({data.read.skipped} invalid, "
                             f"{data.dropped} dropped as too long for data.seq_len={seq_len})")
    for message, locations in data.warnings.items():
        more = f" and {len(locations) - SHOWN_LOCATIONS} more" if len(locations) > SHOWN_LOCATIONS else ""
        warnings.warn(f"{data.name}: {len(locations)} pair(s): {message} (at "
                      f"{', '.join(locations[:SHOWN_LOCATIONS])}{more})", stacklevel=2)
    return data


# ---- reference log-probs ---------------------------------------------------------------------------


class PreferenceLoader(EpochLoader):
    """Micro-batches of `batch_size` pairs: rows [0, B) chosen, [B, 2B) rejected, plus `ref_logps`.

    The SFT loader's epoch bookkeeping (`EpochLoader`), so the one training loop runs preference
    stages unchanged.
    """

    def __init__(self, pairs: Sequence[RenderedPair], seq_len: int, batch_size: int, pad_id: int,
                 seed: int = 0, manifest: list[dict[str, Any]] | None = None, rank: int = 0,
                 world_size: int = 1) -> None:
        if not pairs:
            raise SmolforgeError("no preference pairs to train on")
        self.pairs, self.seq_len, self.pad_id = list(pairs), seq_len, pad_id
        self.tokens_per_batch = 2 * batch_size * seq_len
        self.ref_logps: torch.Tensor | None = None  # (n_pairs, 2) when cached
        self.ref_model: torch.nn.Module | None = None  # when computed online
        self.kto = False  # add `kto_desirable` flags (the "kto" objective)
        self.device = torch.device("cpu")
        super().__init__(batch_size, seed, manifest, rank, world_size)

    def __len__(self) -> int:
        return len(self.pairs)

    def rows(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """The batch of pairs `indices` without reference log-probs."""
        examples = [self.pairs[i].chosen for i in indices] + [self.pairs[i].rejected for i in indices]
        rows = [pack_row(examples, [k], self.seq_len, self.pad_id) for k in range(len(examples))]
        batch = collate(rows)
        used = max(row.n_real_tokens for row in rows)
        batch = {k: v[:, :used].contiguous() for k, v in batch.items()}
        batch["real_tokens"] = torch.tensor([row.n_real_tokens for row in rows], dtype=torch.int64)
        batch["step_weight"] = torch.tensor(float(len(indices)))  # the loss is a mean over pairs
        if self.kto:  # KTO reads the pairs as unpaired examples: chosen desirable, rejected not
            batch["kto_desirable"] = torch.arange(2 * len(indices)) < len(indices)
        return batch

    def _batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        batch = self.rows(indices)
        if self.ref_logps is not None:
            ref = self.ref_logps[list(indices)]
            batch["ref_logps"] = torch.cat([ref[:, 0], ref[:, 1]])
        elif self.ref_model is not None:
            with torch.no_grad():
                batch["ref_logps"] = reference_logps(self.ref_model, batch["input_ids"].to(self.device),
                                                     batch["labels"].to(self.device)).cpu()
        return batch

    def epochs_seen(self) -> dict[str, float]:
        return {"pairs": self.epochs_done()}

    def fingerprint(self) -> str:
        """Hash of the rendered pairs: a cached reference must belong to exactly this data."""
        digest = hashlib.sha256()
        for pair in self.pairs:
            for ids, labels in (pair.chosen, pair.rejected):
                digest.update(np.asarray(ids, dtype=np.int64).tobytes())
                digest.update(np.asarray(labels, dtype=np.int64).tobytes())
        return digest.hexdigest()


def attach_reference(loaders: Sequence[PreferenceLoader], ref_path: str, mode: str, cache_dir: Path,
                     device: torch.device, batch_size: int) -> None:
    """Give every loader reference log-probs: cached on disk (computed once) or an online model."""
    from smolforge.train.checkpoint import load_model, read_meta

    model, _ = load_model(ref_path, device=device)
    model.eval()
    if mode == "online":
        for loader in loaders:
            loader.ref_model, loader.device = model, device
        return
    ref_id = read_meta(Path(ref_path)).get("files", {}).get("model.safetensors", {}).get("sha256", str(ref_path))
    for i, loader in enumerate(loaders):
        key = hashlib.sha256(f"{ref_id}:{loader.fingerprint()}".encode()).hexdigest()
        file = cache_dir / f"{i}-{CACHE_FILE}"
        if file.is_file():
            cached = torch.load(file, weights_only=True)
            if cached.get("key") == key:
                loader.ref_logps = cached["logps"]
                continue
        values = []
        for start in range(0, len(loader), batch_size):
            indices = range(start, min(start + batch_size, len(loader)))
            batch = loader.rows(indices)
            with torch.no_grad():
                logps = reference_logps(model, batch["input_ids"].to(device), batch["labels"].to(device)).cpu()
            values.append(torch.stack([logps[: len(indices)], logps[len(indices):]], dim=1))
        loader.ref_logps = torch.cat(values)
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = file.with_suffix(".tmp")
        torch.save({"key": key, "logps": loader.ref_logps}, tmp)
        tmp.replace(file)
    del model


def build_preference_loaders(recipe: Any, tokenizer: Any, device: torch.device, run_dir: Path, rank: int = 0,
                             world_size: int = 1) -> tuple[PreferenceLoader, PreferenceLoader | None]:
    """Training and validation loaders for a preference recipe, with reference log-probs attached.

    `train.batch_size` is the global pairs per micro-batch; under torchrun the training loader
    serves this `rank`'s share of it (see `EpochLoader`)."""
    data_cfg = recipe.data
    if not data_cfg.train:
        raise SmolforgeError("data.train is empty: list at least one file of preference pairs")
    template = resolve_template(data_cfg.template, tokenizer)
    tokenizer.chat_template = template
    sources = [render_source(s, tokenizer, template, data_cfg.seq_len, data_cfg.truncation,
                             data_cfg.chat_template_kwargs, data_cfg.skip_invalid) for s in data_cfg.train]
    train_pairs = [p for s in sources for p in s.pairs]
    if data_cfg.val:
        val_pairs = [p for v in data_cfg.val for p in render_source(
            v, tokenizer, template, data_cfg.seq_len, data_cfg.truncation, data_cfg.chat_template_kwargs,
            data_cfg.skip_invalid).pairs]
    else:
        rng = random.Random(recipe.run.seed)
        order = rng.sample(range(len(train_pairs)), len(train_pairs))
        n_val = round(data_cfg.val_fraction * len(train_pairs)) if len(train_pairs) > 1 else 0
        held = set(order[:n_val])
        val_pairs = [p for i, p in enumerate(train_pairs) if i in held]
        train_pairs = [p for i, p in enumerate(train_pairs) if i not in held]
    for s in sources:
        extra = f", {s.dropped} dropped as too long" if s.dropped else ""
        print(f"  {s.name}: {len(s.pairs):,} pairs ({s.truncated} truncated{extra})")
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    manifest = [{"name": s.name, "path": c.path, "pairs": len(s.pairs)} for s, c in zip(sources, data_cfg.train)]
    batch = recipe.train.batch_size
    train = PreferenceLoader(train_pairs, data_cfg.seq_len, batch // world_size, pad_id, recipe.run.seed, manifest,
                             rank=rank, world_size=world_size)
    val = PreferenceLoader(val_pairs, data_cfg.seq_len, batch, pad_id, recipe.run.seed) if val_pairs else None
    loaders = [loader for loader in (train, val) if loader is not None]
    for loader in loaders:
        loader.kto = recipe.train.objective == "kto"
    ref_path = data_cfg.reference_model or recipe.run.init_from
    if not ref_path and objective_needs_reference(recipe.train.objective):
        raise SmolforgeError("preference training needs a reference model: set run.init_from (the "
                             "starting checkpoint is the reference by default) or data.reference_model")
    print(f"  {len(train):,} training pairs, {len(val_pairs):,} validation pairs")
    if objective_needs_reference(recipe.train.objective):
        print(f"  reference log-probs from {ref_path} ({data_cfg.reference})")
        # Under torchrun rank 0 computes and caches the reference log-probs first; the other ranks
        # wait, then read its cache instead of racing to write the same file.
        if rank != 0:
            barrier()
        attach_reference(loaders, ref_path, data_cfg.reference, run_dir / "reference", device, 2 * batch)
        if rank == 0 and world_size > 1:
            barrier()
    return train, val


def objective_needs_reference(name: str) -> bool:
    """SimPO and ORPO are reference-free (Meng et al. 2024; Hong et al. 2024); a reward model has none."""
    return name not in ("simpo", "orpo", "reward")
