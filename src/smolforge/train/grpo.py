"""GRPO (Shao et al. 2024, "DeepSeekMath", arXiv:2402.03300): the losses, as small pure functions.

GRPO drops PPO's value model: for each prompt it samples a group of G completions and uses each
completion's reward, normalised within its group, as the advantage of every one of its tokens
(outcome supervision, sec. 4.1.2). The policy is then moved with PPO's clipped ratio objective,
optionally anchored to a reference model by a KL penalty. Later work changed three details, each
a switch here:
- clip-higher (DAPO, Yu et al. 2025, arXiv:2503.14476, sec. 3.1): a wider upper clip range
  (`epsilon_high` 0.28 vs 0.2) keeps low-probability tokens able to grow (against entropy collapse);
- the loss normalisation (`loss_type`): GRPO's per-sequence token mean gives each token of a
  long completion less weight; DAPO takes one token-level mean over the batch (sec. 3.3); Dr. GRPO
  (Liu et al. 2025, "Understanding R1-Zero-Like Training", arXiv:2503.20783) sums tokens and divides
  by a constant, and drops the division by the group's reward std (both are biases, sec. 3.1);
- the KL term: DAPO and Dr. GRPO drop it (beta = 0, no reference model needed).

The rollouts (sampling with the one engine, rewards, old and reference log-probs) are made by
`smolforge.data.rl.RolloutLoader`; this module only computes.

Batch contract of the objective "grpo"
--------------------------------------
- `input_ids`, `labels` (B, T): prompt + completion rows; `labels` SHIFTED (`labels[t]` is the
  target of `logits[t]`) and -100 everywhere but the completion tokens (as for SFT); a truncated
  completion masked by `mask_truncated` is all -100.
- `advantages` (B,): the group-normalised reward of each row's completion.
- `old_logps` (B, T), optional: per-token log-probs of the labels under the policy that sampled
  them (0 where -100). Absent = the batch is on-policy (one optimizer step per rollout), so the
  old policy is the current one: ratio 1, and the gradient is the plain policy gradient.
- `ref_logps` (B, T): the same under the reference model; needed when `beta` > 0.
- `temperature` (scalar, optional): the sampling temperature; log-probs are taken from
  logits / temperature, the distribution the tokens were drawn from (as TRL and veRL do).
- `max_completion_tokens` (scalar): the constant of the `dr_grpo` normalisation.
"""

from __future__ import annotations

import torch
from torch import Tensor

from smolforge.config import TrainConfig
from smolforge.errors import SmolforgeError
from smolforge.model import ModelOutput
from smolforge.train.objectives import IGNORE_INDEX, register
from smolforge.train.ppo import (
    label_logprobs as token_log_probs,  # GRPO's name for it (old / reference log-probs)
)
from smolforge.train.ppo import logits_entropy, masked_mean  # one of each for PPO and GRPO

LOSS_TYPES = ("grpo", "dr_grpo", "dapo")


