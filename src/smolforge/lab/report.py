"""Human-readable summaries: a run's `report.md` + `loss.png`, and the report card of a pipeline.

`write_run_report(run_dir)` summarises one stage (every training command writes it).
`smolforge report RUN_DIR... [--out DIR]` writes the report card of several stages, e.g.
pretrain -> SFT -> preference (DESIGN principle 4, "measured, not assumed"): `report.md` with
- `loss.png`: the loss curves of all stages on one axis of tokens seen, stages end to end in
  lineage order (each stage's own objective: LM, SFT and preference losses are not comparable
  in value, only in shape);
- `evals.png`: eval scores by stage, grouped bars per metric, from the `eval.json` that
  `smolforge eval` writes next to each stage's final checkpoint (`final/eval/` or `final/`);
- `throughput.png`: training tokens/s and wall time per stage;
- the lineage of checkpoints, read from each final checkpoint's `parent` in smolforge.json, as
  a Mermaid graph and an indented list.
A RUN_DIR whose sub-directories are runs (the quickstart puts `sft/` and `dpo/` inside its run)
brings them in too.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from smolforge.errors import SmolforgeError

METRICS_FILE, RECIPE_FILE, REPORT_FILE = "metrics.jsonl", "recipe.yaml", "report.md"
EVAL_FILE = "eval.json"
MAX_BAR_METRICS_PER_TASK = 4  # the first metrics of a task (its headline first) that are shares
_VAL_NAMES = {"val_loss": "validation loss", "val_bpb": "validation bits per byte",
              "val_ppl": "validation perplexity"}


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise SmolforgeError(f"{path}:{number}: malformed JSON ({exc.msg})") from None
    return records


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display (CI, servers)
    import matplotlib.pyplot as plt

    return plt


def plot_losses(records: list[dict], out: Path, title: str) -> bool:
    """Training loss per logged step and validation loss per eval; False when nothing to plot."""
    plt = _pyplot()
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if not train:
        return False
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(*zip(*train), label="train loss", linewidth=1.2)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss", linewidth=1.2, markersize=4)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return True


def write_run_report(run_dir: str | Path, extra_sections: dict[str, str] | None = None) -> Path:
    """Write report.md (+ loss.png) from metrics.jsonl, recipe.yaml and the final checkpoint."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    recipe = yaml.safe_load((run_dir / RECIPE_FILE).read_text()) if (run_dir / RECIPE_FILE).exists() else {}
    has_plot = plot_losses(records, run_dir / "loss.png", f"{run_dir.name}: loss")
    lines = [f"# Run report: {run_dir.name}", ""]
    train_records = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r]
    if train_records:
        last = train_records[-1]
        lines += ["| measure | value |", "|---|---|",
                  f"| steps | {last['step']} |",
                  f"| tokens seen | {last.get('tokens', 0):,} |",
                  f"| final training loss | {last['loss']:.4f} |",
                  f"| first logged training loss | {train_records[0]['loss']:.4f} |",
                  f"| training throughput (last window) | {last.get('tokens_per_s', 0):,.0f} tokens/s |",
                  f"| wall time | {last.get('elapsed_s', 0):.0f} s |"]
        for key, value in (evals[-1] if evals else {}).items():
            if key.startswith("val_"):  # a stage's own validation metrics (e.g. preference rewards)
                lines.append(f"| {_VAL_NAMES.get(key, key.replace('_', ' '))} | {value:.4f} |")
        lines.append("")
    if has_plot:
        lines += ["![loss curve](loss.png)", ""]
    for heading, body in (extra_sections or {}).items():
        lines += [f"## {heading}", "", body, ""]
    if recipe:
        lines += ["## Resolved recipe", "", "```yaml", yaml.safe_dump(recipe, sort_keys=False).rstrip(), "```", ""]
    out = run_dir / REPORT_FILE
    out.write_text("\n".join(lines), encoding="utf-8")
    return out


# --- the report card of several stages ------------------------------------------------------------


