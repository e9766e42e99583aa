"""`smolforge inspect CKPT`: what a checkpoint is, without loading its weights.

Reads config.json, the safetensors headers (dtypes), the tokenizer files and smolforge.json, so
it answers in a second for a 3B model. The lineage follows each `parent` recorded in
smolforge.json back to the first stage whose checkpoint is still on disk.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path
from typing import Any

from safetensors import safe_open

from smolforge.errors import SmolforgeError
from smolforge.interop import hf
from smolforge.interop.hub import resolve_model_path
from smolforge.model import count_parameters

_DTYPE_NAMES = {"f32": "fp32", "f16": "fp16"}  # the names `smolforge export --dtype` uses
MAX_LINEAGE = 32  # a parent cycle (hand-edited smolforge.json) must not loop forever


def _stored_dtypes(path: Path) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            for name in f.keys():
                stored = str(f.get_slice(name).get_dtype()).lower()
                counts[_DTYPE_NAMES.get(stored, stored)] += 1
    return dict(counts)


def _lineage(path: Path) -> list[dict[str, Any]]:
    from smolforge.train.checkpoint import read_meta

    chain: list[dict[str, Any]] = []
    current: Path | None = path
    while current is not None and len(chain) < MAX_LINEAGE:
        meta = read_meta(current) if current.is_dir() else {}
        if not meta:
            chain.append({"path": str(current), "stage": "base" if current.is_dir() else "(not on disk)"})
            break
        chain.append({"path": str(current), "stage": meta.get("stage"), "step": meta.get("step"),
                      "created": meta.get("created"), "metrics": meta.get("metrics") or {}})
        parent = meta.get("parent")
        current = Path(parent) if parent else None
    return chain


def describe(checkpoint: str | Path) -> dict[str, Any]:
    """Architecture, size, dtype, context, tokenizer, chat template and lineage of a checkpoint."""
    from smolforge.chat.render import template_name
    from smolforge.tokenizer import Tokenizer

    path = resolve_model_path(checkpoint)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise SmolforgeError(f"{path}: not a model directory (no config.json)")
    config = json.loads(config_file.read_text(encoding="utf-8"))
    cfg = hf.model_config_from_hf(config, str(config_file))
    params = count_parameters(cfg)
    tokenizer = Tokenizer.load(path) if (path / "tokenizer.json").is_file() else None
    features = [name for name, on in (("tied embeddings", cfg.tie_embeddings), ("QK-norm", cfg.qk_norm),
                                      ("q/k/v bias", cfg.attention_bias),
                                      (f"NoPE on 1 layer in {cfg.nope_interval}", cfg.nope_interval),
                                      (f"MoE {cfg.experts_per_token}/{cfg.n_experts} experts", cfg.n_experts))
                if on]
    return {
        "path": str(path),
        "format": "smolforge checkpoint" if (path / "smolforge.json").is_file() else "Hugging Face directory",
        "architecture": (config.get("architectures") or [config.get("model_type")])[0],
        "parameters": params,
        "dtype": _stored_dtypes(path),
        "context_length": cfg.max_seq_len,
        "shape": {"layers": cfg.n_layers, "hidden": cfg.hidden_size, "heads": cfg.n_heads,
                  "kv_heads": cfg.n_kv_heads, "head_dim": cfg.resolved_head_dim,
                  "intermediate": cfg.intermediate_size, "vocab": cfg.vocab_size,
                  "rope_theta": cfg.rope_theta},
        "features": features,
        "tokenizer": None if tokenizer is None else {
            "vocab_size": tokenizer.vocab_size, "eos": tokenizer.eos_token, "pad": tokenizer.pad_token,
            "bos": tokenizer.bos_token, "fingerprint": tokenizer.fingerprint},
        "chat_template": ("none" if tokenizer is None or not tokenizer.chat_template
                          else template_name(tokenizer.chat_template)),
        "lineage": _lineage(path),
    }


def _count(n: int) -> str:
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def format_description(info: dict[str, Any]) -> str:
    """The human-readable form printed by `smolforge inspect`."""
    p = info["parameters"]
    size = f"{_count(p['total'])} parameters"
    if p["active"] != p["total"]:
        size += f" ({_count(p['active'])} active per token)"
    shape = info["shape"]
    tok = info["tokenizer"]
    lines = [
        f"{info['path']}  [{info['format']}]",
        f"  architecture    {info['architecture']}",
        f"  size            {size}, {_count(p['embedding'])} in the embedding",
        f"  dtype           {', '.join(f'{d} ({n} tensors)' for d, n in info['dtype'].items()) or 'no weights'}",
        f"  context length  {info['context_length']:,} tokens",
        f"  shape           {shape['layers']} layers, hidden {shape['hidden']}, {shape['heads']} heads "
        f"({shape['kv_heads']} kv) of {shape['head_dim']}, MLP {shape['intermediate']}, "
        f"vocab {shape['vocab']:,}, RoPE theta {shape['rope_theta']:g}",
        f"  features        {', '.join(info['features']) or 'plain dense'}",
        "  tokenizer       " + ("none" if tok is None else
                                f"{tok['vocab_size']:,} tokens, eos {tok['eos']!r}, pad {tok['pad']!r}, "
                                f"bos {tok['bos']!r}, fingerprint {tok['fingerprint'][:12]}"),
        f"  chat template   {info['chat_template']}",
        "  lineage",
    ]
    for depth, stage in enumerate(info["lineage"]):
        step = f" step {stage['step']}" if stage.get("step") is not None else ""
        metrics = ", ".join(f"{k} {v:.4g}" for k, v in list(stage.get("metrics", {}).items())[:3]
                            if isinstance(v, (int, float)))
        lines.append(f"    {'  ' * depth}{'<- ' if depth else ''}{stage['stage']}{step}: {stage['path']}"
                     + (f"  ({metrics})" if metrics else ""))
    return "\n".join(lines)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "inspect", help="Describe a checkpoint: architecture, size, dtype, tokenizer, template, lineage.",
        description="Print what a checkpoint (smolforge or Hugging Face directory, or Hub id) holds, "
                    "reading only its config, headers and metadata.",
    )
    parser.add_argument("checkpoint", help="Checkpoint directory, Hugging Face model directory or Hub id.")
    parser.add_argument("--json", action="store_true", help="Print the description as JSON.")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    info = describe(args.checkpoint)
    print(json.dumps(info, indent=2) if args.json else format_description(info))
    return 0
