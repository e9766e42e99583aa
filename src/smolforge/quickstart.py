"""`smolforge quickstart`: the whole pipeline on bundled data, on a laptop CPU, in minutes.

1. tokenizer: a byte-level BPE trained on the tinyshakespeare training split and on the text of
   the SFT conversations (so chat markup, digits and the task words have tokens of their own);
2. data: the text into shards (validation = the last 10% of the characters, nanoGPT's convention);
3. pretrain: the `smol-3m` preset on Shakespeare; validation bits per byte and a sample;
4. SFT: smol tasks (`data synth`: addition with column traces, letter counting, format
   constraints, personas), half in `/think` mode with reasoning, half `/no_think`, rendered with
   the smollm3 hybrid-reasoning template;
5. evaluation (`smolforge eval`'s runner, results in `sft/final/eval/`): greedy replies to
   held-out tasks (`smoltasks`: accuracy per task and mode, and how often the reply follows the
   mode), ThinkFollow on a few multi-turn conversations, and the vibe-test transcripts;
6. preference: on-policy pairs (the SFT model samples 4 replies per fresh task, the task's
   checker grades them), APO-zero on them, and the same evaluation again (the vibe test now
   diffed against SFT's), so the report shows what the preference stage changed;
7. GRPO: online RL from the preference model (the SFT one when the pairs were too few) on fresh
   tasks, rewarded by the tasks' checkers plus a small format reward, evaluated the same way;
   the report compares the on-policy reward at its start and end, and held-out accuracy and
   mode-following before and after.
Everything goes to the report card `runs/quickstart/report.md` (`smolforge report`): loss per
stage, eval scores by stage, throughput and time, the lineage of checkpoints.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections import Counter
from importlib import resources
from pathlib import Path
from typing import Any

from smolforge.errors import SmolforgeError

SAMPLE_PROMPT = "ROMEO:\n"
# The SFT stage's tasks: ones a ~3M-parameter model can pick up within the 3-minute CPU budget.
# Addition is listed five times, so 5/8 of the conversations are arithmetic: its traces take the
# most steps to learn (docs/benchmarks.md, "Quickstart"), while counting and the format tasks
# reach their accuracy on less. The held-out, pair and GRPO prompts follow the same mix.
SFT_TASKS = "addition,addition,addition,addition,addition,count,format,persona"
# Eval tasks run on every chat stage (they need no downloaded data), and their budget: seconds
# on a laptop CPU, not minutes.
CHAT_EVALS = ("smoltasks", "thinkfollow", "vibes")
EVAL_MAX_NEW_TOKENS = 96
THINKFOLLOW_CONVERSATIONS = 16
# The GRPO stage's prompts: a split of their own (seed 3; seeds 0-2 are SFT, held-out and pairs).
# The default recipe's 40 steps x 8 prompts use 320 of the 512, so no prompt is seen twice.
GRPO_SEED = 3
# The GRPO rewards. The checker's pass/fail is the objective; think_format (1 when the reply
# follows its /think or /no_think flag and answers after it) is weighted 0.2 so that it cannot
# outweigh correctness: any correct reply (>= 1) beats any wrong well-formatted one (0.2). It still
# matters, because at ~25% accuracy many groups of 8 are all-wrong (or all-right), which gives
# the checker alone no advantage to learn from (GRPO's advantages are relative within a group);
# there the format term is the only signal, and it keeps the mode-following that SFT taught (the
# playbook rewards format alongside correctness for hybrid reasoning; docs/rl.md measured
# think_format alone raising mode-following from 93% to 99.6%). With mode-following already near
# 98% it is a weak signal: in the measured default run 61% of groups were still flat (all eight
# replies scored the same; docs/benchmarks.md, Quickstart). The recipe's DAPO overlong
# penalty is left out: the replies are capped at the eval's 96 tokens, and one cut off there
# already fails its checker and (mid-<think>) the format reward.
GRPO_REWARDS = [{"name": "smol_task", "weight": 1.0}, {"name": "think_format", "weight": 0.2}]
# The on-policy reward "at the start" and "at the end": the mean of this many rollouts (steps),
# as a single rollout's 64 replies are a noisy measure.
REWARD_WINDOW = 5


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
    parser.add_argument("--sft-examples", type=int, default=9000, help="Synthetic SFT conversations to train on.")
    parser.add_argument("--sft-max-steps", type=int, default=None, help="Cap the SFT stage's steps (default: one epoch).")
    parser.add_argument("--eval-examples", type=int, default=240, help="Held-out tasks to evaluate after SFT.")
    parser.add_argument("--pair-prompts", type=int, default=400,
                        help="Fresh tasks the SFT model samples replies for, to build preference pairs.")
    parser.add_argument("--dpo-max-steps", type=int, default=None,
                        help="Cap the preference stage's steps (default: one epoch of the pairs).")
    parser.add_argument("--grpo-prompts", type=int, default=512, help="Fresh tasks for the GRPO stage's rollouts.")
    parser.add_argument("--grpo-max-steps", type=int, default=None,
                        help="GRPO steps (one rollout of 8 tasks x 8 replies each; default: the recipe's 40, "
                             "about a minute on 2 CPU cores).")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from smolforge.chat.render import load_template, render_messages
    from smolforge.config import DPORecipe, GRPORecipe, SFTRecipe, load_recipe
    from smolforge.data.pairs import make_pairs
    from smolforge.data.shards import tokenize_corpus
    from smolforge.data.synth import generate, write_jsonl
    from smolforge.engine import Engine, SamplingParams
    from smolforge.lab.report import read_metrics, write_report_card, write_run_report
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
    sft_train, held_out, pair_prompts, grpo_prompts = sft_tasks(args.sft_examples, args.eval_examples,
                                                                args.pair_prompts, generate, args.grpo_prompts)
    write_jsonl(sft_train, data_dir / "sft-train.jsonl")
    write_jsonl(held_out, data_dir / "held-out.jsonl")
    write_jsonl(grpo_prompts, data_dir / "grpo-prompts.jsonl")

    print("[1/7] tokenizer: training a byte-level BPE on tinyshakespeare (train split) + the SFT tasks")
    train_txt, val_txt = prepare_text(data_dir)
    chat_txt = data_dir / "sft-text.txt"
    chat_txt.write_text("\n".join(render_messages(template, s["messages"], **s["chat_template_kwargs"])
                                   for s in sft_train), encoding="utf-8")
    tokenizer = train_tokenizer([train_txt, chat_txt], vocab_size=args.vocab_size)
    tokenizer.save(run_dir / "tokenizer")

    print("[2/7] data: tokenizing into shards")
    tokenize_corpus([train_txt], run_dir / "tokenizer", data_dir / "train", workers=1, progress=False)
    tokenize_corpus([val_txt], run_dir / "tokenizer", data_dir / "val", workers=1, progress=False)
    overrides.update({"data.tokenizer": str(run_dir / "tokenizer"),
                      "data.train": [{"path": str(data_dir / "train"), "name": "tinyshakespeare"}],
                      "data.val": [{"path": str(data_dir / "val"), "name": "tinyshakespeare-val"}]})

    print("[3/7] pretrain: smol-3m" + ("" if args.max_steps else " (about 5 minutes on 2 CPU cores)"))
    result = train(load_recipe(bundled_recipe(), overrides))
    model, tok = load_model(result.final_checkpoint)
    params = SamplingParams(max_new_tokens=args.sample_tokens, temperature=0.8, top_k=50, seed=0)
    sample = SAMPLE_PROMPT + Engine(model, tok).generate_text([SAMPLE_PROMPT], params)[0].text
    bpb = result.metrics.get("val_bpb", float("nan"))
    print(f"\nvalidation bits per byte: {bpb:.3f}\nsample:\n{sample}\n")

    print("[4/7] sft: smol tasks with /think and /no_think" + ("" if args.sft_max_steps else
                                                              " (about 3 minutes on 2 CPU cores)"))
    sft_overrides = stage_overrides(run_dir, result.final_checkpoint, data_dir / "sft-train.jsonl", "smol-tasks",
                                    args.device, args.sft_max_steps, warmup=10)
    sft = train(load_recipe(bundled_recipe("quickstart-sft.yaml"), sft_overrides, SFTRecipe), stage="sft")

    print("[5/7] evaluation: held-out smol tasks (greedy, per reasoning mode), ThinkFollow, vibe test")
    report, sft_evals = evaluate_chat_stage(sft.final_checkpoint, data_dir / "held-out.jsonl", args)
    think, no_think = report.total("think"), report.total("no_think")
    print(report.table())
    print(f"ThinkFollow: {100 * sft_evals['thinkfollow'].metrics['turn_accuracy']:.0f}% of turns follow "
          f"their /think or /no_think flag")
    sft_model, sft_tok = load_model(sft.final_checkpoint)
    sft_engine = Engine(sft_model, sft_tok)

    print("[6/7] preference: on-policy pairs graded by the tasks' checkers, then APO-zero")
    sampling = SamplingParams(max_new_tokens=96, temperature=0.8, top_p=0.95)
    pairs, pair_stats = make_pairs(sft_engine, sft_tok.chat_template, pair_prompts, 4, sampling, seed=0)
    print(pair_stats.summary(data_dir / "pairs.jsonl", 4))
    dpo = after = None
    if len(pairs) >= 16:  # too few pairs to learn from would only add noise
        write_jsonl(pairs, data_dir / "pairs.jsonl")
        dpo_overrides = stage_overrides(run_dir, sft.final_checkpoint, data_dir / "pairs.jsonl", "on-policy",
                                        args.device, args.dpo_max_steps, warmup=5)
        dpo = train(load_recipe(bundled_recipe("quickstart-dpo.yaml"), dpo_overrides, DPORecipe), stage="dpo")
        after, _ = evaluate_chat_stage(dpo.final_checkpoint, data_dir / "held-out.jsonl", args)
        print(after.table())
        write_run_report(dpo.run_dir)
    write_run_report(sft.run_dir)

    parent, parent_report = (dpo, after) if dpo else (sft, report)
    print(f"[7/7] grpo: online RL from the {parent_stage_name(dpo)} model on {len(grpo_prompts)} fresh tasks"
          + ("" if args.grpo_max_steps else " (about a minute on 2 CPU cores)"))
    grpo_overrides = stage_overrides(run_dir, parent.final_checkpoint, data_dir / "grpo-prompts.jsonl",
                                     "smol-tasks-rl", args.device, args.grpo_max_steps, warmup=0)
    grpo_overrides["grpo.rewards"] = GRPO_REWARDS
    grpo = train(load_recipe(bundled_recipe("quickstart-grpo.yaml"), grpo_overrides, GRPORecipe), stage="grpo")
    grpo_report, _ = evaluate_chat_stage(grpo.final_checkpoint, data_dir / "held-out.jsonl", args)
    print(grpo_report.table())
    write_run_report(grpo.run_dir)
    grpo_records = read_metrics(grpo.run_dir)
    grpo_text = grpo_section(grpo, grpo_records, len(grpo_prompts), parent_stage_name(dpo), parent_report,
                             grpo_report)
    start, end, _ = reward_start_end(grpo_records, "reward")
    print(f"GRPO: on-policy reward {start:.3f} -> {end:.3f}; held-out accuracy {100 * parent_report.accuracy():.1f}% "
          f"-> {100 * grpo_report.accuracy():.1f}%, mode honoured {100 * parent_report.honour_rate():.1f}% -> "
          f"{100 * grpo_report.honour_rate():.1f}%")
    total = time.time() - started
    examples = "\n\n".join(f"- {e['task']}, {e['mode']}: `{e['prompt']}`\n\n  ```text\n  "
                            + e["reply"].replace("\n", "\n  ") + "\n  ```" for e in report.examples)
    stages = [run_dir, sft.run_dir, *([dpo.run_dir] if dpo else []), grpo.run_dir]
    write_report_card(stages, run_dir, title="Quickstart", extra_sections={
        "Validation": f"bits per byte on the last 10% of tinyshakespeare: **{bpb:.3f}** "
                      f"(nanoGPT's CPU character-level recipe reaches 2.72 on this split).",
        "Sample": f"Prompt `ROMEO:`, temperature 0.8, top-k 50:\n\n```text\n{sample}\n```",
        "SFT on smol tasks": (
            f"{sft.steps} steps on {len(sft_train):,} synthetic conversations ({task_mix(sft_train)}), "
            f"{sft.wall_seconds:.0f} s; see `sft/report.md` for its loss curve. Greedy replies to "
            f"{len(held_out)} held-out tasks whose prompts the SFT data does not contain:\n\n"
            f"{report.table()}\n\n/think accuracy {100 * think.accuracy:.0f}% vs /no_think "
            f"{100 * no_think.accuracy:.0f}%; the reply follows its mode in "
            f"{100 * report.honour_rate():.0f}% of cases.\n\nA few replies:\n\n{examples}"),
        "Preference stage (APO-zero on on-policy pairs)": preference_section(pair_stats, len(pairs), dpo, report,
                                                                             after),
        "GRPO on smol tasks": grpo_text,
        "Time": f"{total:.0f} s for the whole quickstart ({result.wall_seconds:.0f} s pretraining, "
                f"{sft.wall_seconds:.0f} s SFT"
                + (f", {dpo.wall_seconds:.0f} s preference" if dpo else "")
                + f", {grpo.wall_seconds:.0f} s GRPO).",
    })
    print(f"/think accuracy {100 * think.accuracy:.0f}%, /no_think {100 * no_think.accuracy:.0f}%, "
          f"mode honoured {100 * report.honour_rate():.0f}%")
    print(f"done in {total:.0f}s: report {run_dir / 'report.md'}, models {result.final_checkpoint} "
          f"(pretrained), {sft.final_checkpoint} (SFT) and {grpo.final_checkpoint} (GRPO)")
    return 0


def evaluate_chat_stage(checkpoint: Path, held_out: Path, args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """Run CHAT_EVALS on a stage's checkpoint through the eval runner (results in
    `<checkpoint>/eval/`); the smoltasks report for the tables, and every task's result."""
    from smolforge.eval.runner import evaluate
    from smolforge.eval.smol_tasks import report_from_records

    results = evaluate(checkpoint, list(CHAT_EVALS), device=args.device, batch_size=64,
                       max_new_tokens=EVAL_MAX_NEW_TOKENS,
                       options={"smoltasks": {"data": str(held_out)},
                                "thinkfollow": {"conversations": min(THINKFOLLOW_CONVERSATIONS,
                                                                     args.eval_examples)}})
    return report_from_records(results["smoltasks"].samples), results


