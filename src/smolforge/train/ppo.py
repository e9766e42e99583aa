"""PPO for language models (the RLHF recipe of Ziegler et al. 2019 and InstructGPT): the pieces.

Pure functions, each with its source, plus one `ppo_update` that runs PPO epochs over a batch of
rollouts. The rollout loop (sampling with `smolforge.engine.Engine`, reward-model scores) calls
them in this order:

    logprobs, ref_logprobs, values = rollout_statistics(model, reference, input_ids, mask)
    rewards, kl = kl_penalised_rewards(logprobs, ref_logprobs, mask, scores, kl_ctl.value)
    advantages, returns = advantages_and_returns(rewards, values, mask, cfg)  # GAE (+ whitening)
    metrics = ppo_update(model, RolloutBatch(...), cfg, policy_opt, value_opt)
    kl_ctl.update(sequence_kl(logprobs, ref_logprobs, mask).mean().item(), n_steps=len(input_ids))

Conventions
-----------
Every per-token tensor is (B, T) and aligned with `input_ids`: entry t is about token t, the
action taken in the state x_<t. `logprobs[:, t]` = log pi(x_t | x_<t), `values[:, t]` = V(x_<t)
(read from the hidden state of token t-1), `rewards[:, t]` = the reward for emitting x_t. Column 0
has no state before it and is never an action. `completion_mask` (B, T) is True at the completion
tokens (the actions); each row's completion is ONE contiguous run (the prompt before it, padding
after it or before the prompt), which is what GAE's "terminal after the last action" needs.

Losses are token-level means over the completion tokens of a mini-batch (TRL's PPO trainer;
Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO", arXiv:2403.17031).

The value model
---------------
The critic is a SEPARATE network, not a second head on the policy's trunk: a `RewardModel` (a
decoder body + a scalar `score` head, read at every position instead of the last one), initialised
from the SFT checkpoint's body (Mini-LLM's `create_value_model`; `value_init: sft`) or from the
reward model (InstructGPT, Ouyang et al. 2022 sec. 3.5; `value_init: reward_model`). Why separate:
- the value loss has a different scale and, in Mini-LLM's defaults, a 30x larger learning rate
  (`ppo_lr_value` 3e-4 vs `ppo_lr_policy` 1e-5): through a shared trunk it would move the policy;
  separate networks are also what InstructGPT, TRL's PPO trainer and OpenRLHF do;
- the critic is then the same class as the reward model, so it saves and loads with
  `save_reward_model` / `load_reward_model` (an HF `*ForSequenceClassification` directory) and
  can start from one;
- a LoRA policy keeps its frozen base as the reference: the critic is a merged, fully trainable
  copy of the SFT body, untouched by the policy's adapters.
The price is a second copy of the weights (and of their optimizer state), small for smol models.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from smolforge.errors import SmolforgeError
from smolforge.model import Transformer

if TYPE_CHECKING:  # imported lazily below: config.py may import this module for PPORecipe
    from smolforge.train.reward import RewardModel


class PPOConfig(BaseModel):
    """PPO hyper-parameters. The `ppo_*` names are Mini-LLM's `RLHFConfig` fields, with its defaults."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    ppo_iterations: int = Field(1000, gt=0, description="Rounds of (sample ppo_batch_size rollouts, run ppo_epochs over them).")
    ppo_batch_size: int = Field(32, gt=0, description="Rollouts (prompt + completion) sampled per iteration.")
    ppo_mini_batch_size: int = Field(8, gt=0, description="Rollouts per optimizer step; ppo_batch_size / this = steps per PPO epoch.")
    ppo_micro_batch_size: int = Field(0, ge=0, description="Rollouts per forward/backward inside a mini-batch (gradient accumulation); 0 = the whole mini-batch.")
    ppo_epochs: int = Field(4, gt=0, description="Passes over each batch of rollouts (Schulman et al. 2017's K epochs).")
    ppo_lr_policy: float = Field(1e-5, gt=0, description="AdamW learning rate of the policy.")
    ppo_lr_value: float = Field(3e-4, gt=0, description="AdamW learning rate of the value model (critic).")
    max_grad_norm: float = Field(1.0, ge=0, description="Clip each network's gradient norm to this; 0 = off.")
    gamma: float = Field(1.0, ge=0, le=1, description="GAE discount gamma (1 = no discount: rewards are sparse, episodes short).")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda: 0 = one-step TD (low variance), 1 = Monte Carlo (no bias).")
    cliprange: float = Field(0.2, gt=0, description="Policy ratio clip epsilon (Schulman et al. 2017).")
    cliprange_value: float = Field(0.2, gt=0, description="Value clip: new values stay within this of the rollout's (PPO2 / TRL).")
    vf_coef: float = Field(0.1, ge=0, description="Weight of the value loss (TRL's default); with a separate critic it scales its gradient before clipping.")
    init_kl_coef: float = Field(0.2, ge=0, description="Initial beta of the per-token KL penalty to the reference (Ziegler et al. 2019).")
    target_kl: float = Field(6.0, ge=0, description="Adaptive KL controller's target KL per completion, in nats; 0 = keep beta fixed.")
    kl_horizon: int = Field(10000, gt=0, description="Adaptive KL controller's horizon, in rollouts (Ziegler et al. 2019).")
    whiten_advantages: bool = Field(True, description="Normalise advantages to mean 0, std 1 over the batch's completion tokens.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature; log-probs are computed from logits / temperature to match the rollouts.")
    value_init: Literal["sft", "reward_model"] = Field(
        "sft", description="Critic initialisation: sft = the SFT body with a new head (Mini-LLM), "
                           "reward_model = a copy of the reward model (InstructGPT).")

    @model_validator(mode="after")
    def _check_batches(self) -> PPOConfig:
        if self.ppo_batch_size % self.ppo_mini_batch_size:
            raise ValueError(f"ppo.ppo_mini_batch_size ({self.ppo_mini_batch_size}) must divide "
                             f"ppo.ppo_batch_size ({self.ppo_batch_size})")
        if self.ppo_micro_batch_size and self.ppo_mini_batch_size % self.ppo_micro_batch_size:
            raise ValueError(f"ppo.ppo_micro_batch_size ({self.ppo_micro_batch_size}) must divide "
                             f"ppo.ppo_mini_batch_size ({self.ppo_mini_batch_size})")
        return self


