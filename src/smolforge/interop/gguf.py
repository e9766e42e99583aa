"""GGUF export for llama.cpp, Ollama and LM Studio, written with the `gguf` package.

What llama.cpp needs beyond a renamed state dict, and why each step is here:
- **Architecture.** GGUF names the graph llama.cpp builds: `llama`, `qwen2`, `qwen3` or `smollm3`,
  chosen like the Hugging Face export (`interop.hf.architecture_for`). MoE models are refused
  (dense architectures only, for now); llama.cpp's `smollm3` graph hard-codes NoPE on every 4th
  layer, so another `nope_interval` is refused rather than exported wrong.
- **RoPE layout.** `llama` and `smollm3` rotate interleaved pairs (2i, 2i+1) where transformers
  rotates halves (i, i + d/2); the rows of q_proj and k_proj are reordered per head so both
  compute the same thing. `qwen2`/`qwen3` rotate halves in llama.cpp too and are copied as is.
- **Tokenizer.** The byte-level BPE goes in as `gpt2` tokens + merges; llama.cpp re-implements
  the pre-tokenizer by name, so the name must describe ours exactly: smolforge's (and SmolLM's)
  "every digit alone, then the GPT-2 split" is llama.cpp's `smollm`. A tokenizer whose
  pre-tokenizer has no known llama.cpp name is refused, naming it.
- **Types.** 1-D tensors (norms, biases) stay f32, as llama.cpp expects; matrices are f32, f16,
  bf16 or q8_0.

`benchmarks/check_gguf.py` loads the file with llama-cpp-python and compares greedy continuations
and token ids with smolforge (results in docs/interop.md).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from smolforge.errors import SmolforgeError
from smolforge.interop import hf
from smolforge.model import ModelConfig, Transformer
from smolforge.tokenizer import Tokenizer

GGUF_ARCH = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
             "Qwen3ForCausalLM": "qwen3", "SmolLM3ForCausalLM": "smollm3"}
INTERLEAVED_ROPE = {"llama", "smollm3"}
LLAMA_CPP_NOPE_INTERVAL = 4
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")

# Pre-tokenizers llama.cpp knows, as they appear in tokenizer.json -> llama.cpp's name for them.
_DIGITS_THEN_GPT2 = {"type": "Sequence", "pretokenizers": [
    {"type": "Digits", "individual_digits": True},
    {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}]}


def _refuse(feature: str) -> SmolforgeError:
    return SmolforgeError(f"cannot export to GGUF: {feature}. Export with --format hf instead "
                          f"(transformers, vLLM), or change the model")


def gguf_architecture(cfg: ModelConfig) -> str:
    """llama.cpp's architecture name for `cfg`, or a SmolforgeError naming what it cannot express."""
    architecture = hf.architecture_for(cfg)
    if cfg.n_experts:
        raise _refuse("mixture-of-experts models (model.n_experts) are not supported by smolforge's "
                      "GGUF writer yet; only dense architectures are")
    if architecture == "SmolLM3ForCausalLM" and cfg.nope_interval != LLAMA_CPP_NOPE_INTERVAL:
        raise _refuse(f"llama.cpp's smollm3 graph puts NoPE on every {LLAMA_CPP_NOPE_INTERVAL}th layer, "
                      f"this model every {cfg.nope_interval}th (model.nope_interval)")
    return GGUF_ARCH[architecture]


