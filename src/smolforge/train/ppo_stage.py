"""`smolforge ppo RECIPE`: the RLHF loop of Ziegler et al. 2019 / InstructGPT around `train.ppo`.

PPO does not fit the one training loop (`train.loop`): it trains two networks with two optimisers
and makes its own data. So this is a second small, visible loop, built from the same parts (the
one engine, `MetricsLog`, `TrainProgress`, `GracefulStop`, the checkpoint format):

    while iteration < ppo_iterations:
        prompts      <- the next ppo_batch_size prompts (a seeded order, reshuffled every epoch)
        completions  <- the ONE engine samples one completion per prompt from the live policy
        scores       <- the reward model (+ optional verifiable rewards), weighted
        logprobs, values, ref_logprobs <- rollout_statistics (pi_old, V_old) and the reference
        rewards      <- kl_penalised_rewards (-beta KL per token, + score at the last token)
        advantages   <- advantages_and_returns (GAE, whitened)
        ppo_update   -> ppo_epochs x mini-batches of clipped policy + value steps
        beta         <- the adaptive KL controller, from the rollouts' sequence KL
        log, save

Models: the policy is `run.init_from` (the SFT checkpoint); the reference is a frozen copy of it
(or `ppo.reference_model`), on the training device or the CPU; with LoRA only the adapters train
and the frozen base (adapters off) is the reference, so no copy is kept. The critic is a separate
network (`PolicyWithValue.from_sft`): the SFT body with a new head, or the reward model.

Outputs: `final/` is the policy as a normal checkpoint, `critic/` the value model as a reward
model directory (`save_reward_model`), `checkpoints/step_N/` hold the policy and, in their trainer
state, both optimisers, the critic, the KL coefficient, the RNG states and the prompt position.
Sampling and mini-batch orders are seeded by (run seed, iteration), so a resumed run continues
with the rollouts the uninterrupted one would have made.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from smolforge import __version__
from smolforge.chat.reasoning import prompt_opens_think
from smolforge.chat.render import end_of_turn_ids
from smolforge.config import PPORecipe, PPOStageConfig, save_recipe
from smolforge.data.rl import PromptOrder, RLPrompt, adapters_disabled, load_rl_prompts
from smolforge.errors import SmolforgeError
from smolforge.train import checkpoint as ckpt
from smolforge.train.loop import (
    MetricsLog,
    RunResult,
    load_tokenizer,
    resolve_device,
    rng_state,
    seed_everything,
    set_rng_state,
)
from smolforge.train.ppo import (
    PolicyWithValue,
    RolloutBatch,
    advantages_and_returns,
    build_optimizers,
    kl_controller,
    kl_penalised_rewards,
    ppo_update,
    rollout_statistics,
    sequence_kl,
    token_logprobs,
)
from smolforge.train.progress import TrainProgress
from smolforge.train.resilience import GracefulStop
from smolforge.train.rewards import Reply, RewardSet, build_rewards
from smolforge.train.trackers import Trackers


def seed_for(*parts: int) -> int:
    """A 32-bit seed from (run seed, iteration, purpose): the same on resume as in the whole run."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def reward_specs(cfg: PPOStageConfig, device: torch.device) -> list[dict[str, Any]]:
    """The reward model (weight `reward_model_weight`) followed by the verifiable rewards."""
    specs: list[dict[str, Any]] = []
    if cfg.reward_model:
        reward_device = str(device) if cfg.reward_device == "auto" else cfg.reward_device
        specs.append({"name": "reward_model", "weight": cfg.reward_model_weight, "path": cfg.reward_model,
                      "device": reward_device})
    return specs + [s.model_dump() for s in cfg.rewards]


