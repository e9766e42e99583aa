"""`smolforge data synth`: synthetic verifiable chat tasks, their checkers and the CLI."""

from __future__ import annotations

import json
import re

import pytest

from smolforge.cli import main
from smolforge.data.synth import (
    CHECKERS,
    NO_THINK_FLAG,
    TASKS,
    THINK_FLAG,
    check_response,
    generate,
    strip_thinking,
    thinking_honoured,
)
from smolforge.errors import SmolforgeError


def _flag(text: str) -> bool | None:
    if text.endswith(" " + NO_THINK_FLAG):
        return False
    if text.endswith(" " + THINK_FLAG):
        return True
    return None


def _turn_modes(sample: dict) -> list[bool]:
    """The mode each assistant turn answers in: its user turn's flag, else the system flag,
    else enable_thinking (the rule a ChatML template with /think and /no_think applies)."""
    messages = sample["messages"]
    system = _flag(messages[0]["content"]) if messages[0]["role"] == "system" else None
    default = sample["chat_template_kwargs"]["enable_thinking"]
    modes = []
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            user = _flag(messages[i - 1]["content"])
            modes.append(user if user is not None else system if system is not None else default)
    return modes


def _corrupt(check: dict, answer: str) -> str:
    """A near miss that the check must reject."""
    kind = check["type"]
    if kind == "exact":
        return answer + "1"
    if kind == "uppercase":
        return answer[:-1] + answer[-1].lower()
    if kind == "word_count":
        return answer + " more"
    if kind == "ends_with":
        return answer + " and more"
    if kind == "starts_with":
        return "So " + answer
    if kind == "json_keys":
        obj = json.loads(answer)
        obj.pop(next(iter(obj)))
        return json.dumps(obj)
    if kind == "all":  # break the last sub-check (the task part for personas)
        return _corrupt(check["checks"][-1], answer)
    if kind == "contains":
        return answer.replace(check["text"], check["text"] + "9")
    raise AssertionError(f"no corruption for {kind}")


def test_generate_is_deterministic_and_seed_dependent():
    assert generate("all", 70, seed=3) == generate("all", 70, seed=3)
    assert generate("all", 70, seed=3) != generate("all", 70, seed=4)
    assert generate("arithmetic", 20, seed=3, think_fraction=0.2) != generate("arithmetic", 20, seed=3)


def test_all_mixes_every_task_evenly_and_prompts_are_unique():
    samples = generate("all", len(TASKS) * 40, seed=0)
    counts = {t: sum(s["task"] == t for s in samples) for t in TASKS}
    assert counts == {t: 40 for t in TASKS}
    chosen = generate("addition,count", 30, seed=0)
    assert {t: sum(s["task"] == t for s in chosen) for t in ("addition", "count")} == {"addition": 15, "count": 15}
    prompts = [json.dumps([s["messages"][:-1], s["chat_template_kwargs"]]) for s in samples]
    assert len(set(prompts)) == len(prompts)


@pytest.mark.parametrize("task", TASKS)
def test_gold_answer_passes_its_checker_and_near_misses_fail(task):
    samples = generate(task, 60, seed=11)
    assert {s["task"] for s in samples} == {task}
    for s in samples:
        last = s["messages"][-1]
        assert last["role"] == "assistant" and last["content"].strip()
        answer, check = last["content"], s["check"]
        assert check["type"] in CHECKERS
        assert check_response(check, answer), (check, answer)
        assert check_response(check, f"<think>\nsome steps\n</think>\n\n  {answer}\n")
        assert not check_response(check, ""), check
        assert not check_response(check, _corrupt(check, answer)), (check, answer)
        # The think block never counts as the answer.
        assert not check_response(check, f"<think>{answer}</think>")


