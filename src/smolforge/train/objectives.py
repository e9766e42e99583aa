"""Training objectives: small pure functions in a name -> function registry.

Each objective takes the model output, the batch and the train config, and returns
`(loss, metrics)` where metrics are detached scalar tensors (no host sync in the hot loop).
The training loop looks the objective up by name and never branches on the stage.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from smolforge.config import TrainConfig
from smolforge.errors import SmolforgeError
from smolforge.model import ModelOutput

Objective = Callable[[ModelOutput, dict[str, Tensor], TrainConfig], tuple[Tensor, dict[str, Tensor]]]
OBJECTIVES: dict[str, Objective] = {}

IGNORE_INDEX = -100


def register(name: str) -> Callable[[Objective], Objective]:
    def wrap(fn: Objective) -> Objective:
        OBJECTIVES[name] = fn
        return fn
    return wrap


def token_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Per-token negative log-likelihood in fp32, 0 where labels == -100; shape of labels."""
    nll = F.cross_entropy(logits.float().flatten(0, -2), labels.flatten(),
                          ignore_index=IGNORE_INDEX, reduction="none")
    return nll.view_as(labels)


def z_loss(logits: Tensor, mask: Tensor) -> Tensor:
    """PaLM's auxiliary loss log^2 Z, which keeps the softmax normaliser near 1."""
    log_z = torch.logsumexp(logits.float(), dim=-1)
    return (log_z.pow(2) * mask).sum() / mask.sum().clamp(min=1)


@register("sft")  # the same loss: the data decides what is trained (labels -100 elsewhere)
@register("lm")
def lm(output: ModelOutput, batch: dict[str, Tensor], cfg: TrainConfig) -> tuple[Tensor, dict[str, Tensor]]:
    """Next-token cross-entropy averaged over the labelled tokens (+ z-loss, + MoE aux loss)."""
    labels = batch["labels"]
    if output.logits is None:  # train.liger: the model returned hidden states; fuse head and loss
        from smolforge.kernels import fused_linear_cross_entropy

        loss, ce, zl = fused_linear_cross_entropy(output.hidden, output.head_weight, labels, cfg.z_loss)
        metrics = {"ce": ce}
        if zl is not None:
            metrics["z_loss"] = zl
    else:
        mask = (labels != IGNORE_INDEX).float()
        ce = token_cross_entropy(output.logits, labels).sum() / mask.sum().clamp(min=1)
        loss = ce
        metrics = {"ce": ce.detach()}
        if cfg.z_loss > 0:
            zl = z_loss(output.logits, mask)
            loss = loss + cfg.z_loss * zl
            metrics["z_loss"] = zl.detach()
    if output.aux_loss is not None:
        loss = loss + output.aux_loss
        metrics["aux_loss"] = output.aux_loss.detach()
    return loss, metrics


def get_objective(name: str) -> Objective:
    from smolforge.train import grpo, preference, reward  # noqa: F401 (register their objectives)

    if name not in OBJECTIVES:
        raise SmolforgeError(f"train.objective: unknown objective {name!r}; available: {sorted(OBJECTIVES)}")
    return OBJECTIVES[name]
