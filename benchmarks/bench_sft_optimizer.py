"""SFT optimizer comparison on addition traces: AdamW vs Muon from the quickstart's pretrained base.

The quickstart's SFT stage (recipes/quickstart-sft.yaml) asks a Shakespeare-pretrained smol-3m to
write column-addition traces, which copy the operand digits from the prompt. Each optimizer runs
the real SFT entry point (`load_recipe` on the bundled recipe + `train`, as the quickstart does)
from the same base on the same `data synth --task addition` conversations, then is measured on:

- held-out greedy accuracy per mode (`smoltasks` eval, prompts not in the training set);
- teacher-forced next-token accuracy per slot of the /think traces: `operand` = a number in a
  column line before its first `=` (mostly digits copied from the prompt, borrow terms too),
  `sum` = the digit sum after `=`, `write` = the written digit or carry, `so-operand` /
  `so-result` = the summary line, `answer` = the final reply;
- induction: next-token accuracy on the second copy of a random sequence (digit groups, words),
  the copying ability that the traces need;
- wall seconds of the SFT run and its final training loss (mean of the last 50-step log window).

    smolforge quickstart   # writes the base, runs/quickstart/final
    python benchmarks/bench_sft_optimizer.py --base runs/quickstart/final --optimizers adamw muon \\
        --steps 1000 --batch 4 --lr 2e-3 --threads 2 --json runs/bench-sft-optimizer.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from smolforge.chat.render import load_template, render_for_training
from smolforge.config import SFTRecipe, load_recipe
from smolforge.data.synth import generate, write_jsonl
from smolforge.eval.runner import evaluate
from smolforge.eval.smol_tasks import report_from_records
from smolforge.lab.report import read_metrics
from smolforge.quickstart import bundled_recipe, stage_overrides
from smolforge.train.checkpoint import load_model
from smolforge.train.loop import train

SLOTS = ("operand", "sum", "write", "so-operand", "so-result", "answer")
WORDS = "king queen lord lady love night day moon sun star sea ship sword crown rose heart fire".split()


def datasets(n_train: int, n_eval: int) -> tuple[list[dict], list[dict]]:
    """Addition conversations and held-out ones whose prompt (every message but the reply) is not
    in the training set, the same split rule as the quickstart's `sft_tasks`."""

    def key(sample: dict) -> str:
        return json.dumps(sample["messages"][:-1], sort_keys=True)

    train_set = generate("addition", n_train, seed=0)
    seen = {key(s) for s in train_set}
    held_out = [s for s in generate("addition", 4 * n_eval, seed=1) if key(s) not in seen][:n_eval]
    return train_set, held_out


def slot_of(text: str, start: int) -> str:
    """Which slot of a trace the number token starting at `start` fills (by its line's prefix)."""
    prefix = text[text.rfind("\n", 0, start) + 1:start]
    if prefix.startswith(("ones:", "tens:", "hundreds:")):
        return "write" if "write" in prefix else "sum" if "=" in prefix else "operand"
    if prefix.startswith("so"):
        return "so-result" if "=" in prefix else "so-operand"
    return "answer"


@torch.no_grad()
def slot_accuracy(model: Any, tok: Any, held_out: list[dict]) -> dict[str, float]:
    """Teacher-forced accuracy of the trained number tokens of the /think samples, per slot."""
    template = load_template("smollm3", tok)
    hits = {slot: [0, 0] for slot in SLOTS}
    for sample in held_out:
        if not sample["chat_template_kwargs"]["enable_thinking"]:
            continue
        ex = render_for_training(tok, sample["messages"], template, **sample["chat_template_kwargs"])
        pred = model(torch.tensor([ex.input_ids])).logits[0].argmax(-1)
        offsets = tok.backend.encode(ex.text, add_special_tokens=False).offsets
        for i, (label, (s, e)) in enumerate(zip(ex.labels, offsets)):
            if i == 0 or label < 0 or not ex.text[s:e].strip().isdigit():
                continue
            counts = hits[slot_of(ex.text, s)]
            counts[0] += int(pred[i - 1].item() == label)
            counts[1] += 1
    return {slot: ok / n for slot, (ok, n) in hits.items() if n}


