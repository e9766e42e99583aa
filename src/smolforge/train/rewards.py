"""Rewards for online RL: a registry of pure functions `(prompt, completion, sample) -> float`.

- `prompt` is the rendered prompt text the policy continued;
- `completion` is a `Reply`: the sampled text, its token ids, whether max_new_tokens cut it, and
  `answer`, the text with its `<think>` block removed (the playbook, ch. 07: strip the reasoning
  before scoring) — rewards about the answer read `answer`, format rewards read `text`;
- `sample` is the prompt's record: its own fields (`answer`, `check`, `constraints`, ...) with
  `messages` = the prompt's messages and `chat_template_kwargs` = the template switches used.

A recipe lists rewards with weights (`grpo.rewards: [{name, weight, ...options}]`); a completion's
reward is the weighted sum (`RewardSet`), and each function is also logged on its own. Options
are the function's keyword-only arguments. A reward that needs a record field (`smol_task` needs
`check`) names it in `fields`, so a prompt file without it fails when it is read, naming the
file, line and field, not in the middle of training.

Verifiable rewards reuse the checkers of evaluation, so training and evaluation agree:
`smol_task` = `data.synth.check_response`, `gsm8k` = `eval.gsm8k` extraction + math-verify,
`ifeval` = `eval.ifeval_checks`. `reward_model` scores with a model trained by `smolforge reward`.
New rewards register with `@register_reward("name")`.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from smolforge.chat.reasoning import split_reasoning
from smolforge.errors import SmolforgeError


@dataclass(frozen=True)
class Reply:
    """A sampled completion, as the rewards see it."""

    text: str  # the decoded completion, without the stop token that ended it
    token_ids: tuple[int, ...] = ()  # the generated ids, stop token included
    truncated: bool = False  # cut by max_new_tokens before it ended its turn
    in_think: bool = False  # the prompt opened a <think> block that the reply continues

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def answer(self) -> str:
        """The text after the `<think>` block; empty when the block never closed (no answer)."""
        return split_reasoning(self.text, self.in_think)[1].strip()


RewardFn = Callable[..., float]


@dataclass(frozen=True)
class RewardFunction:
    fn: RewardFn
    fields: tuple[str, ...]  # record fields it reads: every prompt must carry them


REWARDS: dict[str, RewardFunction] = {}


def register_reward(name: str, fields: Sequence[str] = ()) -> Callable[[RewardFn], RewardFn]:
    """Add `fn(prompt, reply, sample, **options) -> float` to the registry under `name`."""
    def wrap(fn: RewardFn) -> RewardFn:
        REWARDS[name] = RewardFunction(fn, tuple(fields))
        return fn
    return wrap


# --- record fields: checked once, when the prompts are read ------------------------------------


def _field_error(location: str, name: str, problem: str) -> SmolforgeError:
    return SmolforgeError(f"{location} field '{name}': {problem}")


def gold_number(answer: Any) -> str:
    """The target of a GSM8K-style `answer`: the number after '####', or the value itself."""
    from smolforge.eval.gsm8k import gold_answer, normalise_number

    text = str(answer)
    return gold_answer(text) if "####" in text else normalise_number(text)


def check_answer_field(value: Any, location: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise _field_error(location, "answer", f"must be a string or a number, got {type(value).__name__}")
    try:
        target = gold_number(value)
    except SmolforgeError:
        target = ""
    if not target:
        raise _field_error(location, "answer", "holds no final answer (expected a number, or text ending in '#### N')")


def check_check_field(value: Any, location: str) -> None:
    from smolforge.data.synth import check_response

    if not isinstance(value, dict):
        raise _field_error(location, "check", f"must be an object (a smol-task checker spec), got {type(value).__name__}")
    try:
        check_response(value, "")  # unknown types and missing fields fail here, not mid-training
    except SmolforgeError as exc:
        raise _field_error(location, "check", str(exc)) from None


def parse_constraints(value: Any, location: str = "") -> list[tuple[str, dict[str, Any]]]:
    """(instruction id, checked arguments) of `constraints: [{"id", "kwargs"}]` (IFEval ids)."""
    from smolforge.eval.ifeval_checks import CHECKERS, InvalidArgument, check_arguments

    if not isinstance(value, list) or not value:
        raise _field_error(location, "constraints", "must be a non-empty list of {id, kwargs} objects")
    parsed = []
    for i, item in enumerate(value):
        if not isinstance(item, dict) or not isinstance(item.get("id"), str):
            raise _field_error(location, f"constraints[{i}]", "must be an object with an 'id' (an IFEval "
                                                              "instruction id) and optional 'kwargs'")
        if item["id"] not in CHECKERS:
            raise _field_error(location, f"constraints[{i}].id", f"unknown instruction {item['id']!r}; known: "
                                                                 f"{', '.join(CHECKERS)}")
        kwargs = item.get("kwargs") or {}
        if not isinstance(kwargs, dict):
            raise _field_error(location, f"constraints[{i}].kwargs", f"must be an object, got {type(kwargs).__name__}")
        try:
            parsed.append((item["id"], check_arguments(item["id"], kwargs)))
        except InvalidArgument as exc:
            raise _field_error(location, f"constraints[{i}].kwargs.{exc.name}", str(exc)) from None
    return parsed


def check_constraints_field(value: Any, location: str) -> None:
    parse_constraints(value, location)


# Record fields with a known meaning: checked wherever they appear, whichever rewards are used.
FIELD_CHECKS: dict[str, Callable[[Any, str], None]] = {
    "answer": check_answer_field,
    "check": check_check_field,
    "constraints": check_constraints_field,
}


# --- the rewards ---------------------------------------------------------------------------------


@register_reward("smol_task", fields=["check"])
def smol_task(prompt: str, reply: Reply, sample: Mapping[str, Any]) -> float:
    """1 if the answer passes the record's smol-task checker (`data.synth.check_response`), else 0."""
    from smolforge.data.synth import check_response

    return float(check_response(sample["check"], reply.answer))


