"""The smolforge decoder-only Transformer: one readable file.

Architecture choices (Llama / Qwen3 / SmolLM3 family, Smol Training Playbook ch. 04):
- RMSNorm (eps 1e-6) before attention and before the MLP, and once more before the LM head;
- rotary position embeddings (RoPE, Su et al. 2021) with configurable theta, in the
  "rotate half" layout that Hugging Face Llama uses, and optional NoPE layers: with
  `nope_interval = 4` layers 3, 7, 11, ... use no position encoding at all (SmolLM3's RNoPE);
- grouped-query attention (Ainslie et al. 2023): `n_kv_heads` divides `n_heads`;
- optional QK-norm (an RMSNorm over each head's queries and keys, as in Qwen3; the playbook
  leaves it off because it hurts long-context retrieval);
- SwiGLU MLP (Shazeer 2020), no biases (an `attention_bias` switch exists for Qwen2 imports);
- tied or untied input / output embeddings;
- optional mixture of experts: a softmax top-k router, renormalised top-k weights (Qwen3-MoE),
  optional always-on shared experts, and the Switch Transformer load-balancing loss
  (Fedus et al. 2021) returned as `aux_loss`;
- attention through `torch.nn.functional.scaled_dot_product_attention`, with intra-document
  masking for packed sequences (`document_ids`; the caller restarts `position_ids` at each
  document) and a key-padding mask for batched generation; training on CUDA may route the
  document-masked case through FlexAttention or FlashAttention varlen (`smolforge.kernels`);
- a pre-allocated KV cache so that the same `forward` serves training and decoding.

Parameter names follow Hugging Face's Llama/Qwen3 layout below `model.`, so the state-dict
adapter in `smolforge.interop.hf` is an explicit, nearly one-to-one key map.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from smolforge.kernels import DocumentAttention, document_attention


class ModelConfig(BaseModel):
    """Shape and architecture switches of a smolforge model."""

    model_config = ConfigDict(extra="forbid")

    vocab_size: int = Field(0, ge=0, description="Vocabulary size; 0 = take it from the tokenizer.")
    hidden_size: int = Field(256, gt=0, description="Width of the residual stream.")
    n_layers: int = Field(6, gt=0, description="Number of Transformer blocks.")
    n_heads: int = Field(4, gt=0, description="Query heads per attention layer.")
    n_kv_heads: int = Field(2, gt=0, description="Key/value heads (GQA); must divide n_heads.")
    head_dim: int = Field(0, ge=0, description="Width of one head; 0 = hidden_size / n_heads.")
    intermediate_size: int = Field(704, gt=0, description="Hidden width of the SwiGLU MLP.")
    max_seq_len: int = Field(512, gt=0, description="Longest sequence the model is trained for (context length).")
    rope_theta: float = Field(10000.0, gt=0, description="RoPE base frequency theta.")
    nope_interval: int = Field(0, ge=0, description="Every N-th layer uses no RoPE (SmolLM3: 4); 0 = RoPE everywhere.")
    qk_norm: bool = Field(False, description="RMSNorm on per-head queries and keys (Qwen3).")
    tie_embeddings: bool = Field(True, description="Share the input embedding and the LM head.")
    norm_eps: float = Field(1e-6, gt=0, description="RMSNorm epsilon.")
    attention_bias: bool = Field(False, description="Biases on the q/k/v projections (Qwen2 imports).")
    init_std: float = Field(0.02, gt=0, description="Std of the normal initialisation N(0, std).")
    n_experts: int = Field(0, ge=0, description="Routed experts per MoE layer; 0 = dense MLP.")
    experts_per_token: int = Field(2, gt=0, description="Top-k experts each token is routed to.")
    moe_intermediate_size: int = Field(0, ge=0, description="Hidden width of one expert; 0 = intermediate_size.")
    n_shared_experts: int = Field(0, ge=0, description="Always-on shared experts added to the routed ones.")
    router_aux_loss_coef: float = Field(0.01, ge=0, description="Weight of the load-balancing loss.")

    @model_validator(mode="after")
    def _check_shapes(self) -> ModelConfig:
        if self.head_dim == 0 and self.hidden_size % self.n_heads:
            raise ValueError(
                f"model.n_heads ({self.n_heads}) must divide model.hidden_size "
                f"({self.hidden_size}), or set model.head_dim explicitly"
            )
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"model.n_kv_heads ({self.n_kv_heads}) must divide model.n_heads ({self.n_heads})"
            )
        if self.resolved_head_dim % 2:
            raise ValueError(f"the head width ({self.resolved_head_dim}) must be even for RoPE")
        if self.n_experts and self.experts_per_token > self.n_experts:
            raise ValueError(
                f"model.experts_per_token ({self.experts_per_token}) exceeds "
                f"model.n_experts ({self.n_experts})"
            )
        return self

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.n_heads

    @property
    def expert_size(self) -> int:
        return self.moe_intermediate_size or self.intermediate_size

    def uses_rope(self, layer: int) -> bool:
        """SmolLM3 RNoPE: with interval N, layers N-1, 2N-1, ... skip RoPE."""
        return not (self.nope_interval and (layer + 1) % self.nope_interval == 0)


# --- presets: plain functions returning a ModelConfig (torchtitan's debugmodel idea) ---------


def debug() -> ModelConfig:
    """Tiny model for tests: 2 layers, width 64, GQA 4/2."""
    return ModelConfig(hidden_size=64, n_layers=2, n_heads=4, n_kv_heads=2,
                       intermediate_size=128, max_seq_len=256)


def smol_3m() -> ModelConfig:
    """About 3M parameters with a 2k vocabulary: the CPU quickstart model (~7k tokens/s on 2 cores)."""
    return ModelConfig(hidden_size=192, n_layers=6, n_heads=6, n_kv_heads=2,
                       intermediate_size=512, max_seq_len=512)


def smol_10m() -> ModelConfig:
    """About 10M parameters with an 8k vocabulary: a longer CPU run or a quick GPU one."""
    return ModelConfig(hidden_size=256, n_layers=8, n_heads=8, n_kv_heads=4,
                       intermediate_size=768, max_seq_len=512)


def smollm2_135m() -> ModelConfig:
    """The shape of SmolLM2-135M (Llama architecture, 49,152 vocabulary)."""
    return ModelConfig(vocab_size=49152, hidden_size=576, n_layers=30, n_heads=9, n_kv_heads=3,
                       intermediate_size=1536, max_seq_len=8192, rope_theta=100000.0, norm_eps=1e-5)


def smollm2_360m() -> ModelConfig:
    """The shape of SmolLM2-360M."""
    return ModelConfig(vocab_size=49152, hidden_size=960, n_layers=32, n_heads=15, n_kv_heads=5,
                       intermediate_size=2560, max_seq_len=8192, rope_theta=100000.0, norm_eps=1e-5)


def smollm2_1_7b() -> ModelConfig:
    """The shape of SmolLM2-1.7B (multi-head attention)."""
    return ModelConfig(vocab_size=49152, hidden_size=2048, n_layers=24, n_heads=32, n_kv_heads=32,
                       intermediate_size=8192, max_seq_len=8192, rope_theta=130000.0, norm_eps=1e-5)


def smollm3_3b() -> ModelConfig:
    """The shape of SmolLM3-3B: 36 layers, GQA 16/4, NoPE every 4th layer, 128k vocabulary."""
    return ModelConfig(vocab_size=128256, hidden_size=2048, n_layers=36, n_heads=16, n_kv_heads=4,
                       intermediate_size=11008, max_seq_len=65536, rope_theta=5_000_000.0,
                       nope_interval=4)


PRESETS = {
    "debug": debug,
    "smol-3m": smol_3m,
    "smol-10m": smol_10m,
    "smollm2-135m": smollm2_135m,
    "smollm2-360m": smollm2_360m,
    "smollm2-1.7b": smollm2_1_7b,
    "smollm3-3b": smollm3_3b,
}


# --- building blocks ----------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019), computed in fp32 like HF Llama."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in fp32, cast back, then scale: HF Llama's order, so bf16 results match.
        # The fused F.rms_norm kernel replaces five element-wise ops (a decode hot spot).
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)


def rope_cos_sin(position_ids: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos/sin tables of shape (B, T, head_dim) for the given positions, in fp32."""
    inv_freq = 1.0 / theta ** (
        torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim
    )
    freqs = position_ids.float()[..., None] * inv_freq  # (B, T, head_dim/2)
    angles = torch.cat([freqs, freqs], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate (B, H, T, D) by the angles; "rotate half" layout, as in HF Llama."""
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class KVCache:
    """Pre-allocated keys and values for every layer, shared slot count across the batch.

    Prompts of different lengths are left-padded by the caller, so one `length` describes the
    whole batch; `key_mask` (B, max_len) records which slots hold real tokens.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int,
                 device: torch.device | str, dtype: torch.dtype) -> None:
        shape = (batch_size, cfg.n_kv_heads, max_len, cfg.resolved_head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.key_mask = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.length = 0
        self.max_len = max_len
        # Static-shape decoding (for CUDA graphs): the slot of the next token as a device
        # tensor instead of the Python int `length`, so one captured step serves every position.
        self.slot: Tensor | None = None

    def start_static_decoding(self) -> None:
        """Switch to one-token steps at `slot`, attending over the whole (masked) buffer."""
        self.slot = torch.tensor([self.length], device=self.key_mask.device)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write new keys/values at the current slots; return everything cached so far."""
        if self.slot is not None:
            self.keys[layer].index_copy_(2, self.slot, k)
            self.values[layer].index_copy_(2, self.slot, v)
            return self.keys[layer], self.values[layer]
        start, end = self.length, self.length + k.shape[2]
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def select(self, rows: Tensor) -> None:
        """Keep only the given batch rows (used when finished sequences leave the batch)."""
        self.keys = [k[rows] for k in self.keys]
        self.values = [v[rows] for v in self.values]
        self.key_mask = self.key_mask[rows]

    # -- continuous batching: rows join and leave a running cache ---------------------------------
    # Every row's real tokens form one run of slots ending at `length` (left padding before it),
    # so the cache can be re-laid out column-wise without touching positions: RoPE was applied to
    # the keys before caching, and attention only reads `key_mask`.

    def _check_dynamic(self) -> None:
        if self.slot is not None:
            raise ValueError("a static-decoding cache (CUDA graphs) cannot be re-laid out")

    def unused_prefix(self) -> int:
        """How many leading slots no row uses (padding in every row); one host sync."""
        used = self.key_mask[:, : self.length].any(0)
        return int(used.int().argmax()) if bool(used.any()) else self.length

    def trim(self) -> None:
        """Drop the leading slots that no row uses anymore (after a long row left the batch).

        Slicing makes views, so this copies nothing; decode steps attend over fewer slots, and the
        room at the end is unchanged (`resize` reclaims the dropped slots when it copies).
        """
        self._check_dynamic()
        drop = self.unused_prefix()
        if drop:
            self.keys = [k[:, :, drop:] for k in self.keys]
            self.values = [v[:, :, drop:] for v in self.values]
            self.key_mask = self.key_mask[:, drop:]
            self.length -= drop
            self.max_len -= drop

    def resize(self, capacity: int) -> None:
        """Copy the used slots into fresh buffers of `capacity` slots (>= `length`)."""
        self._check_dynamic()
        if capacity < self.length:
            raise ValueError(f"cannot shrink a KV cache below its length ({capacity} < {self.length})")
        self.keys = [_relaid(k, capacity, self.length) for k in self.keys]
        self.values = [_relaid(v, capacity, self.length) for v in self.values]
        self.key_mask = _relaid(self.key_mask, capacity, self.length)
        self.max_len = capacity

    def merge(self, other: KVCache, capacity: int) -> None:
        """Append `other`'s rows (e.g. freshly prefilled requests) to this batch, in place.

        Both are trimmed, then every row is right-aligned to the longer of the two lengths: a
        shorter newcomer lands in the padding of the running rows, a longer one shifts them right.
        The merged buffers hold `capacity` slots (at least the merged length).
        """
        self._check_dynamic()
        other._check_dynamic()
        self.trim()
        other.trim()
        length = max(self.length, other.length)
        if capacity < length:
            raise ValueError(f"merged KV cache needs {length} slots, capacity {capacity} given")
        self.keys = [torch.cat([_relaid(a, capacity, self.length, length),
                                _relaid(b, capacity, other.length, length)])
                     for a, b in zip(self.keys, other.keys)]
        self.values = [torch.cat([_relaid(a, capacity, self.length, length),
                                  _relaid(b, capacity, other.length, length)])
                       for a, b in zip(self.values, other.values)]
        self.key_mask = torch.cat([_relaid(self.key_mask, capacity, self.length, length),
                                   _relaid(other.key_mask, capacity, other.length, length)])
        self.length, self.max_len = length, capacity


def _relaid(buffer: Tensor, capacity: int, used: int, end: int | None = None) -> Tensor:
    """A zeroed copy of `buffer` with `capacity` slots (dim 2 for keys/values, dim 1 for the mask)
    whose first `used` slots are moved to end at slot `end` (default `used`)."""
    end = used if end is None else end
    dim = 2 if buffer.dim() == 4 else 1
    shape = list(buffer.shape)
    shape[dim] = capacity
    out = buffer.new_zeros(shape)
    out.narrow(dim, end - used, used).copy_(buffer.narrow(dim, 0, used))
    return out


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads = cfg.n_heads, cfg.n_kv_heads
        self.head_dim = cfg.resolved_head_dim
        self.layer = layer
        self.use_rope = cfg.uses_rope(layer)
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.norm_eps) if cfg.qk_norm else None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | DocumentAttention | None,
                cache: KVCache | None) -> Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.use_rope:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        if isinstance(mask, DocumentAttention):  # packed rows through flex / flash (train.attention)
            y = mask(q, k, v)
        else:
            # mask None means plain causal attention over this sequence (the training fast path).
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None,
                enable_gqa=self.n_kv_heads != self.n_heads,
            )
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class SwiGLU(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoE(nn.Module):
    """Top-k routed experts plus optional shared experts (Qwen3-MoE routing)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.top_k = cfg.experts_per_token
        self.n_experts = cfg.n_experts
        self.gate = nn.Linear(cfg.hidden_size, cfg.n_experts, bias=False)  # the router
        self.experts = nn.ModuleList(SwiGLU(cfg.hidden_size, cfg.expert_size)
                                     for _ in range(cfg.n_experts))
        self.shared_experts = (
            SwiGLU(cfg.hidden_size, cfg.expert_size * cfg.n_shared_experts)
            if cfg.n_shared_experts else None
        )

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs = F.softmax(self.gate(x).float(), dim=-1)  # (N, E)
        weights, chosen = probs.topk(self.top_k, dim=-1)
        weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token_idx, slot = (chosen == e).nonzero(as_tuple=True)
            if token_idx.numel():
                out.index_add_(0, token_idx, expert(x[token_idx]) * weights[token_idx, slot, None])
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        # Switch load balancing: E * sum_e (fraction of routed slots to e) * (mean prob of e).
        routed = F.one_hot(chosen, self.n_experts).float().sum(1).mean(0) / self.top_k
        aux = self.n_experts * (routed * probs.mean(0)).sum()
        return out.reshape(shape), aux


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = MoE(cfg) if cfg.n_experts else SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | DocumentAttention | None,
                cache: KVCache | None) -> tuple[Tensor, Tensor | None]:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        h = self.mlp(self.post_attention_layernorm(x))
        if isinstance(h, tuple):
            h, aux = h
            return x + h, aux
        return x + h, None


