"""`smolforge data check`: validate SFT files and show what a model would be trained on.

Why: the playbook (ch. 07) balances SFT sources by tokens, trains only assistant output, sets the
think / no_think mix on purpose, and its template bugs (a None `custom_instructions`, a system
prompt silently dropped) only show once rendered. So every record is rendered as SFT renders it
(`to_conversation` + `render_for_training`), every invalid one is listed rather than the first
only (DESIGN.md principle 3), and the playbook's dataset table is printed per source.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from smolforge.chat.render import RenderedExample, render_for_training, template_name
from smolforge.data.sft import FORMATS, SHOWN_LOCATIONS, resolve_template, to_conversation
from smolforge.data.sources import expand_paths, iter_records
from smolforge.errors import SmolforgeError, where

# Warning kinds, each counted once per example; `_render_kind` sorts `chat.render`'s warnings
# into them (one it does not know becomes a kind of its own).
WARNING_KINDS: dict[str, str] = {
    "custom_instructions_null": "chat_template_kwargs.custom_instructions is null or empty: the "
    "template falls back to its default system prompt (the playbook's None bug, ch. 07)",
    "system_empty": "the system prompt is empty or null",
    "system_dropped": "the system prompt never reaches the rendered text (template or format)",
    "untrained_turn": "an assistant turn yields no trained token",
    "no_assistant": "the conversation has no assistant message: no token is trained",
    "empty_content": "a message has empty content",
    "over_length": "longer than --seq-len: truncation would cut it",
    "dropped_field": "a field the chat template never reads is dropped from the text"}
_RENDER_WORDS = {"never reads it": "dropped_field", "'custom_instructions' are given": "dropped_field",
                 "no assistant message": "no_assistant", "no trained token": "untrained_turn",
                 "not trained": "untrained_turn"}
# Flags the smollm3 template strips from the end of a system message before showing it.
_SYSTEM_FLAGS = re.compile(r"(\s*/(system_override|no_think|think))+\s*$")
_GENERATION = re.compile(r"\{%[-+]?\s*generation\s*[-+]?%\}")
COLUMNS = ("source", "examples", "invalid", "tokens", "% tokens", "tokens/ex", "context/ex",
           "response/ex", "turns/ex", "think", "no_think", "over seq-len", "cut tokens")


@dataclass
class SourceStats:
    """Counters for one DATA path (or the total)."""

    name: str
    examples: int = 0  # valid records
    invalid: int = 0
    tokens: int = 0  # before any truncation
    response_tokens: int = 0  # trained: labels != -100
    turns: int = 0  # assistant messages
    think: int = 0
    no_think: int = 0
    over_length: int = 0
    cut_tokens: int = 0  # tokens truncation to seq_len would remove

    def count(self, messages: Sequence[Mapping[str, Any]], tokens: int, trained: int,
              mode: str | None, cut: int) -> None:
        """Add one valid example; `cut` = its tokens beyond seq_len."""
        self.examples, self.tokens = self.examples + 1, self.tokens + tokens
        self.response_tokens += trained
        self.turns += sum(m.get("role") == "assistant" for m in messages)
        self.think, self.no_think = self.think + (mode == "think"), self.no_think + (mode == "no_think")
        self.over_length, self.cut_tokens = self.over_length + (cut > 0), self.cut_tokens + cut

    def add(self, other: SourceStats) -> None:
        for f in fields(self)[1:]:
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def summary(self, all_tokens: int, has_modes: bool) -> dict[str, Any]:
        """The table row as numbers; shares are fractions, None where they do not apply."""
        n = self.examples
        mean = lambda value: value / n if n else 0.0  # noqa: E731
        return {"name": self.name, "examples": n, "invalid": self.invalid, "tokens": self.tokens,
                "token_share": self.tokens / all_tokens if all_tokens else 0.0,
                "mean_tokens": mean(self.tokens),
                "mean_context_tokens": mean(self.tokens - self.response_tokens),
                "mean_response_tokens": mean(self.response_tokens), "mean_turns": mean(self.turns),
                "think": self.think / n if has_modes and n else None,
                "no_think": self.no_think / n if has_modes and n else None,
                "over_seq_len": self.over_length, "cut_tokens": self.cut_tokens}


@dataclass
class CheckReport:
    """Everything `data check` found; `to_dict` is the --json output."""

    sources: list[SourceStats]
    template: str
    seq_len: int
    has_modes: bool  # the template has a reasoning mode (enable_thinking)
    errors: list[str] = field(default_factory=list)  # the first --max-errors
    warning_counts: dict[str, int] = field(default_factory=dict)
    warning_locations: dict[str, list[str]] = field(default_factory=dict)  # first few per kind

    @property
    def total(self) -> SourceStats:
        total = SourceStats("total")
        for source in self.sources:
            total.add(source)
        return total

    @property
    def invalid(self) -> int:
        return self.total.invalid

    def rows(self) -> list[dict[str, Any]]:
        """One summary per source, then the total."""
        total = self.total
        return [s.summary(total.tokens, self.has_modes) for s in [*self.sources, total]]

    def invalid_record(self, stats: SourceStats, message: str, max_errors: int) -> None:
        stats.invalid += 1
        if len(self.errors) < max_errors:
            self.errors.append(message)

    def warn(self, kind: str, location: str) -> None:
        self.warning_counts[kind] = self.warning_counts.get(kind, 0) + 1
        shown = self.warning_locations.setdefault(kind, [])
        if len(shown) < SHOWN_LOCATIONS:
            shown.append(location)

    def to_dict(self) -> dict[str, Any]:
        *sources, total = self.rows()
        return {"template": self.template, "seq_len": self.seq_len, "sources": sources,
                "total": total, "invalid": self.invalid, "errors": self.errors,
                "warnings": {kind: {"count": count, "message": WARNING_KINDS.get(kind, kind),
                                    "locations": self.warning_locations[kind]}
                             for kind, count in self.warning_counts.items()}}


def _records(path: Path) -> Iterator[tuple[str, Any, str | None]]:
    """(location, record, None), or (location, None, problem) for a line that is not JSON.

    JSON Lines are parsed here so that reading goes on past a malformed line (`iter_records`
    raises or only counts it); arrays and Parquet come from `iter_records`, whole or not at all.
    """
    suffix = path.suffix.lower()
    with path.open("rb") as handle:  # a .json file is an array or JSON Lines, as in `sources`
        lines = suffix == ".jsonl" or (suffix == ".json" and handle.read(4096).lstrip(
            b"\xef\xbb\xbf \t\r\n")[:1] != b"[")
    if not lines:
        yield from ((location, record, None) for location, record in iter_records(path))
        return
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if (line := raw.decode("utf-8", errors="replace").removeprefix("\ufeff")).strip():
                try:
                    yield where(path, number), json.loads(line), None
                except json.JSONDecodeError as exc:
                    yield where(path, number), None, (f"{where(path, number)}: malformed JSON "
                                                      f"({exc.msg} at column {exc.colno}).")


def reasoning_mode(messages: Sequence[Mapping[str, Any]], kwargs: Mapping[str, Any]) -> str:
    """"think" or "no_think", decided as smollm3.jinja does: `enable_thinking` (on when absent or
    None), overridden by a flag ending the system message, then by one ending the last user
    message (the user's flag wins; playbook ch. 07 `/think` `/no_think`)."""
    value = kwargs.get("enable_thinking")
    think = value is None or bool(value)
    flagged = [messages[0]] if messages and messages[0].get("role") == "system" else []
    users = [m for m in messages if m.get("role") == "user"]
    for message in flagged + users[-1:]:
        content = message.get("content")
        text = content.rstrip() if isinstance(content, str) else ""
        if text.endswith(("/think", "/no_think")):
            think = text.endswith("/think")
    return "think" if think else "no_think"


def _render_kind(message: str) -> str:
    """The warning kind of a `chat.render` warning, by its wording."""
    return next((kind for words, kind in _RENDER_WORDS.items() if words in message), message)


def _before_render(record: Any, messages: list[Any], kwargs: Mapping[str, Any], location: str,
                   found: dict[str, str]) -> None:
    """Warnings read off the data itself; they hold even when rendering then fails."""
    if "custom_instructions" in kwargs and not kwargs["custom_instructions"]:
        found["custom_instructions_null"] = f"{location} field 'chat_template_kwargs.custom_instructions'"
    if isinstance(record, dict) and "system" in record:
        # Alpaca / ShareGPT `system`: `to_conversation` skips a null or empty one, and the
        # messages and prompt/completion formats ignore the key: a persona lost without a word.
        system = record["system"]
        if not (isinstance(system, str) and system.strip()):
            found.setdefault("system_empty", f"{location} field 'system'")
        elif not any(m.get("role") == "system" and m.get("content") == system
                     for m in messages if isinstance(m, dict)):
            found.setdefault("system_dropped", f"{location} field 'system' (unused by the format)")
    for i, message in enumerate(m if isinstance(m, dict) else {} for m in messages):
        content, role = message.get("content"), message.get("role")
        if role == "system" and not (isinstance(content, str) and content.strip()):
            found.setdefault("system_empty", f"{location} field 'messages[{i}].content'")
        elif (isinstance(content, str) and not content.strip()
              and not (role == "assistant" and message.get("tool_calls"))):
            found.setdefault("empty_content", f"{location} field 'messages[{i}].content'")


def _after_render(messages: list[dict[str, Any]], kwargs: Mapping[str, Any],
                  rendered: RenderedExample, location: str, found: dict[str, str]) -> None:
    """Warnings that need the rendered text and its trained spans."""
    system = messages[0].get("content") if messages[0].get("role") == "system" else None
    name = "messages[0].content"
    if system is None and isinstance(kwargs.get("custom_instructions"), str):
        system, name = kwargs["custom_instructions"], "chat_template_kwargs.custom_instructions"
    if isinstance(system, str) and (needle := _SYSTEM_FLAGS.sub("", system).strip()) \
            and needle not in rendered.text:
        found.setdefault("system_dropped", f"{location} field '{name}'")
    trained = [rendered.text[start:end] for start, end in rendered.spans]
    for i, message in enumerate(messages):
        content = message.get("content") if message.get("role") == "assistant" else None
        # Reasoning written into the content is moved to the think block by smollm3: look for
        # the answer after </think>, which every template keeps in the generated text.
        answer = content.split("</think>")[-1].strip() if isinstance(content, str) else ""
        if answer and not any(answer in span for span in trained):
            found.setdefault("untrained_turn", f"{location} field 'messages[{i}].content'")


def _check_record(record: Any, location: str, fmt: str, tokenizer: Any, template: str,
                  kwargs: Mapping[str, Any], report: CheckReport,
                  found: dict[str, str]) -> tuple[list, str | None, RenderedExample]:
    """(messages, mode, rendering) of a record, or SmolforgeError; warnings go into `found`."""
    conversation = to_conversation(record, location, fmt)
    merged = {**kwargs, **conversation.chat_template_kwargs}
    messages = conversation.messages
    _before_render(record, messages, merged, location, found)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            rendered = render_for_training(tokenizer, messages, template, **merged)
        except SmolforgeError as exc:  # worded as `render_conversation` words it, for SFT parity
            raise SmolforgeError(f"{location} {exc}") from None
        except TypeError as exc:  # a kwarg that clashes with an argument, e.g. "messages"
            raise SmolforgeError(f"{location} field 'chat_template_kwargs': {exc}") from None
    for warning in caught:
        found.setdefault(_render_kind(str(warning.message)), location)
    _after_render(messages, merged, rendered, location, found)
    if len(rendered.input_ids) > report.seq_len:
        found["over_length"] = f"{location} ({len(rendered.input_ids):,} tokens)"
    return messages, reasoning_mode(messages, merged) if report.has_modes else None, rendered


def check_sft_data(paths: Sequence[str | Path], tokenizer: Any, template: str = "auto",
                   seq_len: int = 2048, fmt: str = "auto", kwargs: Mapping[str, Any] | None = None,
                   max_errors: int = 20) -> CheckReport:
    """Check every record of every path (one source per path); nothing is printed."""
    if seq_len < 1 or max_errors < 0:
        raise SmolforgeError(f"--seq-len must be >= 1 and --max-errors >= 0, got {seq_len} and "
                             f"{max_errors}")
    if fmt not in FORMATS:
        raise SmolforgeError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    files = [expand_paths([path]) for path in paths]  # every typo fails before any work
    text = resolve_template(template, tokenizer)
    if not _GENERATION.search(text):  # once here, rather than as the error of every record
        raise SmolforgeError(f"chat template ({template_name(text)}) has no {{% generation %}} "
                             "block, so no token would be trained: use chatml / smollm3.")
    report = CheckReport([], template_name(text), seq_len, has_modes="enable_thinking" in text)
    for path, source_files in zip(paths, files):
        report.sources.append(stats := SourceStats(str(path)))
        for file in source_files:
            try:
                for location, record, problem in _records(file):
                    found: dict[str, str] = {}  # kept even when the record is invalid
                    try:
                        if problem:
                            raise SmolforgeError(problem)
                        messages, mode, rendered = _check_record(record, location, fmt, tokenizer,
                                                                 text, kwargs or {}, report, found)
                        n = len(rendered.input_ids)
                        stats.count(messages, n, rendered.num_trained, mode, max(n - seq_len, 0))
                    except SmolforgeError as exc:
                        report.invalid_record(stats, str(exc), max_errors)
                    for kind, at in found.items():
                        report.warn(kind, at)
            except SmolforgeError as exc:  # a whole file unreadable: broken array, Parquet, .txt
                report.invalid_record(stats, str(exc), max_errors)
    return report


def _cells(row: dict[str, Any]) -> list[str]:
    share = lambda value: "-" if value is None else f"{100 * value:.1f}%"  # noqa: E731
    return [row["name"], f"{row['examples']:,}", f"{row['invalid']:,}", f"{row['tokens']:,}",
            share(row["token_share"]), f"{row['mean_tokens']:.1f}",
            f"{row['mean_context_tokens']:.1f}", f"{row['mean_response_tokens']:.1f}",
            f"{row['mean_turns']:.2f}", share(row["think"]), share(row["no_think"]),
            f"{row['over_seq_len']:,}", f"{row['cut_tokens']:,}"]


def _title(report: CheckReport) -> str:
    return (f"SFT data check (template {report.template}, seq-len {report.seq_len:,}; context = "
            f"not trained, response = trained tokens)")


def _trailer(report: CheckReport) -> list[tuple[str, str]]:
    """(style, line) for the errors, warnings and verdict printed after the table."""
    lines = []
    if report.invalid:
        listed = f"; the first {len(report.errors)}" if len(report.errors) < report.invalid else ""
        lines.append(("bold red", f"{report.invalid:,} invalid record(s){listed}:"))
        lines += [("red", f"  {error}") for error in report.errors]
    if report.warning_counts:
        lines.append(("bold yellow", "warnings (examples per kind, first locations):"))
    for kind, count in report.warning_counts.items():
        shown = report.warning_locations[kind]
        more = f" and {count - len(shown):,} more" if count > len(shown) else ""
        lines.append(("yellow", f"  {kind}: {count:,} - {WARNING_KINDS.get(kind, kind)} "
                                f"(at {', '.join(shown)}{more})"))
    total = report.total
    verdict = (f"{total.invalid:,} of {total.examples + total.invalid:,} records invalid"
               if report.invalid else f"all {total.examples:,} records valid")
    lines.append(("bold", f"{verdict}, {sum(report.warning_counts.values()):,} warning(s)"))
    return lines


def format_report(report: CheckReport) -> str:
    """The report as plain aligned text (for pipes, files and tests)."""
    table = [list(COLUMNS)] + [_cells(row) for row in report.rows()]
    widths = [max(len(r[i]) for r in table) for i in range(len(COLUMNS))]
    lines = [_title(report)]
    for row in table:
        lines.append("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                               for i, (cell, w) in enumerate(zip(row, widths))).rstrip())
    return "\n".join(lines + [line for _, line in _trailer(report)])


def print_rich(report: CheckReport) -> None:
    """The report as a rich table, for a terminal; transposed (one column per source) when the
    terminal is too narrow for 13 columns."""
    from rich import box
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    rows = [[escape(cell) for cell in _cells(row)] for row in report.rows()]
    table, bold = Table(title=_title(report), box=box.SIMPLE_HEAD), len(rows) - 1  # the total
    if console.width >= len(format_report(report).splitlines()[1]) + 2 * len(COLUMNS):
        for i, name in enumerate(COLUMNS):
            table.add_column(name, justify="left" if i == 0 else "right", no_wrap=i > 0)
        for i, cells in enumerate(rows):
            table.add_row(*cells, style="bold" if i == bold else None)
    else:
        table.add_column("")
        for i, cells in enumerate(rows):
            table.add_column(cells[0], justify="right", style="bold" if i == bold else None)
        for j, name in enumerate(COLUMNS[1:], start=1):
            table.add_row(name, *(cells[j] for cells in rows))
    console.print(table)
    for style, line in _trailer(report):
        console.print(escape(line), style=style, highlight=False, soft_wrap=True)


def add_check_command(data_subparsers: argparse._SubParsersAction) -> None:
    """Add `smolforge data check`."""
    parser = data_subparsers.add_parser(
        "check", help="Validate SFT files; show their tokens, turns and reasoning modes.",
        description="Render every SFT record with the chat template, list invalid records (file:line "
                    "field) and warnings, print a table per source. Exit 1 if a record is invalid.")
    add = parser.add_argument
    add("data", nargs="+", metavar="DATA", help="SFT files, directories or globs (.jsonl, .json, "
        ".parquet); one table row per DATA.")
    add("--tokenizer", required=True, help="Tokenizer or checkpoint directory, or Hub id.")
    add("--template", default="auto", help="Chat template: auto (the tokenizer's, else smollm3), "
        "chatml, smollm3, tokenizer or a .jinja path. Default: auto.")
    add("--seq-len", type=int, default=2048, help="Sequence length: longer examples are counted "
        "with the tokens truncation would cut. Default: 2048.")
    add("--format", default="auto", choices=FORMATS,
        help="Record format; auto decides per record from its keys. Default: auto.")
    add("--kwargs", metavar="JSON", help="chat_template_kwargs for every record, e.g. "
        "'{\"enable_thinking\": false}'; a record's own kwargs win.")
    add("--json", action="store_true", help="Print the report as JSON.")
    add("--max-errors", type=int, default=20, help="Invalid records listed (all are counted). "
        "Default: 20.")
    parser.set_defaults(func=_run_check)


def _run_check(args: argparse.Namespace) -> int:
    from smolforge.tokenizer import Tokenizer

    try:
        kwargs = json.loads(args.kwargs) if args.kwargs is not None else {}
    except json.JSONDecodeError as exc:
        raise SmolforgeError(f"--kwargs is not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(kwargs, dict):
        raise SmolforgeError(f"--kwargs must be a JSON object, got {type(kwargs).__name__}")
    report = check_sft_data(args.data, Tokenizer.load(args.tokenizer), args.template, args.seq_len,
                            args.format, kwargs, args.max_errors)
    if args.json or not sys.stdout.isatty():
        print(json.dumps(report.to_dict(), indent=2) if args.json else format_report(report))
    else:
        print_rich(report)
    return 1 if report.invalid else 0
