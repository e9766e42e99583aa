"""SFT packing: real tokens per second and padding of `bfd` / `wrapped` against `none`.

The data are the SFT-shaped sets in ../shared/data: GSM8K train (question -> answer, as
prompt/completion) and FastChat's ShareGPT sample conversations, rendered with the chatml
template. Each packing runs the real `smolforge sft` loop (same model, seq_len, rows per batch and
accumulation, so the same effective batch in rows) for a fixed number of steps; tokens/s counts
real (non-padding) tokens, from metrics.jsonl, skipping the first log window (warm-up).

    python benchmarks/bench_packing.py --preset smol-10m --seq-len 1024 --batch 8 --steps 30
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import warnings
from pathlib import Path

import torch

from smolforge.config import SFTRecipe, load_recipe
from smolforge.data.sft import SFTLoader, build_sft_loaders
from smolforge.model import PRESETS, Transformer
from smolforge.tokenizer import train_tokenizer
from smolforge.train.checkpoint import save_checkpoint
from smolforge.train.loop import train

LABELS = {"none": "none (each batch padded to its longest row)", "none-full": "none, padded to seq_len",
          "bfd": "bfd", "wrapped": "wrapped"}
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def prepare(work: Path, limit: int) -> list[Path]:
    gsm8k = work / "gsm8k.jsonl"
    with open(SHARED / "gsm8k" / "train.jsonl", encoding="utf-8") as src, open(gsm8k, "w") as out:
        for i, line in enumerate(src):
            if i == limit:
                break
            record = json.loads(line)
            out.write(json.dumps({"prompt": record["question"], "completion": record["answer"]}) + "\n")
    return [gsm8k, SHARED / "sharegpt-dummy" / "dummy_conversation.json"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="smol-10m", choices=sorted(PRESETS))
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=8, help="rows per micro-batch")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--examples", type=int, default=4000, help="GSM8K conversations used")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        sources = prepare(work, args.examples)
        corpus = work / "corpus.txt"
        corpus.write_text(sources[0].read_text() + sources[1].read_text())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tokenizer = train_tokenizer([corpus], vocab_size=4096)
        cfg = PRESETS[args.preset]().model_copy(update={"vocab_size": 4096, "max_seq_len": args.seq_len})
        save_checkpoint(work / "base", Transformer(cfg), tokenizer)
        results = {}
        for packing in ("none", "none-full", "bfd", "wrapped"):
            overrides = {
                "run.dir": str(work), "run.name": packing, "run.init_from": str(work / "base"),
                "data.train": [{"path": str(p)} for p in sources], "data.template": "chatml",
                "data.seq_len": args.seq_len, "data.packing": packing.removesuffix("-full"),
                "data.val_fraction": 0.0,
                "train.epochs": 0, "train.max_steps": args.steps, "train.batch_size": args.batch,
                "train.grad_accum": 1, "train.lr": 1e-4, "train.warmup_steps": 0, "train.log_every": 5,
                "train.eval_every": 0, "train.save_every": 0, "train.device": args.device}
            recipe = load_recipe(None, overrides, SFTRecipe)
            # "none-full": every row padded to seq_len, the baseline of the playbook's 3-5x figure
            # (smolforge's `none` pads each batch only to its longest row, as TRL does).
            SFTLoader.trim_padding = packing != "none-full"
            loader, _ = build_sft_loaders(recipe.data, tokenizer, args.batch, seed=0)
            # What the model actually processes: `none` batches are padded to their longest row.
            batches = [loader.next_batch() for _ in range(args.steps)]
            processed = sum(b["input_ids"].numel() for b in batches)
            computed_padding = 1 - sum(int(b["real_tokens"].sum()) for b in batches) / processed
            result = train(recipe, stage="sft")
            windows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
            speeds = [w["tokens_per_s"] for w in windows if "tokens_per_s" in w][1:]
            results[packing] = (statistics.median(speeds), loader.padding_fraction, computed_padding,
                                len(loader))
    SFTLoader.trim_padding = True
    base = results["none"][0]
    print(f"\n{args.preset}, seq_len {args.seq_len}, {args.batch} rows per step, {args.steps} steps, "
          f"device {args.device}, {torch.get_num_threads()} threads")
    print("| packing | rows per epoch | padding of seq_len slots | padding processed | real tokens/s | vs none |")
    print("|---|---|---|---|---|---|")
    for packing, (speed, padding, computed, rows) in results.items():
        print(f"| {LABELS[packing]} | {rows:,} | {100 * padding:.1f}% | {100 * computed:.1f}% | {speed:,.0f} | "
              f"{speed / base:.2f}x |")


if __name__ == "__main__":
    main()
