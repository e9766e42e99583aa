"""ThinkFollow and smoltasks: scoring on scripted replies with known answers, a tiny model end to
end, and clear errors for bad task files."""

from __future__ import annotations

import json

import pytest
import torch

from smolforge.chat.render import load_template, render_messages
from smolforge.engine import Completion, Engine
from smolforge.errors import SmolforgeError
from smolforge.eval import core, smol_tasks, thinkfollow
from smolforge.eval.core import EvalContext
from smolforge.model import Transformer, debug
from smolforge.tokenizer import Tokenizer

THINK_REPLY = "<think>\nstep one\n</think>\nthe answer"


@pytest.fixture(scope="module")
def chat_tokenizer(synth_tokenizer) -> Tokenizer:
    return Tokenizer(synth_tokenizer.backend, chat_template=load_template("smollm3"))


@pytest.fixture(scope="module")
def tiny_model(chat_tokenizer) -> Transformer:
    torch.manual_seed(0)
    return Transformer(debug().model_copy(update={"vocab_size": chat_tokenizer.vocab_size})).eval()


class ScriptedEngine:
    """Stands in for `Engine`: answers each rendered prompt with `reply(prompt_text)`."""

    def __init__(self, tokenizer: Tokenizer, reply, max_seq_len: int = 4096) -> None:
        self.tokenizer, self.reply = tokenizer, reply
        self.model = type("M", (), {"config": debug().model_copy(update={"max_seq_len": max_seq_len})})()
        self.calls: list[int] = []  # prompts per generate call

    def generate(self, prompts, params):
        self.calls.append(len(prompts))
        texts = [self.reply(self.tokenizer.decode(p)) for p in prompts]
        return [Completion(list(p), self.tokenizer.encode(t), t, "stop") for p, t in zip(prompts, texts)]


def context(task, engine, tokenizer, tmp_path, **kwargs) -> EvalContext:
    return EvalContext(task=task, model=engine.model, tokenizer=tokenizer, engine=engine,
                       checkpoint=tmp_path / "ckpt", out_dir=tmp_path / "out", **kwargs)


def thinks_only_first_turn(prompt: str) -> str:
    """The playbook's failure mode: reasoning on the first turn only, whatever is asked."""
    return THINK_REPLY if prompt.count("<|im_start|>user") == 1 else "the answer"


# --- thinkfollow -----------------------------------------------------------------------------------


def test_flags_are_kept_replaced_or_drawn():
    assert thinkfollow.flag_of("add 2 /think") is True and thinkfollow.flag_of("x /no_think ") is False
    assert thinkfollow.flag_of("no flag") is None
    assert thinkfollow.with_flag("sum /think", False) == "sum /no_think"
    conversations = [thinkfollow.Conversation(["a /no_think", "b", "c /think"])] * 50
    plan = thinkfollow.plan_modes(conversations, seed=3)
    assert plan == thinkfollow.plan_modes(conversations, seed=3)  # deterministic
    assert all(modes[0] is False and modes[2] is True for modes in plan)
    assert {modes[1] for modes in plan} == {True, False}  # the unflagged turn is drawn at random


def test_score_counts_turns_modes_and_whole_conversations():
    def rec(turn, mode, ok):
        return {"turn": turn, "mode": mode, "honoured": ok}

    records = [[rec(1, "think", True), rec(2, "no_think", True)],
               [rec(1, "no_think", True), rec(2, "think", False)],
               [rec(1, "think", False)]]  # cut short by the context: no conversation metric
    metrics = thinkfollow.score(records, [2, 2, 2])
    assert list(metrics)[0] == "turn_accuracy"
    assert metrics["turn_accuracy"] == pytest.approx(3 / 5)
    assert metrics["think_accuracy"] == pytest.approx(1 / 3)
    assert metrics["no_think_accuracy"] == 1.0
    assert metrics["conversation_accuracy"] == 0.5
    assert metrics["turn_1_accuracy"] == pytest.approx(2 / 3) and metrics["turn_2_accuracy"] == 0.5


