"""Preference pairs: formats, errors, response-only labels, reference log-probs cached or online."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from smolforge.chat.render import load_template
from smolforge.config import DPORecipe, PreferenceSourceConfig, load_recipe
from smolforge.data.preference import (
    PreferenceLoader,
    attach_reference,
    build_preference_loaders,
    render_pair,
    render_source,
    to_pair,
)
from smolforge.errors import SmolforgeError
from smolforge.model import ModelConfig, Transformer, debug
from smolforge.tokenizer import Tokenizer, train_tokenizer
from smolforge.train.checkpoint import load_model, save_checkpoint
from smolforge.train.objectives import IGNORE_INDEX
from smolforge.train.preference import reference_logps


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    root = tmp_path_factory.mktemp("tok")
    (root / "c.txt").write_text("what is two plus two? it is four. no, it is five. hello there friend.\n" * 80)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return train_tokenizer([root / "c.txt"], vocab_size=384)


@pytest.fixture(scope="module")
def base(tokenizer, tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**{**debug().model_dump(), "vocab_size": 384, "init_std": 0.1}))
    return save_checkpoint(tmp_path_factory.mktemp("base") / "base", model, tokenizer)


PAIRS = [
    {"prompt": "what is two plus two?", "chosen": "it is four.", "rejected": "it is five."},
    {"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}],
     "chosen": [{"role": "assistant", "content": "hello friend."}],
     "rejected": [{"role": "assistant", "content": "no."}]},
    {"messages": [{"role": "user", "content": "two plus two?"}],
     "chosen": [{"role": "user", "content": "two plus two?"}, {"role": "assistant", "content": "four."}],
     "rejected": "five."},
]


def write(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_every_form_becomes_prompt_and_assistant_responses():
    pairs = [to_pair(r, f"p.jsonl:{i + 1}") for i, r in enumerate(PAIRS)]
    assert pairs[0].prompt == [{"role": "user", "content": "what is two plus two?"}]
    assert pairs[0].chosen == [{"role": "assistant", "content": "it is four."}]
    assert [m["role"] for m in pairs[1].prompt] == ["system", "user"]
    assert pairs[2].chosen == [{"role": "assistant", "content": "four."}]  # repeated prompt stripped
    assert pairs[2].rejected == [{"role": "assistant", "content": "five."}]


@pytest.mark.parametrize("record, message", [
    ({"chosen": "a", "rejected": "b"}, r"p.jsonl:2 field 'prompt': missing"),
    ({"prompt": "hi", "rejected": "b"}, r"p.jsonl:2 field 'chosen': missing"),
    ({"prompt": "  ", "chosen": "a", "rejected": "b"}, r"p.jsonl:2 field 'prompt': is empty"),
    ({"prompt": "hi", "chosen": 3, "rejected": "b"}, r"field 'chosen': must be a non-empty string"),
    ({"prompt": "hi", "chosen": [{"role": "user", "content": "x"}], "rejected": "b"}, "assistant messages only"),
    ('{"prompt": ', r"p.jsonl:2: malformed JSON"),
])
def test_bad_rows_name_file_line_and_field(record, message, tokenizer, tmp_path):
    path = write(tmp_path / "p.jsonl", [PAIRS[0], record])
    with pytest.raises(SmolforgeError, match=message):
        render_source(PreferenceSourceConfig(path=str(path)), tokenizer, load_template("chatml"), 256, "truncate")


def test_only_the_response_is_labelled_and_identical_pairs_warn(tokenizer, tmp_path):
    template = load_template("chatml")
    pair = to_pair(PAIRS[1], "p.jsonl:1")
    rendered = render_pair(pair, tokenizer, template, {}, 256, "truncate", {})
    for (ids, labels), reply in ((rendered.chosen, "hello friend."), (rendered.rejected, "no.")):
        trained = [t for t, y in zip(ids, labels) if y != IGNORE_INDEX]
        assert tokenizer.decode(trained) == reply + "<|im_end|>"
    same = write(tmp_path / "same.jsonl", [{"prompt": "hi", "chosen": "four.", "rejected": "four."}])
    with pytest.warns(UserWarning, match=r"1 pair\(s\): chosen and rejected are identical .*same.jsonl:1"):
        render_source(PreferenceSourceConfig(path=str(same)), tokenizer, template, 256, "truncate")


def test_over_long_pairs_are_cut_or_dropped(tokenizer):
    template = load_template("chatml")
    pair = to_pair({"prompt": "hi", "chosen": "it is four. " * 30, "rejected": "no."}, "p.jsonl:1")
    cut = render_pair(pair, tokenizer, template, {}, 40, "truncate", {})
    assert len(cut.chosen[0]) == 40 and len(cut.rejected[0]) < 40
    assert render_pair(pair, tokenizer, template, {}, 40, "drop", {}) is None
    with pytest.raises(SmolforgeError, match="p.jsonl:1: a response is .* over data.seq_len=40"):
        render_pair(pair, tokenizer, template, {}, 40, "error", {})


def test_reference_logps_are_cached_once_and_equal_online_ones(tokenizer, base, tmp_path):
    data = write(tmp_path / "pairs.jsonl", PAIRS * 4)
    recipe = load_recipe(None, {"run.dir": str(tmp_path), "run.name": "dpo", "run.init_from": str(base),
                                "data.train": [{"path": str(data)}], "data.template": "chatml",
                                "data.seq_len": 128, "train.batch_size": 3}, DPORecipe)
    train, val = build_preference_loaders(recipe, tokenizer, torch.device("cpu"), tmp_path / "dpo")
    assert train.ref_logps is not None and train.ref_logps.shape == (len(train), 2)
    cache = tmp_path / "dpo" / "reference" / "0-reference_logps.pt"
    assert cache.is_file()
    model, _ = load_model(base)
    batch = train.next_batch()
    n = len(batch["ref_logps"]) // 2
    with torch.no_grad():
        assert torch.allclose(batch["ref_logps"], reference_logps(model, batch["input_ids"], batch["labels"]),
                              atol=1e-5)
    assert float(batch["step_weight"]) == n == 3
    # A second build reads the cache instead of recomputing (the file is not rewritten).
    stamp = cache.stat().st_mtime_ns
    again, _ = build_preference_loaders(recipe, tokenizer, torch.device("cpu"), tmp_path / "dpo")
    assert cache.stat().st_mtime_ns == stamp and torch.equal(again.ref_logps, train.ref_logps)
    # Online mode scores each batch with the reference model: the same numbers.
    online = PreferenceLoader(train.pairs, 128, 3, pad_id=3, seed=recipe.run.seed)
    attach_reference([online], str(base), "online", tmp_path / "unused", torch.device("cpu"), 6)
    assert online.ref_model is not None and not (tmp_path / "unused").exists()
    assert torch.allclose(online.next_batch()["ref_logps"], batch["ref_logps"], atol=1e-5)
