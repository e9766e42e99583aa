"""Pretraining token shards: `smolforge data tokenize` and the memory-mapped reader.

Layout of a tokenized directory:
```
manifest.json        # format, tokenizer fingerprint, dtype, sources, counts, shards
shard_00000.bin      # raw token ids (uint16 when the vocabulary fits, else uint32);
                     # every document is followed by the EOS token
shard_00000.idx.npy  # uint64 end offset of every document within the shard
```
With a validation fraction, `train/` and `val/` subdirectories hold one such layout each,
split by whole documents. A directory is written under a temporary name and renamed into place
only when complete, so an interrupted run never leaves a half-written set that looks valid.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from smolforge.data.sources import ReadStats, expand_paths, iter_documents
from smolforge.errors import SmolforgeError

FORMAT_VERSION = 1
DOCS_PER_CHUNK = 256


class ShardWriter:
    """Appends tokenized documents (EOS added here) to shard files of bounded size."""

    def __init__(self, directory: Path, dtype: np.dtype, eos_id: int, shard_tokens: int) -> None:
        self.directory, self.dtype, self.eos_id, self.shard_tokens = directory, np.dtype(dtype), eos_id, shard_tokens
        directory.mkdir(parents=True, exist_ok=True)
        self.shards: list[dict] = []
        self.documents = self.tokens = 0
        self._file = None
        self._ends: list[int] = []
        self._shard_len = 0

    def _open(self) -> None:
        name = f"shard_{len(self.shards):05d}.bin"
        self._file = open(self.directory / name, "wb")  # noqa: SIM115 - closed in _close
        self.shards.append({"file": name, "tokens": 0, "documents": 0})
        self._ends, self._shard_len = [], 0

    def _close(self) -> None:
        if self._file is None:
            return
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        np.save(self.directory / self.shards[-1]["file"].replace(".bin", ".idx.npy"),
                np.array(self._ends, dtype=np.uint64))
        self.shards[-1].update(tokens=self._shard_len, documents=len(self._ends))

    def add(self, ids: Sequence[int]) -> None:
        if self._file is None or self._shard_len >= self.shard_tokens:
            self._close()
            self._open()
        array = np.asarray([*ids, self.eos_id], dtype=self.dtype)
        array.tofile(self._file)
        self._shard_len += len(array)
        self._ends.append(self._shard_len)
        self.documents += 1
        self.tokens += len(array)

    def finish(self, manifest: dict) -> dict:
        self._close()
        manifest = {**manifest, "format_version": FORMAT_VERSION, "dtype": self.dtype.name,
                    "eos_id": self.eos_id, "documents": self.documents, "tokens": self.tokens,
                    "shards": self.shards}
        (self.directory / "manifest.json").write_text(json.dumps(manifest, indent=2))
        return manifest


class TokenShards:
    """Read side: memory-mapped shards of one tokenized set."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        path = self.directory / "manifest.json"
        if not path.is_file():
            hint = (" (it holds train/ and val/: point to one of them)"
                    if (self.directory / "train" / "manifest.json").is_file() else "")
            raise SmolforgeError(f"{self.directory} is not a tokenized data directory (no manifest.json){hint}: "
                                 f"create it with `smolforge data tokenize`")
        self.manifest = json.loads(path.read_text())
        self.dtype = np.dtype(self.manifest["dtype"])
        self.eos_id = int(self.manifest["eos_id"])
        self.tokens = int(self.manifest["tokens"])
        self.documents = int(self.manifest["documents"])
        self._arrays = []
        for shard in self.manifest["shards"]:
            file = self.directory / shard["file"]
            if not file.is_file() or file.stat().st_size != shard["tokens"] * self.dtype.itemsize:
                raise SmolforgeError(f"{file} is missing or truncated: tokenize the data again")
            self._arrays.append(np.memmap(file, dtype=self.dtype, mode="r"))
        self._starts = np.cumsum([0] + [len(a) for a in self._arrays])

    def read(self, offset: int, length: int) -> np.ndarray:
        """Tokens [offset, offset + length) of the concatenated stream."""
        pieces, end = [], offset + length
        shard = int(np.searchsorted(self._starts, offset, side="right") - 1)
        while offset < end:
            start = self._starts[shard]
            take = min(end, self._starts[shard + 1]) - offset
            pieces.append(self._arrays[shard][offset - start : offset - start + take])
            offset += take
            shard += 1
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


# --- tokenizing --------------------------------------------------------------------------------

_worker_tokenizer = None


def _init_worker(tokenizer_dir: str) -> None:
    global _worker_tokenizer
    from smolforge.tokenizer import Tokenizer

    _worker_tokenizer = Tokenizer.load(tokenizer_dir)


def _encode_chunk(texts: list[str]) -> list[list[int]]:
    return _worker_tokenizer.encode_batch(texts)


def _chunks(paths: list[Path], text_field: str, stats: dict[Path, ReadStats],
            skip_invalid: bool) -> Iterator[list[str]]:
    chunk: list[str] = []
    for path in paths:
        for text in iter_documents(path, text_field, stats[path], skip_invalid):
            chunk.append(text)
            if len(chunk) == DOCS_PER_CHUNK:
                yield chunk
                chunk = []
    if chunk:
        yield chunk


