"""`smolforge plan RECIPE`: parameters, memory per GPU and time per step, before anything is allocated.

From shapes alone, as smolforge trains (bf16 autocast over fp32 master weights, AdamW; DESIGN.md).
P / T = all / trainable parameters (T = the adapters under LoRA), W = Linear weights (LM head
included), N = GPUs, rows = sequences per GPU and micro-batch (train.batch_size, 2x for DPO's chosen
+ rejected), s = data.seq_len, h / I / V = hidden / MLP / vocabulary width, L = layers, a / k =
query / KV heads of width d, e = activation bytes (2 in bf16, 4 in fp32), c = 2 where autocast
casts an fp32 matmul input (0 in fp32). Bytes per GPU:
- weights 4P (fp32 master, a frozen LoRA base too); bf16 weight copies 2W (autocast's casts, kept
  for the backward; none in fp32 nor under FSDP2, assumed with MixedPrecisionPolicy(bf16));
  gradients 4T (fp32); optimizer 8T (AdamW m and v), or with train.optimizer: muon 8T - 4M
  (M = the hidden-layer matrices, which keep Muon's single momentum buffer; no LoRA). FSDP2 shards these over N (ZeRO-3); DDP not;
- comm buffers: DDP with N > 1, 4T (torch's default gradient_as_bucket_view=False copies the
  gradients into buckets); FSDP2, 8 B x the largest wrapped unit (layer or embedding): two gathered
  bf16 units (current + prefetched) and one unsharded fp32 gradient;
- reference model (DPO, data.reference online): P x its stored bytes (the policy's shape assumed);
- activations = rows * s * bytes per token. Per token and layer, Korthikanti et al. 2022 ("Reducing
  Activation Recomputation in Large Transformer Models", eq. 1: s*b*h*(34 + 5as/h) for GPT) redone
  for this model (no dropout, fp32 residual stream and RMSNorm, SwiGLU, GQA):
      attention  8h + 3ch + e(2ad + 2kd) + 4a  [+ 8(a+k)d with QK-norm]  [+ es for masked rows]
      MLP        8h + 2ch + 4eI
  RMSNorm keeps its fp32 input and output; q, k, v, gate and up each keep a cast of their input;
  SDPA keeps q, k, v, output and the fp32 log-sum-exp, not the 5as of scores (FlashAttention
  recomputes them, Dao et al. 2022); SwiGLU keeps gate, silu(gate), up and their product. Rows
  packing several documents attend through a mask: the memory-efficient kernel keeps an additive
  bias (es) per layer, the boolean mask costs rows * s^2 once. MoE: per top-k slot (2ch, 4h in fp32)
  + 4e*I_e + eh, plus router (4 + e)E + ch and shared experts 2ch + 4e*I_e*n_shared. Activation
  checkpointing keeps each layer's fp32 input and recomputes one layer: 4hL + one layer. LoRA adds
  e*(in + r) per adapted Linear: its cast input and rank-r output (an upper bound);
- logits + loss: rows * s * (10h + 10V) in bf16 (logits 2V kept by the loop, fp32 upcast 4V,
  log-softmax output 4V; final norm 8h, head input cast 2h); rows * s * (8h + 8V) in fp32.
Fits when the sum <= memory * (1 - margin), a margin for the CUDA context, fragmentation and
optimizer-step temporaries. Time: FLOPs/token = `training_flops_per_token` (6 x active matmul
parameters + PaLM's 12*L*a*d*s); under LoRA frozen weights skip their weight-gradient matmul (6 ->
4), adapters add 6 x theirs; an online reference adds a forward (2 per parameter + a third of the
attention term). seconds/step = (FLOPs per step + the layers' recomputed forward under activation
checkpointing) / (N * peak bf16 FLOP/s * MFU), bf16 even in fp32; tokens/step = rows * s * grad_accum * N.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from smolforge import config as recipes
from smolforge.config import PreferenceDataConfig, PretrainRecipe, SFTDataConfig
from smolforge.data.preference import objective_needs_reference
from smolforge.errors import SmolforgeError
from smolforge.interop.hf import model_config_from_hf
from smolforge.interop.hub import is_hub_id
from smolforge.model import ModelConfig, count_parameters, format_count, training_flops_per_token
from smolforge.stages import STAGES
from smolforge.tokenizer import Tokenizer
from smolforge.train.lora import LoraSettings

GIB, MIB = 2**30, 2**20


@dataclass(frozen=True)
class GPU:
    name: str  # the key of smolforge.train.loop.PEAK_BF16_FLOPS, so planned and measured MFU agree
    peak_flops: float  # dense bf16 tensor-core FLOP/s (datasheets also quote 2x "with sparsity")
    memory: int  # bytes: memory.total as nvidia-smi reports it


GPUS = {
    "h100": GPU("H100", 989e12, 81559 * MIB),  # H100 SXM datasheet: 989 TFLOPS bf16 dense, 80 GB HBM3
    "h200": GPU("H200", 989e12, 143771 * MIB),  # H200 SXM datasheet: H100's tensor cores, 141 GB HBM3e
    "a100": GPU("A100", 312e12, 81920 * MIB),  # A100 SXM datasheet: 312 TFLOPS bf16 dense, 80 GB HBM2e
    "a100-40gb": GPU("A100", 312e12, 40960 * MIB),  # the same with 40 GB
    "a10": GPU("A10", 125e12, 23028 * MIB),  # A10 datasheet: 125 TFLOPS bf16 dense, 24 GB GDDR6
    "l4": GPU("L4", 121e12, 23034 * MIB),  # L4 datasheet: 121 TFLOPS bf16 dense (242 sparse), 24 GB
    "4090": GPU("4090", 165e12, 24564 * MIB),  # Ada whitepaper: 165 TFLOPS bf16, fp32 accumulate; 24 GB
    "3090": GPU("3090", 71e12, 24576 * MIB),  # GA102 whitepaper: 71 TFLOPS bf16, fp32 accumulate; 24 GB
}


@dataclass(frozen=True)
class Setup:  # what a recipe does not say: the hardware and how the run is spread over it
    gpus: int = 1
    parallel: str = "ddp"  # ddp | fsdp2
    gpu: str = "h100"
    mfu: float = 0.4
    activation_checkpointing: bool = False
    margin: float = 0.1  # share of GPU memory kept free for what the estimate leaves out


@dataclass
class Plan:
    stage: str
    rows: int  # sequences per GPU and micro-batch
    masked: bool  # rows pack documents, so attention goes through a mask
    checkpointing: bool  # activation checkpointing (--activation-checkpointing or the recipe's)
    params: dict[str, int]  # count_parameters + trainable
    memory: dict[str, int]  # bytes per GPU by component
    total_memory: int
    capacity: int
    usable: int  # capacity less the margin
    fits: bool
    tokens_per_step: int
    flops_per_step: float
    step_seconds: float
    tokens_per_second: float
    total_seconds: float | None  # None when train.epochs sets max_steps from the data
    notes: list[str]


def layer_activation_bytes(cfg: ModelConfig, seq_len: int, bf16: bool, masked: bool) -> int:
    """Bytes one decoder layer keeps for its backward pass, per token (formulas: module doc)."""
    h, d, a, k = cfg.hidden_size, cfg.resolved_head_dim, cfg.n_heads, cfg.n_kv_heads
    e, c = (2, 2) if bf16 else (4, 0)
    attn = 8 * h + 3 * c * h + e * (2 * a * d + 2 * k * d) + 4 * a + (e * seq_len if masked else 0)
    attn += 8 * (a + k) * d if cfg.qk_norm else 0
    if not cfg.n_experts:
        return attn + 8 * h + 2 * c * h + 4 * e * cfg.intermediate_size
    slot = (2 * c * h if c else 4 * h) + 4 * e * cfg.expert_size + e * h
    mlp = 8 * h + cfg.experts_per_token * slot + (4 + e) * cfg.n_experts + c * h
    shared = 2 * c * h + 4 * e * cfg.expert_size * cfg.n_shared_experts if cfg.n_shared_experts else 0
    return attn + mlp + shared


def muon_matrices(cfg: ModelConfig) -> int:
    """Parameters Muon trains under `train.optimizer: muon` (smolforge.train.optim.muon_parameters):
    the blocks' attention and MLP/expert matrices, less the MoE routers."""
    h, d = cfg.hidden_size, cfg.resolved_head_dim
    attn = h * d * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)
    if cfg.n_experts:
        mlp = (cfg.n_experts + cfg.n_shared_experts) * 3 * h * cfg.expert_size
    else:
        mlp = 3 * h * cfg.intermediate_size
    return cfg.n_layers * (attn + mlp)


