"""Engine output turned into OpenAI response bodies: whole replies and stream chunks.

A chat reply is split in two stages, the same whole or streamed:
1. reasoning: the `<think>...</think>` block becomes `reasoning_content` (DeepSeek's and vLLM's
   field name, which the Qwen3 / SmolLM3 chat front ends read), the rest is the answer;
2. tools (when the request offered tools): `<tool_call>` blocks of the answer become
   `tool_calls`, and the finish reason becomes "tool_calls".
The streamed pieces join up to exactly the non-streamed fields: whitespace that
`split_reasoning` strips (around the reasoning, before an answer that follows a block, around
content beside tool calls) is held back while it might be such whitespace, and dropped when it
turns out to be.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from smolforge.chat.reasoning import ReasoningSplitter, split_reasoning
from smolforge.serve.tools import ToolCallParser, parse_tool_calls


@dataclass
class ChatReply:
    """The message fields of one chat reply."""

    content: str | None
    reasoning_content: str | None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str = "stop"


def reply_finish_reason(engine_reason: str, called_tools: bool) -> str:
    """OpenAI's finish reason: "tool_calls" when the model ended its turn by calling tools; a
    reply cut by max_tokens stays "length" even if it completed a call first."""
    return "tool_calls" if called_tools and engine_reason == "stop" else engine_reason


def chat_reply(text: str, engine_reason: str, *, in_think: bool, tools: bool) -> ChatReply:
    """Split a whole reply. `in_think`: the prompt opened a `<think>` block (see
    `prompt_opens_think`); `tools`: the request offered tools, so call blocks are parsed."""
    reasoning, answer = split_reasoning(text, in_think)
    calls: list[dict[str, Any]] = []
    content: str | None = answer
    if tools:
        answer, calls = parse_tool_calls(answer)
        content = answer.strip() or (None if calls else "")
    return ChatReply(content, reasoning, calls, reply_finish_reason(engine_reason, bool(calls)))


class _Trimmer:
    """Passes a stream of text through, dropping leading whitespace (when `leading`) and
    holding each trailing run of whitespace until more text shows it is not the end."""

    def __init__(self, leading: bool) -> None:
        self.leading = leading
        self._held = ""

    def feed(self, text: str) -> str:
        if self.leading:
            text = text.lstrip()
            if not text:
                return ""
            self.leading = False
        text = self._held + text
        body = text.rstrip()
        self._held = text[len(body):]
        return body

    def finish(self) -> str:
        """The held whitespace, for streams that keep their trailing whitespace."""
        held, self._held = self._held, ""
        return held


class ChatStreamAssembler:
    """Incremental `chat_reply`: `feed` each engine text delta, get the OpenAI `delta` object
    to send (None when there is nothing to send yet); `finish` gives the last one and the
    finish reason."""

    def __init__(self, *, in_think: bool, tools: bool) -> None:
        self.tools = tools
        self._splitter = ReasoningSplitter(in_think)
        self._reasoning = _Trimmer(leading=True)
        self._content: _Trimmer | None = None  # made at the first answer text (see _answer)
        self._calls = ToolCallParser() if tools else None
        self.num_calls = 0

    def feed(self, text: str) -> dict[str, Any] | None:
        return self._delta(*self._splitter.feed(text))

    def finish(self, engine_reason: str) -> tuple[dict[str, Any] | None, str]:
        reasoning, answer = self._splitter.finish()
        delta = self._delta(reasoning, answer, final=True) or {}
        if self._content is not None and not self.tools:
            # Without tools the answer keeps its trailing whitespace, as split_reasoning does.
            tail = self._content.finish()
            if tail:
                delta["content"] = delta.get("content", "") + tail
        return delta or None, reply_finish_reason(engine_reason, self.num_calls > 0)

    def _delta(self, reasoning: str, answer: str, final: bool = False) -> dict[str, Any]:
        delta: dict[str, Any] = {}
        if piece := self._reasoning.feed(reasoning):
            delta["reasoning_content"] = piece
        calls: list[dict[str, Any]] = []
        if self._calls is not None:
            answer, calls = self._calls.feed(answer)
            if final:
                more, more_calls = self._calls.finish()
                answer, calls = answer + more, calls + more_calls
        if answer:
            if self._content is None:
                # By the first answer text the splitter knows whether a block came first.
                self._content = _Trimmer(leading=self.tools or self._splitter.saw_block)
            if piece := self._content.feed(answer):
                delta["content"] = piece
        if calls:
            delta["tool_calls"] = [{"index": self.num_calls + i, **call} for i, call in enumerate(calls)]
            self.num_calls += len(calls)
        return delta


# ---- response bodies ------------------------------------------------------------------------


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_completion(request_id: str, created: int, model: str, reply: ChatReply,
                    prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": reply.content,
                               "reasoning_content": reply.reasoning_content}
    if reply.tool_calls:
        message["tool_calls"] = reply.tool_calls
    return {"id": request_id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": reply.finish_reason}],
            "usage": usage(prompt_tokens, completion_tokens)}


def chat_chunk(request_id: str, created: int, model: str, delta: dict[str, Any] | None,
               finish_reason: str | None = None) -> dict[str, Any]:
    """One `chat.completion.chunk`; `delta` None with no finish reason is the usage chunk's
    empty choice list (see `usage_chunk`)."""
    return {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta or {}, "logprobs": None,
                         "finish_reason": finish_reason}]}


def text_completion(request_id: str, created: int, model: str, text: str, finish_reason: str,
                    prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {"id": request_id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
            "usage": usage(prompt_tokens, completion_tokens)}


def text_chunk(request_id: str, created: int, model: str, text: str,
               finish_reason: str | None = None) -> dict[str, Any]:
    return {"id": request_id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}]}


def usage_chunk(chunk: dict[str, Any], prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    """The extra last chunk of `stream_options.include_usage`: no choices, the usage."""
    return {**chunk, "choices": [], "usage": usage(prompt_tokens, completion_tokens)}
