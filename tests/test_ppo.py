"""PPO building blocks: GAE, KL-shaped rewards, clipped losses, whitening, entropy, the KL
controllers against hand or plain-Python computations; the critic; a tiny PPO run on a toy task."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from pydantic import ValidationError

from smolforge.engine import Engine, SamplingParams
from smolforge.errors import SmolforgeError
from smolforge.model import ModelConfig, Transformer, debug
from smolforge.train.lora import LoraSettings, apply_lora, lora_modules
from smolforge.train.ppo import (
    AdaptiveKLController,
    FixedKLController,
    PolicyWithValue,
    PPOConfig,
    RolloutBatch,
    advantages_and_returns,
    build_optimizers,
    clipped_policy_loss,
    clipped_value_loss,
    explained_variance,
    gae,
    kl_controller,
    kl_penalised_rewards,
    masked_mean,
    ppo_update,
    rollout_statistics,
    sequence_kl,
    token_entropy,
    token_logprobs,
    token_values,
    whiten,
)
from smolforge.train.reward import RewardModel, load_reward_model, save_reward_model


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matmuls: more threads only contend for the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(vocab: int = 32, **changes) -> ModelConfig:
    return ModelConfig(**{**debug().model_dump(), "vocab_size": vocab, "max_seq_len": 64, **changes})


def spans_mask(spans: list[tuple[int, int]], T: int) -> torch.Tensor:
    """(B, T) bool mask, True on [start, end) of each row."""
    mask = torch.zeros(len(spans), T, dtype=torch.bool)
    for row, (start, end) in enumerate(spans):
        mask[row, start:end] = True
    return mask


# --- GAE ------------------------------------------------------------------------------------------


def reference_gae(rewards: list[list[float]], values: list[list[float]], mask: list[list[bool]],
                  gamma: float, lam: float) -> tuple[list[list[float]], list[list[float]]]:
    """Schulman et al. 2016 eq. 16 one row and one step at a time: the completion's steps only."""
    advantages = [[0.0] * len(r) for r in rewards]
    returns = [[0.0] * len(r) for r in rewards]
    for b in range(len(rewards)):
        steps = [t for t, m in enumerate(mask[b]) if m]
        running = 0.0
        for i in reversed(range(len(steps))):
            t = steps[i]
            next_value = values[b][steps[i + 1]] if i + 1 < len(steps) else 0.0  # terminal after the last
            delta = rewards[b][t] + gamma * next_value - values[b][t]
            running = delta + gamma * lam * running
            advantages[b][t] = running
            returns[b][t] = running + values[b][t]
    return advantages, returns


@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 0.95), (0.9, 0.8), (0.99, 1.0), (1.0, 0.0)])
def test_gae_matches_a_plain_python_reference(gamma, lam):
    T = 12
    # Different prompt and completion lengths; right padding (rows 0-2), left padding (row 3).
    mask = spans_mask([(2, 12), (4, 7), (1, 2), (6, 10)], T)
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(4, T, generator=g, dtype=torch.float64)
    values = torch.randn(4, T, generator=g, dtype=torch.float64)
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    ref_adv, ref_ret = reference_gae(rewards.tolist(), values.tolist(), mask.tolist(), gamma, lam)
    torch.testing.assert_close(advantages, torch.tensor(ref_adv, dtype=torch.float64))
    torch.testing.assert_close(returns, torch.tensor(ref_ret, dtype=torch.float64))
    assert not advantages[~mask].any() and not returns[~mask].any()


def test_gae_with_lambda_and_gamma_one_gives_reward_to_go():
    rewards = torch.tensor([[9.0, 1.0, 2.0, 3.0, 9.0]])
    values = torch.tensor([[5.0, 0.5, 0.25, 4.0, 7.0]])
    mask = spans_mask([(1, 4)], 5)
    advantages, returns = gae(rewards, values, mask, 1.0, 1.0)
    torch.testing.assert_close(returns, torch.tensor([[0.0, 6.0, 5.0, 3.0, 0.0]]))
    torch.testing.assert_close(advantages, torch.tensor([[0.0, 5.5, 4.75, -1.0, 0.0]]))


