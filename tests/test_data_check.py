"""`smolforge data check`: numbers against a direct rendering, every warning kind, invalid records
listed without stopping, reasoning-mode shares, --json, and the shared ShareGPT file."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from smolforge.chat.render import load_template, render_for_training, render_messages
from smolforge.cli import main
from smolforge.data.check import check_sft_data, reasoning_mode
from smolforge.data.synth import generate, write_jsonl
from smolforge.tokenizer import Tokenizer

# A copy of ../shared/data/sharegpt-dummy (Apache-2.0, see its SOURCE.txt), so CI needs no ../shared.
SHAREGPT = Path(__file__).parent / "data" / "sharegpt-dummy" / "dummy_conversation.json"
CLEAN = [{"role": "user", "content": "What is two plus two?"}, {"role": "assistant", "content": "Four."}]
# A template with two of the playbook's bugs: it drops system messages and trains only the last
# assistant turn.
LOSSY = """{%- for message in messages -%}
{%- if message.role == "user" -%}{{ "<|im_start|>user\\n" ~ message.content ~ "<|im_end|>\\n" }}
{%- elif message.role == "assistant" -%}{{ "<|im_start|>assistant\\n" }}
{%- if loop.last -%}{%- generation -%}{{ message.content ~ "<|im_end|>" }}{%- endgeneration -%}
{%- else -%}{{ message.content ~ "<|im_end|>" }}{%- endif -%}{{ "\\n" }}
{%- endif -%}
{%- endfor -%}"""
# Earlier assistant turns train only their <|im_end|>: render sees a non-empty generation block,
# so only the content check of `data check` notices the untrained answer.
END_ONLY = LOSSY.replace('{{ message.content ~ "<|im_end|>" }}{%- endif -%}',
                         '{{ message.content }}{% generation %}<|im_end|>{% endgeneration %}{%- endif -%}')


@pytest.fixture(scope="module")
def tok(synth_tokenizer, tmp_path_factory) -> tuple[Tokenizer, str]:
    root = tmp_path_factory.mktemp("tok")
    synth_tokenizer.save(root / "tokenizer")
    return synth_tokenizer, str(root / "tokenizer")


def write_lines(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def check(capsys, tok_dir: str, *args: str) -> tuple[int, str, str]:
    code = main(["data", "check", "--tokenizer", tok_dir, *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_clean_files_give_exit_0_and_the_numbers_of_a_direct_rendering(tok, tmp_path, capsys):
    tokenizer, tok_dir = tok
    a, b = generate("all", 30, seed=3), generate("persona", 10, seed=4)
    write_jsonl(a, tmp_path / "a.jsonl")
    write_jsonl(b, tmp_path / "b.jsonl")
    template = load_template("smollm3")
    expected = {}
    for name, samples in (("a", a), ("b", b)):
        rendered = [render_for_training(tokenizer, s["messages"], template, **s["chat_template_kwargs"])
                    for s in samples]
        expected[name] = (len(samples), sum(len(r.input_ids) for r in rendered),
                          sum(sum(label != -100 for label in r.labels) for r in rendered) / len(samples),
                          sum(m["role"] == "assistant" for s in samples for m in s["messages"]) / len(samples))
    code, out, _ = check(capsys, tok_dir, str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"),
                         "--template", "smollm3", "--json")
    report = json.loads(out)
    assert code == 0 and report["invalid"] == 0 and report["errors"] == [] and report["warnings"] == {}
    for row, name in zip(report["sources"], "ab"):
        examples, tokens, response, turns = expected[name]
        assert (row["examples"], row["tokens"]) == (examples, tokens)
        assert row["mean_response_tokens"] == pytest.approx(response)
        assert row["mean_context_tokens"] == pytest.approx(tokens / examples - response)
        assert row["mean_turns"] == pytest.approx(turns)
    total_tokens = expected["a"][1] + expected["b"][1]
    assert report["total"]["tokens"] == total_tokens and report["total"]["examples"] == 40
    assert report["sources"][0]["token_share"] == pytest.approx(expected["a"][1] / total_tokens)

    code, out, _ = check(capsys, tok_dir, str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"),
                         "--template", "smollm3")
    total_line = next(line for line in out.splitlines() if line.startswith("total "))
    assert code == 0 and f"{total_tokens:,}" in total_line and "100.0%" in total_line
    a_line = next(line for line in out.splitlines() if line.startswith(str(tmp_path / "a.jsonl")))
    assert f"{expected['a'][2]:.1f}" in a_line.split()
    assert out.splitlines()[-1] == "all 40 records valid, 0 warning(s)"


def _two_turns(first: str = "Hi.") -> list[dict]:
    return [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": first}, *CLEAN]


@pytest.mark.parametrize("kind, record, template, extra", [
    ("custom_instructions_null", {"messages": CLEAN, "chat_template_kwargs": {"custom_instructions": None}},
     "smollm3", []),
    ("system_empty", {"messages": [{"role": "system", "content": "  "}, *CLEAN]}, "chatml", []),
    ("system_empty", {"instruction": "Add two and two.", "output": "4", "system": None}, "chatml", []),
    ("system_dropped", {"messages": [{"role": "system", "content": "You are a pirate."}, *CLEAN]},
     "lossy", []),
    ("system_dropped", {"messages": CLEAN, "chat_template_kwargs": {"custom_instructions": "Be a pirate."}},
     "chatml", []),
    ("system_dropped", {"messages": CLEAN, "system": "Be brief."}, "chatml", []),
    ("untrained_turn", {"messages": _two_turns()}, "lossy", []),
    ("untrained_turn", {"messages": _two_turns()}, "end_only", []),
    ("no_assistant", {"messages": CLEAN[:1]}, "chatml", []),
    ("empty_content", {"messages": [{"role": "user", "content": ""}, CLEAN[1]]}, "chatml", []),
    ("dropped_field", {"messages": [CLEAN[0], {**CLEAN[1], "reasoning_content": "2 + 2 = 4"}]},
     "chatml", []),
    ("over_length", {"messages": [{"role": "user", "content": "king " * 200}, CLEAN[1]]}, "chatml",
     ["--seq-len", "100"]),
])
def test_each_warning_kind_is_named_with_file_and_line(kind, record, template, extra, tok, tmp_path, capsys):
    _, tok_dir = tok
    if template in ("lossy", "end_only"):
        Path(tmp_path / f"{template}.jinja").write_text(LOSSY if template == "lossy" else END_ONLY)
        template = str(tmp_path / f"{template}.jinja")
    path = write_lines(tmp_path / "warn.jsonl", [{"messages": CLEAN}, record])
    code, out, _ = check(capsys, tok_dir, str(path), "--template", template, "--json", *extra)
    report = json.loads(out)
    assert code == 0 and report["invalid"] == 0 and report["total"]["examples"] == 2  # warnings keep 0
    assert list(report["warnings"]) == [kind]  # the clean first line raises nothing
    assert report["warnings"][kind]["count"] == 1
    assert report["warnings"][kind]["locations"][0].startswith(f"{path}:2")
    if kind == "over_length":  # and the table counts what truncation would cut
        n = len(render_for_training(tok[0], record["messages"], load_template(template)).input_ids)
        assert (report["total"]["over_seq_len"], report["total"]["cut_tokens"]) == (1, n - 100)
    code, out, _ = check(capsys, tok_dir, str(path), "--template", template, *extra)
    line = next(line for line in out.splitlines() if line.startswith(f"  {kind}: 1 "))
    assert code == 0 and f"{path}:2" in line and f"{path}:1" not in line


def test_invalid_records_are_all_listed_and_valid_ones_still_counted(tok, tmp_path, capsys):
    _, tok_dir = tok
    path = write_lines(tmp_path / "bad.jsonl", [
        {"messages": CLEAN},
        '{"messages": [{"role": "user", "content": "hi"}',
        {"messages": [{"role": "robot", "content": "beep"}, CLEAN[1]]},
        {"messages": [{"role": "user"}, CLEAN[1]]},
        {"messages": []},
        {"conversations": [{"from": "bot", "value": "x"}]},
        {"prompt": "Two plus two?", "completion": "Four."},
    ])
    code, out, _ = check(capsys, tok_dir, str(path), "--template", "chatml")
    assert code == 1
    for expected in (f"{path}:2: malformed JSON", f"{path}:3 field 'messages[0].role'",
                     f"{path}:4 field 'messages[0].content' is missing",
                     f"{path}:5 field 'messages' is an empty list",
                     f"{path}:6 field 'conversations[0].from'"):
        assert expected in out
    assert "5 of 7 records invalid" in out
    code, out, _ = check(capsys, tok_dir, str(path), "--template", "chatml", "--json", "--max-errors", "2")
    report = json.loads(out)
    assert code == 1 and report["invalid"] == 5 and report["total"]["examples"] == 2
    assert len(report["errors"]) == 2 and report["errors"][0].startswith(f"{path}:2")


def test_reasoning_shares_follow_kwargs_and_flags(tok, tmp_path, capsys):
    tokenizer, tok_dir = tok
    template = load_template("smollm3")
    samples = generate("multiturn", 60, seed=5)
    write_jsonl(samples, tmp_path / "multi.jsonl")
    # The oracle is the template itself: the mode it writes into the system block.
    think = sum("Reasoning Mode: /think" in render_messages(template, s["messages"], **s["chat_template_kwargs"])
                for s in samples)
    assert 0 < think < 60
    report = check_sft_data([tmp_path / "multi.jsonl"], tokenizer, "smollm3")
    assert report.rows()[0]["think"] == pytest.approx(think / 60)
    assert report.rows()[0]["no_think"] == pytest.approx(1 - think / 60)

    user, answer = CLEAN
    flagged = [
        ({"enable_thinking": False}, [{"role": "user", "content": "Add 2 and 2 /think"}, answer]),
        ({"enable_thinking": True}, [{"role": "system", "content": "Be brief. /no_think"}, user, answer]),
        ({}, [{"role": "system", "content": "Be brief. /think"},
              {"role": "user", "content": "Add 2 and 2 /no_think"}, answer]),
        ({}, CLEAN),
        ({"enable_thinking": False}, [{"role": "user", "content": "Hi /think"}, answer, user, answer]),
    ]
    modes = [reasoning_mode(messages, kwargs) for kwargs, messages in flagged]
    assert modes == ["think", "no_think", "no_think", "think", "no_think"]
    for (kwargs, messages), mode in zip(flagged, modes):
        assert f"Reasoning Mode: /{mode}\n" in render_messages(template, messages, **kwargs)
    path = write_lines(tmp_path / "flags.jsonl",
                       [{"messages": m, "chat_template_kwargs": k} for k, m in flagged])
    code, out, _ = check(capsys, tok_dir, str(path), "--template", "smollm3", "--json")
    assert code == 0 and json.loads(out)["total"]["think"] == pytest.approx(0.4)
    # --kwargs applies to every record; a record's own kwargs win.
    path = write_lines(tmp_path / "plain.jsonl", [{"messages": CLEAN}] * 3
                       + [{"messages": CLEAN, "chat_template_kwargs": {"enable_thinking": True}}])
    code, out, _ = check(capsys, tok_dir, str(path), "--template", "smollm3", "--json",
                         "--kwargs", '{"enable_thinking": false}')
    assert json.loads(out)["total"]["think"] == pytest.approx(0.25)
    # ChatML has no reasoning mode: "-" in the table, null in JSON.
    code, out, _ = check(capsys, tok_dir, str(path), "--template", "chatml")
    row = next(line for line in out.splitlines() if line.startswith("total ")).split()
    assert code == 0 and row[9:11] == ["-", "-"]
    assert check_sft_data([path], tokenizer, "chatml").rows()[0]["think"] is None


def test_sharegpt_file_checks_whole(tok, capsys):
    _, tok_dir = tok
    code, out, _ = check(capsys, tok_dir, str(SHAREGPT), "--format", "sharegpt", "--json")
    report = json.loads(out)
    assert code == 0 and report["total"]["examples"] == 500 and report["invalid"] == 0
    assert report["total"]["mean_turns"] == pytest.approx(
        sum(t["from"] == "gpt" for r in json.loads(SHAREGPT.read_text()) for t in r["conversations"]) / 500)


@pytest.mark.parametrize("args, message", [
    (["missing.jsonl"], "no such file or directory"),
    (["DATA", "--kwargs", "{not json"], "--kwargs is not valid JSON"),
    (["DATA", "--kwargs", "[1]"], "--kwargs must be a JSON object"),
    (["DATA", "--seq-len", "0"], "--seq-len must be >= 1"),
    (["DATA", "--template", "NOGEN"], "has no {% generation %} block"),
])
def test_bad_arguments_exit_2(args, message, tok, tmp_path, capsys):
    _, tok_dir = tok
    data = write_lines(tmp_path / "ok.jsonl", [{"messages": CLEAN}])
    (tmp_path / "nogen.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    args = [str(data) if a == "DATA" else str(tmp_path / "nogen.jinja") if a == "NOGEN" else a for a in args]
    code, out, err = check(capsys, tok_dir, *args)
    assert code == 2 and message in err and out == ""


@pytest.mark.parametrize("columns, transposed", [(250, False), (70, True)])
def test_rich_table_on_a_terminal(columns, transposed, tok, tmp_path, capsys, monkeypatch):
    _, tok_dir = tok
    path = write_lines(tmp_path / "ok.jsonl", [{"messages": CLEAN}, {"messages": CLEAN[:1]}])
    monkeypatch.setenv("COLUMNS", str(columns))
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    code, out, _ = check(capsys, tok_dir, str(path), "--template", "chatml")
    out = re.sub(r"\x1b\[[0-9;]*m", "", out)  # rich's colours
    header = next(line for line in out.splitlines() if "examples" in line)
    assert code == 0 and "no_assistant: 1" in out and "ok.jsonl:2" in out
    assert header.split()[0] == ("examples" if transposed else "source")
