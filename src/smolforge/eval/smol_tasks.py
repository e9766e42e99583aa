"""Generative evaluation on smol tasks: accuracy per task and reasoning mode, and mode honouring.

Each sample from `smolforge data synth` carries its checker, so the score needs no reference
model: render the conversation up to the last user turn with the chat template (generation
prompt included, in the sample's reasoning mode), decode with the one engine, and ask the
sample's checker. As in the playbook's hybrid-reasoning evaluation (ch. 07), every result is
split by mode, `/think` vs `/no_think`, and the share of replies that follow the mode is
reported: a think reply must hold non-empty reasoning, a no_think reply must hold none.

`run(ctx)` is the `smoltasks` eval task: held-out samples drawn from `data synth` with a seed no
training split uses (or a `--data` JSONL that `data synth` wrote), greedy, or avg@k over k
sampled replies when `--samples K` (the playbook's rule for small sets).
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from smolforge.chat.render import render_messages
from smolforge.data.sources import iter_records
from smolforge.data.synth import (
    CHECKERS,
    NO_THINK_FLAG,
    THINK_FLAG,
    check_response,
    generate,
    thinking_honoured,
)
from smolforge.engine import Engine
from smolforge.errors import SmolforgeError
from smolforge.eval.core import (
    EvalContext,
    TaskResult,
    chat_template,
    draw_params,
    generate_fitted,
    sampling_plan,
)

MODES = ("think", "no_think")
DEFAULT_EXAMPLES = 200
# `data synth` defaults to seed 0 and the quickstart draws its train / held-out / pair splits
# with seeds 0-2: the eval set comes from a seed far from those (the playbook: keep training,
# validation and test data apart; `smolforge decontaminate` checks the overlap that remains).
HELD_OUT_SEED = 1_000_003


# --- smol tasks ------------------------------------------------------------------------------------


@dataclass
class TaskScore:
    n: int = 0
    correct: int = 0
    honoured: int = 0

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else 0.0

    @property
    def honour_rate(self) -> float:
        return self.honoured / self.n if self.n else 0.0


@dataclass
class SmolTaskReport:
    scores: dict[tuple[str, str], TaskScore] = field(default_factory=dict)  # (task, mode) -> score
    examples: list[dict[str, Any]] = field(default_factory=list)  # a few prompts with replies
    records: list[dict[str, Any]] = field(default_factory=list)  # every scored reply
    draws: int = 1  # k of avg@k: the scores count every draw, so accuracy is the mean over draws

    def total(self, mode: str) -> TaskScore:
        out = TaskScore()
        for (_, m), s in self.scores.items():
            if m == mode:
                out.n, out.correct, out.honoured = out.n + s.n, out.correct + s.correct, out.honoured + s.honoured
        return out

    def honour_rate(self) -> float:
        n = sum(s.n for s in self.scores.values())
        return sum(s.honoured for s in self.scores.values()) / n if n else 0.0

    def accuracy(self) -> float:
        n = sum(s.n for s in self.scores.values())
        return sum(s.correct for s in self.scores.values()) / n if n else 0.0

    def pass_at_k(self) -> float:
        """Share of prompts with at least one correct reply among the k draws."""
        solved: dict[int, bool] = {}
        for record in self.records:
            solved[record["index"]] = solved.get(record["index"], False) or record["correct"]
        return sum(solved.values()) / len(solved) if solved else 0.0

    def paired_change(self, later: SmolTaskReport) -> tuple[int, int, float]:
        """(fixed, broken, p) between this report and `later` on the same tasks and draws: replies
        wrong here and right there, the reverse, and the exact two-sided McNemar p-value (a
        binomial test on the discordant pairs, McNemar 1947). Paired, it tells a small change on
        one held-out set from noise better than two accuracies and their standard errors do."""
        before = {(r["index"], r["draw"]): bool(r["correct"]) for r in self.records}
        after = {(r["index"], r["draw"]): bool(r["correct"]) for r in later.records}
        if before.keys() != after.keys():
            raise ValueError("paired_change needs two reports on the same tasks and draws")
        fixed = sum(after[key] and not ok for key, ok in before.items())
        broken = sum(ok and not after[key] for key, ok in before.items())
        n, k = fixed + broken, min(fixed, broken)
        p = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n) if n else 1.0
        return fixed, broken, p

    def metrics(self) -> dict[str, float]:
        """Headline `accuracy` first, then per mode, mode honouring, per task and per task+mode.
        A mode with no samples gets no metric (0% would claim a measurement)."""
        out = {"accuracy": self.accuracy()}
        for mode in MODES:
            if self.total(mode).n:
                out[f"{mode}_accuracy"] = self.total(mode).accuracy
        out["mode_honoured"] = self.honour_rate()
        if self.draws > 1:
            out[f"pass@{self.draws}"] = self.pass_at_k()
        for task in sorted({task for task, _ in self.scores}):
            pair = [self.scores[(task, m)] for m in MODES if (task, m) in self.scores]
            out[f"{task}_accuracy"] = sum(s.correct for s in pair) / sum(s.n for s in pair)
            for mode in MODES:
                if (task, mode) in self.scores:
                    out[f"{task}_{mode}_accuracy"] = self.scores[(task, mode)].accuracy
        return out

    def table(self) -> str:
        """Markdown: accuracy per task in each mode, then the totals and the mode honour rate."""
        tasks = sorted({task for task, _ in self.scores})
        lines = ["| task | /think accuracy | /no_think accuracy | mode honoured |", "|---|---|---|---|"]

        def cell(score: TaskScore | None) -> str:
            return f"{100 * score.accuracy:.0f}% ({score.correct}/{score.n})" if score and score.n else "-"

        for task in tasks + ["all"]:
            pair = ([self.total(m) for m in MODES] if task == "all"
                    else [self.scores.get((task, m)) for m in MODES])
            n = sum(s.n for s in pair if s)
            honoured = sum(s.honoured for s in pair if s)
            name = "**all**" if task == "all" else task
            lines.append(f"| {name} | {cell(pair[0])} | {cell(pair[1])} | {100 * honoured / max(n, 1):.0f}% |")
        return "\n".join(lines)


def _flag_of(text: str) -> str | None:
    text = text.rstrip()
    if text.endswith(NO_THINK_FLAG):
        return "no_think"
    return "think" if text.endswith(THINK_FLAG) else None


def sample_mode(sample: Mapping[str, Any]) -> str:
    """The reasoning mode of a sample's last turn, by the hybrid template's rule: a flag at the
    end of the last user message wins, then one at the end of the system message, then
    `chat_template_kwargs.enable_thinking` (default on). `data synth` keeps all three in agreement."""
    messages = prompt_messages(sample)
    users = [m for m in messages if m.get("role") == "user"]
    if users and (flag := _flag_of(str(users[-1].get("content") or ""))):
        return flag
    if messages and messages[0].get("role") == "system" and (flag := _flag_of(str(messages[0].get("content") or ""))):
        return flag
    return "think" if (sample.get("chat_template_kwargs") or {}).get("enable_thinking", True) else "no_think"


def prompt_messages(sample: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The conversation the model answers: without the gold assistant reply when there is one."""
    messages = list(sample["messages"])
    return messages[:-1] if messages and messages[-1].get("role") == "assistant" else messages


