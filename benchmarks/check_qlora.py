"""QLoRA against full-precision LoRA on one GPU: memory, steps/s, and that the loss falls.

One process, one model shape (SmolLM2-135M's by default, random weights, so nothing is
downloaded), the same batch, adapters (r 16 on every projection) and AdamW for each mode, all
under bf16 autocast as the training loop runs on CUDA:
- `lora`:  the fp32 base on the GPU, fp32 adapters (`lora.quantize: none`);
- `qlora`: the base's Linear layers in NF4 with double quantisation and bf16 compute
  (`lora.quantize: nf4`, Dettmers et al. 2023), fp32 adapters;
- `full`:  full fine-tuning, for reference (`--modes lora qlora full`).
Reported per mode: GPU memory held after setup (weights + adapters), peak memory over the timed
steps, steps/s after warm-up, and the loss of the first and last step on one fixed batch (the
model memorises it, so the loss must fall). For `qlora` also the merge check: the largest logit
difference between the model as trained (NF4 base + adapters) and its merged fp32 copy
(`merged_copy`, what checkpoints hold), relative to the largest logit.

    python benchmarks/check_qlora.py
    python benchmarks/check_qlora.py --preset smollm2-360m --batch 4 --seq 1024 --modes lora qlora full
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from smolforge.model import PRESETS, ModelConfig, Transformer
from smolforge.train.lora import LoraSettings, apply_lora, merged_copy, quantize_base

GIB = 2**30


def loss_of(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(batch[:, :-1]).logits
    return F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())


def run_mode(mode: str, cfg: ModelConfig, args: argparse.Namespace, batch: torch.Tensor) -> dict:
    device = torch.device("cuda")
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    torch.manual_seed(0)
    model = Transformer(cfg)  # fp32 on the CPU, as the loop loads a base
    if mode == "qlora":
        quantize_base(model, device)  # layer by layer onto the GPU, in 4 bits
    else:
        model.to(device)
    if mode == "full":
        params = [p for p in model.parameters() if p.requires_grad]
    else:
        params = apply_lora(model, LoraSettings(r=args.rank, alpha=2 * args.rank, quantize="nf4" if mode == "qlora" else "none"))
    optimizer = torch.optim.AdamW(params, lr=args.lr, fused=True)
    setup_bytes = torch.cuda.memory_allocated() - before
    model.train()
    losses, seconds = [], 0.0
    torch.cuda.reset_peak_memory_stats()
    for step in range(args.warmup + args.steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        loss = loss_of(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())  # synchronises
        if step >= args.warmup:
            seconds += time.perf_counter() - start
    result = {
        "mode": mode, "trainable_params": sum(p.numel() for p in params),
        "setup_gib": setup_bytes / GIB, "peak_gib": (torch.cuda.max_memory_allocated() - before) / GIB,
        "steps_per_s": args.steps / seconds, "tokens_per_s": args.steps * batch[:, 1:].numel() / seconds,
        "loss_first": losses[0], "loss_last": losses[-1], "loss_falls": losses[-1] < losses[0] - 0.1,
    }
    if mode == "qlora":
        model.eval()
        probe = batch[:2]
        with torch.no_grad():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                trained = model(probe).logits.float().cpu()
            merged = merged_copy(model)
            from_merged = merged(probe.cpu()).logits
        result["merge_max_abs_diff"] = float((from_merged - trained).abs().max())
        result["merge_rel_diff"] = result["merge_max_abs_diff"] / float(trained.abs().max())
        del merged
    del model, optimizer, params
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="smollm2-135m", choices=sorted(PRESETS))
    parser.add_argument("--modes", nargs="+", default=["lora", "qlora"], choices=["lora", "qlora", "full"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default="", help="JSON file for the results (default: $OUT/check_qlora.json if OUT is set)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("check_qlora needs a CUDA GPU (QLoRA's 4-bit base is CUDA only)")
    import bitsandbytes

    cfg = PRESETS[args.preset]()
    if not cfg.vocab_size:  # presets that take the tokenizer's vocabulary: SmolLM2's 49,152
        cfg = cfg.model_copy(update={"vocab_size": 49152})
    batch = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(0)).cuda()
    results = [run_mode(mode, cfg, args, batch) for mode in args.modes]
    info = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "bitsandbytes": bitsandbytes.__version__,
            "preset": args.preset, "batch": args.batch, "seq": args.seq, "rank": args.rank, "steps": args.steps}
    print(json.dumps(info))
    print("| mode | trainable | setup GiB | peak GiB | steps/s | tokens/s | loss first -> last | merge rel. diff |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        merge = f"{r['merge_rel_diff']:.2e}" if "merge_rel_diff" in r else ""
        print(f"| {r['mode']} | {r['trainable_params'] / 1e6:.2f}M | {r['setup_gib']:.3f} | {r['peak_gib']:.3f} | "
              f"{r['steps_per_s']:.2f} | {r['tokens_per_s']:,.0f} | {r['loss_first']:.3f} -> {r['loss_last']:.3f}"
              f"{'' if r['loss_falls'] else ' (DID NOT FALL)'} | {merge} |")
    out = args.out or (str(Path(os.environ["OUT"]) / "check_qlora.json") if os.environ.get("OUT") else "")
    if out:
        Path(out).write_text(json.dumps({**info, "results": results}, indent=2) + "\n")
        print(f"wrote {out}")
    if not all(r["loss_falls"] for r in results) or any(r.get("merge_rel_diff", 0) > 0.05 for r in results):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