def lora_linears(cfg: ModelConfig, lora: LoraSettings) -> list[tuple[int, int, float]]:
    """(in, out, share of tokens through it) of every Linear that `lora` adapts, in all layers."""
    h, q, kv = cfg.hidden_size, cfg.n_heads * cfg.resolved_head_dim, cfg.n_kv_heads * cfg.resolved_head_dim
    mlps = [(cfg.intermediate_size, 1.0)]
    if cfg.n_experts:  # a routed expert sees top-k / E of the tokens; shared experts see them all
        mlps = [(cfg.expert_size, cfg.experts_per_token / cfg.n_experts)] * cfg.n_experts
        mlps += [(cfg.expert_size * cfg.n_shared_experts, 1.0)] if cfg.n_shared_experts else []
    linears = {"q_proj": [(h, q, 1.0)], "k_proj": [(h, kv, 1.0)], "v_proj": [(h, kv, 1.0)],
               "o_proj": [(q, h, 1.0)], "gate_proj": [(h, i, f) for i, f in mlps],
               "up_proj": [(h, i, f) for i, f in mlps], "down_proj": [(i, h, f) for i, f in mlps]}
    unknown = [t for t in lora.target_modules if t not in linears]
    if unknown:  # the LM head, embeddings and MoE router are never adapted (smolforge.train.lora)
        raise SmolforgeError(f"unknown LoRA target(s) {unknown}; this model's adaptable layers: {sorted(linears)}")
    return [shape for t in lora.target_modules for shape in linears[t]] * cfg.n_layers


