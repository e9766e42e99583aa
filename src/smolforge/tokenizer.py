"""Train, load, save and evaluate byte-level BPE tokenizers (HF `tokenizers`).

Choices, following the Smol Training Playbook, ch. 04 ("Tokenizer"):
- byte-level BPE with the full 256-byte initial alphabet, so any text encodes without unknown
  tokens and `decode(encode(text)) == text`;
- digits split one by one before the GPT-2 style regex split, so numbers are tokenized
  uniformly (the playbook recommends digit splitting for arithmetic);
- the same special tokens with the same ids (0..9) in every smolforge tokenizer, so chat
  templates and tool-call markers never depend on the corpus a tokenizer was trained on;
- a vocabulary size that is a multiple of 128, which keeps the embedding and output matrices
  aligned for efficient matmuls;
- fertility (tokens per word) and bytes per token as the metrics to compare tokenizers.

On disk a tokenizer is a Hugging Face tokenizer directory (`tokenizer.json`,
`tokenizer_config.json`, `special_tokens_map.json`), so
`transformers.AutoTokenizer.from_pretrained(dir)` loads it with identical ids (DESIGN.md
principle 2), and `Tokenizer.load` reads directories written by transformers.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from smolforge.data.sources import ReadStats, iter_corpus, read_json_object
from smolforge.errors import SmolforgeError, where

SPECIAL_TOKENS: list[str] = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|pad|>",
    "<think>",
    "</think>",
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
]
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"

VOCAB_MULTIPLE = 128  # playbook ch. 04: vocabulary sizes padded to a multiple of 128
_BYTE_ALPHABET_SIZE = 256
_CHUNK_CHARS = 64 * 1024  # longer documents are cut at line breaks before reaching the trainer
# transformers writes int(1e30) as model_max_length when no limit is known.
_NO_MAX_LENGTH = 10**12
_TEMPLATE_FILE = "chat_template.jinja"


def _token_content(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a string or a serialized AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the settings transformers keeps in tokenizer_config.json.

    `encode` never adds special tokens: callers (document packing, chat templates) place EOS and
    template markers themselves. Special-token strings inside the text are matched, so a
    rendered chat template encodes its markers to their fixed ids.
    """

    def __init__(
        self,
        backend: HFTokenizer,
        eos_token: str | None = EOS_TOKEN,
        pad_token: str | None = PAD_TOKEN,
        bos_token: str | None = None,
        chat_template: str | None = None,
        model_max_length: int | None = None,
    ) -> None:
        self.backend = backend
        self.eos_token = eos_token
        self.pad_token = pad_token
        self.bos_token = bos_token
        self.chat_template = chat_template
        self.model_max_length = model_max_length

    # ---- loading and saving -------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load a tokenizer directory (smolforge or transformers), a tokenizer.json file or a Hub id."""
        from smolforge.interop.hub import resolve_model_path

        path = resolve_model_path(path).expanduser()
        if path.is_dir():
            directory, file = path, path / "tokenizer.json"
        elif path.is_file():
            directory, file = path.parent, path
        else:
            raise SmolforgeError(
                f"{path}: no such tokenizer directory or tokenizer.json file. Train one with "
                "`smolforge tokenizer train` or point at a checkpoint directory."
            )
        if not file.is_file():
            hint = ""
            if (directory / "vocab.json").exists() or (directory / "tokenizer.model").exists():
                hint = (
                    " It holds a slow (Python) tokenizer only: convert it with "
                    "`AutoTokenizer.from_pretrained(dir).save_pretrained(dir)` from transformers."
                )
            raise SmolforgeError(f"{directory}: no tokenizer.json found.{hint}")
        try:
            backend = HFTokenizer.from_file(str(file))
        except Exception as exc:  # tokenizers raises a bare Exception on bad files
            raise SmolforgeError(f"{file}: not a valid tokenizer.json ({exc}).") from None

        config_path = directory / "tokenizer_config.json"
        config = read_json_object(config_path) if config_path.is_file() else {}
        map_path = directory / "special_tokens_map.json"
        special_map = read_json_object(map_path) if map_path.is_file() else {}

        def special(name: str, default: str | None) -> str | None:
            if name in config:
                token = _token_content(config[name])
            elif name in special_map:
                token = _token_content(special_map[name])
            else:  # bare tokenizer.json: smolforge's defaults when the vocabulary has them
                return default if default and backend.token_to_id(default) is not None else None
            if token is not None and backend.token_to_id(token) is None:
                raise SmolforgeError(
                    f"{where(config_path, field=name)}: token {token!r} is not in the "
                    f"vocabulary of {file}."
                )
            return token

        template_file = directory / _TEMPLATE_FILE
        if template_file.is_file():
            # transformers >= 4.50 writes the template to its own file; it takes precedence.
            chat_template: str | None = template_file.read_text(encoding="utf-8")
        else:
            chat_template = cls._template_from_config(config.get("chat_template"))
        max_length = config.get("model_max_length")
        if not isinstance(max_length, int) or max_length >= _NO_MAX_LENGTH:
            max_length = None
        return cls(
            backend,
            eos_token=special("eos_token", EOS_TOKEN),
            pad_token=special("pad_token", PAD_TOKEN),
            bos_token=special("bos_token", None),
            chat_template=chat_template,
            model_max_length=max_length,
        )

    @staticmethod
    def _template_from_config(value: Any) -> str | None:
        # Older transformers may store several named templates as [{"name", "template"}].
        if isinstance(value, list):
            named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
            value = named.get("default", next(iter(named.values()), None))
        return value if isinstance(value, str) else None

    def save(self, directory: str | Path) -> None:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(directory / "tokenizer.json"))
        named = {self.eos_token, self.pad_token, self.bos_token}
        additional = [t for t in self.special_tokens if t not in named]
        config: dict[str, Any] = {
            # PreTrainedTokenizerFast reads everything from tokenizer.json; transformers 4.x and
            # 5.x both map the name to their fast (Rust-backed) tokenizer class.
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "unk_token": None,
            "add_bos_token": False,
            "add_eos_token": False,
            # Cleaning up spaces would break decode(encode(x)) == x on text like "a ,b".
            "clean_up_tokenization_spaces": False,
        }
        if self.model_max_length is not None:
            config["model_max_length"] = self.model_max_length
        template_file = directory / _TEMPLATE_FILE
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
            # Also the file transformers >= 4.50 writes, which wins over the config entry there.
            template_file.write_text(self.chat_template, encoding="utf-8")
        elif template_file.exists():
            template_file.unlink()  # a stale template from an earlier save would still load
        _write_json(directory / "tokenizer_config.json", config)
        special_map: dict[str, Any] = {
            name: token
            for name, token in (
                ("bos_token", self.bos_token),
                ("eos_token", self.eos_token),
                ("pad_token", self.pad_token),
            )
            if token is not None
        }
        special_map["additional_special_tokens"] = additional
        _write_json(directory / "special_tokens_map.json", special_map)

    # ---- encoding -------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; no BOS / EOS is added."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of several texts at once (parallel in the Rust backend)."""
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    # ---- properties -----------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of embedding rows needed: the largest id (added tokens included) + 1."""
        vocab = self.backend.get_vocab(with_added_tokens=True)
        return max(vocab.values()) + 1 if vocab else 0

    @property
    def special_tokens(self) -> list[str]:
        """Contents of the special added tokens, by id."""
        decoder = self.backend.get_added_tokens_decoder()
        return [decoder[i].content for i in sorted(decoder) if decoder[i].special]

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def eos_id(self) -> int:
        token_id = self._id_of(self.eos_token)
        if token_id is None:
            raise SmolforgeError(
                "this tokenizer has no end-of-sequence token: set 'eos_token' in its "
                "tokenizer_config.json to a token of its vocabulary."
            )
        return token_id

    @property
    def pad_id(self) -> int | None:
        return self._id_of(self.pad_token)

    @property
    def bos_id(self) -> int | None:
        return self._id_of(self.bos_token)

    @property
    def fingerprint(self) -> str:
        """sha256 of the canonical tokenizer.json: changes whenever any id could change."""
        canonical = json.dumps(
            json.loads(self.backend.to_str()),
            sort_keys=True,
            ensure_ascii=False,
            separators=(",", ":"),
        )
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, eos={self.eos_token!r}, "
            f"pad={self.pad_token!r}, fingerprint={self.fingerprint[:12]})"
        )


