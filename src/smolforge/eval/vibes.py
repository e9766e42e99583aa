"""Vibe test: a fixed prompt set whose transcripts are kept next to the checkpoint and compared
with the previous stage's.

The playbook's rule (ch. 07, "always vibe-test your model, even when the evals look fine"): read
what the model writes. Its own vibe test caught a chat-template bug that no benchmark saw, a
persona set through `custom_instructions` that the model dropped mid-conversation. So the set
holds general questions, system-prompt personas, a `/think` and a `/no_think` request and
multi-turn conversations. Every prompt is answered greedily (comparable from stage to stage)
and once sampled at SmolLM3's defaults (temperature 0.6, top-p 0.95: what users will see).

Outputs in the eval directory: `vibes.jsonl` (one record per prompt) and `vibes.md` (readable
transcripts). When an ancestor of the checkpoint (its `parent` in smolforge.json, then that
one's parent, ...) was vibe-tested too, vibes.md ends with a before/after section per prompt
and the metrics say how much changed. Metrics: `mean_reply_tokens` (greedy), `empty_replies`
(share), and with an ancestor `changed_vs_parent` (share of greedy replies that differ) and
`similarity_to_parent` (mean difflib ratio, 1 = identical). Options: `data` (your own prompts,
`{"messages": [...], optional "id", "chat_template_kwargs"}` per line).
"""

from __future__ import annotations

import difflib
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from smolforge.chat.render import render_messages
from smolforge.data.sources import iter_records
from smolforge.data.synth import write_jsonl
from smolforge.errors import SmolforgeError
from smolforge.eval.core import chat_template, draw_params, generate_fitted
from smolforge.train.checkpoint import read_meta

if TYPE_CHECKING:
    from smolforge.eval.core import EvalContext, TaskResult

TRANSCRIPTS, READABLE = "vibes.jsonl", "vibes.md"
SAMPLED_TEMPERATURE, SAMPLED_TOP_P = 0.6, 0.95  # SmolLM3's sampling defaults (playbook ch. 07)
MAX_ANCESTORS = 32  # a parent cycle (a hand-edited smolforge.json) must not loop forever


def _chat(*turns: str, system: str | None = None) -> list[dict[str, str]]:
    """Alternating user / assistant messages, optionally after a system prompt."""
    head = [{"role": "system", "content": system}] if system else []
    return head + [{"role": "user" if i % 2 == 0 else "assistant", "content": text}
                   for i, text in enumerate(turns)]


# Written for this project; short and plain, so a few-million-parameter model trained on the
# quickstart's smol tasks has a chance on some, and a real model shows its manners on all.
PROMPTS: list[dict[str, Any]] = [
    {"id": "capital", "messages": _chat("What is the capital of France?")},
    {"id": "haiku", "messages": _chat("Write a haiku about the sea.")},
    {"id": "explain", "messages": _chat("Explain in two sentences why the sky is blue.")},
    {"id": "advice", "messages": _chat("I feel tired every afternoon. Any advice?")},
    {"id": "addition", "messages": _chat("What is 23 + 45?")},
    {"id": "format", "messages": _chat("Name three words about the night, in capital letters.")},
    {"id": "persona-pirate", "messages": _chat(
        "Who are you?", system="You are a pirate. Always begin your reply with Arr!")},
    {"id": "persona-knight", "messages": _chat(
        "What do you love?", system="You are a knight. Always end your reply with Hail!")},
    {"id": "persona-teacher", "messages": _chat(
        "How do plants make food?", system="You are a patient teacher of ten-year-olds. Use simple words.")},
    {"id": "think", "messages": _chat("Reverse the word crown. /think")},
    {"id": "no-think", "messages": _chat("How many times does the letter e appear in queen? /no_think")},
    {"id": "multi-turn-memory", "messages": _chat(
        "My name is Kate and I keep bees.", "Nice to meet you, Kate! Bees are wonderful.",
        "What is my name, and what do I keep?")},
    {"id": "multi-turn-persona", "messages": _chat(
        "Hello!", "Arr! Ahoy there, friend.", "What is 10 + 5?",
        system="You are a pirate. Always begin your reply with Arr!")},
]


