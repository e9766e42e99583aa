"""ThinkFollow: does the model switch its reasoning on and off when asked, turn after turn?

The playbook (ch. 07, "Targeting specific capabilities") borrows this eval from Qwen3 to test
SmolLM3's hybrid reasoning: multi-turn conversations whose user turns end with `/think` or
`/no_think`, chosen at random, scored by whether each reply holds a non-empty or an empty
`<think>` block as asked. Its lesson: a model trained on single-turn reasoning data follows the
flag in the first turn and fails to turn reasoning back on later, hence the per-turn metrics.

How a conversation runs: turn t of every conversation is generated in one batched engine call;
the reply's answer, its reasoning stripped (as the hybrid template keeps reasoning only for the
last turn), joins the history before turn t + 1. Prompts are the playbook's Multi-IF prompts in
spirit: verifiable smol tasks from `smolforge.data.synth` (deterministic for a seed), or your
own conversations, `--data thinkfollow=conversations.jsonl` with `{"turns": ["...", "..."],
optional "system": "..."}` per line (a turn that already ends with a flag keeps it).

Metrics: `turn_accuracy` (headline: share of turns whose think block is as asked),
`think_accuracy` and `no_think_accuracy` (by the asked mode), `conversation_accuracy` (every
turn right) and `turn_<t>_accuracy` for each turn position. Options: `conversations` (default
40), `turns` (default 3), `tasks` (synth tasks the prompts come from).
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from smolforge.chat.reasoning import prompt_opens_think, split_reasoning
from smolforge.chat.render import render_messages
from smolforge.data.sources import iter_records
from smolforge.data.synth import NO_THINK_FLAG, THINK_FLAG, generate, thinking_honoured
from smolforge.engine import Engine, SamplingParams
from smolforge.errors import SmolforgeError
from smolforge.eval.core import (
    EvalContext,
    TaskResult,
    chat_template,
    draw_params,
    generate_fitted,
    sampling_plan,
)
from smolforge.eval.smol_tasks import HELD_OUT_SEED

DEFAULT_CONVERSATIONS = 40
DEFAULT_TURNS = 3  # Multi-IF's conversations have three turns
# Single-turn synth tasks (no persona system prompt, no built-in multi-turn): plain user requests.
PROMPT_TASKS = "arithmetic,reverse,sort,count,format"
_SEED_OFFSET = 17  # thinkfollow's prompts differ from smoltasks' held-out samples of the same seed


@dataclass
class Conversation:
    turns: list[str]  # user messages, each with or without a trailing flag
    system: str | None = None


def flag_of(text: str) -> bool | None:
    """True for a trailing /think, False for /no_think, None without a flag."""
    text = text.rstrip()
    if text.endswith(NO_THINK_FLAG):
        return False
    return True if text.endswith(THINK_FLAG) else None


def without_flag(text: str) -> str:
    text = text.rstrip()
    for flag in (NO_THINK_FLAG, THINK_FLAG):
        if text.endswith(flag):
            return text[:-len(flag)].rstrip()
    return text


def with_flag(text: str, think: bool) -> str:
    return f"{without_flag(text)} {THINK_FLAG if think else NO_THINK_FLAG}"


def synth_conversations(n: int, turns: int, seed: int, tasks: str = PROMPT_TASKS) -> list[Conversation]:
    """`n` conversations of `turns` distinct user requests drawn from the synth tasks."""
    samples = generate(tasks, n * turns, seed=seed)
    prompts = [without_flag(s["messages"][-2]["content"]) for s in samples]
    return [Conversation(prompts[i * turns:(i + 1) * turns]) for i in range(n)]


def load_conversations(path: str | Path) -> list[Conversation]:
    """`{"turns": [user texts], optional "system"}` records; errors name file, line and field."""
    conversations = []
    for location, record in iter_records(Path(path)):
        if not isinstance(record, dict):
            raise SmolforgeError(f"{location}: expected a JSON object with 'turns', got {type(record).__name__}")
        if "turns" not in record:
            raise SmolforgeError(f"{location} field 'turns' is missing (a list of user messages)")
        turns = record["turns"]
        if not isinstance(turns, list) or not turns:
            raise SmolforgeError(f"{location} field 'turns' must be a non-empty list of user messages")
        for i, turn in enumerate(turns):
            if not isinstance(turn, str) or not without_flag(turn).strip():
                raise SmolforgeError(f"{location} field 'turns[{i}]' must be a non-empty string")
        system = record.get("system")
        if system is not None and not isinstance(system, str):
            raise SmolforgeError(f"{location} field 'system' must be a string")
        conversations.append(Conversation(list(turns), system or None))
    if not conversations:
        raise SmolforgeError(f"{path} holds no conversations: one {{\"turns\": [...]}} object per line")
    return conversations


def plan_modes(conversations: Sequence[Conversation], seed: int) -> list[list[bool]]:
    """The mode asked at every turn: the turn's own flag, else /think or /no_think at random."""
    rng = random.Random(seed)
    plan = []
    for conversation in conversations:
        modes = []
        for turn in conversation.turns:
            draw = rng.random() < 0.5  # drawn for every turn, so one flagged turn shifts nothing
            flag = flag_of(turn)
            modes.append(draw if flag is None else flag)
        plan.append(modes)
    return plan


