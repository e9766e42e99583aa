"""SFT data pipeline (formats, errors, truncation, token mixing, loader) and a tiny SFT run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from smolforge.config import SFTRecipe, SFTSourceConfig, load_recipe
from smolforge.data.sft import (
    SFTExample,
    SFTLoader,
    SourceData,
    fit_length,
    mix_sources,
    read_conversations,
    render_source,
    resolve_template,
    to_conversation,
)
from smolforge.data.synth import generate, write_jsonl
from smolforge.errors import SmolforgeError
from smolforge.model import ModelConfig, Transformer, debug
from smolforge.tokenizer import Tokenizer
from smolforge.train.checkpoint import load_model, save_checkpoint
from smolforge.train.loop import step_weights, train
from smolforge.train.objectives import IGNORE_INDEX

# A copy of ../shared/data/sharegpt-dummy (Apache-2.0, see its SOURCE.txt), so CI needs no ../shared.
SHAREGPT = Path(__file__).parent / "data" / "sharegpt-dummy" / "dummy_conversation.json"


@pytest.fixture(scope="module")
def tokenizer(synth_tokenizer) -> Tokenizer:
    return synth_tokenizer


def write_lines(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_every_format_converts_to_messages(tmp_path):
    cases = {
        "messages": {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
                     "chat_template_kwargs": {"enable_thinking": False}},
        "alpaca": {"instruction": "Add", "input": "2 and 3", "output": "5", "system": "Be brief."},
        "sharegpt": {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
        "prompt_completion": {"prompt": "hi", "completion": "yo"},
        "prompt_completion_lists": {"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}],
                                    "completion": [{"role": "assistant", "content": "yo"}]},
    }
    got = {name: to_conversation(record, f"f.jsonl:{i}") for i, (name, record) in enumerate(cases.items())}
    assert got["messages"].chat_template_kwargs == {"enable_thinking": False}
    assert got["alpaca"].messages == [{"role": "system", "content": "Be brief."},
                                      {"role": "user", "content": "Add\n\n2 and 3"},
                                      {"role": "assistant", "content": "5"}]
    for name in ("sharegpt", "prompt_completion"):
        assert got[name].messages == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert [m["role"] for m in got["prompt_completion_lists"].messages] == ["system", "user", "assistant"]
    assert got["alpaca"].location == "f.jsonl:1"


def test_sharegpt_file_from_the_shared_data_reads_whole(tmp_path):
    conversations = list(read_conversations([SHAREGPT]))
    assert len(conversations) == 500
    first = conversations[0]
    assert first.location == f"{SHAREGPT} item 0"
    assert [m["role"] for m in first.messages] == ["user", "assistant", "user", "assistant"]
    assert first.messages[1]["content"].startswith("I am Vicuna")


@pytest.mark.parametrize("line, message", [
    ('{"messages": [{"role": "user", "content": "hi"}', r"bad.jsonl:2: malformed JSON"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, r"bad.jsonl:2 .*messages\[0\]\.role"),
    ({"messages": []}, r"bad.jsonl:2 .*messages"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}, r"bad.jsonl:2 .*messages\[0\]\.content"),
    ({"messages": "hello"}, r"bad.jsonl:2 field 'messages': must be a list"),
    ({"instruction": "hi", "output": 5}, r"bad.jsonl:2 field 'output': must be a string"),
    ({"conversations": [{"from": "bot", "value": "x"}]}, r"bad.jsonl:2 field 'conversations\[0\]\.from'"),
    ({"text": "plain text"}, r"bad.jsonl:2: cannot tell the format from the keys \(text\)"),
    ({"prompt": "hi", "completion": "yo", "chat_template_kwargs": [1]}, r"field 'chat_template_kwargs'"),
])
def test_bad_records_name_file_line_and_field(line, message, tokenizer, tmp_path):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    path = write_lines(tmp_path / "bad.jsonl", [good, line])
    source = SFTSourceConfig(path=str(path))
    with pytest.raises(SmolforgeError, match=message):
        render_source(source, tokenizer, resolve_template("chatml", tokenizer), 256, "truncate")


def test_skip_invalid_counts_what_it_skips(tokenizer, tmp_path):
    good = {"prompt": "2+2?", "completion": "4"}
    path = write_lines(tmp_path / "mixed.jsonl", [good, "{not json", {"messages": 3}, good])
    data = render_source(SFTSourceConfig(path=str(path)), tokenizer, resolve_template("chatml", tokenizer),
                         256, "truncate", skip_invalid=True)
    assert len(data.examples) == 2 and data.read.skipped == 2


def test_over_long_conversations_are_cut_dropped_or_refused():
    example = SFTExample(list(range(10)), [-100] * 4 + list(range(4, 10)), "f.jsonl:3")
    cut = fit_length(example, 6, "truncate")
    assert cut.input_ids == list(range(6)) and cut.labels == [-100] * 4 + [4, 5] and cut.cut_tokens == 4
    assert fit_length(example, 6, "drop") is None
    assert fit_length(example, 4, "truncate") is None  # no trained token left: dropped
    assert fit_length(example, 10, "error") is example
    with pytest.raises(SmolforgeError, match="f.jsonl:3: the conversation is 10 tokens, over data.seq_len=6"):
        fit_length(example, 6, "error")


def _source(name: str, lengths: list[int], weight: float | None) -> SourceData:
    return SourceData(name=name, weight=weight, examples=[SFTExample([1] * n, [1] * n, f"{name}:{i}")
                                                          for i, n in enumerate(lengths)])


def test_sources_are_mixed_by_tokens_not_examples():
    short = _source("short", [10] * 100, 1.0)  # 1,000 tokens in 100 examples
    long = _source("long", [250] * 4, 1.0)  # 1,000 tokens in 4 examples
    mixture, epochs = mix_sources([short, long], seed=0)
    tokens = {"short": 0, "long": 0}
    for e in mixture:
        tokens[e.location.split(":")[0]] += len(e.input_ids)
    assert tokens == {"short": 1000, "long": 1000}  # equal token shares, 25x more short examples
    weighted, epochs = mix_sources([_source("short", [10] * 100, 3.0), _source("long", [250] * 4, 1.0)], seed=0)
    share = sum(len(e.input_ids) for e in weighted if e.location.startswith("short")) / 2000
    assert share == pytest.approx(0.75, abs=0.01) and epochs["short"] == pytest.approx(1.5, abs=0.01)
    unweighted, epochs = mix_sources([_source("a", [5] * 3, None), _source("b", [7], None)], seed=0)
    assert len(unweighted) == 4 and epochs == {"a": 1.0, "b": 1.0}
    with pytest.raises(SmolforgeError, match="set weight on every source or on none"):
        mix_sources([_source("a", [5], 1.0), _source("b", [5], None)], seed=0)


def test_loader_is_deterministic_resumable_and_trims_padding():
    examples = [SFTExample(list(range(1, n + 1)), list(range(1, n + 1)), f"x:{n}") for n in range(3, 23)]
    loader = SFTLoader(examples, 32, 4, "none", pad_id=0, seed=3)
    first = [loader.next_batch() for _ in range(7)]  # crosses an epoch boundary (20 rows / 4)
    state = SFTLoader(examples, 32, 4, "none", pad_id=0, seed=3)
    for _ in range(3):
        state.next_batch()
    resumed = SFTLoader(examples, 32, 4, "none", pad_id=0, seed=3)
    resumed.load_state_dict(state.state_dict())
    for expected in first[3:]:
        got = resumed.next_batch()
        assert all(torch.equal(got[k], expected[k]) for k in expected)
    for batch in first:
        assert batch["input_ids"].shape[1] == int(batch["real_tokens"].max())  # no all-padding columns
    assert loader.epoch == 1 and loader.epochs_seen() == {}


def test_step_weights_make_the_step_loss_a_mean_over_all_trained_tokens():
    torch.manual_seed(0)
    labels = [torch.full((2, 8), IGNORE_INDEX) for _ in range(2)]
    labels[0][0, :2] = 1  # 2 trained tokens in the first micro-batch
    labels[1][:, :] = 1  # 16 in the second
    per_token = [torch.rand(2, 8) for _ in range(2)]
    means = [(t * (lab != IGNORE_INDEX)).sum() / (lab != IGNORE_INDEX).sum() for t, lab in zip(per_token, labels)]
    weights = step_weights([{"labels": lab} for lab in labels])
    combined = sum(w * m for w, m in zip(weights, means))
    everything = sum((t * (lab != IGNORE_INDEX)).sum() for t, lab in zip(per_token, labels)) / 18
    assert combined == pytest.approx(float(everything), rel=1e-6)
    assert combined != pytest.approx(float(sum(means) / 2), rel=1e-3)  # the naive mean differs


def test_sft_defaults_follow_the_playbook():
    recipe = load_recipe(None, {"run.init_from": "x"}, SFTRecipe)
    t = recipe.train
    assert (t.objective, t.lr, t.batch_size * t.grad_accum, t.epochs, t.schedule) == ("sft", 1e-5, 128, 1.0, "linear")
    assert recipe.data.packing == "none"
    assert load_recipe(None, {"run.init_from": "x", "train.lr": 3e-4}, SFTRecipe).train.objective == "sft"


def test_tiny_sft_run_learns_and_keeps_the_template(tokenizer, tmp_path):
    write_jsonl(generate("reverse", 120, seed=0), tmp_path / "train.jsonl")
    torch.manual_seed(0)
    base = Transformer(ModelConfig(**{**debug().model_dump(), "vocab_size": 512}))
    save_checkpoint(tmp_path / "base", base, tokenizer, meta={"stage": "pretrain"})
    recipe = load_recipe(None, {
        "run.dir": str(tmp_path), "run.name": "sft", "run.init_from": str(tmp_path / "base"),
        "data.train": [{"path": str(tmp_path / "train.jsonl")}], "data.seq_len": 256,
        "data.packing": "bfd", "data.val_fraction": 0.1, "data.template": "smollm3",
        "train.batch_size": 4, "train.grad_accum": 2, "train.lr": 3e-3, "train.epochs": 2,
        "train.warmup_steps": 2, "train.log_every": 1, "train.eval_every": 0, "train.save_every": 0,
        "train.threads": 1}, SFTRecipe)
    result = train(recipe, stage="sft")
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == result.steps > 4
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3
    assert "val_loss" in result.metrics
    model, tok = load_model(result.final_checkpoint)
    assert tok.chat_template == resolve_template("smollm3", tokenizer)
    meta = json.loads((result.final_checkpoint / "smolforge.json").read_text())
    assert meta["stage"] == "sft" and meta["parent"] == str(tmp_path / "base")


def test_lora_sft_trains_adapters_only_and_resumes_exactly(tokenizer, tmp_path, monkeypatch, crash_on_call):
    """LoRA on a stage: checkpoints hold the merged model, the adapter loads with peft on the base,
    and a resume from a mid-run checkpoint gives the uninterrupted run's losses."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    write_jsonl(generate("count", 80, seed=0), tmp_path / "train.jsonl")
    torch.manual_seed(0)
    base = Transformer(ModelConfig(**{**debug().model_dump(), "vocab_size": 512}))
    save_checkpoint(tmp_path / "base", base, tokenizer, meta={"stage": "pretrain"})

    def run(name: str, steps: int, resume: bool = False, objective: str = "sft"):
        recipe = load_recipe(None, {"train.objective": objective,
            "run.dir": str(tmp_path), "run.name": name, "run.init_from": str(tmp_path / "base"),
            "data.train": [{"path": str(tmp_path / "train.jsonl")}], "data.seq_len": 256,
            "data.template": "chatml", "data.val_fraction": 0.0, "lora.r": 4, "lora.alpha": 8,
            "train.epochs": 0, "train.max_steps": steps, "train.batch_size": 4, "train.grad_accum": 1,
            "train.lr": 1e-2, "train.warmup_steps": 0, "train.log_every": 1, "train.save_every": 4,
            "train.threads": 1}, SFTRecipe)
        return train(recipe, resume=resume, stage="sft")

    full = run("full", 8)
    losses = [json.loads(x)["loss"] for x in (full.run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    merged, _ = load_model(full.final_checkpoint)
    base_again, _ = load_model(tmp_path / "base")
    assert not torch.equal(merged.model.layers[0].self_attn.q_proj.weight, base_again.model.layers[0].self_attn.q_proj.weight)
    assert torch.equal(merged.model.embed_tokens.weight, base_again.model.embed_tokens.weight)  # not a target
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    with_adapter = peft.PeftModel.from_pretrained(hf, full.run_dir / "adapter").eval()
    x = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(with_adapter(x).logits, merged(x).logits, atol=1e-5, rtol=1e-4)
    # crash in step 5 (after the step-4 checkpoint), then resume to 8: the same losses
    from smolforge.train import objectives

    monkeypatch.setitem(objectives.OBJECTIVES, "crashy", crash_on_call(objectives.lm, 5))
    with pytest.raises(RuntimeError, match="injected crash"):
        run("split", 8, objective="crashy")
    resumed = run("split", 8, resume=True)
    again = [json.loads(x)["loss"] for x in (resumed.run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert again == losses
