"""Hugging Face `config.json` and state-dict adapters, one explicit mapping per architecture.

smolforge's parameter names already follow the Llama/Qwen layout below `model.`, so the key
map is the identity for every tensor it lists; the adapter's work is to list them (no guessing
from names), to handle tied embeddings, and to pick the architecture that expresses the
model's features:

| features                          | architecture          |
|-----------------------------------|-----------------------|
| plain dense                       | LlamaForCausalLM      |
| q/k/v biases                      | Qwen2ForCausalLM      |
| QK-norm                           | Qwen3ForCausalLM      |
| NoPE layers (RNoPE)               | SmolLM3ForCausalLM    |
| MoE + QK-norm, no shared experts  | Qwen3MoeForCausalLM   |

Anything else is refused with a message naming the feature.
"""

from __future__ import annotations

from typing import Any

import torch

from smolforge.errors import SmolforgeError
from smolforge.model import ModelConfig

MODEL_TYPES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "SmolLM3ForCausalLM": "smollm3",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}


def architecture_for(cfg: ModelConfig) -> str:
    """The HF architecture that expresses `cfg`, or a SmolforgeError naming what cannot be."""
    def refuse(feature: str) -> SmolforgeError:
        return SmolforgeError(f"no supported Hugging Face architecture expresses {feature}; "
                              f"change the model config or keep the checkpoint smolforge-only")

    if cfg.n_experts:
        if cfg.n_shared_experts:
            raise refuse("shared experts in a MoE model (Qwen3-MoE has none)")
        if not cfg.qk_norm or cfg.nope_interval or cfg.attention_bias:
            raise refuse("a MoE model without QK-norm, or with NoPE layers or attention biases "
                         "(Qwen3-MoE always has QK-norm, RoPE everywhere and no biases)")
        return "Qwen3MoeForCausalLM"
    if cfg.nope_interval:
        if cfg.qk_norm or cfg.attention_bias:
            raise refuse("NoPE layers combined with QK-norm or attention biases")
        return "SmolLM3ForCausalLM"
    if cfg.qk_norm:
        if cfg.attention_bias:
            raise refuse("QK-norm combined with q/k/v biases")
        return "Qwen3ForCausalLM"
    return "Qwen2ForCausalLM" if cfg.attention_bias else "LlamaForCausalLM"


def hf_config(cfg: ModelConfig, *, bos_id: int | None, eos_id: int | None, pad_id: int | None,
              dtype: str = "float32") -> dict[str, Any]:
    arch = architecture_for(cfg)
    config: dict[str, Any] = {
        "architectures": [arch], "model_type": MODEL_TYPES[arch],
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.resolved_head_dim, "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps, "hidden_act": "silu", "initializer_range": cfg.init_std,
        "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": cfg.attention_bias,
        "attention_dropout": 0.0, "use_cache": True,
        # transformers >= 5 reads rope_parameters; older versions read rope_theta.
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": pad_id,
        "torch_dtype": dtype, "dtype": dtype,
    }
    if arch == "LlamaForCausalLM":
        config["mlp_bias"] = False
    if arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM"):
        config.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layers)
    if arch == "SmolLM3ForCausalLM":
        config["no_rope_layer_interval"] = cfg.nope_interval
        # SmolLM3 lists 1 = RoPE, 0 = NoPE per layer.
        config["no_rope_layers"] = [int(cfg.uses_rope(i)) for i in range(cfg.n_layers)]
        config.update(use_sliding_window=False, sliding_window=None)
    if arch == "Qwen3MoeForCausalLM":
        config.update(num_experts=cfg.n_experts, num_experts_per_tok=cfg.experts_per_token,
                      moe_intermediate_size=cfg.expert_size, norm_topk_prob=True,
                      router_aux_loss_coef=cfg.router_aux_loss_coef, decoder_sparse_step=1,
                      mlp_only_layers=[], output_router_logits=False)
    return config


