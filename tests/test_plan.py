"""`smolforge plan`: parameter counts against real models, memory terms against hand-computed
values, how parallelism / checkpointing / LoRA move them, the verdict, and the command line."""

from __future__ import annotations

import json
import math

import pytest
import torch

from smolforge.cli import main
from smolforge.config import DPORecipe, PretrainRecipe, load_recipe
from smolforge.errors import SmolforgeError
from smolforge.interop.hf import hf_config
from smolforge.lab.plan import GPUS, Setup, estimate, layer_activation_bytes, lora_linears
from smolforge.model import PRESETS, ModelConfig, Transformer, count_parameters
from smolforge.train.loop import PEAK_BF16_FLOPS
from smolforge.train.lora import LoraSettings, apply_lora

# 2 layers, h 64, 4 query / 2 KV heads of width 16, SwiGLU 128, vocabulary 256, tied embeddings.
TINY = ModelConfig(vocab_size=256, hidden_size=64, n_layers=2, n_heads=4, n_kv_heads=2,
                   intermediate_size=128, max_seq_len=256)


def recipe(masking: bool = False, **train) -> PretrainRecipe:
    overrides = {"data.seq_len": 16, "data.document_masking": masking, "train.batch_size": 2,
                 **{f"train.{k}": v for k, v in train.items()}}
    return load_recipe(None, {"model": TINY.model_dump(), **overrides})


def plan_for(cfg: ModelConfig, **setup):
    r = load_recipe(None, {"model": cfg.model_dump(), "data.seq_len": 16, "train.batch_size": 2,
                           "data.document_masking": False})
    return estimate(r, cfg, Setup(**setup))


# --- parameters -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["debug", "smol-10m", "smollm2-135m", "smollm3-3b"])
def test_parameter_count_equals_a_real_model(name):
    cfg = PRESETS[name]()
    cfg = cfg if cfg.vocab_size else cfg.model_copy(update={"vocab_size": 8192})
    with torch.device("meta"):  # real modules and shapes, no memory behind them
        model = Transformer(cfg)
    numel = sum(p.numel() for p in model.parameters())  # a tied head is counted once
    params = plan_for(cfg).params
    assert params["total"] == numel and params["active"] == numel and params["trainable"] == numel


def test_parameter_count_of_untied_moe_with_qk_norm_and_bias():
    cfg = TINY.model_copy(update={"tie_embeddings": False, "qk_norm": True, "attention_bias": True,
                                  "n_experts": 4, "experts_per_token": 2, "n_shared_experts": 1})
    with torch.device("meta"):
        numel = sum(p.numel() for p in Transformer(cfg).parameters())
    params = plan_for(cfg).params
    assert params["total"] == numel
    assert params["active"] == numel - 2 * 2 * 3 * 64 * 128  # two of four experts idle per token, 2 layers


# --- memory terms, worked out by hand for TINY -------------------------------------------------------
# P = 256*64 (embedding = head) + 2 * (64*16*(2*4 + 2*2) attention + 2*64 norms + 3*64*128 MLP) + 64
#   = 16384 + 2 * (12288 + 128 + 24576) + 64 = 90432; Linear weights W = P - 2*128 - 64 = 90112.
P, W = 90432, 90112
# Per token and layer, bf16 (e = c = 2), flash: attention 8*64 + 3*2*64 + 2*(2*4*16 + 2*2*16) + 4*4
# = 512 + 384 + 384 + 16 = 1296; MLP 8*64 + 2*2*64 + 4*2*128 = 512 + 256 + 1024 = 1792.
LAYER = 1296 + 1792
TOKENS = 2 * 16  # rows x seq_len


def test_memory_terms_match_hand_computed_values():
    plan = estimate(recipe(), TINY, Setup())
    assert plan.params["total"] == P
    assert layer_activation_bytes(TINY, 16, bf16=True, masked=False) == LAYER
    assert plan.memory == {
        "weights": 4 * P, "bf16 weight copies": 2 * W, "gradients": 4 * P, "optimizer": 8 * P,
        "comm buffers": 0, "reference model": 0,
        "activations": TOKENS * 2 * LAYER,
        "logits + loss": TOKENS * 10 * (64 + 256),  # bf16 logits 2 + fp32 upcast 4 + log-softmax 4
    }
    assert plan.total_memory == sum(plan.memory.values()) and plan.fits
    # 6 x 90112 matmul parameters (tied head included) + 12 * 2 layers * 4 heads * 16 * 16 tokens
    assert plan.flops_per_step == TOKENS * (6 * 90112 + 12 * 2 * 4 * 16 * 16)
    assert plan.tokens_per_step == TOKENS
    assert plan.step_seconds == pytest.approx(plan.flops_per_step / (989e12 * 0.4))
    assert plan.total_seconds == pytest.approx(1000 * plan.step_seconds)