def load_prompts(path: str | Path) -> list[dict[str, Any]]:
    """Your own vibe prompts: `{"messages": [...], optional "id", "chat_template_kwargs"}` lines,
    each conversation ending with a user turn. Errors name file, line and field."""
    prompts, ids = [], set()
    for location, record in iter_records(Path(path)):
        if not isinstance(record, dict) or "messages" not in record:
            raise SmolforgeError(f"{location} field 'messages' is missing (a conversation ending with a "
                                 "user turn)")
        messages = record["messages"]
        if (not isinstance(messages, list) or not messages
                or not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages)):
            raise SmolforgeError(f"{location} field 'messages' must be a non-empty list of "
                                 "{role, content} objects")
        if messages[-1].get("role") != "user":
            raise SmolforgeError(f"{location} field 'messages' must end with a user turn, got "
                                 f"{messages[-1].get('role')!r}")
        prompt_id = str(record.get("id", f"prompt-{len(prompts) + 1}"))
        if prompt_id in ids:
            raise SmolforgeError(f"{location} field 'id': {prompt_id!r} is used twice")
        ids.add(prompt_id)
        prompts.append({"id": prompt_id, "messages": messages,
                        "chat_template_kwargs": record.get("chat_template_kwargs") or {}})
    if not prompts:
        raise SmolforgeError(f"{path} holds no vibe prompts")
    return prompts


def ancestor_transcripts(checkpoint: Path | None, out_dir: Path | None) -> tuple[Path, dict[str, Any]] | None:
    """(file, that checkpoint's smolforge.json) of the nearest ancestor's vibes.jsonl, or None.

    An ancestor's transcripts are looked for where this eval writes its own (the same place
    relative to the checkpoint), then in `<ancestor>/eval/` (the runner's default) and
    `<ancestor>/`.
    """
    if checkpoint is None:
        return None
    relative = None
    if out_dir is not None:
        try:
            relative = Path(out_dir).resolve().relative_to(Path(checkpoint).resolve())
        except ValueError:
            relative = None
    current, seen = Path(checkpoint), 0
    while seen < MAX_ANCESTORS:
        parent = read_meta(current).get("parent") if current.is_dir() else None
        if not parent:
            return None
        current, seen = Path(parent), seen + 1
        for place in (relative, Path("eval"), Path(".")):
            if place is not None and (current / place / TRANSCRIPTS).is_file():
                return current / place / TRANSCRIPTS, read_meta(current) if current.is_dir() else {}
    return None


def read_transcripts(path: Path) -> dict[str, dict[str, Any]]:
    """Records of a vibes.jsonl by prompt id (a malformed file is an error naming its line)."""
    records = {}
    for location, record in iter_records(path):
        if not isinstance(record, dict) or not {"id", "messages", "greedy"} <= set(record):
            raise SmolforgeError(f"{location}: not a vibes transcript (needs id, messages, greedy)")
        records[record["id"]] = record
    return records


def compare(records: list[dict[str, Any]], before: dict[str, dict[str, Any]]) -> list[tuple[dict, dict]]:
    """(before, now) pairs for the prompts asked the same way in both runs."""
    return [(before[r["id"]], r) for r in records
            if r["id"] in before and before[r["id"]]["messages"] == r["messages"]]


def _fenced(text: str) -> str:
    if not text.strip():
        return f"(empty reply: {text!r})"
    return "````text\n" + text + "\n````"


def _conversation(messages: list[dict[str, str]]) -> str:
    return "\n".join(f"> **{m['role']}**: " + m["content"].replace("\n", "\n> ") for m in messages)