def evaluate_smol_tasks(engine: Engine, template: str, samples: list[dict[str, Any]],
                        max_new_tokens: int = 96, batch_size: int = 64, keep_examples: int = 4, *,
                        draws: int = 1, temperature: float = 0.0, seed: int = 0) -> SmolTaskReport:
    """Replies to every sample's last user turn, scored by the sample's own checker.

    Greedy by default; `draws` > 1 samples that many replies per prompt at `temperature`
    (seeds `seed`, `seed + 1`, ...) and the scores count them all, so accuracy is avg@k.
    A prompt too long for the model's context is scored as failed.
    """
    tokenizer = engine.tokenizer
    prompts = [tokenizer.encode(render_messages(template, prompt_messages(s), add_generation_prompt=True,
                                                **(s.get("chat_template_kwargs") or {})))
               for s in samples]
    records = []
    for draw in range(draws):
        params = draw_params(tokenizer, max_new_tokens, temperature if draws > 1 else 0.0,
                             seed + draw if draws > 1 else None)
        for index, (sample, completion) in enumerate(zip(samples, generate_fitted(engine, prompts, params,
                                                                                  batch_size))):
            mode = sample_mode(sample)
            reply = (completion.text or "") if completion is not None else ""
            user = [m for m in prompt_messages(sample) if m.get("role") == "user"]
            records.append({"index": index, "draw": draw, "task": sample["task"], "mode": mode,
                            "prompt": user[-1]["content"] if user else "", "response": reply,
                            "check": sample["check"], "correct": check_response(sample["check"], reply),
                            "honoured": thinking_honoured(reply, mode == "think"),
                            "finish_reason": completion.finish_reason if completion else "context_full"})
    return report_from_records(records, keep_examples)


