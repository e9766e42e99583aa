"""Optional CUDA fast paths for training: document-masked attention kernels and Liger's fused loss.

Packed pretraining and SFT rows hold several documents; each token may attend only to earlier
tokens of its own document (Smol Training Playbook ch. 04, intra-document masking). The
reference path in `smolforge.model` hands `scaled_dot_product_attention` a dense boolean
(B, 1, T, T) mask, which rules out SDPA's flash kernel and falls back to the memory-efficient or
math kernel. Two kernels skip the masked-out blocks instead (`train.attention`):

- `flex`: PyTorch's FlexAttention (`torch.nn.attention.flex_attention`, Dong et al. 2024) with
  a `BlockMask` built once per forward from `document_ids` (causal AND same document). Only the
  compiled kernel is fast: eager `flex_attention` is a reference implementation that
  materialises the full score matrix, so on CUDA the call goes through `torch.compile`.
- `flash`: FlashAttention-2's variable-length kernel (`flash_attn_varlen_func`, Dao 2023): the
  batch is flattened to one stream of tokens and every document becomes one sequence, cut at
  `cu_seqlens` (`varlen_cu_seqlens`).

Both are used only for a full-sequence forward with document masking, no KV cache and no key
padding mask; every other call stays on SDPA. The model picks them from a `DocumentAttention`
it builds once per forward and hands to every layer.

`train.liger` makes the `lm` / `sft` loss Liger-Kernel's fused linear cross-entropy (Hsu et al.
2024): it multiplies the final hidden states by the LM head in chunks and never materialises the
(B, T, vocab) logits, which at a 49k-128k vocabulary are the largest activation of a small model.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from smolforge.errors import SmolforgeError

ATTENTION_BACKENDS = ("auto", "sdpa", "flex", "flash")


def flex_available() -> bool:
    """Whether this torch has FlexAttention (torch >= 2.5)."""
    return importlib.util.find_spec("torch.nn.attention.flex_attention") is not None


def flash_available() -> bool:
    """Whether the optional flash-attn package is installed (`pip install 'smolforge[flash]'`)."""
    return importlib.util.find_spec("flash_attn") is not None


def liger_available() -> bool:
    """Whether the optional liger-kernel package is installed (`pip install 'smolforge[liger]'`)."""
    return importlib.util.find_spec("liger_kernel") is not None


def resolve_attention(name: str, device: torch.device, document_masking: bool, half_precision: bool) -> str:
    """The attention backend a training run uses: `sdpa`, `flex` or `flash`.

    `auto` takes FlexAttention on CUDA when packed rows are document-masked (where it skips the
    masked-out blocks; plain causal batches already get SDPA's flash kernel), SDPA otherwise.
    An explicit `flex` or `flash` that cannot run is an error, not a silent fallback.
    """
    if name not in ATTENTION_BACKENDS:
        raise SmolforgeError(f"train.attention: unknown backend {name!r}; choose one of {ATTENTION_BACKENDS}")
    if name == "auto":
        return "flex" if device.type == "cuda" and document_masking and flex_available() else "sdpa"
    if name == "sdpa":
        return name
    if device.type != "cuda":
        why = ("FlexAttention has no backward pass on the CPU" if name == "flex"
               else "flash-attn's kernels are CUDA only")
        raise SmolforgeError(f"train.attention: {name} needs a CUDA device ({why}) but the run is on {device}: "
                             f"use train.attention: sdpa (or auto)")
    if name == "flex" and not flex_available():
        raise SmolforgeError(f"train.attention: flex needs torch >= 2.5 with FlexAttention (this is torch "
                             f"{torch.__version__}): upgrade torch or use train.attention: sdpa")
    if name == "flash":
        if not flash_available():
            raise SmolforgeError("train.attention: flash needs the flash-attn package, which is not installed: "
                                 "pip install 'smolforge[flash]' (it compiles against your torch and CUDA), "
                                 "or use train.attention: flex")
        if not half_precision:
            raise SmolforgeError("train.attention: flash computes in bf16/fp16 only, but train.precision is fp32: "
                                 "set train.precision: bf16 (or auto), or use train.attention: flex")
    return name


# --- FlexAttention --------------------------------------------------------------------------------


@functools.cache
def _compiled_flex() -> Any:
    from torch.nn.attention.flex_attention import flex_attention

    # dynamic=False: one kernel per (batch, length) shape, which training keeps fixed; dynamic
    # shapes give slower flex kernels (attention-gym's advice).
    return torch.compile(flex_attention, dynamic=False)


@functools.cache
def _compiled_create_block_mask() -> Any:
    from torch.nn.attention.flex_attention import create_block_mask

    # Compiled, the mask is computed block by block; eager, it first materialises the dense
    # (B, 1, T, T) boolean mask that this path exists to avoid.
    return torch.compile(create_block_mask)


def document_block_mask(document_ids: Tensor) -> Any:
    """FlexAttention `BlockMask` (B, 1, T, T): query q sees key k iff k <= q and both share a document."""
    from torch.nn.attention.flex_attention import create_block_mask

    B, T = document_ids.shape

    def causal_same_document(b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        return (k <= q) & (document_ids[b, q] == document_ids[b, k])

    compiled = document_ids.is_cuda and not torch.compiler.is_compiling()
    build = _compiled_create_block_mask() if compiled else create_block_mask
    return build(causal_same_document, B, None, T, T, device=document_ids.device)


# --- FlashAttention varlen ------------------------------------------------------------------------


def varlen_cu_seqlens(document_ids: Tensor) -> tuple[Tensor, int]:
    """Cumulative sequence starts (int32, n_sequences + 1) and the longest sequence, for a batch
    flattened row after row, in which every run of equal `document_ids` within a row is one sequence.

    Documents are contiguous runs in each row (the packers number them 0, 1, 2, ... left to
    right); a row boundary always starts a new sequence, even when the ids on both sides agree.
    """
    B, T = document_ids.shape
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    offsets = starts.flatten().nonzero().flatten()
    cu_seqlens = torch.cat([offsets, offsets.new_tensor([B * T])]).to(torch.int32)
    return cu_seqlens, int((cu_seqlens[1:] - cu_seqlens[:-1]).max())


def flash_varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int) -> Tensor:
    """Causal attention within each sequence of `cu_seqlens`; (B, H, T, D) in and out.

    flash-attn takes (total_tokens, heads, D) and fewer key/value heads than query heads (GQA) as
    they are, so no key/value repetition is needed."""
    from flash_attn import flash_attn_varlen_func

    B, H, T, D = q.shape

    def flat(x: Tensor) -> Tensor:
        return x.transpose(1, 2).reshape(B * T, x.shape[1], D)

    out = flash_attn_varlen_func(flat(q), flat(k), flat(v), cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                 dropout_p=0.0, causal=True)
    return out.view(B, T, H, D).transpose(1, 2)


# --- what the model hands its layers ------------------------------------------------------------


@dataclass
class DocumentAttention:
    """Intra-document causal attention through a fused kernel, prepared once per forward."""

    backend: str  # "flex" or "flash"
    block_mask: Any = None  # flex: torch.nn.attention.flex_attention.BlockMask
    cu_seqlens: Tensor | None = None  # flash
    max_seqlen: int = 0  # flash

    def __call__(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if self.backend == "flash":
            return flash_varlen_attention(q, k, v, self.cu_seqlens, self.max_seqlen)
        from torch.nn.attention.flex_attention import flex_attention

        gqa = k.shape[1] != q.shape[1]
        # Inside train.compile's graph the plain function is fused with the rest; on the CPU the
        # eager reference runs (forward only in torch 2.13: training refuses flex off CUDA).
        if q.is_cuda and not torch.compiler.is_compiling():
            return _compiled_flex()(q, k, v, block_mask=self.block_mask, enable_gqa=gqa)
        return flex_attention(q, k, v, block_mask=self.block_mask, enable_gqa=gqa)


def document_attention(backend: str, document_ids: Tensor) -> DocumentAttention:
    """The prepared kernel input for `backend` ("flex" or "flash") and this batch's documents."""
    if backend == "flex":
        return DocumentAttention("flex", block_mask=document_block_mask(document_ids))
    if backend == "flash":
        cu_seqlens, max_seqlen = varlen_cu_seqlens(document_ids)
        return DocumentAttention("flash", cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
    raise ValueError(f"no document-attention kernel {backend!r}")


# --- Liger fused linear cross-entropy -------------------------------------------------------------


def check_liger(device: torch.device) -> None:
    """Refuse train.liger where it cannot run, before any work."""
    if device.type != "cuda":
        raise SmolforgeError(f"train.liger needs a CUDA device (Liger's kernels are Triton GPU kernels) but the "
                             f"run is on {device}: set train.liger: false")
    if not liger_available():
        raise SmolforgeError("train.liger needs the liger-kernel package, which is not installed: "
                             "pip install 'smolforge[liger]', or set train.liger: false")


def fused_linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor,
                               z_loss_weight: float = 0.0) -> tuple[Tensor, Tensor, Tensor | None]:
    """(loss, mean cross-entropy, mean log^2 Z or None) of `hidden @ weight.T` against `labels`
    (-100 ignored), averaged over the labelled tokens, without materialising the logits.

    `loss` = cross-entropy + z_loss_weight x log^2 Z, as `smolforge.train.objectives.lm`. When
    `hidden` comes in a lower precision than the fp32 master `weight` (bf16 autocast), the head
    matmul runs under the same autocast, like `lm_head` in the plain path; Liger accumulates the
    weight gradient in fp32 then.
    """
    from liger_kernel.transformers.fused_linear_cross_entropy import (
        LigerFusedLinearCrossEntropyLoss,
    )

    want_z = z_loss_weight > 0
    loss_fn = LigerFusedLinearCrossEntropyLoss(ignore_index=-100, lse_square_scale=z_loss_weight,
                                               reduction="mean", **({"return_z_loss": True} if want_z else {}))
    x, y = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    mixed = hidden.dtype != weight.dtype
    with torch.autocast(hidden.device.type, dtype=hidden.dtype) if mixed else contextlib.nullcontext():
        out = loss_fn(weight, x, y)
    if not want_z:
        return out, out.detach(), None
    # liger-kernel < 0.6 returns (loss, z_loss); later versions a CrossEntropyOutput.
    loss, z = (out[0], out[1]) if isinstance(out, tuple) else (out.loss, out.z_loss)
    z = z.detach().float()  # = z_loss_weight x mean log^2 Z, already inside `loss`
    return loss, (loss.detach() - z), z / z_loss_weight