def rollout_tensors(prompt_ids: list[list[int]], completions: list[list[int]], pad_id: int
                    ) -> tuple[Tensor, Tensor]:
    """Right-padded prompt + completion rows (B, T) and the completion mask (True at the completion
    tokens: the actions, `train.ppo`'s convention)."""
    lengths = [len(p) + len(c) for p, c in zip(prompt_ids, completions)]
    ids = torch.full((len(lengths), max(lengths)), pad_id, dtype=torch.long)
    mask = torch.zeros(ids.shape, dtype=torch.bool)
    for b, (p, c) in enumerate(zip(prompt_ids, completions)):
        ids[b, : lengths[b]] = torch.tensor([*p, *c], dtype=torch.long)
        mask[b, len(p) : lengths[b]] = True
    return ids, mask


@torch.no_grad()
def reference_logprobs(policy: torch.nn.Module, reference: torch.nn.Module | None, ids: Tensor,
                       temperature: float) -> Tensor:
    """log ref(x_t | x_<t) (B, T) on `ids`' device: the reference model wherever it lives, or the
    LoRA policy with its adapters off (the frozen base)."""
    if reference is None:
        with adapters_disabled(policy):
            return token_logprobs(policy(ids).logits, ids, temperature)
    ref_device = next(reference.parameters()).device
    return token_logprobs(reference(ids.to(ref_device)).logits, ids.to(ref_device), temperature).to(ids.device)


