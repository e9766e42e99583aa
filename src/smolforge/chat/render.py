"""Render conversations with Jinja chat templates and mark the tokens a model is trained on.

Templates run in the sandboxed Jinja environment that transformers' `apply_chat_template` builds
(trim_blocks, lstrip_blocks, `raise_exception`, a `tojson` keeping non-ASCII, `strftime_now`), so
a checkpoint's template renders the same text in both (DESIGN.md principle 2).

Training masks follow TRL / transformers (`return_assistant_tokens_mask=True`): the template
wraps what the assistant generates in `{% generation %}...{% endgeneration %}`; the character
spans of those blocks are recorded while rendering and every token that overlaps one is trained
(Smol Training Playbook, ch. 07: "mask user turns").
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from smolforge.errors import SmolforgeError

if TYPE_CHECKING:
    from smolforge.tokenizer import Tokenizer

BUNDLED_TEMPLATES = ("chatml", "smollm3")
# Chat templates end an assistant turn with a marker of their own: ChatML's <|im_end|> (SmolLM,
# Qwen), Llama 3's <|eot_id|>, Gemma's <end_of_turn>. Generation stops at whichever of them the
# vocabulary holds, besides the tokenizer's EOS (which the engine adds).
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>")
ROLES = ("system", "user", "assistant", "tool")
IGNORE_INDEX = -100  # the label PyTorch's cross-entropy skips
# Names that datasets use for an assistant's reasoning; transformers copies the first one found to
# `reasoning_content` (what templates read) and `thinking`, and so do we.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
_GENERATION_TAG = re.compile(r"\{%[-+]?\s*generation\s*[-+]?%\}")


@dataclass
class RenderedExample:
    """One conversation as the model sees it in training.

    `labels[i]` is `input_ids[i]` where `assistant_mask[i]` is 1 and -100 elsewhere; like Hugging
    Face labels they are not shifted (the loss compares position i's logits with labels[i + 1]).
    """

    input_ids: list[int]
    labels: list[int]
    assistant_mask: list[int]
    text: str
    spans: list[tuple[int, int]] = field(default_factory=list)  # generation blocks, in chars

    @property
    def num_trained(self) -> int:
        return sum(self.assistant_mask)


# ---- the Jinja environment ------------------------------------------------------------------


@dataclass
class _Tracker:
    """Where the generation blocks of one rendering start and end, in characters."""

    rendered: int = 0  # characters emitted so far by the top-level render loop
    spans: list[tuple[int, int]] = field(default_factory=list)


_TRACKER: ContextVar[_Tracker | None] = ContextVar("smolforge_generation_tracker", default=None)


class _GenerationExtension(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: renders its body unchanged and records its span.

    The start offset is the length of what the top-level render loop has emitted so far, which is
    how transformers computes it too, so both agree even on odd templates (e.g. a generation block
    inside a macro, whose output is buffered).
    """

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_mark", []), [], [], body).set_lineno(lineno)

    def _mark(self, caller: Any) -> str:
        text = caller()
        tracker = _TRACKER.get()
        if tracker is not None:
            tracker.spans.append((tracker.rendered, tracker.rendered + len(text)))
        return text


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters ("<" becomes "\u003c"), which would change the
    # text a model sees; transformers replaces it with plain json.dumps, and so do we.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent,
                      separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _check_name(name: object) -> None:
    if isinstance(name, str) and name.startswith("_"):
        raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} starts with '_'.")


class _Namespace(jinja2.utils.Namespace):
    """`namespace()` that refuses underscore names, as transformers' does (no sandbox escape)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # Jinja's signature trick: self in args
        self, attrs = args[0], dict(*args[1:], **kwargs)
        for name in attrs:
            _check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)


@lru_cache(maxsize=32)
def _compile(template: str) -> jinja2.Template:
    """Compile once per template text: a training run renders the same template millions of times."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationExtension, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now,
                       namespace=_Namespace)
    return env.from_string(template)