def test_scripted_model_that_thinks_only_on_turn_one(chat_tokenizer, tmp_path):
    engine = ScriptedEngine(chat_tokenizer, thinks_only_first_turn)
    ctx = context("thinkfollow", engine, chat_tokenizer, tmp_path, options={"conversations": 30}, batch_size=64)
    result = thinkfollow.run(ctx)
    assert engine.calls == [30, 30, 30]  # turn t of every conversation in one batched call
    turns = {t: [s for s in result.samples if s["turn"] == t] for t in (1, 2, 3)}
    # Known answers: turn 1 is right only when /think was asked, later turns only for /no_think.
    expected_1 = sum(s["mode"] == "think" for s in turns[1]) / 30
    expected_later = sum(s["mode"] == "no_think" for t in (2, 3) for s in turns[t]) / 60
    assert result.metrics["turn_1_accuracy"] == pytest.approx(expected_1)
    assert (result.metrics["turn_2_accuracy"] + result.metrics["turn_3_accuracy"]) / 2 == pytest.approx(expected_later)
    think = [s for s in result.samples if s["mode"] == "think"]
    assert result.metrics["think_accuracy"] == pytest.approx(sum(s["turn"] == 1 for s in think) / len(think))
    assert result.metrics["think_accuracy"] < result.metrics["no_think_accuracy"]
    assert result.n == 90 and len(result.samples) == 90
    # The history holds the answers without their reasoning, and the asked flag ends each turn.
    assert all(s["prompt"].endswith(("/think", "/no_think")) for s in result.samples)


def test_history_carries_answers_without_reasoning(chat_tokenizer, tmp_path):
    seen = []

    def always_think(prompt: str) -> str:
        seen.append(prompt)
        return THINK_REPLY

    engine = ScriptedEngine(chat_tokenizer, always_think)
    conversations = [thinkfollow.Conversation(["first /think", "second /think"])]
    records = thinkfollow.follow(engine, chat_tokenizer.chat_template, conversations, [[True, True]],
                                 core.draw_params(chat_tokenizer, 16, 0.0, None), 8)
    assert [r["honoured"] for r in records[0]] == [True, True]
    assert "the answer<|im_end|>" in seen[1] and "step one" not in seen[1]


def test_user_conversations_file_and_bad_files(chat_tokenizer, tmp_path):
    good = tmp_path / "conv.jsonl"
    good.write_text(json.dumps({"turns": ["hello /think", "and now?"], "system": "Be brief."}) + "\n")
    engine = ScriptedEngine(chat_tokenizer, lambda p: THINK_REPLY if "Reasoning Mode: /think" in p else "ok")
    result = thinkfollow.run(context("thinkfollow", engine, chat_tokenizer, tmp_path, options={"data": str(good)}))
    assert result.metrics["turn_accuracy"] == 1.0 and result.samples[0]["mode"] == "think"
    for content, message in [("", "holds no conversations"),
                             ('{"prompt": "x"}\n', "conv.jsonl:1 field 'turns' is missing"),
                             ('{"turns": []}\n', "field 'turns' must be a non-empty list"),
                             ('{"turns": ["ok"]}\n{"turns": ["a", 3]}\n', "conv.jsonl:2 field 'turns[1]'"),
                             ('{"turns": ["/think"]}\n', "field 'turns[0]' must be a non-empty string")]:
        good.write_text(content)
        with pytest.raises(SmolforgeError, match=message.replace("[", r"\[").replace("]", r"\]")):
            thinkfollow.load_conversations(good)


def test_needs_a_chat_template(synth_tokenizer, tiny_model, tmp_path):
    plain = Tokenizer(synth_tokenizer.backend)
    ctx = context("thinkfollow", Engine(tiny_model, plain), plain, tmp_path)
    with pytest.raises(SmolforgeError, match="no chat template"):
        thinkfollow.run(ctx)


