"""`smolforge pretrain | sft | dpo | reward | grpo | ppo RECIPE`: one recipe schema per stage.

The stages differ only in their recipe schema (data section and defaults) and thereby in their
data and objective (DESIGN.md principle 1); `register` builds every command from `STAGES`. All run
the one training loop except PPO, whose two networks and optimisers have their own small loop
(`TRAINERS`, `smolforge.train.ppo_stage`).
"""

from __future__ import annotations

import argparse
import os
import sys

from smolforge.config import (
    DPORecipe,
    GRPORecipe,
    PPORecipe,
    PretrainRecipe,
    RewardRecipe,
    SFTRecipe,
    add_recipe_arguments,
    collect_overrides,
    load_recipe,
)

STAGES = {
    "pretrain": (PretrainRecipe, "Pretrain (or continue pretraining) a model from a YAML recipe.",
                 "Pretrain a model on tokenized shards. Any recipe field can be overridden, "
                 "e.g. `smolforge pretrain recipes/quickstart.yaml --train.lr 3e-3`."),
    "sft": (SFTRecipe, "Supervised fine-tuning on conversations (assistant-only loss).",
            "Fine-tune a checkpoint (smolforge, Hugging Face directory or Hub id: --run.init_from) on "
            "chat data rendered with a chat template; only assistant tokens are trained. Defaults "
            "follow the playbook for pretrained bases (lr 1e-5, effective batch 128, 1 epoch). "
            "Example: `smolforge sft --run.init_from runs/quickstart/final --data.train "
            "'[{path: sft.jsonl}]'`."),
    "dpo": (DPORecipe, "Preference optimisation on prompt/chosen/rejected pairs (DPO, APO, IPO, SimPO, ORPO, ...).",
            "Train on preference pairs with the loss named by --train.objective (dpo, robust, ipo, hinge, "
            "apo_zero, apo_down, simpo, orpo). Reference log-probs come from run.init_from (or "
            "data.reference_model) and are cached in the run. Defaults follow the playbook: lr 1e-6, "
            "beta 0.1, one epoch."),
    "reward": (RewardRecipe, "Train a reward model (Bradley-Terry) on prompt/chosen/rejected pairs.",
               "Put a scalar head on a checkpoint (run.init_from, usually the SFT model) and train it so "
               "that chosen responses score above rejected ones; reports pairwise accuracy on held-out "
               "pairs. The result loads in transformers as a *ForSequenceClassification model and "
               "scores JSONL with `smolforge score`."),
    "grpo": (GRPORecipe, "Online RL with verifiable rewards: GRPO (DeepSeekMath; DAPO, Dr. GRPO variants).",
             "Sample grpo.group_size completions per prompt with the policy itself, score them with the "
             "rewards of grpo.rewards (smol-task checkers, GSM8K answers, IFEval instructions, format, "
             "length and DAPO overlong penalties, a reward model), and train on group-normalised "
             "advantages with the clipped ratio objective (train.loss_type grpo, dr_grpo or dapo; "
             "train.beta > 0 adds a k3 KL to the reference). Example: `smolforge grpo "
             "recipes/quickstart-grpo.yaml --run.init_from runs/quickstart/sft/final --data.train "
             "'[{path: prompts.jsonl}]'`; see docs/rl.md."),
    "ppo": (PPORecipe, "Online RLHF with PPO: a reward model's scores, a KL penalty, a critic (InstructGPT, Mini-LLM).",
            "Sample one completion per prompt with the policy (run.init_from, the SFT model), score it with "
            "the reward model of ppo.reward_model (and the verifiable rewards of ppo.rewards), subtract a "
            "per-token KL penalty to the frozen start policy (adaptive beta), estimate advantages with GAE "
            "and a separate critic, and run ppo.ppo_epochs of clipped policy and value steps. Settings use "
            "Mini-LLM's names (ppo_lr_policy, ppo_lr_value, ppo_batch_size, ppo_mini_batch_size, "
            "ppo_epochs). Writes final/ (the policy) and critic/. See docs/rl.md; `smolforge rlhf` runs "
            "SFT, reward model and PPO in one go."),
}

# Stages with their own loop: module:function taking (recipe, resume=, stage=) -> RunResult.
TRAINERS = {"ppo": "smolforge.train.ppo_stage:train_ppo"}


def trainer_for(stage: str):
    """The training function of `stage`: the one loop, or the stage's own (TRAINERS)."""
    import importlib

    if stage not in TRAINERS:
        from smolforge.train.loop import train

        return train
    module, name = TRAINERS[stage].split(":")
    return getattr(importlib.import_module(module), name)


def register(subparsers: argparse._SubParsersAction) -> None:
    for name, (schema, help_text, description) in STAGES.items():
        parser = subparsers.add_parser(name, help=help_text, description=description)
        parser.add_argument("recipe", nargs="?", help="YAML recipe (see recipes/); omit to use only flags.")
        parser.add_argument("--resume", action="store_true",
                            help="Continue the run in <run.dir>/<run.name> from its newest good checkpoint.")
        parser.add_argument("--auto-restart", type=int, default=0, metavar="N",
                            help="Run under a supervisor that relaunches a crashed run with --resume, up to "
                                 "N times (0 = off).")
        add_recipe_arguments(parser, schema)
        parser.set_defaults(func=run, stage=name)


def run(args: argparse.Namespace) -> int:
    from smolforge.lab.report import write_run_report
    from smolforge.train.resilience import supervise, without_auto_restart

    schema = STAGES[args.stage][0]
    recipe = load_recipe(args.recipe, collect_overrides(args), schema)  # fail fast, before any child
    if args.auto_restart > 0:
        return supervise([sys.executable, "-m", "smolforge.cli", *without_auto_restart(sys.argv[1:])],
                         args.auto_restart)
    result = trainer_for(args.stage)(recipe, resume=args.resume, stage=args.stage)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 reports for the run
        return 0
    if result.interrupted:
        again = " ".join(["smolforge", *without_auto_restart(sys.argv[1:])])
        print(f"stopped by {result.stop_signal} after step {result.steps}; a checkpoint is saved. "
              f"Continue with:\n  {again if '--resume' in again else again + ' --resume'}")
        return 0
    write_run_report(result.run_dir)
    print(f"final model: {result.final_checkpoint}  ({result.steps} steps, {result.wall_seconds:.0f}s)")
    for key, value in result.metrics.items():
        print(f"  {key}: {value:.4f}")
    return 0