def test_advantages_and_returns_follow_the_config():
    g = torch.Generator().manual_seed(4)
    rewards, values = torch.randn(3, 6, generator=g), torch.randn(3, 6, generator=g)
    mask = spans_mask([(1, 6), (2, 5), (3, 4)], 6)
    advantages, returns = gae(rewards, values, mask, 0.9, 0.7)
    cfg = PPOConfig(gamma=0.9, lam=0.7, whiten_advantages=False)
    for got, want in zip(advantages_and_returns(rewards, values, mask, cfg), (advantages, returns)):
        torch.testing.assert_close(got, want)
    white, same_returns = advantages_and_returns(rewards, values, mask, cfg.model_copy(update={"whiten_advantages": True}))
    torch.testing.assert_close(white, whiten(advantages, mask))
    torch.testing.assert_close(same_returns, returns)


# --- rewards --------------------------------------------------------------------------------------


def test_kl_penalised_rewards_by_hand():
    logprobs = torch.tensor([[0.0, -1.0, -2.0, -0.5, -3.0], [0.0, -0.1, -0.2, -0.3, -0.4]])
    ref_logprobs = torch.tensor([[0.0, -1.5, -1.0, -0.5, -1.0], [0.0, -0.2, -0.2, -0.1, -0.1]])
    mask = spans_mask([(1, 4), (2, 4)], 5)
    rewards, kl = kl_penalised_rewards(logprobs, ref_logprobs, mask, torch.tensor([2.0, -1.0]), 0.1)
    # Row 0: log-ratios 0.5, -1.0, 0.0 on tokens 1-3 (token 4 is padding); the score at token 3.
    # Row 1: log-ratios 0.0, -0.2 on tokens 2-3; the score at token 3.
    torch.testing.assert_close(kl, torch.tensor([[0.0, 0.5, -1.0, 0.0, 0.0], [0.0, 0.0, 0.0, -0.2, 0.0]]))
    torch.testing.assert_close(rewards, torch.tensor([[0.0, -0.05, 0.1, 2.0, 0.0],
                                                      [0.0, 0.0, 0.0, 0.02 - 1.0, 0.0]]))
    torch.testing.assert_close(sequence_kl(logprobs, ref_logprobs, mask), torch.tensor([-0.5, -0.2]))


# --- losses ---------------------------------------------------------------------------------------


def test_clipped_policy_loss_by_hand():
    # Five completion tokens (columns 1-5) and a padding column 6 holding values that must not count.
    ratios = [1.1, 1.5, 0.5, 1.5, 0.5]
    advantages = torch.tensor([[0.0, 1.0, 1.0, -1.0, -1.0, 2.0, 100.0]])
    old_logprobs = torch.tensor([[0.0, -1.0, -2.0, -0.5, -1.5, -0.7, 0.0]])
    logprobs = old_logprobs.clone()
    logprobs[0, 1:6] += torch.tensor([math.log(r) for r in ratios])
    logprobs[0, 6] = 5.0
    logprobs.requires_grad_(True)
    mask = spans_mask([(1, 6)], 7)
    loss, metrics = clipped_policy_loss(logprobs, old_logprobs, advantages, mask, cliprange=0.2)
    # Per token max(-A r, -A clip(r, 0.8, 1.2)):
    #  A=+1 r=1.1 inside: -1.1 | A=+1 r=1.5: max(-1.5, -1.2) = -1.2, clipped
    #  A=-1 r=0.5: max(0.5, 0.8) = 0.8, clipped | A=-1 r=1.5: max(1.5, 1.2) = 1.5 (pessimistic, not clipped)
    #  A=+2 r=0.5: max(-1.0, -1.6) = -1.0 (not clipped)
    torch.testing.assert_close(loss, torch.tensor((-1.1 - 1.2 + 0.8 + 1.5 - 1.0) / 5))
    torch.testing.assert_close(metrics["clipfrac"], torch.tensor(2 / 5))
    expected_kl = sum((r - 1) - math.log(r) for r in ratios) / 5
    torch.testing.assert_close(metrics["approx_kl"], torch.tensor(expected_kl))
    # d loss / d log pi = -A r / n where the unclipped term is taken, 0 where the clip is.
    loss.backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[0.0, -1.1, 0.0, 0.0, 1.5, -1.0, 0.0]]) / 5)


