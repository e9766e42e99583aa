"""QLoRA (lora.quantize: nf4): validation, the CPU refusal, and — on CUDA only — adapters training
over a 4-bit NF4 base whose merged checkpoint computes what the quantised model computed."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from smolforge.config import SFTRecipe, load_recipe
from smolforge.data.synth import generate, write_jsonl
from smolforge.errors import SmolforgeError
from smolforge.model import ModelConfig, Transformer, debug
from smolforge.train.checkpoint import load_model, read_meta, save_checkpoint
from smolforge.train.loop import train
from smolforge.train.lora import (
    LoraSettings,
    adapter_state_dict,
    apply_lora,
    lora_modules,
    merge_lora,
    merged_copy,
    quantize_base,
    read_adapter_config,
)
from smolforge.train.qlora import is_quantized

VOCAB = 512
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(),
                               reason="QLoRA's 4-bit base needs CUDA (bitsandbytes' NF4 kernels)")


def tiny(**changes) -> ModelConfig:
    return ModelConfig(**{**debug().model_dump(), "vocab_size": VOCAB, **changes})


def sft_recipe(tmp_path, name: str, **overrides) -> SFTRecipe:
    return load_recipe(None, {
        "run.dir": str(tmp_path), "run.name": name, "run.init_from": str(tmp_path / "base"),
        "data.train": [{"path": str(tmp_path / "train.jsonl")}], "data.seq_len": 256, "data.template": "chatml",
        "data.val_fraction": 0.0, "lora.r": 8, "lora.alpha": 16, "lora.quantize": "nf4", "train.epochs": 0,
        "train.max_steps": 8, "train.batch_size": 4, "train.grad_accum": 1, "train.lr": 1e-2,
        "train.warmup_steps": 0, "train.log_every": 1, "train.save_every": 4, "train.threads": 1,
        **overrides}, SFTRecipe)


@pytest.fixture
def sft_setup(synth_tokenizer, tmp_path):
    write_jsonl(generate("count", 80, seed=0), tmp_path / "train.jsonl")
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "base", Transformer(tiny()), synth_tokenizer, meta={"stage": "pretrain"})
    return tmp_path


def test_quantize_is_validated():
    assert LoraSettings().quantize == "none" and LoraSettings(r=4, quantize="nf4").quantize == "nf4"
    with pytest.raises(ValidationError, match="lora.r is 0"):  # a 4-bit base cannot train in full
        LoraSettings(quantize="nf4")
    with pytest.raises(ValidationError, match="quantize"):
        LoraSettings(r=4, quantize="int4")
    with pytest.raises(SmolforgeError, match="lora.quantize"):  # in a recipe, named by its key
        load_recipe(None, {"lora.r": 4, "lora.quantize": "fp4"})
    with pytest.raises(SmolforgeError, match="lora.r is 0"):
        load_recipe(None, {"lora.quantize": "nf4"})
    assert load_recipe(None, {"lora.r": 4, "lora.quantize": "nf4"}).lora.quantize == "nf4"


def test_qlora_on_cpu_is_a_clear_error_before_any_work(sft_setup):
    with pytest.raises(SmolforgeError, match=r"lora.quantize: nf4 \(QLoRA\) needs a CUDA device.*cpu"):
        train(sft_recipe(sft_setup, "q", **{"train.device": "cpu"}), stage="sft")
    assert not (sft_setup / "q").exists()  # refused before the run directory was written
    model = Transformer(tiny())
    with pytest.raises(SmolforgeError, match="CUDA"):
        quantize_base(model, torch.device("cpu"))
    assert not any(is_quantized(m) for m in model.modules())


def clm_loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(x[:, :-1]).logits
    return nn.functional.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())


@cuda_only
def test_qlora_trains_adapters_over_an_nf4_base_and_merges_to_the_trained_model():
    import bitsandbytes as bnb

    device = torch.device("cuda")
    torch.manual_seed(0)
    model = Transformer(tiny(tie_embeddings=False))  # built on the CPU, as the loop loads it
    original = copy.deepcopy(model)
    assert quantize_base(model, device) == 7 * model.config.n_layers
    quantized = [m for m in model.modules() if is_quantized(m)]
    assert len(quantized) == 7 * model.config.n_layers
    for layer in quantized:  # NF4, double quantisation, bf16 compute: QLoRA's setting
        assert isinstance(layer, bnb.nn.Linear4bit) and layer.weight.dtype == torch.uint8
        state = layer.weight.quant_state
        assert state.quant_type == "nf4" and state.nested and layer.compute_dtype == torch.bfloat16
    assert not is_quantized(model.lm_head) and model.lm_head.weight.dtype == torch.float32
    assert all(p.device.type == "cuda" for p in model.parameters())

    params = apply_lora(model, LoraSettings(r=8, alpha=16))
    assert params and all(p.dtype == torch.float32 and p.device.type == "cuda" for p in params)
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    start = {k: v.detach().clone() for k, v in adapter_state_dict(model).items()}
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    # one random sequence, four times: something the adapters can fit in a few steps
    x = torch.randint(0, VOCAB, (1, 33), generator=torch.Generator().manual_seed(3)).repeat(4, 1).to(device)
    losses = []
    for _ in range(20):
        loss = clm_loss(model, x)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    # a frozen random LM head caps how far it can go (~1 nat: logits of std-0.02 weights are small)
    assert losses[-1] < losses[0] - 0.5, losses
    for name, p in model.named_parameters():  # the 4-bit bytes, embeddings, norms: untouched
        if not p.requires_grad:
            assert torch.equal(p, frozen[name]), name
    assert all(not torch.equal(v, start[k]) for k, v in adapter_state_dict(model).items())

    model.eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        trained = model(x).logits.float().cpu()
    merged = merged_copy(model)  # the checkpoint path: fp32 on the CPU, dequantised + B A
    assert lora_modules(model) and not lora_modules(merged) and not any(is_quantized(m) for m in merged.modules())
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in merged.parameters())
    with torch.no_grad():
        from_merged = merged(x.cpu()).logits
    scale = trained.abs().max()
    err = (from_merged - trained).abs().max()
    assert err < 0.02 * scale, (err, scale)  # bf16 compute rounding only
    # ...which is the NF4 base plus the update, not the full-precision base plus it (what the PEFT
    # adapter on the full-precision base computes): those differ by the quantisation error.
    with torch.no_grad():
        for name, module in lora_modules(model).items():
            target = original.get_submodule(name)
            target.weight.copy_(target.weight + module.delta_weight().cpu())
        unquantised = original.eval()(x.cpu()).logits
    assert (unquantised - trained).abs().max() > 2 * err
    # merging in place on the GPU gives the same weights as the CPU copy
    in_place = merge_lora(copy.deepcopy(model))
    q = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(in_place.state_dict()[q].cpu(), merged.state_dict()[q], atol=0, rtol=0)


@cuda_only
def test_qlora_sft_run_on_cuda_checkpoints_merged_weights_and_resumes(sft_setup, monkeypatch, crash_on_call):
    full = train(sft_recipe(sft_setup, "full", **{"train.device": "cuda"}), stage="sft")
    log = [json.loads(line) for line in (full.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert len(losses) == 8 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    meta = read_meta(full.final_checkpoint)
    assert meta["lora"]["quantize"] == "nf4" and meta["stage"] == "sft"
    merged, _ = load_model(full.final_checkpoint)  # a plain fp32 checkpoint: no bitsandbytes needed
    base, _ = load_model(sft_setup / "base")
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged.state_dict()[q], base.state_dict()[q])
    assert torch.equal(merged.model.embed_tokens.weight, base.model.embed_tokens.weight)
    assert read_adapter_config(full.run_dir / "adapter")[0].r == 8

    from smolforge.train import objectives

    monkeypatch.setitem(objectives.OBJECTIVES, "crashy", crash_on_call(objectives.lm, 5))
    with pytest.raises(RuntimeError, match="injected crash"):
        train(sft_recipe(sft_setup, "split", **{"train.device": "cuda", "train.objective": "crashy"}), stage="sft")
    resumed = train(sft_recipe(sft_setup, "split", **{"train.device": "cuda"}), resume=True, stage="sft")
    again = [json.loads(x)["loss"] for x in (resumed.run_dir / "metrics.jsonl").read_text().splitlines()
             if '"loss"' in x]
    assert again == pytest.approx(losses, rel=1e-3, abs=1e-4)
