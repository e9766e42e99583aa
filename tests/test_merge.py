"""Model merging: each method against values worked out by hand, then end to end through the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open

from smolforge.cli import main
from smolforge.errors import SmolforgeError
from smolforge.lab.merge import merge_linear, merge_slerp, merge_ties
from smolforge.model import ModelConfig, Transformer, debug
from smolforge.train.checkpoint import load_model, read_meta, save_checkpoint

VOCAB = 384


def vec(*values: float) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor(values, dtype=torch.float32)}


# --- pure functions: hand-computed values -----------------------------------------------------------


def test_linear_weights_are_normalised():
    a, b = vec(1, 2, 3), vec(3, 2, 1)
    torch.testing.assert_close(merge_linear([a, b], [0.9, 0.1])["w"], torch.tensor([1.2, 2.0, 2.8]))
    torch.testing.assert_close(merge_linear([a, b], [9, 1])["w"], torch.tensor([1.2, 2.0, 2.8]))
    torch.testing.assert_close(merge_linear([a, b])["w"], torch.tensor([2.0, 2.0, 2.0]))
    torch.testing.assert_close(merge_linear([a, b], [1, 1], normalize=False)["w"], torch.tensor([4.0, 4.0, 4.0]))


def test_linear_of_identical_states_is_identity_and_keeps_dtype():
    torch.manual_seed(0)
    state = {"x": torch.randn(4, 8).to(torch.bfloat16), "y": torch.randn(3)}
    merged = merge_linear([state, state, state], [0.2, 0.3, 0.5])
    assert merged["x"].dtype == torch.bfloat16 and merged["y"].dtype == torch.float32
    assert torch.equal(merged["x"], state["x"])  # fp32 sum of bf16 values rounds back exactly
    torch.testing.assert_close(merged["y"], state["y"])


def test_slerp_of_orthogonal_vectors():
    a, b = vec(1, 0), vec(0, 1)
    torch.testing.assert_close(merge_slerp(a, b, 0.5)["w"], torch.tensor([1.0, 1.0]) / math.sqrt(2))
    torch.testing.assert_close(merge_slerp(a, b, 0.0)["w"], a["w"])
    torch.testing.assert_close(merge_slerp(a, b, 1.0)["w"], b["w"])
    # Norm 2, angle pi/2, t = 1/3: coefficients sin(pi/3) and sin(pi/6) -> [2*sqrt(3)/2, 2*1/2].
    torch.testing.assert_close(merge_slerp(vec(2, 0), vec(0, 2), 1 / 3)["w"], torch.tensor([math.sqrt(3), 1.0]))


def test_slerp_falls_back_to_lerp_when_colinear():
    torch.testing.assert_close(merge_slerp(vec(1, 2), vec(2, 4), 0.5)["w"], torch.tensor([1.5, 3.0]))
    torch.testing.assert_close(merge_slerp(vec(0, 0), vec(2, 4), 0.25)["w"], torch.tensor([0.5, 1.0]))


# Task vectors (state - base) for the TIES example; density 0.6 of 5 values keeps 3 per vector:
#   tau1 = [ 3, -1,  0.5, -2,  0.1 ] -> trimmed [ 3, -1, 0, -2, 0]
#   tau2 = [-1,  2, -0.2, -4,  0.3 ] -> trimmed [-1,  2, 0, -4, 0]
#   tau3 = [ 2, -3,  0.4,  1, -0.05] -> trimmed [ 2, -3, 0,  1, 0]
TIES_BASE = [0.5, 0.0, 0.0, 0.0, 1.0]
TAUS = [[3, -1, 0.5, -2, 0.1], [-1, 2, -0.2, -4, 0.3], [2, -3, 0.4, 1, -0.05]]


def ties_inputs():
    base = vec(*TIES_BASE)
    return base, [{"w": base["w"] + torch.tensor(tau)} for tau in TAUS]


def test_ties_by_hand_equal_weights():
    # Summed trimmed = [4, -2, 0, -5, 0] -> signs [+, -, 0, -, 0]; agreeing means:
    # [(3+2)/2, (-1-3)/2, 0, (-2-4)/2, 0] = [2.5, -2, 0, -3, 0]; plus the base.
    base, states = ties_inputs()
    merged = merge_ties(base, states, density=0.6)["w"]
    torch.testing.assert_close(merged, torch.tensor([3.0, -2.0, 0.0, -3.0, 1.0]))


def test_ties_by_hand_weighted():
    # Weights [1, 3, 1]: weighted sum = [2, 2, 0, -13, 0] -> signs [+, +, 0, -, 0] (index 1 flips);
    # weighted means: [(3+2)/2, 3*2/3, 0, (-2 - 3*4)/4, 0] = [2.5, 2, 0, -3.5, 0]; plus the base.
    base, states = ties_inputs()
    merged = merge_ties(base, states, [1, 3, 1], density=0.6)["w"]
    torch.testing.assert_close(merged, torch.tensor([3.0, 2.0, 0.0, -3.5, 1.0]))


def test_ties_without_trimming_averages_agreeing_values():
    # density 1 keeps all: sums [4, -2, 0.7, -5, 0.35] -> index 2 mean of 0.5 and 0.4, index 4 of 0.1 and 0.3.
    base, states = ties_inputs()
    merged = merge_ties(base, states, density=1.0)["w"]
    torch.testing.assert_close(merged, torch.tensor([3.0, -2.0, 0.45, -3.0, 1.2]))


def test_mismatched_states_name_the_tensor_and_the_inputs():
    a = {"w": torch.zeros(2), "v": torch.zeros(3)}
    with pytest.raises(SmolforgeError, match=r"tensor v has shape \[3\] in A but \[4\] in B"):
        merge_linear([a, {"w": torch.zeros(2), "v": torch.zeros(4)}], names=["A", "B"])
    with pytest.raises(SmolforgeError, match="v is only in A"):
        merge_slerp(a, {"w": torch.zeros(2)}, 0.5, names=["A", "B"])
    with pytest.raises(SmolforgeError, match="got 3 weights for 2 checkpoints"):
        merge_linear([a, a], [1, 2, 3])
    with pytest.raises(SmolforgeError, match="density"):
        merge_ties(a, [a], density=0.0)
    with pytest.raises(SmolforgeError, match=r"must lie in \[0, 1\]"):
        merge_slerp(a, a, 1.5)


# --- checkpoints through the CLI -----------------------------------------------------------------------


def tiny(**changes) -> ModelConfig:
    return ModelConfig(**{**debug().model_dump(), "n_layers": 1, "vocab_size": VOCAB, **changes})


@pytest.fixture(scope="module")
def ckpts(tokenizer, tmp_path_factory):
    """base, a, b (tied) and c (untied, another width), each with its own random weights."""
    root = tmp_path_factory.mktemp("ckpts")
    paths = {}
    for seed, name in enumerate(["base", "a", "b"]):
        torch.manual_seed(seed)
        paths[name] = save_checkpoint(root / name, Transformer(tiny()), tokenizer, meta={"stage": "sft"})
    paths["wide"] = save_checkpoint(root / "wide", Transformer(tiny(intermediate_size=96)), tokenizer)
    return paths


def weights_of(path):
    model, _ = load_model(path)
    return model, {k: v.clone() for k, v in model.state_dict().items()}


def test_linear_merge_through_cli(ckpts, tmp_path, capsys):
    out = tmp_path / "soup"
    assert main(["merge", "--method", "linear", str(ckpts["a"]), str(ckpts["b"]),
                 "--weights", "0.9", "0.1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "merged 2 checkpoints (linear)" in printed and str(ckpts["a"]) in printed
    (_, a), (_, b) = weights_of(ckpts["a"]), weights_of(ckpts["b"])
    model, merged = weights_of(out)
    assert merged.keys() == a.keys()
    for key in a:
        torch.testing.assert_close(merged[key], 0.9 * a[key] + 0.1 * b[key])
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied after loading
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    with safe_open(out / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys()  # one stored matrix serves both ends
    meta = read_meta(out)
    assert meta["stage"] == "merge" and meta["parent"] == str(ckpts["a"])
    assert meta["merge"]["method"] == "linear"
    assert meta["merge"]["inputs"] == [str(ckpts["a"]), str(ckpts["b"])]
    assert meta["merge"]["weights"] == pytest.approx([0.9, 0.1])


def test_slerp_merge_through_cli(ckpts, tmp_path):
    out = tmp_path / "slerp"
    assert main(["merge", "--method", "slerp", str(ckpts["a"]), str(ckpts["b"]), "--t", "0.3",
                 "--out", str(out)]) == 0
    (_, a), (_, b), (_, merged) = weights_of(ckpts["a"]), weights_of(ckpts["b"]), weights_of(out)
    for key in a:
        x, y = a[key].double(), b[key].double()
        cos = float((x.flatten() @ y.flatten()) / (x.norm() * y.norm()))
        if abs(cos) > 0.9995:  # norms are ones at init: colinear, so a lerp
            expected = 0.7 * x + 0.3 * y
        else:
            omega = math.acos(cos)
            expected = (math.sin(0.7 * omega) * x + math.sin(0.3 * omega) * y) / math.sin(omega)
        torch.testing.assert_close(merged[key].double(), expected, rtol=1e-5, atol=1e-6)
    assert read_meta(out)["merge"]["t"] == 0.3


def test_ties_merge_through_cli(ckpts, tmp_path):
    out = tmp_path / "ties"
    assert main(["merge", "--method", "ties", str(ckpts["a"]), str(ckpts["b"]), "--base", str(ckpts["base"]),
                 "--density", "1", "--out", str(out)]) == 0
    (_, base), (_, a), (_, b) = (weights_of(ckpts[n]) for n in ("base", "a", "b"))
    model, merged = weights_of(out)
    for key in base:
        # density 1 and two inputs: where the deltas agree in sign their mean, else the larger one.
        da, db = a[key] - base[key], b[key] - base[key]
        expected = base[key] + torch.where(torch.sign(da) == torch.sign(db), (da + db) / 2,
                                           torch.where(da.abs() > db.abs(), da, db))
        torch.testing.assert_close(merged[key], expected)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    record = read_meta(out)["merge"]
    assert record["base"] == str(ckpts["base"]) and record["density"] == 1.0


def test_untied_lm_head_is_merged_separately(tokenizer, tmp_path):
    paths = []
    for seed in range(2):
        torch.manual_seed(seed)
        paths.append(save_checkpoint(tmp_path / f"u{seed}", Transformer(tiny(tie_embeddings=False)), tokenizer))
    out = tmp_path / "u-soup"
    assert main(["merge", "--method", "linear", *map(str, paths), "--out", str(out)]) == 0
    (_, a), (_, b) = weights_of(paths[0]), weights_of(paths[1])
    model, merged = weights_of(out)
    torch.testing.assert_close(merged["lm_head.weight"], (a["lm_head.weight"] + b["lm_head.weight"]) / 2)
    assert model.lm_head.weight is not model.model.embed_tokens.weight


@pytest.mark.parametrize(("extra", "message"), [
    (["--method", "slerp", "{a}", "{b}", "{base}"], "exactly 2 checkpoints"),
    (["--method", "slerp", "{a}", "{b}", "--weights", "1", "2"], "not --weights"),
    (["--method", "ties", "{a}", "{b}"], "ties needs --base"),
    (["--method", "linear", "{a}", "{b}", "--weights", "1", "2", "3"], "got 3 weights for 2 checkpoints"),
    (["--method", "linear", "{a}", "{b}", "--t", "0.2"], "--t is used by slerp only"),
    (["--method", "linear", "{a}", "{b}", "--base", "{base}"], "--base is used by ties only"),
    (["--method", "linear", "{a}", "{b}", "--density", "0.2"], "--density is used by ties only"),
    (["--method", "linear", "{a}"], "at least two checkpoints"),
    (["--method", "linear", "{a}", "{wide}"], "model.intermediate_size=96"),
    (["--method", "slerp", "{a}", "{b}", "--t", "1.5"], "--t 1.5: must lie in [0, 1]"),
    (["--method", "ties", "{a}", "{b}", "--base", "{base}", "--density", "0"], "--density 0.0: must lie in (0, 1]"),
])
def test_bad_merges_exit_2_with_a_clear_error(ckpts, tmp_path, capsys, extra, message):
    argv = ["merge", *(arg.format(**ckpts) for arg in extra), "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert not (tmp_path / "out").exists()


def test_out_must_not_overwrite_an_input(ckpts, capsys):
    assert main(["merge", "--method", "linear", str(ckpts["a"]), str(ckpts["b"]), "--out", str(ckpts["b"])]) == 2
    assert "is one of the inputs" in capsys.readouterr().err


def test_unknown_method_is_an_argparse_error(ckpts, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["merge", "--method", "dare", str(ckpts["a"]), str(ckpts["b"]), "--out", str(tmp_path / "o")])
    assert exit_info.value.code == 2
