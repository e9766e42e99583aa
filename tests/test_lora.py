"""LoRA: adapters train alone, load in peft with equal logits, merge exactly, and bad input is named."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file, save_file
from torch import nn

from smolforge.cli import build_parser, main
from smolforge.errors import SmolforgeError
from smolforge.model import ModelConfig, Transformer, debug
from smolforge.train.checkpoint import load_model, read_meta, save_checkpoint
from smolforge.train.lora import (
    DEFAULT_TARGETS,
    LoraLinear,
    LoraSettings,
    adapter_state_dict,
    apply_lora,
    base_state_dict,
    load_adapter,
    lora_modules,
    merge_lora,
    read_adapter_config,
    save_adapter,
)

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

VOCAB = 384
SETTINGS = LoraSettings(r=4, alpha=8.0)  # scaling 2, so a missing alpha / r shows in the logits


def tiny(**changes) -> ModelConfig:
    return ModelConfig(**{**debug().model_dump(), "vocab_size": VOCAB, **changes})


@pytest.fixture(scope="module")
def base_dir(tokenizer, tmp_path_factory):
    torch.manual_seed(0)
    model = Transformer(tiny(tie_embeddings=False))
    return save_checkpoint(tmp_path_factory.mktemp("base") / "base", model, tokenizer,
                           meta={"stage": "test"})


def randomise_adapters(model: nn.Module) -> None:
    """B = 0 at init hides every mapping mistake; random B makes each adapter change the logits."""
    with torch.no_grad():
        for module in lora_modules(model).values():
            module.lora_B.weight.normal_(0, 0.05)


def lora_model(base_dir, settings: LoraSettings = SETTINGS) -> Transformer:
    model, _ = load_model(base_dir)
    apply_lora(model, settings)
    torch.manual_seed(1)
    randomise_adapters(model)
    return model.eval()


def ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(x)
    return out.logits


def test_apply_lora_wraps_targets_freezes_base_and_starts_as_identity(base_dir):
    model, _ = load_model(base_dir)
    x = ids()
    before = logits(model, x)
    names_before = set(model.state_dict())
    params = apply_lora(model, SETTINGS)

    wrapped = lora_modules(model)
    assert len(wrapped) == len(DEFAULT_TARGETS) * model.config.n_layers
    assert all(name.rsplit(".", 1)[-1] in DEFAULT_TARGETS for name in wrapped)
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, LoraLinear)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in params} and len(params) == 2 * len(wrapped)
    a = model.model.layers[0].self_attn.q_proj.lora_A.weight
    assert a.shape == (4, 64) and a.abs().sum() > 0  # kaiming-uniform A, zero B
    torch.testing.assert_close(logits(model, x), before, atol=0, rtol=0)
    assert set(base_state_dict(model)) == names_before


def test_training_steps_change_adapters_only(base_dir):
    model, _ = load_model(base_dir)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    params = apply_lora(model, LoraSettings(r=4, dropout=0.1))
    adapters = {k: v.clone() for k, v in adapter_state_dict(model).items()}
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    x = ids()
    for _ in range(3):
        loss = nn.functional.cross_entropy(model(x[:, :-1]).logits.flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = base_state_dict(model)
    assert all(torch.equal(after[k], v) for k, v in base.items())
    changed = [k for k, v in adapter_state_dict(model).items() if not torch.equal(v, adapters[k])]
    assert len(changed) == len(adapters)  # every A and every B moved


def test_peft_loads_adapter_with_equal_logits(base_dir, tmp_path):
    model = lora_model(base_dir)
    x = ids()
    ours = logits(model, x)
    assert not torch.allclose(ours, logits(load_model(base_dir)[0], x), atol=1e-3)  # adapters matter
    path = save_adapter(tmp_path / "adapter", model, SETTINGS, str(base_dir))

    assert sorted(p.name for p in path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 8.0, 0.0)
    assert config["base_model_name_or_path"] == str(base_dir) and config["bias"] == "none"
    assert sorted(config["target_modules"]) == sorted(DEFAULT_TARGETS)
    keys = load_file(path / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert keys["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"].shape == (64, 4)
    assert not any(tmp.name.startswith(".tmp-") for tmp in tmp_path.iterdir())

    hf = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = peft.PeftModel.from_pretrained(hf, path).eval()
    # peft warns (instead of failing) about adapter keys it could not place.
    assert not [w for w in caught if "keys" in str(w.message).lower()], [str(w.message) for w in caught]
    assert len([m for m in peft_model.modules() if hasattr(m, "lora_A")]) == 7 * 2
    with torch.no_grad():
        theirs = peft_model(x).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)


def test_merge_lora_equals_unmerged_and_restores_plain_linears(base_dir):
    model = lora_model(base_dir, LoraSettings(r=2, alpha=3.0, target_modules=["q_proj", "down_proj"]))
    x = ids()
    unmerged = logits(model, x)
    merged = merge_lora(model)
    assert merged is model and not lora_modules(model)
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    reference, _ = load_model(base_dir)
    assert set(model.state_dict()) == set(reference.state_dict())
    torch.testing.assert_close(logits(model, x), unmerged, atol=1e-5, rtol=0)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(model.state_dict()[q], reference.state_dict()[q])
    k = "model.layers.0.self_attn.k_proj.weight"  # not a target: untouched
    assert torch.equal(model.state_dict()[k], reference.state_dict()[k])


def test_merge_lora_cli_output_loads_in_transformers(base_dir, tmp_path, capsys):
    model = lora_model(base_dir)
    adapter = save_adapter(tmp_path / "adapter", model, SETTINGS, str(base_dir))
    out = tmp_path / "merged"
    assert main(["merge-lora", str(adapter), "--base", str(base_dir), "--out", str(out)]) == 0
    assert "merged" in capsys.readouterr().out
    meta = read_meta(out)
    assert meta["stage"] == "merge-lora" and meta["parent"] == str(adapter)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, logits(model, x), atol=1e-5, rtol=0)
    # --base defaults to the adapter's base_model_name_or_path
    assert main(["merge-lora", str(adapter), "--out", str(tmp_path / "again")]) == 0
    again, _ = load_model(tmp_path / "again")
    torch.testing.assert_close(logits(again, x), logits(model, x), atol=1e-5, rtol=0)


def test_merge_lora_options_are_documented():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["merge-lora"]
    for action in sub._actions:
        if action.dest != "help":
            assert action.help, f"merge-lora {action.option_strings or action.dest} has no help"


def test_load_adapter_round_trip(base_dir, tmp_path):
    settings = LoraSettings(r=3, alpha=5.0, dropout=0.05, target_modules=["v_proj", "up_proj"])
    model = lora_model(base_dir, settings)
    path = save_adapter(tmp_path / "adapter", model, settings, None)
    assert read_adapter_config(path) == (settings, None)

    fresh, _ = load_model(base_dir)
    params = load_adapter(fresh, path)
    assert len(params) == 2 * 2 * fresh.config.n_layers and all(p.requires_grad for p in params)
    x = ids()
    torch.testing.assert_close(logits(fresh.eval(), x), logits(model, x), atol=0, rtol=0)
    # Saving again replaces the adapter directory in place.
    save_adapter(path, fresh, settings, "somewhere")
    assert read_adapter_config(path)[1] == "somewhere"


def test_unknown_target_names_the_valid_ones(base_dir):
    model, _ = load_model(base_dir)
    for bad in (["q_proj", "qkv_proj"], ["lm_head"], ["embed_tokens"]):
        with pytest.raises(SmolforgeError, match="unknown LoRA target") as info:
            apply_lora(model, LoraSettings(r=4, target_modules=bad))
        assert all(name in str(info.value) for name in DEFAULT_TARGETS)
    assert not lora_modules(model) and all(p.requires_grad for p in model.parameters())


def test_bad_settings_are_refused(base_dir):
    with pytest.raises(ValidationError, match="r"):
        LoraSettings(r=-1)
    with pytest.raises(ValidationError, match="extra"):
        LoraSettings(r=4, rank=4)
    with pytest.raises(ValidationError, match="target_modules"):
        LoraSettings(r=4, target_modules=[])
    model, _ = load_model(base_dir)
    with pytest.raises(SmolforgeError, match="LoRA is off"):
        apply_lora(model, LoraSettings())
    apply_lora(model, SETTINGS)
    with pytest.raises(SmolforgeError, match="already has LoRA"):
        apply_lora(model, SETTINGS)
    with pytest.raises(SmolforgeError, match="rank"):
        save_adapter("unused", model, LoraSettings(r=8), None)


def test_bad_adapter_directories_are_named(base_dir, tmp_path):
    model = lora_model(base_dir)
    with pytest.raises(SmolforgeError, match="no such directory"):
        read_adapter_config(tmp_path / "nowhere")
    path = save_adapter(tmp_path / "adapter", model, SETTINGS, None)
    fresh, _ = load_model(base_dir)

    weights = load_file(path / "adapter_model.safetensors")
    dropped = "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"
    save_file({k: v for k, v in weights.items() if k != dropped}, path / "adapter_model.safetensors")
    with pytest.raises(SmolforgeError, match="layers.1.mlp.up_proj.lora_B"):
        load_adapter(fresh, path)
    assert not lora_modules(fresh)  # a failed load leaves the model as it was

    (path / "adapter_model.safetensors").unlink()
    with pytest.raises(SmolforgeError, match="adapter_model.safetensors"):
        load_adapter(fresh, path)
    save_file(weights, path / "adapter_model.safetensors")

    config = json.loads((path / "adapter_config.json").read_text())
    for key, value in (("use_dora", True), ("target_modules", "all-linear"), ("peft_type", "IA3"),
                       ("modules_to_save", ["lm_head"])):  # a head in full: reward models' score only
        (path / "adapter_config.json").write_text(json.dumps({**config, key: value}))
        with pytest.raises(SmolforgeError, match=key):
            load_adapter(fresh, path)
    (path / "adapter_config.json").write_text(json.dumps({**config, "r": 8}))
    with pytest.raises(SmolforgeError, match="shape"):
        load_adapter(fresh, path)
    (path / "adapter_config.json").unlink()
    with pytest.raises(SmolforgeError, match="adapter_config.json"):
        load_adapter(fresh, path)
    with pytest.raises(SmolforgeError, match="not a LoRA adapter"):
        save_adapter(tmp_path, model, SETTINGS, None)  # tmp_path holds other things


def test_moe_experts_adapt_and_merge_but_refuse_peft_export(tmp_path):
    torch.manual_seed(0)
    model = Transformer(tiny(n_experts=4, experts_per_token=2, qk_norm=True,
                             moe_intermediate_size=32)).eval()
    x = ids()
    with pytest.warns(UserWarning, match="MoE experts"):
        apply_lora(model, SETTINGS)
    names = lora_modules(model)
    assert "model.layers.0.mlp.experts.3.up_proj" in names
    assert not any(name.endswith("mlp.gate") for name in names)  # the router stays as it is
    with pytest.raises(SmolforgeError, match="unknown LoRA target"):
        apply_lora(Transformer(model.config), LoraSettings(r=2, target_modules=["gate"]))
    randomise_adapters(model)
    unmerged = logits(model, x)
    with pytest.raises(SmolforgeError, match="MoE experts"):
        save_adapter(tmp_path / "adapter", model, SETTINGS, None)
    assert not (tmp_path / "adapter").exists()
    torch.testing.assert_close(logits(merge_lora(model), x), unmerged, atol=1e-5, rtol=0)
