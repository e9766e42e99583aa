"""`smolforge eval CKPT --harness lm-eval`: run lm-evaluation-harness on a checkpoint.

Every smolforge checkpoint is a Hugging Face model directory (DESIGN "Hugging Face compatible on
disk"), so the harness's own `hf` backend loads it as is; an in-memory model is saved to a
temporary directory first. The harness thereby gives a second, independent implementation of
the scores: the playbook (ch. "Evals before everything") warns that the same benchmark differs
between implementations by prompt, normalisation and tokenization, and checking against a
reference is how to find out which.

Local data: the task YAMLs in `harness_tasks/` (a multiple-choice task for {query, choices, gold}
files, and lm-eval's `gsm8k` task) read JSON Lines files through `dataset_path: json`. For the
task names smolforge knows (arc_easy, piqa, mc, gsm8k, ...) the bridge copies the matching YAML
into a temporary include directory with `data_files` pointing at the task's `--data` file (and
at `fewshot_data` for few-shot GSM8K), so nothing is downloaded. Any other name is passed to the
harness as is: its own registry then decides what it needs (often a download from the Hub).
"""

from __future__ import annotations

import os
import tempfile
import time
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from smolforge.errors import SmolforgeError
from smolforge.eval.core import TaskResult

# smolforge task name -> template in harness_tasks/
LOCAL_TASKS = {"arc_easy": "multiple_choice", "arc_challenge": "multiple_choice", "piqa": "multiple_choice",
               "openbook_qa": "multiple_choice", "mc": "multiple_choice", "gsm8k": "gsm8k"}
TASK_PREFIX = "smolforge_"
# Hub access off while reading local tasks: an offline machine then fails fast instead of waiting
# on retries (datasets and huggingface_hub read these when imported).
OFFLINE_ENV = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


def template(name: str) -> dict[str, Any]:
    text = resources.files("smolforge.eval").joinpath("harness_tasks", f"{name}.yaml").read_text("utf-8")
    return yaml.safe_load(text)


def local_task_config(name: str, settings: dict[str, Any]) -> dict[str, Any]:
    """The harness YAML of a smolforge task name, its data files filled in."""
    options = settings["options"]
    kind = LOCAL_TASKS[name]
    data = options.get("data")
    if not data:
        raise SmolforgeError(f"--harness lm-eval: task {name} needs a data file (--data {name}=PATH)")
    if not Path(data).is_file():
        raise SmolforgeError(f"task {name}: data {data}: no such file")
    config = template(kind)
    config["task"] = TASK_PREFIX + name
    files = {"test": str(Path(data).resolve())}
    shots = int(options.get("num_fewshot") or 0)
    if kind == "gsm8k":
        config["num_fewshot"] = shots
        if shots:
            if not options.get("fewshot_data"):
                raise SmolforgeError(f"--harness lm-eval: {shots}-shot {name} needs fewshot_data "
                                     f"(--set {name}.fewshot_data=train.jsonl)")
            files["train"] = str(Path(options["fewshot_data"]).resolve())
            config["fewshot_split"] = "train"
        config["generation_kwargs"]["max_gen_toks"] = settings["max_new_tokens"]
    elif shots:
        raise SmolforgeError(f"--harness lm-eval: task {name} is scored 0-shot (num_fewshot {shots})")
    config["dataset_kwargs"] = {"data_files": files}
    return config


def metrics_of(task_results: dict[str, Any]) -> dict[str, float]:
    """lm-eval's {"acc,none": x, "acc_stderr,none": s, "alias": ...} -> {"acc": x, "acc_stderr": s}.

    A filter other than "none" (gsm8k's strict-match / flexible-extract) joins the name."""
    metrics = {}
    for key, value in task_results.items():
        if "," not in key or not isinstance(value, (int, float)):
            continue
        metric, filter_name = key.split(",", 1)
        metrics[metric if filter_name == "none" else f"{metric}_{filter_name}"] = float(value)
    headline = [k for k in metrics if not k.endswith("_stderr") and "_stderr_" not in k]
    return {k: metrics[k] for k in headline + [k for k in metrics if k not in headline]}


@contextmanager
def _environment(values: dict[str, str]):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _model_dir(source: str | Path | tuple[Any, Any], scratch: Path) -> Path:
    if not isinstance(source, tuple):
        from smolforge.interop.hub import resolve_model_path

        return resolve_model_path(source)
    from smolforge.train.checkpoint import save_checkpoint

    model, tokenizer = source
    return save_checkpoint(scratch / "model", model, tokenizer, meta={"stage": "eval-export"})


def run_harness(source: str | Path | tuple[Any, Any], tasks: list[tuple[str, dict[str, Any]]],
                out_dir: Path, device: str = "cpu", seed: int = 0) -> dict[str, TaskResult]:
    """Run each (name, settings) with lm-eval's `hf` backend; one TaskResult per task name."""
    try:
        import lm_eval  # noqa: F401  (checked before any work)
    except ImportError:
        raise SmolforgeError("--harness lm-eval needs lm-evaluation-harness: pip install 'smolforge[harness]'") from None
    for name, settings in tasks:
        if settings["samples"] > 1:
            raise SmolforgeError(f"--harness lm-eval: task {name}: --samples > 1 is not supported; "
                                 "run avg@k with the native tasks")
    all_local = all(name in LOCAL_TASKS for name, _ in tasks)
    with tempfile.TemporaryDirectory(prefix="smolforge-harness-") as scratch, \
            _environment(OFFLINE_ENV if all_local else {}):
        include = Path(scratch) / "tasks"
        include.mkdir()
        harness_names = {}
        for name, settings in tasks:
            if name in LOCAL_TASKS:
                config = local_task_config(name, settings)
                (include / f"{config['task']}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
                harness_names[name] = config["task"]
            elif settings["options"].get("data"):
                raise SmolforgeError(f"--harness lm-eval: {name} is not a local task here (local: "
                                     f"{', '.join(LOCAL_TASKS)}); lm-eval's own {name} reads its own data, "
                                     "so --data would be ignored")
            else:
                harness_names[name] = name
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager

        model_dir = _model_dir(source, Path(scratch))
        # One model for every task; the batch size of the first task serves them all.
        lm = HFLM(pretrained=str(model_dir), device=device, batch_size=tasks[0][1]["batch_size"])
        manager = TaskManager(include_path=str(include), include_defaults=not all_local)
        results = {}
        for name, settings in tasks:
            harness_name = harness_names[name]
            start = time.perf_counter()
            try:
                output = simple_evaluate(model=lm, tasks=[harness_name], limit=settings["limit"],
                                         num_fewshot=None if name in LOCAL_TASKS else settings["options"].get("num_fewshot"),
                                         task_manager=manager, log_samples=True, random_seed=seed,
                                         numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
            except (KeyError, ValueError, FileNotFoundError) as exc:
                raise SmolforgeError(f"--harness lm-eval: task {name}: {exc}") from None
            seconds = time.perf_counter() - start
            task_results = output["results"][harness_name]
            n = int(output.get("n-samples", {}).get(harness_name, {}).get("effective", 0))
            samples = output.get("samples", {}).get(harness_name, [])
            notes = [f"lm-eval {_version()} task {harness_name}", f"{output['configs'][harness_name].get('num_fewshot') or 0}-shot"]
            if settings["options"].get("data"):
                notes.append(f"data: {settings['options']['data']}")
            results[name] = TaskResult(task=name, metrics=metrics_of(task_results), n=n or len(samples),
                                       seconds=seconds, samples=samples, notes=notes)
    return results


def _version() -> str:
    from importlib.metadata import version

    return version("lm-eval")