def test_fp32_and_document_masking_terms():
    fp32 = estimate(recipe(precision="fp32"), TINY, Setup())
    # fp32 (e = 4, c = 0): attention 512 + 4*(192) + 16 = 1296; MLP 512 + 16*128 = 2560; no weight casts.
    assert fp32.memory["activations"] == TOKENS * 2 * (1296 + 2560)
    assert fp32.memory["bf16 weight copies"] == 0 and fp32.memory["logits + loss"] == TOKENS * 8 * (64 + 256)
    masked = estimate(recipe(masking=True), TINY, Setup())
    # + e*s of mask bias per layer and token, + the boolean mask rows * s^2 once
    assert masked.masked and masked.memory["activations"] == TOKENS * 2 * (LAYER + 2 * 16) + 2 * 16 * 16


def test_fsdp2_shards_weights_gradients_and_optimizer_ddp_does_not():
    one = estimate(recipe(), TINY, Setup(gpus=1))
    ddp = estimate(recipe(), TINY, Setup(gpus=4, parallel="ddp"))
    fsdp = estimate(recipe(), TINY, Setup(gpus=4, parallel="fsdp2"))
    for key in ("weights", "gradients", "optimizer"):
        assert ddp.memory[key] == one.memory[key]
        assert fsdp.memory[key] == math.ceil(one.memory[key] / 4)
    assert ddp.memory["comm buffers"] == 4 * P  # DDP's bucket copy of the gradients
    assert fsdp.memory["comm buffers"] == 8 * 36992  # a layer (36992) is the largest unit, not the embedding (16384)
    assert fsdp.memory["bf16 weight copies"] == 0
    assert ddp.memory["activations"] == fsdp.memory["activations"] == one.memory["activations"]
    assert ddp.tokens_per_step == fsdp.tokens_per_step == 4 * one.tokens_per_step
    assert ddp.step_seconds == pytest.approx(one.step_seconds)  # 4x the tokens on 4x the GPUs


def test_activation_checkpointing_keeps_layer_inputs_and_one_layer():
    cfg = TINY.model_copy(update={"n_layers": 8})
    plain = plan_for(cfg)
    checkpointed = plan_for(cfg, activation_checkpointing=True)
    assert checkpointed.memory["activations"] == TOKENS * (8 * 4 * 64 + LAYER)
    assert checkpointed.memory["activations"] < plain.memory["activations"] == TOKENS * 8 * LAYER
    assert checkpointed.memory["weights"] == plain.memory["weights"]
    # the recomputed forward costs time but is no model FLOP (the loop's MFU convention)
    assert checkpointed.flops_per_step == plain.flops_per_step and checkpointed.step_seconds > plain.step_seconds
    from_recipe = load_recipe(None, {"model": cfg.model_dump(), "data.seq_len": 16, "train.batch_size": 2,
                                     "data.document_masking": False, "train.activation_checkpointing": True})
    assert estimate(from_recipe, cfg, Setup()).memory == checkpointed.memory


def test_lora_keeps_base_weights_and_drops_their_gradients_and_optimizer():
    lora = LoraSettings(r=4, target_modules=["q_proj", "v_proj", "down_proj"])
    r = recipe().model_copy(update={"lora": lora})
    plan = estimate(r, TINY, Setup())
    model = Transformer(TINY)
    adapters = sum(p.numel() for p in apply_lora(model, lora))
    # per layer r*(64+64) + r*(64+32) + r*(128+64) = 4*416; two layers
    assert plan.params["trainable"] == adapters == 2 * 4 * 416
    assert plan.memory["weights"] == 4 * P  # the frozen base is still loaded in fp32
    assert plan.memory["gradients"] == 4 * adapters and plan.memory["optimizer"] == 8 * adapters
    assert plan.flops_per_step < estimate(recipe(), TINY, Setup()).flops_per_step  # no weight grads for the base
    with pytest.raises(SmolforgeError, match="lm_head"):
        lora_linears(TINY, LoraSettings(r=4, target_modules=["lm_head"]))


