"""Checkpoints: atomic writes, hash verification, resume fallback, pruning."""

from __future__ import annotations

import pytest
import torch

from smolforge.errors import SmolforgeError
from smolforge.model import Transformer, debug
from smolforge.train import checkpoint as ckpt


@pytest.fixture
def model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(debug().model_copy(update={"vocab_size": 128}))


def save_step(run_dir, step, model, keep_last=10):
    return ckpt.save_run_checkpoint(run_dir, step, model, None, meta={"step": step},
                                    trainer_state={"step": step}, keep_last=keep_last)


def test_crash_during_save_keeps_the_previous_checkpoint(model, tmp_path, monkeypatch):
    path = ckpt.save_checkpoint(tmp_path / "c", model, meta={"stage": "first"})
    monkeypatch.setattr(ckpt, "_fsync_tree", lambda d: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(tmp_path / "c", model, meta={"stage": "second"})
    ckpt.verify_checkpoint(path)
    assert ckpt.read_meta(path)["stage"] == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["c"]  # no temporary directory left behind


def test_verify_detects_flipped_byte_and_truncation(model, tmp_path):
    path = ckpt.save_checkpoint(tmp_path / "c", model)
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(SmolforgeError, match="sha256"):
        ckpt.verify_checkpoint(path)
    weights.write_bytes(bytes(data[:100]))
    with pytest.raises(SmolforgeError, match="truncated"):
        ckpt.load_model(path)
    (path / "config.json").unlink()
    with pytest.raises(SmolforgeError, match="missing"):
        ckpt.verify_checkpoint(path)


def test_resume_falls_back_to_the_previous_good_checkpoint(model, tmp_path):
    for step in (10, 20, 30):
        save_step(tmp_path, step, model)
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_000030"
    assert ckpt.find_resume_checkpoint(tmp_path).name == "step_000030"
    (tmp_path / "checkpoints" / "step_000030" / "trainer_state.pt").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="step_000030"):
        assert ckpt.find_resume_checkpoint(tmp_path).name == "step_000020"
    assert ckpt.load_trainer_state(tmp_path / "checkpoints" / "step_000020")["step"] == 20


def test_keep_last_prunes_old_checkpoints(model, tmp_path):
    for step in (1, 2, 3, 4):
        save_step(tmp_path, step, model, keep_last=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == ["step_000003", "step_000004"]


def test_no_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(SmolforgeError, match="no usable checkpoint"):
        ckpt.find_resume_checkpoint(tmp_path)
    with pytest.raises(SmolforgeError, match="not a model directory"):
        ckpt.load_model(tmp_path)


def test_final_model_has_no_trainer_state(model, tmp_path):
    path = ckpt.save_checkpoint(tmp_path / "final", model)
    with pytest.raises(SmolforgeError, match="not a resumable checkpoint"):
        ckpt.load_trainer_state(path)
