"""GSM8K (Cobbe et al. 2021): grade-school word problems, answered by generation and checked.

How a question is scored (playbook ch. "Evals before everything": generative evals need robust
answer extraction, and reasoning is stripped before scoring):
1. Prompt: with a chat template (the tokenizer's own) the question is the user turn, few-shot
   examples earlier user/assistant turns; without one, plain "Question: ...\\nAnswer:" prompting
   as lm-eval's `gsm8k` task does. Few-shot examples come from a separate file
   (`fewshot_data`, the train split), never from the set being scored.
2. Generation with the one engine, batched; greedy, or k draws at a temperature (avg@k).
3. Extraction from the reply with any `<think>` block removed: "#### N" (GSM8K's own answer
   format), else the last `\\boxed{...}`, else "the answer is N", else the last number in the
   text. Thousands separators, "$" and a trailing full stop are dropped.
4. Check with `math-verify` (Hugging Face's math answer verifier) against the number after
   "####" in the gold answer, so "18", "18.0" and "$18" all match 18.
"""

from __future__ import annotations

import random
import re
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from smolforge.chat.render import end_of_turn_ids
from smolforge.data.synth import strip_thinking
from smolforge.engine import SamplingParams
from smolforge.errors import SmolforgeError, where
from smolforge.eval.core import EvalContext, TaskResult, field_of, generate_fitted, read_examples

# A number: optional minus (not a subtraction: no digit or letter right before it), optional "$",
# digits with proper thousands separators or none, optional decimals; ".5" too.
_NUMBER = re.compile(r"(?:(?<![\w.])-)?\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|(?:(?<![\w.])-)?\.\d+")
_HASHES = re.compile(r"####\s*([^\n]*)")
_ANSWER_IS = re.compile(r"answer\s+is\s*:?\s*([^\n]*)", re.IGNORECASE)
_CALCULATOR = re.compile(r"<<[^>]*>>")  # GSM8K's calculator annotations, "<<16-3-4=9>>"
PLAIN_STOPS = ["Question:", "</s>", "<|im_end|>"]  # lm-eval's gsm8k `until`


def normalise_number(text: str) -> str:
    """'$1,234.' -> '1234'; '-$5' -> '-5'; '3.50' stays '3.50' (math-verify compares values)."""
    return text.replace("$", "").replace(",", "").strip().rstrip(".")


def _first_number(text: str) -> str | None:
    match = _NUMBER.search(text)
    return normalise_number(match.group()) if match else None


def _last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...}, braces balanced; None without one."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j].strip()
    return None  # unclosed


def extract_answer(response: str) -> str | None:
    """The final answer of a reply (module docstring, step 3); None when it holds no number."""
    text = strip_thinking(response)
    hashes = _HASHES.findall(text)
    if hashes and (number := _first_number(hashes[-1])) is not None:
        return number
    boxed = _last_boxed(text)
    if boxed:
        number = _NUMBER.fullmatch(normalise_number(boxed).removeprefix("\\"))
        return normalise_number(number.group()) if number else boxed
    stated = _ANSWER_IS.findall(text)
    if stated and (number := _first_number(stated[-1])) is not None:
        return number
    numbers = _NUMBER.findall(text)
    return normalise_number(numbers[-1]) if numbers else None


def gold_answer(answer: str, location: str = "") -> str:
    """The number after '####' of a GSM8K answer."""
    parts = answer.rsplit("####", 1)
    if len(parts) != 2 or not parts[1].strip():
        raise SmolforgeError(f"{where(location, field='answer')}: no final answer after '####'")
    return normalise_number(parts[1])


def is_correct(predicted: str | None, gold: str) -> bool:
    """Whether `predicted` equals `gold` by value, through math-verify."""
    if predicted is None:
        return False
    try:
        if float(predicted) == float(gold):  # the common case, without sympy
            return True
    except ValueError:
        pass
    try:
        from math_verify import parse, verify
    except ImportError:
        raise SmolforgeError("gsm8k checks answers with math-verify: pip install 'smolforge[eval]'") from None
    # math-verify's timeouts use SIGALRM, which only the main thread may set.
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    return verify(parse(gold, parsing_timeout=timeout), parse(predicted, parsing_timeout=timeout),
                  timeout_seconds=timeout)


# --- prompts ----------------------------------------------------------------------------------------


def read_problems(path: str | Path) -> list[dict[str, str]]:
    """{question, answer, target, location} of every record; errors name file, line and field."""
    problems = []
    for location, record in read_examples(path):
        question = field_of(record, location, "question", str)
        answer = field_of(record, location, "answer", str)
        if not question.strip():
            raise SmolforgeError(f"{where(location, field='question')}: empty")
        problems.append({"question": question, "answer": answer,
                         "target": gold_answer(answer, location), "location": location})
    return problems


def worked_answer(answer: str) -> str:
    """A GSM8K answer as a few-shot reply: calculator annotations removed, '#### N' kept."""
    return _CALCULATOR.sub("", answer).strip()


