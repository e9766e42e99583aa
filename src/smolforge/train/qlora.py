"""QLoRA's frozen base: Linear layers stored in 4-bit NormalFloat by bitsandbytes (CUDA only).

QLoRA (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs", arXiv:2305.14314)
trains LoRA adapters over a base whose weights are kept in 4 bits:
- NF4 (§3, "4-bit NormalFloat"): 16 levels at the quantiles of a normal distribution, scaled by
  the absolute maximum of each block of 64 weights — information-theoretically optimal for the
  normally distributed weights of a pretrained network;
- double quantisation (§3): the per-block fp32 scales are quantised again to 8 bits (blocks of
  256), saving about 0.37 bits per parameter;
- bf16 compute: each forward dequantises a layer's weight to bf16 and multiplies in bf16; the
  adapters, the only trained weights, stay fp32 (`smolforge.train.lora.LoraLinear`).

This module holds the bitsandbytes-specific pieces (`to_nf4`, `is_quantized`, `dense_weight`,
`dense_linear`); `smolforge.train.lora` applies them to a whole model (`quantize_base`,
`merged_copy`). bitsandbytes is imported lazily, so the core install needs none of it (extra
`qlora`).

Why CUDA only: QLoRA saves accelerator memory, which a CPU run does not lack, and bitsandbytes'
CPU 4-bit path gives wrong weights (checked with 0.50.2): its native CPU `dequantize_4bit` differs
from its own reference implementation when a 64-weight block spans two rows (in_features not a
multiple of 64), and in eval mode `Linear4bit` repacks its weight in place into a CPU layout that
`dequantize_4bit` then misreads — merging would write garbage.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import Tensor, nn

from smolforge.errors import SmolforgeError

NF4_BLOCKSIZE = 64  # weights per absmax scale: QLoRA's and bitsandbytes' default
COMPUTE_DTYPE = torch.bfloat16  # QLoRA's compute dtype (bnb_4bit_compute_dtype)


def require_cuda(device: torch.device, field: str = "lora.quantize") -> None:
    """A SmolforgeError unless `device` is CUDA: the 4-bit base exists only there (see module doc)."""
    if device.type != "cuda":
        raise SmolforgeError(
            f"{field}: nf4 (QLoRA) needs a CUDA device: bitsandbytes' 4-bit kernels are built for GPUs, "
            f"and this run's device is {device}. Use {field}: none on CPU (LoRA over the full-precision "
            f"base), or run on a GPU (train.device: cuda)")


def bitsandbytes() -> ModuleType:
    """The bitsandbytes module, or a SmolforgeError naming the extra that installs it."""
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        raise SmolforgeError(f"lora.quantize: nf4 needs bitsandbytes ({exc}): pip install 'smolforge[qlora]'") from None
    return bnb


@torch.no_grad()
def to_nf4(linear: nn.Linear, device: torch.device) -> nn.Linear:
    """A frozen bitsandbytes `Linear4bit` on `device` holding `linear`'s weight in NF4 with double
    quantisation and bf16 compute (QLoRA's setting); `linear` may live on the CPU, so the
    full-precision weight never has to reach the GPU whole.

    The weight is rounded to bf16 before quantising, as transformers does when a model is loaded
    with `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
    bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)` and `dtype=bfloat16`:
    dequantising then gives bf16, the dtype the layer computes in.
    """
    bnb = bitsandbytes()
    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=COMPUTE_DTYPE, compress_statistics=True, quant_type="nf4",
                              device="meta")
    # Params4bit quantises when moved to a CUDA device (bitsandbytes' documented loading path).
    layer.weight = bnb.nn.Params4bit(linear.weight.detach().to(COMPUTE_DTYPE), requires_grad=False,
                                     blocksize=NF4_BLOCKSIZE, compress_statistics=True, quant_type="nf4",
                                     module=layer).to(device)
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach().to(device), requires_grad=False)
    return layer.requires_grad_(False)


def is_quantized(module: nn.Module) -> bool:
    """True for a Linear whose weight bitsandbytes quantised (it carries a `quant_state`)."""
    return isinstance(module, nn.Linear) and getattr(module.weight, "quant_state", None) is not None


@torch.no_grad()
def dense_weight(linear: nn.Linear) -> Tensor:
    """The weight as an fp32 matrix: dequantised (`bnb.functional.dequantize_4bit`) for a 4-bit one.

    This is the NF4-rounded weight the layer computed with, not the full-precision weight it was
    quantised from: that one is gone (QLoRA keeps no full-precision copy).
    """
    if not is_quantized(linear):
        return linear.weight.detach().float()
    functional = bitsandbytes().functional
    return functional.dequantize_4bit(linear.weight.data, linear.weight.quant_state).float()


@torch.no_grad()
def dense_linear(linear: nn.Linear, delta: Tensor | None = None,
                 device: torch.device | str | None = None) -> nn.Linear:
    """A plain fp32 nn.Linear with `dense_weight(linear) + delta` (a LoRA update, or none), on
    `device` (default: the weight's). Merging into a 4-bit base goes this way: there is no 4-bit
    weight to add an update to in place."""
    weight = dense_weight(linear)
    if delta is not None:
        weight = weight + delta.to(weight.device, torch.float32)
    device = torch.device(device) if device is not None else weight.device
    out = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None, device=device,
                    dtype=torch.float32)
    out.weight.copy_(weight)
    if linear.bias is not None:
        out.bias.copy_(linear.bias.detach().float())
    return out.requires_grad_(False)