def stage_overrides(run_dir: Path, init_from: Path, data: Path, name: str, device: str,
                    max_steps: int | None, warmup: int) -> dict[str, Any]:
    """A post-training stage's recipe overrides: its input model and data, and a step cap if asked."""
    overrides = {"run.dir": str(run_dir), "run.init_from": str(init_from), "train.device": device,
                 "data.train": [{"path": str(data), "name": name}]}
    if max_steps is not None:
        overrides.update({"train.epochs": 0, "train.max_steps": max_steps,
                          "train.warmup_steps": min(max_steps, warmup)})
    return overrides


def task_mix(samples: list[dict]) -> str:
    """"addition 50%, count 17%, ...": each task's share of the conversations."""
    counts = Counter(sample["task"] for sample in samples)
    return ", ".join(f"{task} {100 * n / len(samples):.0f}%" for task, n in counts.most_common())


def sft_tasks(n_train: int, n_eval: int, n_pairs: int, generate: Any,
              n_grpo: int = 0) -> tuple[list[dict], list[dict], list[dict], list[dict]]:
    """SFT conversations, held-out evaluation tasks, preference prompts and GRPO prompts (their
    reference replies unused: the policy writes its own), no prompt in two sets."""

    def key(sample: dict) -> str:
        return json.dumps(sample["messages"][:-1], sort_keys=True)

    train_set = generate(SFT_TASKS, n_train, seed=0)
    seen = {key(s) for s in train_set}
    held_out = [s for s in generate(SFT_TASKS, 4 * n_eval, seed=1) if key(s) not in seen][:n_eval]
    seen |= {key(s) for s in held_out}
    pair_prompts = [s for s in generate(SFT_TASKS, 4 * n_pairs, seed=2) if key(s) not in seen][:n_pairs]
    seen |= {key(s) for s in pair_prompts}
    grpo_prompts = [s for s in generate(SFT_TASKS, 4 * n_grpo, seed=GRPO_SEED) if key(s) not in seen][:n_grpo]
    return train_set, held_out, pair_prompts, grpo_prompts


