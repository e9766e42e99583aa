"""The optimizer: AdamW with the playbook's parameter groups (ch. 04 and 06), or Muon for the
hidden matrices with AdamW for the rest (`train.optimizer`).

Weight decay applies to matrices only: embeddings (SmolLM3's `no weight decay on
.*token_embedding.*`, a loss-spike guard), norms and biases are excluded. Tied LM-head
weights are the embedding tensor, so they land in the no-decay group once.

Muon (Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural networks")
orthogonalises the momentum of each 2-D weight with a Newton-Schulz iteration. It is meant for
the hidden layers' matrices only: the embedding, the LM head (tied or not), a reward model's
score head, MoE routers, norms and biases keep AdamW, as in Jordan's and Moonshot's setups.
LoRA adapters keep AdamW too: Muon on low-rank adapter factors is not an established recipe.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from smolforge.config import TrainConfig
from smolforge.errors import SmolforgeError
from smolforge.model import Block, MoE
from smolforge.train.lora import LoraLinear


def parameter_groups(model: nn.Module, weight_decay: float,
                     exclude: set[int] | frozenset[int] = frozenset()) -> list[dict]:
    """AdamW's two groups (decay, no decay) over the trainable parameters of `model`, each
    tensor once, less those whose id is in `exclude` (Muon's)."""
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay, seen = [], [], set(exclude)
    for param in model.parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        if param.ndim < 2 or id(param) in embedding_ids:
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def muon_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable weights Muon takes: those of the `nn.Linear` layers inside the decoder
    blocks, less MoE routers and LoRA adapters. Everything outside the blocks (embedding, LM
    head, final norm, a reward model's `score`) and every 1-D tensor is left to AdamW."""
    excluded = set()
    for module in model.modules():
        if isinstance(module, MoE):
            excluded.add(id(module.gate.weight))  # the router: a tiny (experts x hidden) classifier
        elif isinstance(module, LoraLinear):
            excluded.update((id(module.lora_A.weight), id(module.lora_B.weight)))
    chosen, seen = [], set()
    for block in (m for m in model.modules() if isinstance(m, Block)):
        for linear in (m for m in block.modules() if isinstance(m, nn.Linear)):
            weight = linear.weight
            if weight.requires_grad and weight.ndim == 2 and id(weight) not in excluded | seen:
                seen.add(id(weight))
                chosen.append(weight)
    return chosen


class MuonWithAdamW:
    """Muon over some matrices and AdamW over the other parameters, as one optimizer for the
    training loop: `param_groups` is both optimizers' groups (so the loop's per-step
    `group["lr"] = lr` reaches all of them), `step`, `zero_grad`, and a `state_dict` holding both
    states, which `load_state_dict` restores exactly (checkpoint resume, rollback).

    `muon` is None when no parameter qualifies (a LoRA run: only adapters train)."""

    def __init__(self, muon: torch.optim.Muon | None, adamw: torch.optim.AdamW) -> None:
        self.muon, self.adamw = muon, adamw

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [o for o in (self.muon, self.adamw) if o is not None]

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]

    @torch.no_grad()
    def step(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"muon": None if self.muon is None else self.muon.state_dict(),
                "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != {"muon", "adamw"}:
            raise SmolforgeError("the checkpoint's optimizer state is not Muon + AdamW: it was saved with "
                                 "another train.optimizer; resume with the one the run started with")
        if (state["muon"] is None) != (self.muon is None):
            raise SmolforgeError("the checkpoint's Muon state does not match this model's parameters")
        if self.muon is not None:
            self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device
                    ) -> torch.optim.Optimizer | MuonWithAdamW:
    """`cfg.optimizer`: AdamW over all trainable parameters, or Muon + AdamW (`MuonWithAdamW`)."""
    # The fused CUDA kernel does the whole update in one launch; CPU uses the foreach path.
    fused = device.type == "cuda"
    adam = {"lr": cfg.lr, "betas": (cfg.beta1, cfg.beta2), "eps": cfg.eps, "fused": fused}
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(parameter_groups(model, cfg.weight_decay), **adam)
    # FSDP2 + Muon is refused by TrainConfig: the Newton-Schulz iteration needs whole matrices.
    matrices = muon_parameters(model)
    if not matrices:
        warnings.warn("train.optimizer: muon found no hidden-layer matrix to train (LoRA trains only "
                      "adapters, which stay on AdamW): every parameter uses AdamW", stacklevel=2)
    adamw = torch.optim.AdamW(parameter_groups(model, cfg.weight_decay, {id(p) for p in matrices}), **adam)
    # adjust_lr_fn="match_rms_adamw" (Liu et al. 2025, "Muon is Scalable for LLM Training") scales
    # each matrix's step by 0.2 sqrt(max(rows, cols)), giving Muon's update the RMS of a typical
    # AdamW update: the one train.lr (and weight decay) that the schedule sets on every group
    # serves both optimizers, instead of Jordan's ~0.02 for Muon next to ~3e-4 for AdamW.
    muon = torch.optim.Muon(matrices, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.muon_momentum,
                            nesterov=True, adjust_lr_fn="match_rms_adamw") if matrices else None
    return MuonWithAdamW(muon, adamw)
