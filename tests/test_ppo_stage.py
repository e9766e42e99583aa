"""`smolforge ppo` and `smolforge rlhf`: tiny runs that learn, resume, and refuse bad recipes."""

from __future__ import annotations

import json
import math

import pytest
import torch

from smolforge.cli import main
from smolforge.config import PPORecipe, RLHFRecipe, load_recipe
from smolforge.data.sft import resolve_template
from smolforge.model import ModelConfig, Transformer, debug
from smolforge.quickstart import bundled_recipe
from smolforge.tokenizer import Tokenizer
from smolforge.train import ppo_stage
from smolforge.train.checkpoint import load_model, save_checkpoint
from smolforge.train.ppo_stage import train_ppo
from smolforge.train.reward import RewardModel, load_reward_model, save_reward_model

WORDS = ("fox", "dog", "the", "quick")


@pytest.fixture(scope="module")
def setup(tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("ppo")
    torch.manual_seed(0)
    base = Transformer(ModelConfig(**{**debug().model_dump(), "vocab_size": 384}))
    save_checkpoint(root / "base", base, tokenizer)
    rm_tokenizer = Tokenizer.load(root / "base")
    rm_tokenizer.chat_template = resolve_template("chatml", rm_tokenizer)  # the reward model renders with its own
    save_reward_model(root / "rm", RewardModel.from_causal(base, pad_id=rm_tokenizer.pad_id), rm_tokenizer)
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"say {w}"}) + "\n" for w in WORDS))
    return root


def recipe(setup, tmp_path, name: str, **overrides) -> PPORecipe:
    """A toy task: reward 1 when the completion contains the letter 'o' (about 1 in 3 at first)."""
    values = {"run.dir": str(tmp_path), "run.name": name, "run.init_from": str(setup / "base"),
              "data.train": [{"path": str(setup / "prompts.jsonl")}], "data.template": "chatml", "data.seq_len": 64,
              "ppo.rewards": [{"name": "contains", "text": "o"}], "ppo.max_new_tokens": 8,
              "ppo.ppo_iterations": 12, "ppo.ppo_batch_size": 16, "ppo.ppo_mini_batch_size": 8, "ppo.ppo_epochs": 2,
              "ppo.ppo_lr_policy": 3e-3, "ppo.ppo_lr_value": 3e-3, "ppo.init_kl_coef": 0.05, "ppo.target_kl": 1.0,
              "ppo.kl_horizon": 1000, "train.threads": 1, "train.save_every": 0}
    values.update({k.replace("__", "."): v for k, v in overrides.items()})
    return load_recipe(None, values, PPORecipe)


