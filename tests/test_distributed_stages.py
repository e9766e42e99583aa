"""SFT and preference stages under `torchrun` x 2 (CPU, gloo, DDP) train like one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import write_preference_run

from smolforge.config import DPORecipe, SFTRecipe, load_recipe, save_recipe
from smolforge.data.sft import EpochLoader
from smolforge.data.synth import generate, write_jsonl
from smolforge.model import ModelConfig, Transformer, debug
from smolforge.train.checkpoint import save_checkpoint
from smolforge.train.loop import train

TOLERANCE = 1e-5


def launch(stage: str, recipe_path: Path, *extra: str) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node 2 -m smolforge.cli STAGE RECIPE ...`, one thread per rank."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           "-m", "smolforge.cli", stage, str(recipe_path), *extra]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_curve(single: Path, parallel: Path, keys: tuple[str, ...]) -> None:
    """Every logged step (and the final evaluation) of the 2-process run equals the 1-process one."""
    want, got = records(single), records(parallel)
    assert [r.get("step") for r in got] == [r.get("step") for r in want]  # rank 0 alone logged
    compared = 0
    for a, b in zip(want, got):
        for key in keys:
            if key in a:
                assert b[key] == pytest.approx(a[key], abs=TOLERANCE, rel=TOLERANCE), (a["step"], key, a[key], b[key])
                compared += 1
    assert compared >= len(want)


class _Items(EpochLoader):
    def __init__(self, n: int, batch_size: int, rank: int = 0, world_size: int = 1) -> None:
        self.n = n
        super().__init__(batch_size, 3, None, rank, world_size)

    def __len__(self) -> int:
        return self.n

    def _batch(self, indices):  # type: ignore[override]
        return list(indices)


def test_rank_shares_of_an_epoch_loader_make_the_single_process_batches():
    whole = _Items(10, 4)
    ranks = [_Items(10, 2, rank=r, world_size=2) for r in range(2)]
    for _ in range(6):  # across epoch boundaries (10 items, 4 per global micro-batch)
        batch = whole.next_batch()
        parts = [loader.next_batch() for loader in ranks]
        assert batch[0::2] == parts[0] and batch[1::2] == parts[1]
    assert ranks[0].state_dict() == ranks[1].state_dict() == whole.state_dict()  # global counters
    assert ranks[0].steps_per_epoch(grad_accum=1) == whole.steps_per_epoch(grad_accum=1) == 2.5
    with pytest.raises(ValueError, match="outside"):
        _Items(10, 2, rank=2, world_size=2)


@pytest.fixture(scope="module")
def sft_setup(synth_tokenizer, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sft-ddp")
    write_jsonl(generate("reverse", 64, seed=0), root / "train.jsonl")
    torch.manual_seed(0)
    base = Transformer(ModelConfig(**{**debug().model_dump(), "vocab_size": 512}))
    save_checkpoint(root / "base", base, synth_tokenizer, meta={"stage": "pretrain"})
    return root


def test_sft_on_two_processes_equals_one(sft_setup, tmp_path):
    def recipe(name: str):
        # Rows of different lengths and trained-token counts: the step loss must weight every
        # assistant token of the global batch equally across ranks (global counts all-reduced).
        return load_recipe(None, {
            "run.dir": str(tmp_path), "run.name": name, "run.init_from": str(sft_setup / "base"),
            "data.train": [{"path": str(sft_setup / "train.jsonl")}], "data.seq_len": 128,
            "data.val_fraction": 0.1, "data.template": "chatml", "train.batch_size": 4, "train.grad_accum": 2,
            "train.lr": 3e-3, "train.epochs": 0, "train.max_steps": 4, "train.warmup_steps": 1,
            "train.log_every": 1, "train.eval_every": 0, "train.eval_batches": 2, "train.save_every": 0,
            "train.threads": 1}, SFTRecipe)

    single = train(recipe("one"), stage="sft")
    save_recipe(recipe("two"), tmp_path / "two.yaml")
    launch("sft", tmp_path / "two.yaml")
    assert_same_curve(single.run_dir, tmp_path / "two", ("loss", "grad_norm", "tokens", "val_loss"))


@pytest.fixture(scope="module")
def dpo_setup(tmp_path_factory) -> Path:
    words = ["king", "queen", "rose", "moon", "ship", "crown", "bell", "fire", "wind", "gold"]
    root = tmp_path_factory.mktemp("dpo-ddp")
    # Responses of different lengths, so the ranks' micro-batches differ in shape.
    pairs = [{"prompt": f"say {w}", "chosen": f"{w} " * (1 + i % 3), "rejected": f"no {w}"}
             for i, w in enumerate(words * 2)]
    return write_preference_run(root, pairs, words)


def test_dpo_on_two_processes_equals_one(dpo_setup, tmp_path):
    def recipe(name: str):
        return load_recipe(None, {
            "run.dir": str(tmp_path), "run.name": name, "run.init_from": str(dpo_setup / "base"),
            "data.train": [{"path": str(dpo_setup / "pairs.jsonl")}], "data.template": "chatml",
            "data.seq_len": 64, "data.val_fraction": 0.2, "train.objective": "dpo", "train.epochs": 0,
            "train.max_steps": 4, "train.batch_size": 4, "train.grad_accum": 2, "train.lr": 3e-3,
            "train.warmup_steps": 0, "train.log_every": 1, "train.eval_every": 0, "train.save_every": 0,
            "train.threads": 1}, DPORecipe)

    single = train(recipe("one"), stage="dpo")
    save_recipe(recipe("two"), tmp_path / "two.yaml")
    done = launch("dpo", tmp_path / "two.yaml")
    # Rank 0 computed the cached reference log-probs; rank 1 read them (one cache file, one report).
    assert done.stdout.count("reference log-probs from") == 1
    assert len(list((tmp_path / "two" / "reference").iterdir())) == 2  # train + validation caches
    assert_same_curve(single.run_dir, tmp_path / "two", ("loss", "grad_norm", "rewards/margins", "val_loss"))
