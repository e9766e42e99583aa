"""Chat templates: text and assistant masks equal to transformers', SmolLM3-style behaviours,
message validation and `smolforge template render`."""

from __future__ import annotations

import fnmatch
import json
import re
import warnings
from pathlib import Path

import pytest

from smolforge.chat import (
    load_template,
    render_for_training,
    render_messages,
    render_with_spans,
    template_name,
)
from smolforge.cli import build_parser, main
from smolforge.errors import SmolforgeError
from smolforge.tokenizer import Tokenizer, train_tokenizer

transformers = pytest.importorskip("transformers")

TODAY = "1 January 2025"
CORPUS = ("the quick brown fox jumps over the lazy dog 0123456789\n"
          "what is the answer? the answer is 42. think step by step, then call a tool.\n") * 100


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    root = tmp_path_factory.mktemp("tok")
    (root / "corpus.txt").write_text(CORPUS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tiny corpus yields fewer merges than asked for
        return train_tokenizer([root / "corpus.txt"], vocab_size=384)


@pytest.fixture(scope="module")
def saved(tokenizer, tmp_path_factory) -> dict[str, Path]:
    """A tokenizer directory per bundled template, saved with it as its chat template."""
    dirs = {}
    for name in ("chatml", "smollm3"):
        directory = tmp_path_factory.mktemp(name)
        Tokenizer(tokenizer.backend, chat_template=load_template(name)).save(directory)
        dirs[name] = directory
    return dirs


@pytest.fixture(scope="module")
def hf(saved):
    return {name: transformers.AutoTokenizer.from_pretrained(d) for name, d in saved.items()}


def trained_text(tokenizer: Tokenizer, example) -> str:
    return tokenizer.decode([t for t, m in zip(example.input_ids, example.assistant_mask) if m])


SYSTEM = {"role": "system", "content": "You are a pirate."}
USER = {"role": "user", "content": "what is the answer?"}
ANSWER = {"role": "assistant", "content": "the answer is 42.", "reasoning_content": "think step by step"}
TOOL_CALL = {"role": "assistant", "content": "",
             "tool_calls": [{"type": "function",
                             "function": {"name": "lookup", "arguments": {"query": "answer"}}}]}
TOOL_SCHEMA = {"type": "function", "function": {
    "name": "lookup", "description": "Look <things> up in the café.",
    "parameters": {"type": "object", "properties": {"query": {"type": "string"}}}}}
MULTI_TURN = [SYSTEM, USER, {**ANSWER, "reasoning_content": "first thought"},
              {"role": "user", "content": "and the fox?"}, ANSWER]

# (template, messages, template kwargs)
PARITY_CASES = {
    "chatml": ("chatml", [SYSTEM, USER, {"role": "assistant", "content": "the answer is 42."},
                          {"role": "user", "content": "why?"},
                          {"role": "assistant", "content": " because the fox jumps"}], {}),
    "chatml-tool-role": ("chatml", [USER, {"role": "assistant", "content": "lookup"},
                                    {"role": "tool", "content": "42"},
                                    {"role": "assistant", "content": "42"}], {}),
    "smollm3-think": ("smollm3", [USER, ANSWER], {"today": TODAY}),
    "smollm3-no-think": ("smollm3", [SYSTEM, USER, ANSWER], {"enable_thinking": False, "today": TODAY}),
    "smollm3-system-flag": ("smollm3", [{"role": "system", "content": "Be brief. /no_think"}, USER, ANSWER],
                            {"today": TODAY}),
    "smollm3-user-flag": ("smollm3", [USER, {"role": "assistant", "content": "42"},
                                      {"role": "user", "content": "why? /think"}, ANSWER],
                          {"enable_thinking": False, "today": TODAY}),
    "smollm3-tools": ("smollm3", [USER, TOOL_CALL, {"role": "tool", "content": "42"},
                                  {"role": "tool", "content": "43"}, ANSWER],
                      {"xml_tools": [TOOL_SCHEMA], "python_tools": ["def lookup(query: str) -> str: ..."],
                       "today": TODAY}),
    "smollm3-multi-turn": ("smollm3", MULTI_TURN, {"today": TODAY, "keep_all_reasoning": False}),
    "smollm3-keep-all": ("smollm3", MULTI_TURN, {"today": TODAY, "keep_all_reasoning": True}),
    "smollm3-custom-instructions": ("smollm3", [USER, ANSWER],
                                    {"custom_instructions": "You are a vampire.", "today": TODAY}),
    "smollm3-date-from-strftime": ("smollm3", [USER, ANSWER], {"knowledge_cutoff": "May 2024"}),
    "smollm3-think-in-content": ("smollm3", [USER, {"role": "assistant",
                                                    "content": "<think>\nhmm\n</think>\n\n42"}],
                                 {"today": TODAY}),
}


@pytest.mark.parametrize("case", list(PARITY_CASES))
def test_text_and_mask_equal_transformers(case, tokenizer, hf):
    name, messages, kwargs = PARITY_CASES[case]
    template = load_template(name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # none of these well-formed cases may warn
        example = render_for_training(tokenizer, messages, template, **kwargs)
    reference = hf[name].apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
        keep_all_reasoning=kwargs.get("keep_all_reasoning", True),
        **{k: v for k, v in kwargs.items() if k != "keep_all_reasoning"})
    assert example.text == hf[name].apply_chat_template(
        messages, tokenize=False, keep_all_reasoning=kwargs.get("keep_all_reasoning", True),
        **{k: v for k, v in kwargs.items() if k != "keep_all_reasoning"})
    assert example.input_ids == list(reference["input_ids"])
    assert example.assistant_mask == list(reference["assistant_masks"])
    assert 0 < example.num_trained < len(example.input_ids)
    assert example.labels == [t if m else -100 for t, m in zip(example.input_ids, example.assistant_mask)]
    assert all((label == -100) == (m == 0) for label, m in zip(example.labels, example.assistant_mask))


@pytest.mark.parametrize("name", ["chatml", "smollm3"])
@pytest.mark.parametrize("thinking", [True, False])
def test_generation_prompt_equals_transformers(name, thinking, hf):
    kwargs = {"enable_thinking": thinking, "today": TODAY}
    text = render_messages(load_template(name), [SYSTEM, USER], add_generation_prompt=True, **kwargs)
    assert text == hf[name].apply_chat_template([SYSTEM, USER], tokenize=False,
                                                add_generation_prompt=True, **kwargs)
    assert text.endswith("<|im_start|>assistant\n" + ("" if thinking or name == "chatml"
                                                      else "<think>\n\n</think>\n"))


def test_chatml_layout_and_trained_tokens(tokenizer):
    messages = [SYSTEM, USER, {"role": "assistant", "content": "42"}]
    example = render_for_training(tokenizer, messages, load_template("chatml"))
    assert example.text == ("<|im_start|>system\nYou are a pirate.<|im_end|>\n"
                            "<|im_start|>user\nwhat is the answer?<|im_end|>\n"
                            "<|im_start|>assistant\n42<|im_end|>\n")
    assert trained_text(tokenizer, example) == "42<|im_end|>"


def test_smollm3_think_mode_trains_reasoning_and_answer(tokenizer):
    example = render_for_training(tokenizer, [SYSTEM, USER, ANSWER], load_template("smollm3"), today=TODAY)
    assert example.text.startswith(
        "<|im_start|>system\n## Metadata\n\nKnowledge Cutoff Date: June 2025\n"
        f"Today Date: {TODAY}\nReasoning Mode: /think\n\n## Custom Instructions\n\nYou are a pirate.<|im_end|>\n")
    assert example.text.endswith("<|im_start|>assistant\n<think>\nthink step by step\n</think>\n"
                                 "the answer is 42.<|im_end|>\n")
    assert trained_text(tokenizer, example) == "<think>\nthink step by step\n</think>\nthe answer is 42.<|im_end|>"


def test_smollm3_no_think_prefills_an_untrained_empty_think_block(tokenizer):
    example = render_for_training(tokenizer, [USER, ANSWER], load_template("smollm3"),
                                  enable_thinking=False, today=TODAY)
    assert "Reasoning Mode: /no_think\n" in example.text
    assert example.text.endswith("<|im_start|>assistant\n<think>\n\n</think>\nthe answer is 42.<|im_end|>\n")
    assert "think step by step" not in example.text
    assert trained_text(tokenizer, example) == "the answer is 42.<|im_end|>"


@pytest.mark.parametrize(("messages", "kwargs", "mode"), [
    ([{"role": "system", "content": "Be brief. /no_think"}, USER], {}, "/no_think"),
    ([{"role": "system", "content": "Be brief.\n/think  "}, USER], {"enable_thinking": False}, "/think"),
    ([{"role": "system", "content": "Be brief. /think"}, {"role": "user", "content": "hi /no_think"}], {}, "/no_think"),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi /think"}],
     {"enable_thinking": False}, "/think"),
])
def test_smollm3_flags_override_the_mode_and_are_stripped(messages, kwargs, mode):
    text = render_messages(load_template("smollm3"), messages, today=TODAY, **kwargs)
    assert f"Reasoning Mode: {mode}\n" in text
    assert "## Custom Instructions\n\nBe brief.<|im_end|>" in text
    assert "/think" not in text.split("Reasoning Mode:")[1].split("\n", 1)[1]
    assert "/no_think" not in text.split("Reasoning Mode:")[1].split("\n", 1)[1]


