"""What every evaluation task shares: the context it runs in, the result it returns, the registry.

A task is a function `run(ctx: EvalContext) -> TaskResult` in its own module; `TASKS` maps the
name a user types (`smolforge eval CKPT --tasks gsm8k,ifeval`) to "module:function", so the
runner imports only the tasks asked for (ifeval's checker, math-verify and lm-eval stay out of
the import path of the others).

The rules the playbook sets for scoring (ch. "evals before everything") hold for every task:
generative answers are scored with any `<think>` block stripped (`smolforge.data.synth.
strip_thinking`), small sets report avg@k over `ctx.samples` draws, and a task reads only the
split it was pointed at (validation and test are never mixed by the runner).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from smolforge.chat.render import end_of_turn_ids, require_chat_template
from smolforge.engine import Completion, Engine, SamplingParams
from smolforge.errors import SmolforgeError, where
from smolforge.model import Transformer

T = TypeVar("T")
# SmolLM3's sampling defaults (playbook ch. 07), used for avg@k when no temperature is given.
DEFAULT_SAMPLING_TEMPERATURE = 0.6


@dataclass
class EvalContext:
    """Everything a task may use. Tasks read their own settings from `options`."""

    task: str  # the name it was asked for (multiple-choice sets share one function)
    model: Transformer
    tokenizer: Any  # smolforge.tokenizer.Tokenizer
    engine: Engine
    checkpoint: Path
    out_dir: Path  # where eval.json, per-example samples and vibes transcripts go
    batch_size: int = 16
    max_new_tokens: int = 256
    limit: int | None = None  # evaluate only the first N examples (quick looks, tests)
    samples: int = 1  # k of avg@k for generative tasks (k > 1 samples at `temperature`)
    temperature: float = 0.0  # 0 = greedy; used for k > 1
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)  # task-specific: data path, few-shot, ...

    def option(self, key: str, default: Any = None) -> Any:
        return self.options.get(key, default)

    def data_path(self, default: Path | None = None) -> Path:
        """The task's data file: `options["data"]`, else `default`; a clear error when neither."""
        raw = self.options.get("data")
        path = Path(raw) if raw else default
        if path is None:
            raise SmolforgeError(f"task {self.task} needs a data file: pass --data {self.task}=PATH "
                                 "(or `data:` under the task in the eval recipe)")
        if not path.is_file():
            raise SmolforgeError(f"{path}: no such file (data of task {self.task})")
        return path

    def take(self, items: Sequence[T]) -> list[T]:
        """The first `limit` items (all without a limit)."""
        return list(items[: self.limit] if self.limit is not None else items)


@dataclass
class TaskResult:
    """One task's scores. `metrics` holds the headline metric first; `samples` one record per
    example (prompt, response, target, score), written to `<task>.samples.jsonl`."""

    task: str
    metrics: dict[str, float]
    n: int
    seconds: float = 0.0
    samples: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # e.g. "avg@4", "3-shot"

    @property
    def examples_per_second(self) -> float:
        return self.n / self.seconds if self.seconds > 0 else 0.0


TaskFn = Callable[[EvalContext], TaskResult]


# --- shared by the generative tasks ---------------------------------------------------------------


def chat_template(ctx: EvalContext) -> str:
    """The checkpoint's chat template, or an error saying why the task needs one."""
    return require_chat_template(ctx.tokenizer, f"eval task {ctx.task!r} on {ctx.checkpoint}")


def sampling_plan(ctx: EvalContext) -> tuple[int, float, list[str]]:
    """(draws, temperature, notes) for avg@k: greedy once when k = 1, else k draws at a
    temperature > 0 (k greedy replies would all be the same one)."""
    if ctx.samples <= 1:
        return 1, 0.0, []
    temperature = ctx.temperature if ctx.temperature > 0 else DEFAULT_SAMPLING_TEMPERATURE
    note = f"avg@{ctx.samples} (temperature {temperature:g}"
    note += ")" if ctx.temperature > 0 else ", the default for k > 1)"
    return ctx.samples, temperature, [note]