def test_task_variants_all_occur():
    fmt = {s["check"]["type"] for s in generate("format", 80, seed=2)}
    assert fmt == {"uppercase", "word_count", "ends_with", "json_keys"}
    persona = [s["check"] for s in generate("persona", 80, seed=2)]
    assert {c["type"] for c in persona} == {"starts_with", "ends_with", "all"}
    ops = {re.search(r"\d ([-+*]|plus|minus|times) \d", s["messages"][-2]["content"]).group(1)
           for s in generate("arithmetic", 80, seed=2)}
    assert ops == {"+", "-", "*", "plus", "minus", "times"}


_OPS = {"+": int.__add__, "plus": int.__add__, "-": int.__sub__, "minus": int.__sub__,
        "*": int.__mul__, "times": int.__mul__}
_EQUATION = re.compile(r"[\d+\-* ]*\d[\d+\-* ]*(?:=[\d+\-* ]*\d[\d+\-* ]*)+")


@pytest.mark.parametrize("task", ["arithmetic", "addition"])
def test_arithmetic_answers_and_every_trace_step_are_correct(task):
    samples = generate(task, 300, seed=5, think_fraction=1.0)
    if task == "addition":  # two-digit operands, + and - only
        operands = [re.findall(r"\d+", s["messages"][-2]["content"]) for s in samples]
        assert all(10 <= int(x) <= 99 for pair in operands for x in pair)
        assert not any("*" in s["messages"][-2]["content"] or "times" in s["messages"][-2]["content"]
                       for s in samples)
    for s in samples:
        a, op, b = re.search(r"(\d+) ([-+*]|plus|minus|times) (\d+)", s["messages"][-2]["content"]).groups()
        expected = _OPS[op](int(a), int(b))
        assert expected >= 0 and 10 <= int(a) <= 999 and 2 <= int(b) <= 999
        assert s["messages"][-1]["content"] == s["check"]["answer"] == str(expected)
        reasoning = s["messages"][-1]["reasoning_content"]
        assert reasoning.splitlines()[-1].endswith(f"= {expected}")
        # Every "x = y = z" chain in the column trace holds (the tests' own arithmetic).
        chains = _EQUATION.findall(reasoning)
        assert chains
        for chain in chains:
            values = {eval(part, {"__builtins__": {}}) for part in chain.split("=")}  # digits/ops only
            assert len(values) == 1, (chain, reasoning)
        # The digits written in an addition trace spell the answer.
        if "write" in reasoning:
            digits = re.findall(r"write (?:the carry )?(\d)", reasoning)
            assert "".join(reversed(digits)) == str(expected)


@pytest.mark.parametrize("fraction", [0.0, 0.5, 1.0])
def test_reasoning_present_iff_thinking_and_flags_agree(fraction):
    samples = generate("all", 210, seed=7, think_fraction=fraction)
    placements, switched = set(), 0
    for s in samples:
        enable = s["chat_template_kwargs"]["enable_thinking"]
        modes = _turn_modes(s)
        assert modes[-1] == enable, s  # a flag never contradicts enable_thinking
        for mode, m in zip(modes, [m for m in s["messages"] if m["role"] == "assistant"]):
            assert ("reasoning_content" in m) == mode, s
            if mode:
                assert m["reasoning_content"].strip()
        flags = [_flag(m["content"]) for m in s["messages"] if m["role"] != "assistant"]
        assert all(f in (None, enable) for f in flags[-1:]), s
        if s["task"] == "multiturn":
            assert all(f is not None for f, m in zip(flags, s["messages"]) if m["role"] == "user")
            switched += len(set(modes)) > 1
        else:
            roles = [m["role"] for m in s["messages"] if _flag(m["content"]) is not None]
            placements.add(roles[0] if roles else "kwargs")
    share = sum(s["chat_template_kwargs"]["enable_thinking"] for s in samples) / len(samples)
    if fraction in (0.0, 1.0):
        assert share == fraction and switched == 0
    else:
        assert 0.35 < share < 0.65
        assert switched == sum(s["task"] == "multiturn" for s in samples)
    assert placements == {"kwargs", "system", "user"}