def test_clipped_value_loss_by_hand():
    values = torch.tensor([[0.0, 1.0, 1.5, 1.5, 0.2, 50.0]])
    old_values = torch.tensor([[0.0, 0.9, 1.0, 1.0, 1.0, 0.0]])
    returns = torch.tensor([[0.0, 1.5, 2.0, 1.0, 0.0, 0.0]])
    mask = spans_mask([(1, 5)], 6)
    loss, metrics = clipped_value_loss(values, old_values, returns, mask, cliprange_value=0.2)
    # V=1.0 (moved 0.1, inside): 0.25 | V=1.5 -> clip 1.2, R=2: max(0.25, 0.64) = 0.64, clipped
    # V=1.5 -> clip 1.2, R=1: max(0.25, 0.04) = 0.25 | V=0.2 -> clip 0.8, R=0: max(0.04, 0.64) = 0.64, clipped
    torch.testing.assert_close(loss, torch.tensor(0.5 * (0.25 + 0.64 + 0.25 + 0.64) / 4))
    torch.testing.assert_close(metrics["clipfrac"], torch.tensor(0.5))


def test_losses_divide_by_a_given_token_count():
    """Micro-batches add up to the mini-batch mean when each divides by the mini-batch's tokens."""
    g = torch.Generator().manual_seed(1)
    logprobs, old, adv = (torch.randn(4, 6, generator=g) * 0.3 for _ in range(3))
    mask = spans_mask([(1, 6), (2, 4), (3, 6), (1, 2)], 6)
    whole, _ = clipped_policy_loss(logprobs, old, adv, mask, 0.2)
    n = mask.sum()
    parts = sum(clipped_policy_loss(logprobs[i : i + 2], old[i : i + 2], adv[i : i + 2], mask[i : i + 2], 0.2, n)[0]
                for i in (0, 2))
    torch.testing.assert_close(parts, whole)


# --- statistics -----------------------------------------------------------------------------------


def test_whiten_uses_only_the_masked_values():
    x = torch.tensor([[100.0, 1.0, 2.0, 3.0], [-50.0, 4.0, 6.0, 7.0]])
    mask = spans_mask([(1, 4), (1, 3)], 4)
    chosen = torch.tensor([1.0, 2.0, 3.0, 4.0, 6.0])
    mean, std = chosen.mean(), chosen.std()  # unbiased, as whiten
    white = whiten(x, mask)
    expected = torch.zeros_like(x)
    expected[mask] = (chosen - mean) / std
    torch.testing.assert_close(white, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(masked_mean(white, mask), torch.tensor(0.0), atol=1e-6, rtol=0)
    kept = whiten(x, mask, shift_mean=False)
    torch.testing.assert_close(kept[mask], (chosen - mean) / std + mean, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="at least 2"):
        whiten(x, spans_mask([(1, 2), (0, 0)], 4))


def test_explained_variance():
    returns = torch.tensor([[0.0, 1.0, 2.0, 3.0, 9.0]])
    mask = spans_mask([(1, 4)], 5)
    assert explained_variance(returns, returns, mask) == 1.0
    assert explained_variance(torch.full_like(returns, 2.0), returns, mask).item() == pytest.approx(0.0)
    # residuals 1, -1, 1 (var 8/9) against returns 1, 2, 3 (var 2/3)
    values = returns + torch.tensor([[5.0, -1.0, 1.0, -1.0, 0.0]])
    assert explained_variance(values, returns, mask).item() == pytest.approx(1 - (8 / 9) / (2 / 3))
    assert math.isnan(explained_variance(returns, torch.ones_like(returns), mask).item())


def test_entropy_and_logprobs_against_a_direct_computation():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 4, 5, generator=g)
    ids = torch.randint(0, 5, (2, 4), generator=g)
    for temperature in (1.0, 0.7):
        entropy = token_entropy(logits, temperature)
        logprobs = token_logprobs(logits, ids, temperature)
        for b in range(2):
            assert entropy[b, 0] == 0 and logprobs[b, 0] == 0
            for t in range(1, 4):  # token t is drawn from the distribution at position t - 1
                z = [v / temperature for v in logits[b, t - 1].tolist()]
                total = sum(math.exp(v) for v in z)
                p = [math.exp(v) / total for v in z]
                assert entropy[b, t].item() == pytest.approx(-sum(q * math.log(q) for q in p), rel=1e-5)
                assert logprobs[b, t].item() == pytest.approx(math.log(p[ids[b, t]]), rel=1e-5)
    uniform = token_entropy(torch.zeros(1, 3, 8))
    torch.testing.assert_close(uniform, torch.tensor([[0.0, math.log(8), math.log(8)]]))


# --- KL controllers -------------------------------------------------------------------------------


