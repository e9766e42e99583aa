"""`smolforge pairs`: on-policy preference pairs graded by checkers (playbook ch. 07)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from smolforge.chat.render import load_template, render_messages
from smolforge.cli import build_parser, main
from smolforge.data.pairs import PairStats, make_pairs, split_reasoning
from smolforge.data.preference import to_pair
from smolforge.data.synth import check_response, generate, thinking_honoured, write_jsonl
from smolforge.engine import Completion, Engine, SamplingParams
from smolforge.errors import SmolforgeError
from smolforge.model import ModelConfig, Transformer, debug
from smolforge.tokenizer import Tokenizer
from smolforge.train.checkpoint import load_model, save_checkpoint

TODAY = {"today": "01 May 2025"}  # the smollm3 system block shows the date: pin it for comparisons
PARAMS = SamplingParams(max_new_tokens=32, temperature=0.8, top_p=0.95)


@pytest.fixture(scope="module")
def tokenizer(synth_tokenizer) -> Tokenizer:
    return synth_tokenizer


@pytest.fixture(scope="module")
def checkpoints(tokenizer, tmp_path_factory) -> dict[str, Path]:
    """A tiny policy with the smollm3 template, and the same model without any template.

    The random model is nudged so that about one sampled token in five is <|im_end|>: with the
    untied head reading one constant hidden dimension, <|im_end|> gets a fixed logit above the
    others (uniform). Its replies are then short garbage that ends, so a `lowercase` check
    passes some and fails others, and real pairs get written.
    """
    root = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**{**debug().model_dump(), "vocab_size": 512, "max_seq_len": 512,
                                       "tie_embeddings": False}))
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 10.0
        model.model.norm.weight.zero_()
        model.model.norm.weight[0] = 1.0
        model.lm_head.weight[:, 0] = 0.0
        model.lm_head.weight[tokenizer.token_to_id("<|im_end|>"), 0] = 0.6
    save_checkpoint(root / "plain", model, tokenizer)
    chat_tokenizer = Tokenizer.load(root / "plain")
    chat_tokenizer.chat_template = load_template("smollm3")
    save_checkpoint(root / "chat", model, chat_tokenizer)
    return {"chat": root / "chat", "plain": root / "plain"}


class FakeEngine:
    """The engine's interface with scripted replies: each prompt is matched by a piece of its
    text, and gets that record's next reply (a str, or (text, finish_reason))."""

    def __init__(self, tokenizer: Tokenizer, script: dict[str, list]) -> None:
        self.tokenizer = tokenizer
        self.script = {key: list(replies) for key, replies in script.items()}
        self.calls: list[tuple[int, SamplingParams]] = []

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        self.calls.append((len(prompts), params))
        out = []
        for ids in prompts:
            text = self.tokenizer.decode(ids)
            key = next(k for k in self.script if k in text)
            reply = self.script[key].pop(0)
            reply, reason = reply if isinstance(reply, tuple) else (reply, "stop")
            out.append(Completion(list(ids), self.tokenizer.encode(reply), reply, reason))
        return out


def user(text: str, think: bool = False, check: dict | None = None, **extra) -> dict:
    return {"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": "reference"}],
            "chat_template_kwargs": {"enable_thinking": think, **TODAY},
            "check": check or {"type": "exact", "answer": "5"}, **extra}


RECORDS = [
    user("What is 2 + 3?", task="addition"),                                  # mixed
    user("Say hi in capitals.", check={"type": "uppercase"}),                 # all pass
    user("What is 1 + 4?"),                                                   # all fail
    user("What is 3 + 4?", think=True, check={"type": "exact", "answer": "7"}),  # think mode
    {"prompt": "What is 0 + 5?", "chat_template_kwargs": {"enable_thinking": False, **TODAY},
     "check": {"type": "exact", "answer": "5"}},                              # truncation + no_think
]
SCRIPT = {
    "2 + 3": ["4", "5", "6", "5."],
    "capitals": ["HI", "HELLO", "HI THERE", "HEY"],
    "1 + 4": ["4", "6", "7", "nine"],
    # no reasoning / empty reasoning / unclosed reasoning fail the think mode, even with the answer
    "3 + 4": ["7", "<think>\n\n</think>\n7", ("<think>\n3 + 4", "length"), "<think>\n3 + 4 = 7\n</think>\n7"],
    # cut off although the text passes; reasoning in no_think mode fails although the answer is right
    "0 + 5": [("The sum is\n5", "length"), "<think>\nx\n</think>\n5", "5", "4"],
}


