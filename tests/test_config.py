"""Recipes: typed fields, dotted overrides, and errors that name the key."""

from __future__ import annotations

import argparse

import pytest
import yaml

from smolforge.config import (
    DPORecipe,
    GRPORecipe,
    PretrainRecipe,
    RLHFRecipe,
    SFTRecipe,
    add_recipe_arguments,
    collect_overrides,
    load_recipe,
    save_recipe,
)
from smolforge.errors import SmolforgeError
from smolforge.quickstart import bundled_recipe
from smolforge.train.schedule import lr_multiplier


def write(tmp_path, tree) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tree))
    return str(path)


def test_preset_expansion_and_overrides(tmp_path):
    path = write(tmp_path, {"model": {"preset": "debug", "n_layers": 3}, "train": {"lr": 0.01}})
    recipe = load_recipe(path, {"train.lr": "3e-4", "train.max_steps": "50", "train.warmup_steps": 5,
                                   "data.document_masking": False})
    assert recipe.model.n_layers == 3 and recipe.model.hidden_size == 64
    assert recipe.train.lr == pytest.approx(3e-4) and recipe.train.max_steps == 50
    assert recipe.data.document_masking is False


def test_resolved_recipe_round_trips(tmp_path):
    recipe = load_recipe(bundled_recipe())
    save_recipe(recipe, tmp_path / "resolved.yaml")
    again = load_recipe(tmp_path / "resolved.yaml")
    assert again == recipe and again.fingerprint() == recipe.fingerprint()


@pytest.mark.parametrize("tree, overrides, expected", [
    ({"train": {"lrr": 1e-3}}, {}, r"train\.lrr: unknown key \(did you mean 'lr'\?\)"),
    ({"trian": {}}, {}, r"trian: unknown key"),
    ({}, {"train.max_steps": "many"}, r"train\.max_steps: .*integer"),
    ({}, {"train.schedule": "exponential"}, r"train\.schedule"),
    ({"model": {"preset": "debug", "n_heads": 3}}, {}, r"model.n_heads \(3\) must divide model.hidden_size"),
    ({"model": {"preset": "debug", "n_kv_heads": 3}}, {}, r"n_kv_heads \(3\) must divide model.n_heads"),
    ({"model": {"preset": "nope"}}, {}, r"unknown preset 'nope'"),
    ({"data": {"seq_len": 4096}, "model": {"max_seq_len": 512}}, {}, r"data.seq_len \(4096\) exceeds model.max_seq_len"),
    ({"data": {"train": [{"pth": "x"}]}}, {}, r"data\.train\.0\.pth: unknown key \(did you mean 'path'\?\)"),
    ({"train": {"lr": -1}}, {}, r"train\.lr: .*greater than 0"),
])
def test_bad_recipes_name_the_key(tmp_path, tree, overrides, expected):
    with pytest.raises(SmolforgeError, match=expected):
        load_recipe(write(tmp_path, tree), overrides)


def test_bundled_recipes_load_by_name_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no recipes/ here: the names resolve to the package's copies
    assert load_recipe("quickstart-sft.yaml", schema=SFTRecipe).train.objective == "sft"
    assert load_recipe("recipes/quickstart-sft.yaml", schema=SFTRecipe).train.objective == "sft"
    with pytest.raises(SmolforgeError, match="not found"):  # a path elsewhere is never redirected
        load_recipe(tmp_path / "sub" / "quickstart-sft.yaml")


def test_missing_and_malformed_recipe_files(tmp_path):
    with pytest.raises(SmolforgeError, match="not found"):
        load_recipe(tmp_path / "absent.yaml")
    with pytest.raises(SmolforgeError, match="bundled one .*quickstart-sft.yaml"):
        load_recipe("recipes/absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(SmolforgeError, match="not valid YAML"):
        load_recipe(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(SmolforgeError, match="mapping of sections"):
        load_recipe(scalar)


def test_every_field_becomes_a_documented_flag():
    parser = argparse.ArgumentParser()
    add_recipe_arguments(parser, PretrainRecipe)
    help_text = parser.format_help()
    for section, info in PretrainRecipe.model_fields.items():
        for name, field in info.annotation.model_fields.items():
            assert f"--{section}.{name}" in help_text
            assert field.description, f"{section}.{name} has no description"
    args = parser.parse_args(["--train.lr", "3e-4", "--model.preset", "debug", "--data.train", "[{path: a}]"])
    assert collect_overrides(args) == {"train.lr": "3e-4", "model.preset": "debug", "data.train": [{"path": "a"}]}


def test_schedules():
    total, warmup = 100, 10
    assert lr_multiplier(0, total, warmup, "wsd") == pytest.approx(0.1)
    assert lr_multiplier(9, total, warmup, "wsd") == pytest.approx(1.0)
    assert lr_multiplier(50, total, warmup, "wsd", decay_fraction=0.2) == 1.0
    assert lr_multiplier(79, total, warmup, "wsd", decay_fraction=0.2) == 1.0
    assert lr_multiplier(89, total, warmup, "wsd", decay_fraction=0.2) == pytest.approx(0.5)
    assert lr_multiplier(99, total, warmup, "wsd", decay_fraction=0.2) == pytest.approx(0.0)
    assert lr_multiplier(99, total, warmup, "cosine", min_ratio=0.1) == pytest.approx(0.1)
    mid = warmup + (total - warmup) // 2 - 1
    assert lr_multiplier(mid, total, warmup, "cosine") == pytest.approx(0.5)
    assert lr_multiplier(mid, total, warmup, "linear") == pytest.approx(0.5)
    assert lr_multiplier(70, total, warmup, "constant") == 1.0
    values = [lr_multiplier(s, total, warmup, "cosine") for s in range(warmup, total)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_every_bundled_recipe_is_valid():
    recipes = sorted(bundled_recipe().parent.glob("*.yaml"))
    assert len(recipes) >= 2
    for path in recipes:
        # A recipe's stage is in its name: *-sft.yaml is for `smolforge sft`, *-dpo.yaml for `dpo`.
        schema = {"sft": SFTRecipe, "dpo": DPORecipe, "grpo": GRPORecipe, "rlhf": RLHFRecipe}.get(path.stem.rsplit("-", 1)[-1], PretrainRecipe)
        load_recipe(path, schema=schema)
