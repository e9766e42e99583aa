"""Reward functions for online RL, each on hand-made completions, and their weighted combination."""

from __future__ import annotations

import pytest
import torch

from smolforge.chat.render import load_template
from smolforge.errors import SmolforgeError
from smolforge.model import ModelConfig, debug
from smolforge.train.rewards import (
    REWARDS,
    Reply,
    build_rewards,
    overlong_penalty,
    parse_constraints,
    register_reward,
)


def score(name: str, reply: str, sample: dict | None = None, **options) -> float:
    return REWARDS[name].fn("prompt", Reply(reply), sample or {}, **options)


def test_reply_answer_drops_the_think_block():
    assert Reply("<think>\n7 + 5 = 12\n</think>\n12").answer == "12"
    assert Reply("12").answer == "12"
    assert Reply("<think>still thinking about 12").answer == ""  # never closed: no answer
    assert Reply("thinking 5 + 7\n</think>\n12", in_think=True).answer == "12"  # the prompt opened it
    assert Reply("ok", token_ids=(5, 6, 0)).num_tokens == 3


def test_smol_task_runs_the_records_checker_on_the_answer():
    sample = {"check": {"type": "exact", "answer": "579"}}
    assert score("smol_task", "<think>\n123 + 456\n</think>\n579", sample) == 1.0
    assert score("smol_task", "Answer: 579.", sample) == 1.0
    assert score("smol_task", "<think>\n579\n</think>\n578", sample) == 0.0  # the reasoning is not the answer
    persona = {"check": {"type": "all", "checks": [{"type": "starts_with", "prefix": "Arr!"},
                                                  {"type": "contains", "text": "12"}]}}
    assert score("smol_task", "Arr! 12", persona) == 1.0
    assert score("smol_task", "12 Arr!", persona) == 0.0


def test_gsm8k_matches_the_final_number_by_value():
    gold = {"answer": "Natalia sold 48 / 2 = <<48/2=24>>24 clips in May.\n#### 72"}
    assert score("gsm8k", "48 + 24 = 72 clips.\n#### 72", gold) == 1.0
    assert score("gsm8k", "So the answer is $72.00.", gold) == 1.0
    assert score("gsm8k", "<think>\nmaybe 72\n</think>\nThe answer is 70.", gold) == 0.0
    assert score("gsm8k", "no number here", gold) == 0.0
    assert score("gsm8k", "I think 1,234", {"answer": 1234}) == 1.0  # a bare number works as the target too


def test_ifeval_scores_the_share_of_instructions_followed():
    sample = {"constraints": [{"id": "change_case:english_lowercase"},
                              {"id": "keywords:existence", "kwargs": {"keywords": ["moon"]}}]}
    assert score("ifeval", "the moon is bright", sample) == 1.0
    assert score("ifeval", "The moon is bright", sample) == 0.5
    assert score("ifeval", "The moon is bright", sample, aggregate="all") == 0.0
    assert score("ifeval", "<think>\nThe MOON\n</think>\nthe moon", sample) == 1.0  # scored on the answer


def test_think_format_wants_the_requested_mode_and_an_answer():
    think = {"messages": [{"role": "user", "content": "What is 2 + 2? /think"}], "chat_template_kwargs": {}}
    no_think = {"messages": [{"role": "user", "content": "What is 2 + 2?"}],
                "chat_template_kwargs": {"enable_thinking": False}}
    assert score("think_format", "<think>\n2 + 2 = 4\n</think>\n4", think) == 1.0
    assert score("think_format", "4", think) == 0.0  # no reasoning in think mode
    assert score("think_format", "<think>\n2 + 2 = 4\n</think>\n", think) == 0.0  # no answer after it
    assert score("think_format", "<think>\n2 + 2 = 4", think) == 0.0  # the block never closed
    assert score("think_format", "4", no_think) == 1.0
    assert score("think_format", "<think>\n2 + 2\n</think>\n4", no_think) == 0.0
    assert score("think_format", "<think>\n\n</think>\n4", no_think) == 1.0  # an empty block is no reasoning


def test_overlong_penalty_is_zero_then_a_ramp_then_minus_one():
    # DAPO eq. 13 with max_len 20 and a soft window of 5: 0 up to 15 tokens, -1 at 20 and beyond.
    assert [overlong_penalty(n, 20, 5) for n in (0, 15, 16, 18, 20, 21, 100)] == [0.0, 0.0, -0.2, -0.6, -1.0, -1.0, -1.0]
    assert REWARDS["overlong"].fn("", Reply("x", token_ids=(1,) * 18), {}, max_len=20, soft=5) == pytest.approx(-0.6)
    with pytest.raises(SmolforgeError, match="soft must be in 1..max_len"):
        overlong_penalty(3, 20, 30)


