"""`smolforge export CKPT --format hf|gguf`: a release copy of a checkpoint for other tools.

`hf` writes a Hugging Face model directory (what every smolforge checkpoint already is, minus the
trainer state, in the dtype asked for, sharded when large) that `AutoModelForCausalLM`,
`AutoTokenizer` and vLLM load as is; `gguf` writes one file for llama.cpp / Ollama. Both refuse,
before writing anything, a model that their target cannot express, naming the feature.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch

from smolforge.data.sources import read_json_object
from smolforge.errors import SmolforgeError

HF_DTYPES = {"auto": None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
GGUF_DTYPES = {"auto": "f16", "fp32": "f32", "fp16": "f16", "bf16": "bf16", "q8_0": "q8_0"}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMG]?B)", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}


def parse_size(text: str) -> int:
    """'5GB' -> 5_000_000_000 (decimal units, as transformers' max_shard_size)."""
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise SmolforgeError(f"--max-shard-size {text!r}: expected a size such as 500MB or 5GB")
    return int(float(match[1]) * _UNITS[match[2].upper()])


def export_model(source: str | Path, out: str | Path, fmt: str = "hf", dtype: str = "auto",
                 max_shard_size: str = "5GB") -> Path:
    """Export the checkpoint or HF directory (or Hub id) `source`; returns the written path."""
    from smolforge.train.checkpoint import load_model, read_meta, save_checkpoint

    if fmt not in ("hf", "gguf"):
        raise SmolforgeError(f"--format {fmt!r}: expected hf or gguf")
    table = HF_DTYPES if fmt == "hf" else GGUF_DTYPES
    if dtype not in table:
        raise SmolforgeError(f"--dtype {dtype!r} is not available for --format {fmt}: "
                             f"choose one of {', '.join(table)}")
    model, tokenizer = load_model(source)
    out = Path(out)
    if fmt == "gguf":
        from smolforge.interop.gguf import write_gguf

        file = out if out.suffix == ".gguf" else out / f"model-{GGUF_DTYPES[dtype]}.gguf"
        return write_gguf(model, tokenizer, file, dtype=GGUF_DTYPES[dtype], name=Path(str(source)).name)
    parent = read_meta(Path(source)) if Path(source).is_dir() else {}
    meta = {"stage": "export", "parent": str(source), "step": parent.get("step"),
            "metrics": parent.get("metrics", {}), "recipe_hash": parent.get("recipe_hash"),
            "data_manifest_hash": parent.get("data_manifest_hash")}
    generation = Path(str(source)) / "generation_config.json"
    return save_checkpoint(out, model, tokenizer, meta=meta, dtype=HF_DTYPES[dtype],
                           max_shard_bytes=parse_size(max_shard_size),
                           generation_config=read_json_object(generation) if generation.is_file() else None)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export", help="Export a checkpoint for transformers / vLLM (hf) or llama.cpp / Ollama (gguf).",
        description="Write a release copy of a checkpoint. --format hf gives a Hugging Face model "
                    "directory (no trainer state); --format gguf gives one .gguf file.",
    )
    parser.add_argument("checkpoint", help="Checkpoint directory, Hugging Face model directory or Hub id.")
    parser.add_argument("--format", default="hf", choices=["hf", "gguf"], help="Output format (default hf).")
    parser.add_argument("--dtype", default="auto", choices=sorted({*HF_DTYPES, *GGUF_DTYPES}),
                        help="Weight type: auto keeps the stored one for hf and means fp16 for gguf; "
                             "q8_0 (8-bit blocks) is gguf only.")
    parser.add_argument("--out", required=True,
                        help="Output directory (hf), or a .gguf file or directory to put model-<dtype>.gguf in.")
    parser.add_argument("--max-shard-size", default="5GB",
                        help="hf only: split the weights into shards of at most this size (default 5GB).")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    path = export_model(args.checkpoint, args.out, args.format, args.dtype, args.max_shard_size)
    size = sum(p.stat().st_size for p in path.iterdir()) if path.is_dir() else path.stat().st_size
    print(f"exported {args.checkpoint} -> {path} ({args.format}, {size / 1e6:.1f} MB)")
    return 0