def test_smollm3_only_the_last_user_flag_counts():
    messages = [{"role": "user", "content": "one /no_think"}, {"role": "assistant", "content": "1"},
                {"role": "user", "content": "two"}]
    text = render_messages(load_template("smollm3"), messages, today=TODAY, add_generation_prompt=True)
    assert "Reasoning Mode: /think\n" in text and "one /no_think<|im_end|>" in text


def test_smollm3_reasoning_dropped_from_history_unless_kept(tokenizer):
    template = load_template("smollm3")
    inference = render_messages(template, MULTI_TURN, today=TODAY)
    assert "first thought" not in inference and "<think>\nthink step by step\n</think>" in inference
    training = render_for_training(tokenizer, MULTI_TURN, template, today=TODAY)  # keeps all by default
    assert trained_text(tokenizer, training) == (
        "<think>\nfirst thought\n</think>\nthe answer is 42.<|im_end|>"
        "<think>\nthink step by step\n</think>\nthe answer is 42.<|im_end|>")
    dropped = render_for_training(tokenizer, MULTI_TURN, template, keep_all_reasoning=False, today=TODAY)
    assert trained_text(tokenizer, dropped) == (
        "the answer is 42.<|im_end|><think>\nthink step by step\n</think>\nthe answer is 42.<|im_end|>")


