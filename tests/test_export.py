"""Tier 2/3: fine-tune imported models, `smolforge export` (hf, gguf) and `smolforge inspect`."""

from __future__ import annotations

import json

import pytest
import torch
from test_hf_compat import HF_CASES, VOCAB, _save_hf, hf_model_from, padded_batch

from smolforge.cli import main
from smolforge.config import load_recipe
from smolforge.data.shards import tokenize_corpus
from smolforge.errors import SmolforgeError
from smolforge.interop.export import export_model, parse_size
from smolforge.interop.gguf import gguf_tensors, interleave_rope_rows, write_gguf
from smolforge.interop.inspect import describe
from smolforge.model import ModelConfig, Transformer, debug
from smolforge.train.checkpoint import load_model, save_checkpoint
from smolforge.train.loop import train

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def shards(tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    tokenizer.save(root / "tok")
    (root / "text.txt").write_text("the lazy dog 12 jumps over the quick brown fox 345\n" * 300)
    tokenize_corpus([root / "text.txt"], root / "tok", root / "train", workers=1, progress=False)
    return root / "train"


@pytest.mark.parametrize("case", list(HF_CASES))
def test_fine_tuned_import_exports_to_transformers_with_equal_logits(case, tokenizer, shards, tmp_path):
    """save_pretrained -> 3 training steps in smolforge -> export -> transformers: same logits."""
    arch, extra = HF_CASES[case]
    _save_hf(tmp_path, tokenizer, arch, **extra)
    before, _ = load_model(tmp_path / "hf")
    recipe = load_recipe(None, {
        "run.dir": str(tmp_path), "run.name": "ft", "run.init_from": str(tmp_path / "hf"),
        "data.train": [{"path": str(shards)}], "data.seq_len": 32,
        "train.batch_size": 2, "train.max_steps": 3, "train.lr": 1e-2, "train.warmup_steps": 0,
        "train.eval_every": 0, "train.save_every": 0, "train.threads": 1, "train.log_every": 1})
    result = train(recipe, stage="sft-test")
    out = export_model(result.final_checkpoint, tmp_path / "export")
    ours, _ = load_model(out)
    assert not torch.equal(ours.model.layers[0].self_attn.q_proj.weight,
                           before.model.layers[0].self_attn.q_proj.weight), "training changed nothing"
    ids, mask, positions = padded_batch([14, 9])
    with torch.no_grad():
        theirs = hf_model_from(out)(ids, attention_mask=mask, position_ids=positions).logits
        mine = ours(ids, position_ids=positions, key_mask=mask.bool()).logits
    assert (theirs - mine).abs()[mask.bool()].max() <= 1e-4
    text = "the lazy dog 12 <|im_end|>"
    assert transformers.AutoTokenizer.from_pretrained(out)(text)["input_ids"] == tokenizer.encode(text)


def test_export_hf_in_bf16_keeps_lineage_and_loads_everywhere(tokenizer, tmp_path):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**{**debug().model_dump(), "vocab_size": VOCAB, "qk_norm": True}))
    src = save_checkpoint(tmp_path / "sft", model, tokenizer,
                          meta={"stage": "sft", "step": 7, "metrics": {"val_loss": 1.5}})
    assert main(["export", str(src), "--out", str(tmp_path / "rel"), "--dtype", "bf16",
                 "--max-shard-size", "50KB"]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "rel")
    assert hf.dtype == torch.bfloat16 and type(hf).__name__ == "Qwen3ForCausalLM"
    assert not (tmp_path / "rel" / "trainer_state.pt").exists()
    x = torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(hf.float()(x).logits, model(x).logits, atol=0.05, rtol=0.05)
    info = describe(tmp_path / "rel")
    assert info["architecture"] == "Qwen3ForCausalLM" and list(info["dtype"]) == ["bf16"]
    assert len(list((tmp_path / "rel").glob("model-0000*-of-*.safetensors"))) > 1
    assert [(s["stage"], s["step"]) for s in info["lineage"]] == [("export", 7), ("sft", 7)]
    assert info["parameters"]["total"] == sum(p.numel() for p in model.parameters())


