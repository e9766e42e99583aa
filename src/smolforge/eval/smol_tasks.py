"""Generative evaluation on smol tasks: accuracy per task and reasoning mode, and mode honouring.

Each sample from `smolforge data synth` carries its checker, so the score needs no reference
model: render the conversation up to the last assistant turn with the chat template (generation
prompt included, in the sample's reasoning mode), decode greedily with the one engine, and ask
the sample's checker. As in the playbook's hybrid-reasoning evaluation (ch. 07), every result is
split by mode, `/think` vs `/no_think`, and the share of replies that follow the mode is
reported: a think reply must hold non-empty reasoning, a no_think reply must hold none.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from smolforge.chat.render import render_messages
from smolforge.data.synth import check_response, thinking_honoured
from smolforge.engine import Engine, SamplingParams

MODES = ("think", "no_think")


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

    def total(self, mode: str) -> TaskScore:
        out = TaskScore()
        for (_, m), s in self.scores.items():
            if m == mode:
                out.n, out.correct, out.honoured = out.n + s.n, out.correct + s.correct, out.honoured + s.honoured
        return out

    def honour_rate(self) -> float:
        n = sum(s.n for s in self.scores.values())
        return sum(s.honoured for s in self.scores.values()) / n if n else 0.0

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


def sample_mode(sample: dict[str, Any]) -> str:
    """The reasoning mode of a synth sample's last turn (its kwargs always agree with its flags)."""
    return "think" if sample.get("chat_template_kwargs", {}).get("enable_thinking", True) else "no_think"


def evaluate_smol_tasks(engine: Engine, template: str, samples: list[dict[str, Any]],
                        max_new_tokens: int = 96, batch_size: int = 64,
                        keep_examples: int = 4) -> SmolTaskReport:
    """Greedy replies to every sample's last user turn, scored by the sample's own checker."""
    tokenizer = engine.tokenizer
    stop = [i for i in (tokenizer.token_to_id("<|im_end|>"),) if i is not None]
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, stop_token_ids=stop)
    report = SmolTaskReport()
    per_key: dict[tuple[str, str], TaskScore] = defaultdict(TaskScore)
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        prompts = [tokenizer.encode(render_messages(template, s["messages"][:-1], add_generation_prompt=True,
                                                    **s.get("chat_template_kwargs", {})))
                   for s in chunk]
        for sample, completion in zip(chunk, engine.generate(prompts, params)):
            mode = sample_mode(sample)
            reply = completion.text or ""
            score = per_key[(sample["task"], mode)]
            score.n += 1
            score.correct += check_response(sample["check"], reply)
            score.honoured += thinking_honoured(reply, mode == "think")
            if len(report.examples) < keep_examples:
                report.examples.append({"task": sample["task"], "mode": mode,
                                        "prompt": sample["messages"][-2]["content"], "reply": reply})
    report.scores = dict(per_key)
    return report