@contextmanager
def _tracking() -> Iterator[_Tracker]:
    token = _TRACKER.set(tracker := _Tracker())
    try:
        yield tracker
    finally:
        _TRACKER.reset(token)


# ---- loading templates ----------------------------------------------------------------------


@lru_cache(maxsize=8)
def _bundled(name: str) -> str:
    return (resources.files("smolforge.chat") / "templates" / f"{name}.jinja").read_text("utf-8")


def _check_syntax(template: str, source: str) -> None:
    try:
        _compile(template)
    except jinja2.TemplateSyntaxError as exc:
        raise SmolforgeError(f"{source}:{exc.lineno}: invalid Jinja template ({exc.message}).") from None


def load_template(name_or_path: str, tokenizer: Tokenizer | None = None) -> str:
    """The text of a chat template.

    `name_or_path` is "chatml" or "smollm3" (bundled), "tokenizer" (the tokenizer's own template,
    e.g. one a checkpoint was trained with) or the path of a .jinja file.
    """
    if name_or_path in BUNDLED_TEMPLATES:
        return _bundled(name_or_path)
    if name_or_path == "tokenizer":
        if tokenizer is None:
            raise SmolforgeError("template 'tokenizer' needs a tokenizer: pass one (--tokenizer DIR).")
        if not tokenizer.chat_template:
            raise SmolforgeError(
                "the tokenizer has no chat template: choose one of "
                f"{', '.join(BUNDLED_TEMPLATES)} or a .jinja file."
            )
        _check_syntax(tokenizer.chat_template, "the tokenizer's chat_template")
        return tokenizer.chat_template
    path = Path(name_or_path).expanduser()
    if path.is_file():
        template = path.read_text(encoding="utf-8")
        _check_syntax(template, str(path))
        return template
    raise SmolforgeError(
        f"unknown chat template {name_or_path!r}: use {', '.join(BUNDLED_TEMPLATES)}, 'tokenizer' "
        "or the path of an existing .jinja file."
    )


def template_name(template_text: str) -> str:
    """"chatml" or "smollm3" when `template_text` is that bundled template, else "custom"."""
    for name in BUNDLED_TEMPLATES:
        if template_text == _bundled(name):
            return name
    return "custom"


# ---- messages -------------------------------------------------------------------------------


def _check_messages(messages: Any) -> None:
    """Raise SmolforgeError naming the field (`messages[2].content`) of the first bad value.

    The message starts with "field '...'": callers that read a file put `file:line` before it.
    """
    if not isinstance(messages, (list, tuple)):
        raise SmolforgeError(f"field 'messages' must be a list of messages, got {type(messages).__name__}.")
    if not messages:
        raise SmolforgeError("field 'messages' is an empty list: there is nothing to render.")
    for i, message in enumerate(messages):
        name = f"messages[{i}]"
        if not isinstance(message, Mapping):
            raise SmolforgeError(f"field '{name}' must be an object with 'role' and 'content', "
                                 f"got {type(message).__name__}.")
        if (role := message.get("role")) is None:
            raise SmolforgeError(f"field '{name}.role' is missing.")
        if role not in ROLES:
            raise SmolforgeError(f"field '{name}.role' = {role!r} is not a known role "
                                 f"({', '.join(ROLES)}).")
        tool_calls = message.get("tool_calls")
        if tool_calls is not None and (role != "assistant" or not isinstance(tool_calls, list)
                                       or not all(isinstance(c, Mapping) for c in tool_calls)):
            raise SmolforgeError(f"field '{name}.tool_calls' must be a list of objects in an "
                                 "assistant message.")
        if (content := message.get("content")) is None:
            if role == "assistant" and tool_calls:
                continue  # a message that only calls tools has no content
            raise SmolforgeError(f"field '{name}.content' is missing.")
        if not isinstance(content, str):
            raise SmolforgeError(f"field '{name}.content' must be a string, got "
                                 f"{type(content).__name__}.")
        for key in _REASONING_FIELDS:
            if message.get(key) is not None and not isinstance(message[key], str):
                raise SmolforgeError(f"field '{name}.{key}' must be a string, got "
                                     f"{type(message[key]).__name__}.")