def draw_params(tokenizer: Any, max_new_tokens: int, temperature: float, seed: int | None,
                top_p: float = 1.0) -> SamplingParams:
    """Greedy (temperature 0) or seeded sampling that stops at the end of the assistant turn."""
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                          seed=seed, stop_token_ids=end_of_turn_ids(tokenizer))


def generate_fitted(engine: Engine, prompts: Sequence[list[int]], params: SamplingParams,
                    batch_size: int) -> list[Completion | None]:
    """Completions in the order of `prompts`, `batch_size` prompts per engine call.

    Prompts are batched by length (less padding), and each batch's `max_new_tokens` is lowered
    so that its longest prompt plus the reply fits the model's context (the engine refuses what
    does not). A prompt that leaves no room at all gets None: the caller counts it as not scored.
    """
    limit = engine.model.config.max_seq_len
    results: list[Completion | None] = [None] * len(prompts)
    order = sorted((i for i, p in enumerate(prompts) if len(p) < limit), key=lambda i: len(prompts[i]))
    for start in range(0, len(order), max(batch_size, 1)):
        chunk = order[start:start + max(batch_size, 1)]
        room = limit - max(len(prompts[i]) for i in chunk)
        fitted = params if room >= params.max_new_tokens else replace(params, max_new_tokens=room)
        for i, completion in zip(chunk, engine.generate([prompts[i] for i in chunk], fitted)):
            results[i] = completion
    return results


# --- task data -------------------------------------------------------------------------------------


def read_examples(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(location, record) of every record of a task's .jsonl / .json / .parquet file.

    `location` is `file:line` for error messages. An empty file or a record that is not a JSON
    object is an error: a task that silently scores zero examples would look like a result.
    """
    from smolforge.data.sources import iter_records

    examples = []
    for location, record in iter_records(path):
        if not isinstance(record, dict):
            raise SmolforgeError(f"{location}: expected a JSON object, got {type(record).__name__}")
        examples.append((location, record))
    if not examples:
        raise SmolforgeError(f"{path}: no examples (the file is empty)")
    return examples


def field_of(record: dict[str, Any], location: str, name: str, kind: type | tuple[type, ...]) -> Any:
    """`record[name]`, checked to be of `kind`; an error naming file, line and field otherwise."""
    if name not in record:
        raise SmolforgeError(f"{where(location, field=name)}: missing (keys: {', '.join(record) or 'none'})")
    value = record[name]
    if not isinstance(value, kind) or isinstance(value, bool) and bool not in _as_tuple(kind):
        expected = " or ".join(k.__name__ for k in _as_tuple(kind))
        raise SmolforgeError(f"{where(location, field=name)}: expected {expected}, got {type(value).__name__}")
    return value


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


# name -> "module:function". Multiple-choice sets share one function and tell it apart by name.
TASKS: dict[str, str] = {
    "bpb": "smolforge.eval.bpb:run",
    "arc_easy": "smolforge.eval.multiple_choice:run",
    "arc_challenge": "smolforge.eval.multiple_choice:run",
    "piqa": "smolforge.eval.multiple_choice:run",
    "openbook_qa": "smolforge.eval.multiple_choice:run",
    "hellaswag": "smolforge.eval.multiple_choice:run",
    "mc": "smolforge.eval.multiple_choice:run",  # any {query, choices, gold} JSONL via --data
    "gsm8k": "smolforge.eval.gsm8k:run",
    "ifeval": "smolforge.eval.ifeval:run",
    "thinkfollow": "smolforge.eval.thinkfollow:run",
    "smoltasks": "smolforge.eval.smol_tasks:run",
    "vibes": "smolforge.eval.vibes:run",
}


def get_task(name: str) -> TaskFn:
    """The task function for `name`; an error listing the known tasks otherwise."""
    if name not in TASKS:
        raise SmolforgeError(f"unknown eval task {name!r}; known tasks: {', '.join(TASKS)}")
    module, function = TASKS[name].split(":")
    return getattr(importlib.import_module(module), function)
