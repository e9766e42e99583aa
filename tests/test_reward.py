"""Reward models: body parity, last-token reading, Bradley–Terry loss, learning, HF export, scoring."""

from __future__ import annotations

import argparse
import json
import math
import types
import warnings

import pytest
import torch

from smolforge.chat.render import load_template, render_for_training
from smolforge.cli import main
from smolforge.config import RewardRecipe, TrainConfig, load_recipe
from smolforge.errors import SmolforgeError
from smolforge.model import KVCache, ModelConfig, ModelOutput, Transformer, debug
from smolforge.tokenizer import train_tokenizer
from smolforge.train import objectives
from smolforge.train.checkpoint import load_model, read_meta, save_checkpoint, verify_checkpoint
from smolforge.train.loop import train
from smolforge.train.lora import (
    LoraSettings,
    adapter_state_dict,
    apply_lora,
    base_state_dict,
    load_adapter,
    lora_modules,
    merge_lora,
    save_adapter,
)
from smolforge.train.objectives import OBJECTIVES
from smolforge.train.reward import (
    RewardModel,
    bradley_terry,
    load_reward_model,
    reward_model_from,
    reward_objective,
    save_reward_model,
    score_command,
    score_records,
)

VOCAB = 384


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matmuls: more threads only contend for the cores (a 60-step test went from 2 s to 15 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    (root / "corpus.txt").write_text("say hello world good bad answer the quick brown fox 0123456789\n" * 200)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tiny corpus yields fewer merges than asked for
        return train_tokenizer([root / "corpus.txt"], vocab_size=VOCAB)


def tiny(**changes) -> ModelConfig:
    return ModelConfig(**{**debug().model_dump(), "vocab_size": VOCAB, **changes})


def randomise(module: torch.nn.Module) -> None:
    """Random norms, biases and head, so that a wrongly mapped tensor changes the rewards."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif name == "score.weight":
                p.copy_(torch.randn_like(p))


def right_padded(lengths: list[int], pad_id: int, vocab: int = VOCAB) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids (never pad_id) right-padded with pad_id, and the lengths."""
    ids = torch.full((len(lengths), max(lengths)), pad_id)
    for i, n in enumerate(lengths):
        row = torch.randint(0, vocab - 1, (n,))
        ids[i, :n] = torch.where(row >= pad_id, row + 1, row)
    return ids, torch.tensor(lengths)


@pytest.mark.parametrize("changes", [{}, {"n_experts": 4, "qk_norm": True, "moe_intermediate_size": 32}])
def test_body_is_the_transformer_before_its_lm_head(changes):
    torch.manual_seed(0)
    model = Transformer(tiny(**changes)).eval()
    randomise(model)
    captured = {}
    model.lm_head.register_forward_hook(lambda m, args, out: captured.update(hidden=args[0]))
    rm = RewardModel.from_causal(model)
    assert not any(k.startswith("lm_head") for k in rm.state_dict())
    ids = torch.randint(0, VOCAB, (2, 12))
    packed = {"position_ids": torch.tensor([list(range(5)) + list(range(7))] * 2),
              "document_ids": torch.tensor([[0] * 5 + [1] * 7] * 2)}
    key_mask = torch.ones(2, 12, dtype=torch.bool)
    key_mask[1, :3] = False
    with torch.no_grad():
        for kwargs in ({}, packed, {"key_mask": key_mask}):
            out = model(ids, **kwargs)
            hidden, aux = rm.body(ids, **kwargs)
            torch.testing.assert_close(hidden, captured["hidden"], atol=1e-6, rtol=0)
            if changes:
                torch.testing.assert_close(aux, out.aux_loss, atol=1e-6, rtol=0)
            else:
                assert aux is None and out.aux_loss is None


def test_the_reward_is_read_at_the_last_real_token():
    torch.manual_seed(0)
    pad = 5
    rm = RewardModel(tiny(), pad_id=pad).eval()
    randomise(rm)
    ids, lengths = right_padded([7, 4, 9], pad)
    with torch.no_grad():
        alone = torch.stack([rm(ids[i : i + 1, :n]).logits[0] for i, n in enumerate(lengths.tolist())])
        by_lengths = rm(ids, lengths=lengths).logits
        by_pad = rm(ids).logits
        by_mask = rm(ids, key_mask=ids != pad).logits
        for rewards in (by_lengths, by_pad, by_mask):
            torch.testing.assert_close(rewards, alone, atol=1e-5, rtol=0)
        assert by_lengths.shape == (3,) and by_lengths.dtype == torch.float32
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the training loop's mixed precision
            mixed = rm(ids, lengths=lengths).logits
        assert mixed.dtype == torch.float32
        torch.testing.assert_close(mixed, by_lengths, atol=0.05, rtol=0.05)
        after = ids.clone()
        after[1, 4:] = 17  # text after the last real token (lengths say where the row ends)
        torch.testing.assert_close(rm(after, lengths=lengths).logits, by_lengths, atol=0, rtol=0)
        last = ids.clone()
        last[1, 3] = (last[1, 3] + 1) % VOCAB if (last[1, 3] + 1) % VOCAB != pad else 0
        changed = rm(last, lengths=lengths).logits
        assert abs(changed[1] - by_lengths[1]) > 1e-4
        torch.testing.assert_close(changed[[0, 2]], by_lengths[[0, 2]], atol=0, rtol=0)
        # Left padding (the engine's layout): the rightmost real token, as transformers reads it.
        left = torch.cat([torch.full((1, 3), pad), ids[1:2, :4]], dim=1)
        positions = torch.tensor([[0, 0, 0, 0, 1, 2, 3]])
        torch.testing.assert_close(rm(left, position_ids=positions, key_mask=left != pad).logits,
                                   alone[1:2], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="lengths"):
        rm(ids, lengths=torch.tensor([7, 0, 9]))
    with pytest.raises(ValueError, match="padding"):
        RewardModel(tiny())(ids)
    with pytest.raises(ValueError, match="no KV cache"):
        rm(ids, cache=KVCache(rm.config, 3, 16, "cpu", torch.float32))


def test_bradley_terry_loss_margin_and_centring_against_hand_computed_values():
    chosen, rejected = torch.tensor([1.0, 0.5]), torch.tensor([0.0, 1.0])
    output = ModelOutput(logits=torch.cat([chosen, rejected]).requires_grad_())
    loss, metrics = reward_objective(output, {}, TrainConfig())
    expected = (math.log(1 + math.exp(-1.0)) + math.log(1 + math.exp(0.5))) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert {k: round(v.item(), 6) for k, v in metrics.items()} == {
        "accuracy": 0.5, "margin": 0.25, "rewards/chosen": 0.75, "rewards/rejected": 0.5}
    loss, _ = reward_objective(output, {"margin": torch.tensor([0.5, 0.0])}, TrainConfig())
    expected_margin = (math.log(1 + math.exp(-0.5)) + math.log(1 + math.exp(0.5))) / 2
    assert loss.item() == pytest.approx(expected_margin, abs=1e-6)
    loss, _ = reward_objective(output, {}, types.SimpleNamespace(center_rewards_coefficient=0.01))
    assert loss.item() == pytest.approx(expected + 0.01 * (1.0**2 + 1.5**2) / 2, abs=1e-6)
    loss.backward()
    assert output.logits.grad is not None and output.logits.grad.abs().sum() > 0
    torch.testing.assert_close(bradley_terry(chosen, rejected), torch.nn.functional.softplus(rejected - chosen))
    assert OBJECTIVES["reward"] is reward_objective
    with pytest.raises(SmolforgeError, match="one reward per row"):
        reward_objective(ModelOutput(logits=torch.zeros(3)), {}, TrainConfig())
    with pytest.raises(SmolforgeError, match="margin"):
        reward_objective(output, {"margin": torch.zeros(3)}, TrainConfig())


def toy_pairs(n: int, generator: torch.Generator, marker: int = 3, pad: int = 0):
    """Pairs of right-padded rows: only chosen responses hold `marker`, at a random place."""
    rows, lengths = [], []
    for side in ("chosen", "rejected"):
        for _ in range(n):
            length = int(torch.randint(6, 14, (1,), generator=generator))
            row = torch.randint(8, 60, (length,), generator=generator)
            if side == "chosen":
                row[int(torch.randint(3, length, (1,), generator=generator))] = marker
            rows.append(torch.cat([row, torch.full((14 - length,), pad)]))
            lengths.append(length)
    return torch.stack(rows), torch.tensor(lengths)


def fit_toy_preference(rm: RewardModel, params) -> tuple:
    """60 Bradley-Terry steps on `toy_pairs`, then (output, ids, lengths, metrics) on fresh pairs."""
    generator = torch.Generator().manual_seed(1)
    optimizer = torch.optim.AdamW(params, lr=3e-3)
    for _ in range(60):
        ids, lengths = toy_pairs(16, generator)
        loss, _ = reward_objective(rm(ids, lengths=lengths), {}, TrainConfig())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    rm.eval()
    with torch.no_grad():
        ids, lengths = toy_pairs(64, torch.Generator().manual_seed(99))
        output = rm(ids, lengths=lengths)
        _, metrics = reward_objective(output, {}, TrainConfig())
    return output, ids, lengths, metrics


def toy_reward_model() -> RewardModel:
    return RewardModel(ModelConfig(**{**debug().model_dump(), "vocab_size": 64, "hidden_size": 32,
                                      "intermediate_size": 64}), pad_id=0)


def test_a_tiny_reward_model_learns_a_separable_preference():
    torch.manual_seed(0)
    rm = toy_reward_model()
    _, _, _, metrics = fit_toy_preference(rm, rm.parameters())
    assert metrics["accuracy"].item() > 0.9, metrics


HF_CASES = {
    "llama": ({}, "LlamaForSequenceClassification"),
    "llama-untied": ({"tie_embeddings": False}, "LlamaForSequenceClassification"),
    "qwen2-bias": ({"attention_bias": True}, "Qwen2ForSequenceClassification"),
    "qwen3-qknorm": ({"qk_norm": True, "head_dim": 32}, "Qwen3ForSequenceClassification"),
}


@pytest.mark.parametrize("case", list(HF_CASES))
def test_saved_reward_model_loads_in_transformers_with_equal_rewards(case, tokenizer, tmp_path):
    transformers = pytest.importorskip("transformers")
    changes, arch = HF_CASES[case]
    torch.manual_seed(0)
    rm = RewardModel(tiny(**changes), pad_id=tokenizer.pad_id).eval()
    randomise(rm)
    save_reward_model(tmp_path / "rm", rm, tokenizer, {"step": 3})
    hf_model, info = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "rm", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert type(hf_model).__name__ == arch and hf_model.config.num_labels == 1
    assert hf_model.config.pad_token_id == tokenizer.pad_id
    ids, lengths = right_padded([9, 3, 12, 6], tokenizer.pad_id)
    attention_mask = (torch.arange(ids.shape[1]) < lengths[:, None]).long()
    with torch.no_grad():
        theirs = hf_model.eval()(input_ids=ids, attention_mask=attention_mask).logits[:, 0]
        torch.testing.assert_close(rm(ids, lengths=lengths).logits, theirs, atol=1e-5, rtol=0)
        torch.testing.assert_close(rm(ids).logits, theirs, atol=1e-5, rtol=0)  # by pad_id, as HF


def test_load_reward_model_round_trip_and_refusals(tokenizer, tmp_path):
    torch.manual_seed(0)
    rm = RewardModel(tiny(tie_embeddings=False), pad_id=tokenizer.pad_id).eval()
    randomise(rm)
    save_reward_model(tmp_path / "rm", rm, tokenizer, {"step": 3})
    rm.score.weight.data.mul_(2)
    save_reward_model(tmp_path / "rm", rm, tokenizer)  # replaces the first one
    loaded, tok = load_reward_model(tmp_path / "rm")
    assert loaded.config == rm.config and loaded.pad_id == tokenizer.pad_id
    assert tok.fingerprint == tokenizer.fingerprint
    ids, lengths = right_padded([5, 8], tokenizer.pad_id)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, lengths=lengths).logits, rm(ids, lengths=lengths).logits,
                                   atol=0, rtol=0)
    meta = json.loads((tmp_path / "rm" / "smolforge.json").read_text())
    assert meta["stage"] == "reward" and meta["step"] is None
    verify_checkpoint(tmp_path / "rm")
    assert not list(tmp_path.glob(".tmp-*"))
    for changes, feature in (({"n_experts": 4, "qk_norm": True, "moe_intermediate_size": 32}, "Qwen3Moe"),
                             ({"n_layers": 4, "nope_interval": 2}, "SmolLM3")):
        with pytest.raises(SmolforgeError, match=feature):
            save_reward_model(tmp_path / feature, RewardModel(tiny(**changes)), tokenizer)
        assert not (tmp_path / feature).exists()
    with pytest.warns(UserWarning, match="pad_token_id None"):  # transformers could not batch it
        save_reward_model(tmp_path / "no-pad", RewardModel(tiny()))
    save_checkpoint(tmp_path / "lm", Transformer(tiny()), tokenizer)
    with pytest.raises(SmolforgeError, match="not a reward model"):
        load_reward_model(tmp_path / "lm")


