"""`smolforge pretrain RECIPE`: run the training loop with the `lm` objective."""

from __future__ import annotations

import argparse

from smolforge.config import PretrainRecipe, add_recipe_arguments, collect_overrides, load_recipe


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "pretrain", help="Pretrain (or continue pretraining) a model from a YAML recipe.",
        description="Pretrain a model on tokenized shards. Any recipe field can be overridden, "
                    "e.g. `smolforge pretrain recipes/quickstart.yaml --train.lr 3e-3`.",
    )
    parser.add_argument("recipe", nargs="?", help="YAML recipe (see recipes/); omit to use only flags.")
    parser.add_argument("--resume", action="store_true",
                        help="Continue the run in <run.dir>/<run.name> from its newest good checkpoint.")
    add_recipe_arguments(parser, PretrainRecipe)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from smolforge.lab.report import write_run_report
    from smolforge.train.loop import train

    recipe = load_recipe(args.recipe, collect_overrides(args), PretrainRecipe)
    result = train(recipe, resume=args.resume)
    write_run_report(result.run_dir)
    print(f"final model: {result.final_checkpoint}  ({result.steps} steps, {result.wall_seconds:.0f}s)")
    for key, value in result.metrics.items():
        print(f"  {key}: {value:.4f}")
    return 0