def test_dpo_doubles_rows_and_counts_an_online_reference():
    base = {"model": TINY.model_dump(), "data.seq_len": 16, "train.batch_size": 2, "train.grad_accum": 1}
    cached = estimate(load_recipe(None, base, DPORecipe), TINY, Setup())
    online = estimate(load_recipe(None, {**base, "data.reference": "online"}, DPORecipe), TINY, Setup(), 2)
    assert cached.stage == "dpo" and cached.tokens_per_step == 2 * TOKENS and not cached.masked
    assert cached.memory["reference model"] == 0 and online.memory["reference model"] == 2 * P
    assert online.flops_per_step > cached.flops_per_step  # the reference's forward


def test_verdict_flips_when_the_batch_grows():
    cfg = PRESETS["smollm2-135m"]()
    small = load_recipe(None, {"model": cfg.model_dump(), "data.seq_len": 2048, "train.batch_size": 1})
    big = small.model_copy(update={"train": small.train.model_copy(update={"batch_size": 64})})
    assert estimate(small, cfg, Setup(gpu="l4")).fits
    plan = estimate(big, cfg, Setup(gpu="l4"))
    assert not plan.fits and plan.total_memory > plan.usable
    assert plan.usable == int(GPUS["l4"].memory * 0.9)


def test_gpu_table_agrees_with_the_training_loop():
    for gpu in GPUS.values():  # the loop reports MFU with these peaks
        assert PEAK_BF16_FLOPS[gpu.name] == gpu.peak_flops


def test_setup_is_validated():
    with pytest.raises(SmolforgeError):
        estimate(recipe(), TINY, Setup(gpu="tpu"))
    with pytest.raises(SmolforgeError):
        estimate(recipe(), TINY, Setup(mfu=1.5))


# --- command line -------------------------------------------------------------------------------------


def test_cli_prints_a_table_with_a_verdict(capsys):
    code = main(["plan", "recipes/pretrain-smollm2-135m.yaml", "--model.vocab_size", "49152", "--gpu", "l4"])
    out = capsys.readouterr().out
    assert code == 0
    assert "134.5M parameters" in out and "activations" in out and "tokens per step" in out
    assert "262,144" in out  # 16 x 2048 x 8
    assert out.strip().splitlines()[-1].startswith("verdict: does NOT fit")  # 16 x 2048 rows on 24 GB
    main(["plan", "recipes/pretrain-smollm2-135m.yaml", "--model.vocab_size", "49152",
          "--train.batch_size", "1", "--train.grad_accum", "128", "--activation-checkpointing"])
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("verdict: fits")


def test_cli_json_parses(capsys):
    args = ["plan", "--model.preset", "debug", "--model.vocab_size", "256", "--data.seq_len", "16",
            "--train.batch_size", "2", "--data.document_masking", "false", "--gpus", "2", "--parallel", "fsdp2"]
    assert main([*args, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["params"]["total"] == count_parameters(PRESETS["debug"]().model_copy(update={"vocab_size": 256}))["total"]
    assert data["total_memory"] == sum(data["memory"].values())
    assert data["setup"]["parallel"] == "fsdp2" and data["tokens_per_step"] == 2 * 16 * 2
    assert data["fits"] is True and data["model_source"] == "the recipe's model section"


def test_cli_reads_the_model_of_init_from_and_sft_fields(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps(hf_config(TINY, dtype="bfloat16")))
    args = ["plan", "--stage", "dpo", "--run.init_from", str(ckpt), "--data.seq_len", "16",
            "--data.reference", "online", "--json"]
    assert main(args) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["params"]["total"] == P and str(ckpt) in data["model_source"]
    assert data["memory"]["reference model"] == 2 * P  # stored in bf16, loaded as stored
    assert main(["plan", "--stage", "sft", "--run.init_from", str(ckpt), "--data.seq_len", "64",
                 "--data.packing", "bfd", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["masked"] is True


def test_cli_errors_name_the_fix(tmp_path, capsys):
    assert main(["plan", "--model.preset", "smol-10m"]) == 2  # vocab from a tokenizer that is not there
    assert "--model.vocab_size" in capsys.readouterr().err
    sft = tmp_path / "sft.yaml"
    sft.write_text("data:\n  packing: bfd\n")
    assert main(["plan", str(sft)]) == 2
    assert "--stage sft" in capsys.readouterr().err