def run_fake(tokenizer: Tokenizer, records: list[dict] = RECORDS, seed: int = 0, batch_size: int = 32,
             n: int = 4) -> tuple[list[dict], PairStats, FakeEngine]:
    engine = FakeEngine(tokenizer, SCRIPT)
    pairs, stats = make_pairs(engine, load_template("smollm3"), records, n, PARAMS, seed, batch_size=batch_size)
    return pairs, stats, engine


def test_pairs_pick_the_first_passing_and_first_failing_response(tokenizer):
    pairs, stats, engine = run_fake(tokenizer)
    assert (stats.prompts, stats.pairs, stats.all_passed, stats.all_failed) == (5, 3, 1, 1)
    assert (stats.responses, stats.passed, stats.truncated) == (20, 2 + 4 + 0 + 1 + 1, 2)
    assert stats.pass_rate == pytest.approx(8 / 20)
    by_question = {p["prompt"][-1]["content"]: p for p in pairs}
    assert list(by_question) == ["What is 2 + 3?", "What is 3 + 4?", "What is 0 + 5?"]  # input order
    first = by_question["What is 2 + 3?"]
    assert first["prompt"] == [{"role": "user", "content": "What is 2 + 3?"}]  # the reference is dropped
    assert first["chosen"] == [{"role": "assistant", "content": "5"}]
    assert first["rejected"] == [{"role": "assistant", "content": "4"}]
    assert first["task"] == "addition" and first["check"] == {"type": "exact", "answer": "5"}
    assert first["chat_template_kwargs"]["enable_thinking"] is False
    think = by_question["What is 3 + 4?"]
    assert think["chosen"] == [{"role": "assistant", "content": "7", "reasoning_content": "3 + 4 = 7"}]
    assert think["rejected"] == [{"role": "assistant", "content": "7"}]  # right answer, no reasoning
    no_think = by_question["What is 0 + 5?"]
    assert no_think["chosen"] == [{"role": "assistant", "content": "5"}]  # the third: 1st cut off, 2nd thinks
    assert no_think["rejected"] == [{"role": "assistant", "content": "The sum is\n5"}]  # the cut-off one
    # every prompt's n responses are sampled in one call, stopping at <|im_end|>, as configured
    assert [size for size, _ in engine.calls] == [20]
    params = engine.calls[0][1]
    assert params.stop_token_ids == [tokenizer.token_to_id("<|im_end|>")]
    assert (params.temperature, params.top_p, params.max_new_tokens) == (0.8, 0.95, 32)


def test_the_summary_reports_every_count(tokenizer):
    _, stats, _ = run_fake(tokenizer)
    text = stats.summary("out.jsonl", 4)
    assert "5 prompts x 4 responses" in text and "pairs written  3 -> out.jsonl" in text
    assert "all passed     1 (skipped)" in text and "all failed     1 (skipped)" in text
    assert "40.0% (8/20 responses; 2 cut off at max_new_tokens)" in text


def test_sampling_is_seeded_per_batch_and_repeatable(tokenizer):
    pairs_a, _, engine_a = run_fake(tokenizer, seed=3, batch_size=8)
    pairs_b, _, engine_b = run_fake(tokenizer, seed=3, batch_size=8)
    _, _, engine_c = run_fake(tokenizer, seed=4, batch_size=8)
    seeds = [params.seed for _, params in engine_a.calls]
    assert [size for size, _ in engine_a.calls] == [8, 8, 4]  # 2 prompts x 4 responses per call
    assert pairs_a == pairs_b and seeds == [params.seed for _, params in engine_b.calls]
    assert len(set(seeds)) == 3 and all(isinstance(s, int) for s in seeds)  # batches draw differently
    assert not set(seeds) & {params.seed for _, params in engine_c.calls}  # another seed, other draws


