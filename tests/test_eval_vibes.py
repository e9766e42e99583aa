"""Vibe test: transcripts next to the checkpoint, the before/after diff against the nearest
vibe-tested ancestor, and clear errors for bad prompt files."""

from __future__ import annotations

import json

import pytest
import torch

from smolforge.chat.render import load_template
from smolforge.engine import Engine
from smolforge.errors import SmolforgeError
from smolforge.eval import vibes
from smolforge.eval.core import EvalContext
from smolforge.model import Transformer, debug
from smolforge.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def chat_tokenizer(synth_tokenizer) -> Tokenizer:
    return Tokenizer(synth_tokenizer.backend, chat_template=load_template("smollm3"))


@pytest.fixture(scope="module")
def engine(chat_tokenizer) -> Engine:
    torch.manual_seed(0)
    model = Transformer(debug().model_copy(update={"vocab_size": chat_tokenizer.vocab_size})).eval()
    return Engine(model, chat_tokenizer)


def checkpoint_dir(path, stage, parent=None):
    """A directory with just the smolforge.json that lineage is read from."""
    path.mkdir(parents=True)
    (path / "smolforge.json").write_text(json.dumps({"stage": stage, "parent": str(parent) if parent else None}))
    return path


def context(engine, checkpoint, out_dir, **kwargs) -> EvalContext:
    return EvalContext(task="vibes", model=engine.model, tokenizer=engine.tokenizer, engine=engine,
                       checkpoint=checkpoint, out_dir=out_dir, max_new_tokens=8, **kwargs)


def test_prompt_set_covers_personas_modes_and_multi_turn():
    ids = [p["id"] for p in vibes.PROMPTS]
    assert len(ids) == len(set(ids)) >= 12
    assert sum(p["messages"][0]["role"] == "system" for p in vibes.PROMPTS) >= 3
    assert any(p["messages"][-1]["content"].endswith("/think") for p in vibes.PROMPTS)
    assert any(p["messages"][-1]["content"].endswith("/no_think") for p in vibes.PROMPTS)
    assert any(sum(m["role"] == "user" for m in p["messages"]) > 1 for p in vibes.PROMPTS)
    assert all(p["messages"][-1]["role"] == "user" for p in vibes.PROMPTS)


def test_transcripts_and_diff_against_the_parent(engine, tmp_path):
    sft = checkpoint_dir(tmp_path / "sft", "sft")
    dpo = checkpoint_dir(tmp_path / "dpo", "dpo", parent=sft)
    first = vibes.run(context(engine, sft, sft / "eval"))
    assert first.n == len(vibes.PROMPTS) and "changed_vs_parent" not in first.metrics
    assert list(first.metrics)[0] == "mean_reply_tokens" and 0 < first.metrics["mean_reply_tokens"] <= 8
    records = [json.loads(line) for line in (sft / "eval" / "vibes.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == [p["id"] for p in vibes.PROMPTS]
    readable = (sft / "eval" / "vibes.md").read_text()
    assert "## 7. persona-pirate" in readable and "You are a pirate" in readable and "Compared" not in readable

    # Known answer: the same weights reply the same, so only the 3 replies edited here differ.
    for record in records[:3]:
        record["greedy"] = "an older reply"
    (sft / "eval" / "vibes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    second = vibes.run(context(engine, dpo, dpo / "eval"))
    assert second.metrics["changed_vs_parent"] == pytest.approx(3 / len(records))
    assert second.metrics["similarity_to_parent"] < 1.0
    readable = (dpo / "eval" / "vibes.md").read_text()
    assert f"# Compared with sft ({sft / 'eval'})" in readable
    assert readable.count("an older reply") == 3 and "3 of 13 greedy replies changed" in readable
    assert "(unchanged)" in readable


def test_nearest_vibe_tested_ancestor_is_used(engine, tmp_path):
    base = checkpoint_dir(tmp_path / "base", "pretrain")
    sft = checkpoint_dir(tmp_path / "sft", "sft", parent=base)  # never vibe-tested
    dpo = checkpoint_dir(tmp_path / "dpo", "dpo", parent=sft)
    assert vibes.ancestor_transcripts(dpo, dpo / "eval") is None
    (base / "vibes.jsonl").write_text("")  # beside the checkpoint also counts
    path, meta = vibes.ancestor_transcripts(dpo, dpo / "eval")
    assert path == base / "vibes.jsonl" and meta["stage"] == "pretrain"
    # A parent cycle ends the search instead of looping.
    (base / "vibes.jsonl").unlink()
    (base / "smolforge.json").write_text(json.dumps({"stage": "x", "parent": str(dpo)}))
    assert vibes.ancestor_transcripts(dpo, None) is None


def test_own_prompts_limit_and_in_memory_run(engine, tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"id": "hi", "messages": [{"role": "user", "content": "hello"}]}) + "\n"
                    + json.dumps({"messages": [{"role": "user", "content": "bye"}]}) + "\n")
    result = vibes.run(context(engine, None, None, options={"data": str(path)}))
    assert [s["id"] for s in result.samples] == ["hi", "prompt-2"]
    assert not list(tmp_path.glob("**/vibes.md"))  # no out_dir: nothing written
    again = vibes.run(context(engine, None, None, options={"data": str(path)}))
    assert [s["sampled"] for s in again.samples] == [s["sampled"] for s in result.samples]  # seeded
    assert vibes.run(context(engine, None, None, limit=2)).n == 2


@pytest.mark.parametrize("content, message", [
    ("", "holds no vibe prompts"),
    ('{"prompt": "hi"}\n', "p.jsonl:1 field 'messages' is missing"),
    ('{"messages": []}\n', "must be a non-empty list"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n',
     "must end with a user turn"),
    ('{"id": "a", "messages": [{"role": "user", "content": "a"}]}\n' * 2, "p.jsonl:2 field 'id': 'a' is used twice"),
])
def test_bad_prompt_files(tmp_path, content, message):
    path = tmp_path / "p.jsonl"
    path.write_text(content)
    with pytest.raises(SmolforgeError, match=message):
        vibes.load_prompts(path)