def interleave_rope_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder q/k projection rows per head from rotate-half pairs (i, i+d/2) to (2i, 2i+1)."""
    head_dim = weight.shape[0] // n_heads
    return weight.reshape(n_heads, 2, head_dim // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def gguf_tensors(model: Transformer, arch: str) -> dict[str, torch.Tensor]:
    """smolforge state dict -> GGUF tensor names (llama.cpp's `blk.N.*`), q/k reordered if needed."""
    cfg = model.config
    state = model.state_dict()
    out = {"token_embd.weight": state["model.embed_tokens.weight"],
           "output_norm.weight": state["model.norm.weight"]}
    if not cfg.tie_embeddings:  # tied: llama.cpp reuses token_embd when output.weight is absent
        out["output.weight"] = state["lm_head.weight"]
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
             "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
             "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    heads = {"self_attn.q_proj": cfg.n_heads, "self_attn.k_proj": cfg.n_kv_heads}
    for i in range(cfg.n_layers):
        prefix = f"model.layers.{i}."
        for ours, theirs in names.items():
            for kind in ("weight", "bias"):
                tensor = state.get(f"{prefix}{ours}.{kind}")
                if tensor is None:
                    continue
                if arch in INTERLEAVED_ROPE and ours in heads:
                    tensor = interleave_rope_rows(tensor, heads[ours])
                out[f"blk.{i}.{theirs}.{kind}"] = tensor
    unmapped = set(state) - {"lm_head.weight"} - {
        f"model.layers.{i}.{ours}.{kind}" for i in range(cfg.n_layers) for ours in names
        for kind in ("weight", "bias")} - {"model.embed_tokens.weight", "model.norm.weight"}
    if unmapped:  # a new model feature must get a GGUF name here, never be dropped silently
        raise _refuse(f"no GGUF tensor name for {sorted(unmapped)[:3]}")
    return out


def _pre_tokenizer_name(tokenizer: Tokenizer) -> str:
    pre = json.loads(tokenizer.backend.to_str()).get("pre_tokenizer")
    if pre is not None and pre.get("type") == "Sequence":
        shape = {"type": "Sequence", "pretokenizers": [
            {k: v for k, v in p.items() if k in ("type", "individual_digits", "add_prefix_space", "use_regex")}
            for p in pre.get("pretokenizers", [])]}
        if shape == _DIGITS_THEN_GPT2:
            return "smollm"
    raise _refuse(f"the tokenizer's pre-tokenizer {json.dumps(pre)[:200]} has no llama.cpp name "
                  f"smolforge knows (only the one of smolforge/SmolLM tokenizers is mapped)")


def _add_tokenizer(writer: Any, tokenizer: Tokenizer, vocab_size: int) -> None:
    import gguf

    data = json.loads(tokenizer.backend.to_str())
    if data["model"]["type"] != "BPE":
        raise _refuse(f"the tokenizer is {data['model']['type']}, not byte-level BPE")
    by_id = {i: token for token, i in tokenizer.backend.get_vocab(with_added_tokens=True).items()}
    added = {t["id"]: t for t in data.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(vocab_size):
        if i in by_id:
            tokens.append(by_id[i])
            extra = added.get(i)
            types.append(gguf.TokenType.NORMAL if extra is None else
                         gguf.TokenType.CONTROL if extra.get("special") else gguf.TokenType.USER_DEFINED)
        else:  # embedding rows past the tokenizer (vocab padded to a multiple of 128)
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_eos_token_id(tokenizer.eos_id)
    if tokenizer.pad_id is not None:
        writer.add_pad_token_id(tokenizer.pad_id)
    if tokenizer.bos_id is not None:
        writer.add_bos_token_id(tokenizer.bos_id)
    writer.add_add_bos_token(False)  # smolforge never prepends BOS (the playbook's SmolLM setup)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def _encode(tensor: torch.Tensor, dtype: str) -> tuple[np.ndarray, Any]:
    import gguf

    data = tensor.detach().float().cpu().numpy()
    qtype = gguf.GGMLQuantizationType
    if data.ndim == 1 or dtype == "f32":
        return data, qtype.F32
    if dtype == "q8_0" and data.shape[-1] % 32:
        return data.astype(np.float16), qtype.F16  # q8_0 needs rows in blocks of 32 values
    kind = {"f16": qtype.F16, "bf16": qtype.BF16, "q8_0": qtype.Q8_0}[dtype]
    return gguf.quants.quantize(data, kind), kind


def write_gguf(model: Transformer, tokenizer: Tokenizer, out: str | Path, dtype: str = "f16",
               name: str = "smolforge-model") -> Path:
    """Write `model` + `tokenizer` as one GGUF file at `out` (atomically: temp file, then rename)."""
    try:
        import gguf
    except ImportError:
        raise SmolforgeError("GGUF export needs the `gguf` package: pip install 'smolforge[gguf]'") from None
    if dtype not in GGUF_TYPES:
        raise SmolforgeError(f"GGUF dtype {dtype!r} is not one of {', '.join(GGUF_TYPES)}")
    cfg = model.config
    arch = gguf_architecture(cfg)
    tensors = gguf_tensors(model, arch)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp-{out.name}-{os.getpid()}")
    writer = gguf.GGUFWriter(str(tmp), arch)
    try:
        writer.add_name(name)
        writer.add_context_length(cfg.max_seq_len)
        writer.add_embedding_length(cfg.hidden_size)
        writer.add_block_count(cfg.n_layers)
        writer.add_feed_forward_length(cfg.intermediate_size)
        writer.add_head_count(cfg.n_heads)
        writer.add_head_count_kv(cfg.n_kv_heads)
        writer.add_key_length(cfg.resolved_head_dim)
        writer.add_value_length(cfg.resolved_head_dim)
        writer.add_rope_dimension_count(cfg.resolved_head_dim)
        writer.add_rope_freq_base(cfg.rope_theta)
        writer.add_layer_norm_rms_eps(cfg.norm_eps)
        writer.add_vocab_size(cfg.vocab_size)
        file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                     "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
        writer.add_file_type(file_type[dtype])
        _add_tokenizer(writer, tokenizer, cfg.vocab_size)
        for tensor_name, tensor in tensors.items():
            data, kind = _encode(tensor, dtype)
            writer.add_tensor(tensor_name, data, raw_dtype=kind)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return out
