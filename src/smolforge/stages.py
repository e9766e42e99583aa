"""`smolforge pretrain RECIPE` and `smolforge sft RECIPE`: the one training loop, two recipes.

The stages differ only in their recipe schema (data section and defaults) and thereby in their
data and objective (DESIGN.md principle 1); both commands are built by `_add_stage`.
"""

from __future__ import annotations

import argparse

from smolforge.config import (
    PretrainRecipe,
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
}


def register(subparsers: argparse._SubParsersAction) -> None:
    for name, (schema, help_text, description) in STAGES.items():
        parser = subparsers.add_parser(name, help=help_text, description=description)
        parser.add_argument("recipe", nargs="?", help="YAML recipe (see recipes/); omit to use only flags.")
        parser.add_argument("--resume", action="store_true",
                            help="Continue the run in <run.dir>/<run.name> from its newest good checkpoint.")
        add_recipe_arguments(parser, schema)
        parser.set_defaults(func=run, stage=name)


def run(args: argparse.Namespace) -> int:
    from smolforge.lab.report import write_run_report
    from smolforge.train.loop import train

    schema = STAGES[args.stage][0]
    recipe = load_recipe(args.recipe, collect_overrides(args), schema)
    result = train(recipe, resume=args.resume, stage=args.stage)
    write_run_report(result.run_dir)
    print(f"final model: {result.final_checkpoint}  ({result.steps} steps, {result.wall_seconds:.0f}s)")
    for key, value in result.metrics.items():
        print(f"  {key}: {value:.4f}")
    return 0