@pytest.mark.parametrize("think, reply", [
    (True, "<think>\nfirst 3 + 4\nthen = 7\n</think>\nThe answer is 7."),
    (False, "The answer is 7."),
])
def test_a_split_reply_renders_back_as_it_was_sampled(think, reply):
    template = load_template("smollm3")
    prompt = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 3 + 4?"}]
    kwargs = {"enable_thinking": think, **TODAY}
    sampled = render_messages(template, prompt, add_generation_prompt=True, **kwargs) + reply + "<|im_end|>\n"
    message = split_reasoning(reply)
    assert ("reasoning_content" in message) is think
    assert render_messages(template, prompt + [message], **kwargs) == sampled


def test_a_template_without_reasoning_keeps_the_reply_whole(tokenizer):
    engine = FakeEngine(tokenizer, {"3 + 4": ["<think>\nx\n</think>\n8", "<think>\ny\n</think>\n7"]})
    record = user("What is 3 + 4?", think=True, check={"type": "exact", "answer": "7"})
    pairs, stats = make_pairs(engine, load_template("chatml"), [record], 2, PARAMS, 0)
    assert stats.pairs == 1  # chatml has no reasoning modes: the checker alone grades
    assert pairs[0]["chosen"] == [{"role": "assistant", "content": "<think>\ny\n</think>\n7"}]
    assert pairs[0]["rejected"] == [{"role": "assistant", "content": "<think>\nx\n</think>\n8"}]


def test_written_pairs_render_back_as_sampled(tokenizer):
    pairs, _, _ = run_fake(tokenizer)
    template = load_template("smollm3")
    think = next(p for p in pairs if p["chat_template_kwargs"]["enable_thinking"])
    prompt = render_messages(template, think["prompt"], add_generation_prompt=True, **think["chat_template_kwargs"])
    whole = render_messages(template, think["prompt"] + think["chosen"], **think["chat_template_kwargs"])
    assert whole == prompt + "<think>\n3 + 4 = 7\n</think>\n7<|im_end|>\n"


def test_bad_requests_are_refused(tokenizer):
    template = load_template("smollm3")
    engine = FakeEngine(tokenizer, SCRIPT)
    with pytest.raises(SmolforgeError, match="at least 2"):
        make_pairs(engine, template, RECORDS, 1, PARAMS, 0)
    with pytest.raises(SmolforgeError, match="temperature 0"):
        make_pairs(engine, template, RECORDS, 4, SamplingParams(temperature=0), 0)
    with pytest.raises(SmolforgeError, match=r"record 1 field 'check': unknown check type 'nope'"):
        make_pairs(engine, template, [RECORDS[0], {**RECORDS[0], "check": {"type": "nope"}}], 4, PARAMS, 0)
    with pytest.raises(SmolforgeError, match=r"record 0 field 'check': missing.*reward-model"):
        make_pairs(engine, template, [{"prompt": "hi"}], 4, PARAMS, 0)
    assert engine.calls == []  # refused before sampling anything


# --- the command, end to end with the real tiny model --------------------------------------------


def prompts_file(path: Path) -> Path:
    """Lowercase requests that the nudged model sometimes satisfies, plus synth tasks it fails."""
    records = [{"prompt": f"Name {w} things, in lowercase.", "check": {"type": "lowercase"},
                "chat_template_kwargs": {"enable_thinking": False}, "task": "lower"}
               for w in ("two", "three", "four", "five", "six", "seven", "some", "many", "few", "all")]
    records += generate("addition", 4, seed=3)  # exact sums: random replies never hit them
    for record in records:
        record["chat_template_kwargs"].update(TODAY)
    write_jsonl(records, path)
    return path


def read_summary(out: str) -> dict[str, int]:
    numbers = {
        "prompts": r"pairs: (\d+) prompts x (\d+) responses",
        "pairs": r"pairs written\s+(\d+) ->",
        "all_passed": r"all passed\s+(\d+) \(skipped\)",
        "all_failed": r"all failed\s+(\d+) \(skipped\)",
        "passed": r"pass rate\s+[\d.]+% \((\d+)/\d+ responses",
        "responses": r"pass rate\s+[\d.]+% \(\d+/(\d+) responses",
    }
    return {key: int(re.search(pattern, out).group(1)) for key, pattern in numbers.items()}