# ---- training -------------------------------------------------------------------------------


def check_vocab_size(vocab_size: int) -> None:
    """Raise unless `vocab_size` is a multiple of 128 with room for merges."""
    minimum = len(SPECIAL_TOKENS) + _BYTE_ALPHABET_SIZE
    smallest = (minimum // VOCAB_MULTIPLE + 1) * VOCAB_MULTIPLE
    if vocab_size <= minimum:
        raise SmolforgeError(
            f"field 'vocab_size' = {vocab_size} is too small: it must be larger than "
            f"{minimum} ({len(SPECIAL_TOKENS)} special tokens + {_BYTE_ALPHABET_SIZE} bytes). "
            f"Use at least {smallest}."
        )
    if vocab_size % VOCAB_MULTIPLE:
        nearest = max(smallest, round(vocab_size / VOCAB_MULTIPLE) * VOCAB_MULTIPLE)
        raise SmolforgeError(
            f"field 'vocab_size' = {vocab_size} is not a multiple of {VOCAB_MULTIPLE} "
            f"(playbook ch. 04: it keeps embedding matmuls efficient). Use {nearest}."
        )


def _chunks(text: str, size: int = _CHUNK_CHARS) -> Iterator[str]:
    """Cut a long document at line breaks (else spaces) into pieces of about `size` chars.

    The BPE trainer pre-tokenizes and counts each input string in one thread; a single 1 MB
    document would serialize that work. Cutting at a line break changes no pre-token.
    """
    start = 0
    while len(text) - start > size:
        end = start + size
        cut = text.rfind("\n", start + size // 2, end)
        if cut == -1:
            cut = text.rfind(" ", start + size // 2, end)
        cut = end if cut == -1 else cut + 1
        yield text[start:cut]
        start = cut
    if start < len(text):
        yield text[start:]


def _training_texts(
    documents: Iterator[str], max_bytes: int | None, fed: list[int]
) -> Iterator[str]:
    """Chunks for the trainer, stopping once `max_bytes` UTF-8 bytes were fed (fed[0])."""
    for document in documents:
        for chunk in _chunks(document):
            size = len(chunk.encode("utf-8"))
            if max_bytes is not None and fed[0] + size > max_bytes:
                # The last piece is cut to the budget, at a space when there is one, so that
                # no half word is counted as a word of the corpus.
                head = chunk.encode("utf-8")[: max_bytes - fed[0]].decode("utf-8", "ignore")
                space = max(head.rfind(" "), head.rfind("\n"))
                head = head[: space + 1] if space > 0 else head
                if head:
                    fed[0] += len(head.encode("utf-8"))
                    yield head
                return
            fed[0] += size
            yield chunk


def new_backend() -> HFTokenizer:
    """An untrained byte-level BPE pipeline with smolforge's pre-tokenizer and decoder."""
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            # use_regex=True: the GPT-2 split (letters, numbers, punctuation, spaces) after the
            # digits; add_prefix_space=False keeps decode(encode(x)) == x.
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    return backend


def train_tokenizer(
    paths: Sequence[str | Path],
    vocab_size: int,
    text_field: str = "text",
    min_frequency: int = 2,
    max_documents_bytes: int | None = None,
    *,
    stats: ReadStats | None = None,
    skip_invalid: bool = False,
) -> Tokenizer:
    """Train a byte-level BPE tokenizer on the documents under `paths`.

    `max_documents_bytes` caps the UTF-8 bytes fed to the trainer (a sample of a big corpus).
    Special tokens get ids 0..len(SPECIAL_TOKENS)-1, the 256 byte tokens follow, then merges.
    """
    check_vocab_size(vocab_size)
    if min_frequency < 1:
        raise SmolforgeError(f"field 'min_frequency' = {min_frequency} must be at least 1.")
    if max_documents_bytes is not None and max_documents_bytes <= 0:
        raise SmolforgeError(
            f"field 'max_documents_bytes' = {max_documents_bytes} must be positive."
        )
    stats = stats if stats is not None else ReadStats()
    documents = iter_corpus(paths, text_field=text_field, stats=stats, skip_invalid=skip_invalid)
    backend = new_backend()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    fed = [0]
    backend.train_from_iterator(_training_texts(documents, max_documents_bytes, fed), trainer)
    if fed[0] == 0:
        raise SmolforgeError(
            f"no text to train on in {', '.join(map(str, paths))}: every document is empty"
            + (f" or was skipped ({stats.skipped} invalid)." if stats.skipped else ".")
        )
    tokenizer = Tokenizer(backend)
    if tokenizer.vocab_size < vocab_size:
        warnings.warn(
            f"the trained vocabulary has {tokenizer.vocab_size} tokens, fewer than the "
            f"requested vocab_size {vocab_size}: the corpus has too few pairs seen at least "
            f"{min_frequency} times. Train on more text or lower --min-frequency.",
            stacklevel=2,
        )
    return tokenizer


# ---- evaluation -----------------------------------------------------------------------------


def evaluate_tokenizer(
    tokenizer: Tokenizer,
    paths: Sequence[str | Path],
    text_field: str = "text",
    max_documents: int | None = None,
    *,
    skip_invalid: bool = False,
) -> dict[str, float | int]:
    """Compression and fertility of `tokenizer` on the documents under `paths` (playbook ch. 04).

    - bytes_per_token, chars_per_token: higher means better compression;
    - tokens_per_word (fertility): tokens of the whole documents per whitespace-separated word;
    - pct_words_split: share (in %) of words that, encoded on their own, take more than one
      token.
    """
    if max_documents is not None and max_documents < 1:
        raise SmolforgeError(f"field 'max_documents' = {max_documents} must be at least 1.")
    totals = Counter(tokens=0, bytes=0, chars=0, words=0, split_words=0, documents=0)
    for document in iter_corpus(paths, text_field=text_field, skip_invalid=skip_invalid):
        if max_documents is not None and totals["documents"] >= max_documents:
            break
        totals["documents"] += 1
        totals["tokens"] += len(tokenizer.encode(document))
        totals["bytes"] += len(document.encode("utf-8"))
        totals["chars"] += len(document)
        words = Counter(document.split())
        totals["words"] += sum(words.values())
        unique = list(words)
        for word, ids in zip(unique, tokenizer.encode_batch(unique)):
            if len(ids) > 1:
                totals["split_words"] += words[word]
    if totals["tokens"] == 0:
        raise SmolforgeError(
            f"no text to evaluate on in {', '.join(map(str, paths))}: every document is empty."
        )
    return {
        "bytes_per_token": totals["bytes"] / totals["tokens"],
        "chars_per_token": totals["chars"] / totals["tokens"],
        "tokens_per_word": totals["tokens"] / max(totals["words"], 1),
        "pct_words_split": 100.0 * totals["split_words"] / max(totals["words"], 1),
        "tokens": totals["tokens"],
        "bytes": totals["bytes"],
        "words": totals["words"],
        "documents": totals["documents"],
    }


# ---- CLI ------------------------------------------------------------------------------------


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `smolforge tokenizer train|eval` to the CLI."""
    parser = subparsers.add_parser(
        "tokenizer", help="Train and evaluate byte-level BPE tokenizers."
    )
    commands = parser.add_subparsers(dest="tokenizer_command", metavar="COMMAND", required=True)

    train = commands.add_parser("train", help="Train a tokenizer on txt/jsonl/json/parquet files.")
    train.add_argument("paths", nargs="+", metavar="PATH",
                       help="Files, directories or globs holding the training documents.")
    train.add_argument("--vocab-size", type=int, default=8192,
                       help="Vocabulary size incl. special tokens; a multiple of 128.")
    train.add_argument("--out", required=True, metavar="DIR",
                       help="Directory to write the tokenizer files to.")
    train.add_argument("--text-field", default="text",
                       help="JSON field / Parquet column holding the text.")
    train.add_argument("--min-frequency", type=int, default=2,
                       help="Minimum count of a pair for it to be merged.")
    train.add_argument("--max-bytes", type=int, default=None,
                       help="Train on at most this many bytes of text (a sample of the corpus).")
    train.add_argument("--skip-invalid", action="store_true",
                       help="Skip (and count) invalid records instead of failing.")
    train.set_defaults(func=_train_command)

    evaluate = commands.add_parser("eval", help="Measure compression and fertility on data.")
    evaluate.add_argument("tokenizers", nargs="+", metavar="TOKENIZER",
                          help="One or two tokenizer directories (or tokenizer.json files).")
    evaluate.add_argument("--data", nargs="+", required=True, metavar="PATH",
                          help="Files, directories or globs holding the evaluation documents.")
    evaluate.add_argument("--text-field", default="text",
                          help="JSON field / Parquet column holding the text.")
    evaluate.add_argument("--max-documents", type=int, default=None,
                          help="Evaluate on at most this many documents.")
    evaluate.add_argument("--skip-invalid", action="store_true",
                          help="Skip invalid records instead of failing.")
    evaluate.set_defaults(func=_eval_command)


def _console():
    from rich.console import Console

    return Console()


def _train_command(args: argparse.Namespace) -> None:
    from rich.markup import escape
    from rich.table import Table

    console = _console()
    stats = ReadStats()
    started = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tokenizer = train_tokenizer(
            args.paths,
            vocab_size=args.vocab_size,
            text_field=args.text_field,
            min_frequency=args.min_frequency,
            max_documents_bytes=args.max_bytes,
            stats=stats,
            skip_invalid=args.skip_invalid,
        )
    elapsed = time.perf_counter() - started
    # Measured before saving: --out may lie inside a data directory given in PATH.
    sample = evaluate_tokenizer(tokenizer, args.paths, text_field=args.text_field,
                                max_documents=1000, skip_invalid=args.skip_invalid)
    tokenizer.save(args.out)

    table = Table(title="tokenizer trained", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    table.add_row("vocabulary", f"{tokenizer.vocab_size} (requested {args.vocab_size})")
    table.add_row("special tokens", f"{len(SPECIAL_TOKENS)} (ids 0-{len(SPECIAL_TOKENS) - 1})")
    table.add_row("documents read", f"{stats.documents} ({stats.bytes:,} bytes)")
    if stats.replaced_bytes_lines:
        table.add_row("non-UTF-8", f"{stats.replaced_bytes_lines} documents/lines replaced")
    if stats.skipped:
        table.add_row("skipped", f"{stats.skipped} invalid records")
    table.add_row("time", f"{elapsed:.2f} s")
    table.add_row("bytes/token", f"{sample['bytes_per_token']:.3f} "
                  f"(on {sample['documents']} training documents)")
    table.add_row("tokens/word", f"{sample['tokens_per_word']:.3f}")
    table.add_row("saved to", escape(str(args.out)))
    console.print(table)
    for warning in caught:
        console.print(f"[yellow]warning:[/yellow] {escape(str(warning.message))}")


_METRICS = [
    ("bytes_per_token", "bytes / token", "{:.3f}"),
    ("chars_per_token", "chars / token", "{:.3f}"),
    ("tokens_per_word", "tokens / word (fertility)", "{:.3f}"),
    ("pct_words_split", "% words split", "{:.1f}"),
    ("tokens", "tokens", "{:,}"),
    ("bytes", "bytes", "{:,}"),
    ("words", "words", "{:,}"),
    ("documents", "documents", "{:,}"),
]


def _eval_command(args: argparse.Namespace) -> None:
    from rich.markup import escape
    from rich.table import Table

    if len(args.tokenizers) > 2:
        raise SmolforgeError(
            f"tokenizer eval compares at most two tokenizers, got {len(args.tokenizers)}."
        )
    results = []
    for path in args.tokenizers:
        tokenizer = Tokenizer.load(path)
        results.append(evaluate_tokenizer(tokenizer, args.data, text_field=args.text_field,
                                          max_documents=args.max_documents,
                                          skip_invalid=args.skip_invalid))
    # Short column names keep the table readable; the caption gives the full paths.
    names = [Path(p).name if Path(p).is_dir() else Path(p).parent.name for p in args.tokenizers]
    caption = "  ".join(f"({i}) {escape(p)}" for i, p in enumerate(args.tokenizers, start=1))
    table = Table(title="tokenizer evaluation", caption=caption)
    table.add_column("metric")
    for i, name in enumerate(names, start=1):
        table.add_column(f"({i}) {escape(name)}", justify="right", overflow="fold")
    if len(results) == 2:
        table.add_column("ratio (2)/(1)", justify="right")
    for key, label, fmt in _METRICS:
        row = [label] + [fmt.format(r[key]) for r in results]
        if len(results) == 2:
            first, second = results[0][key], results[1][key]
            row.append(f"{second / first:.3f}" if first else "-")
        table.add_row(*row)
    _console().print(table)