def fewshot_examples(ctx: EvalContext) -> list[dict[str, str]]:
    k = int(ctx.option("num_fewshot", 0))
    if k <= 0:
        return []
    if not ctx.option("fewshot_data"):
        raise SmolforgeError(f"{ctx.task}: {k}-shot needs examples from another split: set "
                             f"fewshot_data (--set {ctx.task}.fewshot_data=train.jsonl)")
    if Path(ctx.option("fewshot_data")).resolve() == ctx.data_path().resolve():
        raise SmolforgeError(f"{ctx.task}: fewshot_data is the file being scored; draw few-shot examples "
                             "from another split (the train file), or the scores leak the answers")
    pool = read_problems(ctx.option("fewshot_data"))
    if k > len(pool):
        raise SmolforgeError(f"{ctx.option('fewshot_data')}: {k}-shot asked, only {len(pool)} examples")
    return random.Random(ctx.seed).sample(pool, k)  # one fixed set for every question


def chat_prompt(template: str, question: str, shots: Sequence[dict[str, str]],
                template_kwargs: dict[str, Any]) -> str:
    from smolforge.chat.render import render_messages

    messages = []
    for shot in shots:
        messages += [{"role": "user", "content": shot["question"]},
                     {"role": "assistant", "content": worked_answer(shot["answer"])}]
    messages.append({"role": "user", "content": question})
    return render_messages(template, messages, add_generation_prompt=True, **template_kwargs)


def plain_prompt(question: str, shots: Sequence[dict[str, str]]) -> str:
    examples = [f"Question: {s['question']}\nAnswer: {worked_answer(s['answer'])}\n\n" for s in shots]
    return "".join(examples) + f"Question: {question}\nAnswer:"


def _use_chat(ctx: EvalContext) -> bool:
    chat = ctx.option("chat", "auto")
    if chat == "auto":
        return bool(ctx.tokenizer.chat_template)
    if chat and not ctx.tokenizer.chat_template:
        raise SmolforgeError(f"{ctx.task}: chat prompting asked, but the tokenizer has no chat template")
    return bool(chat)


def _generation_budget(ctx: EvalContext, prompts: list[list[int]]) -> tuple[int, list[str]]:
    """max_new_tokens, lowered to fit the longest prompt into the context length."""
    limit, longest = ctx.model.config.max_seq_len, max(len(p) for p in prompts)
    if longest >= limit:
        raise SmolforgeError(f"{ctx.task}: a prompt of {longest} tokens leaves no room to answer within "
                             f"the model's context length ({limit}); lower num_fewshot")
    budget = min(ctx.max_new_tokens, limit - longest)
    notes = [f"max_new_tokens capped at {budget} by the context length"] if budget < ctx.max_new_tokens else []
    return budget, notes


def run(ctx: EvalContext) -> TaskResult:
    """avg@k accuracy (k = ctx.samples) on a GSM8K-format JSONL file."""
    path = ctx.data_path()
    problems = ctx.take(read_problems(path))
    shots = fewshot_examples(ctx)
    tokenizer, k = ctx.tokenizer, max(1, ctx.samples)
    use_chat = _use_chat(ctx)
    if use_chat:
        kwargs = dict(ctx.option("chat_template_kwargs", {}))
        texts = [chat_prompt(tokenizer.chat_template, p["question"], shots, kwargs) for p in problems]
        stop, stop_ids = [], end_of_turn_ids(tokenizer)
    else:
        texts = [plain_prompt(p["question"], shots) for p in problems]
        stop, stop_ids = PLAIN_STOPS, []
    prompts = tokenizer.encode_batch(texts)
    budget, notes = _generation_budget(ctx, prompts)
    start = time.perf_counter()
    responses: list[list[str]] = [[] for _ in problems]
    for draw in range(k):
        params = SamplingParams(max_new_tokens=budget, temperature=ctx.temperature, stop=stop,
                                stop_token_ids=stop_ids, seed=ctx.seed + draw)
        for replies, completion in zip(responses, generate_fitted(ctx.engine, prompts, params, ctx.batch_size)):
            replies.append(completion.text or "" if completion is not None else "")
    samples, correct_total, solved, answered = [], 0, 0, 0
    for problem, text, replies in zip(problems, texts, responses):
        extracted = [extract_answer(r) for r in replies]
        correct = [is_correct(x, problem["target"]) for x in extracted]
        correct_total += sum(correct)
        solved += any(correct)
        answered += sum(x is not None for x in extracted)
        samples.append({"prompt": text, "question": problem["question"], "target": problem["target"],
                        "responses": replies, "extracted": extracted, "correct": correct,
                        "score": sum(correct) / k})
    seconds = time.perf_counter() - start
    n = len(problems)
    metrics = {"accuracy": correct_total / (n * k)}
    if k > 1:
        metrics[f"pass@{k}"] = solved / n
    metrics["answered"] = answered / (n * k)
    notes = [f"avg@{k}" if k > 1 else "greedy" if ctx.temperature == 0 else f"T={ctx.temperature}",
             f"{len(shots)}-shot", "chat template" if use_chat else "plain prompt", f"data: {path}", *notes]
    if k > 1 and ctx.temperature == 0:
        notes.append(f"warning: {k} greedy draws are identical; set a temperature")
    return TaskResult(task=ctx.task, metrics=metrics, n=n, seconds=seconds, samples=samples, notes=notes)