# --- masked statistics ----------------------------------------------------------------------------


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of `x` over the positions where `mask` is True (0 when there are none). A select, not a
    product: a non-finite value off the mask stays out. Shared by PPO and GRPO (`train.grpo`)."""
    mask = mask.bool()
    return torch.where(mask, x, 0.0).sum() / mask.sum().clamp(min=1)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of `x` over the masked positions; with Bessel's correction n / (n - 1) by default."""
    m = mask.to(x.dtype)
    n = m.sum()
    var = masked_mean((x - masked_mean(x, mask)) ** 2, mask)
    if unbiased:
        if n < 2:
            raise ValueError(f"an unbiased variance needs at least 2 masked values, got {int(n)}")
        var = var * n / (n - 1)
    return var


def whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x - mean) / std over the masked positions, 0 elsewhere; `shift_mean=False` keeps the mean.

    Advantage normalisation (OpenAI baselines' PPO2; Huang et al. 2024, detail "advantage
    whitening"): a batch-level scale so that the policy step size does not depend on the
    reward's scale. Statistics over the whole batch's completion tokens, unbiased variance.
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    white = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        white = white + mean
    return white * mask.to(x.dtype)


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """1 - Var[returns - values] / Var[returns] over the masked tokens: 1 = a perfect critic,
    0 = no better than a constant, < 0 = worse (OpenAI baselines' `explained_variance`); nan when
    the returns are constant."""
    var_returns = masked_var(returns, mask, unbiased=False)
    if var_returns == 0:
        return torch.tensor(float("nan"), device=values.device)
    return 1 - masked_var(returns - values, mask, unbiased=False) / var_returns


# --- per-token quantities from logits -------------------------------------------------------------


def _shift_right(x: Tensor) -> Tensor:
    """Per-position results of positions 0..T-2 moved to the tokens 1..T-1 they predict; column 0 = 0."""
    return F.pad(x, (1, 0))


def label_logprobs(logits: Tensor, labels: Tensor, temperature: float | Tensor = 1.0) -> Tensor:
    """log p(labels[t]) under logits[t] / temperature, (B, T) in fp32, 0 where labels is -100.

    `labels` are aligned with `logits` (already shifted: labels[t] is the target of position t), as
    in GRPO's batches; `token_logprobs` is the same on unshifted input ids. The logits are divided by
    the sampling temperature first, so that the probabilities are those of the distribution the
    rollouts were drawn from (Huang et al. 2024, "temperature"). cross_entropy = -log_softmax
    gathered at the target, without keeping a (B, T, V) log-prob copy.
    """
    logits = logits.float() / temperature
    nll = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="none")
    return -nll.view(labels.shape)