def test_inspect_prints_what_the_issue_lists(tokenizer, tmp_path, capsys):
    from smolforge.chat.render import load_template

    tokenizer.chat_template = load_template("chatml")
    try:
        model = Transformer(ModelConfig(**{**debug().model_dump(), "vocab_size": VOCAB, "nope_interval": 2}))
        save_checkpoint(tmp_path / "ck", model, tokenizer, meta={"stage": "pretrain", "step": 3})
    finally:
        tokenizer.chat_template = None
    assert main(["inspect", str(tmp_path / "ck")]) == 0
    out = capsys.readouterr().out
    for expected in ("SmolLM3ForCausalLM", "parameters", "fp32", "context length  256 tokens",
                     "NoPE on 1 layer in 2", f"{tokenizer.vocab_size} tokens", "chat template   chatml",
                     "pretrain step 3"):
        assert expected in out, expected
    assert main(["inspect", str(tmp_path / "ck"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["chat_template"] == "chatml"
    assert main(["inspect", str(tmp_path / "nothing")]) == 2


def test_export_refusals_and_bad_arguments(tokenizer, tmp_path):
    moe = Transformer(ModelConfig(**{**debug().model_dump(), "vocab_size": VOCAB, "n_experts": 4,
                                     "qk_norm": True, "moe_intermediate_size": 32}))
    src = save_checkpoint(tmp_path / "moe", moe, tokenizer)
    with pytest.raises(SmolforgeError, match="GGUF: mixture-of-experts"):
        export_model(src, tmp_path / "out.gguf", fmt="gguf")
    nope2 = Transformer(ModelConfig(**{**debug().model_dump(), "vocab_size": VOCAB, "nope_interval": 2}))
    with pytest.raises(SmolforgeError, match="every 4th layer, this model every 2th"):
        write_gguf(nope2, tokenizer, tmp_path / "x.gguf")
    with pytest.raises(SmolforgeError, match="not available for --format hf"):
        export_model(src, tmp_path / "o", dtype="q8_0")
    with pytest.raises(SmolforgeError, match="expected a size"):
        parse_size("lots")
    assert parse_size("1.5GB") == 1_500_000_000
    assert not any(p.name.startswith((".tmp", "out", "x", "o")) for p in tmp_path.iterdir())


def test_interleaving_rope_rows_turns_rotate_half_into_adjacent_pairs():
    """(i, i + d/2) pairs of every head become rows (2i, 2i+1): the layout llama.cpp rotates."""
    heads, head_dim = 3, 8
    rows = torch.arange(heads * head_dim).float()[:, None]
    out = interleave_rope_rows(rows, heads)[:, 0].long().tolist()
    for h in range(heads):
        base = h * head_dim
        for i in range(head_dim // 2):
            assert out[base + 2 * i] == base + i and out[base + 2 * i + 1] == base + i + head_dim // 2


@pytest.mark.parametrize("dtype, atol", [("f32", 0), ("f16", 2e-3), ("bf16", 1e-2), ("q8_0", 2e-2)])
def test_gguf_file_holds_every_tensor_and_the_tokenizer(dtype, atol, tokenizer, tmp_path):
    from gguf.quants import dequantize

    torch.manual_seed(0)
    model = Transformer(ModelConfig(**{**debug().model_dump(), "vocab_size": VOCAB, "tie_embeddings": False,
                                       "intermediate_size": 96}))
    path = write_gguf(model, tokenizer, tmp_path / "m.gguf", dtype=dtype)
    reader = gguf.GGUFReader(path)
    expected = gguf_tensors(model, "llama")
    assert {t.name for t in reader.tensors} == set(expected)
    for t in reader.tensors:
        want = expected[t.name].numpy()
        got = dequantize(t.data, t.tensor_type).reshape(want.shape)
        assert abs(got - want).max() <= atol * max(1.0, abs(want).max()), t.name
        if want.ndim == 1:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32  # norms stay f32 for llama.cpp

    def field(key):
        f = reader.fields[key]
        return f.contents()

    assert field("general.architecture") == "llama"
    assert field("tokenizer.ggml.pre") == "smollm"
    tokens = field("tokenizer.ggml.tokens")
    assert len(tokens) == VOCAB and tokens[tokenizer.eos_id] == "<|endoftext|>"
    assert tokens[-1] == f"[PAD{VOCAB - 1}]"  # embedding rows past the tokenizer
    assert field("tokenizer.ggml.eos_token_id") == tokenizer.eos_id
    assert field("llama.block_count") == model.config.n_layers


LLAMA3_STYLE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] | upper }}: "
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|im_end|>{% endgeneration %}"
    "{% else %}{{ m['content'] }}<|im_end|>{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>ASSISTANT: {% endif %}")


def test_an_imported_tokenizers_chat_template_is_kept_and_used(tokenizer, tmp_path):
    from smolforge.chat.render import render_for_training, render_messages
    from smolforge.data.sft import resolve_template

    _save_hf(tmp_path, tokenizer, "Qwen3ForCausalLM")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    hf_tok.chat_template = LLAMA3_STYLE
    hf_tok.save_pretrained(tmp_path / "hf")  # as a Hub model ships it
    _, tok = load_model(tmp_path / "hf")
    assert tok.chat_template == LLAMA3_STYLE and resolve_template("auto", tok) == LLAMA3_STYLE
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the dog"},
                {"role": "assistant", "content": "lazy fox"}]
    assert (render_messages(LLAMA3_STYLE, messages[:2], add_generation_prompt=True)
            == hf_tok.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True))
    ours = render_for_training(tok, messages, LLAMA3_STYLE)
    theirs = hf_tok.apply_chat_template(messages, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    assert ours.input_ids == theirs["input_ids"] and ours.assistant_mask == theirs["assistant_masks"]
    out = export_model(tmp_path / "hf", tmp_path / "out")
    assert transformers.AutoTokenizer.from_pretrained(out).chat_template == LLAMA3_STYLE
