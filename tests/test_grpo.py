"""GRPO: the losses against hand-computed values, and tiny runs of `smolforge grpo` that learn."""

from __future__ import annotations

import json
import math

import pytest
import torch

from smolforge.cli import main
from smolforge.config import GRPORecipe, load_recipe
from smolforge.model import ModelConfig, ModelOutput, Transformer, debug
from smolforge.quickstart import bundled_recipe
from smolforge.train.checkpoint import load_model, save_checkpoint
from smolforge.train.grpo import (
    clipped_surrogate,
    group_advantages,
    grpo_objective,
    k3_kl,
    normalise_loss,
    token_log_probs,
)
from smolforge.train.loop import step_weights, train

# --- the pure functions -------------------------------------------------------------------------


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    # group 1: mean 0.5, sample std sqrt((4 * 0.25) / 3) = 0.57735; group 2: all equal -> 0
    std = math.sqrt(1 / 3)
    want = [0.5 / (std + 1e-4), -0.5 / (std + 1e-4), -0.5 / (std + 1e-4), 0.5 / (std + 1e-4), 0, 0, 0, 0]
    assert group_advantages(rewards, 4).tolist() == pytest.approx(want, abs=1e-6)
    assert group_advantages(rewards, 4, scale=False).tolist() == [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]  # Dr. GRPO
    with pytest.raises(ValueError, match="multiple of group_size"):
        group_advantages(rewards, 3)


def test_clipped_surrogate_by_hand_and_where_its_gradient_stops():
    old = torch.zeros(1, 3)
    logps = torch.log(torch.tensor([[1.5, 0.5, 1.1]])).requires_grad_()
    advantages = torch.tensor([1.0])
    loss, low, high = clipped_surrogate(logps, old, advantages, 0.2, 0.2)
    # ratio 1.5, A > 0: min(1.5, 1.2) -> -1.2 (clipped); ratio 0.5: min(0.5, 0.8) -> -0.5; ratio 1.1: -1.1
    assert loss[0].tolist() == pytest.approx([-1.2, -0.5, -1.1])
    assert high.tolist() == [[True, False, False]] and not low.any()
    loss.sum().backward()
    # d(-ratio * A)/d logp = -ratio * A where unclipped, 0 where the clip is active
    assert logps.grad[0].tolist() == pytest.approx([0.0, -0.5, -1.1])
    negative = clipped_surrogate(logps.detach(), old, torch.tensor([-1.0]), 0.2, 0.28)
    # A < 0: ratio 0.5 is clipped at 0.8 -> -(0.8 * -1) = 0.8; ratio 1.5 keeps -(1.5 * -1)
    assert negative[0][0].tolist() == pytest.approx([1.5, 0.8, 1.1]) and negative[1].tolist() == [[False, True, False]]
    higher = clipped_surrogate(logps.detach(), old, advantages, 0.2, 0.28)[0]  # DAPO's clip-higher
    assert higher[0, 0].item() == pytest.approx(-1.28)


def test_k3_kl_by_hand_and_unbiased_on_policy_samples():
    assert k3_kl(torch.log(torch.tensor(0.5)), torch.log(torch.tensor(0.25))).item() == pytest.approx(0.5 + math.log(2) - 1)
    assert k3_kl(torch.tensor(-1.3), torch.tensor(-1.3)).item() == 0.0
    gen = torch.Generator().manual_seed(0)
    p, q = torch.tensor([0.6, 0.3, 0.1]), torch.tensor([0.2, 0.5, 0.3])
    tokens = torch.multinomial(p, 200_000, replacement=True, generator=gen)
    estimate = k3_kl(p.log()[tokens], q.log()[tokens]).mean().item()
    assert estimate == pytest.approx((p * (p / q).log()).sum().item(), rel=0.02)
    assert (k3_kl(p.log()[tokens], q.log()[tokens]) >= 0).all()


