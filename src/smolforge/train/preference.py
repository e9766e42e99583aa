"""Preference-optimisation losses (playbook ch. 07: APO-zero won, beta 0.1) and their objectives.

Every loss is a small pure function of per-sequence log-probabilities, shape (B,), returning
per-example losses (B,); the registered objectives turn a model output and a batch into those
log-probs, average the losses and log TRL's metric names (`rewards/chosen`, `rewards/rejected`,
`rewards/accuracies`, `rewards/margins`, `logps/chosen`, `logps/rejected`), so curves can be
compared with runs of `trl`. The formulas follow TRL 1.16 (`DPOTrainer._compute_loss`,
`KTOTrainer._compute_loss`, `experimental.cpo.CPOTrainer.cpo_loss`,
`experimental.orpo.ORPOTrainer.odds_ratio_loss`); tests/test_preference_losses.py checks each
against those implementations.

Batch contract
--------------
Paired objectives ("dpo", "robust", "ipo", "hinge", "apo_zero", "apo_down", "simpo", "orpo"):
- `input_ids`, `labels` (2B, T): rows [0, B) are the chosen responses, rows [B, 2B) the rejected
  ones, in the same pair order; each row is prompt + response, and `labels` are SHIFTED
  (`labels[t]` is the target of `logits[t]`) and -100 everywhere outside the response
  (prompt, padding), as for SFT.
- `ref_logps` (2B,): the reference model's summed response log-probs, same row order
  (see `reference_logps`). Needed by every paired loss except "simpo" and "orpo".
Unpaired objective ("kto"):
- `input_ids`, `labels` (N, T): prompt + response rows, labels as above.
- `kto_desirable` (N,) bool: True for a desirable (thumbs-up) response.
- `ref_logps` (N,): reference summed response log-probs.
- `kto_kl` (optional, a scalar tensor): the KL estimate of KTO's reference point, i.e. the mean
  over mismatched (prompt, response) pairs of policy minus reference summed log-probs, computed
  without gradient (TRL builds the pairs by shifting responses one row). Absent = 0, which is
  TRL's `calculate_KL=False` behaviour.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from smolforge.config import TrainConfig
from smolforge.errors import SmolforgeError
from smolforge.model import ModelOutput
from smolforge.train.objectives import IGNORE_INDEX, register, token_cross_entropy

# --- log-probabilities ------------------------------------------------------------------------


def sequence_logps(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Summed response log-probs (B,) and response token counts (B,), in fp32.

    `logits` (B, T, V) and SHIFTED `labels` (B, T): `labels[t]` is the target of `logits[t]`;
    positions labelled -100 contribute nothing. fp32 because the sum of a few hundred bf16
    log-probs loses the small differences that preference losses are made of.
    """
    logps = -token_cross_entropy(logits, labels).sum(-1)  # already fp32, 0 at ignored positions
    n_tokens = (labels != IGNORE_INDEX).sum(-1)
    return logps, n_tokens


@torch.no_grad()
def reference_logps(model: nn.Module, input_ids: Tensor, labels: Tensor) -> Tensor:
    """`ref_logps` for a batch: the reference model's summed response log-probs (rows,), fp32."""
    return sequence_logps(model(input_ids).logits, labels)[0]


def _neg_logsigmoid(x: Tensor) -> Tensor:
    return -F.logsigmoid(x)


# --- losses with a reference model ------------------------------------------------------------


def dpo_sigmoid(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor,
                ref_rejected_logps: Tensor, beta: float, label_smoothing: float = 0.0) -> Tensor:
    """DPO: -log σ(β·Δ), Δ = (log π/π_ref)(chosen) − (log π/π_ref)(rejected).

    Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a
    Reward Model" (arXiv:2305.18290), eq. 7. With `label_smoothing` ε > 0 this is conservative
    DPO (cDPO; Mitchell 2023, "A note on DPO with noisy preferences"): the label is assumed
    flipped with probability ε, giving (1−ε)·(−log σ(βΔ)) + ε·(−log σ(−βΔ)). This is TRL's
    pre-1.0 "sigmoid" loss; TRL 1.16's "sigmoid" ignores ε and equals ε = 0.
    """
    delta = (chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps)
    return ((1 - label_smoothing) * _neg_logsigmoid(beta * delta)
            + label_smoothing * _neg_logsigmoid(-beta * delta))


