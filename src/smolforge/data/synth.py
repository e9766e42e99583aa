"""Synthetic, verifiable chat tasks for SFT on a laptop CPU: `smolforge data synth`.

Why: a ~10M-parameter model pretrained on Shakespeare cannot learn open-ended chat in minutes,
but it can learn short tasks whose answers a program checks. That is the playbook's chapter 07
recipe (IFEval-style constraints, RLVR verifiers, hybrid reasoning) shrunk to toy size. Each
sample carries its checker as data (`"check"`), so SFT evaluation, rejection sampling and RL
rewards all score with the same `check_response`.

Hybrid reasoning follows SmolLM3's IFThink data: a sample is in think or no_think mode.
Think-mode assistant turns carry a short step-by-step `reasoning_content` (the chat template
renders it inside <think>...</think>); no_think turns carry none. The mode is always given by
`chat_template_kwargs.enable_thinking`, and in about two thirds of single-turn samples also by a
`/think` or `/no_think` flag at the end of the system or user message, which always agrees.
`multiturn` flags every user turn and switches mode between turns; its checker and
`enable_thinking` belong to the last turn.

One JSON line per sample:
  {"messages": [{"role", "content", optional "reasoning_content"}],
   "chat_template_kwargs": {"enable_thinking": bool}, "task": str, "check": {...}}
Checker specs (`check_response`; the response is stripped of any <think> block and whitespace):
  {"type": "exact", "answer": "579"}      last non-empty line == answer ("Answer:" prefix, one
                                          trailing period and repeated spaces ignored)
  {"type": "uppercase"} / {"type": "lowercase"}    has letters, all in that case
  {"type": "word_count", "n": 4}          exactly n whitespace-separated words
  {"type": "starts_with", "prefix": "Arr!"} / {"type": "ends_with", "suffix": "farewell"}
  {"type": "contains", "text": "579"}     text occurs as a whole word / number
  {"type": "json_keys", "keys": ["name", "age"]}   a JSON object with exactly these keys
  {"type": "all", "checks": [...]}        every sub-check passes
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from smolforge.errors import SmolforgeError

THINK_FLAG, NO_THINK_FLAG = "/think", "/no_think"

# Short common words: the target tokenizer is a ~2k byte-level BPE trained on Shakespeare, so
# each is one or two tokens and already familiar to the pretrained model.
WORDS = ("king queen lord lady love night day moon sun star sea ship sword crown rose heart fire "
         "wind rain gold ring horse field tree bird fool song bell door stone house wine bread "
         "cup hand eye face land time war peace maid").split()
TOPICS = {
    "the sea": "wave ship salt tide fish sail storm shore".split(),
    "the night": "moon star dark owl sleep dream cold bell".split(),
    "the king": "crown throne gold court lord sword realm war".split(),
    "love": "heart rose kiss sweet dear fair true ring".split(),
    "the field": "grass horse tree rain sun bird corn sheep".split(),
}
ALL_WORDS = sorted(set(WORDS).union(*TOPICS.values()))
PERSONAS = (("pirate", "Arr!"), ("knight", "Hail!"), ("bard", "Hark!"), ("ghost", "Boo!"),
            ("cat", "Meow!"), ("fool", "Ho!"))
END_PHRASES = ("good night", "farewell", "so it is", "the end", "amen")
JSON_VALUES: dict[str, tuple] = {
    "name": ("kate", "tom", "anne", "hal", "ned", "bess"),
    "color": ("red", "blue", "green", "white", "black"),
    "city": ("rome", "york", "paris", "venice", "athens"),
    "animal": ("horse", "dog", "cat", "owl", "sheep"),
    "age": tuple(range(5, 90)),
}
SYSTEM_PROMPTS = ("You are a helpful assistant.", "Answer briefly.", "You are a kind helper.")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven")
PLACES = ("ones", "tens", "hundreds", "thousands")
# Give up de-duplicating after this many draws of the same prompt: tiny task spaces (n larger
# than the number of distinct prompts) then get repeats instead of an endless loop.
_MAX_TRIES = 30


@dataclass(frozen=True)
class _Turn:
    """One user request with its gold answer, its step-by-step reasoning and its checker."""

    prompt: str
    answer: str
    reasoning: str
    check: dict


# --- tasks ---------------------------------------------------------------------------------------


def _add_trace(a: int, b: int) -> list[str]:
    """Column addition from the ones place, as a child would write it: digit, sum, carry."""
    da, db, lines, carry = str(a)[::-1], str(b)[::-1], [], 0
    for i in range(max(len(da), len(db))):
        x, y = int(da[i]) if i < len(da) else 0, int(db[i]) if i < len(db) else 0
        total = x + y + carry
        terms = f"{x} + {y}" + (f" + {carry}" if carry else "")
        carry, digit = divmod(total, 10)
        lines.append(f"{PLACES[i]}: {terms} = {total}, write {digit}" + (", carry 1" if carry else ""))
    if carry:
        lines.append(f"{PLACES[len(lines)]}: write the carry 1")
    return lines


def _sub_trace(a: int, b: int) -> list[str]:
    """Column subtraction (a >= b) with explicit borrows."""
    da, db, lines, borrow = str(a)[::-1], str(b)[::-1], [], 0
    for i in range(len(da)):
        x, y = int(da[i]), int(db[i]) if i < len(db) else 0
        top, terms = x - borrow, f"{x} - 1" if borrow else f"{x}"
        if top < y:
            lines.append(f"{PLACES[i]}: {terms} - {y}, borrow 10: {top + 10} - {y} = {top + 10 - y}")
            borrow = 1
        else:
            lines.append(f"{PLACES[i]}: {terms} - {y} = {top - y}")
            borrow = 0
    return lines


def _mul_digit(a: int, d: int) -> str:
    """a * d split by the place values of a: 47 * 3 = 40 * 3 + 7 * 3 = 120 + 21 = 141."""
    digits = str(a)
    parts = [int(c) * 10 ** (len(digits) - 1 - i) for i, c in enumerate(digits) if c != "0"]
    if len(parts) == 1:
        return f"{a} * {d} = {a * d}"
    return (f"{a} * {d} = " + " + ".join(f"{p} * {d}" for p in parts) + " = "
            + " + ".join(str(p * d) for p in parts) + f" = {a * d}")


def _mul_trace(a: int, b: int) -> list[str]:
    """Long multiplication by one or two digits: one partial product per digit of b, then sum."""
    if b < 10:
        return [_mul_digit(a, b)]
    tens, ones = divmod(b, 10)
    lines = [_mul_digit(a, ones)] if ones else []
    lines += [_mul_digit(a, tens), f"{a} * {tens * 10} = {a * tens} * 10 = {a * tens * 10}"]
    if ones:
        lines.append(f"{a * ones} + {a * tens * 10} = {a * b}")
    return lines


def _arithmetic(rng: random.Random, easy: bool = False) -> _Turn:
    """+, - and * with column traces; `easy`: + and - of two-digit numbers only (the quickstart's
    ~3M-parameter model learns these in minutes, the products need a bigger model)."""
    op = rng.choice("+-" if easy else "+-*")
    if op == "*":  # keep products small: up to 3 digits by 1 digit, or 2 digits by 2 digits
        b = rng.randint(2, 9) if rng.random() < 0.6 else rng.randint(10, 99)
        a = rng.randint(10, 999 if b < 10 else 99)
        result, trace = a * b, _mul_trace(a, b)
    else:
        top = 99 if easy else 999
        a, b = rng.randint(10, top), rng.randint(10, top)
        if op == "+":
            result, trace = a + b, _add_trace(a, b)
        else:
            a, b = max(a, b), min(a, b)  # no negative numbers: one less thing to learn
            result, trace = a - b, _sub_trace(a, b)
    word = {"+": "plus", "-": "minus", "*": "times"}[op]
    prompt = rng.choice((f"What is {a} {op} {b}?", f"Compute {a} {op} {b}.", f"{a} {op} {b} = ?",
                         f"What is {a} {word} {b}?"))
    reasoning = "\n".join([*trace, f"so {a} {op} {b} = {result}"])
    return _Turn(prompt, str(result), reasoning, {"type": "exact", "answer": str(result)})


def _addition(rng: random.Random) -> _Turn:
    return _arithmetic(rng, easy=True)


def _reverse(rng: random.Random) -> _Turn:
    if rng.random() < 0.5:
        word = rng.choice(ALL_WORDS)
        answer = word[::-1]
        prompt = rng.choice((f"Reverse the word {word}.", f"Spell {word} backwards.",
                             f"Write {word} in reverse."))
        reasoning = f"letters: {' '.join(word)}\nbackwards: {' '.join(answer)}"
    else:
        words = rng.sample(WORDS, rng.randint(3, 5))
        answer = " ".join(reversed(words))
        prompt = rng.choice(("Reverse the order of these words: ", "Say these words from last to first: "))
        prompt += " ".join(words)
        reasoning = ("words: " + ", ".join(f"{i} {w}" for i, w in enumerate(words, 1))
                     + "\nfrom last to first: " + ", ".join(reversed(words)))
    return _Turn(prompt, answer, reasoning, {"type": "exact", "answer": answer})


def _sort(rng: random.Random) -> _Turn:
    if rng.random() < 0.5:
        word = rng.choice([w for w in ALL_WORDS if len(w) >= 4])
        answer = "".join(sorted(word))
        prompt = rng.choice((f"Sort the letters of {word} in alphabetical order.",
                             f"Put the letters of {word} in order from a to z."))
        reasoning = f"letters: {' '.join(word)}\nin order: {' '.join(answer)}"
    else:
        # Distinct first letters, so the first letter alone decides the order: a rule a tiny
        # model can follow from the reasoning trace.
        by_letter: dict[str, list[str]] = {}
        for w in WORDS:
            by_letter.setdefault(w[0], []).append(w)
        words = [rng.choice(by_letter[c]) for c in rng.sample(sorted(by_letter), rng.randint(3, 5))]
        answer = ", ".join(sorted(words))
        prompt = "Sort these words alphabetically: " + ", ".join(words)
        reasoning = f"first letters: {', '.join(w[0] for w in words)}\nin order: {answer}"
    return _Turn(prompt, answer, reasoning, {"type": "exact", "answer": answer})


def _count(rng: random.Random) -> _Turn:
    if rng.random() < 0.6:
        text = rng.choice(ALL_WORDS) if rng.random() < 0.6 else " ".join(rng.sample(WORDS, 2))
        letters = text.replace(" ", "")
        # Mostly a letter that occurs; sometimes one that does not, so "0" is also learned.
        letter = rng.choice(letters) if rng.random() < 0.85 else rng.choice(
            [c for c in "abcdefghijklmnopqrstuvwxyz" if c not in letters])
        n = letters.count(letter)
        prompt = rng.choice((f"How many times does the letter {letter} appear in {text}?",
                             f"Count the letter {letter} in {text}."))
        reasoning = (f"letters: {' '.join(letters)}\nmatches: {' '.join(letter * n) or 'none'}"
                     f"\ncount: {n}")
    else:
        words = [rng.choice(WORDS) for _ in range(rng.randint(2, 7))]
        n = len(words)
        prompt = "How many words are in this: " + " ".join(words)
        reasoning = "words: " + ", ".join(f"{i} {w}" for i, w in enumerate(words, 1)) + f"\ncount: {n}"
    return _Turn(prompt, str(n), reasoning, {"type": "exact", "answer": str(n)})


def _format(rng: random.Random) -> _Turn:
    kind = rng.choice(("uppercase", "word_count", "ends_with", "json_keys"))
    topic = rng.choice(sorted(TOPICS))
    if kind == "uppercase":
        words = rng.sample(TOPICS[topic], rng.randint(2, 4))
        answer = " ".join(words).upper()
        prompt = f"Name {NUMBER_WORDS[len(words)]} words about {topic}, in capital letters."
        return _Turn(prompt, answer, f"words: {', '.join(words)}\nin capitals: {answer}",
                     {"type": "uppercase"})
    if kind == "word_count":
        words = rng.sample(TOPICS[topic], rng.randint(2, 6))
        prompt = f"Write exactly {len(words)} words about {topic}."
        reasoning = f"need {len(words)} words\n" + ", ".join(f"{i} {w}" for i, w in enumerate(words, 1))
        return _Turn(prompt, " ".join(words), reasoning, {"type": "word_count", "n": len(words)})
    if kind == "ends_with":
        first, second = rng.sample(TOPICS[topic], 2)
        phrase = rng.choice(END_PHRASES)
        prompt = f"Name two things of {topic}. End with: {phrase}"
        reasoning = f"two things: {first}, {second}\nlast words: {phrase}"
        return _Turn(prompt, f"{first} and {second}, {phrase}", reasoning,
                     {"type": "ends_with", "suffix": phrase})
    keys = rng.sample(sorted(JSON_VALUES), rng.randint(2, 3))
    values = {k: rng.choice(JSON_VALUES[k]) for k in keys}
    prompt = ("Reply in JSON with keys " + " and ".join(keys) + ": "
              + ", ".join(f"{k} {v}" for k, v in values.items()))
    reasoning = (f"keys: {', '.join(keys)}\nvalues: {', '.join(str(v) for v in values.values())}"
                 "\none JSON object")
    return _Turn(prompt, json.dumps(values), reasoning, {"type": "json_keys", "keys": keys})


_SIMPLE: dict[str, Callable[[random.Random], _Turn]] = {
    "arithmetic": _arithmetic, "addition": _addition, "reverse": _reverse, "sort": _sort,
    "count": _count, "format": _format,
}
TASKS: tuple[str, ...] = (*_SIMPLE, "persona", "multiturn")


def _persona(rng: random.Random) -> tuple[str, _Turn]:
    """A persona system prompt whose marker (first or last word) the reply must carry."""
    name, marker = rng.choice(PERSONAS)
    at_start = rng.random() < 0.7
    if rng.random() < 0.4:
        question, answer = rng.choice((("Who are you?", f"I am a {name}."), ("Hello!", "Hello to you."),
                                       ("How are you?", "I am well."),
                                       ("What do you love?", f"I love the {rng.choice(WORDS)}.")))
        reasoning, inner = f"I am a {name}.", None
    else:
        sub = rng.choice((_arithmetic, _reverse, _sort, _count))(rng)
        question, answer, reasoning = sub.prompt, sub.answer, sub.reasoning
        inner = {"type": "contains", "text": sub.answer}
    where = "begin" if at_start else "end"
    system = f"You are a {name}. Always {where} your reply with {marker}"
    content = f"{marker} {answer}" if at_start else f"{answer} {marker}"
    marker_check = ({"type": "starts_with", "prefix": marker} if at_start
                    else {"type": "ends_with", "suffix": marker})
    check = marker_check if inner is None else {"type": "all", "checks": [marker_check, inner]}
    return system, _Turn(question, content, f"I am a {name}, so I {where} with {marker}\n{reasoning}", check)


def _assistant(turn: _Turn, think: bool) -> dict:
    message = {"role": "assistant", "content": turn.answer}
    if think:
        message["reasoning_content"] = turn.reasoning
    return message


def _flag(think: bool) -> str:
    return THINK_FLAG if think else NO_THINK_FLAG


def _single(rng: random.Random, turn: _Turn, think: bool, system: str | None) -> list[dict]:
    """One exchange; the mode is requested by kwargs only, or also by a system or user flag."""
    placement = rng.choice(("kwargs", "system", "user"))
    if system is None and (placement == "system" or rng.random() < 0.3):
        system = rng.choice(SYSTEM_PROMPTS)
    user = turn.prompt
    if placement == "system":
        system = f"{system} {_flag(think)}"
    elif placement == "user":
        user = f"{user} {_flag(think)}"
    head = [{"role": "system", "content": system}] if system else []
    return [*head, {"role": "user", "content": user}, _assistant(turn, think)]


def _multiturn(rng: random.Random, last_think: bool, think_fraction: float) -> tuple[list[dict], _Turn]:
    """2-3 exchanges, each user turn flagged; the first and last modes differ (IFThink-style
    switching) unless think_fraction is 0 or 1, which asks for one mode only."""
    count, switch = rng.randint(2, 3), 0.0 < think_fraction < 1.0
    modes = [not last_think if switch else last_think]
    modes += [rng.random() < think_fraction for _ in range(count - 2)] + [last_think]
    messages = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}] if rng.random() < 0.3 else []
    for think in modes:
        turn = rng.choice(list(_SIMPLE.values()))(rng)
        messages += [{"role": "user", "content": f"{turn.prompt} {_flag(think)}"}, _assistant(turn, think)]
    return messages, turn


def _sample(task: str, rng: random.Random, think_fraction: float) -> dict:
    think = rng.random() < think_fraction
    if task == "multiturn":
        messages, turn = _multiturn(rng, think, think_fraction)
    elif task == "persona":
        system, turn = _persona(rng)
        messages = _single(rng, turn, think, system)
    else:
        turn = _SIMPLE[task](rng)
        messages = _single(rng, turn, think, None)
    return {"messages": messages, "chat_template_kwargs": {"enable_thinking": think},
            "task": task, "check": turn.check}


def generate(task: str, n: int, seed: int, think_fraction: float = 0.5) -> list[dict]:
    """`n` samples of `task`: one of TASKS, a comma-separated list of them or "all" (an equal
    mix, in shuffled order).

    Deterministic for a given seed; a prompt (every message but the last, plus the mode) is
    not repeated within a call unless the task has fewer distinct prompts than asked for.
    """
    names = list(TASKS) if task == "all" else task.split(",")
    unknown = [name for name in names if name not in TASKS]
    if unknown:
        raise SmolforgeError(f"unknown synthetic task {unknown[0]!r}; choose from: {', '.join(TASKS)}, "
                             f"all, or a comma-separated list")
    if n < 0:
        raise SmolforgeError(f"number of samples must be >= 0, got {n}")
    if not 0.0 <= think_fraction <= 1.0:
        raise SmolforgeError(f"think fraction must be between 0 and 1, got {think_fraction}")
    rng = random.Random(seed)
    plan = [names[i % len(names)] for i in range(n)]
    rng.shuffle(plan)
    samples, seen = [], set()
    for name in plan:
        for _ in range(_MAX_TRIES):
            sample = _sample(name, rng, think_fraction)
            key = json.dumps([sample["messages"][:-1], sample["chat_template_kwargs"]], sort_keys=True)
            if key not in seen:
                break
        seen.add(key)
        samples.append(sample)
    return samples


# --- checkers ------------------------------------------------------------------------------------


def strip_thinking(response: str) -> str:
    """The answer part of a response: everything after the last </think>.

    An opened but unclosed <think> means the model never finished reasoning: no answer.
    """
    if "</think>" in response:
        return response.rsplit("</think>", 1)[1]
    if "<think>" in response:
        return response.split("<think>", 1)[0]
    return response


def _normalise(text: str) -> str:
    return " ".join(text.strip().removesuffix(".").split())


def _final_answer(text: str) -> str:
    """The last non-empty line, without an "Answer:" prefix: models often restate the question."""
    lines = [line for line in text.splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    return _normalise(re.sub(r"^\s*(final\s+)?answer\s*[:=]\s*", "", last, flags=re.IGNORECASE))


def _json_object(text: str) -> object:
    text = re.sub(r"^```(?:json)?\s*|\s*```$", "", text)  # tolerate a fenced code block
    try:
        return json.loads(text)
    except ValueError:
        return None


def _ends_with(check: dict, text: str) -> bool:
    suffix = check["suffix"]
    # "..., farewell." honours "End with: farewell": ignore closing punctuation the spec lacks.
    return text.endswith(suffix) or (suffix[-1:] not in ".!?" and text.rstrip(".!?").endswith(suffix))


CHECKERS: dict[str, Callable[[dict, str], bool]] = {
    "exact": lambda c, t: _final_answer(t) == _normalise(str(c["answer"])),
    "uppercase": lambda c, t: any(ch.isalpha() for ch in t) and t == t.upper(),
    "lowercase": lambda c, t: any(ch.isalpha() for ch in t) and t == t.lower(),
    "word_count": lambda c, t: len(t.split()) == int(c["n"]),
    "starts_with": lambda c, t: t.startswith(c["prefix"]),
    "ends_with": _ends_with,
    "contains": lambda c, t: re.search(rf"(?<!\w){re.escape(str(c['text']))}(?!\w)", t) is not None,
    "json_keys": lambda c, t: isinstance(obj := _json_object(t), dict) and set(obj) == set(c["keys"]),
    "all": lambda c, t: all(_run_check(sub, t) for sub in c["checks"]),
}


def _run_check(check: dict, text: str) -> bool:
    kind = check.get("type") if isinstance(check, dict) else None
    if kind not in CHECKERS:
        raise SmolforgeError(f"unknown check type {kind!r} in {check!r}; known: {', '.join(CHECKERS)}")
    try:
        return bool(CHECKERS[kind](check, text))
    except KeyError as exc:
        raise SmolforgeError(f"check {check!r} lacks field {exc.args[0]!r}") from None


def check_response(check: dict, response: str) -> bool:
    """Does `response` satisfy the checker spec? A <think> block and outer whitespace are ignored."""
    return _run_check(check, strip_thinking(response).strip())


def thinking_honoured(response_with_reasoning: str, enable_thinking: bool) -> bool:
    """Did the response follow the reasoning mode?

    Think: non-empty text before </think> (after <think>, or from the start when the chat
    template pre-filled <think> in the prompt). No_think: no think block, or an empty one.
    """
    text = response_with_reasoning
    close, opened = text.find("</think>"), text.find("<think>")
    if close == -1:
        return not enable_thinking and opened == -1
    start = opened + len("<think>") if 0 <= opened < close else 0
    reasoning = text[start:close].strip()
    return bool(reasoning) if enable_thinking else not reasoning


# --- CLI -----------------------------------------------------------------------------------------


def write_jsonl(samples: list[dict], out: str | Path) -> None:
    """Write one JSON object per line under a temporary name, then rename: never half a file."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            for sample in samples:
                f.write(json.dumps(sample, ensure_ascii=False) + "\n")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def add_synth_command(data_subparsers: argparse._SubParsersAction) -> None:
    """Add `smolforge data synth`."""
    parser = data_subparsers.add_parser(
        "synth", help="Generate verifiable synthetic chat tasks for SFT (JSONL).",
        description="Generate small chat tasks with think/no_think reasoning and a checker per sample.")
    parser.add_argument("--task", default="all",
                        help=f"Task: one of {', '.join(TASKS)}, a comma-separated list, or all (an equal "
                             f"mix). Default: all.")
    parser.add_argument("--n", type=int, default=1000, help="Number of samples to write. Default: 1000.")
    parser.add_argument("--seed", type=int, default=0,
                        help="Random seed; the same seed writes the same file. Default: 0.")
    parser.add_argument("--think-fraction", type=float, default=0.5,
                        help="Share of samples in think mode (with reasoning); the rest are no_think. "
                             "Default: 0.5.")
    parser.add_argument("--out", required=True, help="Output .jsonl file, written atomically.")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing output file.")
    parser.set_defaults(func=_run_synth)


def _run_synth(args: argparse.Namespace) -> int:
    if args.n < 1:
        raise SmolforgeError(f"--n must be at least 1, got {args.n}")
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise SmolforgeError(f"{out} already exists; pass --overwrite to replace it")
    samples = generate(args.task, args.n, args.seed, args.think_fraction)
    write_jsonl(samples, out)
    think = sum(s["chat_template_kwargs"]["enable_thinking"] for s in samples)
    print(f"wrote {len(samples):,} samples to {out} (think {think:,}, no_think {len(samples) - think:,})")
    for name, count in sorted(Counter(s["task"] for s in samples).items()):
        print(f"  {name}: {count:,}")
    return 0