def test_tiny_model_end_to_end(chat_tokenizer, tiny_model, tmp_path):
    engine = Engine(tiny_model, chat_tokenizer)
    ctx = context("thinkfollow", engine, chat_tokenizer, tmp_path, limit=4, max_new_tokens=8,
                  options={"turns": 2})
    result = thinkfollow.run(ctx)
    assert 0 <= result.metrics["turn_accuracy"] <= 1 and result.n <= 8
    # Untrained: /no_think turns get the template's empty block, so they pass unless the model
    # opens a block itself; /think turns need a reasoning block the random model never writes.
    by_mode = {m: [s["honoured"] for s in result.samples if s["mode"] == m] for m in ("think", "no_think")}
    assert not any(by_mode["think"])
    twice = thinkfollow.run(ctx)
    assert [s["response"] for s in twice.samples] == [s["response"] for s in result.samples]


# --- smoltasks -------------------------------------------------------------------------------------


def test_smoltasks_scores_known_answers(chat_tokenizer, tmp_path):
    """A scripted model that is right on /think samples only and never thinks."""
    samples = [{"messages": [{"role": "user", "content": f"What is {a} + 1? {flag}"},
                             {"role": "assistant", "content": str(a + 1)}],
                "task": "addition", "check": {"type": "exact", "answer": str(a + 1)}}
               for a, flag in ((1, "/think"), (2, "/think"), (3, "/no_think"), (4, "/no_think"))]
    path = tmp_path / "tasks.jsonl"
    path.write_text("".join(json.dumps(s) + "\n" for s in samples))

    def reply(prompt: str) -> str:
        a = int(prompt.split("What is ")[-1].split(" +")[0])
        return str(a + 1) if "Reasoning Mode: /think" in prompt else "wrong"

    engine = ScriptedEngine(chat_tokenizer, reply)
    result = smol_tasks.run(context("smoltasks", engine, chat_tokenizer, tmp_path, options={"data": str(path)}))
    m = result.metrics
    assert list(m)[0] == "accuracy" and m["accuracy"] == 0.5
    assert m["think_accuracy"] == 1.0 and m["no_think_accuracy"] == 0.0
    assert m["mode_honoured"] == 0.5  # no reasoning at all: only the /no_think replies follow
    assert m["addition_think_accuracy"] == 1.0 and m["addition_accuracy"] == 0.5
    assert [s["correct"] for s in result.samples] == [True, True, False, False]
    # The quickstart rebuilds its per-task table from the samples: the same numbers.
    rebuilt = smol_tasks.report_from_records(result.samples)
    assert rebuilt.metrics() == m and "| addition | 100% (2/2) | 0% (0/2) | 50% |" in rebuilt.table()


def test_smoltasks_avg_at_k_and_pass_at_k(chat_tokenizer, tmp_path):
    replies = iter(["2", "nope", "nope", "nope"])  # draw 0: right on the first sample only
    samples = [{"messages": [{"role": "user", "content": q}], "check": {"type": "exact", "answer": "2"}}
               for q in ("1 + 1?", "2 + 0?")]
    path = tmp_path / "two.jsonl"
    path.write_text("".join(json.dumps(s) + "\n" for s in samples))
    engine = ScriptedEngine(chat_tokenizer, lambda p: next(replies))
    result = smol_tasks.run(context("smoltasks", engine, chat_tokenizer, tmp_path, samples=2,
                                    options={"data": str(path)}))
    assert result.metrics["accuracy"] == 0.25 and result.metrics["pass@2"] == 0.5
    assert result.notes[0].startswith("avg@2") and result.samples[0]["task"] == "two"


