"""`smolforge template render`: show one SFT example as the model sees it, trained tokens marked.

Looking at a rendered example is the cheapest check of a chat template and a data set (Smol
Training Playbook, ch. 07: the `custom_instructions=None` bug that dropped every system prompt
was found by looking). Trained tokens are bold green in a terminal and wrapped in `[[...]]`
otherwise, so the output can be read in a log or compared in a test.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path
from typing import Any

from smolforge.chat.render import (
    BUNDLED_TEMPLATES,
    load_template,
    render_for_training,
    render_with_spans,
    template_name,
)
from smolforge.errors import SmolforgeError, where

MARK_START, MARK_END = "[[", "]]"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `smolforge template render` to the CLI."""
    parser = subparsers.add_parser("template", help="Inspect chat templates on SFT data.")
    commands = parser.add_subparsers(dest="template_command", metavar="COMMAND", required=True)
    render = commands.add_parser(
        "render", help="Print one example as the model sees it, with trained tokens highlighted."
    )
    render.add_argument("data", metavar="DATA",
                        help='JSONL file of {"messages": [...], optional "chat_template_kwargs"}.')
    render.add_argument("--index", type=int, default=0, metavar="N",
                        help="0-based index of the example among the non-blank lines (default 0).")
    render.add_argument("--template", default=None, metavar="NAME|PATH",
                        help=f"{', '.join(BUNDLED_TEMPLATES)}, 'tokenizer' (the tokenizer's own "
                             "template) or a .jinja file. Default: the tokenizer's template when "
                             "it has one, else chatml.")
    render.add_argument("--tokenizer", default=None, metavar="DIR",
                        help="Tokenizer or checkpoint directory; without it, characters instead "
                             "of tokens are counted.")
    render.add_argument("--kwargs", default=None, metavar="JSON",
                        help='Template variables as a JSON object, e.g. \'{"enable_thinking": '
                             'false}\'; they override the example\'s chat_template_kwargs.')
    render.set_defaults(func=_render_command)


def read_example(path: str | Path, index: int) -> tuple[int, dict[str, Any]]:
    """The `index`-th non-blank line of a JSONL file and its 1-based line number."""
    if index < 0:
        raise SmolforgeError(f"--index {index} must be 0 or more.")
    path = Path(path)
    if not path.is_file():
        raise SmolforgeError(f"{path}: no such file.")
    seen = 0
    with path.open(encoding="utf-8") as lines:
        for line_no, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            if seen == index:
                return line_no, _parse_line(path, line_no, line)
            seen += 1
    raise SmolforgeError(f"{path}: --index {index} is out of range, the file has {seen} examples.")


def _parse_line(path: Path, line_no: int, line: str) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise SmolforgeError(f"{where(path, line_no)}: malformed JSON ({exc.msg}).") from None
    if not isinstance(record, dict):
        raise SmolforgeError(f"{where(path, line_no)}: expected a JSON object, got "
                             f"{type(record).__name__}.")
    if "messages" not in record:
        raise SmolforgeError(f"{where(path, line_no, 'messages')} is missing.")
    kwargs = record.get("chat_template_kwargs")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise SmolforgeError(f"{where(path, line_no, 'chat_template_kwargs')} must be an object, "
                             f"got {type(kwargs).__name__}.")
    return record


def _template_kwargs(record: dict[str, Any], cli_kwargs: str | None) -> dict[str, Any]:
    kwargs = dict(record.get("chat_template_kwargs") or {})
    if cli_kwargs:
        try:
            extra = json.loads(cli_kwargs)
        except json.JSONDecodeError as exc:
            raise SmolforgeError(f"--kwargs is not valid JSON ({exc.msg}).") from None
        if not isinstance(extra, dict):
            raise SmolforgeError(f"--kwargs must be a JSON object, got {type(extra).__name__}.")
        kwargs.update(extra)
    reserved = sorted(set(kwargs) & {"messages", "add_generation_prompt", "tokenizer", "template"})
    if reserved:
        raise SmolforgeError(f"template variable(s) {', '.join(reserved)} cannot be set: "
                             "they are given by the data and the command.")
    return kwargs


def _marked(text: str, spans: list[tuple[int, int]]) -> list[tuple[str, bool]]:
    """`text` cut into (piece, trained) runs; `spans` are sorted character ranges."""
    pieces, pos = [], 0
    for start, end in spans:
        start = max(start, pos)
        if start > pos:
            pieces.append((text[pos:start], False))
        if end > start:
            pieces.append((text[start:end], True))
        pos = max(pos, end)
    if pos < len(text):
        pieces.append((text[pos:], False))
    return pieces


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


def _render_command(args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.text import Text

    from smolforge.tokenizer import Tokenizer

    line_no, record = read_example(args.data, args.index)
    kwargs = _template_kwargs(record, args.kwargs)
    tokenizer = Tokenizer.load(args.tokenizer) if args.tokenizer else None
    choice = args.template or ("tokenizer" if tokenizer and tokenizer.chat_template else "chatml")
    template = load_template(choice, tokenizer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            if tokenizer is not None:
                example = render_for_training(tokenizer, record["messages"], template, **kwargs)
                offsets = tokenizer.backend.encode(example.text, add_special_tokens=False).offsets
                text = example.text
                trained = _merge([o for o, m in zip(offsets, example.assistant_mask) if m])
                counts = (f"{len(example.input_ids)} tokens, {example.num_trained} trained "
                          f"({100 * example.num_trained / max(len(example.input_ids), 1):.1f}%)")
            else:
                text, spans = render_with_spans(template, record["messages"],
                                                **{"keep_all_reasoning": True, **kwargs})
                trained = _merge(spans)
                chars = sum(end - start for start, end in trained)
                counts = (f"{len(text)} characters, {chars} trained (pass --tokenizer to count "
                          "tokens)")
        except SmolforgeError as exc:
            raise SmolforgeError(f"{where(args.data, line_no)} {exc}") from None

    label = template_name(template)
    if choice == "tokenizer":
        label = f"the tokenizer's ({label})"
    elif label == "custom":
        label = choice
    console = Console(highlight=False, emoji=False)
    console.print(f"[bold]{escape(str(args.data))}:{line_no}[/bold] example {args.index}, "
                  f"template {escape(label)}", soft_wrap=True)
    pieces = _marked(text, trained)
    end = "" if text.endswith("\n") else "\n"  # the text's own final newline ends the block
    if console.is_terminal:
        shown = Text()
        for piece, is_trained in pieces:
            shown.append(piece, style="bold green" if is_trained else "dim")
        console.print(shown, soft_wrap=True, end=end)
    else:
        plain = "".join(f"{MARK_START}{p}{MARK_END}" if t else p for p, t in pieces)
        console.print(plain, markup=False, soft_wrap=True, end=end)
    console.print(escape(counts))
    for warning in caught:
        console.print(f"[yellow]warning:[/yellow] {escape(str(warning.message))}")
