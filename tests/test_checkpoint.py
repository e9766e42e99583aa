"""Checkpoints: contents, atomic writes, hash verification, resume fallback, pruning, loading."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from smolforge.errors import SmolforgeError
from smolforge.model import Transformer, debug
from smolforge.tokenizer import train_tokenizer
from smolforge.train import checkpoint as ckpt

DEAD_PID = 4_194_399  # above Linux's largest pid_max (2**22): never a live process


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    (root / "corpus.txt").write_text("a small corpus for a small tokenizer 12345\n" * 50)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return train_tokenizer([root / "corpus.txt"], vocab_size=384)


@pytest.fixture
def model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(debug().model_copy(update={"vocab_size": 384})).eval()


def save_step(run_dir, step, model, tokenizer=None, keep_last=10):
    return ckpt.save_run_checkpoint(run_dir, step, model, tokenizer, meta={"stage": "pretrain"},
                                    trainer_state={"step": step}, keep_last=keep_last)


def entries(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_checkpoint_contents_and_exact_round_trip(model, tokenizer, tmp_path):
    state = {"step": 7, "optimizer": {"m": torch.randn(3)}, "rng": torch.get_rng_state()}
    meta = {"stage": "sft", "parent": "runs/base/final", "recipe_hash": "abc", "metrics": {"loss": 1.5}}
    path = ckpt.save_checkpoint(tmp_path / "c", model, tokenizer, meta=meta, trainer_state=state)
    names = entries(path)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "generation_config.json", "smolforge.json", "trainer_state.pt"):
        assert name in names
    record = ckpt.read_meta(path)
    assert {k: record[k] for k in meta} == meta
    assert record["data_manifest_hash"] is None and record["step"] is None
    assert {"created", "smolforge_version", "architecture", "model"} <= record.keys()
    assert sorted(record["files"]) == [n for n in names if n != "smolforge.json"]
    assert record["files"]["model.safetensors"]["size"] == (path / "model.safetensors").stat().st_size
    generation = json.loads((path / "generation_config.json").read_text())
    assert generation == {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id,
                          "pad_token_id": tokenizer.pad_id, "do_sample": True, "temperature": 0.6,
                          "top_p": 0.95}
    ckpt.verify_checkpoint(path)
    loaded, tok = ckpt.load_model(path)
    assert loaded.config == model.config and tok.encode("small 42") == tokenizer.encode("small 42")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # still tied for training
    x = torch.randint(0, 384, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, atol=0, rtol=0)
    restored = ckpt.load_trainer_state(path)
    assert restored["step"] == 7 and torch.equal(restored["optimizer"]["m"], state["optimizer"]["m"])
    assert torch.equal(restored["rng"], state["rng"])


def test_dtype_casts_the_stored_weights(model, tokenizer, tmp_path):
    path = ckpt.save_checkpoint(tmp_path / "c", model, tokenizer, dtype=torch.bfloat16)
    assert json.loads((path / "config.json").read_text())["dtype"] == "bfloat16"
    loaded, _ = ckpt.load_model(path)
    assert loaded.lm_head.weight.dtype == torch.bfloat16
    assert ckpt.load_model(path, dtype=torch.float32)[0].lm_head.weight.dtype == torch.float32


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "two-renames"])
def test_replacing_a_checkpoint(exchange, model, tokenizer, tmp_path, monkeypatch):
    if not exchange:
        monkeypatch.setattr(ckpt, "_exchange", lambda a, b: False)
    ckpt.save_checkpoint(tmp_path / "c", model, tokenizer, meta={"stage": "first"})
    ckpt.save_checkpoint(tmp_path / "c", model, tokenizer, meta={"stage": "second"})
    ckpt.verify_checkpoint(tmp_path / "c")
    assert ckpt.read_meta(tmp_path / "c")["stage"] == "second"
    assert entries(tmp_path) == ["c"]


def test_crash_while_writing_keeps_the_previous_checkpoint(model, tokenizer, tmp_path, monkeypatch):
    path = ckpt.save_checkpoint(tmp_path / "c", model, tokenizer, meta={"stage": "first"})

    def half_written(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\0" * 100)
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", half_written)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(tmp_path / "c", model, tokenizer, meta={"stage": "second"})
    ckpt.verify_checkpoint(path)
    assert ckpt.read_meta(path)["stage"] == "first"
    assert entries(tmp_path) == ["c"]  # the temporary directory is gone


def test_failure_between_the_two_renames_restores_the_old_checkpoint(model, tokenizer, tmp_path,
                                                                     monkeypatch):
    monkeypatch.setattr(ckpt, "_exchange", lambda a, b: False)  # file systems without RENAME_EXCHANGE
    ckpt.save_checkpoint(tmp_path / "c", model, tokenizer, meta={"stage": "first"})
    real_replace = ckpt.os.replace

    def fail_second(src, dst):
        if str(src).endswith(f"-{ckpt.os.getpid()}") and not (tmp_path / "c").exists():
            raise OSError("rename failed")
        real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", fail_second)
    with pytest.raises(OSError, match="rename failed"):
        ckpt.save_checkpoint(tmp_path / "c", model, tokenizer, meta={"stage": "second"})
    ckpt.verify_checkpoint(tmp_path / "c")
    assert ckpt.read_meta(tmp_path / "c")["stage"] == "first" and entries(tmp_path) == ["c"]


def test_hard_crash_between_the_two_renames_is_recovered_by_the_next_save(model, tokenizer, tmp_path,
                                                                          monkeypatch):
    """A process killed between the renames leaves the old checkpoint as .tmp-<name>-<pid>.old."""
    ckpt.save_checkpoint(tmp_path / "c", model, tokenizer, meta={"stage": "first"})
    (tmp_path / "c").rename(tmp_path / f".tmp-c-{DEAD_PID}.old")
    (tmp_path / f".tmp-c-{DEAD_PID}").mkdir()  # the new one, complete or not: never trusted
    # The next save restores the old one first, so even a save that fails again leaves "first".
    monkeypatch.setattr(ckpt, "save_file", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(tmp_path / "c", model, tokenizer, meta={"stage": "second"})
    ckpt.verify_checkpoint(tmp_path / "c")
    assert ckpt.read_meta(tmp_path / "c")["stage"] == "first" and entries(tmp_path) == ["c"]
    monkeypatch.undo()
    ckpt.save_checkpoint(tmp_path / "c", model, tokenizer, meta={"stage": "third"})
    assert ckpt.read_meta(tmp_path / "c")["stage"] == "third" and entries(tmp_path) == ["c"]


def test_stray_temporaries_are_ignored_and_cleaned(model, tokenizer, tmp_path):
    save_step(tmp_path, 10, model, tokenizer)
    stray = tmp_path / "checkpoints" / f".tmp-step_000020-{DEAD_PID}"  # a crash mid-save of step 20
    stray.mkdir()
    (stray / "model.safetensors").write_bytes(b"\0" * 10)
    assert ckpt.find_resume_checkpoint(tmp_path).name == "step_000010"
    (tmp_path / "checkpoints" / f".tmp-step_000005-{DEAD_PID}").mkdir()  # a crashed deletion
    save_step(tmp_path, 20, model, tokenizer)
    assert entries(tmp_path / "checkpoints") == ["latest", "step_000010", "step_000020"]


def test_verify_detects_flipped_byte_truncation_and_missing_files(model, tokenizer, tmp_path):
    path = ckpt.save_checkpoint(tmp_path / "c", model, tokenizer)
    weights = path / "model.safetensors"
    original = weights.read_bytes()
    flipped = bytearray(original)
    flipped[-5] ^= 0xFF
    weights.write_bytes(bytes(flipped))
    with pytest.raises(SmolforgeError, match=r"model\.safetensors is corrupt: its sha256"):
        ckpt.verify_checkpoint(path)
    weights.write_bytes(original[:100])
    with pytest.raises(SmolforgeError, match=r"model\.safetensors is truncated"):
        ckpt.load_model(path)
    with pytest.raises(SmolforgeError, match="cannot read the weights"):
        ckpt.load_model(path, verify=False)
    weights.write_bytes(original)
    ckpt.verify_checkpoint(path)
    (path / "tokenizer.json").unlink()
    with pytest.raises(SmolforgeError, match=r"tokenizer\.json is missing"):
        ckpt.verify_checkpoint(path)
    (path / "smolforge.json").write_text("{not json")
    with pytest.raises(SmolforgeError, match=r"smolforge\.json is corrupt"):
        ckpt.verify_checkpoint(path)


def test_refuses_to_replace_a_directory_that_is_not_a_checkpoint(model, tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "notes.txt").write_text("precious")
    with pytest.raises(SmolforgeError, match="not a smolforge checkpoint"):
        ckpt.save_checkpoint(tmp_path / "c", model)
    assert entries(tmp_path / "c") == ["notes.txt"]


def test_run_checkpoints_latest_and_resume_fallback(model, tokenizer, tmp_path):
    root = tmp_path / "checkpoints"
    for step in (10, 20, 30):
        save_step(tmp_path, step, model, tokenizer)
    assert (root / "latest").read_text().strip() == "step_000030"
    assert ckpt.read_meta(root / "step_000030")["step"] == 30
    assert ckpt.find_resume_checkpoint(tmp_path).name == "step_000030"

    weights = root / "step_000030" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])  # truncated by a crash or a full disk
    with pytest.warns(UserWarning, match="step_000030.*truncated"):
        assert ckpt.find_resume_checkpoint(tmp_path).name == "step_000020"
    (root / "step_000020" / "trainer_state.pt").write_bytes(b"garbage")
    with pytest.warns(UserWarning) as caught:
        assert ckpt.find_resume_checkpoint(tmp_path).name == "step_000010"
    assert ["step_000030" in str(w.message) for w in caught] == [True, False]
    assert "step_000020" in str(caught[1].message) and "trainer_state.pt is" in str(caught[1].message)
    assert ckpt.load_trainer_state(root / "step_000010")["step"] == 10


def test_latest_lagging_behind_a_complete_checkpoint(model, tmp_path):
    for step in (10, 20):
        save_step(tmp_path, step, model)
    (tmp_path / "checkpoints" / "latest").write_text("step_000010\n")  # crash before `latest` moved
    with pytest.warns(UserWarning, match="newest complete checkpoint is step_000020"):
        assert ckpt.find_resume_checkpoint(tmp_path).name == "step_000020"


def test_keep_last_prunes_by_step_number(model, tmp_path):
    for step in (1, 2, 3, 4):
        save_step(tmp_path, step, model, keep_last=2)
    assert entries(tmp_path / "checkpoints") == ["latest", "step_000003", "step_000004"]
    for step in (999_999, 1_000_000):  # names stop sorting like numbers past six digits
        save_step(tmp_path, step, model, keep_last=1)
    assert entries(tmp_path / "checkpoints") == ["latest", "step_1000000"]
    assert ckpt.find_resume_checkpoint(tmp_path).name == "step_1000000"


def test_no_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(SmolforgeError, match="no usable checkpoint in .*checkpoints: start without --resume"):
        ckpt.find_resume_checkpoint(tmp_path)
    with pytest.raises(SmolforgeError, match="no such directory"):
        ckpt.load_model(tmp_path / "missing")
    with pytest.raises(SmolforgeError, match="not a model directory.*config.json"):
        ckpt.load_model(tmp_path)


def test_final_model_has_no_trainer_state(model, tmp_path):
    path = ckpt.save_checkpoint(tmp_path / "final", model)
    with pytest.raises(SmolforgeError, match="not a resumable checkpoint"):
        ckpt.load_trainer_state(path)


def test_sharded_hugging_face_directory_loads(model, tokenizer, tmp_path):
    path = ckpt.save_checkpoint(tmp_path / "c", model, tokenizer)
    (path / "smolforge.json").unlink()  # now a plain Hugging Face directory
    tensors = load_file(path / "model.safetensors")
    (path / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, path / shard, metadata={"format": "pt"})
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert ckpt.read_meta(path) == {}
    loaded, _ = ckpt.load_model(path)
    x = torch.randint(0, 384, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, atol=0, rtol=0)


def test_a_full_disk_keeps_the_previous_checkpoint_and_says_so(tmp_path, monkeypatch):
    import errno

    model = Transformer(debug().model_copy(update={"vocab_size": 128}))
    path = ckpt.save_checkpoint(tmp_path / "ck", model, meta={"step": 1})
    before = {p.name: p.read_bytes() for p in path.iterdir()}

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "save_file", full)
    with pytest.raises(SmolforgeError, match="no space left on the device .* previous checkpoint there is intact"):
        ckpt.save_checkpoint(tmp_path / "ck", model, meta={"step": 2})
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # no temporary left behind