def test_length_penalty_and_contains():
    assert REWARDS["length"].fn("", Reply("x", token_ids=(1,) * 24), {}, max_len=96) == pytest.approx(-0.25)
    assert REWARDS["length"].fn("", Reply("x", token_ids=(1,) * 200), {}, max_len=96) == -1.0
    assert score("contains", "a fox", text="fox") == 1.0 and score("contains", "a dog", text="fox") == 0.0


def test_weighted_rewards_sum_and_are_reported_one_by_one():
    rewards = build_rewards([{"name": "smol_task", "weight": 1.0}, {"name": "overlong", "weight": 0.5, "soft": 2},
                             {"name": "contains", "weight": 2.0, "text": "Arr"}], defaults={"max_len": 10})
    sample = {"check": {"type": "exact", "answer": "7"}}
    replies = [Reply("7", token_ids=(1,) * 3), Reply("Arr 8", token_ids=(1,) * 9), Reply("Arr 7", token_ids=(1,) * 12)]
    totals, each = rewards(["p"] * 3, replies, [sample] * 3)
    assert each == {"smol_task": [1.0, 0.0, 0.0], "overlong": [0.0, -0.5, -1.0], "contains": [0.0, 1.0, 1.0]}
    assert totals == pytest.approx([1.0, 0.0 - 0.25 + 2.0, 0.0 - 0.5 + 2.0])
    assert rewards.fields == {"check": "smol_task"}
    # the same function twice gets two names in the logs
    twice = build_rewards([{"name": "contains", "text": "a"}, {"name": "contains", "text": "b"}])
    assert [b.label for b in twice.rewards] == ["contains", "contains_2"]


def test_bad_reward_specs_are_named():
    with pytest.raises(SmolforgeError, match=r"grpo.rewards\[0\].name: unknown reward 'smoltask'"):
        build_rewards([{"name": "smoltask"}])
    with pytest.raises(SmolforgeError, match=r"grpo.rewards\[1\].maxlen: not an option of reward 'overlong'"):
        build_rewards([{"name": "contains", "text": "x"}, {"name": "overlong", "maxlen": 3}])
    with pytest.raises(SmolforgeError, match=r"grpo.rewards\[0\]: reward 'contains' needs option 'text'"):
        build_rewards([{"name": "contains"}])
    with pytest.raises(SmolforgeError, match=r"grpo.rewards\[0\]: .*soft must be"):
        build_rewards([{"name": "overlong", "max_len": 8, "soft": 9}])
    with pytest.raises(SmolforgeError, match="no reward"):
        build_rewards([])


def test_missing_and_bad_record_fields_are_named():
    rewards = build_rewards([{"name": "smol_task"}])
    with pytest.raises(SmolforgeError, match=r"data.jsonl:3 field 'check': missing; the 'smol_task' reward"):
        rewards.check_sample({"messages": []}, "data.jsonl:3")
    with pytest.raises(SmolforgeError, match=r"x:1 field 'constraints\[0\].id': unknown instruction 'nope'"):
        parse_constraints([{"id": "nope"}], "x:1")
    with pytest.raises(SmolforgeError, match=r"x:1 field 'constraints\[0\].kwargs.keywords'"):
        parse_constraints([{"id": "keywords:existence", "kwargs": {"keywords": "moon"}}], "x:1")


def test_a_registered_reward_is_usable_by_name():
    @register_reward("test_exclaims")
    def exclaims(prompt, reply, sample, *, times: int = 1) -> float:
        return float(reply.answer.count("!") >= times)

    try:
        totals, _ = build_rewards([{"name": "test_exclaims", "times": 2}])(["p", "p"], [Reply("hi!!"), Reply("hi!")], [{}, {}])
        assert totals == [1.0, 0.0]
    finally:
        REWARDS.pop("test_exclaims")


def test_reward_model_scores_like_smolforge_score(tokenizer, tmp_path):
    from smolforge.train.reward import (
        RewardModel,
        load_reward_model,
        save_reward_model,
        score_records,
    )

    torch.manual_seed(0)
    tokenizer.chat_template = load_template("chatml")
    rm = RewardModel(ModelConfig(**{**debug().model_dump(), "vocab_size": 384}), pad_id=1)
    save_reward_model(tmp_path / "rm", rm, tokenizer)
    rewards = build_rewards([{"name": "reward_model", "path": str(tmp_path / "rm"), "batch_size": 2}])
    samples = [{"messages": [{"role": "user", "content": "the fox"}], "chat_template_kwargs": {}}] * 3
    replies = [Reply("quick brown"), Reply("lazy dog"), Reply("0123")]
    totals, each = rewards(["p"] * 3, replies, samples)
    model, tok = load_reward_model(tmp_path / "rm")
    direct = score_records(model, tok, tok.chat_template, [{"prompt": "the fox", "response": r.text} for r in replies])
    assert totals == pytest.approx(direct) and each["reward_model"] == totals
    assert len(set(totals)) == 3
