"""GSM8K eval: answer extraction edge cases, checking with math-verify, prompts with and without a
chat template and few-shot, avg@k / pass@k on scripted replies, bad files, and a tiny model end to
end through the engine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from smolforge.chat.render import load_template
from smolforge.engine import Completion, Engine
from smolforge.errors import SmolforgeError
from smolforge.eval import gsm8k
from smolforge.eval.core import EvalContext
from smolforge.model import Transformer, debug
from smolforge.tokenizer import Tokenizer

# First rows of ../shared/data/gsm8k (see tests/data/gsm8k/SOURCE.txt).
GSM8K = Path(__file__).parent / "data" / "gsm8k"


@pytest.mark.parametrize("reply, expected", [
    ("She makes 9 * 2 = $18 every day.\n#### 18", "18"),
    ("#### 1,234", "1234"),  # thousands separator
    ("The total is $1,234.50.", "1234.50"),  # $ sign, decimals, trailing full stop
    ("She pays $18.", "18"),
    ("It is -5 degrees now", "-5"),  # negative
    ("10-3 = 7", "7"),  # a minus between numbers is a subtraction, not a sign
    ("so the result is \\boxed{42}. Later 7", "42"),  # boxed wins over the last number
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # non-numeric boxed content goes to math-verify
    ("\\boxed{\\$18}", "18"),
    ("3 apples. The answer is 5. Then 8 more", "5"),  # "the answer is" wins over the last number
    ("The answer is: 12 eggs, not 13", "12"),
    ("first 2, then 3, finally 40.", "40"),  # else the last number
    ("so 1,2,3", "3"),  # commas that are not thousands separators split numbers
    (".5 of them", ".5"),
    ("no number here", None),
    ("", None),
    ("<think>It is 5? No, 7.</think>The answer is 6", "6"),  # the think block is stripped first
    ("<think>5, then 7, then", None),  # unfinished reasoning: no answer
    ("#### none\nbut 7", "7"),  # a "####" without a number falls through
])
def test_extract_answer(reply, expected):
    assert gsm8k.extract_answer(reply) == expected


@pytest.mark.parametrize("predicted, gold, correct", [
    ("18", "18", True), ("18.0", "18", True), ("18.00", "18", True), ("2500.00", "2500", True),
    ("\\frac{1}{2}", "0.5", True), ("17", "18", False), (None, "18", False), ("-5", "5", False),
])
def test_is_correct_compares_values(predicted, gold, correct):
    assert gsm8k.is_correct(predicted, gold) is correct


def test_gold_answer_and_worked_answer():
    answer = "She sells 16 - 3 - 4 = <<16-3-4=9>>9 eggs.\nShe makes 9 * 2 = $<<9*2=18>>18.\n#### 1,018"
    assert gsm8k.gold_answer(answer) == "1018"
    assert gsm8k.worked_answer(answer) == "She sells 16 - 3 - 4 = 9 eggs.\nShe makes 9 * 2 = $18.\n#### 1,018"
    with pytest.raises(SmolforgeError, match=r"f.jsonl:4 field 'answer': no final answer"):
        gsm8k.gold_answer("It is 18.", "f.jsonl:4")


def test_plain_and_chat_prompts_with_fewshot():
    shots = [{"question": "1+1?", "answer": "1+1=<<1+1=2>>2\n#### 2"}]
    assert gsm8k.plain_prompt("2+2?", shots) == "Question: 1+1?\nAnswer: 1+1=2\n#### 2\n\nQuestion: 2+2?\nAnswer:"
    assert gsm8k.plain_prompt("2+2?", []) == "Question: 2+2?\nAnswer:"
    chat = gsm8k.chat_prompt(load_template("chatml"), "2+2?", shots, {})
    assert chat == ("<|im_start|>user\n1+1?<|im_end|>\n<|im_start|>assistant\n1+1=2\n#### 2<|im_end|>\n"
                    "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n")


# --- running -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(tokenizer) -> Transformer:
    torch.manual_seed(0)
    cfg = debug().model_copy(update={"vocab_size": tokenizer.vocab_size, "init_std": 0.2, "max_seq_len": 2048})
    return Transformer(cfg).eval()


class ScriptedEngine:
    """Replies from a script keyed by a word of the question; records what it was asked."""

    def __init__(self, model, tokenizer, script: dict[str, list[str]]) -> None:
        self.model, self.tokenizer, self.script, self.calls = model, tokenizer, script, []
        self.used = {key: 0 for key in script}

    def generate(self, prompts, params):
        self.calls.append(params)
        out = []
        for ids in prompts:
            text = self.tokenizer.decode(ids)
            key = next(k for k in self.script if k in text.rsplit("Question:", 1)[-1].rsplit("user", 1)[-1])
            reply = self.script[key][self.used[key] % len(self.script[key])]
            self.used[key] += 1
            out.append(Completion(list(ids), [], reply, "stop"))
        return out


def context(model, tokenizer, tmp_path, engine=None, **fields) -> EvalContext:
    options = fields.pop("options", {})
    return EvalContext(task="gsm8k", model=model, tokenizer=tokenizer, engine=engine or Engine(model, tokenizer),
                       checkpoint=tmp_path, out_dir=tmp_path, options=options, **fields)


def write_problems(path: Path, problems: list[tuple[str, str]]) -> Path:
    path.write_text("".join(json.dumps({"question": q, "answer": f"work\n#### {a}"}) + "\n" for q, a in problems))
    return path


def test_avg_at_k_and_pass_at_k_on_scripted_replies(model, tokenizer, tmp_path):
    data = write_problems(tmp_path / "t.jsonl", [("apples?", "18"), ("pears?", "1,000"), ("plums?", "-3")])
    engine = ScriptedEngine(model, tokenizer, {
        "apples": ["<think>maybe 17</think>#### 18", "The answer is $18.", "17", "I think 18.0"],  # 3 of 4
        "pears": ["It costs $1,000.", "#### 999", "\\boxed{1000}", "no idea"],  # 2 of 4
        "plums": ["3", "3", "3", "3"],  # 0 of 4: the sign matters
    })
    result = gsm8k.run(context(model, tokenizer, tmp_path, engine, samples=4, temperature=0.7, batch_size=5,
                               options={"data": str(data)}))
    assert result.metrics["accuracy"] == pytest.approx(5 / 12)
    assert result.metrics["pass@4"] == pytest.approx(2 / 3)
    assert result.metrics["answered"] == pytest.approx(11 / 12)
    assert list(result.metrics)[0] == "accuracy" and "avg@4" in result.notes
    assert [s["score"] for s in result.samples] == [0.75, 0.5, 0.0]
    assert result.samples[0]["extracted"] == ["18", "18", "17", "18.0"] and result.samples[0]["target"] == "18"
    assert all(p.temperature == 0.7 and p.max_new_tokens == 256 for p in engine.calls)
    assert len({p.seed for p in engine.calls}) == 4  # one seed per draw
    assert len(engine.calls) == 4  # each draw: the 3 problems in one batch of 5


def test_greedy_fewshot_and_chat_prompting(model, tokenizer, tmp_path):
    data = write_problems(tmp_path / "t.jsonl", [("apples?", "18")])
    engine = ScriptedEngine(model, tokenizer, {"apples": ["#### 18"]})
    ctx = context(model, tokenizer, tmp_path, engine,
                  options={"data": str(data), "num_fewshot": 2, "fewshot_data": str(GSM8K / "train.jsonl")})
    result = gsm8k.run(ctx)
    assert result.metrics == {"accuracy": 1.0, "answered": 1.0}
    prompt = result.samples[0]["prompt"]
    assert prompt.count("Question:") == 3 and prompt.endswith("Question: apples?\nAnswer:")
    assert "<<" not in prompt and "2-shot" in result.notes and "plain prompt" in result.notes
    assert engine.calls[0].temperature == 0 and "Question:" in engine.calls[0].stop
    # The same seed picks the same shots.
    assert gsm8k.run(ctx).samples[0]["prompt"] == prompt

    chat_tokenizer = Tokenizer(tokenizer.backend, chat_template=load_template("chatml"))
    engine = ScriptedEngine(model, chat_tokenizer, {"apples": ["#### 18"]})
    result = gsm8k.run(context(model, chat_tokenizer, tmp_path, engine, options={"data": str(data)}))
    assert result.samples[0]["prompt"].endswith("<|im_start|>user\napples?<|im_end|>\n<|im_start|>assistant\n")
    assert engine.calls[0].stop_token_ids == [chat_tokenizer.token_to_id("<|im_end|>")]
    assert "chat template" in result.notes


@pytest.mark.parametrize("records, options, message", [
    ([], {}, r"no examples \(the file is empty\)"),
    ([{"question": "q"}], {}, r"t.jsonl:1 field 'answer': missing"),
    ([{"question": 3, "answer": "#### 3"}], {}, r"t.jsonl:1 field 'question': expected str"),
    ([{"question": "q", "answer": "three"}], {}, r"t.jsonl:1 field 'answer': no final answer"),
    ([{"question": "q", "answer": "#### 3"}], {"num_fewshot": 2}, r"2-shot needs examples from another split"),
    ([{"question": "q", "answer": "#### 3"}], {"num_fewshot": 99, "fewshot_data": str(GSM8K / "train.jsonl")},
     r"99-shot asked, only 8 examples"),
    ([{"question": "q", "answer": "#### 3"}], {"num_fewshot": 1, "fewshot_data": "SELF"}, r"fewshot_data is the file being scored"),
])
def test_bad_inputs_give_clear_errors(records, options, message, model, tokenizer, tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    options = {k: str(path) if v == "SELF" else v for k, v in options.items()}
    with pytest.raises(SmolforgeError, match=message):
        gsm8k.run(context(model, tokenizer, tmp_path, options={"data": str(path), **options}))


def test_prompt_longer_than_the_context_is_an_error(tokenizer, tmp_path):
    small = Transformer(debug().model_copy(update={"vocab_size": tokenizer.vocab_size, "max_seq_len": 64}))
    with pytest.raises(SmolforgeError, match="leaves no room to answer"):
        gsm8k.run(context(small, tokenizer, tmp_path, options={"data": str(GSM8K / "test.jsonl")}, limit=2))


def test_tiny_model_end_to_end_through_the_engine(model, tokenizer, tmp_path):
    ctx = context(model, tokenizer, tmp_path, options={"data": str(GSM8K / "test.jsonl")}, limit=3,
                  max_new_tokens=6, batch_size=2, samples=2, temperature=1.0, seed=3)
    result = gsm8k.run(ctx)
    assert result.n == 3 and len(result.samples) == 3 and result.seconds > 0
    assert all(len(s["responses"]) == 2 and all(isinstance(r, str) for r in s["responses"]) for s in result.samples)
    assert 0.0 <= result.metrics["accuracy"] <= result.metrics["pass@2"] <= 1.0
    assert result.samples[0]["target"] == "18"  # Janet's ducks
    again = gsm8k.run(ctx)
    assert [s["responses"] for s in again.samples] == [s["responses"] for s in result.samples]  # seeded
