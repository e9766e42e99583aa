"""Decode throughput: smolforge's `Engine` vs `transformers` `generate` on the same model.

Random weights of a preset are loaded into both smolforge's `Transformer` and
`transformers.LlamaForCausalLM` (identical logits). Both decode greedily from the same random
prompts, a fixed number of new tokens with EOS disabled, each with its KV cache. After one
warm-up run of each, the two are timed alternately (so machine noise hits both alike) and the
median run gives tokens/s = batch x new tokens / seconds (prefill included, as a user sees it).

    python benchmarks/bench_decode.py --preset smol-10m --vocab 8192 --batch-sizes 1 8
    python benchmarks/bench_decode.py --device cuda --dtype bf16 --preset smollm2-135m --json out.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch

from smolforge.engine import Engine, SamplingParams
from smolforge.model import PRESETS, Transformer


def to_hf_llama(model: Transformer) -> torch.nn.Module:
    """The same weights in `LlamaForCausalLM` (parameter names are HF Llama's already)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = model.config
    if cfg.n_experts or cfg.qk_norm or cfg.nope_interval or cfg.attention_bias:
        raise SystemExit(f"{cfg} is not a plain Llama shape; pick a dense RoPE preset")
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.resolved_head_dim, max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings, attention_bias=False,
        attn_implementation="sdpa"))
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return hf


def seconds(fn: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def time_both(engine: Engine, hf: torch.nn.Module, prompts: torch.Tensor, params: SamplingParams,
              repeats: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds per run of each implementation, after one warm-up run of each, alternating."""
    prompt_lists, n_new = prompts.tolist(), params.max_new_tokens

    def run_smolforge() -> None:
        out = engine.generate(prompt_lists, params)
        assert all(len(c.tokens) == n_new for c in out)

    @torch.inference_mode()
    def run_transformers() -> None:
        out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                          max_new_tokens=n_new, min_new_tokens=n_new, eos_token_id=None, pad_token_id=0)
        assert out.shape[1] == prompts.shape[1] + n_new

    runners = {"smolforge": run_smolforge, "transformers": run_transformers}
    for fn in runners.values():
        fn()  # warm-up: allocator, kernels, lazy imports
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, fn in runners.items():
            times[name].append(seconds(fn, device))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="smol-10m", choices=sorted(PRESETS), help="Model shape.")
    parser.add_argument("--vocab", type=int, default=8192, help="Vocabulary size when the preset has none.")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8], help="Batch sizes to measure.")
    parser.add_argument("--prompt-len", type=int, default=32, help="Tokens per prompt.")
    parser.add_argument("--new-tokens", type=int, default=256, help="Tokens generated per prompt.")
    parser.add_argument("--repeats", type=int, default=3, help="Timed runs of each (median is reported).")
    parser.add_argument("--device", default="cpu", help="cpu or cuda.")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="Weights and cache dtype.")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch CPU threads.")
    parser.add_argument("--json", help="Append one JSON line per batch size to this file.")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    cfg = PRESETS[args.preset]()
    cfg = cfg.model_copy(update={"vocab_size": cfg.vocab_size or args.vocab,
                                 "max_seq_len": max(cfg.max_seq_len, args.prompt_len + args.new_tokens)})
    ours = Transformer(cfg).eval()
    theirs = to_hf_llama(ours).eval()
    ours, theirs = ours.to(device, dtype), theirs.to(device, dtype)
    engine = Engine(ours)
    machine = (torch.cuda.get_device_name() if device.type == "cuda"
               else f"{platform.processor() or platform.machine()}, {args.threads} threads")
    print(f"{args.preset} (vocab {cfg.vocab_size}), prompt {args.prompt_len} + {args.new_tokens} new tokens, "
          f"greedy, {args.dtype} on {machine}; torch {torch.__version__}")
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0, ignore_eos=True)
    for batch in args.batch_sizes:
        prompts = torch.randint(1, cfg.vocab_size, (batch, args.prompt_len), device=device)
        times = time_both(engine, theirs, prompts, params, args.repeats, device)
        tokens = batch * args.new_tokens
        result = {"bench": "decode", "preset": args.preset, "vocab": cfg.vocab_size, "batch": batch,
                  "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "device": args.device,
                  "dtype": args.dtype, "machine": machine, "torch": torch.__version__}
        for name, runs in times.items():
            result[f"{name}_tokens_per_s"] = round(tokens / statistics.median(runs), 1)
        result["ratio"] = round(result["smolforge_tokens_per_s"] / result["transformers_tokens_per_s"], 3)
        print(f"  batch {batch:>3}: smolforge {result['smolforge_tokens_per_s']:>9,.0f} tok/s   "
              f"transformers {result['transformers_tokens_per_s']:>9,.0f} tok/s   ratio {result['ratio']:.2f}x")
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
