"""Tier 2: checkpoints load in `transformers` with the same logits, and HF directories load here."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors import safe_open

from smolforge.errors import SmolforgeError
from smolforge.interop import hf as adapters
from smolforge.model import ModelConfig, Transformer, debug
from smolforge.train.checkpoint import load_model, save_checkpoint

transformers = pytest.importorskip("transformers")

VOCAB = 384


def tiny(**changes) -> ModelConfig:
    return ModelConfig(**{**debug().model_dump(), "vocab_size": VOCAB, **changes})


MOE = {"n_experts": 4, "experts_per_token": 2, "qk_norm": True, "moe_intermediate_size": 32}
CASES = {
    "llama-tied": ({}, "LlamaForCausalLM"),
    "llama-untied": ({"tie_embeddings": False}, "LlamaForCausalLM"),
    "qwen2-bias": ({"attention_bias": True}, "Qwen2ForCausalLM"),
    "qwen3-qknorm": ({"qk_norm": True, "head_dim": 32}, "Qwen3ForCausalLM"),
    "smollm3-nope": ({"n_layers": 4, "nope_interval": 2, "rope_theta": 50000.0}, "SmolLM3ForCausalLM"),
    "smollm3-nope-untied": ({"n_layers": 4, "nope_interval": 4, "tie_embeddings": False},
                            "SmolLM3ForCausalLM"),
    "qwen3-moe": (MOE, "Qwen3MoeForCausalLM"),
    "qwen3-moe-untied-top1": ({**MOE, "experts_per_token": 1, "tie_embeddings": False},
                              "Qwen3MoeForCausalLM"),
}
REQUIRED_CONFIG_KEYS = {
    "architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size",
    "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "max_position_embeddings", "rope_theta", "rope_parameters", "rms_norm_eps",
    "tie_word_embeddings", "attention_bias", "hidden_act", "torch_dtype", "dtype",
    "bos_token_id", "eos_token_id", "pad_token_id",
}


def randomise(model: torch.nn.Module) -> None:
    """Random norms and biases too, so that a wrongly mapped one changes the logits."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))


def hf_model_from(directory):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(directory, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


@pytest.mark.parametrize("case", list(CASES))
def test_checkpoint_loads_in_transformers_with_equal_logits(case, tokenizer, tmp_path):
    changes, arch = CASES[case]
    torch.manual_seed(0)
    model = Transformer(tiny(**changes)).eval()
    randomise(model)
    assert adapters.architecture_for(model.config) == arch
    path = save_checkpoint(tmp_path / "ckpt", model, tokenizer, meta={"stage": "test"})

    config = json.loads((path / "config.json").read_text())
    assert REQUIRED_CONFIG_KEYS <= config.keys()
    assert config["architectures"] == [arch] and config["hidden_act"] == "silu"
    assert config["rope_parameters"]["rope_theta"] == config["rope_theta"] == model.config.rope_theta
    assert config["eos_token_id"] == tokenizer.eos_id and config["pad_token_id"] == tokenizer.pad_id
    with safe_open(path / "model.safetensors", "pt") as f:
        assert ("lm_head.weight" in f.keys()) == (not model.config.tie_embeddings)

    hf = hf_model_from(path)
    assert type(hf).__name__ == arch
    if model.config.tie_embeddings:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    x = torch.randint(0, VOCAB, (3, 24))
    with torch.no_grad():
        ours = model(x).logits
        torch.testing.assert_close(hf(x).logits, ours, atol=1e-5, rtol=1e-4)
        reloaded, tok = load_model(path)
        assert reloaded.config == model.config
        torch.testing.assert_close(reloaded(x).logits, ours, atol=0, rtol=0)
    hf_tok = transformers.AutoTokenizer.from_pretrained(path)
    text = "the lazy fox 42 <|im_start|>"
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text) == tokenizer.encode(text)
    assert hf_tok.eos_token_id == tokenizer.eos_id


