"""Reading raw documents for pretraining and tokenizer training.

One function, `iter_corpus`, turns what a user points at (files, directories, globs) into a
stream of document strings. Supported formats (DESIGN.md "Data formats"):

- `.txt`: the whole file is one document;
- `.jsonl`: one JSON object per line with a string field (default `text`); blank lines ignored;
- `.json`: either a JSON array of such objects or, like `.jsonl`, one object per line;
- `.parquet`: a string column (default `text`), read in record batches so a big file never sits
  in memory at once.

DESIGN.md principle 3 ("Nothing silent"): a malformed line is an error naming the file, line
and field. With `skip_invalid=True` it is skipped instead and counted in `ReadStats.skipped`,
so the caller can report how many were dropped. Bytes that are not valid UTF-8 are decoded as
U+FFFD and the documents or lines concerned are counted in `ReadStats.replaced_bytes_lines`.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from smolforge.errors import SmolforgeError, where

SUPPORTED_SUFFIXES: tuple[str, ...] = (".txt", ".jsonl", ".json", ".parquet")
_PARQUET_BATCH_ROWS = 1024
_GLOB_CHARS = set("*?[")


@dataclass
class ReadStats:
    """Counters filled while iterating documents; callers report them."""

    documents: int = 0
    bytes: int = 0  # UTF-8 bytes of the documents yielded
    replaced_bytes_lines: int = 0  # lines / documents with non-UTF-8 bytes replaced by U+FFFD
    skipped: int = 0  # invalid lines / rows skipped because skip_invalid=True


def read_json_object(path: str | Path) -> dict[str, Any]:
    """A JSON file holding one object (a config or metadata file), or an error naming the file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        line = f" at line {exc.lineno}" if isinstance(exc, json.JSONDecodeError) else ""
        raise SmolforgeError(f"{path} is corrupt: malformed JSON{line} ({exc})") from None
    if not isinstance(data, dict):
        raise SmolforgeError(f"{path} is corrupt: expected a JSON object, got {type(data).__name__}")
    return data


def _supported_list() -> str:
    return ", ".join(SUPPORTED_SUFFIXES)


def _check_file(path: Path) -> None:
    if path.suffix.lower() not in SUPPORTED_SUFFIXES:
        raise SmolforgeError(
            f"{path}: unsupported file type '{path.suffix or '(no extension)'}'. "
            f"Supported types are {_supported_list()}; rename or convert the file."
        )
    if path.stat().st_size == 0:
        raise SmolforgeError(f"{path} is empty: remove it from the inputs or give it content.")


def _files_in_directory(directory: Path) -> list[Path]:
    found = []
    for candidate in directory.rglob("*"):
        relative = candidate.relative_to(directory)
        # Hidden files and folders (.git, .cache, editor swap files) are never data.
        if any(part.startswith(".") for part in relative.parts):
            continue
        if candidate.is_file() and candidate.suffix.lower() in SUPPORTED_SUFFIXES:
            found.append(candidate)
    return sorted(found)