def estimate(recipe: PretrainRecipe, cfg: ModelConfig, setup: Setup, reference_width: int = 4) -> Plan:
    """Memory per GPU and time per step of `recipe` training `cfg` on `setup` (online reference: its bytes/param)."""
    if setup.gpu not in GPUS or setup.parallel not in ("ddp", "fsdp2") or setup.gpus < 1 or not (
            0 < setup.mfu <= 1 and 0 <= setup.margin < 1):
        raise SmolforgeError(f"need a GPU of {', '.join(GPUS)}, ddp|fsdp2, gpus >= 1, 0 < mfu <= 1, 0 <= margin < 1: {setup}")
    gpu, t, s, n, L, h = GPUS[setup.gpu], recipe.train, recipe.data.seq_len, setup.gpus, cfg.n_layers, cfg.hidden_size
    bf16 = t.precision != "fp32"  # auto = bf16 autocast on CUDA, which is what a plan is for
    preference = isinstance(recipe.data, PreferenceDataConfig)
    rows = t.batch_size * (2 if preference else 1)
    online = preference and recipe.data.reference == "online" and objective_needs_reference(t.objective)
    # Rows holding several documents attend through a mask; pretraining always packs.
    masked = not preference and recipe.data.document_masking and getattr(recipe.data, "packing", "") != "none"
    counts = count_parameters(cfg)
    total, embedding, head = counts["total"], counts["embedding"], 0 if cfg.tie_embeddings else counts["embedding"]
    linear = total - L * (2 * h + (2 * cfg.resolved_head_dim if cfg.qk_norm else 0)) - h - head  # less norms, untied lookup
    r, fsdp = recipe.lora.r, setup.parallel == "fsdp2"
    adapters, shard = lora_linears(cfg, recipe.lora) if r > 0 else [], n if fsdp else 1
    trainable = sum(r * (i + o) for i, o, _ in adapters) if adapters else total
    unit = max(embedding, (total - embedding - head - h) // L)  # FSDP2 wraps each layer and the embedding
    layer = layer_activation_bytes(cfg, s, bf16, masked) + sum((2 if bf16 else 4) * (i + r) * f for i, _, f in adapters) / L
    checkpointing = setup.activation_checkpointing or t.activation_checkpointing
    kept = 4 * h * L + layer if checkpointing else L * layer
    memory = {
        "weights": math.ceil(4 * total / shard),
        "bf16 weight copies": 2 * linear if bf16 and not fsdp else 0,
        "gradients": math.ceil(4 * trainable / shard),
        "optimizer": math.ceil((8 * trainable - 4 * (muon_matrices(cfg) if t.optimizer == "muon" and r == 0 else 0)) / shard),
        "comm buffers": 8 * unit if fsdp else (4 * trainable if n > 1 else 0),
        "reference model": reference_width * total if online else 0,
        "activations": math.ceil(rows * s * (kept + (s if masked else 0))),
        "logits + loss": rows * s * (10 if bf16 else 8) * (h + cfg.vocab_size),
    }
    fpt = training_flops_per_token(cfg, s)
    attn_flops = 12 * L * cfg.n_heads * cfg.resolved_head_dim * s
    matmul = (fpt - attn_flops) / 6
    if adapters:
        fpt = attn_flops + 4 * matmul + 6 * sum(r * (i + o) * f for i, o, f in adapters)
    fpt += 2 * matmul + attn_flops / 3 if online else 0
    tokens = rows * s * t.grad_accum * n
    # Recomputation is not a model FLOP (PaLM's MFU) but takes time: one more forward of the layers.
    recompute = 2 * (matmul - cfg.vocab_size * h) + attn_flops / 3 if checkpointing else 0
    step = (fpt + recompute) * tokens / (n * gpu.peak_flops * setup.mfu)
    notes = [f"train.epochs = {t.epochs:g} sets max_steps from the data: pass --train.max_steps"] if t.epochs else []
    used, usable = sum(memory.values()), int(gpu.memory * (1 - setup.margin))
    return Plan(stage="dpo" if preference else "sft" if isinstance(recipe.data, SFTDataConfig) else "pretrain",
                rows=rows, masked=masked, checkpointing=checkpointing, params={**counts, "trainable": trainable},
                memory=memory, total_memory=used, capacity=gpu.memory, usable=usable, fits=used <= usable,
                tokens_per_step=tokens, flops_per_step=fpt * tokens, step_seconds=step, tokens_per_second=tokens / step,
                total_seconds=None if t.epochs else t.max_steps * step, notes=notes)


def local_config(name: str) -> Path | None:
    """config.json of a local model directory, or of a Hub repo already in the cache (no download)."""
    from huggingface_hub import try_to_load_from_cache

    path = Path(name).expanduser() / "config.json"
    if path.is_file() or not is_hub_id(name):
        return path if path.is_file() else None
    repo, _, revision = name.partition("@")
    cached = try_to_load_from_cache(repo, "config.json", revision=revision or None)
    return Path(cached) if isinstance(cached, str) else None


def resolve_model(recipe: PretrainRecipe) -> tuple[ModelConfig, str]:
    """The model the stage would train, and where its shape came from."""
    cfg, source, init = recipe.model, "the recipe's model section", recipe.run.init_from
    if init and (config_file := local_config(init)) is not None:
        cfg = model_config_from_hf(json.loads(config_file.read_text(encoding="utf-8")), str(config_file))
        source = f"run.init_from {init}"
        if recipe.data.seq_len > cfg.max_seq_len:  # as the loop would refuse it
            raise SmolforgeError(f"data.seq_len ({recipe.data.seq_len}) exceeds {init}'s context ({cfg.max_seq_len})")
    elif init:  # DESIGN.md "nothing silent": these numbers describe the model section, not init_from
        print(f"warning: run.init_from {init} has no local config.json (download Hub models first); "
              f"planning with the recipe's model section instead", file=sys.stderr)
    if cfg.vocab_size == 0:
        if not recipe.data.tokenizer or not Path(recipe.data.tokenizer).exists():
            raise SmolforgeError("model.vocab_size is 0 (taken from the tokenizer) and data.tokenizer names no "
                                 "local tokenizer: pass --model.vocab_size or --data.tokenizer")
        vocab = Tokenizer.load(recipe.data.tokenizer).vocab_size  # rounded up to 128 as the loop does
        cfg = cfg.model_copy(update={"vocab_size": 128 * math.ceil(vocab / 128)})
    return cfg, source


def _size(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / MIB:.1f} MiB"


def _duration(seconds: float) -> str:
    unit = next(((u, v) for u, v in (("d", 86400), ("h", 3600), ("min", 60)) if seconds >= 2 * v), None)
    return f"{seconds / unit[1]:.1f} {unit[0]}" if unit else f"{seconds:.3g} s"


def format_plan(plan: Plan, recipe: PretrainRecipe, setup: Setup, source: str) -> str:
    """The plan as an aligned plain-text table ending in a one-line verdict."""
    gpu, t, p = GPUS[setup.gpu], recipe.train, plan.params
    rows = [("model", f"{format_count(p['total'])} parameters ({format_count(p['active'])} active, "
                      f"{format_count(p['trainable'])} trainable) from {source}"),
            ("setup", f"{plan.stage}: {plan.rows} rows x {recipe.data.seq_len} tokens x {t.grad_accum} accum x "
                      f"{setup.gpus} {gpu.name} ({setup.parallel}), {'fp32' if t.precision == 'fp32' else 'bf16'}, "
                      f"{'masked' if plan.masked else 'flash'} attention{', checkpointing' * plan.checkpointing}"),
             ("memory per GPU", "")]
    rows += [(f"  {name}", f"{_size(v):>10}") for name, v in plan.memory.items() if v]
    rows += [("  total", f"{_size(plan.total_memory):>10}   of {_size(plan.capacity)}; {_size(plan.usable)} usable "
                         f"with a {setup.margin:.0%} margin"), ("time", ""),
             ("  tokens per step", f"{plan.tokens_per_step:>10,}   {plan.flops_per_step:.3g} FLOPs"),
             ("  time per step", f"{_duration(plan.step_seconds):>10}   at {setup.mfu:.0%} MFU of "
                                 f"{gpu.peak_flops / 1e12:.0f} TFLOP/s bf16 per GPU"),
             ("  tokens/s", f"{plan.tokens_per_second:>10,.0f}   {plan.tokens_per_second / setup.gpus:,.0f} per GPU"),
             (f"  run ({t.max_steps:,} steps)", f"{_duration(plan.total_seconds) if plan.total_seconds else 'n/a':>10}")]
    lines = [f"{label:<24}{value}".rstrip() for label, value in rows] + [f"note: {x}" for x in plan.notes]
    share = f"{_size(plan.total_memory)} per {gpu.name} ({plan.total_memory / plan.capacity:.0%} of its memory)"
    verdict = (f"fits, {share}, {_duration(plan.step_seconds)} per step" if plan.fits else
               f"does NOT fit, {share} > {_size(plan.usable)} usable; try --activation-checkpointing, a smaller "
               f"train.batch_size with more train.grad_accum, --parallel fsdp2 over more --gpus, or --lora.r")
    return "\n".join([*lines, f"verdict: {verdict}"])


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "plan", help="Estimate parameters, memory per GPU and time per step of a recipe, before training.",
        description="From shapes alone: parameters, memory per GPU (weights, gradients, optimizer state (AdamW or Muon), activations, "
                    "logits) and whether it fits, tokens and FLOPs per step, time at an assumed MFU. Formulas and "
                    "assumptions: `pydoc smolforge.lab.plan`.")
    parser.add_argument("recipe", nargs="?", help="YAML recipe (see recipes/); omit to use only flags.")
    parser.add_argument("--stage", choices=["pretrain", "sft", "dpo"], default="pretrain", help="Schema and defaults to read the recipe with.")
    parser.add_argument("--gpus", type=int, default=1, help="Data-parallel world size (GPUs).")
    parser.add_argument("--parallel", choices=["ddp", "fsdp2"], default=None,
                        help="ddp replicates weights, gradients and optimizer state; fsdp2 shards them over --gpus. "
                             "Default: the recipe's train.parallel.")
    parser.add_argument("--gpu", choices=list(GPUS), default="h100", help="GPU model: peak bf16 FLOP/s and memory.")
    parser.add_argument("--mfu", type=float, default=0.4, help="Assumed model FLOPs utilisation (playbook: ~0.3).")
    parser.add_argument("--activation-checkpointing", action="store_true", help="Same as --train.activation_checkpointing true.")
    parser.add_argument("--margin", type=float, default=0.1, help="Share of memory kept free (not modelled).")
    parser.add_argument("--json", action="store_true", help="Print the numbers as JSON instead of a table.")
    recipes.add_recipe_arguments(parser, PretrainRecipe)
    # The SFT and DPO data fields that pretraining's data section lacks, so --stage sft/dpo take them too.
    group = parser.add_argument_group("data, sft and dpo stages")
    for name, info in {**PreferenceDataConfig.model_fields, **SFTDataConfig.model_fields}.items():
        if name not in recipes.DataConfig.model_fields:
            group.add_argument(f"--data.{name}", dest=f"override:data.{name}", default=argparse.SUPPRESS,
                               metavar="VALUE", help=(info.description or "").replace("%", "%%"))
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    try:
        recipe = recipes.load_recipe(args.recipe, recipes.collect_overrides(args), STAGES[args.stage][0])
    except SmolforgeError as exc:  # SFT / DPO keys read with the pretraining schema: say so
        hint = " (an SFT or DPO recipe? pass --stage sft or --stage dpo)" if "unknown key" in str(exc) else ""
        raise SmolforgeError(f"{exc}{hint if args.stage == 'pretrain' else ''}") from None
    cfg, source = resolve_model(recipe)
    setup = Setup(args.gpus, args.parallel or recipe.train.parallel, args.gpu, args.mfu, args.activation_checkpointing, args.margin)
    # An online DPO reference is loaded in its stored dtype (load_model keeps it); fp32 when unknown.
    ref = getattr(recipe.data, "reference_model", "") or recipe.run.init_from
    stored = json.loads(path.read_text(encoding="utf-8")) if ref and (path := local_config(ref)) else {}
    width = {"bfloat16": 2, "float16": 2}.get(stored.get("torch_dtype") or stored.get("dtype"), 4)
    plan = estimate(recipe, cfg, setup, width)
    report = json.dumps({**asdict(plan), "model_source": source, "setup": asdict(setup)}, indent=2)
    print(report if args.json else format_plan(plan, recipe, setup, source))
    return 0