def _save_hf(tmp_path, tokenizer, arch: str, dtype=None, max_shard_size=None, **extra):
    save_options = {"max_shard_size": max_shard_size} if max_shard_size else {}
    config_cls = getattr(transformers, arch.replace("ForCausalLM", "Config"))
    config = config_cls(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                        max_position_embeddings=128, pad_token_id=tokenizer.pad_id,
                        bos_token_id=None, eos_token_id=tokenizer.eos_id, **extra)
    torch.manual_seed(0)
    model = getattr(transformers, arch)(config).eval()
    randomise(model)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(tmp_path / "hf", **save_options)
    tokenizer.save(tmp_path / "hf")
    return model


HF_CASES = {
    "llama": ("LlamaForCausalLM", {"tie_word_embeddings": False, "rope_theta": 30000.0}),
    "llama-tied": ("LlamaForCausalLM", {"tie_word_embeddings": True}),
    "mistral": ("MistralForCausalLM", {"sliding_window": None}),
    "qwen2": ("Qwen2ForCausalLM", {"tie_word_embeddings": False}),
    "qwen3": ("Qwen3ForCausalLM", {"tie_word_embeddings": True}),
    "smollm3": ("SmolLM3ForCausalLM", {"no_rope_layer_interval": 2}),
    "qwen3-moe": ("Qwen3MoeForCausalLM", {"num_experts": 4, "num_experts_per_tok": 2,
                                          "moe_intermediate_size": 32, "norm_topk_prob": True}),
}
# What smolforge writes an imported model back as (Mistral without a window is Llama).
EXPORTED_AS = {"MistralForCausalLM": "LlamaForCausalLM"}


