"""The human-readable summary of a run: `report.md` and `loss.png` in the run directory."""

from __future__ import annotations

import json
from pathlib import Path

import yaml


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_losses(records: list[dict], out: Path, title: str) -> bool:
    """Training loss per logged step and validation loss per eval; False when nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display (CI, servers)
    import matplotlib.pyplot as plt

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
    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text()) if (run_dir / "recipe.yaml").exists() else {}
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
        names = {"val_loss": "validation loss", "val_bpb": "validation bits per byte",
                 "val_ppl": "validation perplexity"}
        for key, value in (evals[-1] if evals else {}).items():
            if key.startswith("val_"):  # a stage's own validation metrics (e.g. preference rewards)
                lines.append(f"| {names.get(key, key.replace('_', ' '))} | {value:.4f} |")
        lines.append("")
    if has_plot:
        lines += ["![loss curve](loss.png)", ""]
    for heading, body in (extra_sections or {}).items():
        lines += [f"## {heading}", "", body, ""]
    if recipe:
        lines += ["## Resolved recipe", "", "```yaml", yaml.safe_dump(recipe, sort_keys=False).rstrip(), "```", ""]
    out = run_dir / "report.md"
    out.write_text("\n".join(lines), encoding="utf-8")
    return out
