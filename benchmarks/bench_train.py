"""Training-step throughput: smolforge vs Hugging Face `transformers` LlamaForCausalLM.

Both models get the same shape, the same weights, the same batch and dtype, and the same
optimizer (AdamW); each step is forward + cross-entropy + backward + optimizer step. The two
are timed alternately in one process so that machine noise hits both alike.

    python benchmarks/bench_train.py --preset smol-10m --vocab 8192 --batch 8 --seq 256
    python benchmarks/bench_train.py --device cuda --dtype bf16 --preset smollm2-135m --batch 16 --seq 2048

Packed rows (`--docs N`: N documents of random lengths per row, intra-document masking) compare
smolforge's attention backends (`--attention sdpa | flex | flash`, as `train.attention`) with
one another, one run per backend; transformers is left out there (its SDPA path takes no
document mask). MFU counts the full causal T x T attention whatever the mask skips.

    python benchmarks/bench_train.py --device cuda --dtype bf16 --preset smollm2-135m --batch 16 --seq 2048 \
        --docs 8 --attention flex
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from smolforge.kernels import ATTENTION_BACKENDS, resolve_attention
from smolforge.model import PRESETS, Transformer, count_parameters, training_flops_per_token


def hf_llama(model: Transformer):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = model.config
    hf_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.resolved_head_dim, max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings, attn_implementation="sdpa",
    )
    hf = LlamaForCausalLM(hf_cfg)
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return hf


def make_step(model, logits_of, dtype, device):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()

    def step(x):
        with autocast():
            logits = logits_of(x[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def packed_inputs(batch: int, seq: int, docs: int, device: torch.device) -> dict[str, torch.Tensor]:
    """position_ids and document_ids for rows of `docs` documents cut at random points."""
    g = torch.Generator().manual_seed(0)
    document_ids = torch.zeros(batch, seq, dtype=torch.long)
    for row in range(batch):
        cuts = torch.randperm(seq - 1, generator=g)[: docs - 1] + 1
        document_ids[row, cuts] = 1
    document_ids = document_ids.cumsum(1)
    index = torch.arange(seq).expand(batch, seq)
    starts = torch.where(torch.diff(document_ids, dim=1, prepend=document_ids[:, :1] - 1) > 0, index, 0)
    position_ids = index - starts.cummax(1).values
    return {"position_ids": position_ids.to(device), "document_ids": document_ids.to(device)}


def timed(fn, device) -> float:
    """Wall time of fn(), with the GPU queue drained before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="smol-10m", choices=sorted(PRESETS))
    parser.add_argument("--vocab", type=int, default=8192, help="Vocabulary when the preset has none.")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10, help="Timed steps per model.")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--compile", action="store_true", help="torch.compile both models.")
    parser.add_argument("--docs", type=int, default=1,
                        help="Documents packed into each row; > 1 masks attention per document (smolforge only).")
    parser.add_argument("--attention", default="sdpa", choices=ATTENTION_BACKENDS,
                        help="smolforge's attention backend for packed rows (train.attention).")
    parser.add_argument("--json", help="Append a JSON line of results to this file.")
    args = parser.parse_args()

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    device = torch.device(args.device)
    cfg = PRESETS[args.preset]()
    cfg = cfg.model_copy(update={"vocab_size": cfg.vocab_size or args.vocab,
                                 "max_seq_len": max(cfg.max_seq_len, args.seq)})
    ours = Transformer(cfg).to(device)
    ours.attention_backend = resolve_attention(args.attention, device, args.docs > 1, args.dtype == "bf16")
    packed = packed_inputs(args.batch, args.seq, args.docs, device) if args.docs > 1 else {}
    ours_fwd = torch.compile(ours) if args.compile else ours
    steps = {"smolforge": make_step(ours, lambda x: ours_fwd(x, **packed).logits, args.dtype, device)}
    if not packed:
        theirs = hf_llama(ours).to(device)
        theirs_fwd = torch.compile(theirs) if args.compile else theirs
        steps["transformers"] = make_step(theirs, lambda x: theirs_fwd(input_ids=x).logits, args.dtype, device)
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), device=device)
    for _ in range(args.warmup):
        for step in steps.values():
            step(x)
    times = {name: [] for name in steps}
    for _ in range(args.steps):  # alternate so drift in machine load affects both
        for name, step in steps.items():
            times[name].append(timed(lambda step=step: step(x).item(), device))
    tokens = args.batch * args.seq
    result = {"preset": args.preset, "params": count_parameters(cfg)["total"], "batch": args.batch,
              "seq": args.seq, "device": args.device, "dtype": args.dtype, "compile": args.compile,
              "docs": args.docs, "attention": ours.attention_backend,
              "machine": torch.cuda.get_device_name() if device.type == "cuda" else
              f"{platform.processor() or platform.machine()} x{os.cpu_count()} threads"}
    for name, ts in times.items():
        result[f"{name}_tokens_per_s"] = tokens / statistics.median(ts)
    if "transformers" in steps:
        result["ratio"] = result["smolforge_tokens_per_s"] / result["transformers_tokens_per_s"]
    if device.type == "cuda":
        result["smolforge_mfu"] = (training_flops_per_token(cfg, args.seq) * result["smolforge_tokens_per_s"]
                                   / 989e12)
    print(f"{args.preset} ({result['params'] / 1e6:.1f}M params) batch {args.batch} x seq {args.seq}, "
          f"{args.dtype} on {result['machine']}"
          + (f", {args.docs} documents per row, attention {ours.attention_backend}" if packed else ""))
    for name in steps:
        print(f"  {name:>12}: {result[f'{name}_tokens_per_s']:,.0f} tokens/s (median of {args.steps})")
    if "ratio" in result:
        print(f"  ratio smolforge / transformers: {result['ratio']:.2f}x")
    if "smolforge_mfu" in result:
        print(f"  smolforge MFU: {result['smolforge_mfu']:.1%}")
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
