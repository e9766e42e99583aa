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


# --- scored by rewards (--reward): GRPO's registry grades, chosen = best, rejected = worst ----------


def ifeval_user(text: str, *ids: str, **extra) -> dict:
    return {"prompt": text, "chat_template_kwargs": {"enable_thinking": False, **TODAY},
            "constraints": [{"id": i} for i in ids], **extra}


IFEVAL_RECORDS = [
    ifeval_user("Greet the world.", "change_case:english_lowercase", "punctuation:no_comma", task="greet"),
    ifeval_user("Name the moon.", "change_case:english_lowercase"),
    ifeval_user("Say ok.", "change_case:english_lowercase"),                  # all comply: a tie
    {"prompt": "Cut off twice.", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}],
     "chat_template_kwargs": {"enable_thinking": False, **TODAY}},           # an IFEval row, as read by grpo
]
IFEVAL_SCRIPT = {
    # scores 0.5, 1, 0, 1: the first of the best and the worst
    "Greet": ["hello, world", "hello world", "Hello, World", "hello there"],
    # the compliant cut-off reply is never chosen and is the rejected one, whatever its score
    "moon": ["The Moon", ("the moon", "length"), "the moon is round", "The moon"],
    "Say ok": ["ok then", "okay then", "sure, ok then", "ok then friend"],
    "twice": [("a, b", "length"), ("a b", "length"), "a b", "a, b"],
}


def run_scored(tokenizer: Tokenizer, specs: list, records: list[dict], script: dict, **kwargs):
    from smolforge.train.rewards import build_rewards

    engine = FakeEngine(tokenizer, script)
    rewards = build_rewards(specs, section="--reward")
    pairs, stats = make_pairs(engine, load_template("smollm3"), records, 4, PARAMS, 0, rewards=rewards, **kwargs)
    return pairs, stats, engine


def test_ifeval_reward_picks_the_best_reply_and_ranks_cut_off_replies_lowest(tokenizer):
    pairs, stats, engine = run_scored(tokenizer, [{"name": "ifeval"}], IFEVAL_RECORDS, IFEVAL_SCRIPT)
    assert [size for size, _ in engine.calls] == [16]  # sampling is as without rewards
    by_prompt = {p["prompt"][-1]["content"]: p for p in pairs}
    assert list(by_prompt) == ["Greet the world.", "Name the moon.", "Cut off twice."]
    greet = by_prompt["Greet the world."]
    assert greet["chosen"] == [{"role": "assistant", "content": "hello world"}]
    assert greet["rejected"] == [{"role": "assistant", "content": "Hello, World"}]
    assert (greet["chosen_score"], greet["rejected_score"], greet["rejected_truncated"]) == (1.0, 0.0, False)
    assert greet["constraints"] == IFEVAL_RECORDS[0]["constraints"] and greet["task"] == "greet"
    assert "check" not in greet  # the record fields the rewards read, not a checker
    moon = by_prompt["Name the moon."]
    assert moon["chosen"] == [{"role": "assistant", "content": "the moon is round"}]
    assert moon["rejected"] == [{"role": "assistant", "content": "the moon"}]  # cut off, though compliant
    assert (moon["chosen_score"], moon["rejected_score"], moon["rejected_truncated"]) == (1.0, 1.0, True)
    twice = by_prompt["Cut off twice."]
    assert twice["constraints"] == [{"id": "punctuation:no_comma", "kwargs": {}}]  # the IFEval row's
    assert twice["chosen"][0]["content"] == "a b" and twice["rejected"][0]["content"] == "a, b"  # worst cut-off
    assert twice["rejected_score"] == 0.0 and twice["rejected_truncated"]
    assert (stats.prompts, stats.pairs, stats.ties, stats.all_cut_off) == (4, 3, 1, 0)
    assert (stats.responses, stats.truncated) == (16, 3)
    assert stats.margin_pairs == 1 and stats.mean_margin == 1.0  # only greet compares two complete replies
    assert stats.mean_score == pytest.approx((2.5 + 1 + 4 + 1) / 13)  # the 13 complete replies
    text = stats.summary("out.jsonl", 4)
    assert "4 prompts x 4 responses, scored by 1 x ifeval" in text and "pairs written  3 -> out.jsonl" in text
    assert "ties           1 (skipped" in text and "all cut off    0 (skipped)" in text
    assert "mean margin    1 (chosen - rejected score, 1 pairs; 2 more reject a reply cut off" in text
    for i, pair in enumerate(pairs):
        to_pair(pair, f"pairs.jsonl:{i + 1}")  # what `smolforge dpo` reads