def logits_entropy(logits: Tensor, temperature: float | Tensor = 1.0) -> Tensor:
    """Entropy H = logsumexp(z) - sum_v softmax(z)_v z_v of each position's distribution, z = logits /
    temperature, (B, T) in fp32 (aligned with `logits`)."""
    z = logits.float() / temperature
    return torch.logsumexp(z, -1) - (F.softmax(z, -1) * z).sum(-1)


def token_logprobs(logits: Tensor, input_ids: Tensor, temperature: float = 1.0) -> Tensor:
    """log pi(x_t | x_<t) for every token (B, T) in fp32, 0 at column 0 (`label_logprobs` shifted)."""
    return _shift_right(label_logprobs(logits[:, :-1], input_ids[:, 1:], temperature))


def token_entropy(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Entropy H(pi(. | x_<t)) of the distribution each token was drawn from, (B, T) in fp32, 0 at
    column 0 (`logits_entropy` shifted)."""
    return _shift_right(logits_entropy(logits[:, :-1], temperature))


def last_token_index(mask: Tensor) -> Tensor:
    """Index (B,) of each row's last True position in `mask` (the last completion token)."""
    positions = torch.arange(mask.shape[1], device=mask.device)
    return (positions * mask.long()).argmax(-1)


# --- rewards, advantages, returns -----------------------------------------------------------------


def sequence_kl(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor) -> Tensor:
    """Per-row sampled KL(pi || ref) of the completion: sum_t log pi(x_t) - log ref(x_t), (B,).

    The unbiased one-sample estimator of the sequence KL that the adaptive controller tracks
    (Ziegler et al. 2019, sec. 2.2: "KL_t" is the KL of the whole sample)."""
    return ((logprobs - ref_logprobs) * mask.to(logprobs.dtype)).sum(-1)


def kl_penalised_rewards(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, scores: Tensor,
                         kl_coef: float) -> tuple[Tensor, Tensor]:
    """Per-token rewards r_t = -beta (log pi(x_t) - log ref(x_t)) + [t = last] * score, and the
    per-token KL (log-ratio) itself, both (B, T), 0 outside the completion.

    Ziegler et al. 2019 (arXiv:1909.08593) eq. 2, R(x, y) = r(x, y) - beta log(pi(y|x) / rho(y|x)),
    spread over tokens as in InstructGPT (Ouyang et al. 2022, eq. 2) and TRL: the KL term is paid at
    every token, the reward model's score `scores` (B,) once, at the last completion token.
    """
    m = mask.to(logprobs.dtype)
    kl = (logprobs - ref_logprobs) * m
    rewards = -kl_coef * kl
    rows = torch.arange(len(rewards), device=rewards.device)
    rewards[rows, last_token_index(mask)] += scores.to(rewards.dtype)
    return rewards, kl


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, arXiv:1506.02438, eq. 16):

        delta_t = r_t + gamma V(s_t+1) - V(s_t),    A_t = delta_t + gamma lam A_t+1,

    with V = 0 and A = 0 after a row's last completion token (the episode ends there). Returns
    the advantages and the critic's targets, returns = A + V (the lambda-return), both (B, T) and 0
    outside the completion. A backward scan over time, vectorised over the batch.
    """
    m = mask.to(rewards.dtype)
    rewards, values = rewards * m, values * m
    next_value = next_advantage = rewards.new_zeros(len(rewards))
    columns = []
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = (delta + gamma * lam * next_advantage) * m[:, t]
        columns.append(advantage)
        next_value, next_advantage = values[:, t], advantage  # both 0 past the completion
    advantages = torch.stack(columns[::-1], dim=1)
    return advantages, (advantages + values) * m


def advantages_and_returns(rewards: Tensor, values: Tensor, mask: Tensor, cfg: PPOConfig) -> tuple[Tensor, Tensor]:
    """`gae` with the config's gamma and lambda, then `whiten` the advantages if
    `cfg.whiten_advantages` (the returns, the critic's targets, stay unwhitened)."""
    advantages, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        advantages = whiten(advantages, mask)
    return advantages, returns


# --- losses ---------------------------------------------------------------------------------------


def _token_mean(x: Tensor, mask: Tensor, n_tokens: Tensor | float | None) -> Tensor:
    """Masked sum / n_tokens (default: the mask's count), so micro-batches add up to a mini-batch mean."""
    m = mask.to(x.dtype)
    return (x * m).sum() / (m.sum().clamp(min=1) if n_tokens is None else n_tokens)


def clipped_policy_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
                        cliprange: float, n_tokens: Tensor | float | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped surrogate (Schulman et al. 2017, arXiv:1707.06347, eq. 7), as a loss:

        ratio = exp(log pi - log pi_old),   L = mean_t max(-A ratio, -A clip(ratio, 1-eps, 1+eps)).

    Metrics: `clipfrac`, the share of tokens where the clipped term is the larger (its gradient is
    zero), and `approx_kl`, KL(pi_old || pi) by Schulman's (2020, "Approximating KL Divergence")
    low-variance estimator k3 = (ratio - 1) - log ratio.
    """
    log_ratio = (logprobs - old_logprobs) * mask.to(logprobs.dtype)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = _token_mean(torch.maximum(unclipped, clipped), mask, n_tokens)
    with torch.no_grad():
        clipfrac = _token_mean((clipped > unclipped).float(), mask, n_tokens)
        approx_kl = _token_mean((ratio - 1) - log_ratio, mask, n_tokens)
    return loss, {"clipfrac": clipfrac, "approx_kl": approx_kl}


def clipped_value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor,
                       cliprange_value: float, n_tokens: Tensor | float | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO2's clipped value loss (OpenAI baselines ppo2; TRL; Huang et al. 2024 "value clipping"):

        V_clip = V_old + clip(V - V_old, -eps_v, eps_v),   L = 1/2 mean_t max((V - R)^2, (V_clip - R)^2).

    Metric `clipfrac`: the share of tokens where the clipped error is the larger. V_clip is computed
    as clamp(V, V_old - eps_v, V_old + eps_v), which returns V itself inside the range: written as
    V_old + (V - V_old) it can differ from V by a rounding error and flip the comparison.
    """
    clipped_values = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    unclipped_error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    loss = 0.5 * _token_mean(torch.maximum(unclipped_error, clipped_error), mask, n_tokens)
    with torch.no_grad():
        clipfrac = _token_mean((clipped_error > unclipped_error).float(), mask, n_tokens)
    return loss, {"clipfrac": clipfrac}


# --- the KL coefficient ---------------------------------------------------------------------------


class FixedKLController:
    """A constant KL coefficient beta."""

    def __init__(self, kl_coef: float) -> None:
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        """Nothing to adapt."""


class AdaptiveKLController:
    """Ziegler et al. 2019 (arXiv:1909.08593, sec. 2.2): steer beta towards a target KL.

        e = clip(KL / KL_target - 1, -0.2, 0.2),    beta <- beta (1 + e n_steps / horizon),

    `current_kl` is the batch's mean sequence KL (`sequence_kl`) and `n_steps` the number of
    rollouts it came from, so beta changes by at most 20% per `horizon` rollouts (TRL's form).
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int) -> None:
        if target <= 0 or horizon <= 0:
            raise ValueError(f"the adaptive KL controller needs target > 0 and horizon > 0, got {target}, {horizon}")
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon


def kl_controller(cfg: PPOConfig) -> FixedKLController | AdaptiveKLController:
    """The adaptive controller, or a fixed beta when `cfg.target_kl` is 0."""
    if cfg.target_kl == 0:
        return FixedKLController(cfg.init_kl_coef)
    return AdaptiveKLController(cfg.init_kl_coef, cfg.target_kl, cfg.kl_horizon)


# --- policy and value model -----------------------------------------------------------------------


def _forward_inputs(input_ids: Tensor, attention_mask: Tensor | None) -> dict[str, Tensor]:
    """Positions counting real tokens and a key mask, for left-padded rows (as the engine pads);
    right padding needs neither (causal attention never looks ahead)."""
    if attention_mask is None:
        return {}
    attention_mask = attention_mask.bool()
    return {"position_ids": (attention_mask.long().cumsum(-1) - 1).clamp(min=0), "key_mask": attention_mask}


def token_values(critic: RewardModel, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """V(x_<t) for every token (B, T) in fp32, 0 at column 0: the critic's scalar head read at every
    position (a reward model reads it at the last one) and shifted to the token that follows."""
    hidden, _ = critic.body(input_ids, **_forward_inputs(input_ids, attention_mask))
    with torch.autocast(hidden.device.type, enabled=False):  # an fp32 head, like the reward model's
        values = F.linear(hidden[:, :-1].float(), critic.score.weight.float()).squeeze(-1)
    return _shift_right(values)


class PolicyWithValue(nn.Module):
    """The policy (a `Transformer`) and its critic (a `RewardModel` read per token): two networks."""

    def __init__(self, policy: Transformer, critic: RewardModel) -> None:
        super().__init__()
        if critic.config.vocab_size != policy.config.vocab_size:
            raise SmolforgeError(f"the value model's vocabulary ({critic.config.vocab_size}) differs from the "
                                 f"policy's ({policy.config.vocab_size}): both must read the same tokens")
        self.policy, self.critic = policy, critic

    @classmethod
    def from_sft(cls, policy: Transformer, reward_model: RewardModel | None = None) -> PolicyWithValue:
        """Wrap `policy` (trained in place) with a critic copied from its body and a new head
        (Mini-LLM), or from `reward_model` when given (InstructGPT). A LoRA policy's adapters
        are merged into the copy, and every critic weight trains."""
        from smolforge.train.lora import lora_modules, merge_lora
        from smolforge.train.reward import RewardModel

        source = reward_model.model if reward_model is not None else policy.model
        with torch.no_grad():
            body = copy.deepcopy(source)
            if lora_modules(body):
                merge_lora(body)  # type: ignore[arg-type]  (merge_lora walks any module)
        critic = RewardModel(policy.config if reward_model is None else reward_model.config,
                             pad_id=getattr(reward_model, "pad_id", None), body=body)
        critic.to(next(source.parameters()).device)
        if reward_model is not None:
            critic.score.load_state_dict(reward_model.score.state_dict())
        critic.requires_grad_(True)
        return cls(policy, critic)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The policy's logits (B, T, V) and the critic's values (B, T, aligned as `token_values`)."""
        logits = self.policy(input_ids, **_forward_inputs(input_ids, attention_mask)).logits
        return logits, token_values(self.critic, input_ids, attention_mask)


@torch.no_grad()
def rollout_statistics(model: PolicyWithValue, reference: Transformer | None, input_ids: Tensor,
                       attention_mask: Tensor | None = None, temperature: float = 1.0
                       ) -> tuple[Tensor, Tensor | None, Tensor]:
    """The rollout's log-probs under the policy and the reference, and the critic's values (B, T),
    computed once after sampling: PPO's pi_old and V_old. `reference` None gives None (no KL)."""
    logits, values = model(input_ids, attention_mask)
    logprobs = token_logprobs(logits, input_ids, temperature)
    ref_logprobs = None
    if reference is not None:
        ref_logits = reference(input_ids, **_forward_inputs(input_ids, attention_mask)).logits
        ref_logprobs = token_logprobs(ref_logits, input_ids, temperature)
    return logprobs, ref_logprobs, values


# --- one PPO update -------------------------------------------------------------------------------


@dataclass
class RolloutBatch:
    """A batch of scored rollouts: (B, T) tensors aligned with `input_ids` (module docstring)."""

    input_ids: Tensor
    completion_mask: Tensor  # True at completion tokens: one contiguous run per row
    old_logprobs: Tensor  # log pi_old(x_t), from `rollout_statistics`
    old_values: Tensor  # V_old(x_<t)
    advantages: Tensor  # from `gae` (whitened or not)
    returns: Tensor  # advantages + old_values
    attention_mask: Tensor | None = None  # False at padding; needed only for left padding

    def __len__(self) -> int:
        return len(self.input_ids)

    def rows(self, index: Tensor) -> RolloutBatch:
        """The sub-batch of the given rows."""
        return RolloutBatch(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[index]
                               for f in fields(self)})

    def check(self) -> None:
        """Shapes agree, and every row has one non-empty contiguous completion after column 0."""
        shape = tuple(self.input_ids.shape)
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None and tuple(value.shape) != shape:
                raise ValueError(f"rollout batch field {f.name} has shape {tuple(value.shape)}, expected {shape}")
        mask = self.completion_mask.bool()
        starts = (mask[:, 1:] & ~mask[:, :-1]).sum(-1) + mask[:, 0].long()
        if bool(mask[:, 0].any()) or bool((starts != 1).any()):
            raise ValueError("each rollout row needs exactly one contiguous run of completion tokens, "
                             "after at least one prompt token")