@dataclass(eq=False)  # identity: stages are graph nodes
class StageRun:
    """What the report card knows about one run directory."""

    run_dir: Path
    stage: str  # smolforge.json "stage" of the final checkpoint, else the run's name
    records: list[dict]
    recipe: dict[str, Any]
    meta: dict[str, Any]  # smolforge.json of final/ ({} when the run has not finished)
    evals: dict[str, dict[str, float]] = field(default_factory=dict)  # task -> metrics
    eval_file: Path | None = None
    label: str = ""  # unique name in plots and tables

    @property
    def final(self) -> Path:
        return self.run_dir / "final"

    @property
    def train_records(self) -> list[dict]:
        return [r for r in self.records if "loss" in r and "step" in r]

    @property
    def last_val(self) -> dict[str, float]:
        evals = [r for r in self.records if any(k.startswith("val_") for k in r)]
        return {k: v for k, v in (evals[-1] if evals else {}).items() if k.startswith("val_")}

    @property
    def tokens(self) -> int:
        train = self.train_records
        return int(train[-1].get("tokens", 0)) if train else 0

    @property
    def tokens_per_s(self) -> float:
        """Median over logged windows, the first left out when there are more (it holds warm-up)."""
        rates = [r["tokens_per_s"] for r in self.train_records if "tokens_per_s" in r]
        return statistics.median(rates[1:] if len(rates) > 1 else rates) if rates else 0.0

    @property
    def wall_seconds(self) -> float:
        times = [r["elapsed_s"] for r in self.train_records if "elapsed_s" in r]
        return float(times[-1]) if times else 0.0


def is_run_dir(path: Path) -> bool:
    return (path / METRICS_FILE).is_file() or (path / "final").is_dir()


def find_runs(paths: list[str | Path]) -> list[Path]:
    """Each path that is a run directory, followed by the runs directly inside it."""
    runs: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if not path.is_dir():
            raise SmolforgeError(f"{path}: no such run directory")
        nested = sorted(p for p in path.iterdir() if p.is_dir() and is_run_dir(p))
        if not is_run_dir(path) and not nested:
            raise SmolforgeError(f"{path} is not a run directory: it has no {METRICS_FILE} or final/ "
                                 "(and no runs inside it)")
        for run in ([path] if is_run_dir(path) else []) + nested:
            if run.resolve() not in {r.resolve() for r in runs}:
                runs.append(run)
    return runs


def read_eval_scores(checkpoint: Path) -> tuple[dict[str, dict[str, float]], Path | None]:
    """Task -> metrics from the checkpoint's eval.json (`<ckpt>/eval/` first, then `<ckpt>/`)."""
    from smolforge.data.sources import read_json_object

    for path in (checkpoint / "eval" / EVAL_FILE, checkpoint / EVAL_FILE):
        if path.is_file():
            tasks = read_json_object(path).get("tasks")
            if not isinstance(tasks, dict):
                raise SmolforgeError(f"{path} field 'tasks': expected an object of task results")
            return {name: {k: float(v) for k, v in (entry.get("metrics") or {}).items()
                           if isinstance(v, (int, float))}
                    for name, entry in tasks.items() if isinstance(entry, dict)}, path
    return {}, None


def load_stage(run_dir: Path) -> StageRun:
    from smolforge.train.checkpoint import read_meta

    recipe_path = run_dir / RECIPE_FILE
    recipe = (yaml.safe_load(recipe_path.read_text(encoding="utf-8")) or {}) if recipe_path.is_file() else {}
    meta = read_meta(run_dir / "final") if (run_dir / "final").is_dir() else {}
    evals, eval_file = read_eval_scores(run_dir / "final")
    return StageRun(run_dir=run_dir, stage=str(meta.get("stage") or run_dir.name), records=read_metrics(run_dir),
                    recipe=recipe, meta=meta, evals=evals, eval_file=eval_file)


def _owner(path: Path, stages: list[StageRun]) -> StageRun | None:
    """The stage whose run directory holds `path` (its final or a periodic checkpoint); the
    innermost one when runs are nested (the quickstart's sft/ inside its pretraining run)."""
    resolved = path.resolve()
    holders = [s for s in stages if s.run_dir.resolve() == resolved or s.run_dir.resolve() in resolved.parents]
    return max(holders, key=lambda s: len(s.run_dir.resolve().parts), default=None)