def render_markdown(records: list[dict[str, Any]], checkpoint: Path | None,
                    pairs: list[tuple[dict, dict]], before_name: str | None) -> str:
    """vibes.md: every transcript, then (with an ancestor) the before/after section."""
    lines = [f"# Vibe test: {checkpoint}", "",
             f"Greedy and sampled (temperature {SAMPLED_TEMPERATURE}, top-p {SAMPLED_TOP_P}) replies to "
             f"{len(records)} fixed prompts. Read them: the playbook's vibe test found a template bug "
             "that no benchmark caught.", ""]
    for i, record in enumerate(records, 1):
        lines += [f"## {i}. {record['id']}", "", _conversation(record["messages"]), "",
                  "greedy:", "", _fenced(record["greedy"]), "", "sampled:", "", _fenced(record["sampled"]), ""]
    if pairs:
        changed = sum(a["greedy"] != b["greedy"] for a, b in pairs)
        lines += [f"# Compared with {before_name}", "",
                  f"{changed} of {len(pairs)} greedy replies changed.", ""]
        for before, now in pairs:
            same = before["greedy"] == now["greedy"]
            lines += [f"## {now['id']}" + (" (unchanged)" if same else ""), "",
                      _conversation(now["messages"]), ""]
            if not same:
                lines += ["before:", "", _fenced(before["greedy"]), "", "now:", "", _fenced(now["greedy"]), ""]
    return "\n".join(lines)


def run(ctx: EvalContext) -> TaskResult:
    """The `vibes` eval task."""
    from smolforge.eval.core import TaskResult

    template = chat_template(ctx)
    prompts = load_prompts(ctx.data_path()) if ctx.option("data") else PROMPTS
    prompts = prompts[:ctx.limit]
    tokenizer = ctx.tokenizer
    encoded = [tokenizer.encode(render_messages(template, p["messages"], add_generation_prompt=True,
                                                **(p.get("chat_template_kwargs") or {})))
               for p in prompts]
    started = time.perf_counter()
    greedy = generate_fitted(ctx.engine, encoded, draw_params(tokenizer, ctx.max_new_tokens, 0.0, None),
                             ctx.batch_size)
    sampled = generate_fitted(ctx.engine, encoded, draw_params(tokenizer, ctx.max_new_tokens, SAMPLED_TEMPERATURE,
                                                               ctx.seed, top_p=SAMPLED_TOP_P), ctx.batch_size)
    seconds = time.perf_counter() - started
    records = [{"id": p["id"], "messages": p["messages"],
                "greedy": (g.text or "") if g else "", "sampled": (s.text or "") if s else "",
                "greedy_tokens": len(g.tokens) if g else 0,
                "finish_reason": g.finish_reason if g else "context_full"}
               for p, g, s in zip(prompts, greedy, sampled)]
    metrics = {"mean_reply_tokens": sum(r["greedy_tokens"] for r in records) / max(len(records), 1),
               "empty_replies": sum(not r["greedy"].strip() for r in records) / max(len(records), 1)}
    notes = [f"{len(records)} prompts, greedy + one sample"]
    found = ancestor_transcripts(ctx.checkpoint, ctx.out_dir)
    pairs, before_name = [], None
    if found is not None:
        path, meta = found
        pairs = compare(records, read_transcripts(path))
        before_name = f"{meta.get('stage') or 'the previous stage'} ({path.parent})"
        if pairs:
            metrics["changed_vs_parent"] = sum(a["greedy"] != b["greedy"] for a, b in pairs) / len(pairs)
            metrics["similarity_to_parent"] = sum(difflib.SequenceMatcher(None, a["greedy"], b["greedy"]).ratio()
                                                  for a, b in pairs) / len(pairs)
            notes.append(f"compared with {path}")
    if ctx.out_dir is not None:
        out = Path(ctx.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_jsonl(records, out / TRANSCRIPTS)
        (out / READABLE).write_text(render_markdown(records, ctx.checkpoint, pairs, before_name), encoding="utf-8")
        notes.append(f"transcripts in {out / READABLE}")
    return TaskResult(task=ctx.task, metrics=metrics, n=len(records), seconds=seconds,
                      samples=records, notes=notes)
