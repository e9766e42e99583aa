"""The quickstart command end to end, shortened to a few steps."""

from __future__ import annotations

import json

from smolforge.cli import main
from smolforge.quickstart import bundled_text


def test_quickstart_runs_every_stage_and_writes_the_report(tmp_path, capsys):
    args = ["quickstart", "--dir", str(tmp_path), "--max-steps", "4", "--sample-tokens", "16",
            "--sft-examples", "60", "--sft-max-steps", "3", "--eval-examples", "8", "--pair-prompts", "8",
            "--dpo-max-steps", "2", "--grpo-prompts", "16", "--grpo-max-steps", "2"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "validation bits per byte" in out and "ROMEO:" in out
    run = tmp_path / "quickstart"
    for name in ("report.md", "loss.png", "recipe.yaml", "metrics.jsonl", "final/model.safetensors",
                 "final/tokenizer.json", "data/train/manifest.json", "data/val/manifest.json",
                 "sft/final/model.safetensors", "sft/report.md", "data/sft-train.jsonl"):
        assert (run / name).exists(), name
    report = (run / "report.md").read_text()
    assert "validation bits per byte" in report and "## Sample" in report
    assert "## SFT on smol tasks" in report and "| **all** |" in report and "mode honoured" in out
    assert "## Preference stage" in report and "pairs: 8 prompts x 4 responses" in out
    # The report card: plots, eval scores by stage (from the runner's eval.json), lineage.
    for name in ("evals.png", "throughput.png", "sft/final/eval/eval.json", "sft/final/eval/vibes.md",
                 "sft/final/eval/vibes.jsonl", "data/held-out.jsonl"):
        assert (run / name).exists(), name
    assert report.startswith("# Quickstart: pretrain, sft") and "## Lineage" in report
    assert "s0 --> s1" in report and "| smoltasks | accuracy |" in report
    assert "| thinkfollow | turn_accuracy |" in report and "ThinkFollow:" in out
    sft_evals = json.loads((run / "sft" / "final" / "eval" / "eval.json").read_text())["tasks"]
    assert set(sft_evals) == {"smoltasks", "thinkfollow", "vibes"} and sft_evals["smoltasks"]["n"] == 8
    sft_meta = json.loads((run / "sft" / "final" / "smolforge.json").read_text())
    assert sft_meta["stage"] == "sft" and sft_meta["parent"] == str(run / "final")
    # The GRPO stage: from the preference model (or SFT's when the pairs were too few), on prompts
    # of their own, evaluated like the other stages, and its section in the report.
    grpo_meta = json.loads((run / "grpo" / "final" / "smolforge.json").read_text())
    assert grpo_meta["stage"] == "grpo"
    assert grpo_meta["parent"] in (str(run / "dpo" / "final"), str(run / "sft" / "final"))
    grpo_evals = json.loads((run / "grpo" / "final" / "eval" / "eval.json").read_text())["tasks"]
    assert set(grpo_evals) == {"smoltasks", "thinkfollow", "vibes"} and grpo_evals["smoltasks"]["n"] == 8
    rollouts = [json.loads(line) for line in (run / "grpo" / "metrics.jsonl").read_text().splitlines()
                if '"rewards/smol_task"' in line]
    assert len(rollouts) == 2 and all("rewards/think_format" in r for r in rollouts)
    prompts = {json.dumps(json.loads(line)["messages"][:-1])
               for line in (run / "data" / "grpo-prompts.jsonl").read_text().splitlines()}
    held = {json.dumps(json.loads(line)["messages"][:-1])
            for line in (run / "data" / "held-out.jsonl").read_text().splitlines()}
    assert len(prompts) == 16 and not prompts & held
    assert "[7/7] grpo" in out and "## GRPO on smol tasks" in report and "after GRPO" in report
    section = report.split("## GRPO on smol tasks")[1].split("\n## ")[0]
    assert f"{rollouts[0]['reward']:.3f} | {rollouts[-1]['reward']:.3f}" in section  # start vs end
    assert "has a standard error of about" in section and "| after GRPO |" in section
    assert "s GRPO)" in report and "`grpo/final`: grpo, step 2, from `" in report and "GRPO: on-policy reward" in out
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "val_bpb" in line]
    assert evals and evals[-1]["val_bpb"] > 0
    # The validation split is the last 10% of the characters, kept out of training.
    text = bundled_text()
    assert (run / "data" / "val.txt").read_text() == text[int(len(text) * 0.9):]
    assert (run / "data" / "train.txt").read_text() == text[: int(len(text) * 0.9)]
    # A second run does not overwrite the first unless asked.
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