def build_optimizers(model: PolicyWithValue, cfg: PPOConfig) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    """AdamW for the policy (lr `ppo_lr_policy`) and for the critic (lr `ppo_lr_value`), with the
    playbook's parameter groups (no weight decay on embeddings, norms, biases; decay 0 here, as
    TRL's PPO uses); only trainable parameters (a LoRA policy's adapters)."""
    from smolforge.train.optim import parameter_groups

    fused = next(model.parameters()).device.type == "cuda"
    policy = torch.optim.AdamW(parameter_groups(model.policy, 0.0), lr=cfg.ppo_lr_policy, fused=fused)
    value = torch.optim.AdamW(parameter_groups(model.critic, 0.0), lr=cfg.ppo_lr_value, fused=fused)
    return policy, value


def _clip_and_step(net: nn.Module, optimizer: torch.optim.Optimizer, max_norm: float) -> Tensor:
    params = [p for p in net.parameters() if p.grad is not None]
    norm = (torch.nn.utils.clip_grad_norm_(params, max_norm) if max_norm > 0 and params
            else torch.zeros((), device=next(net.parameters()).device))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm.detach()


def ppo_update(model: PolicyWithValue, batch: RolloutBatch, cfg: PPOConfig,
               policy_optimizer: torch.optim.Optimizer, value_optimizer: torch.optim.Optimizer,
               generator: torch.Generator | None = None, autocast_dtype: torch.dtype | None = None
               ) -> dict[str, float]:
    """`cfg.ppo_epochs` passes over `batch` in shuffled mini-batches of `cfg.ppo_mini_batch_size`
    rows: per mini-batch, the clipped policy loss and `vf_coef` x the clipped value loss, one
    clipped step of each optimizer (Schulman et al. 2017, Algorithm 1). Returns the means over
    all mini-batch steps of the losses, clip fractions, approx KL, entropy and gradient norms,
    plus the critic's explained variance on the rollouts (before the update).

    Compute the batch's old log-probs under the same precision as `autocast_dtype` (wrap
    `rollout_statistics` in the same autocast), or the first step's ratios start away from 1."""
    batch.check()
    device = batch.input_ids.device
    mini = cfg.ppo_mini_batch_size
    micro = cfg.ppo_micro_batch_size or mini
    totals: dict[str, Tensor] = {}
    steps = 0
    model.train()
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(len(batch), generator=generator).to(device)
        for start in range(0, len(batch), mini):
            mini_batch = batch.rows(order[start : start + mini])
            n_tokens = mini_batch.completion_mask.sum().clamp(min=1)
            step: dict[str, Tensor] = {}
            for micro_start in range(0, len(mini_batch), micro):
                part = mini_batch.rows(torch.arange(micro_start, min(micro_start + micro, len(mini_batch)), device=device))
                mask = part.completion_mask
                with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16,
                                    enabled=autocast_dtype is not None):
                    logits, values = model(part.input_ids, part.attention_mask)
                logprobs = token_logprobs(logits, part.input_ids, cfg.temperature)
                pg_loss, pg_metrics = clipped_policy_loss(logprobs, part.old_logprobs, part.advantages,
                                                          mask, cfg.cliprange, n_tokens)
                vf_loss, vf_metrics = clipped_value_loss(values, part.old_values, part.returns,
                                                         mask, cfg.cliprange_value, n_tokens)
                (pg_loss + cfg.vf_coef * vf_loss).backward()  # disjoint networks: two separate gradients
                with torch.no_grad():
                    entropy = _token_mean(token_entropy(logits.detach(), cfg.temperature), mask, n_tokens)
                for name, value in {"policy_loss": pg_loss.detach(), "value_loss": vf_loss.detach(),
                                    "clipfrac": pg_metrics["clipfrac"], "approx_kl": pg_metrics["approx_kl"],
                                    "value_clipfrac": vf_metrics["clipfrac"], "entropy": entropy}.items():
                    step[name] = step.get(name, 0.0) + value  # micro-batch parts of the mini-batch mean
            step["policy_grad_norm"] = _clip_and_step(model.policy, policy_optimizer, cfg.max_grad_norm)
            step["value_grad_norm"] = _clip_and_step(model.critic, value_optimizer, cfg.max_grad_norm)
            for name, value in step.items():
                totals[name] = totals.get(name, 0.0) + value
            steps += 1
    metrics = {name: float(value) / steps for name, value in totals.items()}  # one host sync per metric
    metrics["explained_variance"] = float(explained_variance(batch.old_values, batch.returns, batch.completion_mask))
    return metrics

