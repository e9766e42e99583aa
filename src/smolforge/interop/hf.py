"""Hugging Face `config.json` and state-dict adapters, one explicit key map per architecture.

smolforge's parameter names follow the Llama/Qwen layout below `model.`, so most entries of a
key map are the identity; the adapters still list every tensor (no guessing from names, the
idea of torchtitan's `state_dict_adapter.py`), handle tied embeddings, convert layouts where
they differ (fused 3-D expert tensors), and pick the architecture that expresses the model:

| smolforge features                          | architecture          | model_type |
|---------------------------------------------|-----------------------|------------|
| plain dense                                 | LlamaForCausalLM      | llama      |
| q/k/v biases                                | Qwen2ForCausalLM      | qwen2      |
| QK-norm                                     | Qwen3ForCausalLM      | qwen3      |
| NoPE every N-th layer (RNoPE)               | SmolLM3ForCausalLM    | smollm3    |
| MoE (with QK-norm, without shared experts)  | Qwen3MoeForCausalLM   | qwen3_moe  |

Anything else is refused at export with a message naming the feature (DESIGN.md principle 2).
MistralForCausalLM (without sliding window) is read as well and written back as Llama. A new
architecture (Qwen2-MoE, ...) is one more `Adapter` subclass in `ADAPTERS`.

transformers >= 5 reads RoPE settings from `rope_parameters` and the weight dtype from `dtype`;
4.x reads `rope_theta` and `torch_dtype`. Exported configs carry both spellings with equal values.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from smolforge.errors import SmolforgeError, where
from smolforge.model import ModelConfig

Tensors = dict[str, torch.Tensor]


def _refuse(feature: str, hint: str = "") -> SmolforgeError:
    return SmolforgeError(
        f"cannot export to Hugging Face format: no supported architecture expresses {feature}. "
        f"{hint + ' ' if hint else ''}Change the model config, or keep this model smolforge-only "
        f"(supported: {', '.join(a for a, adapter in ADAPTERS.items() if adapter.exportable)})."
    )


class Adapter:
    """Config and weight mapping between smolforge and one transformers architecture."""

    architecture: ClassVar[str]
    model_type: ClassVar[str]
    exportable: ClassVar[bool] = True  # False: read only, written as another architecture
    # transformers' defaults for keys a config.json may leave out (they differ per architecture).
    defaults: ClassVar[dict[str, Any]] = {
        "tie_word_embeddings": False, "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
        "max_position_embeddings": 2048, "head_dim": None, "attention_bias": False,
    }

    # ---- export --------------------------------------------------------------------------

    def config_extras(self, cfg: ModelConfig) -> dict[str, Any]:
        """Architecture-specific config.json keys."""
        return {}

    def key_map(self, cfg: ModelConfig) -> dict[str, str]:
        """smolforge parameter name -> tensor name on disk, for every stored tensor."""
        names = ["model.embed_tokens.weight", "model.norm.weight"]
        if not cfg.tie_embeddings:
            # Tied: transformers re-ties lm_head to the embedding and expects no lm_head on disk.
            names.append("lm_head.weight")
        for i in range(cfg.n_layers):
            p = f"model.layers.{i}."
            names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
            names += [p + f"self_attn.{n}_proj.weight" for n in "qkvo"]
            if cfg.attention_bias:
                names += [p + f"self_attn.{n}_proj.bias" for n in "qkv"]
            if cfg.qk_norm:
                names += [p + "self_attn.q_norm.weight", p + "self_attn.k_norm.weight"]
            names += self.mlp_names(cfg, p)
        return {name: name for name in names}

    def mlp_names(self, cfg: ModelConfig, prefix: str) -> list[str]:
        return [prefix + f"mlp.{n}_proj.weight" for n in ("gate", "up", "down")]

    def to_hf(self, state_dict: Mapping[str, torch.Tensor], cfg: ModelConfig) -> Tensors:
        return {hf_name: state_dict[ours] for ours, hf_name in self.key_map(cfg).items()}

    # ---- import --------------------------------------------------------------------------

    def read_config(self, config: Mapping[str, Any], origin: str) -> dict[str, Any]:
        """ModelConfig fields from a config.json of this architecture."""
        d = {**self.defaults, **{k: v for k, v in config.items() if v is not None}}

        def need(key: str) -> Any:
            if key not in d or d[key] is None:
                raise SmolforgeError(f"{where(origin, field=key)}: missing; a {self.architecture} "
                                     f"config.json must set it")
            return d[key]

        if d.get("hidden_act", "silu") != "silu":
            raise SmolforgeError(f"{where(origin, field='hidden_act')}: {d['hidden_act']!r} is not "
                                 f"supported; smolforge's MLP is SwiGLU (silu)")
        if d.get("mlp_bias"):
            raise SmolforgeError(f"{where(origin, field='mlp_bias')}: MLP biases are not supported")
        if d.get("use_sliding_window") or "sliding_attention" in (d.get("layer_types") or []):
            raise SmolforgeError(f"{where(origin, field='use_sliding_window')}: sliding-window "
                                 f"attention is not supported")
        heads = need("num_attention_heads")
        return dict(
            vocab_size=need("vocab_size"), hidden_size=need("hidden_size"),
            n_layers=need("num_hidden_layers"), n_heads=heads,
            n_kv_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or need("hidden_size") // heads,
            intermediate_size=need("intermediate_size"),
            max_seq_len=d["max_position_embeddings"], rope_theta=_rope_theta(d, origin),
            norm_eps=d["rms_norm_eps"], tie_embeddings=bool(d["tie_word_embeddings"]),
            init_std=d.get("initializer_range", 0.02),
            **self.read_features(d, origin),
        )

    def read_features(self, d: Mapping[str, Any], origin: str) -> dict[str, Any]:
        """The architecture switches (qk_norm, nope_interval, MoE, ...) from config.json."""
        if d.get("attention_bias"):
            # Llama/Qwen3-style attention_bias also puts a bias on o_proj, which smolforge lacks.
            raise SmolforgeError(f"{where(origin, field='attention_bias')}: a bias on the attention "
                                 f"output projection (o_proj) is not supported")
        return {}

    def from_hf(self, state_dict: Mapping[str, torch.Tensor], cfg: ModelConfig, origin: str) -> Tensors:
        """HF tensors -> smolforge state dict; missing or unexpected tensors are an error."""
        state = dict(state_dict)
        if cfg.tie_embeddings:
            state.pop("lm_head.weight", None)  # some exporters store the tied copy as well
        key_map = self.key_map(cfg)
        wanted = set(key_map.values())
        missing = sorted(k for k in wanted if k not in state)
        unexpected = sorted(k for k in state if k not in wanted and "rotary_emb" not in k)
        if missing or unexpected:
            raise SmolforgeError(
                f"{origin}: the weights do not match config.json ({self.architecture}): "
                f"missing {_few(missing)}, unexpected {_few(unexpected)}")
        out = {ours: state[hf_name] for ours, hf_name in key_map.items()}
        if cfg.tie_embeddings:
            out["lm_head.weight"] = out["model.embed_tokens.weight"]
        return out


class LlamaAdapter(Adapter):
    architecture = "LlamaForCausalLM"
    model_type = "llama"

    def config_extras(self, cfg: ModelConfig) -> dict[str, Any]:
        return {"mlp_bias": False, "pretraining_tp": 1}


class MistralAdapter(Adapter):
    """Mistral = Llama's layout plus sliding-window attention, which smolforge does not implement.

    Import only: a model with `sliding_window` null (Mistral 7B v0.2 and later) or a window that
    covers the whole context is a Llama model, and is exported as LlamaForCausalLM.
    """

    architecture = "MistralForCausalLM"
    model_type = "mistral"
    exportable = False
    defaults = {**Adapter.defaults, "max_position_embeddings": 4096 * 32}

    def read_features(self, d: Mapping[str, Any], origin: str) -> dict[str, Any]:
        window = d.get("sliding_window")
        if window is not None and window < d["max_position_embeddings"]:
            raise SmolforgeError(
                f"{where(origin, field='sliding_window')}: sliding-window attention ({window} tokens, "
                f"context {d['max_position_embeddings']}) is not supported; Mistral models load when "
                f"sliding_window is null, as in Mistral 7B v0.2 and later")
        return super().read_features(d, origin)


class Qwen2Adapter(Adapter):
    """Qwen2: biases on q/k/v only (never on o_proj), which is exactly smolforge's switch."""

    architecture = "Qwen2ForCausalLM"
    model_type = "qwen2"
    defaults = {**Adapter.defaults, "max_position_embeddings": 32768}

    def config_extras(self, cfg: ModelConfig) -> dict[str, Any]:
        return {"use_sliding_window": False, "sliding_window": None, "max_window_layers": cfg.n_layers}

    def read_features(self, d: Mapping[str, Any], origin: str) -> dict[str, Any]:
        return {"attention_bias": True}


