"""`smolforge chat`: the prompts the model receives (history, /reset, /system, /no_think), greedy
replies equal to the engine's, streaming, reasoning dimmed, context overflow, errors."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from rich.console import Console

from smolforge.chat.reasoning import split_reasoning
from smolforge.chat.render import load_template, render_messages
from smolforge.chat.terminal import (
    Conversation,
    PromptTooLong,
    ReplyPrinter,
    end_of_turn_ids,
    run_chat,
)
from smolforge.cli import main
from smolforge.engine import Engine, SamplingParams
from smolforge.model import Transformer, debug
from smolforge.train.checkpoint import save_checkpoint

MAX_NEW = 6


def tiny_model(vocab_size: int, max_seq_len: int) -> Transformer:
    # init_std 0.2: replies vary from token to token instead of repeating one id.
    torch.manual_seed(0)
    config = debug().model_copy(update={"vocab_size": vocab_size, "init_std": 0.2,
                                        "max_seq_len": max_seq_len})
    return Transformer(config).eval()


@pytest.fixture(scope="module")
def chat_tokenizer(tokenizer):
    tok = copy.copy(tokenizer)  # the session fixture stays template-free
    tok.chat_template = load_template("smollm3")
    return tok


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, chat_tokenizer):
    # smollm3's system block is ~270 tokens with the tiny tokenizer: room for a few turns.
    path = tmp_path_factory.mktemp("chat") / "ckpt"
    save_checkpoint(path, tiny_model(384, 1024), chat_tokenizer)
    return path


def record_prompts(monkeypatch) -> list[list[int]]:
    """Patch Engine.stream to log every prompt it is asked to continue."""
    prompts: list[list[int]] = []
    original = Engine.stream

    def stream(self, batch, params):
        prompts.extend(list(p) for p in batch)
        return original(self, batch, params)

    monkeypatch.setattr(Engine, "stream", stream)
    return prompts


def reader(lines: list[str]):
    """A `read_line` over `lines` that raises EOFError at the end, like input()."""
    remaining = iter(lines)

    def read_line() -> str:
        try:
            return next(remaining)
        except StopIteration:
            raise EOFError from None

    return read_line


def greedy_answer(engine: Engine, tok, prompt_text: str) -> tuple[str, str]:
    """(raw reply, answer kept in the history) of the engine on a rendered prompt."""
    params = SamplingParams(max_new_tokens=MAX_NEW, temperature=0,
                            stop_token_ids=end_of_turn_ids(tok))
    text = engine.generate([tok.encode(prompt_text)], params)[0].text
    return text, split_reasoning(text)[1]


def test_cli_session_renders_history_commands_and_greedy_replies(checkpoint, chat_tokenizer,
                                                                 monkeypatch, capsys):
    prompts = record_prompts(monkeypatch)
    lines = ["hello", "the quick fox?", "/no_think", "over the dog", "/reset now", "/reset",
             "/system Be brief.", "lazy 42", "/quit", "never sent"]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(lines) + "\n"))
    code = main(["chat", str(checkpoint), "--temperature", "0", "--max-new-tokens", str(MAX_NEW),
                 "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0
    prompts = list(prompts)  # before the reference generations below add their own
    assert len(prompts) == 4  # /commands reach no model, /quit stops before "never sent"

    from smolforge.train.checkpoint import load_model

    model, tok = load_model(checkpoint)
    engine, template = Engine(model, tok), chat_tokenizer.chat_template

    def render(messages, think):
        return render_messages(template, messages, add_generation_prompt=True, enable_thinking=think)

    def user(text):
        return {"role": "user", "content": text}

    def assistant(text):
        return {"role": "assistant", "content": text}

    first = render([user("hello")], True)
    raw1, answer1 = greedy_answer(engine, tok, first)
    second = render([user("hello"), assistant(answer1), user("the quick fox?")], True)
    raw2, answer2 = greedy_answer(engine, tok, second)
    third = render([user("hello"), assistant(answer1), user("the quick fox?"), assistant(answer2),
                    user("over the dog")], False)
    raw3, _ = greedy_answer(engine, tok, third)
    fourth = render([{"role": "system", "content": "Be brief."}, user("lazy 42")], False)
    raw4, _ = greedy_answer(engine, tok, fourth)
    assert prompts == [tok.encode(p) for p in (first, second, third, fourth)]
    assert "Reasoning Mode: /no_think" in third and third.endswith("<think>\n\n</think>\n")
    # Replies are printed as the engine produced them (the random model writes no <think>).
    assert all(split_reasoning(raw)[0] is None for raw in (raw1, raw2, raw3, raw4))
    for raw in (raw1, raw2, raw3, raw4):
        assert raw and raw in out
    assert "reasoning mode off" in out and "conversation cleared" in out
    assert "/reset takes no text" in out
    assert "system prompt: Be brief." in out and "never sent" not in out.split("/quit")[-1]


def test_end_of_input_leaves_with_status_0(checkpoint, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("/help\n"))
    assert main(["chat", str(checkpoint), "--device", "cpu"]) == 0
    assert "/no_think" in capsys.readouterr().out


def test_checkpoint_without_template_is_refused(tmp_path, tokenizer, capsys):
    save_checkpoint(tmp_path / "plain", tiny_model(384, 256), tokenizer)
    assert main(["chat", str(tmp_path / "plain"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "no chat template" in err and "plain" in err and "Traceback" not in err


def test_bad_sampling_flag_names_the_flag(checkpoint, capsys):
    assert main(["chat", str(checkpoint), "--top-p", "2", "--device", "cpu"]) == 2
    assert "--top-p" in capsys.readouterr().err


def test_reply_streams_while_the_engine_decodes(chat_tokenizer, monkeypatch):
    """Text reaches the console step by step, not after the last step."""
    model = tiny_model(384, 256)
    engine = Engine(model, chat_tokenizer)
    out = io.StringIO()
    written_at_step: list[int] = []
    original = Engine.stream

    def stream(self, batch, params):
        for deltas in original(self, batch, params):
            written_at_step.append(len(out.getvalue()))
            yield deltas

    monkeypatch.setattr(Engine, "stream", stream)
    conversation = Conversation(load_template("chatml"))
    params = SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True)
    code = run_chat(engine, chat_tokenizer, conversation, params, Console(file=out, width=200),
                    reader(["the lazy dog"]))
    assert code == 0 and len(written_at_step) == 8
    # Each step's output is on the console before the engine is asked for the next step.
    assert len(set(written_at_step)) >= 4 and written_at_step == sorted(written_at_step)
    reply = conversation.turns[0][1]
    assert reply and reply in out.getvalue()


def test_reasoning_is_dimmed_and_kept_out_of_the_history():
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, color_system="standard", width=200)
    printer = ReplyPrinter(console, in_think=False)
    for piece in ["<thi", "nk>\nadd the ones", " then the tens\n</th", "ink>\n", "The answer", " is 9."]:
        printer.feed(piece)
    printer.finish()
    shown = out.getvalue()
    dim = "\x1b[2m"
    assert f"{dim}add the ones" in shown and f"{dim} then the tens" in shown
    assert "think>" not in shown
    answer_part = shown[shown.index("The answer"):]
    assert dim not in answer_part and "is 9." in answer_part
    plain = io.StringIO()
    printer = ReplyPrinter(Console(file=plain, width=200), in_think=True)  # prompt opened the block
    printer.feed("hmm\n</think>\n\nYes.")
    printer.finish()
    assert plain.getvalue() == "hmm\nYes.\n"


def test_overflowing_context_drops_the_oldest_turns(chat_tokenizer, monkeypatch):
    model = tiny_model(384, 64)  # chatml renders "<|im_start|>user\nhello..." in ~20 tokens
    engine = Engine(model, chat_tokenizer)
    prompts = record_prompts(monkeypatch)
    out = io.StringIO()
    conversation = Conversation(load_template("chatml"))
    params = SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True,
                            stop_token_ids=end_of_turn_ids(chat_tokenizer))
    lines = ["the quick brown fox", "jumps over", "the lazy dog", "0123 4567",
             "the quick brown fox jumps over the lazy dog " * 8]
    code = run_chat(engine, chat_tokenizer, conversation, params, Console(file=out, width=200),
                    reader(lines))
    shown = out.getvalue()
    assert code == 0  # the too-long message is refused and the chat goes on to the end of input
    assert all(len(p) + 8 <= 64 for p in prompts) and len(prompts) == 4
    assert "oldest turn" in shown and "fills the model's whole context of 64 tokens" in shown
    assert conversation.turns[-1][0] == "0123 4567" and len(conversation.turns) < 4
    first_user = chat_tokenizer.encode("the quick brown fox")
    last_prompt = prompts[-1]
    assert not any(last_prompt[i:i + len(first_user)] == first_user for i in range(len(last_prompt)))


def test_conversation_reply_budget_shrinks_when_the_message_alone_is_long():
    conversation = Conversation(load_template("chatml"))
    encode = lambda text: list(text.encode())  # noqa: E731  one token per byte
    prompt, ids, dropped, budget = conversation.fit(encode, "x" * 30, max_new_tokens=50, context=120)
    assert len(ids) == 80 and (dropped, budget) == (0, 40) and prompt.endswith("<|im_start|>assistant\n")
    conversation.add_turn("a" * 20, "b" * 20)
    _, _, dropped, budget = conversation.fit(encode, "x" * 10, max_new_tokens=10, context=120)
    assert dropped == 1 and budget == 10 and not conversation.turns
    conversation.add_turn("a", "b")
    with pytest.raises(PromptTooLong, match="whole context of 120"):
        conversation.fit(encode, "x" * 100, max_new_tokens=10, context=120)
    assert conversation.turns == [("a", "b")]  # a refused message costs no history
