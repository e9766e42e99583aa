"""Tier 2: checkpoints load in `transformers` with the same logits, and HF directories load here."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors import safe_open

from smolforge.errors import SmolforgeError
from smolforge.interop import hf as adapters
from smolforge.model import ModelConfig, Transformer, debug
from smolforge.tokenizer import train_tokenizer
from smolforge.train.checkpoint import load_model, save_checkpoint

transformers = pytest.importorskip("transformers")

VOCAB = 384


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    (root / "corpus.txt").write_text("the quick brown fox jumps over the lazy dog 0123456789\n" * 200)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tiny corpus yields fewer merges than asked for
        return train_tokenizer([root / "corpus.txt"], vocab_size=VOCAB)


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


def _save_hf(tmp_path, tokenizer, arch: str, **extra):
    config_cls = getattr(transformers, arch.replace("ForCausalLM", "Config"))
    config = config_cls(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                        max_position_embeddings=128, pad_token_id=tokenizer.pad_id,
                        bos_token_id=None, eos_token_id=tokenizer.eos_id, **extra)
    torch.manual_seed(0)
    model = getattr(transformers, arch)(config).eval()
    randomise(model)
    model.save_pretrained(tmp_path / "hf")
    tokenizer.save(tmp_path / "hf")
    return model


HF_CASES = {
    "llama": ("LlamaForCausalLM", {"tie_word_embeddings": False, "rope_theta": 30000.0}),
    "qwen3": ("Qwen3ForCausalLM", {"tie_word_embeddings": True}),
    "smollm3": ("SmolLM3ForCausalLM", {"no_rope_layer_interval": 2}),
    "qwen3-moe": ("Qwen3MoeForCausalLM", {"num_experts": 4, "num_experts_per_tok": 2,
                                          "moe_intermediate_size": 32, "norm_topk_prob": True}),
}


@pytest.mark.parametrize("case", list(HF_CASES))
def test_directory_saved_by_transformers_imports_with_equal_logits(case, tokenizer, tmp_path):
    arch, extra = HF_CASES[case]
    hf = _save_hf(tmp_path, tokenizer, arch, **extra)
    ours, tok = load_model(tmp_path / "hf")
    assert adapters.architecture_for(ours.config) == arch
    assert ours.config.tie_embeddings == hf.config.tie_word_embeddings
    x = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, hf(x).logits, atol=1e-5, rtol=1e-4)
    # and back out: the re-export loads in transformers with the same logits
    save_checkpoint(tmp_path / "again", ours, tok)
    with torch.no_grad():
        torch.testing.assert_close(hf_model_from(tmp_path / "again")(x).logits, hf(x).logits,
                                   atol=1e-5, rtol=1e-4)


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