class Qwen3Adapter(Adapter):
    architecture = "Qwen3ForCausalLM"
    model_type = "qwen3"
    defaults = {**Adapter.defaults, "max_position_embeddings": 32768, "head_dim": 128}

    def config_extras(self, cfg: ModelConfig) -> dict[str, Any]:
        return {"use_sliding_window": False, "sliding_window": None, "max_window_layers": cfg.n_layers}

    def read_features(self, d: Mapping[str, Any], origin: str) -> dict[str, Any]:
        return {**super().read_features(d, origin), "qk_norm": True}


class SmolLM3Adapter(Adapter):
    """SmolLM3: `no_rope_layers[i]` is 1 where layer i USES RoPE and 0 where it is a NoPE layer.

    transformers builds it as `int((i + 1) % no_rope_layer_interval != 0)`, the same count as
    `ModelConfig.uses_rope`; an explicit list takes precedence over the interval.
    """

    architecture = "SmolLM3ForCausalLM"
    model_type = "smollm3"
    defaults = {**Adapter.defaults, "max_position_embeddings": 32768, "tie_word_embeddings": True,
                "rope_theta": 2_000_000.0, "no_rope_layer_interval": 4}

    def config_extras(self, cfg: ModelConfig) -> dict[str, Any]:
        return {"no_rope_layer_interval": cfg.nope_interval,
                "no_rope_layers": [int(cfg.uses_rope(i)) for i in range(cfg.n_layers)],
                "use_sliding_window": False, "sliding_window": None, "mlp_bias": False}

    def read_features(self, d: Mapping[str, Any], origin: str) -> dict[str, Any]:
        features = super().read_features(d, origin)
        n = d["num_hidden_layers"]
        layers = d.get("no_rope_layers")
        if layers is None:
            interval = d["no_rope_layer_interval"] or 0
            return {**features, "nope_interval": interval if interval <= n else 0}
        layers = [int(x) for x in layers]
        nope = [i for i, uses_rope in enumerate(layers) if not uses_rope]
        interval = nope[0] + 1 if nope else 0
        regular = [int(not (interval and (i + 1) % interval == 0)) for i in range(n)]
        if layers != regular:
            raise SmolforgeError(
                f"{where(origin, field='no_rope_layers')}: NoPE at layers {nope} is not a regular "
                f"every-N-th pattern (layers N-1, 2N-1, ...), the only one smolforge expresses")
        return {**features, "nope_interval": interval}


