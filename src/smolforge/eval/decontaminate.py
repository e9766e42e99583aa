"""N-gram decontamination: which eval examples also occur in the training data?

The playbook's eval rules (ch. 07) end with "n-gram decontamination": a score on examples the
model was trained on measures memory, not skill. The check follows GPT-3 (Brown et al. 2020,
appendix C): text is lower-cased and split into words (punctuation dropped), and an eval example
is contaminated when any of its 13-grams also occurs in a training document. Examples shorter
than n words are matched whole when they have at least `min_words` words (too short ones cannot
be told apart from common phrases and are counted as unchecked). Each text field of a record
(a message's content, a question, a choice) is matched on its own, so no n-gram spans two fields.

    smolforge decontaminate --train data/sft.jsonl data/pretrain/ --eval gsm8k-test.jsonl \
        ifeval.jsonl --out decontamination.json

Exit status: 0 clean, 1 contamination found, 2 bad input. Training data: .txt (a document per
file), .jsonl / .json / .parquet (every string field of every record: text, messages, prompt,
chosen, ...). Eval sets: records of any eval format, or .txt with one example per line.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from smolforge.data.sources import expand_paths, iter_records
from smolforge.errors import SmolforgeError

DEFAULT_N = 13  # GPT-3's and Llama 2's n
DEFAULT_MIN_WORDS = 8  # GPT-3 lowers n to the example's length, down to 8 words
_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    """Lower-cased word tokens: letters, digits and underscores; punctuation and spacing dropped."""
    return _WORD.findall(text.lower())


def strings_of(value: Any) -> Iterator[str]:
    """Every string inside a JSON value (dict values and list items, not keys), in order."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from strings_of(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from strings_of(item)


def example_grams(fields: Sequence[str], n: int, min_words: int) -> set[tuple[str, ...]]:
    """The n-grams an example is matched by: every n-gram of each field, or a field whole when it
    has min_words..n-1 words."""
    grams: set[tuple[str, ...]] = set()
    for text in fields:
        tokens = words(text)
        if len(tokens) >= n:
            grams.update(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))
        elif len(tokens) >= min_words:
            grams.add(tuple(tokens))
    return grams


@dataclass
class EvalSetReport:
    path: str
    examples: int = 0
    unchecked: int = 0  # every field shorter than min_words
    contaminated: list[dict[str, str]] = field(default_factory=list)  # location, ngram, training

    @property
    def share(self) -> float:
        return len(self.contaminated) / self.examples if self.examples else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"examples": self.examples, "checked": self.examples - self.unchecked,
                "unchecked_too_short": self.unchecked, "contaminated": len(self.contaminated),
                "share": self.share, "matches": self.contaminated}


def read_eval_examples(path: Path) -> list[tuple[str, list[str]]]:
    """(location, text fields) of every example of an eval set; an empty set is an error."""
    if not path.is_file():
        raise SmolforgeError(f"{path}: no such eval set file")
    if path.suffix.lower() == ".txt":
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        examples = [(f"{path}:{i}", [line]) for i, line in enumerate(lines, 1) if line.strip()]
    else:
        examples = [(location, list(strings_of(record))) for location, record in iter_records(path)]
    if not examples:
        raise SmolforgeError(f"{path} holds no eval examples")
    return examples


def training_documents(paths: Sequence[str | Path]) -> Iterator[tuple[str, str]]:
    """(location, text) of every text field of every training document under `paths`."""
    for path in expand_paths(paths):
        if path.suffix.lower() == ".txt":
            yield str(path), path.read_text(encoding="utf-8", errors="replace")
            continue
        for location, record in iter_records(path):
            for text in strings_of(record):
                yield location, text