def model_config_from_hf(config: dict[str, Any], origin: str = "config.json") -> ModelConfig:
    """ModelConfig from a transformers config.json of a supported architecture."""
    archs = config.get("architectures") or []
    arch = archs[0] if archs else None
    if arch not in MODEL_TYPES:
        raise SmolforgeError(f"{origin}: architecture {arch!r} is not supported; smolforge reads "
                             f"{', '.join(MODEL_TYPES)}")
    if config.get("use_sliding_window"):
        raise SmolforgeError(f"{origin}: sliding-window attention is not supported (use_sliding_window: true)")
    rope = config.get("rope_parameters") or {}
    if rope.get("rope_type", "default") not in ("default", None) or config.get("rope_scaling"):
        raise SmolforgeError(f"{origin}: RoPE scaling ({rope.get('rope_type') or config.get('rope_scaling')}) "
                             f"is not supported yet")
    heads = config["num_attention_heads"]
    fields = dict(
        vocab_size=config["vocab_size"], hidden_size=config["hidden_size"],
        n_layers=config["num_hidden_layers"], n_heads=heads,
        n_kv_heads=config.get("num_key_value_heads") or heads,
        head_dim=config.get("head_dim") or config["hidden_size"] // heads,
        intermediate_size=config["intermediate_size"],
        max_seq_len=config.get("max_position_embeddings", 2048),
        rope_theta=float(rope.get("rope_theta") or config.get("rope_theta") or 10000.0),
        norm_eps=config.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        attention_bias=bool(config.get("attention_bias", arch == "Qwen2ForCausalLM")),
        qk_norm=arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM"),
        init_std=config.get("initializer_range", 0.02),
    )
    if arch == "SmolLM3ForCausalLM":
        layers = config.get("no_rope_layers") or []
        interval = config.get("no_rope_layer_interval") or 0
        fields["nope_interval"] = interval
        expected = [int(not (interval and (i + 1) % interval == 0)) for i in range(fields["n_layers"])]
        if layers and list(layers) != expected:
            raise SmolforgeError(f"{origin}: no_rope_layers {layers} is not a regular every-{interval}-th "
                                 f"pattern, which is all smolforge expresses")
    if arch == "Qwen3MoeForCausalLM":
        if config.get("mlp_only_layers") or config.get("decoder_sparse_step", 1) != 1:
            raise SmolforgeError(f"{origin}: mixed dense/MoE layers (mlp_only_layers, decoder_sparse_step) "
                                 f"are not supported")
        fields.update(n_experts=config["num_experts"], experts_per_token=config["num_experts_per_tok"],
                      moe_intermediate_size=config["moe_intermediate_size"],
                      router_aux_loss_coef=config.get("router_aux_loss_coef", 0.001))
    try:
        return ModelConfig(**fields)
    except ValueError as exc:
        raise SmolforgeError(f"{origin}: {exc}") from None


def expected_keys(cfg: ModelConfig) -> list[str]:
    """Every tensor name of the model in HF layout (per-expert names for MoE, as on disk)."""
    keys = ["model.embed_tokens.weight", "model.norm.weight"]
    if not cfg.tie_embeddings:
        keys.append("lm_head.weight")
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        keys += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
        keys += [p + f"self_attn.{n}_proj.weight" for n in "qkvo"]
        if cfg.attention_bias:
            keys += [p + f"self_attn.{n}_proj.bias" for n in "qkv"]
        if cfg.qk_norm:
            keys += [p + "self_attn.q_norm.weight", p + "self_attn.k_norm.weight"]
        mlps = ([f"mlp.experts.{e}." for e in range(cfg.n_experts)] + ["mlp.shared_experts."] * bool(cfg.n_shared_experts)
                if cfg.n_experts else ["mlp."])
        if cfg.n_experts:
            keys.append(p + "mlp.gate.weight")
        keys += [p + m + f"{n}_proj.weight" for m in mlps for n in ("gate", "up", "down")]
    return keys


def to_hf(state_dict: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """smolforge state dict -> HF tensors (tied LM head left out: transformers re-ties it)."""
    return {key: state_dict[key] for key in expected_keys(cfg)}


def from_hf(state_dict: dict[str, torch.Tensor], cfg: ModelConfig, origin: str = "") -> dict[str, torch.Tensor]:
    """HF tensors -> smolforge state dict; missing or unexpected tensors are an error."""
    keys = expected_keys(cfg)
    state = dict(state_dict)
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)  # some exporters store the tied copy too
    missing = [k for k in keys if k not in state]
    unexpected = [k for k in state if k not in set(keys) and "rotary_emb" not in k]
    if missing or unexpected:
        raise SmolforgeError(f"{origin}: weights do not match config.json; missing {missing[:5]}"
                             f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                             f"{'...' if len(unexpected) > 5 else ''}")
    out = {k: state[k] for k in keys}
    if cfg.tie_embeddings:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out
