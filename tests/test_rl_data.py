"""RL prompt files (good and bad records), rollout rows, and the rollout loader's schedule and state."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from smolforge.chat.render import IGNORE_INDEX, load_template
from smolforge.config import GRPOConfig, GRPOTrainConfig
from smolforge.data.rl import (
    PromptSource,
    RolloutLoader,
    read_prompts,
    render_prompts,
    rollout_rows,
    to_rl_prompt,
)
from smolforge.data.sources import ReadStats
from smolforge.errors import SmolforgeError
from smolforge.model import ModelConfig, Transformer, debug
from smolforge.train.rewards import build_rewards


def write(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_records_become_prompts_and_samples():
    p = to_rl_prompt({"prompt": "What is 2 + 2?", "answer": "4", "task": "add"}, "f:1")
    assert p.messages == [{"role": "user", "content": "What is 2 + 2?"}]
    assert p.sample["answer"] == "4" and p.sample["task"] == "add" and p.sample["messages"] == p.messages
    sft = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                        {"role": "assistant", "content": "Hello."}],
           "chat_template_kwargs": {"enable_thinking": False}, "check": {"type": "exact", "answer": "Hello"}}
    p = to_rl_prompt(sft, "f:2")
    assert [m["role"] for m in p.messages] == ["system", "user"]  # the reference answer is dropped
    assert p.sample["chat_template_kwargs"] == {"enable_thinking": False}
    ifeval_row = {"key": 1, "prompt": "Write in lowercase.", "instruction_id_list": ["change_case:english_lowercase"],
                  "kwargs": [{"capital_frequency": None}]}
    assert to_rl_prompt(ifeval_row, "f:3").sample["constraints"] == [{"id": "change_case:english_lowercase", "kwargs": {}}]


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "hi"', r"p.jsonl:2: malformed JSON"),
    ({"question": "hi"}, r"p.jsonl:2 field 'prompt': missing \(the record's keys: question\)"),
    ({"prompt": 5}, r"p.jsonl:2 field 'prompt': must be a non-empty string or list of messages, got int"),
    ({"prompt": "  "}, r"p.jsonl:2 field 'prompt': is empty"),
    ({"messages": []}, r"p.jsonl:2 field 'messages': must be a non-empty string or list of messages, got an empty list"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, r"p.jsonl:2 field 'messages': holds only an assistant"),
    ({"messages": [{"role": "system", "content": "x"}]}, r"p.jsonl:2 field 'messages\[0\].role': the prompt must end"),
    ({"prompt": "hi", "answer": True}, r"p.jsonl:2 field 'answer': must be a string or a number, got bool"),
    ({"prompt": "hi", "answer": "worked out ####"}, r"p.jsonl:2 field 'answer': holds no final answer"),
    ({"prompt": "hi", "check": "exact"}, r"p.jsonl:2 field 'check': must be an object"),
    ({"prompt": "hi", "check": {"type": "exactly"}}, r"p.jsonl:2 field 'check': unknown check type 'exactly'"),
    ({"prompt": "hi", "constraints": [{"id": "x:y"}]}, r"p.jsonl:2 field 'constraints\[0\].id': unknown instruction"),
    ({"prompt": "hi", "chat_template_kwargs": []}, r"p.jsonl:2 field 'chat_template_kwargs': must be an object"),
    ({"prompt": "hi"}, r"p.jsonl:2 field 'check': missing; the 'smol_task' reward scores with it"),
    ([1, 2], r"p.jsonl:2: expected a JSON object, got list"),
])
def test_bad_prompt_records_name_the_file_line_and_field(tmp_path, line, message):
    good = {"prompt": "fine", "check": {"type": "uppercase"}}
    path = write(tmp_path / "p.jsonl", [good, line])
    rewards = build_rewards([{"name": "smol_task"}])
    with pytest.raises(SmolforgeError, match=message):
        read_prompts(path, rewards)


def test_an_empty_prompt_file_is_an_error_and_invalid_lines_can_be_skipped(tmp_path):
    empty = write(tmp_path / "empty.jsonl", [])
    with pytest.raises(SmolforgeError, match=r"empty.jsonl is empty"):
        read_prompts(empty)
    blank = write(tmp_path / "blank.jsonl", ["", "  "])
    with pytest.raises(SmolforgeError, match=r"blank.jsonl: no RL prompts in the file"):
        read_prompts(blank)
    mixed = write(tmp_path / "mixed.jsonl", [{"prompt": "a"}, "{oops", {"prompt": 3}, {"prompt": "b"}])
    stats = ReadStats()
    assert [p.messages[0]["content"] for p in read_prompts(mixed, skip_invalid=True, stats=stats)] == ["a", "b"]
    assert stats.skipped == 2


def test_a_bad_message_fails_when_rendered_with_its_location(tokenizer):
    prompt = to_rl_prompt({"messages": [{"role": "user", "content": 3}]}, "p.jsonl:7")
    with pytest.raises(SmolforgeError, match=r"p.jsonl:7 field 'messages\[0\].content' must be a string"):
        render_prompts([prompt], tokenizer, load_template("chatml"), {}, 100, "drop", PromptSource("p", []))


def test_long_prompts_are_dropped_cut_or_refused(tokenizer):
    template = load_template("chatml")
    prompts = lambda: [to_rl_prompt({"prompt": "the quick brown fox " * n}, f"p:{n}") for n in (1, 20)]  # noqa: E731
    source = PromptSource("p", [])
    kept = render_prompts(prompts(), tokenizer, template, {}, 30, "drop", source)
    assert len(kept) == 1 and source.dropped == 1
    assert kept[0].text.endswith("<|im_start|>assistant\n") and kept[0].ids == tokenizer.encode(kept[0].text)
    cut = render_prompts(prompts(), tokenizer, template, {}, 30, "truncate", source)
    assert len(cut[1].ids) == 30 and cut[1].ids == tokenizer.encode(cut[1].text)[-30:] and source.truncated == 1
    with pytest.raises(SmolforgeError, match=r"p:20: the prompt is \d+ tokens, over data.seq_len - grpo.max_new_tokens = 30"):
        render_prompts(prompts(), tokenizer, template, {}, 30, "error", source)


def test_rollout_rows_label_only_the_completion():
    batch = rollout_rows([[5, 6, 7], [8]], [[1, 2], [3, 4, 9]], pad_id=0, masked=[False, False])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 1, 2], [8, 3, 4, 9, 0]]
    # shifted: position t predicts token t + 1, so the last prompt token carries the first label
    assert batch["labels"].tolist() == [[-100, -100, 1, 2, -100], [3, 4, 9, -100, -100]]
    assert batch["real_tokens"].tolist() == [5, 4] and not batch["document_ids"].any()
    masked = rollout_rows([[5, 6]], [[1, 2]], pad_id=0, masked=[True])
    assert (masked["labels"] == IGNORE_INDEX).all()


def _loader(tokenizer, num_iterations: int, batch_size: int, grad_accum: int = 1, seed: int = 0):
    tokenizer.chat_template = load_template("chatml")
    prompts = [to_rl_prompt({"prompt": f"the {w}"}, f"p:{i}") for i, w in enumerate(["fox", "dog", "quick", "lazy"])]
    settings = GRPOConfig(group_size=4, prompts_per_step=2, num_iterations=num_iterations, max_new_tokens=6,
                          rewards=[{"name": "contains", "text": "o"}])
    tcfg = GRPOTrainConfig(batch_size=batch_size, grad_accum=grad_accum, loss_type="grpo")
    render_prompts(prompts, tokenizer, tokenizer.chat_template, {}, 50, "drop", PromptSource("p", []))
    rewards = build_rewards(settings.rewards)
    return RolloutLoader(prompts, rewards, settings, tcfg, tokenizer, seq_len=64, seed=seed)


def test_the_loader_serves_each_rollout_num_iterations_times(tokenizer):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**{**debug().model_dump(), "vocab_size": 384}))
    loader = _loader(tokenizer, num_iterations=2, batch_size=4)
    loader.attach_policy(model)
    assert loader.micro_per_rollout == 2 and loader.steps_per_rollout == 4 and loader.needs_old_logps
    batches = [loader.next_batch() for _ in range(5)]
    assert loader.rollouts_done == 2  # 2 micro-batches x 2 passes, then a new rollout
    assert torch.equal(batches[0]["input_ids"], batches[2]["input_ids"]) and torch.equal(batches[1]["labels"], batches[3]["labels"])
    first = batches[0]
    assert first["advantages"].shape == (4,) and first["step_weight"] == 4  # grpo: micro-batches weigh by rows
    # old log-probs are the sampling policy's, 0 off the completion
    mask = first["labels"] != IGNORE_INDEX
    assert (first["old_logps"][~mask] == 0).all() and (first["old_logps"][mask] < 0).all()
    assert model.training  # back in train mode after sampling
    stats = loader.window_metrics()
    assert 0 <= stats["reward"] <= 1 and stats["completion/max_length"] <= 6 and "time/generate_s" in stats
    # one optimizer step per rollout: on-policy, no old log-probs needed
    on_policy = _loader(tokenizer, num_iterations=1, batch_size=8)
    on_policy.attach_policy(model)
    assert not on_policy.needs_old_logps and "old_logps" not in on_policy.next_batch()


def test_group_advantages_in_a_rollout_are_centred_per_prompt(tokenizer):
    torch.manual_seed(0)
    loader = _loader(tokenizer, num_iterations=1, batch_size=8)
    loader.attach_policy(Transformer(ModelConfig(**{**debug().model_dump(), "vocab_size": 384})))
    for _ in range(3):
        advantages = loader.next_batch()["advantages"].view(2, 4)
        assert advantages.sum(dim=1).abs().max() < 1e-5


def test_the_loader_state_resumes_mid_rollout(tokenizer):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**{**debug().model_dump(), "vocab_size": 384}))
    loader = _loader(tokenizer, num_iterations=2, batch_size=4, seed=3)
    loader.attach_policy(model)
    for _ in range(3):
        loader.next_batch()
    state = loader.state_dict()
    want = [loader.next_batch() for _ in range(4)]
    again = _loader(tokenizer, num_iterations=2, batch_size=4, seed=3)
    again.attach_policy(model)
    again.load_state_dict(state)
    got = [again.next_batch() for _ in range(4)]
    for a, b in zip(want, got):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key
    other = _loader(tokenizer, num_iterations=2, batch_size=4, seed=3)
    other.prompts = other.prompts[:3]
    with pytest.raises(SmolforgeError, match="for 4 prompts"):
        other.load_state_dict(state)


def test_scale_rewards_follows_the_loss_type():
    fake_tok = SimpleNamespace(pad_id=0, eos_id=0, token_to_id=lambda t: None)
    prompts = [to_rl_prompt({"prompt": "x"}, "p:1")]
    rewards = build_rewards([{"name": "contains", "text": "o"}])
    for loss_type, scale, want in [("grpo", "auto", True), ("dr_grpo", "auto", False), ("dr_grpo", "group", True),
                                   ("dapo", "none", False)]:
        settings = GRPOConfig(group_size=2, prompts_per_step=1, rewards=[{"name": "contains", "text": "o"}],
                              scale_rewards=scale)
        loader = RolloutLoader(prompts, rewards, settings, GRPOTrainConfig(batch_size=2, loss_type=loss_type),
                               fake_tok, seq_len=64)
        assert loader.scale_rewards is want
