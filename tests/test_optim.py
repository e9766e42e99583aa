"""train.optimizer: muon: which tensors Muon takes, its combined step and exact resume."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch
from conftest import assert_same_weights

from smolforge.config import TrainConfig, load_recipe
from smolforge.model import Transformer, debug
from smolforge.train.loop import train
from smolforge.train.lora import LoraSettings, apply_lora
from smolforge.train.optim import MuonWithAdamW, build_optimizer, muon_parameters, parameter_groups
from smolforge.train.reward import RewardModel

CPU = torch.device("cpu")


def tiny(**changes) -> Transformer:
    torch.manual_seed(0)
    return Transformer(debug().model_copy(update={"vocab_size": 100, **changes}))


def names(model: torch.nn.Module, params) -> set[str]:
    ids = {id(p) for p in params}
    return {name for name, p in model.named_parameters() if id(p) in ids}


def loss_of(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens).logits[:, :-1]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), tokens[:, 1:].reshape(-1))


def adamw_params(optimizer: MuonWithAdamW) -> list:
    return [p for group in optimizer.adamw.param_groups for p in group["params"]]


def test_muon_takes_the_hidden_matrices_only():
    model = tiny(tie_embeddings=False, n_experts=4, moe_intermediate_size=32, n_shared_experts=1,
                 attention_bias=True, qk_norm=True)
    optimizer = build_optimizer(model, TrainConfig(optimizer="muon"), CPU)
    on_muon = names(model, optimizer.muon.param_groups[0]["params"])
    want = {name for name, p in model.named_parameters()
            if ".layers." in f".{name}" and p.ndim == 2 and not name.endswith("mlp.gate.weight")}
    assert on_muon == want and len(want) == 2 * (4 + 3 * 4 + 3)  # attention 4, 4 experts, 1 shared
    on_adamw = names(model, adamw_params(optimizer))
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.layers.0.mlp.gate.weight",
            "model.layers.0.self_attn.q_proj.bias", "model.norm.weight"} <= on_adamw
    assert on_muon.isdisjoint(on_adamw) and on_muon | on_adamw == {n for n, _ in model.named_parameters()}
    # AdamW keeps its decay rule: the untied head and router decay, embeddings/norms/biases do not.
    decay, no_decay = (names(model, g["params"]) for g in optimizer.adamw.param_groups)
    assert decay == {n for n in on_adamw if n == "lm_head.weight" or n.endswith("mlp.gate.weight")}
    assert "model.embed_tokens.weight" in no_decay


def test_tied_embeddings_counted_once_and_score_head_on_adamw():
    model = tiny()  # tied: lm_head.weight is the embedding tensor
    optimizer = build_optimizer(model, TrainConfig(optimizer="muon"), CPU)
    everything = optimizer.muon.param_groups[0]["params"] + adamw_params(optimizer)
    assert len(everything) == len({id(p) for p in everything}) == len(list(model.parameters()))
    assert any(p is model.lm_head.weight for p in adamw_params(optimizer))
    reward = RewardModel(debug().model_copy(update={"vocab_size": 100}))
    assert names(reward, muon_parameters(reward)) == {
        n for n, p in reward.named_parameters() if n.startswith("model.layers.") and p.ndim == 2}
    assert "score.weight" in names(reward, adamw_params(build_optimizer(reward, TrainConfig(optimizer="muon"), CPU)))


def test_lora_adapters_stay_on_adamw():
    model = tiny()
    adapters = apply_lora(model, LoraSettings(r=4))
    assert muon_parameters(model) == []
    with pytest.warns(UserWarning, match="no hidden-layer matrix"):
        optimizer = build_optimizer(model, TrainConfig(optimizer="muon"), CPU)
    assert optimizer.muon is None
    assert {id(p) for p in adamw_params(optimizer)} == {id(p) for p in adapters}


def test_combined_step_equals_muon_and_adamw_applied_separately():
    model = tiny(tie_embeddings=False)
    twin = copy.deepcopy(model)
    cfg = TrainConfig(optimizer="muon", lr=0.02, weight_decay=0.1)
    combined = build_optimizer(model, cfg, CPU)
    matrices = muon_parameters(twin)
    muon = torch.optim.Muon(matrices, lr=0.02, weight_decay=0.1, momentum=0.95, adjust_lr_fn="match_rms_adamw")
    adamw = torch.optim.AdamW(parameter_groups(twin, 0.1, {id(p) for p in matrices}), lr=0.02,
                              betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    tokens = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(1))
    for lr in (0.02, 0.005):  # the loop's schedule writes lr into every group, both optimizers'
        for group in combined.param_groups:
            group["lr"] = lr
        for group in muon.param_groups + adamw.param_groups:
            group["lr"] = lr
        for net in (model, twin):
            loss_of(net, tokens).backward()
        combined.step()
        combined.zero_grad(set_to_none=True)
        muon.step()
        adamw.step()
        assert all(p.grad is None for p in model.parameters())
        for twin_grad in twin.parameters():
            twin_grad.grad = None
    moved = 0
    for (name, p), q, before in zip(model.named_parameters(), twin.parameters(),
                                    tiny(tie_embeddings=False).parameters()):
        assert torch.equal(p, q), name
        moved += not torch.equal(p, before)
    assert moved == len(list(model.parameters()))
    assert len(combined.state_dict()["muon"]["state"]) == len(matrices)  # one momentum buffer each


def test_optimizer_state_round_trips_and_refuses_adamw_state():
    model = tiny()
    optimizer = build_optimizer(model, TrainConfig(optimizer="muon"), CPU)
    tokens = torch.randint(0, 100, (2, 16))
    loss_of(model, tokens).backward()
    optimizer.step()
    fresh = build_optimizer(model, TrainConfig(optimizer="muon"), CPU)
    fresh.load_state_dict(optimizer.state_dict())
    a, b = optimizer.state_dict(), fresh.state_dict()
    for part in ("muon", "adamw"):
        for key, state in a[part]["state"].items():
            for name, value in state.items():
                assert torch.equal(value, b[part]["state"][key][name]), (part, key, name)
    with pytest.raises(Exception, match="another train.optimizer"):
        fresh.load_state_dict(build_optimizer(model, TrainConfig(), CPU).state_dict())


def test_muon_with_fsdp2_is_refused():
    with pytest.raises(Exception, match="muon is not supported with train.parallel: fsdp2"):
        TrainConfig(optimizer="muon", parallel="fsdp2")
    assert TrainConfig().optimizer == "adamw"


def muon_recipe(prepared: Path, run_dir: Path, **train):
    overrides = {
        "run.dir": str(run_dir), "run.name": "muon", "model.preset": "debug",
        "data.tokenizer": str(prepared / "tok"), "data.train": [{"path": str(prepared / "train")}],
        "data.val": [{"path": str(prepared / "val")}], "data.seq_len": 64,
        "train.optimizer": "muon", "train.batch_size": 4, "train.max_steps": 20, "train.lr": 3e-3,
        "train.warmup_steps": 3, "train.log_every": 1, "train.eval_every": 10, "train.eval_batches": 2,
        "train.save_every": 5, "train.keep_last": 5, "train.threads": 1,
    }
    overrides.update({f"train.{k}": v for k, v in train.items()})
    return load_recipe(None, overrides)


def losses(run_dir: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if "loss" in r]


def test_muon_pretraining_learns_and_resumes_exactly(prepared, tmp_path, crash_after_checkpoint):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a debug model has hidden matrices: Muon is really used
        reference = train(muon_recipe(prepared, tmp_path / "a"))
    want = losses(reference.run_dir)
    values = [loss for _, loss in want]
    assert len(values) == 20 and sum(values[-5:]) / 5 < sum(values[:5]) / 5 - 0.7

    crash_after_checkpoint(lambda: train(muon_recipe(prepared, tmp_path / "b")), step=10)
    resumed = train(muon_recipe(prepared, tmp_path / "b"), resume=True)
    assert losses(resumed.run_dir) == want  # bit-identical: both optimizers' states came back
    assert_same_weights(reference.final_checkpoint, resumed.final_checkpoint)


def test_plan_counts_muons_single_momentum_buffer():
    from smolforge.lab.plan import Setup, estimate, muon_matrices

    for changes in ({}, {"n_experts": 4, "moe_intermediate_size": 32, "n_shared_experts": 1, "tie_embeddings": False}):
        cfg = debug().model_copy(update={"vocab_size": 128, **changes})
        matrices = muon_parameters(Transformer(cfg))
        assert muon_matrices(cfg) == sum(p.numel() for p in matrices)
        recipes = [load_recipe(None, {"model.preset": "debug", "train.optimizer": name}) for name in ("adamw", "muon")]
        adamw, muon = (estimate(r, cfg, Setup()).memory["optimizer"] for r in recipes)
        assert adamw - muon == 4 * muon_matrices(cfg)
