"""Data-parallel pretraining: `torchrun` x 2 on CPU (gloo) must train like one process.

FSDP2 and cross-world-size resumes: tests/test_fsdp.py; SFT and DPO: tests/test_distributed_stages.py."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_train import read_metrics, recipe_for

from smolforge.config import save_recipe
from smolforge.data.loader import PretrainLoader, SourceSpec
from smolforge.errors import SmolforgeError
from smolforge.train import checkpoint as ckpt
from smolforge.train.distributed import DistInfo
from smolforge.train.loop import build_data, train

STEPS = dict(max_steps=6, log_every=1, save_every=3, eval_every=0, batch_size=4, warmup_steps=2)


def torchrun(recipe_path: Path, *extra: str) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node 2 -m smolforge.cli pretrain RECIPE`, one thread per rank."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           "-m", "smolforge.cli", "pretrain", str(recipe_path), *extra]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir) if "loss" in r]


def grad_norms(run_dir: Path) -> list[float]:
    # AdamW and clipping hide a constant gradient scale from the losses; the logged pre-clip
    # norm does not, so it checks the world_size factor of the DDP loss scaling.
    return [r["grad_norm"] for r in read_metrics(run_dir) if "loss" in r]


def test_two_processes_train_like_one_and_resume_on_one(prepared, tmp_path):  # noqa: F811
    single = train(recipe_for(prepared, tmp_path / "single", **STEPS))
    want = losses(single.run_dir)
    assert [s for s, _ in want] == list(range(1, 7))

    recipe = recipe_for(prepared, tmp_path / "ddp", **STEPS)
    save_recipe(recipe, tmp_path / "ddp.yaml")
    torchrun(tmp_path / "ddp.yaml")
    run_dir = tmp_path / "ddp" / "tiny"
    got = losses(run_dir)
    assert [s for s, _ in got] == [s for s, _ in want]  # rank 0 alone wrote, once per step
    print("2 ranks vs 1, max |loss difference|:", max(abs(a - b) for (_, a), (_, b) in zip(want, got)))
    for (step, a), (_, b) in zip(want, got):
        assert abs(a - b) < 1e-5, (step, a, b)
    assert grad_norms(run_dir) == pytest.approx(grad_norms(single.run_dir), rel=1e-5)
    # Global tokens are logged (the same count as the single process), and one set of files.
    last = [[r for r in read_metrics(d) if "loss" in r][-1] for d in (run_dir, single.run_dir)]
    assert last[0]["tokens"] == last[1]["tokens"] == 6 * 4 * 64
    assert (run_dir / "final" / "model.safetensors").exists()
    assert ckpt.read_meta(run_dir / "final")["step"] == 6

    # Resume the 2-process run on ONE process from its step-3 checkpoint: same losses onward.
    shutil.rmtree(run_dir / "checkpoints" / "step_000006")
    (run_dir / "checkpoints" / "latest").write_text("step_000003\n")
    resumed = train(recipe_for(prepared, tmp_path / "ddp", **STEPS), resume=True)
    again = losses(resumed.run_dir)
    assert [s for s, _ in again] == list(range(1, 7))  # records after step 3 replaced, not doubled
    print("resumed on 1 from 2 ranks, max |loss difference|:",
          max(abs(a - b) for (_, a), (_, b) in zip(want, again)))
    for (step, a), (_, b) in zip(want, again):
        assert abs(a - b) < 1e-5, (step, a, b)


def test_rank_shards_are_the_single_process_batch_and_states_agree(prepared):  # noqa: F811
    spec = [SourceSpec(prepared / "train")]
    whole = PretrainLoader(spec, 64, 4, seed=7)
    ranks = [PretrainLoader(spec, 64, 2, seed=7, rank=r, world_size=2) for r in range(2)]
    for _ in range(3):
        rows = whole.next_batch()["input_ids"]
        parts = [loader.next_batch()["input_ids"] for loader in ranks]
        # Rank r holds global samples r, r + 2, ...: interleaved, they are the whole batch.
        assert rows[0::2].equal(parts[0]) and rows[1::2].equal(parts[1])
    states = [loader.state_dict() for loader in ranks]
    assert states[0] == states[1]  # any rank's checkpointed position resumes every rank
    assert states[0]["sample"] == whole.state_dict()["sample"]
    assert states[0]["counts"] == whole.state_dict()["counts"]


def test_global_batch_must_split_and_online_rl_is_single_process(prepared, tmp_path):  # noqa: F811
    two = DistInfo(rank=0, world_size=2)
    train_data, _ = build_data(recipe_for(prepared, tmp_path, batch_size=4), None, dist=two)
    assert train_data.batch_size == 2 and train_data.world_size == 2
    with pytest.raises(SmolforgeError, match="divide evenly"):
        build_data(recipe_for(prepared, tmp_path, batch_size=3), None, dist=two)
    from smolforge.config import RLDataConfig

    recipe = recipe_for(prepared, tmp_path)
    recipe = recipe.model_copy(update={"data": RLDataConfig.model_construct()})
    with pytest.raises(SmolforgeError, match="online RL"):
        build_data(recipe, None, dist=two)


def test_gradient_accumulation_with_no_sync_matches_one_process(prepared, tmp_path):  # noqa: F811
    steps = {**STEPS, "grad_accum": 2, "save_every": 0, "max_steps": 3}
    single = train(recipe_for(prepared, tmp_path / "single", **steps))
    save_recipe(recipe_for(prepared, tmp_path / "ddp", **steps), tmp_path / "ddp.yaml")
    torchrun(tmp_path / "ddp.yaml")
    want, got = losses(single.run_dir), losses(tmp_path / "ddp" / "tiny")
    assert len(got) == 3
    assert [b for _, b in got] == pytest.approx([a for _, a in want], abs=1e-5)
    assert grad_norms(tmp_path / "ddp" / "tiny") == pytest.approx(grad_norms(single.run_dir), rel=1e-5)