class Qwen3MoeAdapter(Adapter):
    """Qwen3-MoE: softmax router, top-k weights renormalised (`norm_topk_prob`), no shared experts.

    On disk (what transformers' `save_pretrained` writes and the Hub holds) experts are per-expert
    2-D tensors `mlp.experts.{e}.{gate,up,down}_proj.weight`; transformers 5 fuses them in memory
    into `mlp.experts.gate_up_proj` (E, 2*I, H; gate rows first) and `mlp.experts.down_proj`
    (E, H, I) when loading. Import accepts either layout.
    """

    architecture = "Qwen3MoeForCausalLM"
    model_type = "qwen3_moe"
    defaults = {**Adapter.defaults, "max_position_embeddings": 32768, "head_dim": None,
                "norm_topk_prob": False, "decoder_sparse_step": 1, "router_aux_loss_coef": 0.001}

    def config_extras(self, cfg: ModelConfig) -> dict[str, Any]:
        return {"num_experts": cfg.n_experts, "num_experts_per_tok": cfg.experts_per_token,
                "moe_intermediate_size": cfg.expert_size, "norm_topk_prob": True,
                "router_aux_loss_coef": cfg.router_aux_loss_coef, "decoder_sparse_step": 1,
                "mlp_only_layers": [], "output_router_logits": False,
                "use_sliding_window": False, "sliding_window": None, "max_window_layers": cfg.n_layers}

    def mlp_names(self, cfg: ModelConfig, prefix: str) -> list[str]:
        return [prefix + "mlp.gate.weight"] + [
            prefix + f"mlp.experts.{e}.{n}_proj.weight"
            for e in range(cfg.n_experts) for n in ("gate", "up", "down")]

    def read_features(self, d: Mapping[str, Any], origin: str) -> dict[str, Any]:
        features = super().read_features(d, origin)
        if d.get("mlp_only_layers") or d["decoder_sparse_step"] != 1:
            raise SmolforgeError(f"{where(origin, field='mlp_only_layers')}: mixed dense and MoE "
                                 f"layers (mlp_only_layers, decoder_sparse_step) are not supported")
        if not d["norm_topk_prob"]:
            # smolforge always renormalises the top-k router weights (Qwen3-MoE releases do too).
            raise SmolforgeError(f"{where(origin, field='norm_topk_prob')}: false (top-k router "
                                 f"weights not renormalised) is not supported")
        n_experts = d.get("num_experts") or d.get("num_local_experts")
        if not n_experts:
            raise SmolforgeError(f"{where(origin, field='num_experts')}: missing")
        return {**features, "qk_norm": True, "n_experts": n_experts,
                "experts_per_token": d.get("num_experts_per_tok", 8),
                "moe_intermediate_size": d["moe_intermediate_size"],
                "router_aux_loss_coef": d["router_aux_loss_coef"]}

    def from_hf(self, state_dict: Mapping[str, torch.Tensor], cfg: ModelConfig, origin: str) -> Tensors:
        return super().from_hf(_unfuse_experts(state_dict, cfg.expert_size), cfg, origin)