def test_adaptive_kl_controller_by_hand():
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    ctl.update(9.0, n_steps=32)  # error 0.5, clipped to 0.2
    assert ctl.value == pytest.approx(0.2 * (1 + 0.2 * 32 / 10000))
    ctl.update(6.6, n_steps=100)  # error 0.1
    assert ctl.value == pytest.approx(0.2 * (1 + 0.2 * 32 / 10000) * (1 + 0.1 * 100 / 10000))
    ctl = AdaptiveKLController(0.1, target=2.0, horizon=100)
    ctl.update(0.0, n_steps=50)  # error -1, clipped to -0.2
    assert ctl.value == pytest.approx(0.1 * (1 - 0.2 * 50 / 100))
    fixed = FixedKLController(0.05)
    fixed.update(100.0, n_steps=1000)
    assert fixed.value == 0.05
    assert isinstance(kl_controller(PPOConfig(target_kl=0)), FixedKLController)
    assert isinstance(kl_controller(PPOConfig()), AdaptiveKLController)
    with pytest.raises(ValueError, match="target > 0"):
        AdaptiveKLController(0.1, target=0.0, horizon=10)


def test_config_checks_the_batch_sizes():
    with pytest.raises(ValidationError, match="must divide ppo.ppo_batch_size"):
        PPOConfig(ppo_batch_size=10, ppo_mini_batch_size=4)
    with pytest.raises(ValidationError, match="ppo_micro_batch_size"):
        PPOConfig(ppo_mini_batch_size=8, ppo_micro_batch_size=3)
    with pytest.raises(ValidationError, match="extra"):
        PPOConfig(ppo_lr=1.0)


# --- the critic -----------------------------------------------------------------------------------


def test_critic_is_a_separate_copy_and_reads_every_position():
    torch.manual_seed(0)
    policy = Transformer(tiny())
    model = PolicyWithValue.from_sft(policy)
    assert model.policy is policy
    policy_ids = {id(p) for p in policy.parameters()}
    assert not policy_ids & {id(p) for p in model.critic.parameters()}
    torch.testing.assert_close(model.critic.model.layers[0].mlp.up_proj.weight, policy.model.layers[0].mlp.up_proj.weight)
    ids = torch.randint(0, 32, (2, 7))
    values = token_values(model.critic, ids)
    assert values.shape == (2, 7) and values.dtype == torch.float32 and (values[:, 0] == 0).all()
    # V(x_<t) is the reward-model reading of the prefix x_<t at its last token.
    for t in (1, 4, 7):
        prefix_values = token_values(model.critic, torch.cat([ids[:, :t], ids[:, :1]], 1))
        torch.testing.assert_close(prefix_values[:, t], model.critic(ids[:, :t], lengths=torch.full((2,), t)).logits)
    torch.testing.assert_close(values[:, 1:], torch.stack([model.critic(ids[:, :t], lengths=torch.full((2,), t)).logits for t in range(1, 7)], 1))


def test_left_padding_gives_the_same_statistics():
    torch.manual_seed(0)
    model = PolicyWithValue.from_sft(Transformer(tiny()))
    reference = copy.deepcopy(model.policy)
    short, long = [3, 4, 5, 6], [7, 8, 9, 10, 11, 12]
    padded = torch.tensor([[0, 0] + short, long])
    attention = torch.tensor([[False, False] + [True] * 4, [True] * 6])
    logprobs, ref_logprobs, values = rollout_statistics(model, reference, padded, attention)
    alone = rollout_statistics(model, reference, torch.tensor([short]))
    for got, want in zip((logprobs, ref_logprobs, values), alone):
        torch.testing.assert_close(got[0, 3:], want[0, 1:], atol=1e-5, rtol=1e-4)
    assert rollout_statistics(model, None, padded, attention)[1] is None


