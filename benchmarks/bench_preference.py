"""DPO with cached vs online reference log-probs, and LoRA vs full fine-tuning: memory and speed.

Each variant runs the real `smolforge dpo` command in its own process under GNU time (so the
peak resident memory is that variant's alone) on the same model, pairs and batch; tokens/s is the median of the
logged windows after the first, from metrics.jsonl. The pairs are GSM8K training problems from
../shared/data with the reference answer as `chosen` and another problem's answer as
`rejected` (the content does not matter for speed and memory).

    python benchmarks/bench_preference.py --preset smol-10m --pairs 256 --steps 20
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch

from smolforge.model import PRESETS, Transformer
from smolforge.tokenizer import train_tokenizer
from smolforge.train.checkpoint import save_checkpoint

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
VARIANTS = {
    "full, cached reference": ["--data.reference", "cached"],
    "full, online reference": ["--data.reference", "online"],
    "LoRA r=16, cached reference": ["--data.reference", "cached", "--lora.r", "16", "--lora.alpha", "32"],
    "LoRA r=16, online reference": ["--data.reference", "online", "--lora.r", "16", "--lora.alpha", "32"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="smol-10m", choices=sorted(PRESETS))
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4, help="pairs per micro-batch")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rows = [json.loads(line) for line in (SHARED / "gsm8k" / "train.jsonl").read_text().splitlines()[: args.pairs]]
        pairs = [{"prompt": r["question"], "chosen": r["answer"], "rejected": rows[(i + 1) % len(rows)]["answer"]}
                 for i, r in enumerate(rows)]
        (work / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
        (work / "corpus.txt").write_text("\n".join(p["prompt"] + p["chosen"] for p in pairs))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tokenizer = train_tokenizer([work / "corpus.txt"], vocab_size=4096)
        cfg = PRESETS[args.preset]().model_copy(update={"vocab_size": 4096, "max_seq_len": args.seq_len})
        save_checkpoint(work / "base", Transformer(cfg), tokenizer)
        results = {}
        for name, extra in VARIANTS.items():
            run = name.replace(" ", "_").replace(",", "").replace("=", "")
            command = [sys.executable, "-m", "smolforge.cli", "dpo", "--run.dir", str(work), "--run.name", run,
                       "--run.init_from", str(work / "base"),
                       "--data.train", json.dumps([{"path": str(work / "pairs.jsonl")}]),
                       "--data.template", "chatml", "--data.seq_len", str(args.seq_len), "--data.val_fraction", "0",
                       "--train.epochs", "0", "--train.max_steps", str(args.steps),
                       "--train.batch_size", str(args.batch), "--train.grad_accum", "1", "--train.lr", "1e-6",
                       "--train.log_every", "2", "--train.save_every", "0", "--train.eval_every", "0",
                       "--train.device", args.device, *extra]
            # GNU time prints the child's own peak resident set (KiB) as the last stderr line.
            done = subprocess.run(["/usr/bin/time", "-f", "%M", *command], check=True, text=True,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            peak = int(done.stderr.strip().splitlines()[-1])
            log = [json.loads(x) for x in (work / run / "metrics.jsonl").read_text().splitlines()]
            speeds = [r["tokens_per_s"] for r in log if "tokens_per_s" in r][1:]
            results[name] = (statistics.median(speeds), peak / 1024)
    base_speed = results["full, cached reference"][0]
    print(f"\n{args.preset}, {args.pairs} pairs, {args.batch} pairs x 2 rows per step, seq_len {args.seq_len}, "
          f"{args.steps} steps, device {args.device}, torch {torch.__version__}")
    print("| variant | tokens/s | vs full cached | peak RSS (MiB) |")
    print("|---|---|---|---|")
    for name, (speed, rss) in results.items():
        print(f"| {name} | {speed:,.0f} | {speed / base_speed:.2f}x | {rss:,.0f} |")


if __name__ == "__main__":
    main()
