"""Tier 2: checkpoints load in `transformers` with the same logits, and HF directories load here."""

from __future__ import annotations

import pytest
import torch

from smolforge.errors import SmolforgeError
from smolforge.interop.hf import architecture_for
from smolforge.model import ModelConfig, Transformer, debug
from smolforge.tokenizer import train_tokenizer
from smolforge.train.checkpoint import load_model, save_checkpoint

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    (root / "corpus.txt").write_text("the quick brown fox jumps over the lazy dog 0123456789\n" * 200)
    return train_tokenizer([root / "corpus.txt"], vocab_size=384)


def tiny(**changes) -> ModelConfig:
    return ModelConfig(**{**debug().model_dump(), "vocab_size": 384, **changes})


CASES = {
    "llama-tied": ({}, "LlamaForCausalLM"),
    "llama-untied": ({"tie_embeddings": False}, "LlamaForCausalLM"),
    "qwen2-bias": ({"attention_bias": True}, "Qwen2ForCausalLM"),
    "qwen3-qknorm": ({"qk_norm": True, "head_dim": 32}, "Qwen3ForCausalLM"),
    "smollm3-nope": ({"n_layers": 4, "nope_interval": 2, "rope_theta": 50000.0}, "SmolLM3ForCausalLM"),
    "qwen3-moe": ({"n_experts": 4, "experts_per_token": 2, "qk_norm": True, "moe_intermediate_size": 32},
                  "Qwen3MoeForCausalLM"),
}


def randomise(model: torch.nn.Module) -> None:
    """Random norms and biases too, so that a wrongly mapped one changes the logits."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.copy_(1 + 0.1 * torch.randn_like(p) if name.endswith("weight") else 0.1 * torch.randn_like(p))


@pytest.mark.parametrize("case", list(CASES))
def test_checkpoint_loads_in_transformers_with_equal_logits(case, tokenizer, tmp_path):
    changes, arch = CASES[case]
    torch.manual_seed(0)
    model = Transformer(tiny(**changes)).eval()
    randomise(model)
    assert architecture_for(model.config) == arch
    save_checkpoint(tmp_path / "ckpt", model, tokenizer, meta={"stage": "test"})
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", output_loading_info=True)
    assert type(hf).__name__ == arch
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    x = torch.randint(0, 384, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(hf.eval()(x).logits, model(x).logits, atol=1e-5, rtol=1e-4)
        reloaded, tok = load_model(tmp_path / "ckpt")
        torch.testing.assert_close(reloaded(x).logits, model(x).logits, atol=0, rtol=0)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "ckpt")
    text = "the lazy fox 42 <|im_start|>"
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text)


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Qwen3ForCausalLM"])
def test_directory_saved_by_transformers_imports_with_equal_logits(arch, tokenizer, tmp_path):
    config_cls = {"LlamaForCausalLM": transformers.LlamaConfig, "Qwen3ForCausalLM": transformers.Qwen3Config}[arch]
    config = config_cls(vocab_size=384, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                        tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = getattr(transformers, arch)(config).eval()
    hf.save_pretrained(tmp_path / "hf")
    tokenizer.save(tmp_path / "hf")
    ours, _ = load_model(tmp_path / "hf")
    x = torch.randint(0, 384, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, hf(x).logits, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("changes, feature", [
    ({"n_experts": 4, "n_shared_experts": 1, "qk_norm": True}, "shared experts"),
    ({"n_experts": 4}, "without QK-norm"),
    ({"nope_interval": 2, "qk_norm": True}, "NoPE layers combined with QK-norm"),
    ({"qk_norm": True, "attention_bias": True}, "QK-norm combined"),
])
def test_inexpressible_models_are_refused_naming_the_feature(changes, feature, tokenizer, tmp_path):
    with pytest.raises(SmolforgeError, match=feature):
        save_checkpoint(tmp_path / "ckpt", Transformer(tiny(**changes)), tokenizer)
    assert not (tmp_path / "ckpt").exists()


def test_unsupported_architecture_is_named(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"], "vocab_size": 10}')
    with pytest.raises(SmolforgeError, match="GPT2LMHeadModel"):
        load_model(tmp_path)
