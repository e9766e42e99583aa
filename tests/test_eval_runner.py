"""The eval runner: `smolforge eval` end to end on a tiny checkpoint, eval.json merging, eval
recipes and flags, errors before the model loads, the Python entry point, and the bpb task
against a hand computation."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from smolforge.cli import main
from smolforge.engine import Engine
from smolforge.errors import SmolforgeError
from smolforge.eval import bpb
from smolforge.eval.core import TASKS, EvalContext, TaskResult, get_task
from smolforge.eval.runner import EVAL_FILE, EvalRecipe, evaluate, merge_eval_file, run_recipe
from smolforge.model import Transformer, debug
from smolforge.train.checkpoint import save_checkpoint
from smolforge.train.objectives import IGNORE_INDEX

DATA = Path(__file__).parent / "data"  # first rows of ../shared/data (see the SOURCE.txt files)
ARC = DATA / "mc" / "arc_easy.jsonl"
GSM8K = DATA / "gsm8k" / "test.jsonl"


@pytest.fixture(scope="module")
def model(tokenizer) -> Transformer:
    torch.manual_seed(0)
    cfg = debug().model_copy(update={"vocab_size": tokenizer.vocab_size, "init_std": 0.2, "max_seq_len": 1024})
    return Transformer(cfg).eval()


@pytest.fixture(scope="module")
def checkpoint(model, tokenizer, tmp_path_factory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("eval") / "ckpt", model, tokenizer)


def read_eval(directory: Path) -> dict:
    return json.loads((directory / EVAL_FILE).read_text())


def test_cli_runs_tasks_writes_eval_json_and_merges_later_runs(checkpoint, capsys):
    code = main(["eval", str(checkpoint), "--tasks", "bpb,arc_easy", "--data", f"arc_easy={ARC}",
                 "--limit", "3", "--batch-size", "4"])
    assert code == 0
    out_dir = checkpoint / "eval"
    data = read_eval(out_dir)
    assert data["checkpoint"] == str(checkpoint.resolve()) and data["smolforge_version"]
    assert list(data["tasks"]) == ["bpb", "arc_easy"]
    arc = data["tasks"]["arc_easy"]
    assert arc["n"] == 3 and set(arc["metrics"]) >= {"cloze_acc", "cloze_acc_norm", "mcf_acc"}
    assert arc["examples_per_second"] > 0 and arc["settings"]["options"]["data"] == str(ARC)
    assert arc["settings"]["limit"] == 3 and arc["settings"]["batch_size"] == 4
    assert f"data: {ARC}" in arc["notes"]
    assert data["tasks"]["bpb"]["metrics"]["bpb"] > 0 and not (out_dir / "bpb.samples.jsonl").exists()
    lines = (out_dir / "arc_easy.samples.jsonl").read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[0])["gold"] == 0
    printed = capsys.readouterr().out
    assert "arc_easy" in printed and "cloze_acc_norm" in printed and "eval.json" in printed

    # A later run of another task adds to eval.json; re-running a task replaces only its entry.
    assert main(["eval", str(checkpoint) + "/", "--tasks", "gsm8k,arc_easy", "--data", f"gsm8k={GSM8K}",
                 "--data", f"arc_easy={ARC}", "--limit", "2", "--max-new-tokens", "4"]) == 0
    data = read_eval(out_dir)
    assert list(data["tasks"]) == ["bpb", "arc_easy", "gsm8k"]
    assert data["tasks"]["arc_easy"]["n"] == 2 and data["tasks"]["gsm8k"]["n"] == 2
    assert data["tasks"]["bpb"]["settings"]["limit"] == 3  # untouched


def test_eval_json_of_another_checkpoint_is_not_overwritten(tmp_path):
    merge_eval_file(tmp_path, "/ckpt/a", {"bpb": {"metrics": {"bpb": 1.0}}})
    with pytest.raises(SmolforgeError, match="holds results of another checkpoint"):
        merge_eval_file(tmp_path, "/ckpt/b", {"bpb": {"metrics": {"bpb": 2.0}}})
    assert read_eval(tmp_path)["tasks"]["bpb"]["metrics"]["bpb"] == 1.0


def test_recipe_with_per_task_options_and_flags_over_it(checkpoint, tmp_path):
    recipe = tmp_path / "eval.yaml"
    recipe.write_text(f"batch_size: 2\nlimit: 4\ntasks:\n  - bpb\n"
                      f"  - name: arc_easy\n    data: {ARC}\n    limit: 2\n    options: {{formats: [mcf]}}\n"
                      f"  - name: gsm8k\n    data: {GSM8K}\n    max_new_tokens: 3\n")
    out = tmp_path / "out"
    # --tasks picks from the recipe (keeping its settings); --set adds options; --limit overrides.
    assert main(["eval", str(checkpoint), "--recipe", str(recipe), "--tasks", "arc_easy,gsm8k", "--out", str(out),
                 "--set", "gsm8k.chat=false", "--samples", "2", "--limit", "3"]) == 0
    tasks = read_eval(out)["tasks"]
    assert list(tasks) == ["arc_easy", "gsm8k"]
    assert list(tasks["arc_easy"]["metrics"]) == ["mcf_acc"] and tasks["arc_easy"]["n"] == 2
    gsm = tasks["gsm8k"]
    assert gsm["n"] == 3 and gsm["settings"]["max_new_tokens"] == 3 and gsm["settings"]["batch_size"] == 2
    assert gsm["settings"]["samples"] == 2 and gsm["settings"]["temperature"] == 0.6  # avg@k default
    assert "pass@2" in gsm["metrics"] and "avg@2" in gsm["notes"] and "plain prompt" in gsm["notes"]


@pytest.mark.parametrize("args, message", [
    (["--tasks", "arc_eazy"], r"unknown eval task 'arc_eazy'; known tasks: bpb, arc_easy"),
    (["--tasks", "arc_easy"], r"task arc_easy needs a data file: pass --data arc_easy=PATH"),
    (["--tasks", "arc_easy", "--data", "arc_easy=/no/such.jsonl"], r"task arc_easy: data /no/such.jsonl: no such file"),
    (["--tasks", "bpb", "--data", "gsm8k=x.jsonl"], r"--data/--set for task 'gsm8k', which is not among the tasks"),
    (["--tasks", "bpb", "--data", "bpb"], r"--data 'bpb': expected TASK=PATH"),
    (["--tasks", "bpb", "--set", "bpb=3"], r"--set 'bpb=3': expected TASK.KEY=VALUE"),
    (["--tasks", "gsm8k", "--set", "gsm8k.limit=0", "--data", f"gsm8k={GSM8K}"], r"tasks.0.limit: Input should be greater"),
    ([], r"no tasks to run: pass --tasks"),
    (["--tasks", "bpb", "--batch-size", "0"], r"batch_size: Input should be greater than or equal to 1"),
    (["--tasks", "bpb,bpb"], r"task bpb listed twice"),
])
def test_bad_requests_fail_with_clear_errors(args, message, checkpoint, tmp_path, capsys):
    assert main(["eval", str(checkpoint), "--out", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err


def test_recipe_unknown_key_and_missing_task_data_are_named(checkpoint, tmp_path, capsys):
    recipe = tmp_path / "eval.yaml"
    recipe.write_text("tasks:\n  - name: bpb\n    limt: 3\n")
    assert main(["eval", str(checkpoint), "--recipe", str(recipe)]) == 2
    assert "tasks.0.limt: unknown key (did you mean 'limit'?)" in capsys.readouterr().err
    missing = tmp_path / "m.yaml"
    missing.write_text(f"tasks:\n  - name: gsm8k\n    data: {GSM8K}\n    fewshot_data: nowhere.jsonl\n")
    assert main(["eval", str(checkpoint), "--recipe", str(missing)]) == 2
    assert "task gsm8k: fewshot_data nowhere.jsonl: no such file" in capsys.readouterr().err


def test_evaluate_in_memory_writes_nothing_without_out_dir(model, tokenizer, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    results = evaluate((model, tokenizer), ["arc_easy"], options={"arc_easy": {"data": str(ARC)}}, limit=2)
    assert results["arc_easy"].n == 2 and isinstance(results["arc_easy"], TaskResult)
    assert list(tmp_path.iterdir()) == []
    out = tmp_path / "out"
    evaluate((model, tokenizer), ["bpb"], out_dir=out, limit=1, show=True)
    assert read_eval(out)["checkpoint"] == "<in-memory model>"
    with pytest.raises(SmolforgeError, match="options given for task 'gsm8k'"):
        evaluate((model, tokenizer), ["bpb"], options={"gsm8k": {}})
    with pytest.raises(SmolforgeError, match="bach_size: unknown key"):
        evaluate((model, tokenizer), ["bpb"], bach_size=3)


def test_every_registered_task_resolves_to_a_function():
    for name in ("bpb", "arc_easy", "arc_challenge", "piqa", "openbook_qa", "hellaswag", "mc", "gsm8k"):
        assert callable(get_task(name)) and name in TASKS
    assert EvalRecipe.model_validate({"tasks": ["bpb", {"name": "mc", "data": "x"}]}).tasks[1].data == "x"


# --- bpb ----------------------------------------------------------------------------------------------


def test_text_windows_predict_every_token_once():
    tokens = list(range(10, 31))  # 21 tokens -> 20 predictions
    inputs, labels = bpb.text_windows(tokens, seq_len=8, pad_id=0)
    assert inputs.shape == labels.shape == (3, 8)
    predicted = labels[labels != IGNORE_INDEX].tolist()
    assert predicted == tokens[1:]
    assert inputs[2, :4].tolist() == tokens[16:20] and inputs[2, 4:].tolist() == [0] * 4
    assert (labels[2, 4:] == IGNORE_INDEX).all()


def context(model, tokenizer, tmp_path, **options) -> EvalContext:
    return EvalContext(task="bpb", model=model, tokenizer=tokenizer, engine=Engine(model, tokenizer),
                       checkpoint=tmp_path, out_dir=tmp_path, limit=options.pop("limit", None), options=options)


def test_bpb_equals_a_hand_computation(model, tokenizer, tmp_path):
    text = "the quick brown fox jumps over the lazy dog 0123 ünïcode"
    (tmp_path / "t.txt").write_text(text)
    result = bpb.run(context(model, tokenizer, tmp_path, data=str(tmp_path / "t.txt")))
    ids = tokenizer.encode(text)
    with torch.no_grad():
        logprobs = model(torch.tensor([ids[:-1]])).logits[0].double().log_softmax(-1)
    nll = -logprobs.gather(-1, torch.tensor(ids[1:])[:, None]).sum().item()
    predicted_bytes = len(text.encode("utf-8")) - len(tokenizer.decode(ids[:1]).encode("utf-8"))
    assert result.metrics["bpb"] == pytest.approx(nll / math.log(2) / predicted_bytes, rel=1e-5)
    assert result.metrics["loss"] == pytest.approx(nll / (len(ids) - 1), rel=1e-5)
    assert result.metrics["perplexity"] == pytest.approx(math.exp(result.metrics["loss"]), rel=1e-6)
    assert list(result.metrics)[0] == "bpb" and result.n == 1


def test_bpb_reads_jsonl_documents_and_defaults_to_the_bundled_text(model, tokenizer, tmp_path):
    docs = tmp_path / "d.jsonl"
    docs.write_text(json.dumps({"text": "the lazy dog"}) + "\n" + json.dumps({"text": "the quick fox"}) + "\n")
    result = bpb.run(context(model, tokenizer, tmp_path, data=str(docs), seq_len=4))
    assert result.n == 2 and "tokens in 2 windows of 4" in result.notes[0]
    bundled = bpb.run(context(model, tokenizer, tmp_path, limit=2))
    assert bundled.n == 2 and bundled.notes[-1] == f"data: {bpb.BUNDLED_VALIDATION}"
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(SmolforgeError, match="no text to score"):
        bpb.run(context(model, tokenizer, tmp_path, data=str(tmp_path / "empty.txt")))
    with pytest.raises(SmolforgeError, match=r"seq_len 5000 must be in \[1, 1024\]"):
        bpb.run(context(model, tokenizer, tmp_path, data=str(docs), seq_len=5000))


def test_run_recipe_needs_tasks(model, tokenizer):
    with pytest.raises(SmolforgeError, match="no tasks to run"):
        run_recipe((model, tokenizer), EvalRecipe())