class Backbone(nn.Module):
    """Everything below the LM head (HF's `model.` prefix)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)


@dataclass
class ModelOutput:
    logits: Tensor | None  # (B, T, vocab), in the compute dtype; None when `hidden` replaces it
    aux_loss: Tensor | None = None  # MoE load-balancing loss, already weighted; None when dense
    # Transformer.return_hidden (train.liger): the final-norm hidden states (B, T, hidden) and the
    # LM head weight, for a loss that fuses the head with cross-entropy instead of `logits`.
    hidden: Tensor | None = None
    head_weight: Tensor | None = None


def build_attention_mask(T: int, document_ids: Tensor | None, key_mask: Tensor | None,
                         past: int = 0) -> Tensor | None:
    """Boolean (B, 1, T, past+T) mask, True = may attend; None when plain causal suffices.

    - `document_ids` (B, T): tokens attend only within their own document (packed pretraining).
    - `key_mask` (B, past+T): False for padding slots (left-padded generation batches).
    """
    if document_ids is None and key_mask is None and past == 0:
        return None
    device = (document_ids if document_ids is not None else key_mask).device
    q_pos = torch.arange(past, past + T, device=device)
    k_pos = torch.arange(past + T, device=device)
    mask = (k_pos[None, :] <= q_pos[:, None])[None]  # (1, T, S) causal
    if document_ids is not None:
        mask = mask & (document_ids[:, :, None] == document_ids[:, None, :])
    if key_mask is not None:
        mask = mask & key_mask[:, None, :]
        # A fully padded query row (a pad token itself) would attend to nothing and give NaN;
        # let it see itself. Its output is never used.
        mask = mask | (k_pos[None, :] == q_pos[:, None])[None]
    return mask[:, None]


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("model.vocab_size must be set (normally from the tokenizer)")
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.apply(self._init_weights)
        # Set by the training loop (train.activation_checkpointing, train.attention, train.liger);
        # runtime switches, not properties of the architecture, hence not in ModelConfig.
        self.activation_checkpointing = False
        self.attention_backend = "sdpa"  # or "flex" / "flash": document-masked forwards only
        self.return_hidden = False  # training forwards return hidden states, not logits

    def _init_weights(self, module: nn.Module) -> None:
        # Playbook ch. 04: N(0, 0.02) everywhere, zero biases, norms at one.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def forward(self, input_ids: Tensor, position_ids: Tensor | None = None,
                document_ids: Tensor | None = None, key_mask: Tensor | None = None,
                cache: KVCache | None = None) -> ModelOutput:
        """Logits for `input_ids` (B, T).

        position_ids: (B, T); default 0..T-1 (offset by the cache length when decoding).
        document_ids: (B, T) per-token document index for intra-document masking.
        key_mask: (B, past+T) False at padding slots; with a cache, defaults to its own mask.
        """
        B, T = input_ids.shape
        if cache is not None and cache.slot is not None:
            if position_ids is None or T != 1:
                raise ValueError("static decoding takes one token per row and explicit position_ids")
            # Slots not written yet are False in the key mask, so it alone enforces causality.
            cache.key_mask.index_fill_(1, cache.slot, True)
            mask = cache.key_mask[:, None, None, :]
        else:
            past = cache.length if cache is not None else 0
            if position_ids is None:
                position_ids = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
            if cache is not None:
                if past + T > cache.max_len:
                    raise ValueError(f"KV cache full: {past} + {T} > {cache.max_len}")
                if key_mask is not None:
                    cache.key_mask[:, : past + T] = key_mask
                else:
                    cache.key_mask[:, past : past + T] = True
                key_mask = cache.key_mask[:, : past + T]
            if (self.attention_backend != "sdpa" and document_ids is not None and key_mask is None
                    and cache is None):
                # Built once per forward, shared by every layer (a BlockMask or cu_seqlens).
                mask = document_attention(self.attention_backend, document_ids)
            else:
                mask = build_attention_mask(T, document_ids, key_mask, past)
        cos, sin = rope_cos_sin(position_ids, self.config.resolved_head_dim, self.config.rope_theta)
        x = self.model.embed_tokens(input_ids)
        aux_total = None
        for block in self.model.layers:
            if self.activation_checkpointing and self.training and cache is None:
                # Chen et al. 2016: keep only each layer's input and recompute the layer in the
                # backward pass: activation memory ~1/L of the full amount for ~1/3 more compute.
                x, aux = torch.utils.checkpoint.checkpoint(block, x, cos, sin, mask, None, use_reentrant=False)
            else:
                x, aux = block(x, cos, sin, mask, cache)
            if aux is not None:
                aux_total = aux if aux_total is None else aux_total + aux
        if cache is not None and cache.slot is None:
            cache.length += T
        if aux_total is not None:
            aux_total = aux_total * self.config.router_aux_loss_coef / self.config.n_layers
        hidden = self.model.norm(x)
        if self.return_hidden and self.training and cache is None:
            # The LM head's input as autocast would cast it; the loss applies the head itself.
            if torch.is_autocast_enabled(hidden.device.type):
                hidden = hidden.to(torch.get_autocast_dtype(hidden.device.type))
            return ModelOutput(logits=None, aux_loss=aux_total, hidden=hidden, head_weight=self.lm_head.weight)
        return ModelOutput(logits=self.lm_head(hidden), aux_loss=aux_total)

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        p = self.lm_head.weight
        return KVCache(self.config, batch_size, max_len, p.device, p.dtype)


# --- accounting ---------------------------------------------------------------------------------


def count_parameters(cfg: ModelConfig) -> dict[str, int]:
    """Total, embedding and active-per-token parameter counts, computed from the shapes."""
    h, d, L = cfg.hidden_size, cfg.resolved_head_dim, cfg.n_layers
    attn = h * d * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)
    if cfg.attention_bias:
        attn += d * (cfg.n_heads + 2 * cfg.n_kv_heads)
    if cfg.qk_norm:
        attn += 2 * d
    norms = 2 * h
    if cfg.n_experts:
        expert = 3 * h * cfg.expert_size
        mlp_total = cfg.n_experts * expert + cfg.n_shared_experts * expert + h * cfg.n_experts
        mlp_active = cfg.experts_per_token * expert + cfg.n_shared_experts * expert + h * cfg.n_experts
    else:
        mlp_total = mlp_active = 3 * h * cfg.intermediate_size
    embedding = cfg.vocab_size * h
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * h
    total = embedding + head + L * (attn + norms + mlp_total) + h
    active = embedding + head + L * (attn + norms + mlp_active) + h
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding - head,
            "active": active}


def training_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward + backward FLOPs per token: 6 x (active matmul params) + attention scores.

    Matmul parameters exclude the input embedding (a lookup) and the norms but include the
    LM head. The attention term 12 * L * n_heads * head_dim * T follows the PaLM paper
    (appendix B) and counts the full T x T score matrix, as MFU conventions do.
    """
    counts = count_parameters(cfg)
    norm_params = cfg.n_layers * (2 * cfg.hidden_size + (2 * cfg.resolved_head_dim if cfg.qk_norm else 0))
    matmul_params = counts["active"] - counts["embedding"] - norm_params - cfg.hidden_size
    if cfg.tie_embeddings:
        matmul_params += cfg.vocab_size * cfg.hidden_size
    attention = 12 * cfg.n_layers * cfg.n_heads * cfg.resolved_head_dim * seq_len
    return 6.0 * matmul_params + attention


def format_count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(int(n))
