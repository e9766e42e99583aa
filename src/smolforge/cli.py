"""`smolforge <command>`: the dispatcher only.

Each command lives in the module that implements it and adds itself through
`register(subparsers)`; this file builds the parser, runs the chosen handler and turns
`SmolforgeError` into a one-paragraph message and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from smolforge import __version__
from smolforge.errors import SmolforgeError

# Order = order in `smolforge --help`.
COMMAND_MODULES = [
    "smolforge.quickstart",
    "smolforge.tokenizer",
    "smolforge.data.shards",
    "smolforge.stages",
    "smolforge.train.rlhf",
    "smolforge.train.fsdp",
    "smolforge.data.pairs",
    "smolforge.train.reward",
    "smolforge.engine",
    "smolforge.eval.runner",
    "smolforge.eval.decontaminate",
    "smolforge.chat.cli",
    "smolforge.chat.terminal",
    "smolforge.serve.cli",
    "smolforge.interop.export",
    "smolforge.interop.inspect",
    "smolforge.train.lora",
    "smolforge.lab.merge",
    "smolforge.lab.plan",
    "smolforge.lab.report",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="smolforge",
        description="Train small language models end to end: tokenizer, pretraining, SFT, "
                    "preference optimisation, reward models, LoRA, merging, generation, evaluation, "
                    "online RL (GRPO, PPO and the SFT → reward model → PPO pipeline `rlhf`), "
                    "chat, an OpenAI-compatible server and export.",
    )
    parser.add_argument("--version", action="version", version=f"smolforge {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        result = args.func(args)
    except SmolforgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