RECORDS = [
    {"prompt": "say hello", "response": "hello world"},
    {"messages": [{"role": "user", "content": "say"}], "completion": "bad answer", "id": 7},
    {"prompt": [{"role": "user", "content": "the fox"}],
     "response": [{"role": "user", "content": "the fox"}, {"role": "assistant", "content": "quick brown"}]},
]


def test_score_records_scores_as_training_renders(tokenizer):
    torch.manual_seed(0)
    rm = RewardModel(tiny(), pad_id=tokenizer.pad_id).eval()
    randomise(rm)
    template = load_template("chatml")
    scores = score_records(rm, tokenizer, template, RECORDS, batch_size=2)
    conversations = [[{"role": "user", "content": "say hello"}, {"role": "assistant", "content": "hello world"}],
                     [{"role": "user", "content": "say"}, {"role": "assistant", "content": "bad answer"}],
                     [{"role": "user", "content": "the fox"}, {"role": "assistant", "content": "quick brown"}]]
    with torch.no_grad():
        for conversation, score in zip(conversations, scores):
            ids = render_for_training(tokenizer, conversation, template).input_ids  # what training sees
            assert score == pytest.approx(rm(torch.tensor([ids])).logits.item(), abs=1e-5)
    with pytest.raises(SmolforgeError, match=r"data.jsonl:4 field 'response': missing"):
        score_records(rm, tokenizer, template, [("data.jsonl:4", {"prompt": "x", "answer": "y"})])
    with pytest.raises(SmolforgeError, match=r"record 0 field 'response': must hold assistant"):
        score_records(rm, tokenizer, template, [{"prompt": "x", "response": [{"role": "user", "content": "y"}]}])


