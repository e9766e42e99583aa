"""Serving throughput: concurrent requests through `ContinuousBatcher` vs the same requests one
by one through `Engine.generate`.

N requests (fixed seed) get random prompts and max_new_tokens drawn from the given ranges; decoding
is greedy with EOS ignored, so both ways generate exactly the same number of tokens.
(a) one by one: `Engine.generate([prompt], params)` for each request in turn (CUDA graphs on
    CUDA, as `smolforge generate` runs);
(b) batched: N threads each submit one request to a `ContinuousBatcher` at the same moment and
    stream it to the end, as N streaming HTTP clients would.
After one warm-up of each, both are timed (wall clock, prefill included) and the median run gives
aggregate tokens/s = all generated tokens / seconds. The script also counts requests whose
batched tokens equal their one-by-one tokens (all of them in fp32; bf16 rounding may flip a
near-tie) and the median time to first token of the batched clients.

    python benchmarks/bench_serving_batching.py --preset smol-10m --requests 32
    python benchmarks/bench_serving_batching.py --device cuda --dtype bf16 --json out.jsonl
    python benchmarks/bench_serving_batching.py --checkpoint runs/sft/final --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import threading
import time

import torch

from smolforge.engine import ContinuousBatcher, Engine, SamplingParams
from smolforge.model import PRESETS, Transformer

Request = tuple[list[int], SamplingParams]


def make_requests(n: int, vocab: int, prompt_lens: tuple[int, int], new_tokens: tuple[int, int],
                  seed: int) -> list[Request]:
    """n greedy requests with prompt lengths and max_new_tokens uniform in the given ranges."""
    rng = random.Random(seed)
    requests = []
    for _ in range(n):
        prompt = [rng.randrange(1, vocab) for _ in range(rng.randint(*prompt_lens))]
        params = SamplingParams(max_new_tokens=rng.randint(*new_tokens), temperature=0, ignore_eos=True)
        requests.append((prompt, params))
    return requests


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def one_by_one(engine: Engine, requests: list[Request]) -> tuple[float, list[list[int]]]:
    """Seconds to serve the requests in turn, and each one's tokens."""
    synchronize(engine.device)
    start = time.perf_counter()
    tokens = [engine.generate([prompt], params)[0].tokens for prompt, params in requests]
    synchronize(engine.device)
    return time.perf_counter() - start, tokens


def concurrent(batcher: ContinuousBatcher, requests: list[Request]) -> tuple[float, list[list[int]], list[float]]:
    """Seconds until every client has streamed its request to the end, each one's tokens, and
    each one's time to first token; one thread per client, all released at once."""
    tokens: list[list[int]] = [[] for _ in requests]
    first_token = [0.0] * len(requests)
    errors: list[BaseException] = []
    start_line = threading.Barrier(len(requests) + 1)
    start = 0.0

    def client(i: int) -> None:
        try:
            start_line.wait()
            for delta in batcher.submit(*requests[i]):
                if not tokens[i]:
                    first_token[i] = time.perf_counter() - start
                tokens[i] += delta.tokens
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    synchronize(batcher.engine.device)
    start = time.perf_counter()
    start_line.wait()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(requests)} clients failed") from errors[0]
    return elapsed, tokens, first_token


