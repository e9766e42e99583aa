"""Checkpoint directories: written atomically, verified by hash, loadable by `transformers`.

A checkpoint (DESIGN.md "Artifacts") is a Hugging Face model directory plus two files:
`smolforge.json` (stage, parent, recipe hash, metrics, and the size and sha256 of every other
file) and, for periodic checkpoints, `trainer_state.pt` (optimizer, data position, RNG
states, step). It is written into a temporary sibling directory, every file fsynced, then
renamed into place: a crash leaves either the old checkpoint or the new one, never half of one
(playbook ch. 06/08: frequent, safe checkpoints are what make restarts cheap).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from smolforge import __version__
from smolforge.errors import SmolforgeError
from smolforge.interop import hf
from smolforge.model import Transformer

META_FILE = "smolforge.json"
STATE_FILE = "trainer_state.pt"
WEIGHTS_FILE = "model.safetensors"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_tree(directory: Path) -> None:
    for path in directory.iterdir():
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def save_checkpoint(directory: str | Path, model: Transformer, tokenizer=None, *, meta: dict | None = None,
                    trainer_state: dict | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write a complete checkpoint at `directory`, replacing an older one only once complete."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    for stale in directory.parent.glob(f".tmp-{directory.name}-*"):
        shutil.rmtree(stale, ignore_errors=True)  # left by an earlier crash
    tmp = directory.parent / f".tmp-{directory.name}-{os.getpid()}"
    tmp.mkdir()
    try:
        cfg = model.config
        state = {k: v.detach().to(dtype or v.dtype).contiguous().cpu()
                 for k, v in hf.to_hf(model.state_dict(), cfg).items()}
        dtype_name = str(next(iter(state.values())).dtype).removeprefix("torch.")
        save_file(state, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        ids = {"bos_id": getattr(tokenizer, "bos_id", None), "eos_id": getattr(tokenizer, "eos_id", None),
               "pad_id": getattr(tokenizer, "pad_id", None)}
        _write_json(tmp / "config.json", hf.hf_config(cfg, dtype=dtype_name, **ids))
        # Sampling defaults from the SmolLM3 release (playbook ch. 07): temperature 0.6, top-p 0.95.
        _write_json(tmp / "generation_config.json", {
            "bos_token_id": ids["bos_id"], "eos_token_id": ids["eos_id"], "pad_token_id": ids["pad_id"],
            "do_sample": True, "temperature": 0.6, "top_p": 0.95})
        if tokenizer is not None:
            tokenizer.save(tmp)
        if trainer_state is not None:
            torch.save(trainer_state, tmp / STATE_FILE)
        files = {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)}
                 for p in sorted(tmp.iterdir()) if p.is_file()}
        _write_json(tmp / META_FILE, {**(meta or {}), "smolforge_version": __version__,
                                      "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                      "model": cfg.model_dump(), "files": files})
        _fsync_tree(tmp)
        if directory.exists():
            # Two renames: the old checkpoint stays complete until the new one is in place.
            old = directory.parent / f".tmp-old-{directory.name}-{os.getpid()}"
            os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def read_meta(path: str | Path) -> dict[str, Any]:
    """smolforge.json of a checkpoint ({} for a plain Hugging Face directory)."""
    file = Path(path) / META_FILE
    return json.loads(file.read_text()) if file.is_file() else {}


def verify_checkpoint(directory: str | Path) -> None:
    """Recompute sizes and hashes recorded in smolforge.json; raise naming the first bad file."""
    directory = Path(directory)
    try:
        meta = read_meta(directory)
    except json.JSONDecodeError:
        raise SmolforgeError(f"{directory / META_FILE} is corrupt (not valid JSON)") from None
    if not meta:
        raise SmolforgeError(f"{directory} has no {META_FILE}: it is not a complete smolforge checkpoint")
    for name, info in meta.get("files", {}).items():
        file = directory / name
        if not file.is_file():
            raise SmolforgeError(f"{file} is missing from the checkpoint")
        if file.stat().st_size != info["size"]:
            raise SmolforgeError(f"{file} is truncated or changed: {file.stat().st_size} bytes, "
                                 f"expected {info['size']}")
        if _sha256(file) != info["sha256"]:
            raise SmolforgeError(f"{file} is corrupt: its sha256 differs from the one recorded")


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               verify: bool = True):
    """Load a smolforge checkpoint or a Hugging Face model directory: (model, tokenizer)."""
    from smolforge.tokenizer import Tokenizer

    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise SmolforgeError(f"{path} is not a model directory: expected config.json and model.safetensors "
                             f"(a smolforge checkpoint or a Hugging Face model)")
    if verify and (path / META_FILE).is_file():
        verify_checkpoint(path)
    cfg = hf.model_config_from_hf(json.loads(config_file.read_text()), str(config_file))
    tensors = _read_weights(path)
    state = hf.from_hf(tensors, cfg, str(path))
    with torch.device("meta"):
        model = Transformer(cfg)
    model.load_state_dict(state, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model = model.to(device=device, dtype=dtype) if dtype else model.to(device)
    model.eval()
    return model, Tokenizer.load(path)


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    single = path / WEIGHTS_FILE
    index = path / "model.safetensors.index.json"
    if single.is_file():
        return load_file(single)
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        tensors: dict[str, torch.Tensor] = {}
        for name in files:
            tensors.update(load_file(path / name))
        return tensors
    raise SmolforgeError(f"{path} has no {WEIGHTS_FILE} (or sharded index): only safetensors weights are read")


def load_trainer_state(path: str | Path) -> dict[str, Any]:
    file = Path(path) / STATE_FILE
    if not file.is_file():
        raise SmolforgeError(f"{path} has no {STATE_FILE}: it is a final model, not a resumable checkpoint")
    # Our own file (optimizer tensors, numpy RNG state): not a foreign pickle.
    return torch.load(file, map_location="cpu", weights_only=False)


# --- periodic checkpoints of a run ---------------------------------------------------------------


def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


def save_run_checkpoint(run_dir: str | Path, step: int, model: Transformer, tokenizer, *, meta: dict,
                        trainer_state: dict, keep_last: int) -> Path:
    """Write checkpoints/step_N, point `latest` at it, and prune beyond the newest `keep_last`."""
    root = Path(run_dir) / "checkpoints"
    path = save_checkpoint(root / checkpoint_name(step), model, tokenizer, meta=meta, trainer_state=trainer_state)
    latest_tmp = root / f".latest-{os.getpid()}"
    latest_tmp.write_text(path.name + "\n")
    os.replace(latest_tmp, root / "latest")
    for old in sorted(root.glob("step_*"))[:-keep_last]:
        if old != path:
            shutil.rmtree(old, ignore_errors=True)
    return path


def find_resume_checkpoint(run_dir: str | Path) -> Path:
    """The newest checkpoint of the run that verifies; warns about and skips corrupt ones."""
    root = Path(run_dir) / "checkpoints"
    candidates = sorted(root.glob("step_*"), reverse=True) if root.is_dir() else []
    latest = root / "latest"
    if latest.is_file():
        named = root / latest.read_text().strip()
        if named in candidates:  # try the one `latest` names first
            candidates.remove(named)
            candidates.insert(0, named)
    for candidate in candidates:
        try:
            verify_checkpoint(candidate)
            if not (candidate / STATE_FILE).is_file():
                raise SmolforgeError(f"{candidate} has no {STATE_FILE}")
            return candidate
        except SmolforgeError as exc:
            warnings.warn(f"skipping checkpoint {candidate.name}: {exc}; trying an older one", stacklevel=2)
    raise SmolforgeError(f"no usable checkpoint in {root}: start without --resume, or check --run.dir "
                         f"and --run.name point at the run you mean")
