"""Decode throughput: smolforge's engine vs `transformers` `generate` on the same model.

Same weights (loaded into `LlamaForCausalLM`), same prompts, greedy, a fixed number of new
tokens with EOS ignored, both with a KV cache; each measured after a warm-up run, alternating.

    python benchmarks/bench_decode.py --preset smol-10m --batch-sizes 1 8 --new-tokens 256
    python benchmarks/bench_decode.py --device cuda --dtype bf16 --preset smollm2-135m
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics

import torch
from bench_train import hf_llama, timed  # noqa: E402  (run from the repo root or benchmarks/)

from smolforge.engine import Engine, SamplingParams
from smolforge.model import PRESETS, Transformer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="smol-10m", choices=sorted(PRESETS))
    parser.add_argument("--vocab", type=int, default=8192, help="Vocabulary when the preset has none.")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--json", help="Append JSON lines of results to this file.")
    args = parser.parse_args()

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    cfg = PRESETS[args.preset]()
    cfg = cfg.model_copy(update={"vocab_size": cfg.vocab_size or args.vocab,
                                 "max_seq_len": max(cfg.max_seq_len, args.prompt_len + args.new_tokens)})
    ours = Transformer(cfg).eval()
    theirs = hf_llama(ours).eval()
    ours, theirs = ours.to(device, dtype), theirs.to(device, dtype)
    engine = Engine(ours)
    machine = (torch.cuda.get_device_name() if device.type == "cuda"
               else f"{platform.processor() or platform.machine()} x{os.cpu_count()} threads")
    print(f"{args.preset}, prompt {args.prompt_len} + {args.new_tokens} new tokens, greedy, {args.dtype} on {machine}")
    for batch in args.batch_sizes:
        prompts = torch.randint(1, cfg.vocab_size, (batch, args.prompt_len), device=device)
        params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0, ignore_eos=True)

        def run_ours(prompts=prompts, params=params):
            out = engine.generate(prompts.tolist(), params)
            assert all(len(c.tokens) == args.new_tokens for c in out)

        @torch.inference_mode()
        def run_theirs(prompts=prompts):
            out = theirs.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                                  max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                  eos_token_id=None, pad_token_id=0)
            assert out.shape[1] == args.prompt_len + args.new_tokens

        run_ours(), run_theirs()  # warm-up
        times = {"smolforge": [], "transformers": []}
        for _ in range(args.repeats):
            times["smolforge"].append(timed(run_ours, device))
            times["transformers"].append(timed(run_theirs, device))
        tokens = batch * args.new_tokens
        result = {"preset": args.preset, "batch": batch, "new_tokens": args.new_tokens, "device": args.device,
                  "dtype": args.dtype, "machine": machine,
                  **{f"{k}_tokens_per_s": tokens / statistics.median(v) for k, v in times.items()}}
        result["ratio"] = result["smolforge_tokens_per_s"] / result["transformers_tokens_per_s"]
        print(f"  batch {batch:>3}: smolforge {result['smolforge_tokens_per_s']:,.0f} tok/s, transformers "
              f"{result['transformers_tokens_per_s']:,.0f} tok/s, ratio {result['ratio']:.2f}x")
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
