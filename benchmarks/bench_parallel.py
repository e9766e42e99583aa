"""Data-parallel training throughput: `torchrun` x N with DDP and FSDP2 against one process.

Runs the real training loop (`smolforge pretrain`) on the bundled text, the same recipe and the
same global batch each time: one process with all the cores and with cores / N threads, then
`torchrun --nproc_per_node N` under `train.parallel: ddp` and `fsdp2`, each rank with cores / N
threads. The figure is the
median of the per-step tokens/s that rank 0 logs (global tokens, so comparable), skipping the
first `--skip` steps (allocation, first-touch). On CPU the ranks share the same cores: the
comparison shows the overhead of the collectives (gloo), not a speed-up.

    python benchmarks/bench_parallel.py --preset smol-3m --batch 16 --seq 256 --steps 12
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch

from smolforge.config import load_recipe, save_recipe
from smolforge.data.shards import tokenize_corpus
from smolforge.model import PRESETS, count_parameters
from smolforge.quickstart import prepare_text
from smolforge.tokenizer import train_tokenizer


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def prepare(root: Path, vocab: int) -> tuple[Path, Path]:
    train_txt, _ = prepare_text(root / "text")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train_tokenizer([train_txt], vocab_size=vocab).save(root / "tok")
    tokenize_corpus([train_txt], root / "tok", root / "train", workers=1, progress=False)
    return root / "tok", root / "train"


def run(root: Path, name: str, recipe: Path, processes: int, threads: int, parallel: str) -> list[float]:
    """Launch one run and return rank 0's logged tokens/s per step."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--standalone"]
                if processes > 1 else [sys.executable])
    cmd = [*launcher, "-m", "smolforge.cli", "pretrain", str(recipe), "--run.name", name,
           "--train.threads", str(threads), "--train.parallel", parallel]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}{done.stderr[-4000:]}")
    lines = (root / "runs" / name / "metrics.jsonl").read_text().splitlines()
    return [r["tokens_per_s"] for r in map(json.loads, lines) if "tokens_per_s" in r]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="smol-3m", choices=sorted(PRESETS))
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=16, help="Global rows per step (divided over the ranks).")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--skip", type=int, default=2, help="First steps left out of the median.")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--json", help="Append a JSON line of results to this file.")
    args = parser.parse_args()

    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tok, train = prepare(root, args.vocab)
        recipe = load_recipe(None, {
            "run.dir": str(root / "runs"), "model.preset": args.preset, "data.tokenizer": str(tok),
            "data.train": [{"path": str(train)}], "data.seq_len": args.seq, "train.device": "cpu",
            "train.batch_size": args.batch, "train.max_steps": args.steps, "train.warmup_steps": 1,
            "train.log_every": 1, "train.eval_every": 0, "train.save_every": 0})
        save_recipe(recipe, root / "recipe.yaml")
        per_rank = max(1, cores // args.nproc)
        # One process with every core is the baseline; one process with a rank's threads shows what
        # a rank alone achieves (the ideal N-rank figure is N times it, with N times the cores).
        setups = [("1 process", 1, cores, "ddp"), (f"1 process, {per_rank} thread(s)", 1, per_rank, "ddp"),
                  (f"{args.nproc} x ddp", args.nproc, per_rank, "ddp"),
                  (f"{args.nproc} x fsdp2", args.nproc, per_rank, "fsdp2")]
        results = {}
        for label, processes, threads, parallel in setups:
            name = f"p{processes}-t{threads}-{parallel}"
            speeds = run(root, name, root / "recipe.yaml", processes, threads, parallel)
            results[label] = statistics.median(speeds[args.skip:])
    machine = f"{cpu_name()}, {cores} cores"
    params = count_parameters(recipe.model.model_copy(update={"vocab_size": args.vocab}))["total"]
    print(f"{args.preset} ({params / 1e6:.1f}M params) global batch {args.batch} x seq {args.seq}, fp32, "
          f"torch {torch.__version__} on {machine}")
    base = results["1 process"]
    for label, speed in results.items():
        print(f"  {label:>24}: {speed:,.0f} tokens/s ({speed / base:.2f}x one process)")
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps({"preset": args.preset, "batch": args.batch, "seq": args.seq, "machine": machine,
                                "tokens_per_s": results}) + "\n")


if __name__ == "__main__":
    main()