class PPOTrainer:
    """The models, optimisers, prompts and rewards of one PPO run; `run()` is the loop."""

    def __init__(self, recipe: PPORecipe, resume: bool = False) -> None:
        recipe.check_complete()
        self.recipe, self.cfg, self.tcfg = recipe, recipe.ppo, recipe.train
        self.run_dir = Path(recipe.run.dir) / recipe.run.name
        self.device = resolve_device(self.tcfg.device)
        torch.set_num_threads(self.tcfg.threads or os.cpu_count() or 1)
        self.resume_from = ckpt.find_resume_checkpoint(self.run_dir) if resume else None
        if not resume and any((self.run_dir / "checkpoints").glob("step_*")):
            raise SmolforgeError(f"run directory {self.run_dir} already holds checkpoints: pass --resume to "
                                 f"continue that run, or choose another --run.name")
        seed_everything(recipe.run.seed)
        self.tokenizer = load_tokenizer(recipe)  # type: ignore[arg-type]  (reads data.tokenizer / run.init_from)
        self.rewards: RewardSet = build_rewards(reward_specs(self.cfg, self.device),
                                                defaults={"max_len": self.cfg.max_new_tokens}, section="ppo.rewards")
        self.prompts, self.manifest = load_rl_prompts(recipe.data, self.tokenizer, self.rewards, self.cfg.max_new_tokens)
        self.order = PromptOrder(len(self.prompts), self.cfg.ppo_batch_size, recipe.run.seed)
        self._build_models()
        self.policy_optimizer, self.value_optimizer = build_optimizers(self.model, self.cfg)
        self.kl_ctl = kl_controller(self.cfg)
        self.use_bf16 = self.tcfg.precision == "bf16" or (self.tcfg.precision == "auto" and self.device.type == "cuda")
        self.pad_id = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else self.tokenizer.eos_id
        self.stop_ids = end_of_turn_ids(self.tokenizer)
        self.step = 0
        if self.resume_from is not None:
            self.restore(self.resume_from)

    def _build_models(self) -> None:
        from smolforge.engine import Engine
        from smolforge.train.lora import apply_lora
        from smolforge.train.reward import load_reward_model

        recipe, cfg = self.recipe, self.cfg
        policy, _ = ckpt.load_model(recipe.run.init_from, device=self.device, dtype=torch.float32)
        if recipe.data.seq_len > policy.config.max_seq_len:
            raise SmolforgeError(f"data.seq_len ({recipe.data.seq_len}) exceeds the model's context length "
                                 f"({policy.config.max_seq_len})")
        self.lora = recipe.lora if recipe.lora.r > 0 else None
        self.reference: torch.nn.Module | None = None
        if self.lora is not None:  # only the adapters train; the frozen base is the reference
            apply_lora(policy, self.lora)
        else:
            ref_device = self.device if cfg.reference_device == "auto" else torch.device(cfg.reference_device)
            self.reference, _ = ckpt.load_model(cfg.reference_model or recipe.run.init_from, device=ref_device)
            if self.reference.config.vocab_size != policy.config.vocab_size:
                raise SmolforgeError(f"ppo.reference_model has a vocabulary of {self.reference.config.vocab_size}, "
                                     f"the policy {policy.config.vocab_size}: the reference must share the tokenizer")
            self.reference.eval().requires_grad_(False)
        value_source = None
        if cfg.value_init == "reward_model":
            value_source, _ = load_reward_model(cfg.reward_model, device=self.device, dtype=torch.float32)
        self.model = PolicyWithValue.from_sft(policy, value_source)
        if self.model.critic.pad_id is None:
            self.model.critic.pad_id = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else self.tokenizer.eos_id
        self.policy = policy
        self.engine = Engine(policy, self.tokenizer)

    def autocast(self) -> Any:
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.use_bf16 else nullcontext()

    # -- one iteration ---------------------------------------------------------------------------

    def sample(self, prompt_ids: list[list[int]]) -> list[Any]:
        """One completion per prompt from the live policy (eval mode while sampling)."""
        from smolforge.engine import SamplingParams

        cfg = self.cfg
        chunk = cfg.generation_batch_size or len(prompt_ids)
        completions: list[Any] = []
        self.policy.eval()
        try:
            for start in range(0, len(prompt_ids), chunk):
                params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                                        top_k=cfg.top_k, stop_token_ids=self.stop_ids,
                                        seed=seed_for(self.recipe.run.seed, self.step, 0, start))
                completions += self.engine.generate(prompt_ids[start:start + chunk], params)
        finally:
            self.policy.train()
        return completions

    def statistics(self, ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """pi_old log-probs, reference log-probs and V_old (B, T), in chunks of a mini-batch and under
        the same autocast as the update (so that the first ratios are 1)."""
        rows = self.cfg.ppo_micro_batch_size or self.cfg.ppo_mini_batch_size
        parts: list[tuple[Tensor, Tensor, Tensor]] = []
        self.model.eval()
        for start in range(0, len(ids), rows):
            chunk = ids[start:start + rows]
            with self.autocast():
                logprobs, _, values = rollout_statistics(self.model, None, chunk, temperature=self.cfg.temperature)
                ref = reference_logprobs(self.policy, self.reference, chunk, self.cfg.temperature)
            parts.append((logprobs, ref, values))
        self.model.train()
        return tuple(torch.cat([p[i] for p in parts]) for i in range(3))  # type: ignore[return-value]

    def iteration(self) -> dict[str, float]:
        """Sample, score, compute advantages, update; returns the iteration's metrics."""
        cfg = self.cfg
        picked: list[RLPrompt] = [self.prompts[i] for i in self.order.next_batch()]
        prompt_ids = [p.ids for p in picked]
        start = time.perf_counter()
        completions = self.sample(prompt_ids)
        generated = time.perf_counter()
        replies = [Reply(c.text or "", tuple(c.tokens), c.finish_reason == "length", prompt_opens_think(p.text))
                   for p, c in zip(picked, completions)]
        totals, per_reward = self.rewards([p.text for p in picked], replies, [p.sample for p in picked])
        scored = time.perf_counter()
        scores = torch.tensor(totals, dtype=torch.float32)
        ids, mask = rollout_tensors(prompt_ids, [list(c.tokens) for c in completions], self.pad_id)
        ids, mask = ids.to(self.device), mask.to(self.device)
        logprobs, ref_logprobs, values = self.statistics(ids, mask)
        kl_coef = self.kl_ctl.value
        rewards, _ = kl_penalised_rewards(logprobs, ref_logprobs, mask, scores.to(self.device), kl_coef)
        advantages, returns = advantages_and_returns(rewards, values, mask, cfg)
        batch = RolloutBatch(ids, mask, logprobs, values, advantages, returns)
        generator = torch.Generator().manual_seed(seed_for(self.recipe.run.seed, self.step, 1))
        update = ppo_update(self.model, batch, cfg, self.policy_optimizer, self.value_optimizer, generator,
                                 torch.bfloat16 if self.use_bf16 else None)
        seq_kl = sequence_kl(logprobs, ref_logprobs, mask)
        self.kl_ctl.update(float(seq_kl.mean()), n_steps=len(ids))
        trained = time.perf_counter()
        lengths = [len(c.tokens) for c in completions]
        metrics = {"reward": float(scores.mean()), "reward_std": float(scores.std()) if len(scores) > 1 else 0.0,
                   "kl": float(seq_kl.mean()), "kl_coef": kl_coef,
                   # the KL part of the return each completion was trained on (Ziegler et al. 2019, eq. 2)
                   "non_score_reward": float(-kl_coef * seq_kl.mean()),
                   "loss": update["policy_loss"] + cfg.vf_coef * update["value_loss"], **update,
                   "completion/mean_length": sum(lengths) / len(lengths),
                   "completion/truncated": sum(r.truncated for r in replies) / len(replies),
                   "rollout/tokens_per_s": sum(lengths) / max(generated - start, 1e-9),
                   "time/generate_s": generated - start, "time/score_s": scored - generated,
                   "time/train_s": trained - scored}
        for label, values_ in per_reward.items():
            metrics[f"rewards/{label}"] = sum(values_) / len(values_)
        if "reward_model" in per_reward:  # the reward model's own score, before weights and KL
            metrics["score"] = metrics["rewards/reward_model"]
        return metrics

    # -- checkpoints -----------------------------------------------------------------------------

    def meta(self, metrics: dict[str, float]) -> dict[str, Any]:
        manifest = json.dumps(self.manifest, sort_keys=True).encode()
        return {"stage": "ppo", "parent": self.recipe.run.init_from, "recipe_hash": self.recipe.fingerprint(),
                "data_manifest_hash": hashlib.sha256(manifest).hexdigest(), "smolforge_version": __version__,
                "step": self.step, "metrics": metrics}

    def save(self, final: bool, metrics: dict[str, float]) -> Path:
        from smolforge.train.lora import adapter_state_dict, merged_copy, save_adapter
        from smolforge.train.reward import save_reward_model

        critic = self.model.critic
        state = {"step": self.step, "policy_optimizer": self.policy_optimizer.state_dict(),
                 "value_optimizer": self.value_optimizer.state_dict(),
                 "critic": {k: v.detach().cpu().clone() for k, v in critic.state_dict().items()},
                 "kl_coef": self.kl_ctl.value, "order": self.order.state_dict(), "prompts": len(self.prompts),
                 "rng": rng_state()}
        weights: torch.nn.Module = self.policy
        info = self.meta(metrics)
        if self.lora is not None:  # checkpoints hold the merged policy; the adapters go in the state
            state["lora"] = {k: v.detach().cpu().clone() for k, v in adapter_state_dict(self.policy).items()}
            weights = merged_copy(self.policy)
            info["lora"] = self.lora.model_dump()
        path = ckpt.save_run_checkpoint(self.run_dir, self.step, weights, self.tokenizer, meta=info,
                                        trainer_state=state, keep_last=self.tcfg.keep_last)
        if final:
            ckpt.save_checkpoint(self.run_dir / "final", weights, self.tokenizer, meta=info)  # type: ignore[arg-type]
            save_reward_model(self.run_dir / "critic", critic, self.tokenizer,
                              meta={**info, "stage": "ppo-critic"})
            if self.lora is not None:
                save_adapter(self.run_dir / "adapter", self.policy, self.lora, self.recipe.run.init_from)
        return path

    def restore(self, path: Path) -> None:
        """Policy, critic, both optimisers, KL coefficient, prompt position, RNG and step from `path`."""
        from smolforge.train.lora import adapter_state_dict

        state = ckpt.load_trainer_state(path)
        if state.get("prompts") != len(self.prompts):
            raise SmolforgeError(f"{path} was saved for {state.get('prompts')} prompts, the recipe's data has "
                                 f"{len(self.prompts)}: resume with the same data.train")
        with torch.no_grad():
            if self.lora is not None:
                for key, param in adapter_state_dict(self.policy).items():
                    param.copy_(state["lora"][key])
            else:
                saved, _ = ckpt.load_model(path, device=self.device, dtype=torch.float32, verify=False)
                self.policy.load_state_dict(saved.state_dict())
            self.model.critic.load_state_dict(state["critic"])
        self.policy_optimizer.load_state_dict(state["policy_optimizer"])
        self.value_optimizer.load_state_dict(state["value_optimizer"])
        self.kl_ctl.value = state["kl_coef"]
        self.order.load_state_dict(state["order"])
        set_rng_state(state["rng"])
        self.step = state["step"]

    # -- the loop --------------------------------------------------------------------------------

    def run(self) -> RunResult:
        started = time.time()
        recipe, cfg, tcfg = self.recipe, self.cfg, self.tcfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        save_recipe(recipe, self.run_dir / "recipe.yaml")
        trackers = Trackers(tcfg.report_to, self.run_dir, recipe.run.name, recipe.model_dump())
        log = MetricsLog(self.run_dir / "metrics.jsonl", self.step if self.resume_from else None, trackers)
        print(f"ppo: {cfg.ppo_iterations} iterations of {cfg.ppo_batch_size} rollouts x {cfg.ppo_epochs} epochs "
              f"on {self.device}; rewards: {' + '.join(f'{b.weight:g} x {b.label}' for b in self.rewards.rewards)}"
              f" -> {self.run_dir}" + (f" (resuming from {self.resume_from.name})" if self.resume_from else ""))
        window: list[dict[str, float]] = []
        last: dict[str, float] = {}
        interrupted = False
        with TrainProgress(total=cfg.ppo_iterations, start=self.step) as progress, GracefulStop() as stop:
            while self.step < cfg.ppo_iterations:
                window.append(self.iteration())
                self.step += 1
                final = self.step == cfg.ppo_iterations
                if self.step % tcfg.log_every == 0 or final or stop.requested:
                    last = {k: sum(w[k] for w in window) / len(window) for k in window[-1]}
                    log.write({"step": self.step, **last, "epochs/prompts": self.order.epochs_done(),
                               "elapsed_s": time.time() - started})
                    progress.update(self.step, loss=last["loss"], lr=cfg.ppo_lr_policy,
                                    tokens_per_s=last["rollout/tokens_per_s"])
                    progress.note(f"iteration {self.step}: reward {last['reward']:.3f}  kl {last['kl']:.3f}  "
                                  f"kl_coef {last['kl_coef']:.3f}")
                    window = []
                if final:
                    self.save(final=True, metrics=last)
                    break
                if stop.requested:  # SIGTERM / SIGINT: this iteration is done; keep it and leave
                    self.save(final=False, metrics=last)
                    log.write({"step": self.step, "event": "stopped", "signal": stop.requested})
                    interrupted = True
                    break
                if tcfg.save_every and self.step % tcfg.save_every == 0:
                    self.save(final=False, metrics=last)
        if not interrupted and not (self.run_dir / "final").is_dir():  # resumed a run that had already finished
            self.save(final=True, metrics=last)
        log.close()
        return RunResult(run_dir=self.run_dir, final_checkpoint=self.run_dir / "final", steps=self.step,
                         metrics=last, wall_seconds=time.time() - started, interrupted=interrupted,
                         stop_signal=stop.requested)


def train_ppo(recipe: PPORecipe, resume: bool = False, stage: str = "ppo") -> RunResult:
    """Run `smolforge ppo` on `recipe` (see the module docstring); returns where the policy went."""
    return PPOTrainer(recipe, resume).run()