def load(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> tuple[Transformer, str]:
    """The model to serve and a short description of it."""
    needed = args.prompt_len[1] + args.new_tokens[1]
    if args.checkpoint:
        from smolforge.train.checkpoint import load_model

        model, _ = load_model(args.checkpoint, device=str(device))
        if needed > model.config.max_seq_len:
            raise SystemExit(f"--prompt-len + --new-tokens maxima ({needed}) exceed the checkpoint's "
                             f"context length ({model.config.max_seq_len})")
        return model.to(device, dtype).eval(), args.checkpoint
    cfg = PRESETS[args.preset]()
    cfg = cfg.model_copy(update={"vocab_size": cfg.vocab_size or args.vocab,
                                 "max_seq_len": max(cfg.max_seq_len, needed)})
    torch.manual_seed(args.seed)
    return Transformer(cfg).to(device, dtype).eval(), f"{args.preset} (random weights, vocab {cfg.vocab_size})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="smol-10m", choices=sorted(PRESETS), help="Model shape (random weights).")
    parser.add_argument("--checkpoint", help="Serve this checkpoint directory instead of a random preset.")
    parser.add_argument("--vocab", type=int, default=8192, help="Vocabulary size when the preset has none.")
    parser.add_argument("--requests", type=int, default=32, help="Concurrent requests (= client threads).")
    parser.add_argument("--max-batch-size", type=int, default=0, help="Batcher rows; 0 = --requests.")
    parser.add_argument("--prompt-len", type=int, nargs=2, default=[16, 256], metavar=("MIN", "MAX"),
                        help="Range of prompt lengths in tokens.")
    parser.add_argument("--new-tokens", type=int, nargs=2, default=[32, 256], metavar=("MIN", "MAX"),
                        help="Range of max_new_tokens.")
    parser.add_argument("--repeats", type=int, default=1, help="Timed runs of each (median is reported).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the requests and the random weights.")
    parser.add_argument("--device", default="cpu", help="cpu or cuda.")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="Weights and cache dtype.")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch CPU threads.")
    parser.add_argument("--json", help="Append one JSON line with the results to this file.")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model, name = load(args, device, dtype)
    engine = Engine(model)
    requests = make_requests(args.requests, model.config.vocab_size, tuple(args.prompt_len),
                             tuple(args.new_tokens), args.seed)
    machine = (torch.cuda.get_device_name() if device.type == "cuda"
               else f"{platform.processor() or platform.machine()}, {args.threads} threads")
    max_batch = args.max_batch_size or args.requests
    print(f"{name}: {args.requests} requests, prompts {args.prompt_len[0]}-{args.prompt_len[1]} tokens, "
          f"{args.new_tokens[0]}-{args.new_tokens[1]} new tokens, greedy, {args.dtype} on {machine}; "
          f"torch {torch.__version__}")

    warm_up = [(p[:8], SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True)) for p, _ in requests[:4]]
    sequential_runs, batched_runs, ttfts = [], [], []
    with ContinuousBatcher(engine, max_batch_size=max_batch) as batcher:
        one_by_one(engine, warm_up)  # allocator, kernels, CUDA graph capture path
        concurrent(batcher, warm_up)
        for _ in range(args.repeats):
            seconds, reference = one_by_one(engine, requests)
            sequential_runs.append(seconds)
            seconds, batched, first_token = concurrent(batcher, requests)
            batched_runs.append(seconds)
            ttfts.append(statistics.median(first_token))

    total = sum(len(t) for t in reference)
    assert total == sum(p.max_new_tokens for _, p in requests) == sum(len(t) for t in batched)
    same = sum(a == b for a, b in zip(reference, batched))
    result = {"bench": "serving_batching", "model": name, "requests": args.requests, "max_batch_size": max_batch,
              "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "generated_tokens": total,
              "device": args.device, "dtype": args.dtype, "machine": machine, "torch": torch.__version__}
    for label, runs in (("one_by_one", sequential_runs), ("batched", batched_runs)):
        result[f"{label}_s"] = round(statistics.median(runs), 3)
        result[f"{label}_tokens_per_s"] = round(total / statistics.median(runs), 1)
    result["ratio"] = round(result["batched_tokens_per_s"] / result["one_by_one_tokens_per_s"], 2)
    result["batched_median_ttft_s"] = round(statistics.median(ttfts), 3)
    result["identical_outputs"] = same
    print(f"  one by one : {total:>7,} tokens in {result['one_by_one_s']:>8.2f} s = "
          f"{result['one_by_one_tokens_per_s']:>9,.0f} tok/s")
    print(f"  batched    : {total:>7,} tokens in {result['batched_s']:>8.2f} s = "
          f"{result['batched_tokens_per_s']:>9,.0f} tok/s   (median time to first token "
          f"{result['batched_median_ttft_s']:.3f} s)")
    print(f"  ratio {result['ratio']:.2f}x; {same}/{args.requests} requests gave identical tokens both ways")
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