def test_the_three_loss_normalisations_by_hand():
    per_token = torch.tensor([[1.0, 2.0, 3.0, 9.0], [4.0, 9.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]]).bool()
    assert normalise_loss(per_token, mask, "grpo").item() == pytest.approx((6 / 3 + 4 / 1) / 2)
    assert normalise_loss(per_token, mask, "dr_grpo", 4).item() == pytest.approx(10 / (2 * 4))
    assert normalise_loss(per_token, mask, "dapo").item() == pytest.approx(10 / 4)


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_micro_batches_weighted_by_the_loop_equal_the_whole_batch(loss_type):
    """The loader's step weights (completions for grpo and dr_grpo, tokens for dapo) make the loop's
    sum over micro-batches equal to the loss over the whole step."""
    gen = torch.Generator().manual_seed(1)
    per_token = torch.randn(6, 5, generator=gen)
    mask = torch.rand(6, 5, generator=gen) > 0.4
    whole = normalise_loss(per_token, mask, loss_type, 5)
    parts = [slice(0, 2), slice(2, 6)]
    batches = [{"labels": torch.where(mask[s], 1, -100)} for s in parts]
    if loss_type != "dapo":
        for b, s in zip(batches, parts):
            b["step_weight"] = torch.tensor(float(s.stop - s.start))
    weights = step_weights(batches)
    split = sum(w * normalise_loss(per_token[s], mask[s], loss_type, 5) for w, s in zip(weights, parts))
    assert split.item() == pytest.approx(whole.item(), abs=1e-6)


def _fake_batch(labels, advantages, **extra):
    return {"labels": labels, "advantages": advantages, **extra}


class _Cfg:
    loss_type, epsilon, epsilon_high, beta = "dapo", 0.2, None, 0.0


def test_on_policy_objective_is_the_group_baselined_policy_gradient():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 7, generator=gen).requires_grad_()
    labels = torch.tensor([[-100, 3, 5, -100], [-100, -100, 1, 2]])
    advantages = torch.tensor([1.5, -0.5])
    loss, metrics = grpo_objective(ModelOutput(logits), _fake_batch(labels, advantages, temperature=torch.tensor(0.7)), _Cfg())
    grad = torch.autograd.grad(loss, logits)[0]
    logps = token_log_probs(logits, labels, 0.7)
    mask = labels != -100
    reference = -(advantages[:, None] * logps * mask).sum() / mask.sum()  # REINFORCE with the group baseline
    assert loss.item() == pytest.approx(-(advantages[:, None] * mask).sum().item() / mask.sum().item())
    assert torch.allclose(grad, torch.autograd.grad(reference, logits)[0], atol=1e-6)
    assert metrics["clip_fraction"].item() == 0.0 and 0 < metrics["entropy"].item() < math.log(7)


def test_objective_with_old_and_reference_log_probs_by_hand():
    logits = torch.zeros(1, 2, 2, requires_grad=True)  # uniform over 2 tokens: log-prob log 0.5
    labels = torch.tensor([[1, -100]])
    # off the completion, old and reference log-probs are 0 (the loader's contract); an inf would not leak either
    batch = _fake_batch(labels, torch.tensor([1.0]), old_logps=torch.log(torch.tensor([[0.25, 1.0]])),
                        ref_logps=torch.log(torch.tensor([[0.25, 0.0]])))
    cfg = _Cfg()
    cfg.beta = 0.1
    loss, metrics = grpo_objective(ModelOutput(logits), batch, cfg)
    kl = 0.5 + math.log(2) - 1  # k3 with ref / policy = 0.5
    assert loss.item() == pytest.approx(-1.2 + 0.1 * kl)  # ratio 2 clipped at 1.2
    assert metrics["kl"].item() == pytest.approx(kl) and metrics["clip_fraction/high"].item() == 1.0
    assert metrics["entropy"].item() == pytest.approx(math.log(2))
    cfg.beta = 0.1
    with pytest.raises(Exception, match="ref_logps"):
        grpo_objective(ModelOutput(logits), _fake_batch(labels, torch.tensor([1.0])), cfg)
    with pytest.raises(Exception, match="advantages"):
        grpo_objective(ModelOutput(logits), {"labels": labels}, _Cfg())