def test_weighted_rewards_combine_and_min_margin_skips_narrow_pairs(tokenizer):
    specs = [{"name": "ifeval"}, {"name": "contains", "text": "world", "weight": 0.25}]
    records, script = IFEVAL_RECORDS[:1], {"Greet": ["hello, world", "hello world", "Hello, World", "hello there"]}
    pairs, stats, _ = run_scored(tokenizer, specs, records, script)
    # totals 0.75, 1.25, 0, 1: the contains reward ("World" is not "world") breaks the tie of replies 2 and 4
    assert pairs[0]["chosen"][0]["content"] == "hello world" and pairs[0]["rejected"][0]["content"] == "Hello, World"
    assert pairs[0]["chosen_score"] == 1.25 and pairs[0]["rejected_score"] == 0.0
    assert stats.scored_by == "1 x ifeval + 0.25 x contains" and stats.mean_margin == 1.25
    _, stats = run_scored(tokenizer, specs, records, script, min_margin=1.25)[:2]
    assert stats.pairs == 1  # a margin of exactly min_margin is enough
    pairs, stats = run_scored(tokenizer, specs, records, script, min_margin=1.3)[:2]
    assert pairs == [] and stats.ties == 1
    # every reply cut off: nothing can be chosen
    cut = {"Greet": [("hello world", "length")] * 4}
    pairs, stats = run_scored(tokenizer, specs, records, cut)[:2]
    assert pairs == [] and stats.all_cut_off == 1 and stats.truncated == 4


def test_checker_pairs_carry_no_scores(tokenizer):
    pairs, stats, _ = run_fake(tokenizer)
    assert {key for p in pairs for key in p} == {"prompt", "chosen", "rejected", "chat_template_kwargs", "check", "task"}
    assert stats.scored_by == "" and "scored by" not in stats.summary()


def test_reward_fields_are_checked_before_sampling(tokenizer):
    from smolforge.train.rewards import build_rewards

    engine, template = FakeEngine(tokenizer, IFEVAL_SCRIPT), load_template("smollm3")
    ifeval = build_rewards([{"name": "ifeval"}])
    with pytest.raises(SmolforgeError, match=r"record 1 field 'constraints': missing; the 'ifeval' reward"):
        make_pairs(engine, template, [IFEVAL_RECORDS[0], {"prompt": "hi"}], 4, PARAMS, 0, rewards=ifeval)
    bad = {**IFEVAL_RECORDS[0], "constraints": [{"id": "nope"}]}
    with pytest.raises(SmolforgeError, match=r"record 0 field 'constraints\[0\].id': unknown instruction 'nope'"):
        make_pairs(engine, template, [bad], 4, PARAMS, 0, rewards=ifeval)
    gsm8k = build_rewards([{"name": "gsm8k"}])
    with pytest.raises(SmolforgeError, match=r"record 0 field 'answer': missing; the 'gsm8k' reward"):
        make_pairs(engine, template, IFEVAL_RECORDS[:1], 4, PARAMS, 0, rewards=gsm8k)
    with pytest.raises(SmolforgeError, match="--min-margin must be a finite number >= 0"):
        make_pairs(engine, template, IFEVAL_RECORDS[:1], 4, PARAMS, 0, rewards=ifeval, min_margin=-1.0)
    assert engine.calls == []


def test_reward_specs_from_the_command_line():
    from smolforge.data.pairs import parse_reward_specs

    assert parse_reward_specs(["smol_task", "{name: ifeval, weight: 2, aggregate: all}"]) == [
        {"name": "smol_task"}, {"name": "ifeval", "weight": 2, "aggregate": "all"}]
    assert parse_reward_specs(["[gsm8k, {name: think_format, weight: 0.5}]"]) == [
        {"name": "gsm8k"}, {"name": "think_format", "weight": 0.5}]
    with pytest.raises(SmolforgeError, match=r"--reward\[1\].name: missing"):
        parse_reward_specs(["ifeval", "{weight: 1}"])
    with pytest.raises(SmolforgeError, match=r"--reward\[0\]: expected a reward name"):
        parse_reward_specs(["[3]"])
    with pytest.raises(SmolforgeError, match="not valid YAML"):
        parse_reward_specs(["{name: ifeval"])