def parent_of(stage: StageRun, stages: list[StageRun]) -> StageRun | Path | None:
    """The run whose checkpoint this stage started from, the path when no run here holds it."""
    parent = stage.meta.get("parent")
    if not parent:
        return None
    return _owner(Path(parent), stages) or Path(parent)


def lineage_order(stages: list[StageRun]) -> list[StageRun]:
    """Parents before children (depth first from the roots), otherwise in the given order."""
    children: dict[int, list[StageRun]] = {}
    roots = []
    for stage in stages:
        parent = parent_of(stage, stages)
        if isinstance(parent, StageRun) and parent is not stage:
            children.setdefault(id(parent), []).append(stage)
        else:
            roots.append(stage)
    ordered: list[StageRun] = []

    def visit(stage: StageRun) -> None:
        if stage in ordered:
            return
        ordered.append(stage)
        for child in children.get(id(stage), []):
            visit(child)

    for stage in roots or stages[:1]:
        visit(stage)
    ordered += [s for s in stages if s not in ordered]  # a parent cycle: keep every stage anyway
    return ordered


def _label(stages: list[StageRun]) -> None:
    counts: dict[str, int] = {}
    for stage in stages:
        counts[stage.stage] = counts.get(stage.stage, 0) + 1
    for stage in stages:
        stage.label = stage.stage if counts[stage.stage] == 1 else f"{stage.stage} ({stage.run_dir.name})"


def plot_stage_losses(stages: list[StageRun], out: Path) -> bool:
    """One figure: each stage's training (line) and validation (dots) loss against tokens seen,
    stages end to end in lineage order."""
    if not any(s.train_records for s in stages):
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.2), dpi=110)
    offset = 0
    for stage in stages:
        train = stage.train_records
        if not train:
            continue
        per_step = train[-1].get("tokens", 0) / max(train[-1]["step"], 1)  # for val records (no tokens)
        line, = ax.plot([offset + r.get("tokens", r["step"] * per_step) for r in train],
                        [r["loss"] for r in train], linewidth=1.2, label=stage.label,
                        marker="." if len(train) < 20 else None)  # a short stage stays visible
        val = [r for r in stage.records if "val_loss" in r and "step" in r]
        if val:
            ax.plot([offset + r["step"] * per_step for r in val], [r["val_loss"] for r in val], "o",
                    color=line.get_color(), markersize=4)
        if offset:
            ax.axvline(offset, color="grey", linestyle=":", linewidth=0.8)
        offset += stage.tokens or train[-1]["step"]
    ax.set_xlim(left=0)
    ax.set_xlabel("tokens seen (stages end to end)")
    ax.set_ylabel("training loss (each stage's objective)")
    ax.set_title("loss per stage (dots: validation)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return True


def bar_metrics(stages: list[StageRun]) -> list[tuple[str, str]]:
    """(task, metric) pairs drawn as bars: per task, its first metrics that are shares in [0, 1]
    for every stage that has them (counts such as reply lengths stay in the table)."""
    chosen: list[tuple[str, str]] = []
    tasks = list(dict.fromkeys(task for s in stages for task in s.evals))
    for task in tasks:
        names = list(dict.fromkeys(m for s in stages for m in s.evals.get(task, {})))
        shares = [m for m in names if all(0.0 <= s.evals[task][m] <= 1.0 for s in stages
                                          if m in s.evals.get(task, {}))]
        chosen += [(task, m) for m in shares[:MAX_BAR_METRICS_PER_TASK]]
    return chosen


def plot_eval_scores(stages: list[StageRun], out: Path) -> bool:
    """Grouped bars: one group per (task, metric), one bar per stage that was evaluated on it."""
    pairs = bar_metrics(stages)
    evaluated = [s for s in stages if s.evals]
    if not pairs or not evaluated:
        return False
    plt = _pyplot()
    width = 0.8 / len(evaluated)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(pairs) + 2), 4.2), dpi=110)
    for i, stage in enumerate(evaluated):
        xs = [j + (i - (len(evaluated) - 1) / 2) * width for j in range(len(pairs))]
        values = [stage.evals.get(task, {}).get(metric) for task, metric in pairs]
        bars = ax.bar(xs, [float("nan") if v is None else v for v in values], width, label=stage.label)
        # Labels, as a score of 0 is a bar of no height; a stage without the metric gets neither.
        ax.bar_label(bars, labels=["" if v is None else f"{v:.2f}" for v in values], fontsize=7)
    ax.set_xticks(range(len(pairs)), [f"{task}\n{metric}" for task, metric in pairs], rotation=30,
                  ha="right", fontsize=8)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("score")
    ax.set_title("eval scores by stage")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return True


