"""Multiple-choice tasks (ARC, HellaSwag, PIQA, OpenBookQA) in the two formats the playbook compares.

Playbook ch. "Evals before everything": early in pretraining a small model cannot yet map an
answer to a letter, so the *cloze* formulation (CF) — which answer text is most likely after the
question — gives signal long before the *multiple-choice* formulation (MCF) — the question with
lettered options, then which letter is most likely — rises above chance. Both are scored here from
log-likelihoods, with no generation:

- cloze: log P(" " + choice | context) for each choice. `cloze_acc` picks the largest sum;
  `cloze_acc_norm` divides each sum by the length of the choice in characters, as
  lm-evaluation-harness's `acc_norm` does (long answers are not penalised for their length);
  `cloze_acc_bytes` divides by UTF-8 bytes (lm-eval's `acc_bytes`; equal for ASCII text).
- MCF: the context lists the choices as "A. ...", "B. ...", ends with "Answer:", and the
  choice whose letter " A", " B", ... is most likely wins (`mcf_acc`).

Context: queries that start with "Question:" (ARC, PIQA in llm-foundry's format) get
"\\nAnswer:" appended; others (OpenBookQA, HellaSwag) are sentence beginnings the choice
continues. The harness bridge's task YAMLs use the same strings, so the two agree.

Tokenization follows lm-eval's `_encode_pair` for causal models: trailing spaces of the context
move to the continuation, the context and the context + continuation are encoded, and the
continuation's tokens are the tail of the latter past the context's length. That keeps the
tokens the model would have seen for the whole text (a BPE merge across the boundary stays
intact) and makes the log-likelihoods equal to lm-eval's on the same model.

Records: `{"query", "choices", "gold"}` (0-based index; llm-foundry's format, ../shared/data/mc)
or HellaSwag's `{"ctx", "endings", "label"}`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from smolforge.errors import SmolforgeError, where
from smolforge.eval.core import EvalContext, TaskResult, field_of, read_examples

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
FORMATS = ("cloze", "mcf")


@dataclass(frozen=True)
class Question:
    query: str
    choices: list[str]
    gold: int
    location: str


def parse_question(record: dict[str, Any], location: str) -> Question:
    """A question from either record format; errors name the file, line and field."""
    if "ctx" in record and "endings" in record:  # HellaSwag
        names = ("ctx", "endings", "label")
    elif "query" in record or "choices" in record:
        names = ("query", "choices", "gold")
    else:
        raise SmolforgeError(f"{location}: expected a multiple-choice record "
                             f"{{query, choices, gold}} or {{ctx, endings, label}}; got keys "
                             f"{', '.join(record) or 'none'}")
    query_key, choices_key, gold_key = names
    query = field_of(record, location, query_key, str)
    if not query.strip():
        raise SmolforgeError(f"{where(location, field=query_key)}: empty question")
    choices = field_of(record, location, choices_key, list)
    if len(choices) < 2:
        raise SmolforgeError(f"{where(location, field=choices_key)}: needs at least 2 choices, got {len(choices)}")
    if len(choices) > len(LETTERS):
        raise SmolforgeError(f"{where(location, field=choices_key)}: at most {len(LETTERS)} choices")
    for i, choice in enumerate(choices):
        if not isinstance(choice, str) or not choice.strip():
            raise SmolforgeError(f"{where(location, field=f'{choices_key}[{i}]')}: "
                                 "every choice must be a non-empty string")
    gold = field_of(record, location, gold_key, (int, str))
    if isinstance(gold, str):  # HellaSwag stores the label as a string
        if not gold.strip().isdigit():
            raise SmolforgeError(f"{where(location, field=gold_key)}: expected a choice index, got {gold!r}")
        gold = int(gold)
    if not 0 <= gold < len(choices):
        raise SmolforgeError(f"{where(location, field=gold_key)}: index {gold} outside the "
                             f"{len(choices)} choices (0-based)")
    return Question(query, list(choices), gold, location)


def cloze_context(query: str) -> str:
    query = query.strip()
    return f"{query}\nAnswer:" if query.startswith("Question:") else query


def mcf_context(question: Question) -> str:
    query = question.query.strip()
    if not query.startswith("Question:"):
        query = f"Question: {query}"
    options = [f"{LETTERS[i]}. {choice.strip()}" for i, choice in enumerate(question.choices)]
    return "\n".join([query, *options, "Answer:"])


# --- log-likelihoods --------------------------------------------------------------------------------


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) split as lm-eval's `_encode_pair` does (module docstring)."""
    if not context:  # lm-eval conditions on the prefix token (here EOS) when there is no context
        return [tokenizer.eos_id], tokenizer.encode(continuation)
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    context_ids = tokenizer.encode(context)
    return context_ids, whole[len(context_ids):]