# --- tiny runs ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def setup(tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo")
    torch.manual_seed(0)
    save_checkpoint(root / "base", Transformer(ModelConfig(**{**debug().model_dump(), "vocab_size": 384})), tokenizer)
    prompts = [{"prompt": f"say {w}"} for w in ("fox", "dog", "the", "quick")]
    (root / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    return root


def recipe(setup, tmp_path, name: str, **overrides) -> GRPORecipe:
    """A toy task: reward 1 when the completion contains the letter 'o' (about 1 in 5 at first)."""
    values = {"run.dir": str(tmp_path), "run.name": name, "run.init_from": str(setup / "base"),
              "data.train": [{"path": str(setup / "prompts.jsonl")}], "data.template": "chatml", "data.seq_len": 64,
              "grpo.rewards": [{"name": "contains", "text": "o"}], "grpo.group_size": 8, "grpo.prompts_per_step": 2,
              "grpo.max_new_tokens": 8, "train.batch_size": 16, "train.grad_accum": 1, "train.max_steps": 30,
              "train.lr": 1e-2, "train.threads": 1, "train.save_every": 0, "train.log_every": 1}
    values.update({k.replace("__", "."): v for k, v in overrides.items()})
    return load_recipe(None, values, GRPORecipe)


def records(run_dir) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_a_tiny_grpo_run_learns_to_emit_the_rewarded_letter(setup, tmp_path):
    result = train(recipe(setup, tmp_path, "toy"), stage="grpo")
    log = records(result.run_dir)
    rewards = [r["reward"] for r in log]
    assert len(rewards) == 30
    assert sum(rewards[:5]) / 5 < 0.6 and sum(rewards[-5:]) / 5 > 0.9  # from ~0.35 to ~1
    last = log[-1]
    for key in ("rewards/contains", "rewards/contains_std", "reward_std", "clip_fraction", "entropy",
                "completion/mean_length", "completion/max_length", "completion/truncated", "rollout/tokens_per_s",
                "rollout/flat_groups", "time/generate_s", "time/train_s", "time/score_s"):
        assert key in last and math.isfinite(last[key]), key
    assert log[-1]["entropy"] < log[0]["entropy"]  # the policy sharpens
    meta = json.loads((result.final_checkpoint / "smolforge.json").read_text())
    assert meta["stage"] == "grpo" and meta["parent"] == str(setup / "base")


def test_several_steps_per_rollout_and_a_cached_or_online_reference(setup, tmp_path):
    common = {"train__batch_size": 8, "grpo__num_iterations": 2, "train__loss_type": "grpo", "train__beta": 0.1,
              "train__max_steps": 12}
    cached = records(train(recipe(setup, tmp_path, "cached", **common), stage="grpo").run_dir)
    online = records(train(recipe(setup, tmp_path, "online", grpo__reference="online", **common), stage="grpo").run_dir)
    assert [r["loss"] for r in cached] == [r["loss"] for r in online]  # the same numbers, computed twice as often
    assert cached[0]["kl"] == 0.0 and max(r["kl"] for r in cached) > 0  # starts at the reference, then moves
    assert max(r["clip_fraction"] for r in cached) > 0  # later passes over a rollout are off-policy: the clip acts
    # a rollout feeds 4 optimizer steps (2 micro-batches x 2 passes): its reward is logged 4 times
    assert len({r["reward"] for r in cached[:4]}) == 1


def test_resume_after_a_crash_equals_the_uninterrupted_run(setup, tmp_path, monkeypatch, crash_on_call):
    from smolforge.train import objectives

    common = {"train__batch_size": 8, "grpo__num_iterations": 2, "train__max_steps": 8, "train__save_every": 3}
    want = [(r["step"], r["loss"], r["reward"]) for r in records(train(recipe(setup, tmp_path, "a", **common)).run_dir)]
    # the 5th call is in step 5: after the step-3 checkpoint, in the middle of a rollout
    monkeypatch.setitem(objectives.OBJECTIVES, "crashy", crash_on_call(grpo_objective, 5))
    with pytest.raises(RuntimeError, match="injected crash"):
        train(recipe(setup, tmp_path, "b", train__objective="crashy", **common))
    resumed = train(recipe(setup, tmp_path, "b", train__objective="crashy", **common), resume=True)
    got = [(r["step"], r["loss"], r["reward"]) for r in records(resumed.run_dir)]
    assert got == want


def test_lora_grpo_trains_adapters_only_and_the_base_is_the_reference(setup, tmp_path, capsys):
    from smolforge.train.lora import merge_adapter_checkpoint

    result = train(recipe(setup, tmp_path, "lora", lora__r=4, lora__alpha=8, train__beta=0.05, train__lr=3e-2,
                          train__max_steps=6), stage="grpo")
    assert "reference model" not in capsys.readouterr().out  # no second model: adapters off = the base
    log = records(result.run_dir)
    assert log[0]["kl"] == pytest.approx(0.0, abs=1e-7) and log[-1]["kl"] > 0
    merged, _ = load_model(result.final_checkpoint)
    base, _ = load_model(setup / "base")
    assert not torch.equal(merged.model.layers[0].self_attn.q_proj.weight, base.model.layers[0].self_attn.q_proj.weight)
    assert torch.equal(merged.model.embed_tokens.weight, base.model.embed_tokens.weight)
    # the final model is exactly the base plus the saved adapters: nothing else was trained
    again = merge_adapter_checkpoint(result.run_dir / "adapter", setup / "base", tmp_path / "remerged")
    remerged, _ = load_model(again)
    for (name, p), q in zip(merged.state_dict().items(), remerged.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=name)


def test_the_grpo_command_runs_and_reports_bad_recipes(setup, tmp_path, capsys):
    args = ["grpo", "--run.dir", str(tmp_path), "--run.name", "cli", "--run.init_from", str(setup / "base"),
            "--data.train", json.dumps([{"path": str(setup / "prompts.jsonl")}]), "--data.template", "chatml",
            "--data.seq_len", "64", "--grpo.rewards", "[{name: contains, text: o}, {name: overlong, weight: 0.5}]",
            "--grpo.group_size", "4", "--grpo.prompts_per_step", "2", "--grpo.max_new_tokens", "6",
            "--train.batch_size", "8", "--train.grad_accum", "1", "--train.max_steps", "3", "--train.threads", "1"]
    assert main(args) == 0
    assert (tmp_path / "cli" / "report.md").is_file() and (tmp_path / "cli" / "final" / "model.safetensors").is_file()
    assert "rewards/overlong" in records(tmp_path / "cli")[-1]
    capsys.readouterr()
    assert main([*args[:-2], "--grpo.rewards", "[{name: smoltask}]", "--run.name", "bad"]) == 2
    assert "grpo.rewards[0].name: unknown reward 'smoltask'" in capsys.readouterr().err
    assert main([*args, "--train.batch_size", "3", "--run.name", "bad2"]) == 2
    assert "not a multiple of train.batch_size x train.grad_accum" in capsys.readouterr().err
    assert main([*args, "--train.beta", "0.1", "--run.init_from", "''", "--model.preset", "debug",
                 "--data.tokenizer", str(setup / "base"), "--run.name", "bad3"]) == 2
    assert "train.beta > 0 needs a reference model" in capsys.readouterr().err


def test_the_bundled_quickstart_recipe_is_valid():
    r = load_recipe(bundled_recipe("quickstart-grpo.yaml"), {"run.init_from": "runs/quickstart/sft/final",
                                                              "data.train": [{"path": "prompts.jsonl"}]}, GRPORecipe)
    assert r.train.objective == "grpo" and [s.name for s in r.grpo.rewards] == ["smol_task", "think_format", "overlong"]
    assert r.grpo.prompts_per_step * r.grpo.group_size == r.train.batch_size * r.train.grad_accum