def plot_throughput(stages: list[StageRun], out: Path) -> bool:
    """Two bar charts: training tokens/s and wall time per stage."""
    trained = [s for s in stages if s.train_records]
    if not trained:
        return False
    plt = _pyplot()
    fig, (speed, time_ax) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=110)
    labels = [s.label for s in trained]
    speed.bar(labels, [s.tokens_per_s for s in trained], color="tab:blue")
    speed.set_title("training throughput (median)")
    speed.set_ylabel("tokens / s")
    time_ax.bar(labels, [s.wall_seconds for s in trained], color="tab:orange")
    time_ax.set_title("wall time")
    time_ax.set_ylabel("seconds")
    for ax in (speed, time_ax):
        ax.grid(axis="y", alpha=0.3)
        ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return True


def _relative(path: Path, base: Path) -> str:
    """`path` as a link from a file in `base` (markdown links are relative to the report)."""
    return os.path.relpath(path.resolve(), base.resolve())


def lineage_sections(stages: list[StageRun], base: Path) -> tuple[str, str]:
    """(Mermaid graph, indented list) of the checkpoints' lineage."""
    ids = {id(s): f"s{i}" for i, s in enumerate(stages)}
    mermaid = ["```mermaid", "graph LR"]
    external: dict[str, str] = {}
    for stage in stages:
        step = stage.meta.get("step")
        mermaid.append(f'  {ids[id(stage)]}["{stage.label}<br/>{_relative(stage.final, base)}'
                       + (f"<br/>step {step}" if step is not None else "") + '"]')
    for stage in stages:
        parent = parent_of(stage, stages)
        if isinstance(parent, StageRun):
            mermaid.append(f"  {ids[id(parent)]} --> {ids[id(stage)]}")
        elif isinstance(parent, Path):
            key = external.setdefault(str(parent), f"x{len(external)}")
            mermaid += [f'  {key}["{parent}"]', f"  {key} --> {ids[id(stage)]}"]
    mermaid.append("```")

    lines: list[str] = []

    def walk(stage: StageRun, depth: int) -> None:
        step = stage.meta.get("step")
        lines.append("  " * depth + f"- `{_relative(stage.final, base)}`: {stage.stage}"
                     + (f", step {step}" if step is not None else "")
                     + (f", from `{_relative(Path(p), base)}`" if (p := stage.meta.get("parent")) else ""))
        for child in stages:
            if parent_of(child, stages) is stage and child is not stage:
                walk(child, depth + 1)

    for stage in stages:
        if not isinstance(parent_of(stage, stages), StageRun):
            walk(stage, 0)
    return "\n".join(mermaid), "\n".join(lines)


def _number(value: float) -> str:
    return f"{value:.4f}" if abs(value) < 100 else f"{value:,.0f}"