def test_smollm3_tools_sections_calls_and_responses(tokenizer):
    messages = [USER, TOOL_CALL, {"role": "tool", "content": "42"}, {"role": "tool", "content": "43"},
                {"role": "assistant", "content": "42"}]
    example = render_for_training(tokenizer, messages, load_template("smollm3"), today=TODAY,
                                  enable_thinking=False, xml_tools=[TOOL_SCHEMA],
                                  python_tools=["def lookup(query: str) -> str: ..."])
    text = example.text
    assert "<tools>\n" + json.dumps(TOOL_SCHEMA, ensure_ascii=False) + "\n</tools>" in text
    assert "Look <things> up in the café." in text  # tojson must not escape HTML or non-ASCII
    assert "<python_tools>\ndef lookup(query: str) -> str: ...\n</python_tools>" in text
    assert ("<|im_start|>user\n<tool_response>\n42\n</tool_response>\n"
            "<tool_response>\n43\n</tool_response><|im_end|>\n") in text
    assert trained_text(tokenizer, example) == (
        '<tool_call>\n{"name": "lookup", "arguments": {"query": "answer"}}\n</tool_call><|im_end|>'
        "42<|im_end|>")


def test_smollm3_system_message_wins_over_a_none_custom_instructions():
    """The playbook's bug: custom_instructions=None must never drop the data's system prompt."""
    template = load_template("smollm3")
    text = render_messages(template, [SYSTEM, USER], custom_instructions=None, today=TODAY)
    assert "## Custom Instructions\n\nYou are a pirate.<|im_end|>" in text
    default = render_messages(template, [USER], custom_instructions=None, today=TODAY)
    assert "You are a helpful assistant." in default
    with pytest.warns(UserWarning, match="system message is used"):
        text = render_messages(template, [SYSTEM, USER], custom_instructions="vampire", today=TODAY)
    assert "vampire" not in text


def test_smollm3_system_override_replaces_the_system_block():
    text = render_messages(load_template("smollm3"),
                           [{"role": "system", "content": "Only this. /system_override /no_think"}, USER])
    assert text.startswith("<|im_start|>system\nOnly this.<|im_end|>\n<|im_start|>user\n")


@pytest.mark.parametrize(("messages", "match"), [
    ([], r"field 'messages' is an empty list"),
    ("hello", r"field 'messages' must be a list"),
    ([{"content": "x"}], r"field 'messages\[0\].role' is missing"),
    ([USER, {"role": "assistant"}], r"field 'messages\[1\].content' is missing"),
    ([{"role": "bot", "content": "x"}], r"field 'messages\[0\].role' = 'bot' is not a known role"),
    ([{"role": "user", "content": ["x"]}], r"field 'messages\[0\].content' must be a string, got list"),
    ([USER, {"role": "assistant", "content": "x", "reasoning_content": 3}],
     r"field 'messages\[1\].reasoning_content' must be a string"),
    ([{"role": "user", "content": "x", "tool_calls": []}], r"field 'messages\[0\].tool_calls'"),
    ([USER, SYSTEM, ANSWER], r"smollm3.*only the first message may be a system message"),
])
def test_invalid_messages_name_the_field(messages, match, tokenizer):
    with pytest.raises(SmolforgeError, match=match):
        render_for_training(tokenizer, messages, load_template("smollm3"), today=TODAY)