def report_from_records(records: list[dict[str, Any]], keep_examples: int = 4) -> SmolTaskReport:
    """The report of scored replies (`evaluate_smol_tasks`' records, or the samples of a
    `smoltasks` TaskResult): counts per task and mode over every draw, a few first-draw examples."""
    per_key: dict[tuple[str, str], TaskScore] = defaultdict(TaskScore)
    report = SmolTaskReport(records=list(records), draws=1 + max((r["draw"] for r in records), default=0))
    for record in records:
        score = per_key[(record["task"], record["mode"])]
        score.n += 1
        score.correct += bool(record["correct"])
        score.honoured += bool(record["honoured"])
        if record["draw"] == 0 and len(report.examples) < keep_examples:
            report.examples.append({"task": record["task"], "mode": record["mode"], "prompt": record["prompt"],
                                    "reply": record["response"]})
    report.scores = dict(per_key)
    return report


def load_samples(path: str | Path) -> list[dict[str, Any]]:
    """Smol-task samples from a JSONL / JSON / Parquet file (the format `data synth` writes).

    Each record needs `messages` (a conversation that holds a user turn) and `check` (a checker
    spec); `task` defaults to the file's stem, `chat_template_kwargs` to none. Errors name the
    file, line and field.
    """
    path = Path(path)
    samples = []
    for location, record in iter_records(path):
        if not isinstance(record, dict):
            raise SmolforgeError(f"{location}: expected a JSON object with 'messages' and 'check', "
                                 f"got {type(record).__name__}")
        for key in ("messages", "check"):
            if key not in record:
                raise SmolforgeError(f"{location} field '{key}' is missing (smol-task samples need "
                                     "'messages' and 'check', as `smolforge data synth` writes them)")
        messages = record["messages"]
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise SmolforgeError(f"{location} field 'messages' must be a list of message objects")
        if not any(m.get("role") == "user" for m in prompt_messages(record)):
            raise SmolforgeError(f"{location} field 'messages' holds no user turn to answer")
        check = record["check"]
        if not isinstance(check, dict) or check.get("type") not in CHECKERS:
            raise SmolforgeError(f"{location} field 'check' must be a checker spec with a 'type' among "
                                 f"{', '.join(CHECKERS)}, got {check!r}")
        kwargs = record.get("chat_template_kwargs") or {}
        if not isinstance(kwargs, dict):
            raise SmolforgeError(f"{location} field 'chat_template_kwargs' must be an object")
        task = record.get("task", path.stem)
        if not isinstance(task, str) or not task:
            raise SmolforgeError(f"{location} field 'task' must be a non-empty string")
        samples.append({**record, "task": task, "chat_template_kwargs": kwargs})
    if not samples:
        raise SmolforgeError(f"{path} holds no samples: write some with `smolforge data synth --out {path}`")
    return samples


def run(ctx: EvalContext) -> TaskResult:
    """The `smoltasks` eval task (options: `data`, or `tasks` and `n` for generated samples)."""
    template = chat_template(ctx)
    if ctx.option("data"):
        source = ctx.data_path()
        samples = load_samples(source)[:ctx.limit]
        notes = [f"data {source}"]
    else:
        n = int(ctx.option("n") or DEFAULT_EXAMPLES)
        n = min(n, ctx.limit) if ctx.limit else n
        tasks = str(ctx.option("tasks", "all"))
        samples = generate(tasks, n, seed=HELD_OUT_SEED + ctx.seed)
        notes = [f"{n} generated samples of {tasks} (seed {HELD_OUT_SEED + ctx.seed})"]
    draws, temperature, sampling_notes = sampling_plan(ctx)
    started = time.perf_counter()
    report = evaluate_smol_tasks(ctx.engine, template, samples, ctx.max_new_tokens, ctx.batch_size,
                                 draws=draws, temperature=temperature, seed=ctx.seed)
    seconds = time.perf_counter() - started
    cut = sum(r["finish_reason"] != "stop" for r in report.records)
    if cut:
        notes.append(f"{cut} of {len(report.records)} replies cut at max_new_tokens or the context")
    return TaskResult(task=ctx.task, metrics=report.metrics(), n=len(samples), seconds=seconds,
                      samples=report.records, notes=sampling_notes + notes)
