"""The lm-evaluation-harness bridge: task YAMLs filled with local files, lm-eval's metric names,
and a run on a tiny checkpoint whose log-likelihoods and accuracies equal the native task's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from smolforge.cli import main
from smolforge.errors import SmolforgeError
from smolforge.eval import harness
from smolforge.eval.runner import evaluate
from smolforge.model import Transformer, debug
from smolforge.train.checkpoint import save_checkpoint

DATA = Path(__file__).parent / "data"  # first rows of ../shared/data (see the SOURCE.txt files)
ARC = DATA / "mc" / "arc_easy.jsonl"
GSM8K = DATA / "gsm8k"


def settings(**options) -> dict:
    return {"batch_size": 8, "max_new_tokens": 16, "limit": None, "samples": 1, "temperature": 0.0, "seed": 0,
            "options": options}


def test_local_task_configs_point_at_the_given_files():
    config = harness.local_task_config("arc_easy", settings(data=str(ARC)))
    assert config["task"] == "smolforge_arc_easy" and config["dataset_path"] == "json"
    assert config["dataset_kwargs"] == {"data_files": {"test": str(ARC.resolve())}}
    assert config["output_type"] == "multiple_choice"
    gsm = harness.local_task_config("gsm8k", settings(data=str(GSM8K / "test.jsonl"), num_fewshot=3,
                                                      fewshot_data=str(GSM8K / "train.jsonl")))
    assert gsm["dataset_kwargs"]["data_files"] == {"test": str((GSM8K / "test.jsonl").resolve()),
                                                   "train": str((GSM8K / "train.jsonl").resolve())}
    assert gsm["num_fewshot"] == 3 and gsm["fewshot_split"] == "train"
    assert gsm["generation_kwargs"]["max_gen_toks"] == 16


@pytest.mark.parametrize("name, options, message", [
    ("piqa", {}, r"task piqa needs a data file \(--data piqa=PATH\)"),
    ("piqa", {"data": "/no/file.jsonl"}, r"data /no/file.jsonl: no such file"),
    ("gsm8k", {"data": str(GSM8K / "test.jsonl"), "num_fewshot": 2}, r"2-shot gsm8k needs fewshot_data"),
    ("arc_easy", {"data": str(ARC), "num_fewshot": 2}, r"scored 0-shot"),
])
def test_bad_local_task_settings(name, options, message):
    with pytest.raises(SmolforgeError, match=message):
        harness.local_task_config(name, settings(**options))


def test_data_for_a_task_lm_eval_reads_itself_is_refused(tmp_path):
    with pytest.raises(SmolforgeError, match=r"hellaswag is not a local task here .* --data would be ignored"):
        harness.run_harness(tmp_path, [("hellaswag", settings(data=str(ARC)))], tmp_path)


def test_metric_names_drop_the_default_filter():
    results = {"alias": "x", "acc,none": 0.5, "acc_stderr,none": 0.1, "acc_norm,none": 0.25,
               "exact_match,strict-match": 0.0, "exact_match_stderr,strict-match": 0.0}
    assert harness.metrics_of(results) == {"acc": 0.5, "acc_norm": 0.25, "exact_match_strict-match": 0.0,
                                           "acc_stderr": 0.1, "exact_match_stderr_strict-match": 0.0}


@pytest.fixture(scope="module")
def checkpoint(tokenizer, tmp_path_factory) -> Path:
    torch.manual_seed(0)
    cfg = debug().model_copy(update={"vocab_size": tokenizer.vocab_size, "init_std": 0.2, "max_seq_len": 1024})
    return save_checkpoint(tmp_path_factory.mktemp("harness") / "ckpt", Transformer(cfg).eval(), tokenizer)


def test_lm_eval_on_a_local_task_agrees_with_the_native_task(checkpoint, tmp_path):
    """Same exported model, same file: lm-eval's per-choice log-likelihoods equal ours within 1e-4
    and its acc / acc_norm equal our cloze_acc / cloze_acc_norm."""
    out = tmp_path / "out"
    assert main(["eval", str(checkpoint), "--harness", "lm-eval", "--tasks", "arc_easy",
                 "--data", f"arc_easy={ARC}", "--limit", "6", "--out", str(out), "--device", "cpu"]) == 0
    entry = json.loads((out / "eval.json").read_text())["tasks"]["lm-eval/arc_easy"]
    assert entry["n"] == 6 and entry["notes"][0].startswith("lm-eval 0.4")
    theirs = [json.loads(line) for line in (out / "lm-eval-arc_easy.samples.jsonl").read_text().splitlines()]
    native = evaluate(checkpoint, ["arc_easy"], options={"arc_easy": {"data": str(ARC), "formats": ["cloze"]}},
                      limit=6, out_dir=tmp_path / "native", device="cpu")["arc_easy"]
    for mine, sample in zip(native.samples, theirs):
        assert sample["doc"]["query"] == mine["query"]
        lls = [resp[0][0] for resp in sample["resps"]]
        assert max(abs(a - b) for a, b in zip(lls, mine["cloze_loglikelihoods"])) <= 1e-4
    assert entry["metrics"]["acc"] == pytest.approx(native.metrics["cloze_acc"])
    assert entry["metrics"]["acc_norm"] == pytest.approx(native.metrics["cloze_acc_norm"])


def test_lm_eval_gsm8k_from_local_files_with_fewshot(checkpoint, tmp_path):
    from smolforge.eval.runner import EvalRecipe, EvalTaskSpec, run_recipe

    spec = EvalTaskSpec(name="gsm8k", data=str(GSM8K / "test.jsonl"), fewshot_data=str(GSM8K / "train.jsonl"),
                        num_fewshot=1, limit=2, max_new_tokens=4)
    results = run_recipe(checkpoint, EvalRecipe(tasks=[spec], harness="lm-eval", device="cpu"), out_dir=tmp_path)
    result = results["lm-eval/gsm8k"]
    assert result.n == 2 and "1-shot" in result.notes
    assert set(result.metrics) >= {"exact_match_strict-match", "exact_match_flexible-extract"}
    first = result.samples[0]
    assert first["arguments"][0][0].count("Question:") == 2  # one shot, then the question