_FUSED = re.compile(r"(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$")


def _unfuse_experts(state_dict: Mapping[str, torch.Tensor], expert_size: int) -> Tensors:
    """Split transformers 5's fused 3-D expert tensors into per-expert 2-D weights."""
    out: Tensors = {}
    for key, tensor in state_dict.items():
        match = _FUSED.match(key)
        if match is None:
            out[key] = tensor
            continue
        prefix, kind = match.groups()
        for e, w in enumerate(tensor.unbind(0)):
            if kind == "down_proj":
                out[f"{prefix}.{e}.down_proj.weight"] = w
            else:
                out[f"{prefix}.{e}.gate_proj.weight"] = w[:expert_size]
                out[f"{prefix}.{e}.up_proj.weight"] = w[expert_size:]
    return out


ADAPTERS: dict[str, Adapter] = {a.architecture: a for a in (
    LlamaAdapter(), MistralAdapter(), Qwen2Adapter(), Qwen3Adapter(), SmolLM3Adapter(), Qwen3MoeAdapter())}
MODEL_TYPES = {arch: a.model_type for arch, a in ADAPTERS.items()}


def architecture_for(cfg: ModelConfig) -> str:
    """The HF architecture that expresses `cfg`, or a SmolforgeError naming the feature it lacks."""
    if cfg.n_experts:
        if cfg.n_shared_experts:
            raise _refuse(f"shared experts (model.n_shared_experts={cfg.n_shared_experts})",
                          "Qwen3-MoE, the MoE architecture smolforge exports, has none.")
        if not cfg.qk_norm:
            raise _refuse("a MoE model without QK-norm (model.qk_norm=false)",
                          "Qwen3-MoE always normalises queries and keys: set model.qk_norm=true.")
        if cfg.nope_interval:
            raise _refuse("NoPE layers in a MoE model (model.nope_interval)")
        if cfg.attention_bias:
            raise _refuse("attention biases in a MoE model (model.attention_bias)")
        return "Qwen3MoeForCausalLM"
    if cfg.nope_interval:
        if cfg.qk_norm:
            raise _refuse("NoPE layers combined with QK-norm (model.nope_interval + model.qk_norm)",
                          "SmolLM3 has NoPE layers but no QK-norm.")
        if cfg.attention_bias:
            raise _refuse("NoPE layers combined with q/k/v biases (model.nope_interval + "
                          "model.attention_bias)", "SmolLM3 biases would include o_proj.")
        return "SmolLM3ForCausalLM"
    if cfg.qk_norm:
        if cfg.attention_bias:
            raise _refuse("QK-norm combined with q/k/v biases (model.qk_norm + model.attention_bias)",
                          "Qwen3's attention_bias also adds an o_proj bias, which smolforge lacks.")
        return "Qwen3ForCausalLM"
    return "Qwen2ForCausalLM" if cfg.attention_bias else "LlamaForCausalLM"