def group_advantages(rewards: Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> Tensor:
    """Each reward minus its group's mean, divided by the group's std when `scale`.

    Shao et al. 2024, sec. 4.1.2: Â_i = (r_i − mean(r)) / std(r) over the G completions of one
    prompt. The std is the sample (Bessel-corrected) one and `eps` keeps a group of equal rewards
    at 0, both as in TRL's GRPOTrainer. `scale=False` is Dr. GRPO's unbiased version (Liu et al.
    2025, sec. 3.1): dividing by the std up-weights prompts that are nearly always or never solved.
    `rewards` (N,) holds whole groups in order: rows [kG, (k+1)G) belong to prompt k.
    """
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be (N,) with N a multiple of group_size {group_size}, got {tuple(rewards.shape)}")
    groups = rewards.float().view(-1, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale:
        centred = centred / (groups.std(dim=1, keepdim=True) + eps)
    return centred.flatten()


def clipped_surrogate(logps: Tensor, old_logps: Tensor, advantages: Tensor, epsilon_low: float,
                      epsilon_high: float) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token −min(ρ·A, clip(ρ, 1 − ε_low, 1 + ε_high)·A), ρ = π_θ / π_old, and where it clipped.

    PPO's clipped objective (Schulman et al. 2017, eq. 7) on token log-probs as in GRPO's eq. 3,
    with DAPO's decoupled ranges (clip-higher). `logps`, `old_logps` (B, T); `advantages` (B,),
    the same for every token of a row. Returns (loss, clipped_low, clipped_high): the boolean
    masks mark tokens whose gradient the clip removed (ratio below 1 − ε_low with A < 0, or above
    1 + ε_high with A > 0).
    """
    ratio = torch.exp(logps - old_logps)
    adv = advantages[:, None].to(ratio.dtype)
    unclipped = ratio * adv
    clipped = ratio.clamp(1 - epsilon_low, 1 + epsilon_high) * adv
    loss = -torch.minimum(unclipped, clipped)
    return loss, (ratio < 1 - epsilon_low) & (adv < 0), (ratio > 1 + epsilon_high) & (adv > 0)


def k3_kl(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """Per-token KL(π_θ ‖ π_ref) estimate π_ref/π_θ − log(π_ref/π_θ) − 1 (≥ 0).

    Schulman 2020, "Approximating KL Divergence" (k3): unbiased on tokens sampled from π_θ and
    never negative; GRPO's eq. 4 uses it as the KL penalty added to the loss.
    """
    log_ratio = ref_logps - logps
    return torch.exp(log_ratio) - log_ratio - 1


def normalise_loss(per_token: Tensor, mask: Tensor, loss_type: str, max_completion_tokens: int | Tensor = 1) -> Tensor:
    """One loss from per-token losses (B, T) and the completion mask (B, T), by `loss_type`:

    - "grpo": the mean over each completion's tokens, then over completions (Shao et al. 2024, eq. 3);
    - "dr_grpo": the sum over all tokens / (B · max_completion_tokens) (Liu et al. 2025, eq. 7;
      their code and TRL divide by the generation budget, a constant, so no length bias remains);
    - "dapo": the mean over every completion token of the batch (Yu et al. 2025, eq. 12).
    The training loop weights micro-batches so that a step equals the loss over the whole step:
    by completions for grpo and dr_grpo (`step_weight`), by tokens for dapo.
    """
    mask = mask.bool()
    masked = torch.where(mask, per_token, 0.0)  # not a product: an inf off the completion stays out
    if loss_type == "grpo":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    if loss_type == "dr_grpo":
        return masked.sum() / (per_token.shape[0] * max_completion_tokens)
    if loss_type == "dapo":
        return masked.sum() / mask.sum().clamp(min=1)
    raise SmolforgeError(f"train.loss_type: unknown {loss_type!r}; choose one of {', '.join(LOSS_TYPES)}")


@register("grpo")
def grpo_objective(output: ModelOutput, batch: dict[str, Tensor], cfg: TrainConfig) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO's loss on a rollout micro-batch (see the batch contract above), with its metrics:
    `clip_fraction` (and `/low`, `/high`), `entropy` of the policy on completion tokens, and `kl`
    to the reference when the batch has reference log-probs."""
    labels = batch["labels"]
    mask = labels != IGNORE_INDEX
    loss_type = getattr(cfg, "loss_type", "dapo")
    epsilon = getattr(cfg, "epsilon", 0.2)
    epsilon_high = getattr(cfg, "epsilon_high", None) or epsilon
    beta = getattr(cfg, "beta", 0.0) if hasattr(cfg, "loss_type") else 0.0  # TrainConfig.beta is DPO's
    advantages = batch.get("advantages")
    if advantages is None or advantages.shape != labels.shape[:1]:
        got = "nothing" if advantages is None else f"shape {tuple(advantages.shape)}"
        raise SmolforgeError(f"train.objective 'grpo' needs batch 'advantages', one per row ({labels.shape[0]},); "
                             f"got {got}: GRPO batches come from smolforge.data.rl.RolloutLoader")
    temperature = batch.get("temperature", 1.0)
    logps = token_log_probs(output.logits, labels, temperature)
    old = batch.get("old_logps")
    old = logps.detach() if old is None else old.float()
    per_token, low, high = clipped_surrogate(logps, old, advantages, epsilon, epsilon_high)
    metrics: dict[str, Tensor] = {}
    ref = batch.get("ref_logps")
    if beta > 0 and ref is None:
        raise SmolforgeError("train.beta > 0 needs the reference model's log-probs in the batch ('ref_logps'); "
                             "the rollout loader adds them when a reference is configured")
    if ref is not None:
        kl = k3_kl(logps, ref.float())
        if beta > 0:
            per_token = per_token + beta * kl
        metrics["kl"] = masked_mean(kl.detach(), mask)
    max_tokens = batch.get("max_completion_tokens")
    if loss_type == "dr_grpo" and max_tokens is None:
        raise SmolforgeError("train.loss_type 'dr_grpo' needs batch 'max_completion_tokens' (the generation budget)")
    loss = normalise_loss(per_token, mask, loss_type, max_tokens if max_tokens is not None else 1)
    with torch.no_grad():
        entropy = logits_entropy(output.logits.detach(), temperature)
        metrics.update({"clip_fraction": masked_mean((low | high).float(), mask),
                        "clip_fraction/low": masked_mean(low.float(), mask),
                        "clip_fraction/high": masked_mean(high.float(), mask),
                        "entropy": masked_mean(entropy, mask)})
    if output.aux_loss is not None:  # MoE load balancing applies whatever the objective
        loss = loss + output.aux_loss
        metrics["aux_loss"] = output.aux_loss.detach()
    return loss, metrics
