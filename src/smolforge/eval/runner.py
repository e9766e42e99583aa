"""`smolforge eval CKPT --tasks ...`: run evaluation tasks on a checkpoint, write `eval.json`.

The runner loads the model once, builds one `Engine` and runs each task (`smolforge.eval.core`)
with an `EvalContext` resolved from, in increasing priority: the defaults here, an eval recipe
(YAML, validated like the training recipes: unknown keys fail naming the key), and the
command-line flags. After every task it writes `<task>.samples.jsonl` and merges the task's
scores into `eval.json`, so a crash in the last task keeps the others, and a later run with other
tasks adds to the file instead of erasing it. `--harness lm-eval` hands the tasks to
lm-evaluation-harness instead (`smolforge.eval.harness`) and records them the same way.

From Python: `evaluate(checkpoint_or_(model, tokenizer), ["bpb", "arc_easy"], options=...)`.
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from smolforge import __version__
from smolforge.config import Section, _describe, load_recipe
from smolforge.errors import SmolforgeError
from smolforge.eval.core import TASKS, EvalContext, TaskResult, get_task

EVAL_FILE = "eval.json"
HARNESS_PREFIX = "lm-eval/"  # eval.json key of a harness result, apart from the native task's
SAMPLING_TEMPERATURE = 0.6  # avg@k default: SmolLM3's release sampling temperature (playbook ch. 07)


class EvalTaskSpec(Section):
    """One task and its settings; unset fields take the recipe's (or the runner's) value."""

    name: str = Field(min_length=1, description="Task name (smolforge eval --help lists them).")
    data: str | None = Field(None, description="The task's data file (.jsonl/.json/.parquet; .txt for bpb).")
    fewshot_data: str | None = Field(None, description="File few-shot examples are drawn from (another split).")
    num_fewshot: int | None = Field(None, ge=0, description="Few-shot examples per prompt.")
    limit: int | None = Field(None, ge=1, description="Evaluate only the first N examples.")
    samples: int | None = Field(None, ge=1, description="k of avg@k for generative tasks.")
    temperature: float | None = Field(None, ge=0, description="Sampling temperature; 0 = greedy.")
    max_new_tokens: int | None = Field(None, ge=1, description="Generation budget of generative tasks.")
    options: dict[str, Any] = Field(default_factory=dict, description="Task-specific settings.")


class EvalRecipe(Section):
    """An eval recipe: which tasks, with which settings."""

    tasks: list[EvalTaskSpec] = Field(default_factory=list, description="Tasks to run, in order.")
    batch_size: int = Field(16, ge=1, description="Prompts per forward / generate call.")
    max_new_tokens: int = Field(256, ge=1, description="Generation budget of generative tasks.")
    limit: int | None = Field(None, ge=1, description="Evaluate only the first N examples of each task.")
    samples: int = Field(1, ge=1, description="k of avg@k: draws per prompt for generative tasks.")
    temperature: float | None = Field(None, ge=0, description=f"Sampling temperature; default 0 (greedy), "
                                      f"{SAMPLING_TEMPERATURE} when samples > 1.")
    num_fewshot: int | None = Field(None, ge=0, description="Few-shot examples for tasks that take them.")
    seed: int = Field(0, description="Seed of sampling and few-shot selection.")
    device: str | None = Field(None, description="cpu, cuda or cuda:N; default cuda when available.")
    harness: Literal["none", "lm-eval"] = Field("none", description="Run the tasks with lm-evaluation-harness.")

    @model_validator(mode="before")
    @classmethod
    def _task_names(cls, values: Any) -> Any:
        # `tasks: [bpb, arc_easy]` is short for `tasks: [{name: bpb}, {name: arc_easy}]`.
        if isinstance(values, dict) and isinstance(values.get("tasks"), list):
            values = {**values, "tasks": [{"name": t} if isinstance(t, str) else t for t in values["tasks"]]}
        return values


# --- resolving settings -----------------------------------------------------------------------


def task_context_settings(spec: EvalTaskSpec, recipe: EvalRecipe) -> dict[str, Any]:
    """The EvalContext fields of one task (all but model, tokenizer, engine and paths)."""
    samples = spec.samples or recipe.samples
    temperature = spec.temperature if spec.temperature is not None else recipe.temperature
    if temperature is None:
        temperature = SAMPLING_TEMPERATURE if samples > 1 else 0.0
    options = dict(spec.options)
    for key in ("data", "fewshot_data"):
        if getattr(spec, key) is not None:
            options[key] = getattr(spec, key)
    num_fewshot = spec.num_fewshot if spec.num_fewshot is not None else recipe.num_fewshot
    if num_fewshot is not None:
        options["num_fewshot"] = num_fewshot
    return {"batch_size": recipe.batch_size, "max_new_tokens": spec.max_new_tokens or recipe.max_new_tokens,
            "limit": spec.limit or recipe.limit, "samples": samples, "temperature": temperature,
            "seed": recipe.seed, "options": options}


def _check_files(spec: EvalTaskSpec, settings: dict[str, Any]) -> None:
    """Missing data files fail before the model loads, naming the task and the option."""
    for key in ("data", "fewshot_data"):
        path = settings["options"].get(key)
        if path is not None and not Path(path).is_file():
            raise SmolforgeError(f"task {spec.name}: {key} {path}: no such file")


def default_out_dir(checkpoint: str | Path) -> Path:
    """Where `smolforge eval CKPT` writes when not told: CKPT/eval/."""
    path = Path(checkpoint)
    if not path.is_dir():
        raise SmolforgeError(f"{checkpoint} is not a local directory: pass --out for the results")
    return path / "eval"


# --- output -----------------------------------------------------------------------------------


def safe_name(task: str) -> str:
    return re.sub(r"[^\w.-]", "-", task)


def _json_default(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else str(value)


def write_samples(out_dir: Path, result: TaskResult) -> Path | None:
    if not result.samples:
        return None
    path = out_dir / f"{safe_name(result.task)}.samples.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for sample in result.samples:
            f.write(json.dumps(sample, ensure_ascii=False, default=_json_default) + "\n")
    return path


def task_entry(result: TaskResult, settings: Mapping[str, Any]) -> dict[str, Any]:
    return {"metrics": result.metrics, "n": result.n, "seconds": round(result.seconds, 3),
            "examples_per_second": round(result.examples_per_second, 3), "notes": result.notes,
            "settings": dict(settings), "created": _now()}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def merge_eval_file(out_dir: Path, checkpoint: str, entries: Mapping[str, dict[str, Any]]) -> Path:
    """Add `entries` to out_dir/eval.json, keeping the other tasks' results already there."""
    path = out_dir / EVAL_FILE
    data: dict[str, Any] = {"checkpoint": checkpoint, "tasks": {}}
    if path.is_file():
        from smolforge.data.sources import read_json_object

        data = read_json_object(path)
        if data.get("checkpoint") != checkpoint:
            raise SmolforgeError(f"{path} holds results of another checkpoint ({data.get('checkpoint')}); "
                                 "choose another --out or remove the file")
        if not isinstance(data.get("tasks"), dict):
            raise SmolforgeError(f"{path} field 'tasks': expected an object of task results")
    data.update({"created": _now(), "smolforge_version": __version__})
    data["tasks"].update(entries)
    tmp = path.with_name(f".{EVAL_FILE}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_json_default) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def results_table(results: Mapping[str, TaskResult], title: str = "evaluation"):
    """A rich Table: one row per metric, the task's size, throughput and notes on its first row."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column("task", no_wrap=True)
    table.add_column("metric", no_wrap=True)
    table.add_column("value", justify="right", no_wrap=True)
    table.add_column("n", justify="right")
    table.add_column("examples/s", justify="right")
    table.add_column("notes")
    for name, r in results.items():
        notes = ", ".join(n for n in r.notes if not n.startswith("data: "))
        for i, (metric, value) in enumerate(r.metrics.items() or [("-", "-")]):
            first = i == 0
            table.add_row(name if first else "", metric, f"{value:.4f}" if isinstance(value, float) else str(value),
                          str(r.n) if first else "", f"{r.examples_per_second:.1f}" if first else "",
                          notes if first else "", end_section=i >= len(r.metrics) - 1)
    return table


# --- running ----------------------------------------------------------------------------------


def _pick_device(device: str | None) -> str:
    import torch

    return device if device not in (None, "auto") else ("cuda" if torch.cuda.is_available() else "cpu")


def run_recipe(source: str | Path | tuple[Any, Any], recipe: EvalRecipe, out_dir: str | Path | None = None,
               show: bool = False) -> dict[str, TaskResult]:
    """Run every task of `recipe` on `source` (a checkpoint directory or (model, tokenizer)).

    Results are written to `out_dir` (default CKPT/eval/; for an in-memory model, nothing is
    written without `out_dir`). `show` prints a table at the end.
    """
    if not recipe.tasks:
        raise SmolforgeError("no tasks to run: pass --tasks (e.g. --tasks bpb,arc_easy) or list them "
                             "under `tasks:` in the eval recipe")
    in_memory = isinstance(source, tuple)
    checkpoint = "<in-memory model>" if in_memory else _checkpoint_name(source)
    if out_dir is None and not in_memory:
        out_dir = default_out_dir(source)
    names = [spec.name for spec in recipe.tasks]
    if twice := sorted({n for n in names if names.count(n) > 1}):
        raise SmolforgeError(f"task {', '.join(twice)} listed twice: a task's results would overwrite "
                             "each other (one eval.json entry per task name)")
    plan = [(spec, task_context_settings(spec, recipe)) for spec in recipe.tasks]
    if recipe.harness == "lm-eval":
        return _run_harness(source, recipe, plan, out_dir, checkpoint, show)
    for spec, settings in plan:
        get_task(spec.name)  # unknown names fail before the model loads
        _check_files(spec, settings)
    with ExitStack() as stack:
        if out_dir is None:  # in memory, nothing to keep: tasks still get a directory to write to
            work_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="smolforge-eval-")))
        else:
            work_dir = Path(out_dir)
            work_dir.mkdir(parents=True, exist_ok=True)
        model, tokenizer, engine = _load(source, recipe.device)
        results: dict[str, TaskResult] = {}
        for spec, settings in plan:
            ctx = EvalContext(task=spec.name, model=model, tokenizer=tokenizer, engine=engine,
                              checkpoint=Path(checkpoint), out_dir=work_dir, **settings)
            started = time.perf_counter()
            result = get_task(spec.name)(ctx)
            if result.seconds <= 0:
                result.seconds = time.perf_counter() - started
            results[spec.name] = result
            if out_dir is not None:
                write_samples(work_dir, result)
                merge_eval_file(work_dir, checkpoint, {spec.name: task_entry(result, settings)})
    if show:
        _print_results(results, out_dir)
    return results


def _checkpoint_name(source: str | Path) -> str:
    """The absolute path of a local checkpoint (so ./a and a/ name the same one), else the Hub id."""
    return str(Path(source).resolve()) if Path(source).is_dir() else str(source)


def _load(source: str | Path | tuple[Any, Any], device: str | None):
    from smolforge.engine import Engine

    if isinstance(source, tuple):
        model, tokenizer = source
        return model, tokenizer, Engine(model, tokenizer, device=_pick_device(device) if device else None)
    from smolforge.train.checkpoint import load_model

    model, tokenizer = load_model(source, device=_pick_device(device))
    return model, tokenizer, Engine(model, tokenizer)


def _run_harness(source, recipe: EvalRecipe, plan, out_dir, checkpoint: str, show: bool) -> dict[str, TaskResult]:
    from smolforge.eval.harness import run_harness

    if out_dir is None:
        raise SmolforgeError("--harness lm-eval needs an output directory (out_dir) for the exported model")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = run_harness(source, [(spec.name, settings) for spec, settings in plan], out_dir,
                          device=_pick_device(recipe.device), seed=recipe.seed)
    results = {f"{HARNESS_PREFIX}{name}": r for name, r in results.items()}
    settings_of = {f"{HARNESS_PREFIX}{spec.name}": settings for spec, settings in plan}
    for name, result in results.items():
        result.task = name
        write_samples(out_dir, result)
    merge_eval_file(out_dir, checkpoint, {name: task_entry(r, settings_of[name]) for name, r in results.items()})
    if show:
        _print_results(results, out_dir)
    return results


def _print_results(results: Mapping[str, TaskResult], out_dir: str | Path | None) -> None:
    from rich.console import Console

    console = Console()
    console.print(results_table(results))
    if out_dir is not None:
        console.print(f"results: {Path(out_dir) / EVAL_FILE}")


def evaluate(source: str | Path | tuple[Any, Any], tasks: Sequence[str | EvalTaskSpec], *,
             options: Mapping[str, Mapping[str, Any]] | None = None, out_dir: str | Path | None = None,
             show: bool = False, **settings: Any) -> dict[str, TaskResult]:
    """Evaluate a checkpoint directory or an in-memory (model, tokenizer) on `tasks`.

    `options` maps a task name to its task-specific options (`{"arc_easy": {"data": path}}`);
    `settings` are EvalRecipe fields (batch_size, limit, samples, temperature, seed, device, ...).
    """
    specs = [t.model_dump() if isinstance(t, EvalTaskSpec) else {"name": t} for t in tasks]
    for name, extra in (options or {}).items():
        matching = [s for s in specs if s["name"] == name]
        if not matching:
            raise SmolforgeError(f"options given for task {name!r}, which is not among the tasks")
        for spec in matching:
            spec["options"] = {**spec.get("options", {}), **extra}
    recipe = validate_recipe({"tasks": specs, **settings}, "(evaluate arguments)")
    return run_recipe(source, recipe, out_dir=out_dir, show=show)


# --- CLI ----------------------------------------------------------------------------------------


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval", help="Evaluate a checkpoint on tasks (bpb, multiple choice, GSM8K, IFEval, ...).",
        description="Run evaluation tasks on a checkpoint through the inference engine; scores go to "
                    "eval.json (merged with earlier results) and a table. Tasks: " + ", ".join(TASKS) + ".")
    parser.add_argument("checkpoint", help="Checkpoint directory (smolforge or Hugging Face).")
    parser.add_argument("--tasks", default=None, help="Comma-separated task names, e.g. bpb,arc_easy,gsm8k.")
    parser.add_argument("--data", action="append", default=[], metavar="TASK=PATH",
                        help="A task's data file (repeatable).")
    parser.add_argument("--set", action="append", default=[], metavar="TASK.KEY=VALUE", dest="sets",
                        help="A task option, value parsed as YAML (repeatable), e.g. gsm8k.fewshot_data=train.jsonl.")
    parser.add_argument("--recipe", default=None, help="Eval recipe (YAML): tasks with per-task options.")
    parser.add_argument("--limit", type=int, default=None, help="Evaluate only the first N examples of each task.")
    parser.add_argument("--batch-size", type=int, default=None, help="Prompts per forward / generate call [16].")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="Generation budget [256].")
    parser.add_argument("--samples", type=int, default=None, help="k of avg@k for generative tasks [1].")
    parser.add_argument("--temperature", type=float, default=None,
                        help=f"Sampling temperature [0; {SAMPLING_TEMPERATURE} with --samples > 1].")
    parser.add_argument("--num-fewshot", type=int, default=None, help="Few-shot examples for tasks that take them.")
    parser.add_argument("--seed", type=int, default=None, help="Seed of sampling and few-shot selection [0].")
    parser.add_argument("--out", default=None, help="Output directory [CKPT/eval].")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N [cuda when available].")
    parser.add_argument("--harness", choices=["none", "lm-eval"], default=None,
                        help="Run the tasks with lm-evaluation-harness (needs smolforge[harness]).")
    parser.set_defaults(func=_eval_command)


def _split_assignment(text: str, flag: str, separator: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key or not value or (separator != "=" and separator not in key):
        form = "TASK=PATH" if separator == "=" else "TASK.KEY=VALUE"
        raise SmolforgeError(f"{flag} {text!r}: expected {form}")
    return key, value


def recipe_from_args(args: argparse.Namespace) -> EvalRecipe:
    """The eval recipe file (if any) with the command-line flags applied over it."""
    recipe = load_recipe(args.recipe, schema=EvalRecipe) if args.recipe else EvalRecipe()
    overrides = {"batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens, "limit": args.limit,
                 "samples": args.samples, "temperature": args.temperature, "num_fewshot": args.num_fewshot,
                 "seed": args.seed, "device": args.device, "harness": args.harness}
    values = recipe.model_dump()
    values.update({k: v for k, v in overrides.items() if v is not None})
    if args.tasks is not None:
        by_name = {t["name"]: t for t in values["tasks"]}
        names = [n.strip() for n in args.tasks.split(",") if n.strip()]
        values["tasks"] = [by_name.get(n, {"name": n}) for n in names]
    tasks = {t["name"]: t for t in values["tasks"]}
    assignments = [(*_split_assignment(a, "--data", "="), "data") for a in args.data]
    for raw in args.sets:
        key, value = _split_assignment(raw, "--set", ".")
        task, _, option = key.partition(".")
        assignments.append((task, yaml.safe_load(value), option))
    for task, value, option in assignments:
        if task not in tasks:
            raise SmolforgeError(f"--data/--set for task {task!r}, which is not among the tasks "
                                 f"({', '.join(tasks) or 'none'})")
        if option in EvalTaskSpec.model_fields and option not in ("name", "options"):
            tasks[task][option] = value
        else:
            tasks[task].setdefault("options", {})[option] = value
    return validate_recipe(values, "(command line)")


def validate_recipe(values: dict[str, Any], origin: str) -> EvalRecipe:
    try:
        return EvalRecipe.model_validate(values)
    except ValidationError as exc:
        raise SmolforgeError(_describe(exc, EvalRecipe, origin)) from None


def _eval_command(args: argparse.Namespace) -> int:
    recipe = recipe_from_args(args)
    run_recipe(args.checkpoint, recipe, out_dir=args.out, show=True)
    return 0