def test_smoltasks_generated_end_to_end(chat_tokenizer, tiny_model, tmp_path):
    ctx = context("smoltasks", Engine(tiny_model, chat_tokenizer), chat_tokenizer, tmp_path, limit=6,
                  max_new_tokens=6, options={"tasks": "addition,count"})
    result = smol_tasks.run(ctx)
    assert result.n == 6 and len(result.samples) == 6
    assert {"accuracy", "mode_honoured"} <= set(result.metrics)
    assert {s["task"] for s in result.samples} <= {"addition", "count"}


@pytest.mark.parametrize("content, message", [
    ("", "holds no samples"),
    ('{"check": {"type": "uppercase"}}\n', "bad.jsonl:1 field 'messages' is missing"),
    ('{"messages": [{"role": "user", "content": "hi"}]}\n', "field 'check' is missing"),
    ('{"messages": [{"role": "user", "content": "hi"}], "check": {"type": "rhymes"}}\n', "field 'check' must"),
    ('{"messages": [{"role": "system", "content": "hi"}], "check": {"type": "uppercase"}}\n', "no user turn"),
])
def test_smoltasks_bad_files(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(SmolforgeError, match=message):
        smol_tasks.load_samples(path)


def test_generation_fits_the_context(chat_tokenizer, tiny_model):
    """Replies are cut to fit the context; a prompt that fills it gets no reply, not a crash."""
    limit = tiny_model.config.max_seq_len
    prompts = [[5] * 10, [6] * (limit - 4), [7] * limit]
    params = core.draw_params(chat_tokenizer, 32, 0.0, None)
    params.ignore_eos, params.stop_token_ids = True, []
    short, long, full = core.generate_fitted(Engine(tiny_model, chat_tokenizer), prompts, params, batch_size=1)
    assert len(short.tokens) == 32 and len(long.tokens) == 4 and full is None


def test_conversations_that_outgrow_the_context_stop(chat_tokenizer, tmp_path):
    path = tmp_path / "conv.jsonl"
    path.write_text(json.dumps({"turns": ["hello /no_think", "again /no_think"]}) + "\n")
    first_turn = chat_tokenizer.encode(render_messages(
        chat_tokenizer.chat_template, [{"role": "user", "content": "hello /no_think"}], add_generation_prompt=True))
    engine = ScriptedEngine(chat_tokenizer, lambda p: "a long answer " * 20, max_seq_len=len(first_turn) + 40)
    result = thinkfollow.run(context("thinkfollow", engine, chat_tokenizer, tmp_path, options={"data": str(path)}))
    assert result.n == 1 and result.metrics["turn_accuracy"] == 1.0
    assert "conversation_accuracy" not in result.metrics  # no conversation was scored whole
    assert any("1 of 2 turns not scored" in note for note in result.notes)


def _report(correct: list[bool]) -> smol_tasks.SmolTaskReport:
    return smol_tasks.report_from_records([
        {"index": i, "draw": 0, "task": "addition", "mode": "think", "prompt": "p", "response": "r",
         "correct": ok, "honoured": True} for i, ok in enumerate(correct)])


@pytest.mark.parametrize("before, after, expected", [
    # 6 fixed, 0 broken, 2 unchanged: p = 2 * C(6,0) / 2^6
    ([False] * 6 + [True, False], [True] * 6 + [True, False], (6, 0, 2 / 64)),
    # 3 fixed, 1 broken: p = 2 * (C(4,0) + C(4,1)) / 2^4
    ([False, False, False, True], [True, True, True, False], (3, 1, 10 / 16)),
    ([True, False], [True, False], (0, 0, 1.0)),  # nothing changed
])
def test_paired_change_counts_fixed_and_broken_replies_with_an_exact_mcnemar_p(before, after, expected):
    fixed, broken, p = _report(before).paired_change(_report(after))
    assert (fixed, broken) == expected[:2]
    assert p == pytest.approx(expected[2])


def test_paired_change_refuses_reports_on_different_tasks():
    with pytest.raises(ValueError, match="same tasks"):
        _report([True, False]).paired_change(_report([True]))