def preference_section(stats: Any, n_pairs: int, dpo: Any, before: Any, after: Any) -> str:
    """The report's account of the preference stage: the pairs, and accuracy before and after."""
    text = (f"The SFT model sampled 4 replies (temperature 0.8, top-p 0.95) for each of {stats.prompts} "
            f"fresh tasks; {100 * stats.pass_rate:.0f}% of the replies passed their checker. Prompts with "
            f"at least one passing and one failing reply gave {n_pairs} pairs ({stats.all_passed} prompts "
            f"all passed, {stats.all_failed} all failed).")
    if dpo is None:
        return text + " Fewer than 16 pairs: the preference stage was skipped."
    rows = ["| | /think accuracy | /no_think accuracy | mode honoured |", "|---|---|---|---|"]
    for name, report in (("after SFT", before), ("after APO-zero", after)):
        think, no_think = report.total("think"), report.total("no_think")
        rows.append(f"| {name} | {100 * think.accuracy:.0f}% | {100 * no_think.accuracy:.0f}% | "
                    f"{100 * report.honour_rate():.0f}% |")
    return (text + f" APO-zero (beta 0.1) for {dpo.steps} steps, {dpo.wall_seconds:.0f} s; the same "
            f"held-out tasks, greedy:\n\n" + "\n".join(rows) + "\n\n" + paired_text(before, after)
            + "\n\nPer task after APO-zero:\n\n"
            + after.table() + "\n\nSee `dpo/report.md` for the rewards and margins during training.")