def test_critic_from_the_reward_model_and_from_a_lora_policy(tmp_path, tokenizer):
    torch.manual_seed(0)
    cfg = tiny(vocab=tokenizer.vocab_size)
    policy = Transformer(cfg)
    reward_model = RewardModel(cfg)
    model = PolicyWithValue.from_sft(policy, reward_model)
    ids = torch.randint(0, cfg.vocab_size, (2, 5))
    whole = torch.full((2,), 5)
    torch.testing.assert_close(model.critic(ids, lengths=whole).logits, reward_model(ids, lengths=whole).logits)
    assert model.critic.score.weight is not reward_model.score.weight
    # The critic saves and loads as a reward model (an HF sequence-classification directory).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pad id warnings: not what this test is about
        save_reward_model(tmp_path / "value", model.critic, tokenizer, {"stage": "value"})
    loaded, _ = load_reward_model(tmp_path / "value")
    torch.testing.assert_close(token_values(loaded, ids), token_values(model.critic, ids))
    # A LoRA policy: the critic is a merged, fully trainable copy.
    apply_lora(policy, LoraSettings(r=4))
    with torch.no_grad():
        for module in lora_modules(policy).values():
            module.lora_B.weight.normal_(std=0.1)
    model = PolicyWithValue.from_sft(policy)
    assert not lora_modules(model.critic) and all(p.requires_grad for p in model.critic.parameters())
    # The merged copy's hidden states through the policy's head give the LoRA policy's logits.
    merged_logits = torch.nn.functional.linear(model.critic.body(ids)[0], policy.lm_head.weight)
    torch.testing.assert_close(merged_logits, policy(ids).logits, atol=1e-5, rtol=1e-4)
    with pytest.raises(SmolforgeError, match="vocabulary"):
        PolicyWithValue(Transformer(tiny(vocab=40)), model.critic)


def test_rollout_batch_check_refuses_bad_masks():
    ids = torch.zeros(2, 5, dtype=torch.long)
    zeros = torch.zeros(2, 5)

    def batch(mask: torch.Tensor, **changes) -> RolloutBatch:
        return RolloutBatch(**{"input_ids": ids, "completion_mask": mask, "old_logprobs": zeros, "old_values": zeros,
                               "advantages": zeros, "returns": zeros, **changes})

    batch(spans_mask([(1, 3), (2, 5)], 5)).check()
    gap = spans_mask([(1, 3), (2, 5)], 5)
    gap[0, 4] = True
    for bad in (gap, spans_mask([(0, 3), (2, 5)], 5), spans_mask([(1, 3), (0, 0)], 5)):
        with pytest.raises(ValueError, match="contiguous"):
            batch(bad).check()
    with pytest.raises(ValueError, match="returns has shape"):
        batch(spans_mask([(1, 3), (2, 5)], 5), returns=torch.zeros(2, 4)).check()


# --- updates --------------------------------------------------------------------------------------


def random_batch(model: PolicyWithValue, seed: int) -> RolloutBatch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.policy.config.vocab_size, (8, 9), generator=g)
    mask = spans_mask([(1 + i % 3, 9 - i % 2) for i in range(8)], 9)
    logprobs, _, values = rollout_statistics(model, None, ids)
    rewards = torch.randn(8, 9, generator=g) * mask
    advantages, returns = gae(rewards, values, mask, 1.0, 0.95)
    return RolloutBatch(ids, mask, logprobs, values, whiten(advantages, mask), returns)