def adapter_for(cfg: ModelConfig) -> Adapter:
    return ADAPTERS[architecture_for(cfg)]


def token_ids(tokenizer: Any) -> dict[str, int | None]:
    """bos/eos/pad ids of a smolforge Tokenizer (all None without one), as config.json names them."""
    return {f"{name}_token_id": getattr(tokenizer, f"{name}_id", None) for name in ("bos", "eos", "pad")}


def hf_config(cfg: ModelConfig, tokenizer_info: Mapping[str, int | None] | None = None, *,
              dtype: str = "float32") -> dict[str, Any]:
    """config.json for `cfg`. `tokenizer_info`: bos_token_id / eos_token_id / pad_token_id."""
    adapter = adapter_for(cfg)
    ids = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None, **(tokenizer_info or {})}
    return {
        "architectures": [adapter.architecture], "model_type": adapter.model_type,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.resolved_head_dim, "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps, "hidden_act": "silu", "initializer_range": cfg.init_std,
        "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": cfg.attention_bias,
        "attention_dropout": 0.0, "use_cache": True,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        **ids, "torch_dtype": dtype, "dtype": dtype,
        **adapter.config_extras(cfg),
    }


def _rope_theta(d: Mapping[str, Any], origin: str) -> float:
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    kind = rope.get("rope_type") or rope.get("type") or "default"
    if kind != "default":
        raise SmolforgeError(f"{where(origin, field='rope_parameters')}: RoPE type {kind!r} "
                             f"(scaling) is not supported yet; only plain RoPE is")
    return float(rope.get("rope_theta") or d["rope_theta"])


def _few(keys: list[str]) -> str:
    return (str(keys[:5]) + f" and {len(keys) - 5} more") if len(keys) > 5 else str(keys)


def model_config_from_hf(config_json: Mapping[str, Any], origin: str = "config.json") -> ModelConfig:
    """ModelConfig from the config.json of a supported transformers architecture."""
    archs = config_json.get("architectures") or []
    by_type = {a.model_type: name for name, a in ADAPTERS.items()}
    arch = archs[0] if archs else by_type.get(config_json.get("model_type"))
    if arch not in ADAPTERS:
        raise SmolforgeError(f"{where(origin, field='architectures')}: architecture "
                             f"{arch or config_json.get('model_type')!r} is not supported; smolforge "
                             f"reads {', '.join(ADAPTERS)}")
    fields = ADAPTERS[arch].read_config(config_json, origin)
    try:
        return ModelConfig(**fields)
    except ValueError as exc:
        raise SmolforgeError(f"{origin}: not a valid smolforge model: {exc}") from None


def to_hf(state_dict: Mapping[str, torch.Tensor], cfg: ModelConfig) -> Tensors:
    """smolforge state dict -> the tensors transformers expects on disk (tied head left out)."""
    return adapter_for(cfg).to_hf(state_dict, cfg)


def from_hf(state_dict: Mapping[str, torch.Tensor], cfg: ModelConfig, origin: str = "",
            architecture: str | None = None) -> Tensors:
    """HF tensors -> smolforge state dict (tied head restored); mismatches are an error."""
    adapter = ADAPTERS[architecture] if architecture else adapter_for(cfg)
    return adapter.from_hf(state_dict, cfg, origin)