def paired_text(before: Any, after: Any) -> str:
    """One sentence: how many held-out tasks the stage fixed and broke, and whether that differs
    from chance (exact McNemar test)."""
    fixed, broken, p = before.paired_change(after)
    verdict = "a significant change at the 5% level" if p < 0.05 else "not a significant change"
    return (f"Task by task, the stage fixed {fixed} replies and broke {broken} (exact McNemar p = {p:.3f}: "
            f"{verdict}).")


def parent_stage_name(dpo: Any) -> str:
    return "APO-zero" if dpo else "SFT"


def reward_start_end(records: list[dict], key: str, window: int = REWARD_WINDOW) -> tuple[float, float, int]:
    """The mean of `key` over the first and the last `window` logged rollouts (fewer when the run
    is short: at most half of them each, so the two ends never share a rollout), and that count."""
    values = [float(r[key]) for r in records if key in r and "step" in r]
    if not values:
        return float("nan"), float("nan"), 0
    n = max(1, min(window, len(values) // 2))
    return sum(values[:n]) / n, sum(values[-n:]) / n, n


def window_difference_noise(records: list[dict], key: str, window: int) -> float:
    """The standard error of (mean of the last `window` rollouts − mean of the first `window`),
    treating rollouts as independent draws: their sample std × √(2 / window); NaN under 2 rollouts."""
    values = [float(r[key]) for r in records if key in r and "step" in r]
    if len(values) < 2 or window < 1:
        return float("nan")
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return std * (2 / window) ** 0.5


def grpo_section(grpo: Any, records: list[dict], n_prompts: int, parent_name: str, before: Any, after: Any) -> str:
    """The report's account of the GRPO stage: on-policy reward at its start and end (the rollout
    loader's logged means), and held-out accuracy and mode-following before (its parent) and after."""
    rewards = " + ".join(f"{r['weight']:g} · {r['name']}" for r in GRPO_REWARDS)
    text = (f"GRPO from the {parent_name} model for {grpo.steps} steps, {grpo.wall_seconds:.0f} s, on "
            f"{n_prompts} fresh tasks (a split of their own, none in the SFT, held-out or pair data): each step "
            f"samples 8 replies (temperature 1, at most 96 tokens) for 8 tasks, rewards each with {rewards}, "
            f"and takes one on-policy step (DAPO loss, clip-higher, no KL; `grpo/report.md` has the curves).")
    rows = ["| on-policy, mean of a rollout's 64 replies | start | end |", "|---|---|---|"]
    n = 0
    for key, name in (("reward", "total reward"), ("rewards/smol_task", "smol_task (checker passed)"),
                      ("rewards/think_format", "think_format (mode followed)")):
        start, end, n = reward_start_end(records, key)
        rows.append(f"| {name} | {start:.3f} | {end:.3f} |")
    text += (f"\n\nOn-policy reward, sampled at temperature 1 (start = mean of the first {n} rollout(s), end "
             f"= of the last {n}):\n\n" + "\n".join(rows))
    start, end, n = reward_start_end(records, "rewards/smol_task")
    noise = window_difference_noise(records, "rewards/smol_task", n)
    if noise == noise:  # not NaN: at least two rollouts
        text += (f"\n\nEach rollout draws 8 different tasks, so the checker's pass rate varies from rollout to "
                 f"rollout: the end minus the start ({end - start:+.3f}) has a standard error of about "
                 f"{noise:.3f} (the rollouts' standard deviation × √(2/{n})).")
    table = ["| | /think accuracy | /no_think accuracy | all | mode honoured |", "|---|---|---|---|---|"]
    for name, report in ((f"before (after {parent_name})", before), ("after GRPO", after)):
        think, no_think = report.total("think"), report.total("no_think")
        table.append(f"| {name} | {100 * think.accuracy:.1f}% | {100 * no_think.accuracy:.1f}% | "
                     f"{100 * report.accuracy():.1f}% | {100 * report.honour_rate():.1f}% |")
    n_eval = sum(score.n for score in after.scores.values())
    # The binomial standard error of an accuracy near p on n tasks: differences of about twice it
    # are what the held-out set can tell apart from noise.
    p = before.accuracy()
    stderr = 100 * (p * (1 - p) / max(n_eval, 1)) ** 0.5
    return (text + f"\n\nThe same {n_eval} held-out tasks, greedy:\n\n" + "\n".join(table)
            + f"\n\nAccuracy changed by {100 * (after.accuracy() - p):+.1f} points (standard error "
            f"of one measurement about {stderr:.1f} points), mode-following by "
            f"{100 * (after.honour_rate() - before.honour_rate()):+.1f} points. " + paired_text(before, after)
            + " Per task after GRPO:\n\n" + after.table()
            + "\n\ndocs/rl.md (\"What to expect\") has what longer and stronger settings did on this model.")

