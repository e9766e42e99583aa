"""`smolforge quickstart`: the whole pipeline on bundled data, on a laptop CPU, in minutes.

1. tokenizer: a byte-level BPE trained on the tinyshakespeare training split and on the text of
   the SFT conversations (so chat markup, digits and the task words have tokens of their own);
2. data: the text into shards (validation = the last 10% of the characters, nanoGPT's convention);
3. pretrain: the `smol-3m` preset on Shakespeare; validation bits per byte and a sample;
4. SFT: smol tasks (`data synth`: addition with column traces, letter counting, format
   constraints, personas), half in `/think` mode with reasoning, half `/no_think`, rendered with
   the smollm3 hybrid-reasoning template;
5. evaluation: greedy replies to held-out tasks, accuracy per task and mode, and how often the
   reply follows the mode; everything goes to `runs/quickstart/report.md`.
Later stages (preference optimisation, RL) are added to this same command.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from importlib import resources
from pathlib import Path
from typing import Any

from smolforge.errors import SmolforgeError

SAMPLE_PROMPT = "ROMEO:\n"
# The SFT stage's tasks: ones a ~3M-parameter model can pick up within the 3-minute CPU budget.
SFT_TASKS = "addition,count,format,persona"


def bundled_text() -> str:
    return resources.files("smolforge.assets").joinpath("tinyshakespeare.txt").read_text(encoding="utf-8")


def bundled_recipe(name: str = "quickstart.yaml") -> Path:
    return Path(str(resources.files("smolforge.recipes").joinpath(name)))


def prepare_text(data_dir: Path, val_fraction: float = 0.1) -> tuple[Path, Path]:
    """Split the bundled text by characters: first 90% train, last 10% validation."""
    text = bundled_text()
    cut = int(len(text) * (1 - val_fraction))
    data_dir.mkdir(parents=True, exist_ok=True)
    train_txt, val_txt = data_dir / "train.txt", data_dir / "val.txt"
    train_txt.write_text(text[:cut], encoding="utf-8")
    val_txt.write_text(text[cut:], encoding="utf-8")
    return train_txt, val_txt


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "quickstart", help="Run the whole pipeline on bundled data (CPU, minutes).",
        description="Train a tokenizer, pretrain smol-3m on tinyshakespeare, report validation "
                    "bits per byte, print a sample, and write runs/quickstart/report.md.",
    )
    parser.add_argument("--dir", default="runs", help="Parent directory of the run directory.")
    parser.add_argument("--name", default="quickstart", help="Run name (directory under --dir).")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing run of the same name.")
    parser.add_argument("--vocab-size", type=int, default=2048, help="Tokenizer vocabulary (a multiple of 128).")
    parser.add_argument("--max-steps", type=int, default=None, help="Override the recipe's training steps.")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda.")
    parser.add_argument("--sample-tokens", type=int, default=200, help="Tokens to sample after pretraining.")
    parser.add_argument("--sft-examples", type=int, default=12000, help="Synthetic SFT conversations to train on.")
    parser.add_argument("--sft-max-steps", type=int, default=None, help="Cap the SFT stage's steps (default: one epoch).")
    parser.add_argument("--eval-examples", type=int, default=240, help="Held-out tasks to evaluate after SFT.")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from smolforge.chat.render import load_template, render_messages
    from smolforge.config import SFTRecipe, load_recipe
    from smolforge.data.shards import tokenize_corpus
    from smolforge.data.synth import generate, write_jsonl
    from smolforge.engine import Engine, SamplingParams
    from smolforge.eval.smol_tasks import evaluate_smol_tasks
    from smolforge.lab.report import write_run_report
    from smolforge.tokenizer import train_tokenizer
    from smolforge.train.checkpoint import load_model
    from smolforge.train.loop import train

    started = time.time()
    run_dir = Path(args.dir) / args.name
    if run_dir.exists():
        if not args.overwrite:
            raise SmolforgeError(f"{run_dir} already exists: pass --overwrite to replace it, "
                                 f"or --name to write a new run beside it")
        shutil.rmtree(run_dir)
    overrides = {"run.dir": args.dir, "run.name": args.name, "train.device": args.device}
    if args.max_steps is not None:
        overrides["train.max_steps"] = args.max_steps
        overrides["train.warmup_steps"] = min(args.max_steps, 30)
    data_dir = run_dir / "data"
    template = load_template("smollm3")
    sft_train, held_out = sft_tasks(args.sft_examples, args.eval_examples, generate)
    write_jsonl(sft_train, data_dir / "sft-train.jsonl")

    print("[1/5] tokenizer: training a byte-level BPE on tinyshakespeare (train split) + the SFT tasks")
    train_txt, val_txt = prepare_text(data_dir)
    chat_txt = data_dir / "sft-text.txt"
    chat_txt.write_text("\n".join(render_messages(template, s["messages"], **s["chat_template_kwargs"])
                                   for s in sft_train), encoding="utf-8")
    tokenizer = train_tokenizer([train_txt, chat_txt], vocab_size=args.vocab_size)
    tokenizer.save(run_dir / "tokenizer")

    print("[2/5] data: tokenizing into shards")
    tokenize_corpus([train_txt], run_dir / "tokenizer", data_dir / "train", workers=1, progress=False)
    tokenize_corpus([val_txt], run_dir / "tokenizer", data_dir / "val", workers=1, progress=False)
    overrides.update({"data.tokenizer": str(run_dir / "tokenizer"),
                      "data.train": [{"path": str(data_dir / "train"), "name": "tinyshakespeare"}],
                      "data.val": [{"path": str(data_dir / "val"), "name": "tinyshakespeare-val"}]})

    print("[3/5] pretrain: smol-3m" + ("" if args.max_steps else " (about 5 minutes on 2 CPU cores)"))
    result = train(load_recipe(bundled_recipe(), overrides))
    model, tok = load_model(result.final_checkpoint)
    params = SamplingParams(max_new_tokens=args.sample_tokens, temperature=0.8, top_k=50, seed=0)
    sample = SAMPLE_PROMPT + Engine(model, tok).generate_text([SAMPLE_PROMPT], params)[0].text
    bpb = result.metrics.get("val_bpb", float("nan"))
    print(f"\nvalidation bits per byte: {bpb:.3f}\nsample:\n{sample}\n")

    print("[4/5] sft: smol tasks with /think and /no_think" + ("" if args.sft_max_steps else
                                                              " (about 3 minutes on 2 CPU cores)"))
    sft_overrides = {"run.dir": str(run_dir), "run.init_from": str(result.final_checkpoint),
                     "train.device": args.device,
                     "data.train": [{"path": str(data_dir / "sft-train.jsonl"), "name": "smol-tasks"}]}
    if args.sft_max_steps is not None:
        sft_overrides.update({"train.epochs": 0, "train.max_steps": args.sft_max_steps,
                              "train.warmup_steps": min(args.sft_max_steps, 10)})
    sft = train(load_recipe(bundled_recipe("quickstart-sft.yaml"), sft_overrides, SFTRecipe), stage="sft")

    print("[5/5] evaluation: held-out smol tasks, greedy, per reasoning mode")
    sft_model, sft_tok = load_model(sft.final_checkpoint)
    report = evaluate_smol_tasks(Engine(sft_model, sft_tok), sft_tok.chat_template, held_out)
    think, no_think = report.total("think"), report.total("no_think")
    print(report.table())
    total = time.time() - started
    examples = "\n\n".join(f"- {e['task']}, {e['mode']}: `{e['prompt']}`\n\n  ```text\n  "
                            + e["reply"].replace("\n", "\n  ") + "\n  ```" for e in report.examples)
    write_run_report(run_dir, {
        "Validation": f"bits per byte on the last 10% of tinyshakespeare: **{bpb:.3f}** "
                      f"(nanoGPT's CPU character-level recipe reaches 2.72 on this split).",
        "Sample": f"Prompt `ROMEO:`, temperature 0.8, top-k 50:\n\n```text\n{sample}\n```",
        "SFT on smol tasks": (
            f"{sft.steps} steps on {len(sft_train):,} synthetic conversations ({SFT_TASKS}), "
            f"{sft.wall_seconds:.0f} s; see `sft/report.md` for its loss curve. Greedy replies to "
            f"{len(held_out)} held-out tasks whose prompts the SFT data does not contain:\n\n"
            f"{report.table()}\n\n/think accuracy {100 * think.accuracy:.0f}% vs /no_think "
            f"{100 * no_think.accuracy:.0f}%; the reply follows its mode in "
            f"{100 * report.honour_rate():.0f}% of cases.\n\nA few replies:\n\n{examples}"),
        "Time": f"{total:.0f} s for the whole quickstart ({result.wall_seconds:.0f} s pretraining, "
                f"{sft.wall_seconds:.0f} s SFT).",
    })
    write_run_report(sft.run_dir)
    print(f"/think accuracy {100 * think.accuracy:.0f}%, /no_think {100 * no_think.accuracy:.0f}%, "
          f"mode honoured {100 * report.honour_rate():.0f}%")
    print(f"done in {total:.0f}s: report {run_dir / 'report.md'}, models {result.final_checkpoint} "
          f"(pretrained) and {sft.final_checkpoint} (SFT)")
    return 0


def sft_tasks(n_train: int, n_eval: int, generate: Any) -> tuple[list[dict], list[dict]]:
    """Training conversations and held-out ones whose prompts the training set does not hold."""
    train_set = generate(SFT_TASKS, n_train, seed=0)
    seen = {json.dumps(s["messages"][:-1], sort_keys=True) for s in train_set}
    candidates = generate(SFT_TASKS, 4 * n_eval, seed=1)
    held_out = [s for s in candidates if json.dumps(s["messages"][:-1], sort_keys=True) not in seen]
    return train_set, held_out[:n_eval]