# --- a reward model scores the replies ---------------------------------------------------------------


@pytest.fixture(scope="module")
def reward_model_dir(tokenizer, tmp_path_factory) -> Path:
    """A tiny random reward model (as `smolforge reward` saves one), its head widened so that
    different replies get clearly different scores."""
    from smolforge.train.reward import RewardModel, save_reward_model

    torch.manual_seed(1)
    root = tmp_path_factory.mktemp("rm")
    tokenizer.save(root / "tok")
    chat_tokenizer = Tokenizer.load(root / "tok")  # a copy: the module's tokenizer keeps no template
    chat_tokenizer.chat_template = load_template("chatml")
    rm = RewardModel(ModelConfig(**{**debug().model_dump(), "vocab_size": 512, "max_seq_len": 512}),
                     pad_id=tokenizer.token_to_id("<|im_end|>"))
    with torch.no_grad():
        rm.score.weight.normal_()
    return save_reward_model(root / "rm", rm, chat_tokenizer)


def reward_model_scores(path: Path, prompts: list[list[dict]], replies: list[str], kwargs: list[dict]) -> list[float]:
    """The reward model's scores, computed directly (as `smolforge score` does)."""
    from smolforge.train.reward import load_reward_model, score_records

    model, tok = load_reward_model(path)
    records = [{"messages": p, "response": [split_reasoning(r, tok.chat_template)], "chat_template_kwargs": k}
               for p, r, k in zip(prompts, replies, kwargs)]
    return score_records(model, tok, tok.chat_template, records)


RM_SCRIPT = {
    "2 + 3": ["5", "five", "4", "The sum of two and three is 5."],
    "capitals": ["HI", ("HI THERE, HOW ARE YOU", "length"), "hello", "Hey!"],
    "1 + 4": ["5", "5", "5", "5"],  # the same reply four times: a tie
}


def test_reward_model_ranks_the_replies(tokenizer, reward_model_dir):
    records = RECORDS[:3]
    pairs, stats, _ = run_scored(tokenizer, [{"name": "reward_model", "path": str(reward_model_dir),
                                              "batch_size": 3}], records, RM_SCRIPT)
    expected = {}
    for record, key in zip(records, RM_SCRIPT):
        texts = [r if isinstance(r, str) else r[0] for r in RM_SCRIPT[key]]
        prompt = record["messages"][:-1]
        scores = reward_model_scores(reward_model_dir, [prompt] * 4, texts, [record["chat_template_kwargs"]] * 4)
        expected[prompt[-1]["content"]] = (texts, scores)
    assert len(set(expected["What is 2 + 3?"][1])) == 4  # the replies are told apart
    assert (stats.prompts, stats.pairs, stats.ties, stats.truncated) == (3, 2, 1, 1)
    for pair in pairs:
        texts, scores = expected[pair["prompt"][-1]["content"]]
        chosen, rejected = pair["chosen"][0]["content"], pair["rejected"][0]["content"]
        assert pair["chosen_score"] == pytest.approx(scores[texts.index(chosen)], abs=1e-5)
        assert pair["rejected_score"] == pytest.approx(scores[texts.index(rejected)], abs=1e-5)
    adding = next(p for p in pairs if p["prompt"][-1]["content"] == "What is 2 + 3?")
    texts, scores = expected["What is 2 + 3?"]
    assert adding["chosen"][0]["content"] == texts[max(range(4), key=scores.__getitem__)]
    assert adding["rejected"][0]["content"] == texts[min(range(4), key=scores.__getitem__)]
    assert adding["chosen_score"] > adding["rejected_score"] and not adding["rejected_truncated"]
    assert stats.mean_margin == pytest.approx(max(scores) - min(scores), abs=1e-5)
    capitals = next(p for p in pairs if p["prompt"][-1]["content"] == "Say hi in capitals.")
    assert capitals["rejected"][0]["content"] == "HI THERE, HOW ARE YOU" and capitals["rejected_truncated"]
    complete = [s for t, s in zip(*expected["Say hi in capitals."]) if t != "HI THERE, HOW ARE YOU"]
    assert capitals["chosen_score"] == pytest.approx(max(complete), abs=1e-5)
    # a margin above the widest gap leaves only the pair against the cut-off reply
    pairs, stats = run_scored(tokenizer, [{"name": "reward_model", "path": str(reward_model_dir)}], records,
                              RM_SCRIPT, min_margin=max(scores) - min(scores) + 1e-3)[:2]
    assert [p["prompt"][-1]["content"] for p in pairs] == ["Say hi in capitals."] and stats.ties == 2


