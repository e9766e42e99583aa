"""Serving under load: N concurrent streaming clients against the same N requests one by one.

`smolforge serve` runs in its own process (as deployed) on a checkpoint, by default a random
model of a preset saved with a tokenizer trained on the bundled tiny Shakespeare. Each client
streams `/v1/completions` with the official `openai` client: a prompt of random token ids, a
fixed number of new tokens (EOS ignored, greedy), so both runs generate exactly the same
tokens. The baseline is the same requests sent one after another (batch size 1, as a server
without batching would serve them); the load run sends them all at once, and continuous
batching decodes them together. Reported: aggregate generated tokens/s (tokens / wall time),
the ratio of the two, and time to first token (TTFT: request sent -> first text chunk).

    python benchmarks/bench_serving_load.py                        # smol-10m, 32 clients, CPU
    python benchmarks/bench_serving_load.py --device cuda --preset smollm2-135m --json out.jsonl
    python benchmarks/bench_serving_load.py --checkpoint runs/sft/final --clients 16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import warnings
from importlib import resources
from pathlib import Path

import torch


def random_checkpoint(directory: Path, preset: str, vocab: int, context: int) -> Path:
    """A preset with random weights and a `vocab`-id tokenizer, saved as a checkpoint."""
    from smolforge.model import PRESETS, Transformer
    from smolforge.tokenizer import train_tokenizer
    from smolforge.train.checkpoint import save_checkpoint

    corpus = resources.files("smolforge") / "assets" / "tinyshakespeare.txt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a small corpus may give fewer merges than asked
        tokenizer = train_tokenizer([Path(str(corpus))], vocab_size=vocab)
    cfg = PRESETS[preset]()
    cfg = cfg.model_copy(update={"vocab_size": max(cfg.vocab_size or 0, vocab),
                                 "max_seq_len": max(cfg.max_seq_len, context)})
    torch.manual_seed(0)
    return save_checkpoint(directory / "random", Transformer(cfg), tokenizer)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(checkpoint: Path | str, port: int, args: argparse.Namespace) -> subprocess.Popen:
    command = [sys.executable, "-m", "smolforge.cli", "serve", str(checkpoint), "--port", str(port),
               "--model-name", "bench", "--max-batch-size", str(args.max_batch_size),
               "--dtype", args.dtype] + (["--device", args.device] if args.device else [])
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
                return server
        except OSError:
            if server.poll() is not None:
                raise SystemExit(f"the server exited:\n{server.stderr.read()}") from None
            if time.monotonic() > deadline:
                server.kill()
                raise SystemExit("the server did not start within 300 s") from None
            time.sleep(0.25)


async def one_request(client, prompt: list[int], new_tokens: int) -> dict[str, float]:
    """Stream one completion; seconds to the first text and in all, and tokens generated."""
    start = time.perf_counter()
    first = None
    stream = await client.completions.create(
        model="bench", prompt=prompt, max_tokens=new_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    tokens = 0
    async for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].text:
            first = time.perf_counter() - start
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    total = time.perf_counter() - start
    if tokens != new_tokens:
        raise SystemExit(f"a request generated {tokens} tokens, expected {new_tokens}")
    return {"ttft": first if first is not None else total, "seconds": total, "tokens": tokens}


async def run_load(url: str, prompts: list[list[int]], new_tokens: int, concurrent: bool) -> dict:
    from openai import AsyncOpenAI

    async with AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=3600) as client:
        await one_request(client, prompts[0], 4)  # warm-up: connection, allocator, first forward
        start = time.perf_counter()
        if concurrent:
            results = await asyncio.gather(*(one_request(client, p, new_tokens) for p in prompts))
        else:
            results = [await one_request(client, p, new_tokens) for p in prompts]
        wall = time.perf_counter() - start
    ttfts = sorted(r["ttft"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    return {"wall_s": round(wall, 3), "tokens": tokens, "tokens_per_s": round(tokens / wall, 1),
            "ttft_median_s": round(statistics.median(ttfts), 4),
            "ttft_p90_s": round(ttfts[min(len(ttfts) - 1, int(0.9 * len(ttfts)))], 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="Serve this checkpoint instead of a random preset.")
    parser.add_argument("--preset", default="smol-10m", help="Random model shape (without --checkpoint).")
    parser.add_argument("--vocab", type=int, default=2048, help="Tokenizer size of the random model.")
    parser.add_argument("--clients", type=int, default=32, help="Concurrent streaming clients.")
    parser.add_argument("--prompt-len", type=int, default=32, help="Tokens per prompt.")
    parser.add_argument("--new-tokens", type=int, default=64, help="Tokens generated per request.")
    parser.add_argument("--max-batch-size", type=int, default=32, help="The server's --max-batch-size.")
    parser.add_argument("--device", default=None, help="The server's --device (default: cuda if available).")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    parser.add_argument("--json", help="Append one JSON line with the results to this file.")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        context = args.prompt_len + args.new_tokens
        checkpoint = args.checkpoint or random_checkpoint(Path(tmp), args.preset, args.vocab, context)
        from smolforge.tokenizer import Tokenizer

        vocab = Tokenizer.load(checkpoint).vocab_size
        rng = random.Random(0)
        # Ids from the middle of the vocabulary: ordinary text tokens, no special ones (0..9).
        prompts = [[rng.randrange(10, vocab) for _ in range(args.prompt_len)] for _ in range(args.clients)]
        port = free_port()
        server = start_server(checkpoint, port, args)
        try:
            url = f"http://127.0.0.1:{port}"
            one_by_one = asyncio.run(run_load(url, prompts, args.new_tokens, concurrent=False))
            together = asyncio.run(run_load(url, prompts, args.new_tokens, concurrent=True))
        finally:
            server.terminate()
            server.wait(timeout=60)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    machine = (torch.cuda.get_device_name() if device.startswith("cuda")
               else f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    ratio = together["tokens_per_s"] / one_by_one["tokens_per_s"]
    name = args.checkpoint or f"{args.preset} (random, vocab {args.vocab})"
    print(f"{name}: {args.clients} requests x ({args.prompt_len} prompt + {args.new_tokens} new tokens), "
          f"greedy, streamed; server on {device} ({machine}), max batch {args.max_batch_size}")
    print(f"{'':<22}{'tokens/s':>10}{'wall s':>9}{'TTFT p50':>10}{'TTFT p90':>10}")
    for label, result in (("one by one", one_by_one), (f"{args.clients} concurrent", together)):
        print(f"{label:<22}{result['tokens_per_s']:>10.1f}{result['wall_s']:>9.2f}"
              f"{result['ttft_median_s']:>10.3f}{result['ttft_p90_s']:>10.3f}")
    print(f"aggregate speed-up from continuous batching: {ratio:.2f}x")
    if args.json:
        record = {"bench": "serving_load", "model": name, "clients": args.clients,
                  "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "device": device,
                  "dtype": args.dtype, "machine": machine, "torch": torch.__version__,
                  "one_by_one": one_by_one, "concurrent": together, "speedup": round(ratio, 2)}
        with open(args.json, "a", encoding="utf-8") as out:
            out.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