@register_reward("gsm8k", fields=["answer"])
def gsm8k(prompt: str, reply: Reply, sample: Mapping[str, Any]) -> float:
    """1 if the answer's final number equals the record's `answer` by value (eval.gsm8k's
    extraction: '#### N', then \\boxed{}, "the answer is", then the last number; math-verify)."""
    from smolforge.eval.gsm8k import extract_answer, is_correct

    return float(is_correct(extract_answer(reply.answer), gold_number(sample["answer"])))


@register_reward("ifeval", fields=["constraints"])
def ifeval(prompt: str, reply: Reply, sample: Mapping[str, Any], *, aggregate: str = "mean") -> float:
    """IFEval instructions (Zhou et al. 2023) the answer follows, strictly: the share of the
    record's constraints (`aggregate: mean`, partial credit) or 1 only if all hold (`all`)."""
    from smolforge.eval.ifeval_checks import follows

    if aggregate not in ("mean", "all"):
        raise SmolforgeError(f"reward ifeval: aggregate must be 'mean' or 'all', got {aggregate!r}")
    verdicts = [follows(i, args, reply.answer) for i, args in parse_constraints(sample["constraints"])]
    return float(all(verdicts)) if aggregate == "all" else sum(verdicts) / len(verdicts)


@register_reward("think_format")
def think_format(prompt: str, reply: Reply, sample: Mapping[str, Any]) -> float:
    """1 if the reply follows the reasoning mode the prompt asks for and then answers: in think
    mode a non-empty, closed `<think>` block, in no_think mode none (or an empty one), and a
    non-empty answer after it. The mode is decided as smollm3.jinja decides it (`enable_thinking`,
    then a `/think` or `/no_think` flag: `data.check.reasoning_mode`)."""
    from smolforge.data.check import reasoning_mode
    from smolforge.data.synth import thinking_honoured

    think = reasoning_mode(sample.get("messages") or [], sample.get("chat_template_kwargs") or {}) == "think"
    return float(thinking_honoured(reply.text, think) and bool(reply.answer))


@register_reward("length")
def length(prompt: str, reply: Reply, sample: Mapping[str, Any], *, max_len: int) -> float:
    """−(completion tokens / max_len), at least −1: a plain linear length penalty whose strength
    is its weight (max_len defaults to grpo.max_new_tokens)."""
    if max_len < 1:
        raise SmolforgeError(f"reward length: max_len must be at least 1, got {max_len}")
    return -min(reply.num_tokens, max_len) / max_len


