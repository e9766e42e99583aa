"""GRPO on CPU: rollout tokens/s, the step time split (generation / scoring / training), and peak
memory with and without a reference model and cached log-probs.

Each variant runs the real `smolforge grpo` command in its own process under GNU time, so the peak
resident memory (RSS) printed is that variant's alone: weights, optimizer state, the KV cache of
the rollout, activations, the rollout tensors and the reference model when there is one. Speeds
are means over the logged steps of every rollout after the first, from metrics.jsonl:
`time/generate_s` (the engine sampling the rollout), `time/score_s` (rewards plus old and
reference log-probs) and `time/train_s` (forward, backward, optimizer step), all per optimizer
step; `rollout/tokens_per_s` (completion tokens per second of sampling); and the loop's
`tokens_per_s` (prompt + completion tokens trained per second of the whole step, sampling
included). The model has random weights (speed and memory do not depend on them); prompts are
GSM8K training questions from ../shared/data and the rewards `gsm8k` + `overlong` (a random model
seldom stops early, so nearly every completion runs to max_new_tokens in every variant).

    python benchmarks/bench_grpo.py --preset smol-10m --steps 8
    python benchmarks/bench_grpo.py --preset smollm2-135m --steps 4 --prompts 2 --group 4 --batch 8 \
        --max-new-tokens 64 --only "on-policy,cached,LoRA"
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
TWICE = ["--grpo.num_iterations", "2"]
REFERENCE = ["--train.beta", "0.04", *TWICE]
VARIANTS = {
    "beta 0, 1 step per rollout (on-policy)": [],
    "beta 0, num_iterations 2 (old log-probs)": TWICE,
    "beta 0.04, reference model, cached log-probs": [*REFERENCE, "--grpo.reference", "cached"],
    "beta 0.04, reference model, online log-probs": [*REFERENCE, "--grpo.reference", "online"],
    "LoRA r=16, beta 0.04 (base = reference)": [*REFERENCE, "--lora.r", "16", "--lora.alpha", "32"],
}
MEASURES = ("time/generate_s", "time/score_s", "time/train_s", "rollout/tokens_per_s", "tokens_per_s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="smol-10m", choices=sorted(PRESETS))
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=4, help="prompts per rollout")
    parser.add_argument("--group", type=int, default=8, help="completions per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16, help="completions per micro-batch")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", default="", help="comma-separated texts: run only the variants whose name holds one")
    args = parser.parse_args()
    rows = args.prompts * args.group
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        records = [json.loads(line) for line in (SHARED / "gsm8k" / "train.jsonl").read_text().splitlines()[:256]]
        (work / "prompts.jsonl").write_text("".join(json.dumps({"prompt": r["question"], "answer": r["answer"]}) + "\n"
                                                    for r in records))
        (work / "corpus.txt").write_text("\n".join(r["question"] + r["answer"] for r in records))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tokenizer = train_tokenizer([work / "corpus.txt"], vocab_size=4096)
        torch.manual_seed(0)
        cfg = PRESETS[args.preset]().model_copy(update={"vocab_size": 4096, "max_seq_len": 512})
        save_checkpoint(work / "base", Transformer(cfg), tokenizer)
        results = {}
        for name, extra in VARIANTS.items():
            if args.only and not any(text in name for text in args.only.split(",")):
                continue
            run = "".join(c if c.isalnum() else "_" for c in name)
            command = [sys.executable, "-m", "smolforge.cli", "grpo", "--run.dir", str(work), "--run.name", run,
                       "--run.init_from", str(work / "base"),
                       "--data.train", json.dumps([{"path": str(work / "prompts.jsonl")}]),
                       "--data.template", "chatml", "--data.seq_len", "512",
                       "--grpo.rewards", json.dumps([{"name": "gsm8k"}, {"name": "overlong"}]),
                       "--grpo.group_size", str(args.group), "--grpo.prompts_per_step", str(args.prompts),
                       "--grpo.max_new_tokens", str(args.max_new_tokens),
                       "--train.max_steps", str(args.steps), "--train.batch_size", str(args.batch),
                       "--train.grad_accum", str(rows // args.batch), "--train.lr", "1e-6",
                       "--train.log_every", "1", "--train.save_every", "0", "--train.device", args.device, *extra]
            # GNU time prints the child's own peak resident set (KiB) as the last stderr line.
            done = subprocess.run(["/usr/bin/time", "-f", "%M", *command], check=True, text=True,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            peak = int(done.stderr.strip().splitlines()[-1])
            log = [r for r in map(json.loads, (work / run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
            # Means over whole rollouts after the first (warm-up): with num_iterations 2 a rollout is
            # sampled every other step, so a per-step median would read 0 for generation.
            per_rollout = 2 if "--grpo.num_iterations" in extra else 1
            kept = log[per_rollout:]
            results[name] = {key: statistics.fmean(r[key] for r in kept) for key in MEASURES}
            results[name]["peak_mib"] = peak / 1024
    print(f"\n{args.preset} (random weights), {args.prompts} prompts x {args.group} completions of "
          f"{args.max_new_tokens} tokens per rollout, {args.batch} completions per micro-batch, {args.steps} steps, "
          f"device {args.device}, torch {torch.__version__}")
    print("| variant | generate s/step | score s/step | train s/step | rollout tokens/s | trained tokens/s (end to end) | peak RSS (MiB) |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['time/generate_s']:.2f} | {r['time/score_s']:.2f} | {r['time/train_s']:.2f} | "
              f"{r['rollout/tokens_per_s']:,.0f} | {r['tokens_per_s']:,.0f} | {r['peak_mib']:,.0f} |")


if __name__ == "__main__":
    main()