def padded_batch(lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded random ids, the attention mask and position ids that restart after the padding."""
    width = max(lengths)
    ids = torch.randint(10, VOCAB, (len(lengths), width))
    mask = torch.tensor([[0] * (width - n) + [1] * n for n in lengths])
    ids[mask == 0] = 3  # <|pad|>
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions


def assert_same_logits(ours, theirs, mask, atol=1e-4):
    """Max abs difference over the real (unpadded) positions, the issue's bound for fp32."""
    diff = (ours - theirs).abs()[mask.bool()].max().item()
    assert diff <= atol, f"max abs logits difference {diff:.2e} > {atol}"


@pytest.mark.parametrize("case", list(HF_CASES))
def test_directory_saved_by_transformers_imports_with_equal_logits(case, tokenizer, tmp_path):
    arch, extra = HF_CASES[case]
    hf = _save_hf(tmp_path, tokenizer, arch, **extra)
    ours, tok = load_model(tmp_path / "hf")
    assert adapters.architecture_for(ours.config) == EXPORTED_AS.get(arch, arch)
    assert ours.config.tie_embeddings == hf.config.tie_word_embeddings
    ids, mask, positions = padded_batch([16, 11, 5])
    with torch.no_grad():
        theirs = hf(ids, attention_mask=mask, position_ids=positions).logits
        assert_same_logits(ours(ids, position_ids=positions, key_mask=mask.bool()).logits, theirs, mask)
    # and back out: the re-export loads in transformers with the same logits
    save_checkpoint(tmp_path / "again", ours, tok)
    with torch.no_grad():
        again = hf_model_from(tmp_path / "again")
        assert_same_logits(again(ids, attention_mask=mask, position_ids=positions).logits, theirs, mask)


def test_sharded_bf16_directory_imports(tokenizer, tmp_path):
    """bf16 storage split over shards by save_pretrained: loads, keeps bf16, and equals transformers."""
    _save_hf(tmp_path, tokenizer, "Qwen3ForCausalLM", dtype=torch.bfloat16,
             max_shard_size="60KB", tie_word_embeddings=False)
    files = sorted(p.name for p in (tmp_path / "hf").glob("*.safetensors"))
    assert len(files) > 1 and (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    ours, _ = load_model(tmp_path / "hf")
    assert ours.model.embed_tokens.weight.dtype == torch.bfloat16
    ours = ours.float()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ids, mask, positions = padded_batch([12, 7])
    with torch.no_grad():
        assert_same_logits(ours(ids, position_ids=positions, key_mask=mask.bool()).logits,
                           theirs(ids, attention_mask=mask, position_ids=positions).logits, mask)


def test_sharded_export_loads_in_transformers(tokenizer, tmp_path):
    torch.manual_seed(0)
    model = Transformer(tiny(tie_embeddings=False)).eval()
    path = save_checkpoint(tmp_path / "ckpt", model, tokenizer, max_shard_bytes=40_000)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (path / "model.safetensors").exists()
    assert index["metadata"]["total_size"] == sum(p.numel() * 4 for p in model.state_dict().values())
    x = torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(hf_model_from(path)(x).logits, model(x).logits, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(load_model(path)[0](x).logits, model(x).logits, atol=0, rtol=0)


def test_fused_expert_tensors_of_transformers_5_import(tokenizer):
    """transformers 5 keeps experts fused in memory (gate_up_proj / down_proj, 3-D): map them too."""
    config = transformers.Qwen3MoeConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         head_dim=16, num_experts=4, num_experts_per_tok=2,
                                         moe_intermediate_size=32, norm_topk_prob=True, pad_token_id=None)
    torch.manual_seed(1)
    hf = transformers.Qwen3MoeForCausalLM(config).eval()
    state = hf.state_dict()
    if "model.layers.0.mlp.experts.gate_up_proj" not in state:
        pytest.skip("this transformers version keeps experts unfused in memory")
    cfg = adapters.model_config_from_hf(config.to_dict())
    model = Transformer(cfg).eval()
    model.load_state_dict(adapters.from_hf(state, cfg, "memory", architecture="Qwen3MoeForCausalLM"))
    x = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, hf(x).logits, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("layers, interval", [(4, 2), (8, 4), (6, 4), (3, 4)])
def test_nope_layers_count_like_transformers_smollm3(layers, interval):
    cfg = tiny(n_layers=layers, nope_interval=interval)
    ours = adapters.hf_config(cfg)["no_rope_layers"]
    theirs = transformers.SmolLM3Config(num_hidden_layers=layers, no_rope_layer_interval=interval,
                                        vocab_size=VOCAB, pad_token_id=None).no_rope_layers
    assert ours == theirs == [int(cfg.uses_rope(i)) for i in range(layers)]
    back = adapters.model_config_from_hf(adapters.hf_config(cfg))
    assert [back.uses_rope(i) for i in range(layers)] == [cfg.uses_rope(i) for i in range(layers)]


@pytest.mark.parametrize("changes, feature", [
    ({**MOE, "n_shared_experts": 1}, "shared experts"),
    ({**MOE, "qk_norm": False}, "MoE model without QK-norm"),
    ({**MOE, "nope_interval": 2}, "NoPE layers in a MoE model"),
    ({**MOE, "attention_bias": True}, "attention biases in a MoE model"),
    ({"nope_interval": 2, "qk_norm": True}, "NoPE layers combined with QK-norm"),
    ({"nope_interval": 2, "attention_bias": True}, "NoPE layers combined with q/k/v biases"),
    ({"qk_norm": True, "attention_bias": True}, "QK-norm combined with q/k/v biases"),
])
def test_inexpressible_models_are_refused_naming_the_feature(changes, feature, tokenizer, tmp_path):
    with pytest.raises(SmolforgeError, match=feature):
        save_checkpoint(tmp_path / "ckpt", Transformer(tiny(**changes)), tokenizer)
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a temporary directory


def _hf_config(**changes) -> dict:
    return {**adapters.hf_config(tiny(qk_norm=True)), **changes}


@pytest.mark.parametrize("config, message", [
    ({"architectures": ["GPT2LMHeadModel"], "vocab_size": 10}, "'GPT2LMHeadModel' is not supported.*LlamaForCausalLM"),
    (_hf_config(architectures=["Qwen3MoeForCausalLM"], num_experts=4, moe_intermediate_size=32,
                norm_topk_prob=False), "norm_topk_prob"),
    (_hf_config(architectures=["Qwen3MoeForCausalLM"], num_experts=4, moe_intermediate_size=32,
                norm_topk_prob=True, mlp_only_layers=[1]), "mixed dense and MoE"),
    (_hf_config(architectures=["LlamaForCausalLM"], attention_bias=True), "o_proj"),
    (_hf_config(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}), "llama3"),
    (_hf_config(rope_parameters=None, rope_scaling={"type": "linear", "factor": 2.0}), "linear"),
    (_hf_config(use_sliding_window=True, sliding_window=64), "sliding-window"),
    (_hf_config(hidden_act="gelu"), "gelu"),
    (_hf_config(architectures=["SmolLM3ForCausalLM"], qk_norm=None, no_rope_layers=[1, 0]
                ) | {"num_hidden_layers": 3, "no_rope_layers": [1, 0, 0]}, "not a regular"),
    ({k: v for k, v in _hf_config().items() if k != "hidden_size"}, "hidden_size"),
])
def test_unsupported_hf_configs_are_refused_naming_the_field(config, message, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(SmolforgeError, match=message):
        load_model(tmp_path)


def test_weights_that_do_not_match_the_config_are_named(tokenizer, tmp_path):
    model = Transformer(tiny(qk_norm=True))
    path = save_checkpoint(tmp_path / "ckpt", model, tokenizer)
    config = json.loads((path / "config.json").read_text())
    config["architectures"], config["model_type"] = ["LlamaForCausalLM"], "llama"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(SmolforgeError, match="unexpected.*q_norm"):
        load_model(path, verify=False)


def test_mistral_with_a_sliding_window_is_refused(tokenizer, tmp_path):
    _save_hf(tmp_path, tokenizer, "MistralForCausalLM", sliding_window=64)
    with pytest.raises(SmolforgeError, match=r"config.json.*sliding_window.*64 tokens"):
        load_model(tmp_path / "hf")


def test_a_missing_shard_is_named(tokenizer, tmp_path):
    _save_hf(tmp_path, tokenizer, "LlamaForCausalLM", max_shard_size="60KB")
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    lost = sorted(set(index["weight_map"].values()))[-1]
    (tmp_path / "hf" / lost).unlink()
    with pytest.raises(SmolforgeError, match=rf"{lost} is missing: model.safetensors.index.json lists it "
                                             rf"for model\.layers"):
        load_model(tmp_path / "hf")


def test_a_tokenizer_larger_than_the_embedding_is_refused(tokenizer, tmp_path):
    _save_hf(tmp_path, tokenizer, "LlamaForCausalLM")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["vocab_size"] = 256
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(SmolforgeError, match=rf"tokenizer has {tokenizer.vocab_size} tokens but .*config.json sets "
                                             rf"vocab_size=256"):
        load_model(tmp_path / "hf")


@pytest.mark.parametrize("key, value, tensor", [
    ("intermediate_size", 128, "model.layers.0.mlp.gate_proj.weight"),
    ("num_key_value_heads", 4, "model.layers.0.self_attn.k_proj.weight"),
    ("vocab_size", 512, "model.embed_tokens.weight"),
])
def test_a_config_that_contradicts_the_weights_names_the_tensor(key, value, tensor, tokenizer, tmp_path):
    _save_hf(tmp_path, tokenizer, "LlamaForCausalLM")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config[key] = value
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(SmolforgeError, match=rf"model.safetensors: tensor {re.escape(tensor)} has shape "
                                             rf"\[.*\] but .*config.json implies"):
        load_model(tmp_path / "hf")


def test_hub_ids_resolve_through_the_hugging_face_cache(tokenizer, tmp_path, monkeypatch):
    """`owner/name` loads like from_pretrained: here from a filled cache with the Hub offline."""
    from huggingface_hub import constants

    hf = _save_hf(tmp_path, tokenizer, "Qwen3ForCausalLM")
    repo = tmp_path / "cache" / "models--tiny-org--tiny-qwen3"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots").mkdir()
    (tmp_path / "hf").rename(repo / "snapshots" / commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    model, tok = load_model("tiny-org/tiny-qwen3")
    assert tok.vocab_size == tokenizer.vocab_size
    x = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, hf(x).logits, atol=1e-5, rtol=1e-4)
    with pytest.raises(SmolforgeError, match="tiny-org/missing: no such directory, and the Hub repository "
                                             "could not be fetched"):
        load_model("tiny-org/missing")