def test_micro_batches_accumulate_to_the_mini_batch_step():
    torch.manual_seed(0)
    first = PolicyWithValue.from_sft(Transformer(tiny()))
    second, initial = copy.deepcopy(first), copy.deepcopy(first)
    batch = random_batch(first, 0)
    results = []
    for model, micro in ((first, 0), (second, 2)):
        cfg = PPOConfig(ppo_batch_size=8, ppo_mini_batch_size=4, ppo_micro_batch_size=micro, ppo_epochs=2,
                        ppo_lr_policy=1e-3, ppo_lr_value=1e-3)
        results.append(ppo_update(model, batch, cfg, *build_optimizers(model, cfg), torch.Generator().manual_seed(3)))
    for a, b in zip(first.parameters(), second.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert results[0].keys() == results[1].keys()
    for name in results[0]:
        assert results[0][name] == pytest.approx(results[1][name], rel=1e-4, abs=1e-6), name
    assert set(results[0]) >= {"policy_loss", "value_loss", "clipfrac", "value_clipfrac", "approx_kl",
                               "entropy", "explained_variance", "policy_grad_norm", "value_grad_norm"}
    for net in ("policy", "critic"):
        assert any(not torch.equal(a, b) for a, b in zip(getattr(first, net).parameters(),
                                                          getattr(initial, net).parameters())), net


def test_update_lowers_both_losses_and_the_first_step_is_unclipped():
    torch.manual_seed(1)
    model = PolicyWithValue.from_sft(Transformer(tiny()))
    batch = random_batch(model, 1)
    cfg = PPOConfig(ppo_batch_size=8, ppo_mini_batch_size=8, ppo_epochs=1, ppo_lr_policy=1e-3, ppo_lr_value=1e-3)
    optimizers = build_optimizers(model, cfg)
    first = ppo_update(model, batch, cfg, *optimizers)
    # On the rollout policy itself, the ratio is 1: nothing clipped, no KL yet.
    assert first["clipfrac"] == 0 and first["approx_kl"] == pytest.approx(0, abs=1e-6)
    assert first["value_clipfrac"] == 0
    cfg = cfg.model_copy(update={"ppo_epochs": 20})
    later = ppo_update(model, batch, cfg, *optimizers)
    assert later["policy_loss"] < first["policy_loss"] and later["value_loss"] < first["value_loss"]
    assert later["approx_kl"] > 0


# --- a tiny PPO run -------------------------------------------------------------------------------

TARGET = 5


def right_padded(prompts: list[list[int]], completions: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [p + c for p, c in zip(prompts, completions)]
    T = max(map(len, rows))
    ids = torch.tensor([r + [0] * (T - len(r)) for r in rows])
    return ids, spans_mask([(len(p), len(p) + len(c)) for p, c in zip(prompts, completions)], T)


def toy_ppo_run(init_kl_coef: float, target_kl: float, iterations: int = 8) -> tuple[list[float], list[float]]:
    """Toy task: reward 1 when the completion holds token TARGET. Rollouts come from the engine.
    Returns the mean reward and the mean sequence KL to the reference of each iteration's rollouts."""
    torch.manual_seed(0)
    policy = Transformer(tiny(vocab=16))
    reference = copy.deepcopy(policy).requires_grad_(False)
    model = PolicyWithValue.from_sft(policy)
    cfg = PPOConfig(ppo_batch_size=32, ppo_mini_batch_size=8, ppo_epochs=4, ppo_lr_policy=2e-3,
                    ppo_lr_value=2e-3, init_kl_coef=init_kl_coef, target_kl=target_kl, kl_horizon=1000)
    optimizers = build_optimizers(model, cfg)
    kl_ctl = kl_controller(cfg)
    engine = Engine(policy)
    prompts = [[1 + i % 7, 8 + i % 5, 2][: 2 + i % 2] for i in range(cfg.ppo_batch_size)]
    mean_rewards, mean_kls = [], []
    for iteration in range(iterations):
        completions = engine.generate(prompts, SamplingParams(max_new_tokens=5, seed=iteration))
        ids, mask = right_padded(prompts, [c.tokens for c in completions])
        scores = torch.tensor([float(TARGET in c.tokens) for c in completions])
        logprobs, ref_logprobs, values = rollout_statistics(model, reference, ids)
        rewards, _ = kl_penalised_rewards(logprobs, ref_logprobs, mask, scores, kl_ctl.value)
        advantages, returns = advantages_and_returns(rewards, values, mask, cfg)
        batch = RolloutBatch(ids, mask, logprobs, values, advantages, returns)
        metrics = ppo_update(model, batch, cfg, *optimizers, torch.Generator().manual_seed(iteration))
        assert all(math.isfinite(v) for v in metrics.values()), metrics
        kl = sequence_kl(logprobs, ref_logprobs, mask).mean().item()
        kl_ctl.update(kl, n_steps=len(ids))
        mean_rewards.append(scores.mean().item())
        mean_kls.append(kl)
    if isinstance(kl_ctl, AdaptiveKLController):  # KL above target all along: beta went up
        assert kl_ctl.value > init_kl_coef
    return mean_rewards, mean_kls


@pytest.fixture(scope="module")
def weak_kl_run() -> tuple[list[float], list[float]]:
    return toy_ppo_run(init_kl_coef=0.05, target_kl=0.5)


def test_tiny_ppo_run_raises_the_reward_with_bounded_kl(weak_kl_run):
    rewards, kls = weak_kl_run  # seen: rewards 0.12 -> 1.0, KL 0 -> 2.9 nats
    assert sum(rewards[-2:]) / 2 > sum(rewards[:2]) / 2 + 0.3
    assert kls[0] == pytest.approx(0.0, abs=1e-5)  # the first rollouts come from the reference itself
    assert max(kls) < 5.0


def test_a_strong_kl_penalty_keeps_the_policy_near_the_reference(weak_kl_run):
    _, weak_kls = weak_kl_run
    _, strong_kls = toy_ppo_run(init_kl_coef=1.0, target_kl=0.0)  # seen: KL stays under 0.8 nats
    assert max(strong_kls) < 1.0 < sum(weak_kls[-3:]) / 3
