"""`smolforge dpo` end to end on a tiny model: the preference is learned, for several losses."""

from __future__ import annotations

import json
import math

import pytest
from conftest import write_preference_run

from smolforge.cli import main

WORDS = ["king", "queen", "rose", "moon", "ship", "crown", "bell", "fire", "wind", "gold"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo")
    pairs = [{"prompt": f"say {w}", "chosen": f"{w} {w}", "rejected": f"no {w}"} for w in WORDS] * 4
    return write_preference_run(root, pairs, WORDS)


@pytest.mark.parametrize("objective", ["dpo", "apo_zero", "ipo", "kto", "simpo", "orpo"])
def test_a_tiny_preference_run_learns_the_preference(objective, setup, tmp_path):
    args = ["dpo", "--run.dir", str(tmp_path), "--run.name", objective, "--run.init_from", str(setup / "base"),
            "--data.train", json.dumps([{"path": str(setup / "pairs.jsonl")}]), "--data.template", "chatml",
            "--data.seq_len", "64", "--data.val_fraction", "0.1", "--train.objective", objective,
            "--train.epochs", "0", "--train.max_steps", "24", "--train.batch_size", "4", "--train.grad_accum", "1",
            "--train.lr", "3e-3", "--train.log_every", "1", "--train.eval_every", "0", "--train.save_every", "0",
            "--train.threads", "1"]
    assert main(args) == 0
    log = [json.loads(line) for line in (tmp_path / objective / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in log if "loss" in r]
    if objective in ("dpo", "apo_zero", "ipo", "kto"):  # reference-based: start exactly at the reference
        first = {"dpo": math.log(2), "apo_zero": 1.0, "ipo": None, "kto": None}[objective]
        if first is not None:
            assert steps[0]["loss"] == pytest.approx(first, abs=1e-4)
    late = steps[-5:]
    assert sum(r["rewards/margins"] for r in late) > 0
    val = [r for r in log if "val_loss" in r][-1]
    assert val["val_rewards_margins"] > 0 and val["val_loss"] < steps[0]["loss"]
    if objective != "kto":  # KTO's examples are unpaired: no pairwise accuracy
        assert sum(r["rewards/accuracies"] for r in late) / len(late) > 0.9
        assert val["val_rewards_accuracies"] > 0.5
    meta = json.loads((tmp_path / objective / "final" / "smolforge.json").read_text())
    assert meta["stage"] == "dpo" and meta["parent"] == str(setup / "base")


def test_reward_stage_learns_the_preference_and_exports_a_sequence_classifier(setup, tmp_path):
    transformers = pytest.importorskip("transformers")
    args = ["reward", "--run.dir", str(tmp_path), "--run.name", "rm", "--run.init_from", str(setup / "base"),
            "--data.train", json.dumps([{"path": str(setup / "pairs.jsonl")}]), "--data.template", "chatml",
            "--data.seq_len", "64", "--data.val_fraction", "0.1", "--train.epochs", "0", "--train.max_steps", "30",
            "--train.batch_size", "4", "--train.grad_accum", "1", "--train.lr", "3e-3", "--train.log_every", "1",
            "--train.eval_every", "0", "--train.save_every", "10", "--train.threads", "1"]
    assert main(args) == 0
    log = [json.loads(line) for line in (tmp_path / "rm" / "metrics.jsonl").read_text().splitlines()]
    late = [r for r in log if "loss" in r][-5:]
    assert sum(r["accuracy"] for r in late) / len(late) > 0.9
    assert [r for r in log if "val_loss" in r][-1]["val_accuracy"] > 0.5
    final = tmp_path / "rm" / "final"
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(final)
    assert type(hf).__name__ == "LlamaForSequenceClassification" and hf.config.num_labels == 1
    records = [{"prompt": "say king", "response": "king king"}, {"prompt": "say king", "response": "no king"}]
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main(["score", str(final), "--data", str(tmp_path / "r.jsonl"), "--out", str(tmp_path / "s.jsonl")]) == 0
    scores = [json.loads(line)["reward"] for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert scores[0] > scores[1]