def robust_dpo(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor,
               ref_rejected_logps: Tensor, beta: float, label_smoothing: float) -> Tensor:
    """rDPO: [(1−ε)(−log σ(βΔ)) − ε(−log σ(−βΔ))] / (1 − 2ε), unbiased under flip rate ε.

    Chowdhury et al. 2024, "Provably Robust DPO: Aligning Language Models with Noisy Feedback"
    (arXiv:2403.00409), eq. 8; TRL "robust". Unlike cDPO the flipped term is subtracted, which
    makes the loss an unbiased estimate of the clean DPO loss; it needs ε < 1/2.
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"robust DPO needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
    delta = (chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps)
    clean = (1 - label_smoothing) * _neg_logsigmoid(beta * delta)
    flipped = label_smoothing * _neg_logsigmoid(-beta * delta)
    return (clean - flipped) / (1 - 2 * label_smoothing)


def ipo(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor,
        ref_rejected_logps: Tensor, chosen_tokens: Tensor, rejected_tokens: Tensor,
        beta: float) -> Tensor:
    """IPO: (Δ̄ − 1/(2β))², Δ̄ built from log-ratios AVERAGED over each response's tokens.

    Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
    Preferences" (arXiv:2310.12036), eq. 17, β playing τ. The paper writes sequence log-probs;
    summed ones make the squared target scale with response length, so, like TRL ("ipo", which
    its authors confirmed), each log-ratio is divided by its response token count (min 1).
    """
    chosen = (chosen_logps - ref_chosen_logps) / chosen_tokens.clamp(min=1)
    rejected = (rejected_logps - ref_rejected_logps) / rejected_tokens.clamp(min=1)
    return (chosen - rejected - 1 / (2 * beta)) ** 2


def hinge(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor,
          ref_rejected_logps: Tensor, beta: float) -> Tensor:
    """SLiC hinge: max(0, 1 − β·Δ), i.e. a margin of 1/β on the log-ratio difference.

    Zhao et al. 2023, "SLiC-HF: Sequence Likelihood Calibration with Human Feedback"
    (arXiv:2305.10425), eq. 1 on reference-normalised log-probs as in TRL "hinge".
    """
    delta = (chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps)
    return torch.relu(1 - beta * delta)


def apo_zero(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor,
             ref_rejected_logps: Tensor, beta: float) -> Tensor:
    """APO-zero: (1 − σ(β·r_c)) + σ(β·r_r), r = log π/π_ref of each response.

    D'Oosterlinck et al. 2024, "Anchored Preference Optimization and Contrastive Revisions"
    (arXiv:2408.06266), eq. 7. Anchors each response to the reference separately: pushes the
    chosen likelihood up and the rejected down, for chosen answers better than the model's own
    (the playbook's winner, +15-20 IFEval).
    """
    return (1 - torch.sigmoid(beta * (chosen_logps - ref_chosen_logps))
            + torch.sigmoid(beta * (rejected_logps - ref_rejected_logps)))


def apo_down(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor,
             ref_rejected_logps: Tensor, beta: float) -> Tensor:
    """APO-down: σ(β·r_c) + (1 − σ(β·(r_c − r_r))).

    D'Oosterlinck et al. 2024 (arXiv:2408.06266), eq. 8: for chosen answers worse than the
    model's own, lower both likelihoods but the rejected one more.
    """
    chosen = chosen_logps - ref_chosen_logps
    rejected = rejected_logps - ref_rejected_logps
    return torch.sigmoid(beta * chosen) + 1 - torch.sigmoid(beta * (chosen - rejected))


def kto(logps: Tensor, ref_logps: Tensor, desirable: Tensor, beta: float, kl: Tensor | float = 0.0,
        desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> Tensor:
    """KTO, unpaired: λ_D(1 − σ(β(r − z0))) for desirable rows, λ_U(1 − σ(β(z0 − r))) otherwise.

    Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization"
    (arXiv:2402.01306), eq. 7, with r = log π/π_ref of the response and the reference point
    z0 = max(0, `kl`) taken without gradient, as in TRL "kto" (which estimates `kl` from
    mismatched prompt/response pairs; the paper notes back-propagating through it is unstable).
    """
    z0 = torch.as_tensor(kl, dtype=logps.dtype, device=logps.device).detach().clamp(min=0)
    ratio = logps - ref_logps
    return torch.where(desirable,
                       desirable_weight * (1 - torch.sigmoid(beta * (ratio - z0))),
                       undesirable_weight * (1 - torch.sigmoid(beta * (z0 - ratio))))


# --- reference-free losses --------------------------------------------------------------------


def simpo(chosen_avg_logps: Tensor, rejected_avg_logps: Tensor, beta: float,
          gamma: float) -> Tensor:
    """SimPO: −log σ(β·(mean log π(chosen) − mean log π(rejected)) − γ), no reference model.

    Meng, Xia & Chen 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward"
    (arXiv:2405.14734), eq. 6: the reward is the length-averaged log-prob (per-token means
    remove DPO's length bias) and γ is a target reward margin. γ is in reward units as in
    TRL's CPOTrainer `simpo_gamma` (which computes β·(Δ − γ/β)).
    """
    return _neg_logsigmoid(beta * (chosen_avg_logps - rejected_avg_logps) - gamma)


def log1mexp(x: Tensor) -> Tensor:
    """log(1 − exp(x)) for x ≤ 0, switching form at −log 2 (Mächler 2012) to avoid cancellation."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo(chosen_avg_logps: Tensor, rejected_avg_logps: Tensor, lam: float) -> tuple[Tensor, Tensor]:
    """ORPO: −mean log π(chosen) + λ·(−log σ(log odds(chosen) − log odds(rejected))).

    Hong, Lee & Thorne 2024, "ORPO: Monolithic Preference Optimization without Reference Model"
    (arXiv:2403.07691), eqs. 6-7, with odds(y) = p/(1−p) of the length-averaged probability
    p = exp(mean log π(y)). Returns (losses, log odds ratios). The SFT term is each chosen
    response's mean token NLL (the paper's L_SFT); TRL instead averages the NLL over all prompt
    and response tokens of the batch — the odds-ratio term is identical.
    """
    log_odds = ((chosen_avg_logps - rejected_avg_logps)
                - (log1mexp(chosen_avg_logps) - log1mexp(rejected_avg_logps)))
    return -chosen_avg_logps + lam * _neg_logsigmoid(log_odds), log_odds


# --- objectives -------------------------------------------------------------------------------


@dataclass
class Pairs:
    """Policy (and reference) log-probs of a paired batch, split into chosen and rejected."""

    chosen: Tensor  # summed response log-probs (B,), fp32, with gradient
    rejected: Tensor
    chosen_tokens: Tensor  # response token counts (B,)
    rejected_tokens: Tensor
    ref_chosen: Tensor | None  # summed reference log-probs (B,), or None when not given
    ref_rejected: Tensor | None


def _ref_logps(batch: dict[str, Tensor], name: str, rows: int) -> Tensor:
    ref = batch.get("ref_logps")
    if ref is None:
        raise SmolforgeError(
            f"train.objective {name!r} compares the policy with a reference model, but the batch has "
            f"no 'ref_logps' (the reference model's summed response log-probs, one per row); compute "
            f"them with smolforge.train.preference.reference_logps, or use a reference-free "
            f"objective ('simpo', 'orpo')")
    if ref.shape != (rows,):
        raise SmolforgeError(f"train.objective {name!r}: batch 'ref_logps' has shape "
                             f"{tuple(ref.shape)}, expected ({rows},), one per row")
    return ref.float()


def paired_logps(output: ModelOutput, batch: dict[str, Tensor], name: str, need_ref: bool) -> Pairs:
    """Split a [chosen; rejected] batch (see the module docstring) into per-pair log-probs."""
    labels = batch["labels"]
    rows = labels.shape[0]
    if rows % 2:
        raise SmolforgeError(f"train.objective {name!r} needs an even number of rows "
                             f"(B chosen then B rejected), got {rows}")
    logps, n_tokens = sequence_logps(output.logits, labels)
    chosen, rejected = logps.chunk(2)
    chosen_tokens, rejected_tokens = n_tokens.chunk(2)
    ref_chosen = ref_rejected = None
    if need_ref:
        ref_chosen, ref_rejected = _ref_logps(batch, name, rows).chunk(2)
    return Pairs(chosen, rejected, chosen_tokens, rejected_tokens, ref_chosen, ref_rejected)


def reward_metrics(chosen_rewards: Tensor, rejected_rewards: Tensor, chosen_logps: Tensor,
                   rejected_logps: Tensor) -> dict[str, Tensor]:
    """TRL's preference metrics, as detached batch means."""
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    return {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": chosen_logps.detach().mean(),
        "logps/rejected": rejected_logps.detach().mean(),
    }


def _with_aux(loss: Tensor, metrics: dict[str, Tensor], output: ModelOutput) -> tuple[Tensor, dict[str, Tensor]]:
    # MoE load balancing applies whatever the objective, as in the "lm" objective.
    if output.aux_loss is not None:
        loss = loss + output.aux_loss
        metrics["aux_loss"] = output.aux_loss.detach()
    return loss, metrics


RefLoss = Callable[[Pairs, TrainConfig], Tensor]


def _reference_objective(name: str, loss_fn: RefLoss) -> None:
    """Register `name`: a paired loss on log-ratios to the reference, with TRL's DPO metrics."""

    def objective(output: ModelOutput, batch: dict[str, Tensor],
                  cfg: TrainConfig) -> tuple[Tensor, dict[str, Tensor]]:
        pairs = paired_logps(output, batch, name, need_ref=True)
        assert pairs.ref_chosen is not None and pairs.ref_rejected is not None
        # TRL logs β·(summed log-ratio) as the implicit reward for every DPO-family loss.
        metrics = reward_metrics(cfg.beta * (pairs.chosen - pairs.ref_chosen),
                                 cfg.beta * (pairs.rejected - pairs.ref_rejected),
                                 pairs.chosen, pairs.rejected)
        return _with_aux(loss_fn(pairs, cfg).mean(), metrics, output)

    objective.__name__ = objective.__qualname__ = f"{name}_objective"
    objective.__doc__ = f"Registered objective {name!r}: see the batch contract in {__name__}."
    register(name)(objective)


def _refs(p: Pairs) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    assert p.ref_chosen is not None and p.ref_rejected is not None
    return p.chosen, p.rejected, p.ref_chosen, p.ref_rejected


_reference_objective("dpo", lambda p, c: dpo_sigmoid(*_refs(p), c.beta, c.label_smoothing))
_reference_objective("robust", lambda p, c: robust_dpo(*_refs(p), c.beta, c.label_smoothing))
_reference_objective("ipo", lambda p, c: ipo(*_refs(p), p.chosen_tokens, p.rejected_tokens, c.beta))
_reference_objective("hinge", lambda p, c: hinge(*_refs(p), c.beta))
_reference_objective("apo_zero", lambda p, c: apo_zero(*_refs(p), c.beta))
_reference_objective("apo_down", lambda p, c: apo_down(*_refs(p), c.beta))


def _averages(pairs: Pairs) -> tuple[Tensor, Tensor]:
    return pairs.chosen / pairs.chosen_tokens.clamp(min=1), pairs.rejected / pairs.rejected_tokens.clamp(min=1)


@register("simpo")
def simpo_objective(output: ModelOutput, batch: dict[str, Tensor],
                    cfg: TrainConfig) -> tuple[Tensor, dict[str, Tensor]]:
    """SimPO (no reference). Rewards and logps are length-averaged, as TRL's CPOTrainer logs them."""
    chosen, rejected = _averages(paired_logps(output, batch, "simpo", need_ref=False))
    losses = simpo(chosen, rejected, cfg.beta, cfg.simpo_gamma)
    metrics = reward_metrics(cfg.beta * chosen, cfg.beta * rejected, chosen, rejected)
    return _with_aux(losses.mean(), metrics, output)


@register("orpo")
def orpo_objective(output: ModelOutput, batch: dict[str, Tensor],
                   cfg: TrainConfig) -> tuple[Tensor, dict[str, Tensor]]:
    """ORPO (no reference). Metrics as TRL's ORPOTrainer: rewards = λ·mean log-prob,
    `log_odds_ratio` = mean log σ(log odds ratio), `log_odds_chosen` = mean log odds ratio."""
    chosen, rejected = _averages(paired_logps(output, batch, "orpo", need_ref=False))
    losses, log_odds = orpo(chosen, rejected, cfg.orpo_lambda)
    metrics = reward_metrics(cfg.orpo_lambda * chosen, cfg.orpo_lambda * rejected, chosen, rejected)
    metrics["nll"] = -chosen.detach().mean()
    metrics["log_odds_ratio"] = F.logsigmoid(log_odds).detach().mean()
    metrics["log_odds_chosen"] = log_odds.detach().mean()
    return _with_aux(losses.mean(), metrics, output)


@register("kto")
def kto_objective(output: ModelOutput, batch: dict[str, Tensor],
                  cfg: TrainConfig) -> tuple[Tensor, dict[str, Tensor]]:
    """KTO on unpaired rows. Metrics as TRL's KTOTrainer: per-side means only for sides present
    in the batch (a batch without undesirable rows has no `rewards/rejected`), plus `kl` (= z0)."""
    labels = batch["labels"]
    rows = labels.shape[0]
    desirable = batch.get("kto_desirable")
    if desirable is None or desirable.shape != (rows,):
        got = "nothing" if desirable is None else f"shape {tuple(desirable.shape)}"
        raise SmolforgeError(f"train.objective 'kto' needs batch 'kto_desirable', a bool per row "
                             f"({rows},); got {got}")
    desirable = desirable.bool()
    ref = _ref_logps(batch, "kto", rows)
    logps, _ = sequence_logps(output.logits, labels)
    kl = batch.get("kto_kl")
    z0 = torch.zeros((), device=logps.device) if kl is None else kl.detach().float().mean().clamp(min=0)
    losses = kto(logps, ref, desirable, cfg.beta, z0, cfg.kto_desirable_weight, cfg.kto_undesirable_weight)
    rewards = cfg.beta * (logps - ref).detach()
    metrics: dict[str, Tensor] = {"kl": z0}
    for side, mask in (("chosen", desirable), ("rejected", ~desirable)):
        # A host sync per step, but unavoidable: TRL omits a side with no rows rather than log NaN.
        if bool(mask.any()):
            metrics[f"rewards/{side}"] = rewards[mask].mean()
            metrics[f"logps/{side}"] = logps[mask].detach().mean()
    if "rewards/chosen" in metrics and "rewards/rejected" in metrics:
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return _with_aux(losses.mean(), metrics, output)