def stage_table(stages: list[StageRun], base: Path) -> str:
    # Loss and bits per byte compare across stages; a stage's own metrics (preference rewards,
    # ...) stay in its report.md.
    val_keys = [k for k in ("val_loss", "val_bpb") if any(k in s.last_val for s in stages)]
    header = ["stage", "run", "steps", "tokens", "training loss (first → last)",
              *[_VAL_NAMES.get(k, k.replace("_", " ")) for k in val_keys], "tokens/s", "wall time"]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for s in stages:
        train = s.train_records
        losses = f"{train[0]['loss']:.3f} → {train[-1]['loss']:.3f}" if train else "-"
        report, name = s.run_dir / REPORT_FILE, _relative(s.run_dir, base)
        name = s.run_dir.resolve().name if name == "." else name
        own = report.is_file() and s.run_dir.resolve() != base.resolve()  # not the card itself
        run = f"[{name}]({_relative(report, base)})" if own else f"`{name}`"
        cells = [s.label, run, str(train[-1]["step"]) if train else "-", f"{s.tokens:,}", losses,
                 *[_number(s.last_val[k]) if k in s.last_val else "-" for k in val_keys],
                 f"{s.tokens_per_s:,.0f}", f"{s.wall_seconds:.0f} s"]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def eval_table(stages: list[StageRun]) -> str:
    """Every metric of every task, one column per evaluated stage."""
    evaluated = [s for s in stages if s.evals]
    rows = ["| task | metric | " + " | ".join(s.label for s in evaluated) + " |",
            "|---|---|" + "---|" * len(evaluated)]
    for task in dict.fromkeys(t for s in evaluated for t in s.evals):
        for metric in dict.fromkeys(m for s in evaluated for m in s.evals.get(task, {})):
            cells = [_number(s.evals[task][metric]) if metric in s.evals.get(task, {}) else "-" for s in evaluated]
            rows.append(f"| {task} | {metric} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def write_report_card(run_dirs: list[str | Path], out_dir: str | Path | None = None,
                      extra_sections: dict[str, str] | None = None, title: str | None = None) -> Path:
    """Write `report.md` with loss, eval and throughput plots for the runs (and the runs inside
    them) into `out_dir` (default: the first run directory); `extra_sections` come after the
    card's own sections. Returns the path of report.md."""
    stages = lineage_order([load_stage(p) for p in find_runs(list(run_dirs))])
    _label(stages)
    out = Path(out_dir) if out_dir is not None else Path(run_dirs[0])
    out.mkdir(parents=True, exist_ok=True)
    names = ", ".join(s.label for s in stages)
    lines = [f"# {title or 'Report card'}: {names}", "", "## Stages", "", stage_table(stages, out), ""]
    if plot_stage_losses(stages, out / "loss.png"):
        lines += ["![loss per stage](loss.png)", ""]
    if any(s.evals for s in stages):
        lines += ["## Evaluation", "", "Scores from each stage's `eval.json` (`smolforge eval`); "
                  "think blocks stripped before scoring.", ""]
        if plot_eval_scores(stages, out / "evals.png"):
            lines += ["![eval scores by stage](evals.png)", ""]
        lines += [eval_table(stages), ""]
        for s in stages:
            if s.eval_file is not None and (s.eval_file.parent / "vibes.md").is_file():
                lines.append(f"- vibe test of {s.label}: [{_relative(s.eval_file.parent / 'vibes.md', out)}]"
                             f"({_relative(s.eval_file.parent / 'vibes.md', out)})")
        lines.append("")
    if plot_throughput(stages, out / "throughput.png"):
        lines += ["## Throughput and time", "", "![throughput and wall time per stage](throughput.png)", ""]
    mermaid, tree = lineage_sections(stages, out)
    lines += ["## Lineage", "", mermaid, "", tree, ""]
    for heading, body in (extra_sections or {}).items():
        lines += [f"## {heading}", "", body, ""]
    recipes = [s for s in stages if s.recipe]
    if recipes:
        lines += ["## Resolved recipes", ""]
        for s in recipes:
            lines += [f"<details><summary>{s.label}</summary>", "", "```yaml",
                      yaml.safe_dump(s.recipe, sort_keys=False).rstrip(), "```", "", "</details>", ""]
    path = out / REPORT_FILE
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "report", help="Write the report card of one or more runs (report.md with plots).",
        description="Report card of training runs: loss curves per stage, eval scores by stage (from "
                    "each final checkpoint's eval.json), throughput and wall time per stage, and the "
                    "lineage of checkpoints. Runs inside a RUN_DIR (e.g. the quickstart's sft/) are "
                    "included.")
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="Run directories (parents before children "
                        "is not required: the lineage orders them).")
    parser.add_argument("--out", default=None, help="Where report.md and the PNGs go (default: the first RUN_DIR).")
    parser.set_defaults(func=_command)


def _command(args: argparse.Namespace) -> int:
    path = write_report_card(args.runs, args.out)
    print(f"report card: {path}")
    return 0