def test_warnings_for_untrained_turns_and_dropped_fields(tokenizer):
    template = ("{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}{{ m.content }}"
                "{% endgeneration %}{% else %}{{ m.content }}{% endif %}{% endfor %}")
    with pytest.warns(UserWarning, match=r"messages\[1\]: the assistant turn yields no trained token"):
        render_for_training(tokenizer, [USER, {"role": "assistant", "content": ""}], template)
    with pytest.warns(UserWarning, match="no assistant message"):
        render_for_training(tokenizer, [USER], load_template("chatml"))
    with pytest.warns(UserWarning, match="'reasoning_content' but the chat template never reads it"):
        render_for_training(tokenizer, [USER, ANSWER], load_template("chatml"))
    with pytest.raises(SmolforgeError, match="has no {% generation %} block"):
        render_for_training(tokenizer, [USER, ANSWER], "{{ messages[0].content }}")


def test_load_template_sources(tokenizer, saved, tmp_path):
    assert template_name(load_template("chatml")) == "chatml"
    assert template_name(load_template("smollm3")) == "smollm3"
    own = Tokenizer.load(saved["smollm3"])
    assert template_name(load_template("tokenizer", own)) == "smollm3"
    path = tmp_path / "mine.jinja"
    path.write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    assert load_template(str(path)) == path.read_text()
    assert template_name(path.read_text()) == "custom"
    with pytest.raises(SmolforgeError, match="unknown chat template 'nope'"):
        load_template("nope")
    with pytest.raises(SmolforgeError, match="needs a tokenizer"):
        load_template("tokenizer")
    with pytest.raises(SmolforgeError, match="the tokenizer has no chat template"):
        load_template("tokenizer", tokenizer)
    path.write_text("line one\n{% for m in messages %}")
    with pytest.raises(SmolforgeError, match=r"mine.jinja:2: invalid Jinja template"):
        load_template(str(path))


def test_render_with_spans_marks_generation_blocks():
    text, spans = render_with_spans(load_template("chatml"), [USER, {"role": "assistant", "content": "42"}])
    assert [text[s:e] for s, e in spans] == ["42<|im_end|>"]


