"""The report card: stages, lineage, eval scores and plots from hand-made run directories with
known numbers; the single-run report; clear errors for what is not a run."""

from __future__ import annotations

import json

import pytest
import yaml

from smolforge.cli import main
from smolforge.errors import SmolforgeError
from smolforge.lab.report import (
    bar_metrics,
    find_runs,
    lineage_order,
    load_stage,
    write_report_card,
    write_run_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_run(run_dir, stage, losses, tokens_per_step, rates, parent=None, evals=None, val=None):
    """A run directory as the training loop writes it: metrics.jsonl, recipe.yaml, final/."""
    (run_dir / "final").mkdir(parents=True)
    records = [{"step": 10 * (i + 1), "loss": loss, "tokens": 10 * (i + 1) * tokens_per_step,
                "tokens_per_s": rate, "elapsed_s": 5.0 * (i + 1)}
               for i, (loss, rate) in enumerate(zip(losses, rates))]
    if val:
        records.append({"step": 10 * len(losses), **val})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump({"run": {"name": run_dir.name}, "train": {"lr": 1e-3}}))
    (run_dir / "final" / "smolforge.json").write_text(json.dumps(
        {"stage": stage, "parent": str(parent) if parent else None, "step": 10 * len(losses)}))
    if evals:
        (run_dir / "final" / "eval").mkdir()
        (run_dir / "final" / "eval" / "eval.json").write_text(json.dumps(
            {"checkpoint": str(run_dir / "final"),
             "tasks": {task: {"metrics": metrics, "n": 10} for task, metrics in evals.items()}}))
        (run_dir / "final" / "eval" / "vibes.md").write_text("# Vibe test\n")
    return run_dir


@pytest.fixture
def pipeline(tmp_path):
    """pretrain (runs/qs) with sft nested inside it, and dpo elsewhere started from an sft step."""
    pretrain = make_run(tmp_path / "runs" / "qs", "pretrain", [7.0, 5.0, 4.0], 100, [900, 1000, 1100],
                        val={"val_loss": 4.5, "val_bpb": 2.25})
    sft = make_run(pretrain / "sft", "sft", [3.0, 2.0], 50, [3000, 4000], parent=pretrain / "final",
                   evals={"smoltasks": {"accuracy": 0.25, "mode_honoured": 0.5},
                          "vibes": {"mean_reply_tokens": 40.0, "empty_replies": 0.0}})
    (sft / "checkpoints" / "step_000010").mkdir(parents=True)
    dpo = make_run(tmp_path / "elsewhere" / "dpo", "dpo", [0.69, 0.6], 20, [500, 700],
                   parent=sft / "checkpoints" / "step_000010",
                   evals={"smoltasks": {"accuracy": 0.5, "mode_honoured": 0.75},
                          "vibes": {"mean_reply_tokens": 30.0, "changed_vs_parent": 0.4}})
    return pretrain, sft, dpo


def test_runs_are_found_and_ordered_by_lineage(pipeline):
    pretrain, sft, dpo = pipeline
    runs = find_runs([dpo, pretrain])  # the nested sft run is found inside the pretraining run
    assert runs == [dpo, pretrain, sft]
    ordered = lineage_order([load_stage(r) for r in runs])
    assert [s.stage for s in ordered] == ["pretrain", "sft", "dpo"]
    stage = load_stage(pretrain)
    assert stage.tokens == 3000 and stage.wall_seconds == 15.0
    assert stage.tokens_per_s == 1050  # median of the windows after the first (warm-up)
    assert stage.last_val == {"val_loss": 4.5, "val_bpb": 2.25}


def test_report_card_files_and_known_numbers(pipeline, tmp_path):
    pretrain, sft, dpo = pipeline
    out = tmp_path / "card"
    path = write_report_card([pretrain, dpo], out, extra_sections={"Notes": "hand-made runs"})
    for name in ("report.md", "loss.png", "evals.png", "throughput.png"):
        assert (out / name).is_file(), name
    for name in ("loss.png", "evals.png", "throughput.png"):
        assert (out / name).read_bytes().startswith(PNG_MAGIC)
    text = path.read_text()
    assert text.startswith("# Report card: pretrain, sft, dpo")
    # Stage table: steps, tokens, first -> last loss, validation metrics, median tokens/s, wall time.
    assert "| pretrain | [../runs/qs](../runs/qs/report.md) |" not in text  # no report.md there yet
    assert "| pretrain | `../runs/qs` | 30 | 3,000 | 7.000 → 4.000 | 4.5000 | 2.2500 | 1,050 | 15 s |" in text
    assert "| dpo | `../elsewhere/dpo` | 20 | 400 | 0.690 → 0.600 | - | - | 700 | 10 s |" in text
    # Eval table: one column per evaluated stage, "-" where a stage lacks the metric.
    assert "| task | metric | sft | dpo |" in text
    assert "| smoltasks | accuracy | 0.2500 | 0.5000 |" in text
    assert "| vibes | changed_vs_parent | - | 0.4000 |" in text
    assert "../runs/qs/sft/final/eval/vibes.md" in text
    # Lineage: dpo started from a periodic checkpoint of sft, which belongs to the sft run.
    assert "s0 --> s1" in text and "s1 --> s2" in text
    assert "- `../runs/qs/final`: pretrain, step 30\n  - `../runs/qs/sft/final`: sft" in text
    assert "    - `../elsewhere/dpo/final`: dpo, step 20, from `../runs/qs/sft/checkpoints/step_000010`" in text
    assert text.index("## Lineage") < text.index("## Notes") < text.index("## Resolved recipes")


def test_bars_hold_shares_only(pipeline):
    stages = [load_stage(r) for r in find_runs(list(pipeline))]
    pairs = bar_metrics(stages)
    assert ("smoltasks", "accuracy") in pairs and ("vibes", "changed_vs_parent") in pairs
    assert ("vibes", "mean_reply_tokens") not in pairs  # a count, not a share: table only


def test_external_parent_and_cli(tmp_path, capsys):
    run = make_run(tmp_path / "sft-of-hf", "sft", [2.0, 1.5], 10, [100, 100], parent="HuggingFaceTB/SmolLM2-135M")
    assert main(["report", str(run)]) == 0  # default --out: the first run
    assert "report card:" in capsys.readouterr().out
    text = (run / "report.md").read_text()
    assert 'x0["HuggingFaceTB/SmolLM2-135M"]' in text and "x0 --> s0" in text
    assert "| sft | `sft-of-hf` | 20 |" in text  # the card's own directory: named, not linked
    assert "## Evaluation" not in text and not (run / "evals.png").exists()  # never evaluated


def test_single_run_report_still_works(pipeline):
    pretrain, _, _ = pipeline
    path = write_run_report(pretrain, {"Extra": "body"})
    text = path.read_text()
    assert (pretrain / "loss.png").read_bytes().startswith(PNG_MAGIC)
    assert "| validation bits per byte | 2.2500 |" in text and "## Extra" in text


def test_bad_inputs(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SmolforgeError, match="is not a run directory"):
        write_report_card([tmp_path / "empty"])
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "no such run directory" in capsys.readouterr().err
    run = make_run(tmp_path / "run", "sft", [1.0], 10, [10])
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 20, "loss": \n')
    with pytest.raises(SmolforgeError, match=r"metrics.jsonl:2: malformed JSON"):
        write_report_card([run])
    (run / "metrics.jsonl").write_text('{"step": 10, "loss": 1.0}\n')
    (run / "final" / "eval.json").write_text('{"tasks": [1, 2]}')
    with pytest.raises(SmolforgeError, match="field 'tasks'"):
        write_report_card([run])