def follow(engine: Engine, template: str, conversations: Sequence[Conversation],
           modes: Sequence[Sequence[bool]], params: SamplingParams,
           batch_size: int) -> list[list[dict[str, Any]]]:
    """Run every conversation turn by turn; per conversation, one record per turn answered.

    A conversation that outgrows the model's context stops there: its later turns are missing
    from the records (the caller reports them as not scored).
    """
    tokenizer = engine.tokenizer
    histories: list[list[dict[str, str]]] = [
        [{"role": "system", "content": c.system}] if c.system else [] for c in conversations]
    records: list[list[dict[str, Any]]] = [[] for _ in conversations]
    stopped: set[int] = set()
    for t in range(max(len(c.turns) for c in conversations)):
        active = [i for i, c in enumerate(conversations) if t < len(c.turns) and i not in stopped]
        if not active:
            break
        rendered = []
        for i in active:
            histories[i].append({"role": "user", "content": with_flag(conversations[i].turns[t], modes[i][t])})
            rendered.append(render_messages(template, histories[i], add_generation_prompt=True))
        completions = generate_fitted(engine, [tokenizer.encode(text) for text in rendered], params, batch_size)
        for i, prompt, completion in zip(active, rendered, completions):
            if completion is None:
                stopped.add(i)
                continue
            reply, think = completion.text or "", modes[i][t]
            records[i].append({"conversation": i, "turn": t + 1, "mode": "think" if think else "no_think",
                               "prompt": histories[i][-1]["content"], "response": reply,
                               "honoured": thinking_honoured(reply, think),
                               "finish_reason": completion.finish_reason})
            _, answer = split_reasoning(reply, in_think=prompt_opens_think(prompt))
            histories[i].append({"role": "assistant", "content": answer})
    return records


def score(records: Sequence[Sequence[dict[str, Any]]], turns: Sequence[int]) -> dict[str, float]:
    """ThinkFollow metrics of per-conversation turn records; `turns[i]` is conversation i's
    length, so a conversation cut short by the context counts in no conversation metric."""
    flat = [r for conversation in records for r in conversation]
    if not flat:
        return {}

    def share(rows: list[dict[str, Any]]) -> float:
        return sum(r["honoured"] for r in rows) / len(rows)

    metrics = {"turn_accuracy": share(flat)}
    for mode in ("think", "no_think"):
        rows = [r for r in flat if r["mode"] == mode]
        if rows:
            metrics[f"{mode}_accuracy"] = share(rows)
    complete = [c for c, length in zip(records, turns) if len(c) == length]
    if complete:
        metrics["conversation_accuracy"] = sum(all(r["honoured"] for r in c) for c in complete) / len(complete)
    for t in range(1, max(r["turn"] for r in flat) + 1):
        metrics[f"turn_{t}_accuracy"] = share([r for r in flat if r["turn"] == t])
    return metrics


def run(ctx: EvalContext) -> TaskResult:
    """The `thinkfollow` eval task."""
    template = chat_template(ctx)
    if ctx.option("data"):
        source = ctx.data_path()
        conversations = load_conversations(source)[:ctx.limit]
        notes = [f"data {source}"]
    else:
        n = int(ctx.option("conversations") or DEFAULT_CONVERSATIONS)
        n = min(n, ctx.limit) if ctx.limit else n
        turns = int(ctx.option("turns", DEFAULT_TURNS))
        if n < 1 or turns < 1:
            raise SmolforgeError(f"thinkfollow needs at least one conversation and one turn, got "
                                 f"conversations={n}, turns={turns}")
        tasks = str(ctx.option("tasks", PROMPT_TASKS))
        conversations = synth_conversations(n, turns, HELD_OUT_SEED + _SEED_OFFSET + ctx.seed, tasks)
        notes = [f"{n} conversations x {turns} turns of {tasks} prompts"]
    modes = plan_modes(conversations, ctx.seed)
    draws, temperature, sampling_notes = sampling_plan(ctx)
    started = time.perf_counter()
    records: list[list[dict[str, Any]]] = []
    for draw in range(draws):
        params = draw_params(ctx.tokenizer, ctx.max_new_tokens, temperature,
                             ctx.seed + draw if draws > 1 else None)
        for conversation in follow(ctx.engine, template, conversations, modes, params, ctx.batch_size):
            records.append([{**r, "draw": draw} for r in conversation])
    seconds = time.perf_counter() - started
    if not any(records):
        raise SmolforgeError(f"thinkfollow: no first turn fits the model's context "
                             f"({ctx.model.config.max_seq_len} tokens); use shorter conversations")
    lengths = [len(c.turns) for c in conversations] * draws
    metrics = score(records, lengths)
    asked, answered = sum(lengths), sum(len(c) for c in records)
    if answered < asked:
        notes.append(f"{asked - answered} of {asked} turns not scored: the conversation outgrew the "
                     "model's context")
    cut = sum(r["finish_reason"] != "stop" for c in records for r in c)
    if cut:
        notes.append(f"{cut} replies cut at max_new_tokens (an unfinished <think> block fails)")
    return TaskResult(task=ctx.task, metrics=metrics, n=answered // draws, seconds=seconds,
                      samples=[r for c in records for r in c], notes=sampling_notes + notes)
