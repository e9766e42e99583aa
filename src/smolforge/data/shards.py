"""Pretraining token shards: `smolforge data tokenize` and the memory-mapped reader.

Layout of a tokenized set:
```
manifest.json     # format, tokenizer fingerprint, dtype, per-source counts, shards
shard_00000.bin   # raw token ids (uint16 when the vocabulary fits, else uint32);
                  # every document is followed by the EOS token
shard_00000.idx   # .npy array (uint64): end offset of every document within the shard
```
With a validation fraction, `OUT/train/` and `OUT/val/` hold one such set each, split by whole
documents, and `OUT/manifest.json` lists the splits. Everything is written under a temporary
name and renamed into place only when complete, so an interrupted run never leaves a
half-written directory that looks valid.

Tokenizing runs on a pool of processes that each load the tokenizer once; chunks of documents
are handed out and collected in input order, so the shards are byte-identical for any number
of workers.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from smolforge.data.check import add_check_command
from smolforge.data.sources import ReadStats, expand_paths, iter_documents
from smolforge.data.synth import add_synth_command
from smolforge.errors import SmolforgeError

FORMAT_VERSION = 1
DOCS_PER_CHUNK = 256  # documents per pool task; also the block of the validation draw
CHUNK_BYTES = 4 << 20  # ... or fewer when they add up to this much text
_FLUSH_TOKENS = 1 << 20  # tokens buffered in memory before a write
_TOKENIZE_HINT = "create it with `smolforge data tokenize PATH... --tokenizer DIR --out DIR`"


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def _index_name(shard_file: str) -> str:
    return shard_file[: -len(".bin")] + ".idx"


class ShardWriter:
    """Appends tokenized documents (EOS added here) to shard files of bounded size.

    A document never straddles two shards: a new shard starts once the current one holds at
    least `shard_tokens` tokens.
    """

    def __init__(self, directory: str | Path, dtype: np.dtype, eos_id: int, shard_tokens: int = 50_000_000) -> None:
        if shard_tokens < 1:
            raise SmolforgeError(f"shard_tokens must be positive, got {shard_tokens}")
        self.directory, self.dtype = Path(directory), np.dtype(dtype)
        self.eos_id, self.shard_tokens = int(eos_id), shard_tokens
        self.directory.mkdir(parents=True, exist_ok=True)
        self.shards: list[dict] = []
        self.documents = self.tokens = 0
        self._file = None
        self._ends: list[int] = []
        self._pending: list[np.ndarray] = []
        self._pending_tokens = 0
        self._shard_len = 0

    def _open(self) -> None:
        name = f"shard_{len(self.shards):05d}.bin"
        self._file = open(self.directory / name, "wb")  # noqa: SIM115 - closed in _close
        self.shards.append({"file": name, "tokens": 0, "documents": 0})
        self._ends, self._shard_len = [], 0

    def _flush(self) -> None:
        if self._pending:
            np.concatenate(self._pending).tofile(self._file)
            self._pending, self._pending_tokens = [], 0

    def _close(self) -> None:
        if self._file is None:
            return
        self._flush()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        with open(self.directory / _index_name(self.shards[-1]["file"]), "wb") as index:
            np.save(index, np.array(self._ends, dtype=np.uint64))
        self.shards[-1].update(tokens=self._shard_len, documents=len(self._ends))

    def add(self, ids: Sequence[int]) -> int:
        """Append one document (its EOS is added); returns its token count with the EOS."""
        if self._file is None or self._shard_len >= self.shard_tokens:
            self._close()
            self._open()
        array = np.empty(len(ids) + 1, dtype=self.dtype)
        try:
            array[:-1] = ids
        except OverflowError:
            raise SmolforgeError(f"a token id of document {self.documents} does not fit {self.dtype.name}: "
                                 f"the vocabulary is larger than the shard dtype allows") from None
        array[-1] = self.eos_id
        self._pending.append(array)
        self._pending_tokens += len(array)
        if self._pending_tokens >= _FLUSH_TOKENS:
            self._flush()
        self._shard_len += len(array)
        self._ends.append(self._shard_len)
        self.documents += 1
        self.tokens += len(array)
        return len(array)

    def finish(self, manifest: dict) -> dict:
        """Close the last shard and write manifest.json (`manifest` plus the counts)."""
        self._close()
        manifest = {"format_version": FORMAT_VERSION, **manifest, "dtype": self.dtype.name,
                    "eos_id": self.eos_id, "documents": self.documents, "tokens": self.tokens,
                    "shards": self.shards}
        (self.directory / "manifest.json").write_text(json.dumps(manifest, indent=2))
        return manifest


def write_documents(directory: str | Path, documents: Iterable[Sequence[int]], eos_id: int,
                    vocab_size: int = 2**16, shard_tokens: int = 50_000_000,
                    manifest: dict | None = None) -> dict:
    """Write already-tokenized documents as a shard set (no tokenizer needed); returns the manifest."""
    writer = ShardWriter(directory, dtype_for_vocab(vocab_size), eos_id, shard_tokens)
    for ids in documents:
        writer.add(ids)
    return writer.finish({"vocab_size": vocab_size, **(manifest or {})})


class TokenShards:
    """Read side: the memory-mapped shards of one tokenized set, read as one token stream."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        path = self.directory / "manifest.json"
        if not path.is_file():
            hint = (" (it holds train/ and val/: point to one of them)"
                    if (self.directory / "train" / "manifest.json").is_file() else "")
            raise SmolforgeError(f"{self.directory} is not a tokenized data directory (no manifest.json){hint}: "
                                 f"{_TOKENIZE_HINT}")
        try:
            self.manifest = json.loads(path.read_text())
            if "splits" in self.manifest:
                raise SmolforgeError(
                    f"{self.directory} holds a train/validation split: point to "
                    f"{self.directory / 'train'} (training) or {self.directory / 'val'} (validation)")
            if int(self.manifest["format_version"]) > FORMAT_VERSION:
                raise SmolforgeError(f"{path} has format_version {self.manifest['format_version']}, newer "
                                     f"than this smolforge reads ({FORMAT_VERSION}): upgrade smolforge")
            self.dtype = np.dtype(self.manifest["dtype"])
            self.eos_id = int(self.manifest["eos_id"])
            self.tokens = int(self.manifest["tokens"])
            self.documents = int(self.manifest["documents"])
            shards = [(str(s["file"]), int(s["tokens"]), int(s["documents"])) for s in self.manifest["shards"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise SmolforgeError(f"{path} is not a valid manifest ({type(exc).__name__}: {exc}): "
                                 f"{_TOKENIZE_HINT} again") from None
        self._arrays: list[np.memmap] = []
        for file, tokens, _ in shards:
            bin_path, idx_path = self.directory / file, self.directory / _index_name(file)
            if not bin_path.is_file() or bin_path.stat().st_size != tokens * self.dtype.itemsize:
                raise SmolforgeError(f"{bin_path} is missing or truncated: {_TOKENIZE_HINT} again")
            if not idx_path.is_file():
                raise SmolforgeError(f"{idx_path} is missing: {_TOKENIZE_HINT} again")
            self._arrays.append(np.memmap(bin_path, dtype=self.dtype, mode="r"))
        if sum(len(a) for a in self._arrays) != self.tokens or sum(s[2] for s in shards) != self.documents:
            raise SmolforgeError(f"{path}: the token or document totals disagree with its shards: "
                                 f"{_TOKENIZE_HINT} again")
        self._starts = np.cumsum([0] + [len(a) for a in self._arrays])
        self._ends: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.tokens

    def __repr__(self) -> str:
        return f"TokenShards({str(self.directory)!r}, documents={self.documents}, tokens={self.tokens})"

    def read(self, offset: int, length: int) -> np.ndarray:
        """Tokens [offset, offset + length) of the concatenated stream (a view when in one shard)."""
        if offset < 0 or length < 0 or offset + length > self.tokens:
            raise IndexError(f"tokens [{offset}, {offset + length}) outside {self.directory} ({self.tokens} tokens)")
        if length == 0:
            return np.empty(0, dtype=self.dtype)
        pieces, end = [], offset + length
        shard = int(np.searchsorted(self._starts, offset, side="right") - 1)
        while offset < end:
            start = self._starts[shard]
            take = min(end, self._starts[shard + 1]) - offset
            pieces.append(self._arrays[shard][offset - start : offset - start + take])
            offset += take
            shard += 1
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def document_ends(self, shard: int) -> np.ndarray:
        """End offsets (exclusive, within the shard) of the shard's documents, memory-mapped."""
        if shard not in self._ends:
            file = self.directory / _index_name(self.manifest["shards"][shard]["file"])
            self._ends[shard] = np.load(file, mmap_mode="r")
        return self._ends[shard]

    def document_bounds(self, offset: int, length: int) -> np.ndarray:
        """Stream offsets (exclusive ends) of the documents ending inside [offset, offset + length).

        The EOS of such a document sits at `end - 1`; a new document starts at `end`.
        """
        end, found = offset + length, []
        first = max(int(np.searchsorted(self._starts, offset, side="right") - 1), 0)
        for shard in range(first, len(self._arrays)):
            base = int(self._starts[shard])
            if base >= end:
                break
            ends = self.document_ends(shard)
            lo = np.searchsorted(ends, offset - base, side="right")
            hi = np.searchsorted(ends, end - base, side="right")
            found.append(np.asarray(ends[lo:hi], dtype=np.int64) + base)
        return np.concatenate(found) if found else np.empty(0, dtype=np.int64)


# --- tokenizing --------------------------------------------------------------------------------

_worker_tokenizer = None


def _init_worker(tokenizer_dir: str) -> None:
    global _worker_tokenizer
    # The pool already uses every core: keep the Rust backend from starting its own threads.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from smolforge.tokenizer import Tokenizer

    _worker_tokenizer = Tokenizer.load(tokenizer_dir)


def _encode_chunk(texts: list[str]) -> list[list[int]]:
    return _worker_tokenizer.encode_batch(texts)


class _Chunk:
    """Documents read in order, with the file each came from and its UTF-8 size."""

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.sources: list[int] = []
        self.bytes: list[int] = []


def _read_chunks(files: list[Path], text_field: str, stats: list[ReadStats], skip_invalid: bool) -> Iterator[_Chunk]:
    chunk, size = _Chunk(), 0
    for index, path in enumerate(files):
        before = stats[index].bytes
        for text in iter_documents(path, text_field, stats[index], skip_invalid):
            nbytes, before = stats[index].bytes - before, stats[index].bytes
            chunk.texts.append(text)
            chunk.sources.append(index)
            chunk.bytes.append(nbytes)
            size += nbytes
            if len(chunk.texts) >= DOCS_PER_CHUNK or size >= CHUNK_BYTES:
                yield chunk
                chunk, size = _Chunk(), 0
    if chunk.texts:
        yield chunk


def _encoded_in_order(chunks: Iterator[_Chunk], tokenizer, tokenizer_dir: str,
                      workers: int) -> Iterator[tuple[_Chunk, list[list[int]]]]:
    """(chunk, token ids) in input order; at most 2 * workers chunks in flight (bounded memory)."""
    if workers <= 1:
        for chunk in chunks:
            yield chunk, tokenizer.encode_batch(chunk.texts)
        return
    # spawn, not fork: the tokenizers library's thread pool does not survive a fork.
    pool = mp.get_context("spawn").Pool(workers, _init_worker, (tokenizer_dir,))
    try:
        pending: deque = deque()
        for chunk in chunks:
            pending.append((chunk, pool.apply_async(_encode_chunk, (chunk.texts,))))
            if len(pending) >= 2 * workers:
                done, result = pending.popleft()
                yield done, result.get()
        while pending:
            done, result = pending.popleft()
            yield done, result.get()
        pool.close()
    finally:
        pool.terminate()
        pool.join()


def _val_picks(chunk_index: int, start: int, count: int, fraction: float, seed: int) -> set[int]:
    """Positions in a chunk held out for validation: exactly round(fraction * documents so far)
    documents up to the end of every chunk, drawn at random inside each chunk."""
    held = int(np.floor(fraction * (start + count) + 0.5)) - int(np.floor(fraction * start + 0.5))
    rng = np.random.default_rng((seed, chunk_index))
    return set(rng.choice(count, size=held, replace=False).tolist())


def _source_entries(files: list[Path], stats: list[ReadStats], counts: np.ndarray) -> list[dict]:
    """counts[i] = (documents, tokens, bytes) of file i written into this set."""
    return [{"path": str(path), "documents": int(c[0]), "tokens": int(c[1]), "bytes": int(c[2]),
             "replaced_bytes_lines": s.replaced_bytes_lines, "skipped": s.skipped}
            for path, s, c in zip(files, stats, counts)]


def tokenize_corpus(paths: Sequence[str | Path], tokenizer_dir: str | Path, out_dir: str | Path,
                    text_field: str = "text", workers: int = 0, shard_tokens: int = 50_000_000,
                    skip_invalid: bool = False, val_fraction: float = 0.0, seed: int = 0,
                    progress: bool = True, overwrite: bool = False) -> dict:
    """Tokenize documents into shards under `out_dir` and return its manifest.

    With `val_fraction` > 0 that share of documents (chosen by `seed`) goes to `out_dir/val`,
    the rest to `out_dir/train`, and the returned top-level manifest lists both in `splits`.
    """
    from smolforge.tokenizer import Tokenizer

    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise SmolforgeError(f"{out_dir} already exists: pass --overwrite to replace it, or choose another --out")
    if not 0 <= val_fraction < 1:
        raise SmolforgeError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if workers < 0:
        raise SmolforgeError(f"--workers must be >= 0 (0 = all cores), got {workers}")
    files = expand_paths(paths)
    inside = [f for f in files if out_dir.resolve() in f.resolve().parents]
    if inside:
        raise SmolforgeError(f"{inside[0]} lies inside the output directory {out_dir}: choose an --out "
                             f"outside the input paths")
    tokenizer = Tokenizer.load(tokenizer_dir)
    dtype = dtype_for_vocab(tokenizer.vocab_size)
    workers = workers or os.cpu_count() or 1
    split = val_fraction > 0
    names = ("train", "val") if split else ("all",)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".tmp-{out_dir.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    stats = [ReadStats() for _ in files]
    counts = {name: np.zeros((len(files), 3), dtype=np.int64) for name in names}  # docs, tokens, bytes
    started = time.time()
    try:
        writers = {name: ShardWriter(tmp / name if split else tmp, dtype, tokenizer.eos_id, shard_tokens)
                   for name in names}
        with _Progress(progress, len(files)) as bar:
            chunks = _read_chunks(files, text_field, stats, skip_invalid)
            written = 0
            for index, (chunk, encoded) in enumerate(_encoded_in_order(chunks, tokenizer, str(tokenizer_dir), workers)):
                picks = _val_picks(index, written, len(encoded), val_fraction, seed) if split else set()
                for position, ids in enumerate(encoded):
                    name = ("val" if position in picks else "train") if split else "all"
                    tokens = writers[name].add(ids)
                    counts[name][chunk.sources[position]] += (1, tokens, chunk.bytes[position])
                written += len(encoded)
                bar.update(written, sum(int(c[:, 2].sum()) for c in counts.values()),
                           sum(w.tokens for w in writers.values()), chunk.sources[-1])
        if written == 0:
            raise SmolforgeError(f"no documents found in {', '.join(map(str, paths))}"
                                 + (" (every record was invalid and skipped)" if sum(s.skipped for s in stats) else ""))
        if split and 0 in (writers["train"].documents, writers["val"].documents):
            raise SmolforgeError(f"--val-fraction {val_fraction} of {written} documents leaves "
                                 f"{writers['val'].documents} for validation and {writers['train'].documents} "
                                 f"for training: both need at least one; change it or add documents")
        common = {"tokenizer_fingerprint": tokenizer.fingerprint, "tokenizer_dir": str(tokenizer_dir),
                  "vocab_size": tokenizer.vocab_size, "text_field": text_field}
        manifests = {name: w.finish({**common, "split": name, "sources": _source_entries(files, stats, counts[name])})
                     for name, w in writers.items()}
        if split:
            total = sum(counts.values())
            manifest = {"format_version": FORMAT_VERSION, **common, "dtype": dtype.name, "eos_id": tokenizer.eos_id,
                        "sources": _source_entries(files, stats, total), "documents": written,
                        "tokens": sum(m["tokens"] for m in manifests.values()), "shards": [],
                        "val_fraction": val_fraction, "seed": seed,
                        "splits": {name: {"path": name, "documents": m["documents"], "tokens": m["tokens"],
                                          "shards": len(m["shards"])} for name, m in manifests.items()}}
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        else:
            manifest = manifests["all"]
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _report(manifest, out_dir, time.time() - started)
    return manifest


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename the finished set into place; an old one (overwrite) is moved aside first."""
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".tmp-old-{out_dir.name}-{os.getpid()}"
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class _Progress:
    """A rich bar over input files with documents, text size and tokens/s."""

    def __init__(self, enabled: bool, files: int) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self.files, self.started = files, time.time()
        self.progress = Progress(TextColumn("tokenizing files"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.description}"), TimeElapsedColumn(),
                                 disable=not enabled, transient=True)
        self.task = self.progress.add_task("", total=files)

    def __enter__(self) -> _Progress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)

    def update(self, documents: int, nbytes: int, tokens: int, file_index: int) -> None:
        rate = tokens / max(time.time() - self.started, 1e-9)
        self.progress.update(self.task, completed=file_index,
                             description=f"{documents:,} docs, {nbytes / 1e6:,.1f} MB, {rate:,.0f} tokens/s")


def _report(manifest: dict, out_dir: Path, seconds: float) -> None:
    sets = ({name: (out_dir / s["path"], s) for name, s in manifest["splits"].items()}
            if "splits" in manifest else {"all": (out_dir, manifest)})
    for where, m in sets.values():
        print(f"{where}: {m['documents']:,} documents, {m['tokens']:,} tokens ({manifest['dtype']})")
    print(f"{len(manifest['sources'])} file(s) in {seconds:.1f}s, "
          f"{manifest['tokens'] / max(seconds, 1e-9):,.0f} tokens/s")
    for source in manifest["sources"]:
        if source["replaced_bytes_lines"]:
            print(f"warning: {source['path']}: {source['replaced_bytes_lines']} documents/lines had "
                  f"non-UTF-8 bytes, decoded with U+FFFD replacement")
        if source["skipped"]:
            print(f"warning: {source['path']}: {source['skipped']} invalid records skipped (--skip-invalid)")


# --- CLI ----------------------------------------------------------------------------------------


def add_tokenize_command(data_subparsers: argparse._SubParsersAction) -> None:
    parser = data_subparsers.add_parser("tokenize", help="Tokenize txt/jsonl/parquet into pretraining shards.",
                                        description="Tokenize documents into memory-mapped token shards.")
    parser.add_argument("paths", nargs="+", metavar="PATH",
                        help="Files, directories or globs (.txt, .jsonl, .json, .parquet).")
    parser.add_argument("--tokenizer", required=True, help="Tokenizer directory (smolforge or HF), checkpoint or Hub id.")
    parser.add_argument("--out", required=True, help="Output directory for the shards and manifest.json.")
    parser.add_argument("--text-field", default="text", help="JSON/Parquet field holding the text.")
    parser.add_argument("--workers", type=int, default=0, help="Tokenizer processes; 0 = all cores.")
    parser.add_argument("--val-fraction", type=float, default=0.0,
                        help="Share of documents held out into OUT/val (the rest into OUT/train).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the validation split.")
    parser.add_argument("--shard-tokens", type=int, default=50_000_000, help="Tokens per shard file.")
    parser.add_argument("--skip-invalid", action="store_true",
                        help="Skip and count malformed records instead of failing.")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing output directory.")
    parser.add_argument("--no-progress", action="store_true", help="Do not show the progress bar.")
    parser.set_defaults(func=_run_tokenize)


def _run_tokenize(args: argparse.Namespace) -> int:
    if args.shard_tokens < 1:
        raise SmolforgeError(f"--shard-tokens must be positive, got {args.shard_tokens}")
    if not args.text_field:
        raise SmolforgeError("--text-field must not be empty")
    tokenize_corpus(args.paths, args.tokenizer, args.out, text_field=args.text_field, workers=args.workers,
                    shard_tokens=args.shard_tokens, skip_invalid=args.skip_invalid,
                    val_fraction=args.val_fraction, seed=args.seed, progress=not args.no_progress,
                    overwrite=args.overwrite)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `smolforge data` with its own subcommands; other `data` commands are added here too."""
    parser = subparsers.add_parser("data", help="Prepare data: tokenize corpora, synthesize smol tasks, check SFT files.",
                                   description="Data preparation commands.")
    data_subparsers = parser.add_subparsers(dest="data_command", metavar="SUBCOMMAND")

    def usage(args: argparse.Namespace) -> int:
        parser.print_help()
        return 2

    parser.set_defaults(func=usage)
    add_tokenize_command(data_subparsers)
    add_synth_command(data_subparsers)
    add_check_command(data_subparsers)
