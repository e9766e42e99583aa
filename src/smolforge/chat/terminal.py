"""`smolforge chat CKPT`: a multi-turn chat with a checkpoint in the terminal.

Each turn renders the whole conversation (system prompt, earlier turns, the new message) with the
checkpoint's own chat template, so the model sees exactly the layout it was trained on (Smol
Training Playbook, ch. 07: "the chat template is part of the model"). The reply streams from the
one inference engine (`Engine.stream`) and stops at the end-of-turn token (`<|im_end|>` for
ChatML-style templates) or EOS.

Hybrid-reasoning templates (smollm3, Qwen3) switch reasoning with `enable_thinking`: `/think` and
`/no_think` flip it between turns. Reasoning (`<think>...</think>`) is shown dimmed as it streams
and is left out of the history: these templates render earlier assistant turns without their
reasoning, so the model never sees it again (SmolLM3 and Qwen3 chat templates do the same).

When the conversation plus `--max-new-tokens` no longer fits the model's context, the oldest
turns are dropped, and when the new message alone leaves less room the reply is shortened; the
user is told either way instead of the chat failing.

The loop reads lines through a `read_line` function and writes to a rich `Console`, so tests and
other front ends can drive it without a terminal.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from smolforge.chat.reasoning import ReasoningSplitter, prompt_opens_think, split_reasoning
from smolforge.chat.render import (
    end_of_turn_ids,
    render_messages,
    require_chat_template,
    template_name,
)
from smolforge.engine import Engine, InvalidSamplingParam, SamplingParams
from smolforge.errors import SmolforgeError

HELP = """\
Commands:
  /think            reasoning mode on (hybrid templates: the model thinks before answering)
  /no_think         reasoning mode off
  /system TEXT      set the system prompt (/system alone: back to the template's default)
  /reset            forget the conversation (the system prompt stays)
  /help             this list
  /quit             leave (also /exit, Ctrl-D)
Anything else is sent to the model as your message."""


class PromptTooLong(SmolforgeError):
    """The new message alone (with room for the reply) does not fit the model's context."""


@dataclass
class Conversation:
    """The chat's state: system prompt, reasoning mode and the finished (user, answer) turns.

    Pure state and rendering, no I/O; answers are stored without their reasoning.
    """

    template: str
    system: str | None = None
    enable_thinking: bool = True
    turns: list[tuple[str, str]] = field(default_factory=list)

    def messages(self, user: str | None = None,
                 turns: list[tuple[str, str]] | None = None) -> list[dict[str, str]]:
        """The conversation as chat messages (`turns` instead of the stored ones when given),
        with `user` as the newest message when given."""
        messages = [{"role": "system", "content": self.system}] if self.system else []
        for question, answer in self.turns if turns is None else turns:
            messages += [{"role": "user", "content": question},
                         {"role": "assistant", "content": answer}]
        if user is not None:
            messages.append({"role": "user", "content": user})
        return messages

    def render(self, user: str, turns: list[tuple[str, str]] | None = None) -> str:
        """The prompt for a reply to `user`: the conversation and the generation prompt."""
        return render_messages(self.template, self.messages(user, turns),
                               add_generation_prompt=True, enable_thinking=self.enable_thinking)

    def fit(self, encode: Callable[[str], list[int]], user: str, max_new_tokens: int,
            context: int) -> tuple[str, list[int], int, int]:
        """(prompt, its ids, turns dropped, reply budget) for a reply to `user`.

        The oldest turns are dropped until prompt + `max_new_tokens` fit the context; they are
        gone for good (later prompts would not fit them either). When the new message alone
        still leaves less room, the reply budget shrinks to what is left. `PromptTooLong` when
        nothing is left, and then the history is untouched.
        """
        kept = list(self.turns)
        while True:
            prompt = self.render(user, kept)
            ids = encode(prompt)
            if len(ids) + max_new_tokens <= context or not kept:
                break
            kept.pop(0)
        budget = min(max_new_tokens, context - len(ids))
        if budget < 1:
            raise PromptTooLong(f"your message makes a {len(ids)}-token prompt, which fills the "
                                f"model's whole context of {context} tokens: shorten it")
        dropped = len(self.turns) - len(kept)
        self.turns[:] = kept
        return prompt, ids, dropped, budget

    def add_turn(self, user: str, answer: str) -> None:
        self.turns.append((user, answer))

    def reset(self) -> None:
        self.turns.clear()


class ReplyPrinter:
    """Streams one reply to the console: reasoning dimmed, the answer plain.

    The `<think>` tags themselves are not shown; whitespace around the reasoning is trimmed so
    the reasoning and the answer each start on a line of their own.
    """

    def __init__(self, console: Any, in_think: bool) -> None:
        self.console = console
        self.splitter = ReasoningSplitter(in_think)
        self.shown_reasoning = False
        self.shown_answer = False
        self.reasoning_tail = ""  # trailing whitespace of the reasoning, held until more comes

    def feed(self, text: str) -> None:
        reasoning, answer = self.splitter.feed(text)
        self._show(reasoning, answer)

    def finish(self) -> None:
        reasoning, answer = self.splitter.finish()
        self._show(reasoning, answer)
        if self.shown_reasoning or self.shown_answer:
            self.console.print()

    def _show(self, reasoning: str, answer: str) -> None:
        if reasoning:
            if not self.shown_reasoning:
                reasoning = reasoning.lstrip()
            body = (self.reasoning_tail + reasoning).rstrip()
            self.reasoning_tail = (self.reasoning_tail + reasoning)[len(body):]
            if body:
                self._write(body, style="dim")
                self.shown_reasoning = True
        if answer:
            if not self.shown_answer:
                answer = answer.lstrip() if self.splitter.saw_block else answer
                if answer and self.shown_reasoning:
                    self._write("\n")
            if answer:
                self._write(answer)
                self.shown_answer = True

    def _write(self, text: str, style: str | None = None) -> None:
        self.console.print(text, style=style, end="", markup=False, highlight=False,
                           emoji=False, soft_wrap=True)


@dataclass
class ChatResult:
    """What one turn produced (the loop keeps `answer` in the history)."""

    text: str  # the raw reply, reasoning included, without the end-of-turn token
    answer: str
    tokens: int
    finish_reason: str
    seconds: float


def reply(engine: Engine, prompt: str, ids: list[int], params: SamplingParams,
          printer: ReplyPrinter) -> ChatResult:
    """Generate one reply to an encoded prompt, streaming it through `printer`."""
    started = time.perf_counter()
    pieces, tokens, reason = [], 0, "length"
    for deltas in engine.stream([ids], params):
        for delta in deltas:
            pieces.append(delta.text)
            tokens += len(delta.tokens)
            printer.feed(delta.text)
            reason = delta.finish_reason or reason
    printer.finish()
    text = "".join(pieces)
    _, answer = split_reasoning(text, in_think=prompt_opens_think(prompt))
    return ChatResult(text, answer, tokens, reason, time.perf_counter() - started)


def handle_command(line: str, conversation: Conversation, console: Any) -> bool:
    """Apply a /command; return False when it asks to leave."""
    name, _, rest = line.partition(" ")
    if rest.strip() and name != "/system":
        _note(console, f"{name} takes no text (nothing was sent): send a message on its own line",
              "red")
        return True
    if name in ("/quit", "/exit"):
        return False
    if name == "/help":
        _note(console, HELP)
    elif name in ("/think", "/no_think"):
        conversation.enable_thinking = name == "/think"
        note = "" if "enable_thinking" in conversation.template else (
            " (this chat template has no reasoning mode, so it changes nothing)")
        _note(console, f"reasoning mode {'on' if conversation.enable_thinking else 'off'}{note}",
              "cyan")
    elif name == "/reset":
        conversation.reset()
        _note(console, "conversation cleared", "cyan")
    elif name == "/system":
        conversation.system = rest.strip() or None
        shown = f"system prompt: {conversation.system}" if conversation.system else (
            "system prompt cleared: the template's default applies")
        _note(console, shown, "cyan")
    else:
        _note(console, f"unknown command {name}: /help lists the commands", "red")
    return True


def run_chat(engine: Engine, tokenizer: Any, conversation: Conversation, params: SamplingParams,
             console: Any, read_line: Callable[[], str]) -> int:
    """The chat loop: read a line, run a command or answer it, until /quit or end of input.

    `read_line` returns one line (without its newline) and raises EOFError at the end of input.
    Ctrl-C while a reply streams stops that reply (the turn is not kept); at the prompt it ends
    the chat. Returns the exit status (0).
    """
    context = engine.model.config.max_seq_len
    while True:
        try:
            line = read_line().strip()
        except (EOFError, KeyboardInterrupt):
            console.print()
            return 0
        if not line:
            continue
        if line.startswith("/"):
            if not handle_command(line, conversation, console):
                return 0
            continue
        try:
            prompt, ids, dropped, budget = conversation.fit(tokenizer.encode, line,
                                                            params.max_new_tokens, context)
        except PromptTooLong as exc:
            _note(console, f"error: {exc}", "red")
            continue
        if dropped:
            _note(console, f"(dropped the {dropped} oldest turn{'s' * (dropped > 1)} to fit the "
                           f"context of {context} tokens)", "yellow")
        if budget < params.max_new_tokens:
            _note(console, f"(this reply is limited to {budget} tokens by the context of "
                           f"{context})", "yellow")
        printer = ReplyPrinter(console, in_think=prompt_opens_think(prompt))
        try:
            result = reply(engine, prompt, ids, replace(params, max_new_tokens=budget), printer)
        except KeyboardInterrupt:
            _note(console, "\n(reply interrupted; this turn is not kept)", "yellow")
            continue
        conversation.add_turn(line, result.answer)
        speed = result.tokens / max(result.seconds, 1e-9)
        cut = ", cut at the token limit" if result.finish_reason == "length" else ""
        _note(console, f"[{result.tokens} tokens, {speed:.1f} tokens/s{cut}]", "dim")


def _note(console: Any, text: str, style: str | None = None) -> None:
    """A line of the chat's own (not the model's) text, printed verbatim."""
    console.print(text, style=style, markup=False, highlight=False, emoji=False, soft_wrap=True)


# --- CLI ----------------------------------------------------------------------------------------


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `smolforge chat` to the CLI."""
    parser = subparsers.add_parser(
        "chat", help="Chat with a checkpoint in the terminal (multi-turn, streamed).",
        description="Multi-turn chat with a checkpoint through its own chat template. Replies "
                    "stream; reasoning is shown dimmed. Type /help inside for the commands "
                    "(/think, /no_think, /system TEXT, /reset, /quit).")
    parser.add_argument("checkpoint", help="Checkpoint directory (smolforge or Hugging Face) with a chat template.")
    parser.add_argument("--system", default=None, help="System prompt (default: the template's own).")
    parser.add_argument("--no-think", action="store_true",
                        help="Start with reasoning mode off (enable_thinking=false); /think turns it on.")
    parser.add_argument("--temperature", type=float, default=0.6,
                        help="Sampling temperature; 0 = greedy (default 0.6, SmolLM3's recommendation).")
    parser.add_argument("--top-k", type=int, default=0, help="Sample among the k most likely tokens; 0 = off.")
    parser.add_argument("--top-p", type=float, default=0.95, help="Nucleus sampling probability mass; 1 = off.")
    parser.add_argument("--min-p", type=float, default=0.0, help="Drop tokens below min-p x the top probability.")
    parser.add_argument("--repetition-penalty", type=float, default=1.0,
                        help="CTRL penalty on tokens already seen; 1 = off.")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="Most tokens per reply (default: half the context, at most 1024).")
    parser.add_argument("--seed", type=int, default=None, help="Seed the session's sampling for reproducible chats.")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N; default cuda when available.")
    parser.set_defaults(func=_chat_command)


def _read_line() -> str:
    import sys

    line = input(">>> ")
    if not sys.stdin.isatty():  # piped input: echo it, so the transcript reads as a chat
        print(line)
    return line


def _chat_command(args: argparse.Namespace) -> int:
    import sys

    import torch
    from rich.console import Console
    from rich.markup import escape

    from smolforge.train.checkpoint import load_model

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_model(args.checkpoint, device=device)
    template = require_chat_template(tokenizer, args.checkpoint,
                                     " (or use `smolforge generate` for plain text)")
    context = model.config.max_seq_len
    max_new_tokens = min(1024, context // 2) if args.max_new_tokens is None else args.max_new_tokens
    params = SamplingParams(
        max_new_tokens=max_new_tokens, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
        stop_token_ids=end_of_turn_ids(tokenizer))
    try:
        params.validate()
    except InvalidSamplingParam as exc:
        raise SmolforgeError(f"--{exc.field.replace('_', '-')}: {exc}") from None
    if max_new_tokens >= context:
        raise SmolforgeError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the "
                             f"model's context of {context} tokens")
    if args.seed is not None:
        torch.manual_seed(args.seed)  # one stream for the session: a repeated message still varies
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:  # Windows
            pass
    console = Console(highlight=False, emoji=False)
    conversation = Conversation(template, system=args.system, enable_thinking=not args.no_think)
    size = sum(p.numel() for p in model.parameters())
    console.print(f"[bold]smolforge chat[/bold] {escape(str(args.checkpoint))}: {size / 1e6:.1f}M parameters, "
                  f"context {context} tokens, template {template_name(template)}, reasoning "
                  f"{'on' if conversation.enable_thinking else 'off'}, on {device}. "
                  "/help for commands, Ctrl-D or /quit to leave.", highlight=False, soft_wrap=True)
    return run_chat(Engine(model, tokenizer), tokenizer, conversation, params, console, _read_line)
