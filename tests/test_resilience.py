"""Resilience: bad-loss guard (skip, rollback), SIGTERM checkpoint, kill -9 + auto-restart."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from smolforge.config import load_recipe
from smolforge.data.shards import tokenize_corpus
from smolforge.quickstart import bundled_text
from smolforge.tokenizer import train_tokenizer
from smolforge.train import objectives
from smolforge.train.loop import train
from smolforge.train.resilience import LossGuard, without_auto_restart


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("prepared")
    (root / "train.txt").write_text(bundled_text()[:60_000])
    train_tokenizer([root / "train.txt"], vocab_size=512).save(root / "tok")
    tokenize_corpus([root / "train.txt"], root / "tok", root / "train", workers=1, progress=False)
    return root


def flags(prepared: Path, run_dir: Path, steps: int, **extra) -> dict:
    return {"run.dir": str(run_dir), "run.name": "r", "model.preset": "debug",
            "data.tokenizer": str(prepared / "tok"), "data.train": [{"path": str(prepared / "train")}],
            "data.seq_len": 64, "train.batch_size": 4, "train.max_steps": steps, "train.lr": 3e-3,
            "train.warmup_steps": 2, "train.log_every": 1, "train.eval_every": 0, "train.save_every": 5,
            "train.keep_last": 10, "train.threads": 1, **extra}


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "r" / "metrics.jsonl").read_text().splitlines()]


def test_loss_guard_skips_bad_steps_and_rolls_back_when_they_repeat():
    guard = LossGuard(spike_factor=3.0, window=20, max_bad_steps=2)
    for loss in [2.0] * 12:
        assert guard.check(loss) == ("ok", None)
    verdict, reason = guard.check(float("nan"))
    assert verdict == "skip" and "non-finite" in reason
    assert guard.check(2.1)[0] == "ok"  # a good step resets the count
    assert guard.check(7.0)[0] == "skip"  # 7 > 3 x median 2
    verdict, reason = guard.check(float("inf"))
    assert verdict == "rollback" and guard.skipped == 3
    assert LossGuard(0.0, 20, 2).check(1e6)[0] == "ok"  # spike check off: only non-finite is bad


def _nan_on(calls: set[int], monkeypatch) -> None:
    """An `lm` objective that returns NaN on the given (0-based) calls: an injected bad batch."""
    count = {"n": 0}

    def flaky(output, batch, cfg):
        loss, parts = objectives.lm(output, batch, cfg)
        count["n"] += 1
        return (loss * float("nan") if count["n"] - 1 in calls else loss), parts

    monkeypatch.setitem(objectives.OBJECTIVES, "flaky", flaky)


def test_a_nan_batch_is_skipped_and_repeated_nans_roll_back(prepared, tmp_path, monkeypatch):
    _nan_on({7, 13, 14, 15}, monkeypatch)
    result = train(load_recipe(None, flags(prepared, tmp_path, 20, **{"train.objective": "flaky"})))
    log = records(tmp_path)
    events = [r for r in log if "event" in r]
    assert [e["event"] for e in events] == ["skip", "skip", "skip", "rollback"]
    assert events[0]["step"] == 7 and "non-finite" in events[0]["reason"]
    rollback = events[-1]
    assert rollback["checkpoint"] == "step_000010" and rollback["to_step"] == 10 and rollback["lr_scale"] == 0.5
    assert result.steps == 20 and all(math.isfinite(r["loss"]) for r in log if "loss" in r)
    after = [r for r in log if "loss" in r and r["step"] > 10]
    assert after[-1]["lr"] < 3e-3 * 0.5 + 1e-12  # the lowered rate is used (and decays on)
    final = torch.load(result.run_dir / "checkpoints" / "step_000020" / "trainer_state.pt", weights_only=False)
    assert final["lr_scale"] == 0.5  # kept for a later resume


def test_nans_before_any_checkpoint_stop_with_a_clear_error(prepared, tmp_path, monkeypatch):
    from smolforge.errors import SmolforgeError

    _nan_on({0, 1, 2}, monkeypatch)
    with pytest.raises(SmolforgeError, match="3 steps in a row, and no checkpoint to roll back to"):
        train(load_recipe(None, flags(prepared, tmp_path, 10, **{"train.objective": "flaky"})))


def _command(prepared: Path, run_dir: Path, steps: int, *extra: str) -> list[str]:
    args = [sys.executable, "-m", "smolforge.cli", "pretrain"]
    for key, value in flags(prepared, run_dir, steps).items():
        args += [f"--{key}", json.dumps(value) if isinstance(value, list) else str(value)]
    return [*args, *extra]


def _wait_for(predicate, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.05)


def _logged_steps(run_dir: Path) -> int:
    path = run_dir / "r" / "metrics.jsonl"
    return sum(1 for line in path.read_text().splitlines() if '"loss"' in line) if path.exists() else 0


def test_sigterm_finishes_the_step_saves_and_exits_0(prepared, tmp_path):
    proc = subprocess.Popen(_command(prepared, tmp_path, 400), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    _wait_for(lambda: _logged_steps(tmp_path) >= 3)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    log = records(tmp_path)
    stopped = [r for r in log if r.get("event") == "stopped"]
    assert stopped and stopped[0]["signal"] == "SIGTERM"
    step = stopped[0]["step"]
    assert step < 400 and (tmp_path / "r" / "checkpoints" / f"step_{step:06d}" / "trainer_state.pt").is_file()
    assert "stopped by SIGTERM" in out and "--resume" in out
    assert not (tmp_path / "r" / "final").exists()


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the supervised child through /proc (Linux)")
def test_kill_9_then_auto_restart_resumes_with_the_same_losses(prepared, tmp_path):
    reference = train(load_recipe(None, flags(prepared, tmp_path / "ref", 30)))
    expected = {r["step"]: r["loss"] for r in records(tmp_path / "ref") if "loss" in r}
    supervisor = subprocess.Popen(_command(prepared, tmp_path / "run", 30, "--auto-restart", "2"),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: (tmp_path / "run" / "r" / "checkpoints" / "step_000010").is_dir()
              and _logged_steps(tmp_path / "run") >= 12)
    children = _children(supervisor.pid)
    assert len(children) == 1
    os.kill(children[0], signal.SIGKILL)  # no handler runs: the hardest way to die
    out, err = supervisor.communicate(timeout=180)
    assert supervisor.returncode == 0, err
    assert "restart 1 of 2" in err
    got = {r["step"]: r["loss"] for r in records(tmp_path / "run") if "loss" in r}
    assert got == expected  # exactly the uninterrupted run's losses, every step logged once
    assert reference.steps == 30 and (tmp_path / "run" / "r" / "final" / "model.safetensors").is_file()


def test_the_supervised_child_never_supervises():
    assert without_auto_restart(["pretrain", "r.yaml", "--auto-restart", "3", "--x", "1"]) == ["pretrain", "r.yaml", "--x", "1"]
    assert without_auto_restart(["pretrain", "--auto-restart=2"]) == ["pretrain"]