def test_templates_ship_in_the_wheel():
    """Every bundled .jinja file matches a package-data pattern of pyproject.toml."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    root = Path(__file__).resolve().parents[1]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["smolforge"]
    files = sorted((root / "src/smolforge/chat/templates").glob("*.jinja"))
    assert {f.stem for f in files} == {"chatml", "smollm3"}
    for file in files:
        relative = file.relative_to(root / "src/smolforge").as_posix()
        assert any(fnmatch.fnmatch(relative, p) for p in patterns), relative


# ---- CLI ------------------------------------------------------------------------------------


@pytest.fixture()
def data(tmp_path) -> Path:
    path = tmp_path / "sft.jsonl"
    lines = [json.dumps({"messages": [USER, {"role": "assistant", "content": "42"}]}), "",
             json.dumps({"messages": [SYSTEM, USER, ANSWER],
                         "chat_template_kwargs": {"enable_thinking": False}})]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_cli_render_marks_trained_tokens(data, saved, tokenizer, capsys):
    rc = main(["template", "render", str(data), "--index", "1", "--tokenizer", str(saved["chatml"]),
               "--template", "smollm3", "--kwargs", json.dumps({"today": TODAY})])
    out = capsys.readouterr().out
    assert rc == 0
    assert f"{data}:3" in out and "template smollm3" in out
    assert "<|im_start|>assistant\n<think>\n\n</think>\n[[the answer is 42.<|im_end|>]]\n" in out
    assert "Reasoning Mode: /no_think" in out  # the example's chat_template_kwargs apply
    example = render_for_training(tokenizer, [SYSTEM, USER, ANSWER], load_template("smollm3"),
                                  enable_thinking=False, today=TODAY)
    assert f"{len(example.input_ids)} tokens, {example.num_trained} trained" in out


def test_cli_render_defaults_to_the_tokenizer_template_and_works_without_tokenizer(data, saved, capsys):
    assert main(["template", "render", str(data), "--tokenizer", str(saved["chatml"])]) == 0
    out = capsys.readouterr().out
    assert "template the tokenizer's (chatml)" in out and "assistant\n[[42<|im_end|>]]\n" in out
    assert main(["template", "render", str(data), "--kwargs",
                 '{"enable_thinking": true, "keep_all_reasoning": false}']) == 0
    out = capsys.readouterr().out
    assert "template chatml" in out and "characters, 12 trained" in out  # len("42<|im_end|>")


@pytest.mark.parametrize(("line", "index", "match"), [
    ("{not json", 0, r"sft.jsonl:1: malformed JSON"),
    ('{"msgs": []}', 0, r"sft.jsonl:1 field 'messages' is missing"),
    ('{"messages": [{"role": "bot", "content": "x"}]}', 0,
     r"sft.jsonl:1 field 'messages\[0\].role' = 'bot' is not a known role"),
    ('{"messages": [], "chat_template_kwargs": 3}', 0, r"sft.jsonl:1 field 'chat_template_kwargs' must be an object"),
    ('{"messages": []}', 5, r"--index 5 is out of range, the file has 1 examples"),
])
def test_cli_render_errors_name_file_line_and_field(line, index, match, tmp_path, capsys):
    path = tmp_path / "sft.jsonl"
    path.write_text(line + "\n")
    assert main(["template", "render", str(path), "--index", str(index)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert re.search(match, err), err


def test_cli_bad_kwargs_and_help(data, capsys):
    assert main(["template", "render", str(data), "--kwargs", "[1]"]) == 2
    assert "--kwargs must be a JSON object" in capsys.readouterr().err
    assert main(["template", "render", str(data), "--kwargs", '{"messages": []}']) == 2
    assert "template variable(s) messages cannot be set" in capsys.readouterr().err
    parser = build_parser()
    template = next(a for a in parser._actions if a.dest == "command").choices["template"]
    render = next(a for a in template._actions if a.dest == "template_command").choices["render"]
    for action in render._actions:
        if action.dest != "help":
            assert action.help, action.dest


def test_cli_render_highlights_with_colours_in_a_terminal(data, saved, capsys, monkeypatch):
    monkeypatch.setenv("FORCE_COLOR", "1")  # rich then treats the captured output as a terminal
    monkeypatch.delenv("NO_COLOR", raising=False)
    assert main(["template", "render", str(data), "--tokenizer", str(saved["chatml"])]) == 0
    out = capsys.readouterr().out
    assert "\x1b[1;32m42<|im_end|>\x1b[0m" in out and "[[" not in out


# Written the way Hub templates are: no whitespace control, relying on trim_blocks / lstrip_blocks,
# with loop controls, namespace(), tojson options and a generation block inside the loop.
HUB_STYLE = """{% set ns = namespace(n=0) %}
{% for message in messages %}
  {% if message.role == "assistant" %}
    {% generation %}
    {{ message.content }}{{ eos_token }}
    {% endgeneration %}
  {% else %}
    {{ message.role }}: {{ message.content }}
  {% endif %}
  {% set ns.n = ns.n + 1 %}
  {% if ns.n > 3 %}{% break %}{% endif %}
{% endfor %}
{{ {"n": ns.n, "tools": tools} | tojson(indent=1) }}
"""


def test_hub_style_template_renders_like_transformers(tokenizer, hf):
    messages = [USER, {"role": "assistant", "content": "42"}, USER, {"role": "assistant", "content": "43"},
                USER]
    example = render_for_training(tokenizer, messages, HUB_STYLE)
    reference = hf["chatml"].apply_chat_template(messages, chat_template=HUB_STYLE, tokenize=True,
                                                 return_dict=True, return_assistant_tokens_mask=True,
                                                 keep_all_reasoning=True)
    assert example.text == hf["chatml"].apply_chat_template(messages, chat_template=HUB_STYLE, tokenize=False)
    assert example.assistant_mask == list(reference["assistant_masks"])
    assert trained_text(tokenizer, example) == "    42<|endoftext|>\n    43<|endoftext|>\n"
    assert '"n": 4' in example.text and '"tools": null' in example.text
    with pytest.raises(SmolforgeError, match="custom.*boom"):
        render_messages("{{ raise_exception('boom') }}", [USER])


def test_namespace_refuses_underscore_attributes():
    with pytest.raises(SmolforgeError, match="starts with '_'"):
        render_messages("{% set ns = namespace(_secret=1) %}{{ ns }}", [USER])
    with pytest.raises(SmolforgeError, match="starts with '_'"):
        render_messages("{% set ns = namespace() %}{% set ns._x = 1 %}", [USER])
