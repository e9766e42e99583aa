"""Checkpoint directories: written atomically, verified by hash, loadable by `transformers`.

A checkpoint (DESIGN.md "Artifacts") is a Hugging Face model directory (`config.json`,
`model.safetensors`, tokenizer files, `generation_config.json`) plus `smolforge.json` (stage,
parent, recipe and data hashes, metrics, and the size and sha256 of every other file) and, for
periodic checkpoints, `trainer_state.pt` (optimizer, scheduler, data position, RNG states, step).

Why the care: playbook ch. 06/08 — long runs crash, and a restart is only cheap when the last
checkpoint is known good. A checkpoint is therefore written into a temporary sibling directory
(`.tmp-<name>-<pid>`), every file fsynced, and only then moved into place. On Linux an existing
checkpoint is swapped for the new one in a single `renameat2(RENAME_EXCHANGE)`, so a crash at any
moment leaves the old or the new checkpoint at `directory`. Elsewhere two renames are used and a
crash between them leaves the old one at `.tmp-<name>-<pid>.old`, which the next save of that
name restores before doing anything else. `.tmp-*` directories are never read as checkpoints.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import re
import shutil
import sys
import warnings
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from smolforge import __version__
from smolforge.data.sources import read_json_object
from smolforge.errors import SmolforgeError
from smolforge.interop import hf
from smolforge.interop.hub import resolve_model_path
from smolforge.model import ModelConfig, Transformer

if TYPE_CHECKING:
    from smolforge.tokenizer import Tokenizer

META_FILE = "smolforge.json"
STATE_FILE = "trainer_state.pt"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
LATEST_FILE = "latest"
# Sharded training checkpoints (FSDP2) hold torch.distributed.checkpoint files here instead of
# model.safetensors; `smolforge consolidate` turns one into a normal checkpoint directory.
DCP_DIR = "dcp"
DCP_METADATA = f"{DCP_DIR}/.metadata"
SHARD_FILE = "model-{index:05d}-of-{count:05d}.safetensors"  # transformers' shard names
# Sampling defaults of the SmolLM3 release (playbook ch. 07): temperature 0.6, top-p 0.95.
GENERATION_DEFAULTS = {"do_sample": True, "temperature": 0.6, "top_p": 0.95}
# Keys every smolforge.json has; `meta` passed to save_checkpoint fills them in.
META_DEFAULTS: dict[str, Any] = {"stage": None, "parent": None, "recipe_hash": None,
                                 "data_manifest_hash": None, "step": None, "metrics": {}}


# --- file-system primitives ----------------------------------------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(directory: Path) -> None:
    """Make renames and new entries in `directory` durable (POSIX only)."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(directory: Path) -> None:
    """Flush every file of a checkpoint directory (and its `dcp/` folder) and the directories to disk."""
    for path in directory.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        elif path.is_dir():
            _fsync_dir(path)
    _fsync_dir(directory)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False if unsupported."""
    if sys.platform != "linux":
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # no libc symbol (glibc < 2.28, musl)
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False  # the file system does not support the exchange: use two renames
    raise OSError(err, os.strerror(err), str(a))


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own leftovers (an earlier failed save in this process)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _tidy_temporaries(directory: Path) -> None:
    """Restore an old checkpoint stranded by a crash between two renames; delete dead temporaries."""
    pattern = re.compile(rf"\.tmp-{re.escape(directory.name)}-(\d+)(\.old)?")
    for path in sorted(directory.parent.glob(f".tmp-{directory.name}-*")):
        match = pattern.fullmatch(path.name)
        if match is None or _pid_alive(int(match.group(1))):
            continue  # not ours, or another live process is writing it right now
        if match.group(2) and not directory.exists():
            os.replace(path, directory)
            _fsync_dir(directory.parent)
        else:
            shutil.rmtree(path, ignore_errors=True)


def _remove_dir(path: Path) -> None:
    """Delete a checkpoint so that a crash half-way never leaves a partial one under its name."""
    doomed = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


# --- one checkpoint directory ---------------------------------------------------------------------


def _write_weights(directory: Path, state: dict[str, torch.Tensor], max_shard_bytes: int | None) -> None:
    """model.safetensors, or shards of at most `max_shard_bytes` plus the index transformers reads.

    Tensors are never split, so a shard holds one tensor larger than the limit if it must.
    """
    total = sum(t.numel() * t.element_size() for t in state.values())
    if max_shard_bytes is None or total <= max_shard_bytes:
        save_file(state, directory / WEIGHTS_FILE, metadata={"format": "pt"})
        return
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        file = SHARD_FILE.format(index=i, count=len(shards))
        save_file(shard, directory / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    _write_json(directory / WEIGHTS_INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})


def save_checkpoint(directory: str | Path, model: Transformer, tokenizer: Tokenizer | None = None, *,
                    meta: dict[str, Any] | None = None, trainer_state: dict[str, Any] | None = None,
                    dtype: torch.dtype | None = None, max_shard_bytes: int | None = None,
                    generation_config: dict[str, Any] | None = None) -> Path:
    """Write a complete checkpoint at `directory`; an older one there is replaced only once complete.

    `dtype` casts floating-point weights on disk (e.g. torch.bfloat16 for a release); None keeps
    the model's. `max_shard_bytes` splits larger weights into shards with an index.
    `generation_config` replaces the default generation_config.json (e.g. an imported model's).
    Raises SmolforgeError before writing anything when no supported Hugging Face architecture
    expresses the model, or when `directory` holds something other than a checkpoint.
    """
    directory = Path(directory)
    cfg = model.config
    adapter = hf.adapter_for(cfg)  # refuse inexpressible models before touching the disk
    state = {name: t.detach().to(dtype if dtype and t.is_floating_point() else t.dtype).cpu().contiguous()
             for name, t in adapter.to_hf(model.state_dict(), cfg).items()}
    dtype_name = str(state["model.embed_tokens.weight"].dtype).removeprefix("torch.")
    return write_checkpoint_dir(directory, cfg, tokenizer, lambda tmp: _write_weights(tmp, state, max_shard_bytes),
                                meta=meta, trainer_state=trainer_state, dtype_name=dtype_name,
                                generation_config=generation_config)


def staging_dir(directory: Path) -> Path:
    """The empty temporary sibling (`.tmp-<name>-<pid>`) a checkpoint is written into, then moved.

    Raises SmolforgeError when `directory` holds something other than a checkpoint."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    _tidy_temporaries(directory)
    if directory.exists() and not (directory / META_FILE).is_file() and any(directory.iterdir()):
        raise SmolforgeError(f"{directory} exists and is not a smolforge checkpoint (no {META_FILE}); "
                             f"refusing to replace it: choose another path or remove it")
    tmp = directory.parent / f".tmp-{directory.name}-{os.getpid()}"
    tmp.mkdir()
    return tmp


def write_checkpoint_dir(directory: Path, cfg: ModelConfig, tokenizer: Tokenizer | None,
                         write_weights: Callable[[Path], None], *, meta: dict[str, Any] | None,
                         trainer_state: dict[str, Any] | None, dtype_name: str,
                         generation_config: dict[str, Any] | None = None, tmp: Path | None = None) -> Path:
    """Weights (`write_weights(tmp)`), config, tokenizer, trainer state and smolforge.json (with
    the hash of every file, `dcp/` shards included) into `tmp`, then moved to `directory` atomically.

    `tmp` is a `staging_dir(directory)` that already holds files (the shards that every rank of a
    sharded run wrote); None makes a fresh one."""
    adapter = hf.adapter_for(cfg)
    ids = hf.token_ids(tokenizer)
    tmp = tmp if tmp is not None else staging_dir(directory)
    try:
        write_weights(tmp)
        _write_json(tmp / "config.json", hf.hf_config(cfg, ids, dtype=dtype_name))
        _write_json(tmp / "generation_config.json", generation_config or {**ids, **GENERATION_DEFAULTS})
        if tokenizer is not None:
            tokenizer.save(tmp)
        if trainer_state is not None:
            torch.save(trainer_state, tmp / STATE_FILE)
        files = {p.relative_to(tmp).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
                 for p in sorted(tmp.rglob("*")) if p.is_file()}
        record = {**META_DEFAULTS, **(meta or {}), "smolforge_version": __version__,
                  "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  "architecture": adapter.architecture, "model": cfg.model_dump(), "files": files}
        _write_json(tmp / META_FILE, record)
        _fsync_tree(tmp)
        if not directory.exists():
            os.replace(tmp, directory)
        elif _exchange(tmp, directory):
            shutil.rmtree(tmp, ignore_errors=True)  # `tmp` now holds the old checkpoint
        else:
            old = tmp.with_name(tmp.name + ".old")
            os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        _fsync_dir(directory.parent)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        old = tmp.with_name(tmp.name + ".old")
        if old.exists() and not directory.exists():
            os.replace(old, directory)  # failed between the two renames: put the old one back
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            kept = "the previous checkpoint there is intact" if directory.exists() else "nothing was written"
            raise SmolforgeError(f"no space left on the device while writing checkpoint {directory}: "
                                 f"{kept}. Free space (or lower train.keep_last), then continue with "
                                 f"--resume") from None
        raise
    return directory


def read_meta(path: str | Path) -> dict[str, Any]:
    """smolforge.json of a checkpoint ({} for a plain Hugging Face model directory)."""
    file = Path(path) / META_FILE
    if not file.is_file():
        return {}
    return read_json_object(file)


def verify_checkpoint(directory: str | Path) -> None:
    """Recompute the size and sha256 of every file recorded in smolforge.json; raise on the first bad one."""
    directory = Path(directory)
    meta = read_meta(directory)
    if not meta:
        raise SmolforgeError(f"{directory} has no {META_FILE}: it is not a complete smolforge checkpoint")
    files = meta.get("files")
    if (not isinstance(files, dict) or "config.json" not in files
            or not (WEIGHTS_FILE in files or WEIGHTS_INDEX in files or DCP_METADATA in files)):
        raise SmolforgeError(f"{directory / META_FILE} does not record the checkpoint's files "
                             f"(config.json and {WEIGHTS_FILE}, {WEIGHTS_INDEX} or {DCP_METADATA}): "
                             f"the checkpoint is incomplete")
    for name, info in files.items():
        file = directory / name
        if not file.is_file():
            raise SmolforgeError(f"{file} is missing from the checkpoint")
        size = file.stat().st_size
        if size != info["size"]:
            raise SmolforgeError(f"{file} is truncated or changed: {size} bytes, {META_FILE} "
                                 f"records {info['size']}")
        if _sha256(file) != info["sha256"]:
            raise SmolforgeError(f"{file} is corrupt: its sha256 differs from the one in {META_FILE}")


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               verify: bool = True) -> tuple[Transformer, Tokenizer]:
    """(model, tokenizer) from a smolforge checkpoint, a Hugging Face model directory or a Hub id.

    Plain HF directories of a supported architecture load too (single `model.safetensors` or a
    sharded `model.safetensors.index.json`). `dtype` None keeps the stored dtype. smolforge
    checkpoints are verified against their recorded hashes first unless `verify=False`.
    """
    from smolforge.tokenizer import Tokenizer

    path = resolve_model_path(path)
    expected = (f"expected a smolforge checkpoint or a Hugging Face model directory holding config.json, "
                f"{WEIGHTS_FILE} (or {WEIGHTS_INDEX} with its shards) and tokenizer.json")
    if not path.is_dir():
        raise SmolforgeError(f"{path}: no such directory; {expected}")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise SmolforgeError(f"{path} is not a model directory (no config.json): {expected}")
    if verify and (path / META_FILE).is_file():
        verify_checkpoint(path)
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise SmolforgeError(f"{config_file}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    cfg = _recorded_config(path, hf.model_config_from_hf(config, str(config_file)))
    architecture = (config.get("architectures") or [None])[0]
    tokenizer = Tokenizer.load(path)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise SmolforgeError(f"{path}: the tokenizer has {tokenizer.vocab_size} tokens but {config_file} "
                             f"sets vocab_size={cfg.vocab_size}: ids past {cfg.vocab_size - 1} would have "
                             f"no embedding (tokenizer and weights from different models?)")
    tensors, origin = _read_weights(path, expected)
    state = hf.from_hf(tensors, cfg, str(path), architecture=architecture)
    with torch.device("meta"):
        model = Transformer(cfg)
    _check_shapes(model, state, origin, config_file)
    model.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    return model.eval(), tokenizer


def _recorded_config(path: Path, from_json: ModelConfig) -> ModelConfig:
    """The exact ModelConfig recorded in smolforge.json when it agrees with config.json.

    config.json cannot hold smolforge-only settings (init_std aside: router loss weight of a dense
    model, head_dim=0 meaning "derive it"); the recorded copy keeps them, so save/load is exact.
    """
    try:
        recorded = ModelConfig(**read_meta(path).get("model", {}))
        same = hf.model_config_from_hf(hf.hf_config(recorded)) == from_json
    except (ValueError, TypeError, SmolforgeError):
        return from_json
    return recorded if same else from_json


def _read_weights(path: Path, expected: str) -> tuple[dict[str, torch.Tensor], dict[str, Path]]:
    """All tensors of a model directory and the file each came from (for error messages)."""
    single, index = path / WEIGHTS_FILE, path / WEIGHTS_INDEX
    if single.is_file():
        files = [single]
    elif index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise SmolforgeError(f"{index}: not a safetensors index ({type(exc).__name__}: {exc}); "
                                 f"expected a JSON object with a 'weight_map'") from None
        files = [path / shard for shard in sorted(set(weight_map.values()))]
        for file in files:
            if not file.is_file():
                tensors = sorted(k for k, v in weight_map.items() if path / v == file)
                raise SmolforgeError(f"{file} is missing: {index.name} lists it for {_few(tensors)}")
    elif (path / DCP_DIR).is_dir():
        raise SmolforgeError(f"{path} is a sharded training checkpoint (FSDP2, {DCP_DIR}/): gather it into a "
                             f"normal checkpoint directory first with `smolforge consolidate {path} OUT`")
    else:
        hint = (" (only safetensors are read; pytorch_model.bin is not: convert it with transformers' "
                "save_pretrained)") if (path / "pytorch_model.bin").exists() else ""
        raise SmolforgeError(f"{path} has no {WEIGHTS_FILE}{hint}: {expected}")
    tensors: dict[str, torch.Tensor] = {}
    origin: dict[str, Path] = {}
    for file in files:
        try:
            part = load_file(file)
        except (SafetensorError, OSError) as exc:
            raise SmolforgeError(f"{file}: cannot read the weights ({type(exc).__name__}: {exc})") from None
        tensors.update(part)
        origin.update(dict.fromkeys(part, file))
    return tensors, origin


def _check_shapes(model: Transformer, state: dict[str, torch.Tensor], origin: dict[str, Path],
                  config_file: Path) -> None:
    """A config.json that contradicts the stored tensors is named with the tensor and its file."""
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    for name, tensor in state.items():
        want = expected.get(name)
        if want is not None and tuple(tensor.shape) != want:
            # `origin` is keyed by the on-disk names, which equal ours except for fused experts.
            file = origin.get(name, config_file.parent)
            raise SmolforgeError(f"{file}: tensor {name} has shape {list(tensor.shape)} but {config_file} "
                                 f"implies {list(want)}: the config does not describe these weights")


def _few(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


def load_trainer_state(path: str | Path) -> dict[str, Any]:
    """The dict the training loop saved with the checkpoint (optimizer, loader, RNG states, step)."""
    file = Path(path) / STATE_FILE
    if not file.is_file():
        raise SmolforgeError(f"{path} has no {STATE_FILE}: it is a final model, not a resumable "
                             f"checkpoint; resume from one under checkpoints/ instead")
    try:
        # Our own file (optimizer tensors, numpy RNG state), hence weights_only=False.
        return torch.load(file, map_location="cpu", weights_only=False)
    except Exception as exc:  # unpickling errors come in many types
        raise SmolforgeError(f"{file} cannot be read ({type(exc).__name__}: {exc})") from None


# --- periodic checkpoints of a run -----------------------------------------------------------------

_STEP_DIR = re.compile(r"step_(\d+)")
_TMP_NAME = re.compile(r"\.tmp-(step_\d+)-\d+(\.old)?")


def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


def _step_dirs(root: Path) -> list[Path]:
    """checkpoints/step_* directories, oldest first by step number (not by name: 1_000_000 > 999_999)."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_DIR.fullmatch(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def save_run_checkpoint(run_dir: str | Path, step: int, model: torch.nn.Module, tokenizer: Tokenizer | None, *,
                        meta: dict[str, Any], trainer_state: dict[str, Any], keep_last: int,
                        writer: Callable[..., Path] | None = None) -> Path:
    """Write checkpoints/step_N, point `latest` at it, then prune all but the newest `keep_last`.

    `writer` writes one checkpoint directory (default `save_checkpoint`; the reward stage passes
    its sequence-classifier writer)."""
    if keep_last < 1:
        raise ValueError("keep_last must be at least 1")
    root = Path(run_dir) / "checkpoints"
    path = (writer or save_checkpoint)(root / checkpoint_name(step), model, tokenizer,
                                       meta={"step": step, **meta}, trainer_state=trainer_state)
    return mark_latest(path, keep_last)


def mark_latest(path: Path, keep_last: int) -> Path:
    """Point checkpoints/latest at the new checkpoint `path`, then prune all but the newest `keep_last`."""
    root = path.parent
    _write_text_atomic(root / LATEST_FILE, path.name + "\n")
    # Leftovers of crashed saves or deletions of other steps (a save only tidies its own name).
    for name in {m.group(1) for p in root.glob(".tmp-step_*") if (m := _TMP_NAME.fullmatch(p.name))}:
        _tidy_temporaries(root / name)
    for old in _step_dirs(root)[:-keep_last]:
        if old.name != path.name:
            _remove_dir(old)
    return path


def find_resume_checkpoint(run_dir: str | Path) -> Path:
    """The newest checkpoint of the run that verifies and holds trainer state.

    Corrupt or truncated ones are skipped with a warning naming them and the reason; `latest` is
    checked against the result (it may lag by one checkpoint after a crash between the two writes).
    """
    root = Path(run_dir) / "checkpoints"
    latest = root / LATEST_FILE
    named = latest.read_text(encoding="utf-8").strip() if latest.is_file() else None
    skipped = []
    for candidate in reversed(_step_dirs(root)):
        try:
            verify_checkpoint(candidate)
            if not (candidate / STATE_FILE).is_file():
                raise SmolforgeError(f"{candidate} has no {STATE_FILE}")
        except SmolforgeError as exc:
            skipped.append(candidate.name)
            warnings.warn(f"checkpoint {candidate} is unusable and is skipped: {exc}. Falling back to "
                          f"an older checkpoint.", stacklevel=2)
            continue
        if named is not None and named != candidate.name and named not in skipped:
            warnings.warn(f"{latest} names {named!r} but the newest complete checkpoint is "
                          f"{candidate.name}: resuming from {candidate.name}", stacklevel=2)
        return candidate
    reason = f" ({', '.join(skipped)} failed verification)" if skipped else ""
    raise SmolforgeError(f"no usable checkpoint in {root}{reason}: start without --resume, or point "
                         f"--run.dir / --run.name at the run you mean to continue")
