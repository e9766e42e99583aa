"""`smolforge rlhf RECIPE`: the Mini-LLM RLHF pipeline in one command — SFT, reward model, PPO.

The recipe (`config.RLHFRecipe`) holds one section per stage in that stage's own schema; the
chain between them is filled in (reward and PPO start from `sft/final`, PPO scores with
`reward_model/final`). The run directory then holds, as in Mini-LLM's RLHF guide:

    <run.dir>/<run.name>/
      sft/            the SFT stage's run (final/ = the SFT model)
      reward_model/   the reward stage's run (final/ = the reward model)
      ppo/            the PPO stage's run (final/ = the policy, critic/ = the value model)
      logs/           each stage's metrics.jsonl as <folder>.jsonl, and pipeline.jsonl (stage events)

A stage whose `final/` exists is skipped; one that stopped half-way (it holds checkpoints) is
continued with `--resume`, which passes through to that stage. Each stage is the ordinary
command (`smolforge sft`, `reward`, `ppo`), so its outputs, reports and resume are theirs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from smolforge.config import RLHF_STAGES, RLHFRecipe, collect_overrides, load_recipe, save_recipe
from smolforge.errors import SmolforgeError

TRAIN_STAGE = {"sft": "sft", "reward": "reward", "ppo": "ppo"}  # section -> stage name (trainer, metadata)


def _log_event(logs: Path, stage: str, event: str, **extra: Any) -> None:
    with (logs / "pipeline.jsonl").open("a", encoding="utf-8") as file:
        file.write(json.dumps({"time": time.time(), "stage": stage, "event": event, **extra}) + "\n")


def run_rlhf(recipe: RLHFRecipe, resume: bool = False) -> dict[str, Path]:
    """Run the stages in order; returns each finished stage's final/ directory. A stage stopped by
    a signal ends the pipeline early (its checkpoint is saved; run again with --resume)."""
    from smolforge.lab.report import write_run_report
    from smolforge.stages import trainer_for

    root = Path(recipe.run.dir) / recipe.run.name
    logs = root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    save_recipe(recipe, root / "recipe.yaml")
    finals: dict[str, Path] = {}
    for section, (_, folder) in RLHF_STAGES.items():
        stage_dir, stage_recipe = root / folder, getattr(recipe, section)
        if (stage_dir / "final").is_dir():
            print(f"{section}: skipped, {stage_dir / 'final'} exists")
            _log_event(logs, section, "skipped")
            finals[section] = stage_dir / "final"
            continue
        unfinished = any((stage_dir / "checkpoints").glob("step_*"))
        if unfinished and not resume:
            raise SmolforgeError(f"{stage_dir} holds an unfinished {section} stage: pass --resume to continue it, "
                                 f"or remove that directory to start the stage again")
        print(f"{section}: {'resuming' if unfinished else 'starting'} -> {stage_dir}")
        _log_event(logs, section, "resumed" if unfinished else "started")
        result = trainer_for(TRAIN_STAGE[section])(stage_recipe, resume=unfinished, stage=TRAIN_STAGE[section])
        if (stage_dir / "metrics.jsonl").is_file():
            shutil.copyfile(stage_dir / "metrics.jsonl", logs / f"{folder}.jsonl")
        if result.interrupted:
            _log_event(logs, section, "stopped", signal=result.stop_signal, step=result.steps)
            print(f"{section}: stopped by {result.stop_signal} after step {result.steps}; continue with --resume")
            return finals
        write_run_report(stage_dir)
        _log_event(logs, section, "finished", step=result.steps, metrics=result.metrics)
        finals[section] = result.final_checkpoint
    return finals


def _add_nested_arguments(parser: argparse.ArgumentParser) -> None:
    """`--run.FIELD` and `--STAGE.SECTION.FIELD` for every field of the three stage schemas."""
    group = parser.add_argument_group("run (recipe section)", RLHFRecipe.model_fields["run"].annotation.__doc__)
    for name, field in RLHFRecipe.model_fields["run"].annotation.model_fields.items():
        group.add_argument(f"--run.{name}", dest=f"override:run.{name}", default=argparse.SUPPRESS, metavar="VALUE",
                           help=(field.description or "").replace("%", "%%"))
    for stage, (schema, folder) in RLHF_STAGES.items():
        group = parser.add_argument_group(f"{stage} (the {folder}/ stage, in the `smolforge {TRAIN_STAGE[stage]}` schema)")
        for section, info in schema.model_fields.items():
            section_type = info.annotation
            if not (isinstance(section_type, type) and issubclass(section_type, BaseModel)):
                continue
            for name in section_type.model_fields:
                dotted = f"{stage}.{section}.{name}"
                group.add_argument(f"--{dotted}", dest=f"override:{dotted}", default=argparse.SUPPRESS,
                                   metavar="VALUE", help=argparse.SUPPRESS)
    parser.epilog = ("Any field of a stage can be overridden as --STAGE.SECTION.FIELD, e.g. --sft.train.lr 3e-4 "
                     "or --ppo.ppo.ppo_iterations 50 (see `smolforge sft|reward|ppo --help` for the fields).")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "rlhf", help="The RLHF pipeline in one command: SFT, reward model, PPO (Mini-LLM).",
        description="Run SFT, then a reward model on preference pairs, then PPO against it, from one recipe with "
                    "sections sft, reward and ppo (each in its stage's schema). Writes sft/, reward_model/, ppo/ "
                    "and logs/ under <run.dir>/<run.name>; a stage whose final/ exists is skipped, an unfinished "
                    "one continues with --resume. Example: `smolforge rlhf recipes/quickstart-rlhf.yaml`.")
    parser.add_argument("recipe", nargs="?", help="YAML recipe with sections run, sft, reward, ppo.")
    parser.add_argument("--resume", action="store_true", help="Continue an unfinished stage from its newest checkpoint.")
    _add_nested_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe, collect_overrides(args), RLHFRecipe)
    finals = run_rlhf(recipe, resume=args.resume)
    if len(finals) < len(RLHF_STAGES):
        print("continue with:\n  " + " ".join(["smolforge", *sys.argv[1:]])
              + ("" if "--resume" in sys.argv else " --resume"))
        return 0
    print("rlhf: " + ", ".join(f"{stage} -> {path}" for stage, path in finals.items()))
    return 0