def overlong_penalty(num_tokens: int, max_len: int, soft: int) -> float:
    """DAPO's soft overlong punishment (Yu et al. 2025, arXiv:2503.14476, eq. 13):
    0 up to max_len − soft tokens, then a linear ramp down to −1 at max_len, and −1 beyond.

    The playbook (ch. 07) used it for SmolLM3's GRPO to stop length hacking, with the best
    max_len around 2.5-3k tokens; DAPO itself used max_len 20,480 and soft 4,096.
    """
    if soft <= 0 or soft > max_len:
        raise SmolforgeError(f"reward overlong: soft must be in 1..max_len ({max_len}), got {soft}")
    if num_tokens <= max_len - soft:
        return 0.0
    if num_tokens <= max_len:
        return (max_len - soft - num_tokens) / soft
    return -1.0


@register_reward("overlong")
def overlong(prompt: str, reply: Reply, sample: Mapping[str, Any], *, max_len: int,
             soft: int | None = None) -> float:
    """`overlong_penalty` of the completion's token count (max_len defaults to grpo.max_new_tokens,
    soft to a fifth of max_len, DAPO's ratio 4,096 / 20,480)."""
    return overlong_penalty(reply.num_tokens, max_len, soft if soft is not None else max(1, max_len // 5))


@register_reward("contains")
def contains(prompt: str, reply: Reply, sample: Mapping[str, Any], *, text: str) -> float:
    """1 if `text` occurs in the answer, else 0 (a toy reward, and a building block)."""
    return float(text in reply.answer)


# --- rewards with state: a trained reward model ----------------------------------------------------


class BatchScorer(Protocol):
    def __call__(self, prompts: Sequence[str], replies: Sequence[Reply],
                 samples: Sequence[Mapping[str, Any]]) -> list[float]: ...


class RewardModelScorer:
    """Scores from a reward model trained by `smolforge reward` (Bradley-Terry, read at the last
    token). Prompt and reply are rendered with the reward model's own chat template, the reply's
    reasoning moved to `reasoning_content` as `smolforge pairs` writes it, so the reward model
    sees completions the way it saw its training pairs."""

    def __init__(self, *, path: str, device: str = "cpu", batch_size: int = 8) -> None:
        from smolforge.data.sft import resolve_template
        from smolforge.train.loop import resolve_device
        from smolforge.train.reward import load_reward_model

        self.model, self.tokenizer = load_reward_model(path, device=resolve_device(device))
        self.template = resolve_template("auto", self.tokenizer)
        self.batch_size = batch_size

    def __call__(self, prompts: Sequence[str], replies: Sequence[Reply],
                 samples: Sequence[Mapping[str, Any]]) -> list[float]:
        from smolforge.data.pairs import split_reasoning as reply_message
        from smolforge.train.reward import score_records

        records = [{"messages": s["messages"], "response": [reply_message(r.text, self.template)],
                    "chat_template_kwargs": s.get("chat_template_kwargs") or {}} for r, s in zip(replies, samples)]
        return score_records(self.model, self.tokenizer, self.template, records, self.batch_size)


# name -> class whose keyword-only __init__ arguments are the options; instances score batches.
BATCH_REWARDS: dict[str, Callable[..., BatchScorer]] = {"reward_model": RewardModelScorer}


# --- combining ------------------------------------------------------------------------------------


@dataclass
class BoundReward:
    """A registry entry with its options bound, its weight and the name it is logged under."""

    label: str
    weight: float
    score: BatchScorer
    fields: tuple[str, ...] = ()


def _mapped(fn: RewardFn, options: dict[str, Any]) -> BatchScorer:
    def score(prompts: Sequence[str], replies: Sequence[Reply], samples: Sequence[Mapping[str, Any]]) -> list[float]:
        return [float(fn(p, r, s, **options)) for p, r, s in zip(prompts, replies, samples)]
    return score


def _keyword_options(fn: Callable[..., Any]) -> dict[str, inspect.Parameter]:
    return {p.name: p for p in inspect.signature(fn).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY}


def _bind_options(name: str, fn: Callable[..., Any], given: dict[str, Any], defaults: Mapping[str, Any],
                  where: str) -> dict[str, Any]:
    accepted = _keyword_options(fn)
    unknown = sorted(set(given) - set(accepted))
    if unknown:
        raise SmolforgeError(f"{where}.{unknown[0]}: not an option of reward {name!r} "
                             f"(it takes: {', '.join(accepted) or 'no options'})")
    options = {k: v for k, v in defaults.items() if k in accepted}
    options.update(given)
    missing = [k for k, p in accepted.items() if p.default is inspect.Parameter.empty and k not in options]
    if missing:
        raise SmolforgeError(f"{where}: reward {name!r} needs option {missing[0]!r}")
    return options


class RewardSet:
    """Weighted rewards: `__call__` gives each completion's total and every reward's own values."""

    def __init__(self, rewards: Sequence[BoundReward]) -> None:
        if not rewards:
            raise SmolforgeError("no reward to score completions with: list at least one in grpo.rewards")
        self.rewards = list(rewards)

    @property
    def fields(self) -> dict[str, str]:
        """Record field -> the reward that needs it."""
        return {f: b.label for b in self.rewards for f in b.fields}

    def check_sample(self, sample: Mapping[str, Any], location: str) -> None:
        """Raise naming the location and field when a record lacks a field a reward needs."""
        for field_name, label in self.fields.items():
            if field_name not in sample:
                raise _field_error(location, field_name, f"missing; the {label!r} reward scores with it "
                                                         f"(the record's keys: {', '.join(sorted(sample))})")

    def __call__(self, prompts: Sequence[str], replies: Sequence[Reply],
                 samples: Sequence[Mapping[str, Any]]) -> tuple[list[float], dict[str, list[float]]]:
        per_reward: dict[str, list[float]] = {}
        for bound in self.rewards:
            values = [float(v) for v in bound.score(prompts, replies, samples)]
            if len(values) != len(replies) or not all(math.isfinite(v) for v in values):
                raise SmolforgeError(f"reward {bound.label!r} gave {len(values)} values for {len(replies)} "
                                     f"completions, or a value that is not finite")
            per_reward[bound.label] = values
        totals = [sum(b.weight * per_reward[b.label][i] for b in self.rewards) for i in range(len(replies))]
        return totals, per_reward


def build_rewards(specs: Sequence[Any], defaults: Mapping[str, Any] | None = None,
                  section: str = "grpo.rewards") -> RewardSet:
    """A RewardSet from specs (`config.RewardSpec`s or mappings with name, weight and options).

    `defaults` fill options a spec leaves out and its function takes (e.g. max_len from
    max_new_tokens). Errors name `section[i]` and the option.
    """
    bound, seen = [], {}
    for i, spec in enumerate(specs):
        raw = spec.model_dump() if hasattr(spec, "model_dump") else dict(spec)
        name, weight = raw.pop("name", None), raw.pop("weight", 1.0)
        where = f"{section}[{i}]"
        if name in REWARDS:
            entry = REWARDS[name]
            options = _bind_options(name, entry.fn, raw, defaults or {}, where)
            if not entry.fields:  # bad option values (soft > max_len, ...) fail now, not mid-training
                try:
                    entry.fn("", Reply(""), {"messages": [], "chat_template_kwargs": {}}, **options)
                except (SmolforgeError, ValueError, TypeError) as exc:
                    raise SmolforgeError(f"{where}: {exc}") from None
            score, fields = _mapped(entry.fn, options), entry.fields
        elif name in BATCH_REWARDS:
            factory = BATCH_REWARDS[name]
            score, fields = factory(**_bind_options(name, factory, raw, defaults or {}, where)), ()
        else:
            known = sorted([*REWARDS, *BATCH_REWARDS])
            raise SmolforgeError(f"{where}.name: unknown reward {name!r}; available: {', '.join(known)}")
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not math.isfinite(weight):
            raise SmolforgeError(f"{where}.weight: must be a finite number, got {weight!r}")
        seen[name] = seen.get(name, 0) + 1
        label = name if seen[name] == 1 else f"{name}_{seen[name]}"
        bound.append(BoundReward(label, float(weight), score, fields))
    return RewardSet(bound)