def test_thinking_honoured():
    assert thinking_honoured("<think>\n7 + 5 = 12\n</think>\n12", True)
    assert thinking_honoured("7 + 5 = 12\n</think>\n12", True)  # template pre-filled <think>
    assert not thinking_honoured("<think>\n\n</think>\n12", True)
    assert not thinking_honoured("12", True)
    assert not thinking_honoured("<think>\n7 + 5 = 12", True)  # never closed
    assert thinking_honoured("12", False)
    assert thinking_honoured("<think>\n\n</think>\n\n12", False)
    assert not thinking_honoured("<think>7 + 5 = 12</think>12", False)
    assert not thinking_honoured("<think>7 + 5", False)


def test_check_response_edge_cases():
    exact = {"type": "exact", "answer": "579"}
    assert check_response(exact, "  579.\n")
    assert check_response(exact, "Answer: 579")
    assert check_response(exact, "<think>347 + 232</think>\n579")
    assert not check_response(exact, "5790")
    assert not check_response(exact, "<think>579")  # unclosed reasoning: no answer
    assert not check_response(exact, "579\nor maybe 580")
    assert check_response({"type": "exact", "answer": "wine moon"}, "wine  moon")
    assert not check_response({"type": "uppercase"}, "123")
    assert check_response({"type": "ends_with", "suffix": "farewell"}, "wave and ship, farewell.")
    assert not check_response({"type": "ends_with", "suffix": "Arr!"}, "hello Arr")
    assert check_response({"type": "contains", "text": "12"}, "Arr! 12")
    assert not check_response({"type": "contains", "text": "12"}, "Arr! 123")
    assert not check_response({"type": "contains", "text": "12"}, "Arr! 512")
    keys = {"type": "json_keys", "keys": ["name", "age"]}
    assert check_response(keys, '```json\n{"age": 3, "name": "tom"}\n```')
    assert not check_response(keys, '{"name": "tom", "age": 3, "city": "rome"}')
    assert not check_response(keys, '{"name": "tom", "age": 3')
    assert not check_response(keys, '["name", "age"]')
    assert strip_thinking("<think>a</think>b") == "b"
    with pytest.raises(SmolforgeError, match="unknown check type 'nope'"):
        check_response({"type": "nope"}, "x")
    with pytest.raises(SmolforgeError, match="lacks field 'answer'"):
        check_response({"type": "exact"}, "x")


def test_cli_writes_jsonl_round_trip(tmp_path, capsys):
    out = tmp_path / "sub" / "synth.jsonl"
    args = ["data", "synth", "--task", "all", "--n", "40", "--seed", "9", "--think-fraction", "0.3",
            "--out", str(out)]
    assert main(args) == 0
    lines = out.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == generate("all", 40, seed=9, think_fraction=0.3)
    assert sorted(p.name for p in out.parent.iterdir()) == ["synth.jsonl"]  # no temp file left
    printed = capsys.readouterr().out
    assert "wrote 40 samples" in printed
    assert all(f"  {t}: 5" in printed for t in TASKS)
    assert main(args) == 2  # refuses to replace without --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite", "--n", "3"]) == 0
    assert len(out.read_text().splitlines()) == 3


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--task", "poetry", "arithmetic, addition, reverse, sort, count, format, persona, multiturn, all"),
    ("--think-fraction", "1.5", "between 0 and 1"),
    ("--n", "0", "at least 1"),
])
def test_cli_bad_arguments_exit_2(tmp_path, capsys, flag, value, message):
    out = tmp_path / "x.jsonl"
    assert main(["data", "synth", "--out", str(out), "--n", "5", flag, value]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_generate_bad_arguments():
    with pytest.raises(SmolforgeError, match="persona, multiturn, all"):
        generate("poetry", 3, seed=0)
    with pytest.raises(SmolforgeError, match=">= 0"):
        generate("sort", -1, seed=0)
    assert generate("sort", 0, seed=0) == []
