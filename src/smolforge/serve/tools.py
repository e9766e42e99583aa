"""Tool calling for the server: which template variable takes the tool schemas, and the
`<tool_call>{json}</tool_call>` blocks of a reply turned back into OpenAI `tool_calls`.

The reply format is the Hermes / Qwen / SmolLM3 convention that the bundled smollm3 template
teaches (and renders for past assistant turns): one JSON object `{"name": ..., "arguments":
{...}}` between `<tool_call>` and `</tool_call>` per call. A block that is not such an object is
left in the content as text, so nothing the model wrote disappears (DESIGN principle 3).
"""

from __future__ import annotations

import json
import secrets
from functools import lru_cache
from typing import Any

from jinja2 import meta

from smolforge.chat.render import _compile

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
# Template variables that receive the tool schemas, in order of preference: transformers passes
# `tools`; SmolLM3's own template reads `xml_tools`.
TOOL_VARIABLES = ("tools", "xml_tools")


@lru_cache(maxsize=32)
def template_variables(template: str) -> frozenset[str]:
    """Names a chat template reads without setting them itself (its inputs)."""
    environment = _compile(template).environment
    return frozenset(meta.find_undeclared_variables(environment.parse(template)))


def tools_variable(template: str) -> str | None:
    """The variable this template renders tool schemas from, or None when it has none."""
    names = template_variables(template)
    return next((name for name in TOOL_VARIABLES if name in names), None)


def new_call_id() -> str:
    """An OpenAI-style tool call id (`call_` + 24 random characters)."""
    return "call_" + secrets.token_hex(12)


def tool_call_from_json(body: str) -> dict[str, Any] | None:
    """The OpenAI `tool_calls` entry for one block's text, or None when it is not a call.

    `arguments` is sent as a JSON string, as OpenAI does; a model that wrote a string already
    keeps it. Some models write "parameters" for "arguments" (Llama 3's convention).
    """
    try:
        call = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not call["name"]:
        return None
    arguments = call.get("arguments", call.get("parameters", {}))
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return {"id": new_call_id(), "type": "function",
            "function": {"name": call["name"], "arguments": arguments}}


def parse_tool_calls(text: str) -> tuple[str, list[dict[str, Any]]]:
    """(content without the call blocks, calls) of a whole reply."""
    parser = ToolCallParser()
    content, calls = parser.feed(text)
    more_content, more_calls = parser.finish()
    return content + more_content, calls + more_calls


class ToolCallParser:
    """Incremental `parse_tool_calls` for streams: `feed` text pieces, get back (content delta,
    calls completed in this piece). Text that may be the start of `<tool_call>` is held until
    the next piece shows whether it is; a block's text is held until `</tool_call>` closes it.
    A block still open at the end (the reply was cut) is returned as content by `finish`.
    """

    def __init__(self) -> None:
        self._pending = ""
        self._in_call = False

    def feed(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        self._pending += text
        content, calls = "", []
        while self._pending:
            if self._in_call:
                close = self._pending.find(TOOL_CALL_CLOSE)
                if close == -1:
                    break
                body = self._pending[len(TOOL_CALL_OPEN):close]
                block = self._pending[:close + len(TOOL_CALL_CLOSE)]
                self._pending = self._pending[close + len(TOOL_CALL_CLOSE):]
                self._in_call = False
                call = tool_call_from_json(body)
                if call is None:
                    content += block
                else:
                    calls.append(call)
                continue
            start = self._pending.find(TOOL_CALL_OPEN)
            if start == -1:
                keep = _partial_suffix(self._pending, TOOL_CALL_OPEN)
                content += self._pending[:len(self._pending) - keep]
                self._pending = self._pending[len(self._pending) - keep:]
                break
            content += self._pending[:start]
            self._pending = self._pending[start:]
            self._in_call = True
        return content, calls

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        """Whatever was held back once the reply has ended (an unclosed block stays text)."""
        rest, self._pending, self._in_call = self._pending, "", False
        return rest, []


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper start of `tag`."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-size:]):
            return size
    return 0
