"""`smolforge serve CKPT`: load a checkpoint and serve it over HTTP with uvicorn.

FastAPI and uvicorn are imported only when the command runs, so `smolforge --help` works
without the `serve` extra.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from smolforge.errors import SmolforgeError

DTYPES = ("auto", "fp32", "fp16", "bf16")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve", help="Serve a checkpoint with an OpenAI-compatible HTTP API.",
        description="Serve a checkpoint (smolforge or Hugging Face directory, or Hub id) over "
                    "HTTP: /v1/chat/completions, /v1/completions, /v1/models, /health and a web "
                    "chat page at /. Concurrent requests share the model through continuous "
                    "batching. Needs the serve extra: pip install 'smolforge[serve]'.")
    parser.add_argument("checkpoint", help="Checkpoint directory or Hugging Face Hub id.")
    parser.add_argument("--host", default="127.0.0.1",
                        help="Address to listen on (0.0.0.0 to accept other machines).")
    parser.add_argument("--port", type=int, default=8000, help="Port to listen on.")
    parser.add_argument("--api-key", default=os.environ.get("SMOLFORGE_API_KEY"),
                        help="Require 'Authorization: Bearer KEY' on /v1 routes "
                             "(default: $SMOLFORGE_API_KEY; none = open).")
    parser.add_argument("--model-name", default=None,
                        help="Model id clients send and /v1/models lists (default: the checkpoint's name).")
    parser.add_argument("--max-batch-size", type=int, default=32,
                        help="Most requests decoded together; later ones wait in a queue.")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N; default cuda when available.")
    parser.add_argument("--dtype", default="auto", choices=DTYPES,
                        help="Weights dtype; auto keeps the checkpoint's.")
    defaults = parser.add_argument_group("defaults for requests that leave a field out")
    defaults.add_argument("--max-tokens", type=int, default=1024,
                          help="Most new tokens (capped by what the context leaves after the prompt).")
    defaults.add_argument("--temperature", type=float, default=1.0, help="Sampling temperature; 0 = greedy.")
    defaults.add_argument("--top-p", type=float, default=1.0, help="Nucleus probability mass; 1 = off.")
    defaults.add_argument("--top-k", type=int, default=0, help="Sample among the k most likely tokens; 0 = off.")
    parser.set_defaults(func=_serve_command)


def model_name_of(checkpoint: str) -> str:
    """A checkpoint directory's name (`runs/sft/final` -> "sft/final"), or the Hub id as given."""
    path = Path(checkpoint)
    if not path.exists():
        return checkpoint
    parts = path.resolve().parts
    return "/".join(parts[-2:]) if parts[-1] in ("final", "latest") else parts[-1]


def _serve_command(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from smolforge.serve.app import GenerationDefaults, create_app
    except ImportError as exc:
        raise SmolforgeError(f"smolforge serve needs FastAPI and uvicorn ({exc.name} is missing): "
                             "pip install 'smolforge[serve]'") from None
    import torch

    from smolforge.engine import InvalidSamplingParam, SamplingParams
    from smolforge.interop.export import HF_DTYPES
    from smolforge.train.checkpoint import load_model

    if args.max_batch_size < 1:
        raise SmolforgeError(f"--max-batch-size must be at least 1, got {args.max_batch_size}")
    if not 0 < args.port < 65536:
        raise SmolforgeError(f"--port must be in 1..65535, got {args.port}")
    defaults = GenerationDefaults(max_tokens=args.max_tokens, temperature=args.temperature,
                                  top_p=args.top_p, top_k=args.top_k)
    try:
        SamplingParams(max_new_tokens=args.max_tokens, temperature=args.temperature,
                       top_p=args.top_p, top_k=args.top_k).validate()
    except InvalidSamplingParam as exc:
        flag = {"max_new_tokens": "max_tokens"}.get(exc.field, exc.field)
        raise SmolforgeError(f"--{flag.replace('_', '-')}: {exc}") from None
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_model(args.checkpoint, device=device, dtype=HF_DTYPES[args.dtype])
    model.eval()
    name = args.model_name or model_name_of(args.checkpoint)
    app = create_app(model, tokenizer, model_name=name, api_key=args.api_key,
                     max_batch_size=args.max_batch_size, defaults=defaults)
    where = f"http://{args.host}:{args.port}"
    print(f"serving {name!r} on {device} at {where}/v1 (web chat: {where}/)"
          + (", API key required" if args.api_key else ""), flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