@torch.inference_mode()
def loglikelihoods(model: torch.nn.Module, tokenizer: Any, requests: Sequence[tuple[str, str]],
                   batch_size: int = 16) -> list[tuple[float, bool]]:
    """(log P(continuation | context), whether greedy decoding gives the continuation) per request.

    Requests whose model input is the same (the MCF letters " A", " B", ... after one context)
    share one row: its logits already hold every letter's log-probability, as lm-eval's
    one-token-continuation grouping does. Rows are sorted longest first and right-padded into
    batches of one forward each; with a causal mask, padding after a row's last token cannot
    change its logits. A sequence longer than the context length keeps its last
    `max_seq_len + 1` tokens, as lm-eval does.
    """
    max_len = model.config.max_seq_len
    device = next(model.parameters()).device
    encoded = []
    rows_of: dict[tuple[int, ...], list[int]] = {}  # model input -> the requests it scores
    for i, (context, continuation) in enumerate(requests):
        context_ids, continuation_ids = encode_pair(tokenizer, context, continuation)
        if not continuation_ids:
            raise ValueError(f"request {i}: the continuation {continuation!r} encodes to no tokens")
        whole = (context_ids + continuation_ids)[-(max_len + 1):]
        encoded.append((whole, min(len(continuation_ids), len(whole) - 1)))
        rows_of.setdefault(tuple(whole[:-1]), []).append(i)
    inputs_sorted = sorted(rows_of, key=len, reverse=True)
    results: list[tuple[float, bool]] = [(0.0, False)] * len(encoded)
    for start in range(0, len(inputs_sorted), batch_size):
        batch = inputs_sorted[start : start + batch_size]
        input_ids = torch.zeros(len(batch), len(batch[0]), dtype=torch.long)
        batch_rows, positions, targets, owners = [], [], [], []
        for b, inputs in enumerate(batch):
            input_ids[b, : len(inputs)] = torch.tensor(inputs)
            for i in rows_of[inputs]:
                whole, n_cont = encoded[i]
                batch_rows += [b] * n_cont  # logits at the last n_cont positions predict the continuation
                positions += range(len(inputs) - n_cont, len(inputs))
                targets += whole[-n_cont:]
                owners.append((i, n_cont))
        logits = model(input_ids.to(device)).logits
        picked = logits[torch.tensor(batch_rows, device=device), torch.tensor(positions, device=device)]
        logprobs = picked.float().log_softmax(-1)
        target = torch.tensor(targets, device=device)
        token_ll = logprobs.gather(-1, target[:, None]).squeeze(-1).cpu().double()
        greedy = (logprobs.argmax(-1) == target).cpu()
        offset = 0
        for i, n_cont in owners:
            results[i] = (float(token_ll[offset : offset + n_cont].sum()), bool(greedy[offset : offset + n_cont].all()))
            offset += n_cont
    return results


# --- the task -----------------------------------------------------------------------------------


def _formats(ctx: EvalContext) -> list[str]:
    raw = ctx.option("formats", list(FORMATS))
    formats = [f.strip() for f in raw.split(",")] if isinstance(raw, str) else list(raw)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise SmolforgeError(f"{ctx.task}: formats {unknown or formats!r}: expected some of {', '.join(FORMATS)}")
    return formats


def requests_for(question: Question, formats: Sequence[str]) -> list[tuple[str, str]]:
    """The (context, continuation) pairs of one question: cloze choices, then MCF letters."""
    requests = []
    if "cloze" in formats:
        context = cloze_context(question.query)
        requests += [(context, f" {choice}") for choice in question.choices]
    if "mcf" in formats:
        context = mcf_context(question)
        requests += [(context, f" {LETTERS[i]}") for i in range(len(question.choices))]
    return requests


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # ties: the first, as np.argmax


def score_question(question: Question, lls: Sequence[float], formats: Sequence[str]) -> dict[str, Any]:
    """Predictions and correctness of one question from its requests' log-likelihoods."""
    k = len(question.choices)
    record: dict[str, Any] = {"query": question.query, "choices": question.choices, "gold": question.gold}
    correct: dict[str, bool] = {}
    if "cloze" in formats:
        cloze, lls = list(lls[:k]), lls[k:]
        chars = [len(c) for c in question.choices]
        nbytes = [len(c.encode("utf-8")) for c in question.choices]
        preds = {"cloze_acc": _argmax(cloze),
                 "cloze_acc_norm": _argmax([ll / n for ll, n in zip(cloze, chars)]),
                 "cloze_acc_bytes": _argmax([ll / n for ll, n in zip(cloze, nbytes)])}
        record["cloze_loglikelihoods"] = cloze
        record.update({f"{name}_pred": pred for name, pred in preds.items()})
        correct.update({name: pred == question.gold for name, pred in preds.items()})
    if "mcf" in formats:
        mcf = list(lls[:k])
        record["mcf_loglikelihoods"] = mcf
        record["mcf_pred"] = _argmax(mcf)
        correct["mcf_acc"] = record["mcf_pred"] == question.gold
    record["correct"] = correct
    return record


def run(ctx: EvalContext) -> TaskResult:
    """Cloze and MCF accuracy on a multiple-choice JSONL file."""
    path = ctx.data_path()
    formats = _formats(ctx)
    questions = ctx.take([parse_question(record, location) for location, record in read_examples(path)])
    start = time.perf_counter()
    per_question = [requests_for(q, formats) for q in questions]
    flat = [r for requests in per_question for r in requests]
    lls = [ll for ll, _ in loglikelihoods(ctx.model, ctx.tokenizer, flat, ctx.batch_size)]
    samples, offset = [], 0
    for question, requests in zip(questions, per_question):
        samples.append(score_question(question, lls[offset : offset + len(requests)], formats))
        offset += len(requests)
    seconds = time.perf_counter() - start
    names = [m for m in ("cloze_acc_norm", "cloze_acc", "cloze_acc_bytes", "mcf_acc") if m in samples[0]["correct"]]
    metrics = {name: sum(s["correct"][name] for s in samples) / len(samples) for name in names}
    chance = sum(1 / len(q.choices) for q in questions) / len(questions)
    notes = ["0-shot", f"chance {chance:.3f}", f"data: {path}"]
    return TaskResult(task=ctx.task, metrics=metrics, n=len(samples), seconds=seconds,
                      samples=samples, notes=notes)