def test_the_command_scores_with_a_reward_model_loaded_once(checkpoints, reward_model_dir, tmp_path, capsys,
                                                             monkeypatch):
    import smolforge.train.reward as reward_module

    loads = []
    real_load = reward_module.load_reward_model
    monkeypatch.setattr(reward_module, "load_reward_model", lambda *a, **k: loads.append(k) or real_load(*a, **k))
    prompts, out = prompts_file(tmp_path / "prompts.jsonl"), tmp_path / "pairs.jsonl"
    margin = 0.05
    args = ["pairs", str(checkpoints["chat"]), "--prompts", str(prompts), "--n", "4", "--out", str(out),
            "--max-new-tokens", "16", "--batch-size", "8", "--seed", "1", "--device", "cpu",
            "--reward", f"{{name: reward_model, path: {reward_model_dir}, batch_size: 5}}", "--min-margin", str(margin)]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "14 prompts x 4 responses, scored by 1 x reward_model" in text
    assert len(loads) == 1 and loads[0]["device"].type == "cpu"  # the policy's device, loaded once for 4 calls
    written = [json.loads(line) for line in out.read_text().splitlines()]
    written_count = int(re.search(r"pairs written\s+(\d+)", text).group(1))
    ties = int(re.search(r"ties\s+(\d+)", text).group(1))
    cut_off = int(re.search(r"all cut off\s+(\d+)", text).group(1))
    assert written_count == len(written) >= 1 and written_count + ties + cut_off == 14
    records = {r["messages"][-2]["content"] if "messages" in r else r["prompt"]
               for r in (json.loads(line) for line in prompts.read_text().splitlines())}
    direct = reward_model_scores(reward_model_dir, [p["prompt"] for p in written for _ in "cr"],
                                 [p[side][0]["content"] for p in written for side in ("chosen", "rejected")],
                                 [p["chat_template_kwargs"] for p in written for _ in "cr"])
    for k, pair in enumerate(written):
        assert [pair["chosen_score"], pair["rejected_score"]] == pytest.approx(direct[2 * k:2 * k + 2], abs=1e-4)
        assert pair["rejected_truncated"] or pair["chosen_score"] >= pair["rejected_score"] + margin
        assert pair["prompt"][-1]["content"] in records


def test_the_command_names_the_line_missing_a_reward_field(checkpoints, tmp_path, capsys):
    prompts, out = tmp_path / "prompts.jsonl", tmp_path / "o.jsonl"
    write_jsonl([ifeval_user("hi", "change_case:english_lowercase"), {"prompt": "hello", "check": {"type": "lowercase"}}],
                prompts)
    code = main(["pairs", str(checkpoints["chat"]), "--prompts", str(prompts), "--out", str(out), "--reward", "ifeval"])
    assert code == 2 and f"{prompts}:2 field 'constraints': missing; the 'ifeval' reward" in capsys.readouterr().err
    code = main(["pairs", str(checkpoints["chat"]), "--prompts", str(prompts), "--out", str(out), "--min-margin", "1"])
    assert code == 2 and "--min-margin compares reward scores: it needs --reward" in capsys.readouterr().err
    code = main(["pairs", str(checkpoints["chat"]), "--prompts", str(prompts), "--out", str(out), "--reward", "ifevl"])
    assert code == 2 and "--reward[0].name: unknown reward 'ifevl'" in capsys.readouterr().err
    assert not out.exists()