def expand_paths(paths: Sequence[str | Path]) -> list[Path]:
    """Files, directories (searched recursively for supported files) and globs -> sorted files.

    Every input must yield at least one file; each file must be non-empty and of a supported
    type. Duplicates are dropped, the first occurrence keeps its place.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    if not paths:
        raise SmolforgeError("no data paths given: pass at least one file, directory or glob.")
    result: list[Path] = []
    seen: set[Path] = set()

    def add(path: Path) -> None:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            result.append(path)

    for raw in paths:
        text = str(raw)
        path = Path(text).expanduser()
        if path.is_file():
            _check_file(path)
            add(path)
            continue
        if path.is_dir():
            files = _files_in_directory(path)
            if not files:
                raise SmolforgeError(
                    f"{path}: directory contains no data files ({_supported_list()})."
                )
            for file in files:
                _check_file(file)
                add(file)
            continue
        if _GLOB_CHARS & set(text):
            matches = sorted(glob.glob(str(path), recursive=True))
            files = []
            for match in matches:
                match_path = Path(match)
                if match_path.is_dir():
                    files.extend(_files_in_directory(match_path))
                elif match_path.is_file():
                    files.append(match_path)
            if not files:
                raise SmolforgeError(f"{text}: the pattern matches no data files.")
            for file in files:
                _check_file(file)
                add(file)
            continue
        raise SmolforgeError(f"{text}: no such file or directory.")
    return result


def _decode(data: bytes, stats: ReadStats | None) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        if stats is not None:
            stats.replaced_bytes_lines += 1
        return data.decode("utf-8", errors="replace")


def _yield(text: str, stats: ReadStats | None) -> str:
    if stats is not None:
        stats.documents += 1
        stats.bytes += len(text.encode("utf-8"))
    return text


def _invalid(message: str, stats: ReadStats | None, skip_invalid: bool) -> None:
    """Raise for an invalid record, or count it when the user asked to skip such records."""
    if not skip_invalid:
        raise SmolforgeError(message + " Fix it, or pass --skip-invalid to skip invalid records.")
    if stats is not None:
        stats.skipped += 1


def _text_of_record(record: Any, location: str, text_field: str) -> tuple[str | None, str]:
    """The text of one JSON record, or None and the reason it is invalid.

    `location` is `where(path, line)` (or `path item N` for arrays); the field is appended in
    the same `field 'x'` form that `where` uses.
    """
    if not isinstance(record, dict):
        return None, f"{location}: expected a JSON object, got {type(record).__name__}."
    if text_field not in record:
        keys = ", ".join(sorted(record)[:10]) or "none"
        return None, (
            f"{location} field '{text_field}' is missing (the object's keys: {keys}). "
            f"Choose the field with --text-field."
        )
    value = record[text_field]
    if not isinstance(value, str):
        return None, (
            f"{location} field '{text_field}' must be a string, got {type(value).__name__}."
        )
    return value, ""


def _json_lines(path: Path, stats: ReadStats | None, skip_invalid: bool) -> Iterator[tuple[str, Any]]:
    """(location, decoded value) of every non-blank line of a JSON Lines file."""
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            line = _decode(raw, stats)
            if number == 1:
                line = line.removeprefix("\ufeff")  # a UTF-8 byte-order mark is not content
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                _invalid(
                    f"{where(path, number)}: malformed JSON ({exc.msg} at column {exc.colno}).",
                    stats,
                    skip_invalid,
                )
                continue
            yield where(path, number), record


def _json_array(path: Path, stats: ReadStats | None) -> Iterator[tuple[str, Any]]:
    """(location, item) of every item of a file holding one JSON array."""
    content = _decode(path.read_bytes(), stats).removeprefix("\ufeff")
    try:
        records = json.loads(content)
    except json.JSONDecodeError as exc:
        raise SmolforgeError(
            f"{where(path, exc.lineno)}: malformed JSON ({exc.msg} at column {exc.colno})."
        ) from None
    if not isinstance(records, list):
        raise SmolforgeError(
            f"{path}: expected a JSON array of objects or one object per line, "
            f"got {type(records).__name__}."
        )
    for index, record in enumerate(records):
        yield f"{path} item {index}", record


def _is_json_array(path: Path) -> bool:
    # A `.json` file is either one array or JSON Lines; the first significant byte tells which.
    with path.open("rb") as handle:
        head = handle.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head.startswith(b"[")


def iter_records(path: str | Path, stats: ReadStats | None = None,
                 skip_invalid: bool = False) -> Iterator[tuple[str, Any]]:
    """(location, record) for every record of a .jsonl, .json or .parquet file.

    `location` names the file and line (`data.jsonl:12`), array item or Parquet row, for error
    messages about the record's fields. Structured data (SFT conversations, preference pairs)
    is read through this; plain text documents through `iter_documents`.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl" or (suffix == ".json" and not _is_json_array(path)):
        yield from _json_lines(path, stats, skip_invalid)
    elif suffix == ".json":
        yield from _json_array(path, stats)
    elif suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            parquet = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as exc:
            raise SmolforgeError(f"{path}: not a readable Parquet file ({exc}).") from None
        row = 0
        for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS):
            for record in batch.to_pylist():
                yield f"{path} row {row}", record
                row += 1
    else:
        raise SmolforgeError(f"{path}: unsupported file type '{path.suffix or '(no extension)'}' for "
                             f"records; use .jsonl, .json or .parquet.")


def _iter_json_texts(
    path: Path, text_field: str, stats: ReadStats | None, skip_invalid: bool
) -> Iterator[str]:
    """The text field of every record of a .jsonl or .json file (array or JSON Lines)."""
    for location, record in iter_records(path, stats, skip_invalid):
        text, problem = _text_of_record(record, location, text_field)
        if text is None:
            _invalid(problem, stats, skip_invalid)
            continue
        yield _yield(text, stats)


def _iter_parquet(
    path: Path, text_field: str, stats: ReadStats | None, skip_invalid: bool
) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise SmolforgeError(f"{path}: not a readable Parquet file ({exc}).") from None
    schema = parquet.schema_arrow
    if text_field not in schema.names:
        raise SmolforgeError(
            f"{where(path, field=text_field)}: no such column (columns: "
            f"{', '.join(schema.names)}). Choose the column with --text-field."
        )
    column_type = schema.field(text_field).type
    if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)
            or str(column_type) == "string_view"):
        raise SmolforgeError(
            f"{where(path, field=text_field)}: the column must hold strings, got {column_type}."
        )
    row = 0
    for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=[text_field]):
        for value in batch.column(0).to_pylist():
            if value is None:
                _invalid(f"{where(path, field=text_field)} is null in row {row}.", stats,
                         skip_invalid)
            else:
                yield _yield(value, stats)
            row += 1


def iter_documents(
    path: Path,
    text_field: str = "text",
    stats: ReadStats | None = None,
    skip_invalid: bool = False,
) -> Iterator[str]:
    """Yield the documents of one file (see the module docstring for the formats)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".txt":
        yield _yield(_decode(path.read_bytes(), stats), stats)
    elif suffix == ".jsonl":
        yield from _iter_json_texts(path, text_field, stats, skip_invalid)
    elif suffix == ".json":
        yield from _iter_json_texts(path, text_field, stats, skip_invalid)
    elif suffix == ".parquet":
        yield from _iter_parquet(path, text_field, stats, skip_invalid)
    else:
        raise SmolforgeError(
            f"{path}: unsupported file type '{path.suffix or '(no extension)'}'. "
            f"Supported types are {_supported_list()}."
        )


def iter_corpus(
    paths: Sequence[str | Path],
    text_field: str = "text",
    stats: ReadStats | None = None,
    skip_invalid: bool = False,
) -> Iterator[str]:
    """Yield every document of every file that `paths` expands to, in order.

    The paths are expanded and checked when this is called, not on the first `next()`, so a
    typo in the last path fails at once rather than after reading everything before it.
    """
    files = expand_paths(paths)
    return _iter_files(files, text_field, stats, skip_invalid)


def _iter_files(
    files: list[Path], text_field: str, stats: ReadStats | None, skip_invalid: bool
) -> Iterator[str]:
    for file in files:
        yield from iter_documents(file, text_field=text_field, stats=stats,
                                  skip_invalid=skip_invalid)
