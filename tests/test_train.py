"""Tier 3: the pretraining loop end to end on a tiny model, in tmp_path."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import assert_same_weights

from smolforge.config import load_recipe
from smolforge.data.shards import TokenShards
from smolforge.errors import SmolforgeError
from smolforge.eval.bpb import token_byte_lengths
from smolforge.tokenizer import Tokenizer
from smolforge.train import checkpoint as ckpt
from smolforge.train.loop import train


def recipe_for(prepared: Path, run_dir: Path, **train_overrides):
    overrides = {
        "run.dir": str(run_dir), "run.name": "tiny",
        "model.preset": "debug",
        "data.tokenizer": str(prepared / "tok"),
        "data.train": [{"path": str(prepared / "train")}],
        "data.val": [{"path": str(prepared / "val")}],
        "data.seq_len": 64,
        "train.batch_size": 4, "train.max_steps": 30, "train.lr": 3e-3, "train.warmup_steps": 3,
        "train.log_every": 1, "train.eval_every": 10, "train.eval_batches": 4,
        "train.save_every": 10, "train.keep_last": 5, "train.threads": 1,
    }
    overrides.update({f"train.{k}": v for k, v in train_overrides.items()})
    return load_recipe(None, overrides)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_pretraining_learns_and_checkpoint_reloads(prepared, tmp_path):
    result = train(recipe_for(prepared, tmp_path))
    records = read_metrics(result.run_dir)
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 30
    windows = (TokenShards(prepared / "train").tokens - 1) // 64
    assert records[-2]["epochs/train"] == pytest.approx(30 * 4 / windows)  # per-source epochs logged
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.7
    evals = [r for r in records if "val_bpb" in r]
    assert [r["step"] for r in evals] == [10, 20, 30]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    assert (result.run_dir / "recipe.yaml").exists()
    assert (result.run_dir / "checkpoints" / "latest").read_text().strip() == "step_000030"
    # The final checkpoint reloads and reproduces the logged validation loss.
    model, tokenizer = ckpt.load_model(result.final_checkpoint)
    from smolforge.eval.bpb import evaluate_loss_and_bpb
    from smolforge.train.loop import build_data

    _, val = build_data(recipe_for(prepared, tmp_path), None)
    again = evaluate_loss_and_bpb(model, val.iter_eval(4), token_byte_lengths(tokenizer), torch.device("cpu"))
    assert again["val_loss"] == pytest.approx(evals[-1]["val_loss"], rel=1e-5)
    meta = ckpt.read_meta(result.final_checkpoint)
    assert meta["stage"] == "pretrain" and len(meta["data_manifest_hash"]) == 64 and meta["step"] == 30


def test_resume_after_a_crash_equals_the_uninterrupted_run(prepared, tmp_path, crash_after_checkpoint):
    reference = train(recipe_for(prepared, tmp_path / "a", max_steps=20, save_every=5))
    want = [(r["step"], r["loss"]) for r in read_metrics(reference.run_dir) if "loss" in r]

    crash_after_checkpoint(lambda: train(recipe_for(prepared, tmp_path / "b", max_steps=20, save_every=5)), step=10)
    resumed = train(recipe_for(prepared, tmp_path / "b", max_steps=20, save_every=5), resume=True)
    got = [(r["step"], r["loss"]) for r in read_metrics(resumed.run_dir) if "loss" in r]
    assert got == want  # bit-identical losses, and no duplicated records
    assert_same_weights(reference.final_checkpoint, resumed.final_checkpoint)


def test_existing_run_needs_resume_and_resume_needs_a_checkpoint(prepared, tmp_path):
    train(recipe_for(prepared, tmp_path, max_steps=10, save_every=10))
    with pytest.raises(SmolforgeError, match="--resume"):
        train(recipe_for(prepared, tmp_path, max_steps=10))
    with pytest.raises(SmolforgeError, match="checkpoint"):
        train(recipe_for(prepared, tmp_path / "empty", max_steps=10), resume=True)


def test_bad_data_settings_are_explained(prepared, tmp_path):
    recipe = recipe_for(prepared, tmp_path)
    recipe.data.train = []
    with pytest.raises(SmolforgeError, match="data.train is empty"):
        train(recipe)
    recipe = recipe_for(prepared, tmp_path)
    recipe.data.tokenizer = str(tmp_path / "missing-tokenizer")
    with pytest.raises(SmolforgeError):
        train(recipe)


def test_byte_lengths_count_text_bytes(prepared):
    tokenizer = Tokenizer.load(prepared / "tok")
    text = "Thou art, é 日本 🙂 1234!\n  code()"
    ids = tokenizer.encode(text)
    assert int(token_byte_lengths(tokenizer)[ids].sum()) == len(text.encode("utf-8"))
    assert token_byte_lengths(tokenizer)[tokenizer.eos_id] == 0


def test_a_stage_can_start_from_a_checkpoint(prepared, tmp_path):
    first = train(recipe_for(prepared, tmp_path / "first", max_steps=10))
    recipe = recipe_for(prepared, tmp_path / "second", max_steps=5, warmup_steps=1)
    recipe.run.init_from = str(first.final_checkpoint)
    second = train(recipe)
    assert ckpt.read_meta(second.final_checkpoint)["parent"] == str(first.final_checkpoint)
    first_loss = [r for r in read_metrics(first.run_dir) if "loss" in r][-1]["loss"]
    second_loss = [r for r in read_metrics(second.run_dir) if "loss" in r][0]["loss"]
    assert second_loss < first_loss + 0.5  # continues from trained weights, not from scratch
    shutil.rmtree(tmp_path / "first")


def test_metrics_go_to_tensorboard_when_asked(prepared, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recipe = recipe_for(prepared, tmp_path, max_steps=6, eval_every=3)
    recipe.train.report_to = ["tensorboard"]
    result = train(recipe)
    events = EventAccumulator(str(result.run_dir / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == list(range(1, 7))
    assert [e.step for e in events.Scalars("val_bpb")] == [3, 6]
    logged = [r["loss"] for r in read_metrics(result.run_dir) if "loss" in r]
    assert [e.value for e in events.Scalars("loss")] == pytest.approx(logged)


def test_a_tracker_that_is_not_installed_fails_before_any_work(prepared, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    recipe = recipe_for(prepared, tmp_path)
    recipe.train.report_to = ["wandb"]
    with pytest.raises(SmolforgeError, match="pip install wandb"):
        train(recipe)
    assert not (tmp_path / "tiny" / "metrics.jsonl").exists()


def test_activation_checkpointing_trains_like_the_plain_loop(prepared, tmp_path):
    runs = []
    for flag in (False, True):
        result = train(recipe_for(prepared, tmp_path / str(flag), max_steps=4, eval_every=0, save_every=0,
                                  activation_checkpointing=flag))
        runs.append([r["loss"] for r in read_metrics(result.run_dir) if "loss" in r])
    assert len(runs[0]) == 4
    assert runs[0] == pytest.approx(runs[1], rel=1e-5)