def records(run_dir) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_a_tiny_ppo_run_raises_the_reward_with_bounded_kl(setup, tmp_path):
    result = train_ppo(recipe(setup, tmp_path, "toy"))
    log = records(result.run_dir)
    rewards = [r["reward"] for r in log]
    assert len(rewards) == 12
    assert sum(rewards[:3]) / 3 + 0.3 < sum(rewards[-3:]) / 3
    assert log[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # the first rollouts come from the reference itself
    assert max(r["kl"] for r in log) < 6.0 and log[-1]["kl"] > 0
    assert log[-1]["kl_coef"] > log[0]["kl_coef"]  # the KL went over its target: beta went up
    for key in ("reward_std", "rewards/contains", "non_score_reward", "policy_loss", "value_loss", "clipfrac",
                "value_clipfrac", "approx_kl", "entropy", "explained_variance", "completion/mean_length",
                "completion/truncated", "rollout/tokens_per_s", "time/generate_s", "time/train_s"):
        assert key in log[-1] and math.isfinite(log[-1][key]), key
    meta = json.loads((result.final_checkpoint / "smolforge.json").read_text())
    assert meta["stage"] == "ppo" and meta["parent"] == str(setup / "base")
    load_model(result.final_checkpoint)
    critic, _ = load_reward_model(result.run_dir / "critic")
    assert critic.config.vocab_size == 384


def test_resume_after_an_interruption_equals_the_uninterrupted_run(setup, tmp_path, monkeypatch, crash_on_call):
    common = {"ppo__ppo_iterations": 5, "train__save_every": 2}
    want = [(r["step"], r["reward"], r["policy_loss"], r["kl_coef"]) for r in records(train_ppo(
        recipe(setup, tmp_path, "a", **common)).run_dir)]
    real_update = ppo_stage.ppo_update
    # iteration 4: after the step-2 checkpoint
    monkeypatch.setattr(ppo_stage, "ppo_update", crash_on_call(real_update, 4))
    with pytest.raises(RuntimeError, match="injected crash"):
        train_ppo(recipe(setup, tmp_path, "b", **common))
    monkeypatch.setattr(ppo_stage, "ppo_update", real_update)
    with pytest.raises(Exception, match="already holds checkpoints"):
        train_ppo(recipe(setup, tmp_path, "b", **common))
    resumed = train_ppo(recipe(setup, tmp_path, "b", **common), resume=True)
    got = [(r["step"], r["reward"], r["policy_loss"], r["kl_coef"]) for r in records(resumed.run_dir)]
    assert got == want


def test_a_reward_model_and_a_lora_policy(setup, tmp_path):
    result = train_ppo(recipe(setup, tmp_path, "rm", ppo__reward_model=str(setup / "rm"), ppo__value_init="reward_model",
                              ppo__ppo_iterations=2, lora__r=4, lora__alpha=8))
    log = records(result.run_dir)
    assert "score" in log[-1] and "rewards/reward_model" in log[-1] and "rewards/contains" in log[-1]
    assert log[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # adapters off = the start policy = the reference
    assert (result.run_dir / "adapter").is_dir()


def test_the_ppo_command_and_bad_recipes(setup, tmp_path, capsys):
    args = ["ppo", "--run.dir", str(tmp_path), "--run.name", "cli", "--run.init_from", str(setup / "base"),
            "--data.train", json.dumps([{"path": str(setup / "prompts.jsonl")}]), "--data.template", "chatml",
            "--data.seq_len", "64", "--ppo.reward_model", str(setup / "rm"), "--ppo.max_new_tokens", "6",
            "--ppo.ppo_batch_size", "8", "--ppo.ppo_mini_batch_size", "4", "--ppo.ppo_epochs", "1",
            "--ppo.ppo_iterations", "2", "--train.threads", "1"]
    assert main(args) == 0
    assert (tmp_path / "cli" / "report.md").is_file() and (tmp_path / "cli" / "final" / "model.safetensors").is_file()
    capsys.readouterr()
    assert main([*args, "--ppo.ppo_mini_batch_size", "3", "--run.name", "bad"]) == 2
    assert "ppo.ppo_mini_batch_size (3) must divide" in capsys.readouterr().err
    assert main([*args, "--ppo.reward_model", "''", "--run.name", "bad2"]) == 2
    assert "no reward: set ppo.reward_model" in capsys.readouterr().err
    assert main([*args, "--ppo.rewards", "[{name: containz}]", "--run.name", "bad3"]) == 2
    assert "ppo.rewards[1].name: unknown reward 'containz'" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "say fox"}\n{"question": "no prompt"}\n')
    assert main([*args, "--data.train", json.dumps([{"path": str(bad)}]), "--run.name", "bad4"]) == 2
    assert f"{bad}:2 field 'prompt': missing" in capsys.readouterr().err
    assert main([*args, "--ppo.max_new_tokens", "64", "--run.name", "bad5"]) == 2
    assert "ppo.max_new_tokens (64) leaves no room" in capsys.readouterr().err


# --- smolforge rlhf -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rlhf_data(setup):
    sft = [{"messages": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": w}]} for w in WORDS]
    (setup / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft * 4))
    pairs = [{"prompt": f"say {w}", "chosen": w, "rejected": "the lazy dog" if w != "dog" else "fox"} for w in WORDS]
    (setup / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs * 4))
    return setup


def rlhf_args(data, tmp_path, name: str) -> list[str]:
    common = {"template": "chatml", "seq_len": 64}
    recipe = {
        "run": {"dir": str(tmp_path), "name": name, "init_from": str(data / "base")},
        "sft": {"data": {**common, "train": [{"path": str(data / "sft.jsonl")}], "val_fraction": 0},
                "train": {"max_steps": 3, "epochs": 0, "batch_size": 4, "grad_accum": 1, "lr": 1e-3, "threads": 1,
                          "save_every": 0}},
        "reward": {"data": {**common, "train": [{"path": str(data / "pairs.jsonl")}], "val_fraction": 0},
                   "train": {"max_steps": 3, "epochs": 0, "batch_size": 4, "grad_accum": 1, "lr": 1e-3, "threads": 1,
                             "save_every": 0}},
        "ppo": {"data": {**common, "train": [{"path": str(data / "prompts.jsonl")}]},
                "ppo": {"max_new_tokens": 6, "ppo_batch_size": 8, "ppo_mini_batch_size": 4, "ppo_epochs": 1,
                        "ppo_iterations": 3},
                "train": {"threads": 1, "save_every": 1}},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps(recipe))  # JSON is YAML
    return ["rlhf", str(path)]


def test_rlhf_runs_the_three_stages_and_resumes_after_an_interruption(rlhf_data, tmp_path, monkeypatch, capsys, crash_on_call):
    args = rlhf_args(rlhf_data, tmp_path, "pipe")
    real_update = ppo_stage.ppo_update
    # PPO's second iteration, after its first checkpoint
    monkeypatch.setattr(ppo_stage, "ppo_update", crash_on_call(real_update, 2))
    with pytest.raises(RuntimeError, match="injected crash"):
        main(args)
    root = tmp_path / "pipe"
    assert (root / "sft" / "final").is_dir() and (root / "reward_model" / "final").is_dir()
    assert not (root / "ppo" / "final").exists()
    sft_meta = (root / "sft" / "final" / "smolforge.json").read_text()
    monkeypatch.setattr(ppo_stage, "ppo_update", real_update)
    capsys.readouterr()
    assert main(args) == 2  # an unfinished stage needs --resume
    assert "--resume" in capsys.readouterr().err
    assert main([*args, "--resume"]) == 0
    out = capsys.readouterr()
    assert "sft: skipped" in out.out and "reward: skipped" in out.out and "resuming from step_000001" in out.out
    assert (root / "sft" / "final" / "smolforge.json").read_text() == sft_meta  # not trained again
    for folder in ("sft", "reward_model", "ppo"):
        assert (root / folder / "final" / "config.json").is_file()
    assert json.loads((root / "ppo" / "final" / "smolforge.json").read_text())["parent"] == str(root / "sft" / "final")
    reward_meta = json.loads((root / "reward_model" / "final" / "smolforge.json").read_text())
    assert reward_meta["stage"] == "reward" and reward_meta["parent"] == str(root / "sft" / "final")
    logs = sorted(p.name for p in (root / "logs").iterdir())
    assert logs == ["pipeline.jsonl", "ppo.jsonl", "reward_model.jsonl", "sft.jsonl"]
    events = [json.loads(line) for line in (root / "logs" / "pipeline.jsonl").read_text().splitlines()]
    assert [(e["stage"], e["event"]) for e in events[-4:]] == [("sft", "skipped"), ("reward", "skipped"),
                                                                ("ppo", "resumed"), ("ppo", "finished")]
    assert len(records(root / "ppo")) == 3


def test_rlhf_recipes_fill_the_chain_and_report_bad_keys(tmp_path, capsys):
    r = load_recipe(bundled_recipe("quickstart-rlhf.yaml"), None, RLHFRecipe)
    root = f"{r.run.dir}/{r.run.name}"
    assert r.sft.run.init_from == r.run.init_from and r.sft.run.name == "sft"
    assert r.reward.run.init_from == f"{root}/sft/final" and r.reward.run.name == "reward_model"
    assert r.ppo.run.init_from == f"{root}/sft/final" and r.ppo.ppo.reward_model == f"{root}/reward_model/final"
    assert r.ppo.run.dir == root
    bad = tmp_path / "bad.yaml"
    bad.write_text("sft: {train: {lrr: 1}}\n")
    assert main(["rlhf", str(bad)]) == 2
    assert "sft.train.lrr: unknown key (did you mean 'lr'?)" in capsys.readouterr().err