def test_the_command_writes_pairs_consistent_with_its_summary(checkpoints, tmp_path, capsys):
    prompts, out = prompts_file(tmp_path / "prompts.jsonl"), tmp_path / "pairs.jsonl"
    args = ["pairs", str(checkpoints["chat"]), "--prompts", str(prompts), "--n", "4", "--out", str(out),
            "--max-new-tokens", "16", "--batch-size", "8", "--seed", "1", "--device", "cpu"]
    assert main(args) == 0
    summary = read_summary(capsys.readouterr().out)
    lines = out.read_text().splitlines()
    assert summary["prompts"] == 14 and summary["responses"] == 14 * 4
    assert summary["pairs"] + summary["all_passed"] + summary["all_failed"] == 14
    assert summary["pairs"] == len(lines) >= 1 and summary["all_failed"] >= 4  # synth tasks all fail
    written = [json.loads(line) for line in lines]
    for i, record in enumerate(written):
        pair = to_pair(record, f"{out}:{i + 1}")  # what `smolforge dpo` reads
        assert pair.prompt[-1]["role"] == "user" and len(pair.chosen) == len(pair.rejected) == 1

    # The same run from Python, with the real engine's replies recorded, writes the same pairs, and
    # each pair holds the first passing and first failing reply, graded here independently.
    model, tokenizer = load_model(checkpoints["chat"])
    engine, replies = Engine(model, tokenizer), []
    real_generate = engine.generate

    def recording_generate(ids: list[list[int]], params: SamplingParams) -> list[Completion]:
        done = real_generate(ids, params)
        replies.extend(done)
        return done

    engine.generate = recording_generate
    records = [json.loads(line) for line in prompts.read_text().splitlines()]
    params = SamplingParams(max_new_tokens=16, temperature=0.8, top_p=0.95)
    pairs, stats = make_pairs(engine, tokenizer.chat_template, records, 4, params, 1, batch_size=8)
    assert pairs == written and stats.passed == summary["passed"]
    expected = []
    for k, record in enumerate(records):
        think = record["chat_template_kwargs"]["enable_thinking"]
        group = replies[4 * k:4 * k + 4]
        grades = [c.finish_reason == "stop" and thinking_honoured(c.text, think)
                  and check_response(record["check"], c.text) for c in group]
        if any(grades) and not all(grades):
            expected.append((split_reasoning(group[grades.index(True)].text),
                             split_reasoning(group[grades.index(False)].text)))
    assert [(p["chosen"][0], p["rejected"][0]) for p in written] == expected


def test_a_record_without_check_names_its_line(checkpoints, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    write_jsonl([{"prompt": "hi", "check": {"type": "lowercase"}}, {"prompt": "hello"}], prompts)
    code = main(["pairs", str(checkpoints["chat"]), "--prompts", str(prompts), "--out", str(tmp_path / "o.jsonl")])
    err = capsys.readouterr().err
    assert code == 2 and f"{prompts}:2 field 'check': missing" in err and "reward-model" in err
    assert not (tmp_path / "o.jsonl").exists()


def test_a_checkpoint_without_chat_template_is_refused(checkpoints, tmp_path, capsys):
    prompts = prompts_file(tmp_path / "prompts.jsonl")
    code = main(["pairs", str(checkpoints["plain"]), "--prompts", str(prompts), "--out", str(tmp_path / "o.jsonl")])
    assert code == 2 and "has no chat template" in capsys.readouterr().err


def test_an_existing_output_needs_overwrite(checkpoints, tmp_path, capsys):
    prompts, out = prompts_file(tmp_path / "prompts.jsonl"), tmp_path / "pairs.jsonl"
    out.write_text("keep me\n")
    args = ["pairs", str(checkpoints["chat"]), "--prompts", str(prompts), "--out", str(out),
            "--max-new-tokens", "8", "--device", "cpu"]
    assert main(args) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err and out.read_text() == "keep me\n"
    assert main([*args, "--overwrite"]) == 0
    assert out.read_text() != "keep me\n" and not list(tmp_path.glob(".pairs.jsonl.tmp*"))


def test_every_option_is_documented():
    subparsers = next(a for a in build_parser()._actions if a.dest == "command")
    parser = subparsers.choices["pairs"]
    assert all(a.help for a in parser._actions if a.option_strings)
    assert "reward-model" in parser.description