def tokenize_corpus(paths: Sequence[str | Path], tokenizer_dir: str | Path, out_dir: str | Path,
                    text_field: str = "text", workers: int = 0, shard_tokens: int = 50_000_000,
                    skip_invalid: bool = False, val_fraction: float = 0.0, seed: int = 0,
                    progress: bool = True, overwrite: bool = False) -> dict:
    """Tokenize documents into shards under `out_dir`; returns the manifest (train's, if split)."""
    from smolforge.tokenizer import Tokenizer

    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise SmolforgeError(f"{out_dir} already exists: pass --overwrite to replace it, or choose another --out")
    if not 0 <= val_fraction < 1:
        raise SmolforgeError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    files = expand_paths(paths)
    tokenizer = Tokenizer.load(tokenizer_dir)
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    tmp = out_dir.parent / f".tmp-{out_dir.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    split = val_fraction > 0
    writers = {name: ShardWriter(tmp / name if split else tmp, dtype, tokenizer.eos_id, shard_tokens)
               for name in (("train", "val") if split else ("all",))}
    stats = {p: ReadStats() for p in files}
    rng = np.random.default_rng(seed)
    workers = workers or os.cpu_count() or 1
    started = time.time()
    show = _progress(progress)
    try:
        with show:
            task = show.add_task("tokenizing", total=None)
            chunks = _chunks(files, text_field, stats, skip_invalid)
            if workers > 1:
                pool = mp.get_context("spawn").Pool(workers, _init_worker, (str(tokenizer_dir),))
                encoded = pool.imap(_encode_chunk, chunks)  # imap keeps the input order
            else:
                pool, encoded = None, (tokenizer.encode_batch(c) for c in chunks)
            try:
                for batch in encoded:
                    for ids in batch:
                        name = ("val" if rng.random() < val_fraction else "train") if split else "all"
                        writers[name].add(ids)
                    done = sum(w.documents for w in writers.values())
                    show.update(task, completed=done,
                                description=f"{done:,} documents, "
                                            f"{sum(w.tokens for w in writers.values()) / max(time.time() - started, 1e-9):,.0f} tokens/s")
            finally:
                if pool is not None:
                    pool.close()
                    pool.join()
        if sum(w.documents for w in writers.values()) == 0:
            raise SmolforgeError(f"no documents found in {', '.join(map(str, paths))}")
        common = {"tokenizer_fingerprint": tokenizer.fingerprint, "tokenizer_dir": str(tokenizer_dir),
                  "vocab_size": tokenizer.vocab_size, "text_field": text_field,
                  "sources": [{"path": str(p), "documents": s.documents, "bytes": s.bytes,
                               "replaced_bytes_lines": s.replaced_bytes_lines, "skipped": s.skipped}
                              for p, s in stats.items()]}
        manifests = {name: w.finish({**common, "split": name}) for name, w in writers.items()}
        if split and manifests["val"]["documents"] == 0:
            raise SmolforgeError(f"--val-fraction {val_fraction} held out no document out of "
                                 f"{manifests['train']['documents']}: raise it or add documents")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _report(manifests, stats, out_dir, time.time() - started)
    return manifests.get("train", manifests.get("all"))


def _progress(enabled: bool):
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    return Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                    disable=not enabled, transient=True)


def _report(manifests: dict, stats: dict[Path, ReadStats], out_dir: Path, seconds: float) -> None:
    for name, m in manifests.items():
        where = out_dir if name == "all" else out_dir / name
        print(f"{where}: {m['documents']:,} documents, {m['tokens']:,} tokens ({m['dtype']}) in {seconds:.1f}s")
    replaced = sum(s.replaced_bytes_lines for s in stats.values())
    skipped = sum(s.skipped for s in stats.values())
    if replaced:
        print(f"warning: {replaced} documents/lines had non-UTF-8 bytes, decoded with U+FFFD replacement")
    if skipped:
        print(f"warning: {skipped} invalid lines skipped (--skip-invalid)")


# --- CLI ----------------------------------------------------------------------------------------


def add_tokenize_command(data_subparsers: argparse._SubParsersAction) -> None:
    parser = data_subparsers.add_parser("tokenize", help="Tokenize txt/jsonl/parquet into pretraining shards.")
    parser.add_argument("paths", nargs="+", help="Files, directories or globs (.txt, .jsonl, .json, .parquet).")
    parser.add_argument("--tokenizer", required=True, help="Tokenizer directory (smolforge or HF).")
    parser.add_argument("--out", required=True, help="Output directory for shards and manifest.json.")
    parser.add_argument("--text-field", default="text", help="JSON/Parquet field holding the text.")
    parser.add_argument("--workers", type=int, default=0, help="Tokenizer processes; 0 = all cores.")
    parser.add_argument("--val-fraction", type=float, default=0.0,
                        help="Share of documents held out into OUT/val (the rest into OUT/train).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the validation split.")
    parser.add_argument("--shard-tokens", type=int, default=50_000_000, help="Tokens per shard file.")
    parser.add_argument("--skip-invalid", action="store_true", help="Skip and count malformed lines instead of failing.")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing output directory.")
    parser.set_defaults(func=_run_tokenize)


def _run_tokenize(args: argparse.Namespace) -> int:
    tokenize_corpus(args.paths, args.tokenizer, args.out, text_field=args.text_field, workers=args.workers,
                    shard_tokens=args.shard_tokens, skip_invalid=args.skip_invalid,
                    val_fraction=args.val_fraction, seed=args.seed, overwrite=args.overwrite)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("data", help="Prepare data: tokenize pretraining corpora.")
    data_subparsers = parser.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    add_tokenize_command(data_subparsers)