@torch.no_grad()
def induction_accuracy(model: Any, tok: Any, sequences: int = 40) -> dict[str, float]:
    """Next-token accuracy on the second copy of `seq + "\\n" + seq` for random digit groups and
    random words: an induction head predicts it from the first copy, bigram statistics cannot."""
    rng = random.Random(0)
    out = {}
    for kind in ("digits", "words"):
        ok = n = 0
        for _ in range(sequences):
            if kind == "digits":
                seq = " ".join("".join(rng.choice("0123456789") for _ in range(rng.randint(2, 3))) for _ in range(8))
            else:
                seq = " ".join(rng.choice(WORDS) for _ in range(10))
            first, second = tok.encode(seq + "\n"), tok.encode(seq)
            pred = model(torch.tensor([first + second])).logits[0].argmax(-1)
            for j in range(1, len(second)):
                ok += int(pred[len(first) + j - 1].item() == second[j])
                n += 1
        out[kind] = ok / max(n, 1)
    return out


def run_one(optimizer: str, args: argparse.Namespace, train_file: Path, eval_file: Path,
            held_out: list[dict]) -> dict[str, float]:
    """SFT with `optimizer` through the quickstart's recipe, then every measurement."""
    run_dir = Path(args.out) / optimizer
    shutil.rmtree(run_dir, ignore_errors=True)  # this benchmark's own output: a rerun starts fresh
    overrides = stage_overrides(run_dir, Path(args.base), train_file, "addition", args.device, args.steps, warmup=10)
    overrides.update({"train.optimizer": optimizer, "train.batch_size": args.batch, "train.lr": args.lr,
                      "train.threads": args.threads, "train.log_every": max(1, min(50, args.steps))})
    started = time.time()
    result = train(load_recipe(bundled_recipe("quickstart-sft.yaml"), overrides, SFTRecipe), stage="sft")
    wall = time.time() - started
    losses = [r["loss"] for r in read_metrics(result.run_dir) if "loss" in r]
    evals = evaluate(result.final_checkpoint, ["smoltasks"], device=args.device, batch_size=64,
                     max_new_tokens=96, options={"smoltasks": {"data": str(eval_file)}})
    report = report_from_records(evals["smoltasks"].samples)
    model, tok = load_model(result.final_checkpoint)
    model.eval()
    row = {"think_acc": report.total("think").accuracy, "no_think_acc": report.total("no_think").accuracy,
           "mode_honoured": report.honour_rate()}
    row.update({f"tf_{slot}": acc for slot, acc in slot_accuracy(model, tok, held_out).items()})
    row.update({f"induction_{kind}": acc for kind, acc in induction_accuracy(model, tok).items()})
    row.update({"final_loss": losses[-1] if losses else float("nan"), "wall_s": wall})
    return row


def table(results: dict[str, dict[str, float]]) -> str:
    """Markdown: one row per metric, one column per optimizer, then each one's ratio to the first."""
    names = list(results)
    base = names[0]
    header = ["metric", *names, *(f"{n}/{base}" for n in names[1:])]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for metric in results[base]:
        values = [results[n].get(metric, float("nan")) for n in names]
        as_pct = metric not in ("final_loss", "wall_s")
        cells = [f"{100 * v:.1f}%" if as_pct else f"{v:.3f}" if metric == "final_loss" else f"{v:.0f}"
                 for v in values]
        ratios = [f"{v / values[0]:.2f}x" if values[0] else "-" for v in values[1:]]
        lines.append("| " + " | ".join([metric, *cells, *ratios]) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", required=True, help="pretrained checkpoint, e.g. runs/quickstart/final")
    parser.add_argument("--optimizers", nargs="+", default=["adamw", "muon"])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=4, help="rows per step")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--n-train", type=int, default=8000, help="addition conversations to train on")
    parser.add_argument("--n-eval", type=int, default=200, help="held-out addition tasks")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = all cores)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="runs/bench-sft-optimizer", help="run directories go here")
    parser.add_argument("--json", default=None, help="append one JSON line of results to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)  # the eval and the probes; training sets its own
    out = Path(args.out)
    train_set, held_out = datasets(args.n_train, args.n_eval)
    train_file, eval_file = out / "data" / "train.jsonl", out / "data" / "held-out.jsonl"
    write_jsonl(train_set, train_file)
    write_jsonl(held_out, eval_file)
    results = {opt: run_one(opt, args, train_file, eval_file, held_out) for opt in args.optimizers}
    print(f"\nSFT on {len(train_set)} addition conversations from {args.base}: {args.steps} steps x "
          f"{args.batch} rows, lr {args.lr:g}; {len(held_out)} held-out tasks (greedy, 96 new tokens)\n")
    print(table(results))
    if args.json:
        record = {"bench": "sft_optimizer", **{k: v for k, v in vars(args).items() if k != "json"},
                  "results": results}
        with open(args.json, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
