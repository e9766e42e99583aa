"""Reading raw documents: formats, path expansion and the errors that name file, line, field."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from smolforge.data.sources import (
    ReadStats,
    expand_paths,
    iter_corpus,
    iter_documents,
)
from smolforge.errors import SmolforgeError


def write_jsonl(path: Path, records: list, extra_lines: list[str] = ()) -> Path:
    lines = [json.dumps(r) for r in records] + list(extra_lines)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_txt_is_one_document(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("line one\nline two\n", encoding="utf-8")
    stats = ReadStats()
    assert list(iter_documents(path, stats=stats)) == ["line one\nline two\n"]
    assert stats.documents == 1
    assert stats.bytes == len(b"line one\nline two\n")
    assert stats.replaced_bytes_lines == 0


def test_jsonl_reads_field_and_ignores_blank_lines(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "héllo"}\n\n   \n{"text": "b", "id": 3}\n', encoding="utf-8")
    stats = ReadStats()
    assert list(iter_documents(path, stats=stats)) == ["héllo", "b"]
    assert stats.documents == 2
    assert stats.bytes == len("héllo".encode()) + 1


def test_jsonl_custom_text_field(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"content": "x"}, {"content": "y"}])
    assert list(iter_documents(path, text_field="content")) == ["x", "y"]


def test_json_array_and_json_lines(tmp_path):
    array = tmp_path / "array.json"
    array.write_text(json.dumps([{"text": "a"}, {"text": "b"}]), encoding="utf-8")
    lines = write_jsonl(tmp_path / "lines.json", [{"text": "c"}])
    assert list(iter_documents(array)) == ["a", "b"]
    assert list(iter_documents(lines)) == ["c"]


def test_parquet_in_record_batches(tmp_path):
    path = tmp_path / "a.parquet"
    texts = [f"doc {i}" for i in range(2500)]  # more than one record batch
    pq.write_table(pa.table({"text": texts, "n": list(range(2500))}), path, row_group_size=700)
    stats = ReadStats()
    assert list(iter_documents(path, stats=stats)) == texts
    assert stats.documents == 2500


def test_parquet_missing_column_names_file_and_column(tmp_path):
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"content": ["x"]}), path)
    with pytest.raises(SmolforgeError, match=r"a\.parquet.*'text'.*content"):
        list(iter_documents(path))


def test_parquet_null_rows_error_or_skip(tmp_path):
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"text": ["x", None, "y"]}), path)
    with pytest.raises(SmolforgeError, match="row 1"):
        list(iter_documents(path))
    stats = ReadStats()
    assert list(iter_documents(path, stats=stats, skip_invalid=True)) == ["x", "y"]
    assert stats.skipped == 1


def test_directory_expansion_recursive_sorted(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "b.txt").write_text("b")
    (tmp_path / "a.txt").write_text("a")
    write_jsonl(tmp_path / "sub" / "c.jsonl", [{"text": "c"}])
    (tmp_path / "notes.md").write_text("not data")
    (tmp_path / ".hidden" / "x.txt").write_text("hidden")
    files = expand_paths([tmp_path])
    assert [f.relative_to(tmp_path).as_posix() for f in files] == ["a.txt", "b.txt", "sub/c.jsonl"]
    assert list(iter_corpus([tmp_path])) == ["a", "b", "c"]


def test_glob_expansion_and_duplicates(tmp_path):
    for name in ("x1.txt", "x2.txt", "y.txt"):
        (tmp_path / name).write_text(name)
    files = expand_paths([str(tmp_path / "x*.txt"), tmp_path / "x1.txt"])
    assert [f.name for f in files] == ["x1.txt", "x2.txt"]
    with pytest.raises(SmolforgeError, match="matches no data files"):
        expand_paths([str(tmp_path / "z*.txt")])


def test_malformed_json_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}], ['{"text": "oops'])
    with pytest.raises(SmolforgeError) as info:
        list(iter_documents(path))
    assert "bad.jsonl:2" in str(info.value)
    assert "malformed JSON" in str(info.value)


def test_missing_field_names_field_and_line(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "ok"}, {"body": "no text"}])
    with pytest.raises(SmolforgeError) as info:
        list(iter_documents(path))
    message = str(info.value)
    assert "a.jsonl:2" in message and "'text'" in message and "body" in message


def test_non_string_field_and_non_object(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": 3}])
    with pytest.raises(SmolforgeError, match=r"a\.jsonl:1 field 'text' must be a string"):
        list(iter_documents(path))
    path = write_jsonl(tmp_path / "b.jsonl", [["text"]])
    with pytest.raises(SmolforgeError, match=r"b\.jsonl:1: expected a JSON object, got list"):
        list(iter_documents(path))


def test_skip_invalid_counts(tmp_path):
    path = write_jsonl(
        tmp_path / "a.jsonl",
        [{"text": "a"}, {"body": "x"}, {"text": None}, [1], {"text": "b"}],
        ["{broken"],
    )
    stats = ReadStats()
    assert list(iter_documents(path, stats=stats, skip_invalid=True)) == ["a", "b"]
    assert stats.skipped == 4
    assert stats.documents == 2


def test_non_utf8_bytes_replaced_and_counted(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_bytes(b"caf\xe9 ok")
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_bytes(b'{"text": "good"}\n{"text": "bad \xff byte"}\n{"text": "\xfe"}\n')
    stats = ReadStats()
    docs = list(iter_corpus([txt, jsonl], stats=stats))
    assert docs == ["caf\ufffd ok", "good", "bad \ufffd byte", "\ufffd"]
    assert stats.replaced_bytes_lines == 3
    assert stats.documents == 4


def test_missing_path_and_empty_file_errors(tmp_path):
    with pytest.raises(SmolforgeError, match="nope.jsonl: no such file"):
        expand_paths([tmp_path / "nope.jsonl"])
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(SmolforgeError, match=r"empty\.txt is empty"):
        expand_paths([empty])
    # an empty file found inside a directory is named too
    with pytest.raises(SmolforgeError, match=r"empty\.txt is empty"):
        iter_corpus([tmp_path])
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(SmolforgeError, match="empty_dir: directory contains no data files"):
        expand_paths([tmp_path / "empty_dir"])


def test_unknown_extension_lists_supported(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("text\nx\n")
    with pytest.raises(SmolforgeError, match=r"\.csv.*\.txt, \.jsonl, \.json, \.parquet"):
        expand_paths([path])
    with pytest.raises(SmolforgeError, match="unsupported file type"):
        list(iter_documents(path))


def test_iter_corpus_checks_all_paths_before_reading(tmp_path):
    good = tmp_path / "a.txt"
    good.write_text("a")
    with pytest.raises(SmolforgeError, match="missing.txt"):
        iter_corpus([good, tmp_path / "missing.txt"])  # raised without iterating
