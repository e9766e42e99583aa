"""N-gram decontamination on planted overlaps with known answers, the CLI's exit status and
report, and clear errors for bad inputs."""

from __future__ import annotations

import json

import pytest

from smolforge.cli import main
from smolforge.errors import SmolforgeError
from smolforge.eval.decontaminate import decontaminate, example_grams, words

# 20 words; the training data copies words 3..15 (13 words) of it, in other case and punctuation.
LEAKED = "Janet has ducks that lay sixteen eggs per day and she eats three for breakfast every single morning"
SHORT_LEAKED = "Which planet in our solar system has the most moons"  # 10 words, leaked whole
NATO = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar "
        "papa quebec romeo sierra tango uniform victor whiskey xray yankee zulu").split()
TWELVE = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen"


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def data(tmp_path):
    leaked_13 = " ".join(LEAKED.split()[3:16]).upper().replace(" ", ", ")
    train = write_jsonl(tmp_path / "sft.jsonl", [
        {"messages": [{"role": "user", "content": "Hello there"},
                      {"role": "assistant", "content": f"Sure. {leaked_13}!"}]},
        {"messages": [{"role": "user", "content": "Count: " + " ".join(TWELVE.split()[:12])}],
         "note": "twelve words of TWELVE only"},
        {"text": f"{' '.join(NATO[6:13])} {' '.join(NATO[13:19])}"},  # spans two eval fields
    ])
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "book.txt").write_text(f"Long ago. {SHORT_LEAKED}? Nobody knew.\n")
    evals = write_jsonl(tmp_path / "eval.jsonl", [
        {"question": "A clean question about something else entirely that nobody wrote down before now."},
        {"question": LEAKED, "answer": "18"},
        {"question": TWELVE},  # shares 12 words with training: clean at n = 13
        {"question": SHORT_LEAKED, "choices": ["Saturn", "Mars"]},
        {"question": "Too short", "answer": "fox hound"},  # no field reaches min_words
        # Each field alone is clean; only their concatenation occurs in training.
        {"a": " ".join(NATO[:13]), "b": " ".join(NATO[13:])},
    ])
    return train, corpus, evals


def test_words_and_grams():
    assert words("Hello, World! It's 42.") == ["hello", "world", "it", "s", "42"]
    assert example_grams(["a b c d"], n=3, min_words=2) == {("a", "b", "c"), ("b", "c", "d")}
    assert example_grams(["a b"], n=3, min_words=2) == {("a", "b")}  # short: whole
    assert example_grams(["a"], n=3, min_words=2) == set()  # too short to check


def test_planted_overlaps_are_found(data):
    train, corpus, evals = data
    report = decontaminate([train, corpus], [evals])
    r = report["eval_sets"][str(evals)]
    assert (r["examples"], r["contaminated"], r["unchecked_too_short"]) == (6, 2, 1)
    assert r["share"] == pytest.approx(2 / 6)
    first, second = r["matches"]
    assert first["location"] == f"{evals}:2" and first["training"] == f"{train}:1"
    assert first["ngram"] == " ".join(words(LEAKED)[3:16])
    assert second["location"] == f"{evals}:4" and second["training"] == str(corpus / "book.txt")
    assert report["training_documents"] == 4 + 3 + 1 + 1  # every string of every record, + the book
    # n is configurable: at n = 12 the twelve shared words count too.
    assert decontaminate([train], [evals], n=12)["eval_sets"][str(evals)]["contaminated"] == 2
    locations = [m["location"] for m in decontaminate([train], [evals], n=12)["eval_sets"][str(evals)]["matches"]]
    assert locations == [f"{evals}:2", f"{evals}:3"]


def test_text_eval_sets_count_lines(data, tmp_path):
    train, _, _ = data
    lines = tmp_path / "eval.txt"
    lines.write_text(f"nothing here at all\n\n{LEAKED}\n")
    r = decontaminate([train], [lines])["eval_sets"][str(lines)]
    assert r["examples"] == 2 and r["matches"][0]["location"] == f"{lines}:3"


def test_cli_exit_status_and_json_report(data, tmp_path, capsys):
    train, corpus, evals = data
    out = tmp_path / "report.json"
    assert main(["decontaminate", "--train", str(train), str(corpus), "--eval", str(evals),
                 "--out", str(out)]) == 1
    printed = capsys.readouterr().out
    assert "2 of 6 examples contaminated (33.3%)" in printed and "1 too short to check" in printed
    assert json.loads(out.read_text())["eval_sets"][str(evals)]["contaminated"] == 2
    clean = write_jsonl(tmp_path / "clean.jsonl", [{"question": LEAKED.replace("ducks", "geese")
                                                    .replace("sixteen", "ten").replace("breakfast", "tea")}])
    assert main(["decontaminate", "--train", str(train), "--eval", str(clean)]) == 0
    assert "0 of 1 examples contaminated" in capsys.readouterr().out


def test_bad_inputs(data, tmp_path, capsys):
    train, _, evals = data
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(SmolforgeError, match="holds no eval examples"):
        decontaminate([train], [empty])
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"question": "fine"}\n{"question": \n')
    with pytest.raises(SmolforgeError, match="broken.jsonl:2: malformed JSON"):
        decontaminate([train], [broken])
    with pytest.raises(SmolforgeError, match="min_words"):
        decontaminate([train], [evals], n=5, min_words=8)
    assert main(["decontaminate", "--train", str(tmp_path / "missing.jsonl"), "--eval", str(evals)]) == 2
    assert "no such file" in capsys.readouterr().err
