"""AdamW with the playbook's parameter groups (ch. 04 and 06).

Weight decay applies to matrices only: embeddings (SmolLM3's `no weight decay on
.*token_embedding.*`, a loss-spike guard), norms and biases are excluded. Tied LM-head
weights are the embedding tensor, so they land in the no-decay group once.
"""

from __future__ import annotations

import torch
from torch import nn

from smolforge.config import TrainConfig


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay, seen = [], [], set()
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


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    # The fused CUDA kernel does the whole update in one launch; CPU uses the foreach path.
    return torch.optim.AdamW(
        parameter_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps, fused=device.type == "cuda",
    )