def decontaminate(train: Sequence[str | Path], eval_sets: Sequence[str | Path], n: int = DEFAULT_N,
                  min_words: int = DEFAULT_MIN_WORDS, progress: bool = False) -> dict[str, Any]:
    """Match every eval set against the training data; the JSON-ready report.

    The eval n-grams are indexed in memory (eval sets are small) and the training data is
    streamed once, so the training side can be far larger than memory.
    """
    if n < 1 or not 1 <= min_words <= n:
        raise SmolforgeError(f"need n >= 1 and 1 <= min_words <= n, got n={n}, min_words={min_words}")
    reports = [EvalSetReport(str(p)) for p in eval_sets]
    index: dict[tuple[str, ...], list[tuple[int, str]]] = defaultdict(list)  # gram -> (set, location)
    for set_index, path in enumerate(eval_sets):
        for location, fields in read_eval_examples(Path(path)):
            grams = example_grams(fields, n, min_words)
            reports[set_index].examples += 1
            reports[set_index].unchecked += not grams
            for gram in grams:
                index[gram].append((set_index, location))
    lengths = sorted({len(gram) for gram in index})
    first_words = {gram[0] for gram in index}  # cheap filter before building a window's tuple
    found: dict[tuple[int, str], dict[str, str]] = {}
    documents = total_words = 0
    for location, text in training_documents(train):
        tokens = words(text)
        documents, total_words = documents + 1, total_words + len(tokens)
        for i, word in enumerate(tokens):
            if word not in first_words:
                continue
            for length in lengths:
                if i + length > len(tokens):
                    break
                for key in index.get(tuple(tokens[i:i + length]), ()):
                    found.setdefault(key, {"location": key[1], "ngram": " ".join(tokens[i:i + length]),
                                           "training": location})
        if progress and documents % 10_000 == 0:
            print(f"  {documents:,} training documents, {total_words:,} words", file=sys.stderr)
    for (set_index, _), match in found.items():
        reports[set_index].contaminated.append(match)
    for report in reports:
        report.contaminated.sort(key=lambda m: _location_order(m["location"]))
    return {"n": n, "min_words": min_words, "training": [str(p) for p in train],
            "training_documents": documents, "training_words": total_words,
            "eval_sets": {r.path: r.as_dict() for r in reports}}


def _location_order(location: str) -> tuple[str, int]:
    """Sort `file:12` after `file:9`."""
    head, _, tail = location.rpartition(":")
    return (head, int(tail)) if tail.isdigit() else (location, 0)


def summary(report: dict[str, Any], show: int = 3) -> str:
    """A terminal table: per eval set, examples, contaminated and a few matches."""
    lines = [f"{report['n']}-gram overlap of {report['training_documents']:,} training documents "
             f"({report['training_words']:,} words) with {len(report['eval_sets'])} eval set(s):"]
    for path, r in report["eval_sets"].items():
        lines.append(f"  {path}: {r['contaminated']} of {r['examples']} examples contaminated "
                     f"({100 * r['share']:.1f}%)" + (f", {r['unchecked_too_short']} too short to check"
                                                     if r["unchecked_too_short"] else ""))
        for match in r["matches"][:show]:
            lines.append(f"    {match['location']}: \"{match['ngram']}\" (in {match['training']})")
    return "\n".join(lines)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "decontaminate", help="Find eval examples whose n-grams occur in the training data.",
        description="N-gram decontamination check (GPT-3 style, 13-grams of lower-cased words): per eval "
                    "set, how many examples share an n-gram with a training document. Exit status 0 when "
                    "clean, 1 when contamination is found.")
    parser.add_argument("--train", nargs="+", required=True,
                        help="Training data: files, directories or globs (.txt, .jsonl, .json, .parquet).")
    parser.add_argument("--eval", nargs="+", required=True, dest="eval_sets",
                        help="Eval set files (.jsonl, .json, .parquet records, or .txt one example per line).")
    parser.add_argument("--n", type=int, default=DEFAULT_N, help=f"N-gram length in words. Default: {DEFAULT_N}.")
    parser.add_argument("--min-words", type=int, default=DEFAULT_MIN_WORDS,
                        help="Fields shorter than n words are matched whole when they have at least this "
                             f"many words. Default: {DEFAULT_MIN_WORDS}.")
    parser.add_argument("--out", help="Write the full report (every match) as JSON here.")
    parser.add_argument("--show", type=int, default=3, help="Matches to print per eval set. Default: 3.")
    parser.set_defaults(func=_command)


def _command(args: argparse.Namespace) -> int:
    report = decontaminate(args.train, args.eval_sets, args.n, args.min_words, progress=True)
    print(summary(report, args.show))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"report: {out}")
    return 1 if any(r["contaminated"] for r in report["eval_sets"].values()) else 0