def _prepare(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The messages as transformers hands them to a template: None values dropped (templates
    test `is defined`, not `is none`) and reasoning copied under each name templates read."""
    prepared = []
    for message in messages:
        message = {k: v for k, v in message.items() if v is not None}
        reasoning = next((message[k] for k in _REASONING_FIELDS if k in message), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        prepared.append(message)
    return prepared


@lru_cache(maxsize=32)
def _template_fields(template: str) -> frozenset[str]:
    """Attribute and constant item names the template reads (`message.x`, `message["x"]`)."""
    tree = _compile(template).environment.parse(template)
    names = {node.attr for node in tree.find_all(nodes.Getattr)}
    names |= {node.arg.value for node in tree.find_all(nodes.Getitem)
              if isinstance(node.arg, nodes.Const) and isinstance(node.arg.value, str)}
    return frozenset(names)


def _warn_dropped_fields(template: str, messages: Sequence[Mapping[str, Any]],
                         kwargs: Mapping[str, Any]) -> None:
    """Warn when data would silently vanish from the rendered text (DESIGN.md principle 3)."""
    for key, names in (("reasoning_content", _REASONING_FIELDS), ("tool_calls", ("tool_calls",))):
        present = any(m.get(name) is not None for m in messages for name in names)
        if present and not _template_fields(template) & set(names):
            warnings.warn(f"messages carry '{key}' but the chat template never reads it: it is "
                          "dropped from the text (use the smollm3 template or put it in the content).",
                          stacklevel=4)
    if kwargs.get("custom_instructions") and messages[0].get("role") == "system" \
            and "custom_instructions" in template:
        warnings.warn("both a system message and 'custom_instructions' are given: the system "
                      "message is used.", stacklevel=4)


def _render(template: str, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool,
            kwargs: Mapping[str, Any]) -> tuple[str, list[tuple[int, int]]]:
    _check_messages(messages)
    _warn_dropped_fields(template, messages, kwargs)
    # transformers always defines `tools` and `documents` (None when not given).
    variables = {"tools": None, "documents": None, **kwargs}
    chunks = []
    try:
        with _tracking() as tracker:
            for chunk in _compile(template).generate(messages=_prepare(messages),
                                                     add_generation_prompt=add_generation_prompt,
                                                     **variables):
                chunks.append(chunk)
                tracker.rendered += len(chunk)
    except jinja2.TemplateError as exc:
        raise SmolforgeError(f"chat template ({template_name(template)}): {exc}") from None
    return "".join(chunks), tracker.spans


def render_messages(template: str, messages: Sequence[Mapping[str, Any]], *,
                    add_generation_prompt: bool = False, **kwargs: Any) -> str:
    """The text of `messages` under `template`, equal to transformers'
    `apply_chat_template(messages, chat_template=template, tokenize=False, **kwargs)`.

    `kwargs` are template variables (e.g. `enable_thinking`, `xml_tools`, `tools`).
    """
    return _render(template, messages, add_generation_prompt, kwargs)[0]


def render_with_spans(template: str, messages: Sequence[Mapping[str, Any]], *,
                      add_generation_prompt: bool = False,
                      **kwargs: Any) -> tuple[str, list[tuple[int, int]]]:
    """Like `render_messages`, plus the character spans of the `{% generation %}` blocks."""
    return _render(template, messages, add_generation_prompt, kwargs)


# ---- training examples ----------------------------------------------------------------------


def _token_mask(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[int]:
    """1 for every token whose characters overlap a generation span.

    The same single pass as transformers' `apply_chat_template`: spans and offsets are both in
    text order, and a token cut by a span boundary is trained (it is partly generated).
    """
    mask = [0] * len(offsets)
    span = 0
    for i, (start, end) in enumerate(offsets):
        while span < len(spans) and start >= spans[span][1]:
            span += 1
        if span == len(spans):
            break
        if end > spans[span][0]:
            mask[i] = 1
    return mask


def render_for_training(tokenizer: Tokenizer, messages: Sequence[Mapping[str, Any]],
                        template: str, *, keep_all_reasoning: bool = True,
                        **kwargs: Any) -> RenderedExample:
    """Token ids, labels and assistant mask of one conversation.

    The mask equals transformers' `apply_chat_template(messages, chat_template=template,
    tokenize=True, return_dict=True, return_assistant_tokens_mask=True, keep_all_reasoning=...,
    **kwargs)["assistant_masks"]`. `keep_all_reasoning` defaults to True because the playbook
    trains on the reasoning of every turn (ch. 07); templates that do not read it ignore it.
    The tokenizer's special tokens (`eos_token`, ...) are template variables, as in transformers.
    """
    if not _GENERATION_TAG.search(template):
        raise SmolforgeError(
            f"chat template ({template_name(template)}) has no {{% generation %}} block, so no "
            "token would be trained: wrap what the assistant writes in "
            "{% generation %}...{% endgeneration %} or use chatml / smollm3."
        )
    special = {f"{name}_token": getattr(tokenizer, f"{name}_token") for name in ("bos", "eos", "pad")}
    variables = {**{k: v for k, v in special.items() if v},
                 "keep_all_reasoning": keep_all_reasoning, **kwargs}
    text, spans = _render(template, messages, False, variables)
    encoding = tokenizer.backend.encode(text, add_special_tokens=False)
    mask = _token_mask(encoding.offsets, spans)
    ids = list(encoding.ids)
    labels = [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]
    _warn_untrained_turns(messages, spans)
    return RenderedExample(input_ids=ids, labels=labels, assistant_mask=mask, text=text,
                           spans=spans)


def _warn_untrained_turns(messages: Sequence[Mapping[str, Any]],
                          spans: list[tuple[int, int]]) -> None:
    """Warn when an assistant turn contributes no trained token (a template or data bug).

    Tokens cover every character of the text, so a generation block trains a token exactly when
    it is not empty.
    """
    assistants = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
    if not assistants:
        warnings.warn("the conversation has no assistant message: no token is trained.",
                      stacklevel=3)
        return
    trained = [end > start for start, end in spans]
    if len(trained) == len(assistants) and not all(trained):
        names = ", ".join(f"messages[{i}]" for i, ok in zip(assistants, trained) if not ok)
        warnings.warn(f"{names}: the assistant turn yields no trained token (its generation "
                      "block is empty).", stacklevel=3)
    elif sum(trained) < len(assistants):
        warnings.warn(f"{len(assistants)} assistant messages but only {sum(trained)} generation "
                      "blocks with trained tokens: some assistant turns are not trained.",
                      stacklevel=3)


def end_of_turn_ids(tokenizer: Any) -> list[int]:
    """Ids of the end-of-turn markers in the tokenizer's vocabulary (see END_OF_TURN_TOKENS)."""
    token_to_id = getattr(tokenizer, "token_to_id", None)
    if token_to_id is None:
        return []
    return [i for i in (token_to_id(token) for token in END_OF_TURN_TOKENS) if i is not None]


def require_chat_template(tokenizer: Any, source: str, hint: str = "") -> str:
    """The tokenizer's chat template, or a SmolforgeError naming `source` and how to get one."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise SmolforgeError(
            f"{source}: the tokenizer has no chat template (no chat_template in "
            "tokenizer_config.json nor chat_template.jinja), so user and assistant turns cannot be "
            "told apart: use a checkpoint trained by `smolforge sft`, or a model that ships a "
            f"template{hint}.")
    return template