def test_score_command_writes_rewards(tokenizer, tmp_path):
    torch.manual_seed(0)
    rm = RewardModel(tiny(), pad_id=tokenizer.pad_id).eval()
    randomise(rm)
    save_reward_model(tmp_path / "rm", rm, tokenizer)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    args = argparse.Namespace(reward_model=str(tmp_path / "rm"), data=str(data), out=str(tmp_path / "o.jsonl"),
                              template="chatml", batch_size=2, device="cpu")
    assert score_command(args) == 0
    scored = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    expected = score_records(rm, tokenizer, load_template("chatml"), RECORDS)
    assert [{k: v for k, v in r.items() if k != "reward"} for r in scored] == RECORDS
    assert [r["reward"] for r in scored] == pytest.approx(expected, abs=1e-5)
    data.write_text(json.dumps(RECORDS[0]) + "\n" + json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(SmolforgeError, match=r"data.jsonl:2 field 'response'"):
        score_command(args)


# --- LoRA on the reward model: adapters on the body, the head in full (peft's modules_to_save) ---------


def test_lora_reward_model_trains_adapters_and_head_only_and_learns_the_toy_preference():
    torch.manual_seed(0)
    rm = toy_reward_model()
    with pytest.raises(SmolforgeError, match="unknown LoRA target"):  # the head trains in full instead
        apply_lora(rm, LoraSettings(r=8, target_modules=["q_proj", "score"]))
    body = {k: v.clone() for k, v in rm.state_dict().items() if k != "score.weight"}
    head = rm.score.weight.detach().clone()
    params = apply_lora(rm, LoraSettings(r=8, alpha=16))
    trainable = {name for name, p in rm.named_parameters() if p.requires_grad}
    assert "score.weight" in trainable and all(".lora_" in n for n in trainable - {"score.weight"})
    assert {id(p) for p in params} == {id(p) for p in rm.parameters() if p.requires_grad}
    assert "base_model.model.score.weight" in adapter_state_dict(rm)
    output, ids, lengths, metrics = fit_toy_preference(rm, params)
    assert metrics["accuracy"].item() > 0.9, metrics
    after = base_state_dict(rm)
    assert all(torch.equal(after[k], v) for k, v in body.items())  # the body's weights never moved
    assert not torch.equal(rm.score.weight, head)  # the head trained
    with torch.no_grad():  # merged: the same rewards from plain Linear layers
        torch.testing.assert_close(merge_lora(rm)(ids, lengths=lengths).logits, output.logits, atol=1e-5, rtol=0)
    assert not lora_modules(rm)


def test_lora_reward_adapter_loads_in_peft_on_the_base_sequence_classifier(tokenizer, tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    causal = Transformer(tiny())
    randomise(causal)
    base = save_checkpoint(tmp_path / "base", causal, tokenizer)  # what a reward run starts from
    rm, _ = reward_model_from(base)
    settings = LoraSettings(r=4, alpha=8.0, target_modules=["q_proj", "v_proj", "down_proj"])
    apply_lora(rm, settings)
    with torch.no_grad():  # B = 0 would hide a misplaced adapter
        for module in lora_modules(rm).values():
            module.lora_B.weight.normal_(0, 0.05)
        rm.score.weight.normal_()
    adapter = save_adapter(tmp_path / "adapter", rm, settings, str(base))
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["score"]

    hf = transformers.AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = peft.PeftModel.from_pretrained(hf, adapter).eval()
    assert not [w for w in caught if "keys" in str(w.message).lower()], [str(w.message) for w in caught]
    ids, lengths = right_padded([9, 3, 12, 6], tokenizer.pad_id)
    attention_mask = (torch.arange(ids.shape[1]) < lengths[:, None]).long()
    with torch.no_grad():
        ours = rm.eval()(ids, lengths=lengths).logits
        theirs = peft_model(input_ids=ids, attention_mask=attention_mask).logits[:, 0]
        torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    # `smolforge merge-lora` folds it into a reward model with the same rewards
    assert main(["merge-lora", str(adapter), "--out", str(tmp_path / "merged")]) == 0
    merged, _ = load_reward_model(tmp_path / "merged")
    assert read_meta(tmp_path / "merged")["stage"] == "merge-lora"
    with torch.no_grad():
        torch.testing.assert_close(merged(ids, lengths=lengths).logits, ours, atol=1e-5, rtol=0)
    # and a reward model's adapter is refused on a language model, and the other way round
    with pytest.raises(SmolforgeError, match="for a reward model"):
        load_adapter(load_model(base)[0], adapter)
    lm = load_model(base)[0]
    apply_lora(lm, settings)
    save_adapter(tmp_path / "lm-adapter", lm, settings, None)
    with pytest.raises(SmolforgeError, match="for a causal language model"):
        load_adapter(reward_model_from(base)[0], tmp_path / "lm-adapter")


WORDS = ["hello", "world", "quick", "brown", "fox", "answer"]


@pytest.fixture(scope="module")
def preference_setup(tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("rm-lora")
    pairs = [{"prompt": f"say {w}", "chosen": f"good {w}", "rejected": f"bad {w}"} for w in WORDS] * 4
    (root / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    torch.manual_seed(0)
    save_checkpoint(root / "base", Transformer(tiny()), tokenizer)
    return root


def lora_reward_run(setup, tmp_path, name: str, resume: bool = False):
    recipe = load_recipe(None, {
        "run.dir": str(tmp_path), "run.name": name, "run.init_from": str(setup / "base"),
        "data.train": [{"path": str(setup / "pairs.jsonl")}], "data.template": "chatml", "data.seq_len": 64,
        "data.val_fraction": 0.2, "lora.r": 4, "lora.alpha": 8, "train.epochs": 0, "train.max_steps": 12,
        "train.batch_size": 4, "train.grad_accum": 1, "train.lr": 1e-2, "train.log_every": 1,
        "train.eval_every": 0, "train.save_every": 6, "train.threads": 1}, RewardRecipe)
    return train(recipe, resume=resume, stage="reward")


def losses(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_lora_reward_stage_learns_saves_merged_and_peft_and_resumes_exactly(preference_setup, tmp_path,
                                                                             monkeypatch, crash_on_call):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    full = lora_reward_run(preference_setup, tmp_path, "full")
    log = losses(full.run_dir)
    steps = [r for r in log if "loss" in r]
    assert sum(r["loss"] for r in steps[-3:]) / 3 < 0.5 * steps[0]["loss"]
    assert log[-1]["val_accuracy"] > 0.5 and log[-1]["val_loss"] < steps[0]["loss"]  # held-out pairs
    final = full.final_checkpoint
    meta = read_meta(final)
    assert meta["stage"] == "reward" and meta["lora"]["r"] == 4
    merged, _ = load_reward_model(final)
    base, _ = load_model(preference_setup / "base")
    body, start = merged.state_dict(), base.state_dict()
    assert torch.equal(body["model.embed_tokens.weight"], start["model.embed_tokens.weight"])  # not a target
    assert torch.equal(body["model.layers.1.post_attention_layernorm.weight"],
                       start["model.layers.1.post_attention_layernorm.weight"])
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(body[q], start[q])  # the merged adapter
    # the adapter directory on the base checkpoint, loaded by transformers + peft: the same rewards
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(preference_setup / "base", num_labels=1)
    peft_model = peft.PeftModel.from_pretrained(hf, full.run_dir / "adapter").eval()
    ids, lengths = right_padded([9, 5, 12], merged.pad_id)
    attention_mask = (torch.arange(ids.shape[1]) < lengths[:, None]).long()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=ids, attention_mask=attention_mask).logits[:, 0],
                                   merged(ids, lengths=lengths).logits, atol=1e-5, rtol=1e-4)
    # crash in step 7 (after the step-6 checkpoint), resume: adapters, head and optimizer come back
    monkeypatch.setitem(objectives.OBJECTIVES, "reward", crash_on_call(reward_objective, 7))
    with pytest.raises(RuntimeError, match="injected crash"):
        lora_reward_run(preference_setup, tmp_path, "split")
    monkeypatch.setitem(objectives.OBJECTIVES, "reward", reward_objective)
    resumed = lora_reward_run(preference_setup, tmp_path, "split", resume=True)
    assert [r["loss"] for r in losses(resumed.run_dir) if "loss" in r] == [r["loss"] for r in steps]
    again, _ = load_reward_model(resumed.final_checkpoint)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in merged.state_dict().items())
