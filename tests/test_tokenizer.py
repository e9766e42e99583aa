"""Byte-level BPE tokenizer: training, fixed special ids, round trips, HF parity, evaluation, CLI."""

from __future__ import annotations

import argparse
import json
import random
import warnings

import pytest

from smolforge.errors import SmolforgeError
from smolforge.tokenizer import (
    EOS_TOKEN,
    PAD_TOKEN,
    SPECIAL_TOKENS,
    Tokenizer,
    evaluate_tokenizer,
    register,
    train_tokenizer,
)

MIXED = (
    "Hello, world! The year 2024 had 366 days.\n"
    "Accents: café, naïve, Ærøskøbing, Ünïcödé.\n"
    "CJK: 日本語のテキスト, 中文文本, 한국어.\n"
    "Emoji: 🤗🚀 👩‍💻 and flags 🇫🇷.\n"
    "def add(a, b):\n\treturn a + b  # spaces\n"
    "   leading and trailing spaces   \n\n\n"
    "<|im_start|>user\nhi<|im_end|>\n<think>hmm</think><tool_call>{}</tool_call><|endoftext|>"
)

SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "ta", "shi", "po", "va", "de", "gor", "lin", "tha", "qu"]


def make_corpus(seed: int, documents: int) -> list[str]:
    rng = random.Random(seed)
    words = ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(300)]
    docs = []
    for _ in range(documents):
        sentences = []
        for _ in range(rng.randint(2, 6)):
            sentence = " ".join(rng.choice(words) for _ in range(rng.randint(4, 12)))
            sentences.append(sentence.capitalize() + f" {rng.randint(0, 9999)}.")
        docs.append(" ".join(sentences))
    return docs


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    docs = make_corpus(0, 400)
    with (root / "train.jsonl").open("w", encoding="utf-8") as handle:
        for doc in docs[:300]:
            handle.write(json.dumps({"text": doc}) + "\n")
    (root / "long.txt").write_text("\n".join(docs[300:]) + "\n", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def trained(corpus_dir) -> Tokenizer:
    return train_tokenizer([corpus_dir], vocab_size=512)


def test_vocab_size_and_special_ids(trained):
    assert trained.vocab_size == 512
    assert [trained.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert trained.eos_id == 0 and trained.pad_id == 3 and trained.bos_id is None
    assert trained.special_tokens == SPECIAL_TOKENS


@pytest.mark.parametrize("text", [MIXED, "", " ", "a", "\n\n", "x" * 50, "🤗", "\x00\x7f\u200b"])
def test_round_trip(trained, text):
    ids = trained.encode(text)
    assert trained.decode(ids) == text
    assert all(0 <= i < trained.vocab_size for i in ids)


def test_special_tokens_encode_to_fixed_ids(trained):
    ids = trained.encode("<|im_start|>hi<|im_end|><|endoftext|>")
    assert ids[0] == 1 and ids[-2:] == [2, 0]
    assert trained.decode(ids, skip_special_tokens=True) == "hi"


def test_digits_are_split_individually(trained):
    ids = trained.encode("12345 and 2024")
    pieces = [trained.decode([i]) for i in ids]
    assert pieces[:5] == ["1", "2", "3", "4", "5"]
    assert pieces[-4:] == ["2", "0", "2", "4"]


def test_merges_learned_from_corpus(trained):
    # a frequent syllable is one token, not two bytes
    assert len(trained.encode("shi")) == 1


def test_encode_batch_matches_encode(trained):
    texts = [MIXED, "ka lo mi", ""]
    assert trained.encode_batch(texts) == [trained.encode(t) for t in texts]


def test_long_document_chunking_keeps_text(corpus_dir):
    from smolforge.tokenizer import _chunks

    text = "\n".join(make_corpus(1, 50)) * 40  # ~300 KB, several chunks
    pieces = list(_chunks(text, size=10_000))
    assert "".join(pieces) == text and len(pieces) > 10
    assert all(p.endswith("\n") for p in pieces[:-1])


@pytest.mark.parametrize(
    "vocab_size, pattern",
    [
        (500, r"'vocab_size' = 500 is not a multiple of 128.*Use 512"),
        (1000, r"multiple of 128.*Use 1024"),
        (256, r"'vocab_size' = 256 is too small.*Use at least 384"),
        (266, r"'vocab_size' = 266 is too small"),
    ],
)
def test_vocab_size_validation(corpus_dir, vocab_size, pattern):
    with pytest.raises(SmolforgeError, match=pattern):
        train_tokenizer([corpus_dir], vocab_size=vocab_size)


def test_small_corpus_warns_when_vocab_not_reached(tmp_path):
    (tmp_path / "a.txt").write_text("ab ab ab")
    with pytest.warns(UserWarning, match="fewer than the requested vocab_size 384"):
        tok = train_tokenizer([tmp_path], vocab_size=384)
    assert tok.decode(tok.encode(MIXED)) == MIXED  # still lossless thanks to the byte alphabet


def test_max_documents_bytes_limits_training(corpus_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small = train_tokenizer([corpus_dir], vocab_size=512, max_documents_bytes=200)
    assert small.vocab_size < 512


def test_save_load_and_transformers_parity(trained, tmp_path):
    transformers = pytest.importorskip("transformers")
    trained.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    trained.model_max_length = 2048
    try:
        trained.save(tmp_path)
    finally:
        trained.chat_template = None
        trained.model_max_length = None
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= {
        p.name for p in tmp_path.iterdir()
    }
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["clean_up_tokenization_spaces"] is False

    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ids = trained.encode(MIXED)
    assert hf.encode(MIXED) == ids
    assert hf(MIXED)["input_ids"] == ids
    assert hf.decode(ids) == MIXED
    assert hf.eos_token == EOS_TOKEN and hf.eos_token_id == 0
    assert hf.pad_token == PAD_TOKEN and hf.pad_token_id == 3
    assert hf.bos_token is None
    assert hf.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "hi"

    loaded = Tokenizer.load(tmp_path)
    assert loaded.encode(MIXED) == ids
    assert loaded.fingerprint == trained.fingerprint
    assert loaded.chat_template.startswith("{% for m")
    assert loaded.model_max_length == 2048
    assert Tokenizer.load(tmp_path / "tokenizer.json").encode(MIXED) == ids


def test_load_directory_saved_by_transformers(trained, tmp_path):
    transformers = pytest.importorskip("transformers")
    trained.save(tmp_path / "ours")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "ours")
    hf.chat_template = "{{ messages[0]['content'] }}"
    hf.save_pretrained(tmp_path / "hf")
    loaded = Tokenizer.load(tmp_path / "hf")
    assert loaded.encode(MIXED) == trained.encode(MIXED)
    assert loaded.eos_token == EOS_TOKEN and loaded.pad_id == 3
    assert loaded.chat_template == "{{ messages[0]['content'] }}"
    assert loaded.model_max_length is None  # transformers' "no limit" sentinel
    assert loaded.vocab_size == trained.vocab_size


def test_load_errors(tmp_path):
    with pytest.raises(SmolforgeError, match="no such tokenizer"):
        Tokenizer.load(tmp_path / "missing")
    with pytest.raises(SmolforgeError, match="no tokenizer.json"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(SmolforgeError, match="not a valid tokenizer.json"):
        Tokenizer.load(tmp_path)


def test_fingerprint_changes_with_vocabulary(trained, corpus_dir):
    other = train_tokenizer([corpus_dir], vocab_size=384)
    assert len(trained.fingerprint) == 64
    assert other.fingerprint != trained.fingerprint


def test_evaluate_matches_brute_force(trained, corpus_dir):
    from smolforge.data.sources import iter_corpus

    metrics = evaluate_tokenizer(trained, [corpus_dir], max_documents=50)
    docs = list(iter_corpus([corpus_dir]))[:50]
    tokens = sum(len(trained.encode(d)) for d in docs)
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    words = [w for d in docs for w in d.split()]
    split = sum(len(trained.encode(w)) > 1 for w in words)
    assert metrics["documents"] == 50
    assert metrics["tokens"] == tokens and metrics["bytes"] == n_bytes
    assert metrics["words"] == len(words)
    assert metrics["bytes_per_token"] == pytest.approx(n_bytes / tokens)
    assert metrics["chars_per_token"] == pytest.approx(sum(map(len, docs)) / tokens)
    assert metrics["tokens_per_word"] == pytest.approx(tokens / len(words))
    assert metrics["pct_words_split"] == pytest.approx(100 * split / len(words))
    assert 1.5 < metrics["bytes_per_token"] < 10  # merges compress the in-domain text


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smolforge")
    register(parser.add_subparsers(dest="command"))
    return parser


def test_cli_train_and_eval(corpus_dir, tmp_path, capsys):
    parser = make_parser()
    out = tmp_path / "tok"
    args = parser.parse_args(
        ["tokenizer", "train", str(corpus_dir), "--vocab-size", "384", "--out", str(out)]
    )
    args.func(args)
    printed = capsys.readouterr().out
    assert "384" in printed and "bytes/token" in printed
    assert Tokenizer.load(out).vocab_size == 384

    base = tmp_path / "base"
    train_tokenizer([corpus_dir], vocab_size=512).save(base)
    args = parser.parse_args(
        ["tokenizer", "eval", str(out), str(base), "--data", str(corpus_dir / "train.jsonl"),
         "--max-documents", "20"]
    )
    args.func(args)
    printed = capsys.readouterr().out
    assert "fertility" in printed and "ratio" in printed

    args = parser.parse_args(["tokenizer", "eval", str(out), str(out), str(out),
                              "--data", str(corpus_dir)])
    with pytest.raises(SmolforgeError, match="at most two"):
        args.func(args)


def test_cli_train_bad_vocab_size(corpus_dir, tmp_path):
    args = make_parser().parse_args(
        ["tokenizer", "train", str(corpus_dir), "--vocab-size", "1000", "--out", str(tmp_path)]
    )
    with pytest.raises(SmolforgeError, match="vocab_size"):
        args.func(args)


def test_cli_help_strings():
    parser = make_parser()
    tokenizer_parser = parser._subparsers._group_actions[0].choices["tokenizer"]
    for sub in tokenizer_parser._subparsers._group_actions[0].choices.values():
        for action in sub._actions:
            assert action.help, f"{sub.prog} {action.dest} has no help"


def test_training_texts_respect_byte_budget():
    from smolforge.tokenizer import _training_texts

    fed = [0]
    docs = iter(["ab cd ef " * 10, "ünï " * 50, "never reached"])
    pieces = list(_training_texts(docs, 120, fed))
    assert fed[0] == sum(len(p.encode("utf-8")) for p in pieces) <= 120
    assert fed[0] > 100 and pieces[-1].endswith(" ")
    assert "never reached" not in pieces


def test_cli_train_out_inside_data_directory(corpus_dir, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_bytes((corpus_dir / "train.jsonl").read_bytes())
    args = make_parser().parse_args(
        ["tokenizer", "train", str(data), "--vocab-size", "384", "--out", str(data / "tok")]
    )
    args.func(args)  # the saved tokenizer files must not be read back as training data
    assert "300 training documents" in capsys.readouterr().out


def test_bare_tokenizer_json_without_eos(tmp_path):
    from smolforge.tokenizer import new_backend

    new_backend().save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.load(tmp_path / "tokenizer.json")
    assert tok.eos_token is None and tok.pad_id is None
    with pytest.raises(SmolforgeError, match="eos_token"):
        _ = tok.eos_id


def test_config_token_not_in_vocabulary(trained, tmp_path):
    trained.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["eos_token"] = "</s>"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(SmolforgeError, match=r"tokenizer_config\.json field 'eos_token'.*'</s>'"):
        Tokenizer.load(tmp_path)
