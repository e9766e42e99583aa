"""Evaluation throughput per task (examples/s), and multiple-choice log-likelihoods vs `transformers`.

A random model of a preset (`smol-3m` by default: the CPU quickstart's size) with a byte-level
BPE trained on the bundled tinyshakespeare is saved as a checkpoint, and each task is run through
the eval runner on the first `--limit` examples of ../shared/data (bpb: `--limit` windows of the
model's context length of the bundled validation text; generative tasks (gsm8k, ifeval and the
chat tasks, which render through the smollm3 template): greedy, `--max-new-tokens`, which a
random model fills before stopping). examples/s = examples / the task's own seconds (data reading
and model loading excluded), median of `--repeats` runs after a warm-up.

Baseline: the same (context, continuation) requests of the multiple-choice tasks (cloze and MCF,
`--limit` questions of ARC-Easy) scored by plain `transformers` on the exported checkpoint
(`AutoModelForCausalLM`), in the same batches, right-padded with an attention mask, the
continuation's log-softmax gathered the same way. Both are timed alternately, median of
`--repeats` after a warm-up; the log-likelihoods are checked to agree within 1e-4.

    python benchmarks/bench_eval.py --limit 50
    python benchmarks/bench_eval.py --device cuda --preset smollm2-135m --limit 200 --json out.jsonl
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

from smolforge.chat.render import load_template
from smolforge.eval import multiple_choice as mc
from smolforge.eval.runner import evaluate
from smolforge.model import PRESETS, Transformer
from smolforge.quickstart import bundled_text
from smolforge.tokenizer import train_tokenizer
from smolforge.train.checkpoint import load_model, save_checkpoint

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
TASKS = {  # task -> data file under ../shared/data (None: the task's bundled or generated data)
    "bpb": None,
    "arc_easy": "mc/arc_easy.jsonl",
    "piqa": "mc/piqa.jsonl",
    "gsm8k": "gsm8k/test.jsonl",
    "ifeval": None,
    "smoltasks": None,
    "thinkfollow": None,
    "vibes": None,
}


def build_checkpoint(root: Path, preset: str, vocab: int) -> Path:
    (root / "corpus.txt").write_text(bundled_text(), encoding="utf-8")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tokenizer = train_tokenizer([root / "corpus.txt"], vocab_size=vocab)
    torch.manual_seed(0)
    tokenizer.chat_template = load_template("smollm3")  # the chat tasks render through it
    model = Transformer(PRESETS[preset]().model_copy(update={"vocab_size": tokenizer.vocab_size}))
    return save_checkpoint(root / "ckpt", model, tokenizer)


def task_throughput(checkpoint: Path, args: argparse.Namespace) -> list[dict]:
    rows = []
    for task, data in TASKS.items():
        options = {task: {"data": str(SHARED / data)}} if data else None
        runs = []
        for _ in range(args.repeats + 1):  # the first is a warm-up
            result = evaluate(checkpoint, [task], options=options, limit=args.limit, batch_size=args.batch_size,
                              max_new_tokens=args.max_new_tokens, device=args.device,
                              out_dir=checkpoint.parent / "eval")[task]
            runs.append(result)
        seconds = statistics.median(r.seconds for r in runs[1:])
        rows.append({"task": task, "n": runs[-1].n, "seconds": seconds, "examples_per_second": runs[-1].n / seconds,
                     "metrics": runs[-1].metrics})
    return rows


def transformers_loglikelihoods(hf_model, tokenizer, requests, batch_size: int, device) -> list[float]:
    """The baseline: the same requests, batches and ordering as `mc.loglikelihoods`, in transformers."""
    encoded = []
    for context, continuation in requests:
        context_ids, continuation_ids = mc.encode_pair(tokenizer, context, continuation)
        encoded.append((context_ids + continuation_ids, len(continuation_ids)))
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
    out = [0.0] * len(encoded)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            longest = max(len(encoded[i][0]) - 1 for i in rows)
            ids = torch.zeros(len(rows), longest, dtype=torch.long)
            mask = torch.zeros(len(rows), longest, dtype=torch.long)
            for b, i in enumerate(rows):
                inputs = encoded[i][0][:-1]
                ids[b, :len(inputs)] = torch.tensor(inputs)
                mask[b, :len(inputs)] = 1
            logits = hf_model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            for b, i in enumerate(rows):
                whole, n = encoded[i]
                end = len(whole) - 1
                logprobs = logits[b, end - n:end].float().log_softmax(-1)
                target = torch.tensor(whole[-n:], device=device)
                out[i] = float(logprobs.gather(-1, target[:, None]).sum())
    return out


def mc_versus_transformers(checkpoint: Path, args: argparse.Namespace) -> dict:
    import transformers

    lines = (SHARED / "mc" / "arc_easy.jsonl").read_text().splitlines()[:args.limit]
    questions = [mc.parse_question(json.loads(line), f"arc_easy:{i}") for i, line in enumerate(lines)]
    requests = [r for q in questions for r in mc.requests_for(q, mc.FORMATS)]
    model, tokenizer = load_model(checkpoint, device=args.device)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint).to(args.device).eval()
    ours_fn = lambda: [ll for ll, _ in mc.loglikelihoods(model, tokenizer, requests, args.batch_size)]  # noqa: E731
    theirs_fn = lambda: transformers_loglikelihoods(hf_model, tokenizer, requests, args.batch_size, args.device)  # noqa: E731
    ours, theirs = ours_fn(), theirs_fn()  # warm-up, and the agreement check
    worst = max(abs(a - b) for a, b in zip(ours, theirs))
    assert worst <= 1e-4 * max(1.0, max(abs(x) for x in theirs)), f"log-likelihoods disagree by {worst}"
    times = {"smolforge": [], "transformers": []}
    for _ in range(args.repeats):
        for name, fn in (("smolforge", ours_fn), ("transformers", theirs_fn)):
            if args.device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if args.device == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    ours_s, theirs_s = statistics.median(times["smolforge"]), statistics.median(times["transformers"])
    return {"questions": len(questions), "requests": len(requests), "max_abs_diff": worst,
            "smolforge_examples_per_second": len(questions) / ours_s,
            "transformers_examples_per_second": len(questions) / theirs_s, "ratio": theirs_s / ours_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="smol-3m", choices=sorted(PRESETS))
    parser.add_argument("--vocab", type=int, default=2048, help="Tokenizer vocabulary.")
    parser.add_argument("--limit", type=int, default=50, help="Examples per task.")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64, help="gsm8k generation budget.")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads on CPU.")
    parser.add_argument("--json", default=None, help="Append the results to this JSONL file.")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not SHARED.is_dir():
        raise SystemExit(f"{SHARED} not found: the benchmark reads the shared data sets")
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = build_checkpoint(Path(tmp), args.preset, args.vocab)
        rows = task_throughput(checkpoint, args)
        versus = mc_versus_transformers(checkpoint, args)
    print(f"\n{args.preset}, {args.device} ({torch.get_num_threads()} threads), torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}; limit {args.limit}, batch {args.batch_size}, "
          f"median of {args.repeats}")
    print("| task | examples | examples/s | headline metric |\n|---|---:|---:|---|")
    for row in rows:
        name, value = next(iter(row["metrics"].items()))
        print(f"| {row['task']} | {row['n']} | {row['examples_per_second']:.1f} | {name} {value:.3f} |")
    print(f"\nmultiple-choice log-likelihoods, ARC-Easy cloze + MCF, {versus['questions']} questions "
          f"({versus['requests']} requests), max |diff| {versus['max_abs_diff']:.1e}:")
    print(f"smolforge {versus['smolforge_examples_per_second']:.1f} q/s, transformers "
          f"{versus['transformers_examples_per_second']:.1f} q/s, ratio {versus['ratio']:.2f}x")
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps({"preset": args.preset, "device": args.device, "limit": args.limit,
                                "batch_size": args.batch_size, "tasks": rows, "mc_vs_transformers": versus}) + "\n")


if __name__ == "__main__":
    main()
