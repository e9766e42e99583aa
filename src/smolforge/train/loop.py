"""The training loop: one plain `while` loop for every stage.

Stages differ only in their data and their objective (looked up by name in
`smolforge.train.objectives`). The loop handles the rest the same way for all of them:
AdamW (or Muon + AdamW, `train.optimizer`) with warmup + WSD/cosine/linear/constant, gradient accumulation in fp32, clipping, bf16
autocast with fp32 master weights on CUDA (playbook ch. 04/07: bf16-only accumulation drifts),
periodic evaluation, atomic checkpoints with exact resume (model, optimizer, data position, RNG
states), `metrics.jsonl`, and a progress bar with loss, lr, tokens/s and ETA.

Under `torchrun` (pretraining, SFT, preference and reward stages) the same loop runs
data-parallel with DDP or FSDP2 (`train.parallel`, `smolforge.train.fsdp`): each rank reads its
share of every global batch (train.batch_size stays the global rows per micro-batch), the loss
weights use global token (or pair) counts so the gradient equals the single-process one, and
rank 0 alone writes files and prints. Evaluation: every rank runs the full validation set (under
DDP on its own, identical numbers; under FSDP2 together, each forward gathers the weights) and
rank 0 logs it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from smolforge import __version__
from smolforge.config import (
    PreferenceDataConfig,
    PretrainRecipe,
    RLDataConfig,
    SFTDataConfig,
    save_recipe,
)
from smolforge.data.loader import PretrainLoader, SourceSpec, model_inputs
from smolforge.errors import SmolforgeError
from smolforge.eval.bpb import evaluate_loss_and_bpb, token_byte_lengths
from smolforge.kernels import check_liger, resolve_attention
from smolforge.model import (
    ModelConfig,
    Transformer,
    count_parameters,
    format_count,
    training_flops_per_token,
)
from smolforge.train import checkpoint as ckpt
from smolforge.train import distributed as dist_utils
from smolforge.train import fsdp
from smolforge.train.distributed import DistInfo
from smolforge.train.lora import (
    adapter_state_dict,
    apply_lora,
    merged_copy,
    quantize_base,
    save_adapter,
)
from smolforge.train.objectives import IGNORE_INDEX, get_objective
from smolforge.train.optim import build_optimizer
from smolforge.train.progress import TrainProgress
from smolforge.train.qlora import require_cuda
from smolforge.train.resilience import GracefulStop, LossGuard
from smolforge.train.schedule import lr_multiplier
from smolforge.train.trackers import Trackers

# Dense bf16 peak FLOP/s per GPU for MFU (vendor datasheets, without sparsity).
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "A10": 125e12, "L4": 121e12,
                   "4090": 165e12, "3090": 71e12}


@dataclass
class RunResult:
    run_dir: Path
    final_checkpoint: Path
    steps: int
    metrics: dict[str, float] = field(default_factory=dict)
    wall_seconds: float = 0.0
    interrupted: bool = False  # stopped by SIGTERM / SIGINT after writing a checkpoint
    stop_signal: str | None = None


class MetricsLog:
    """Append-only `metrics.jsonl`, flushed per record so a crash loses nothing logged; each
    record also goes to the optional trackers."""

    def __init__(self, path: Path, resume_step: int | None, trackers: Trackers) -> None:
        self.path, self.trackers = path, trackers
        if resume_step is not None and path.exists():
            # Records after the checkpoint we resume from will be produced again: drop them.
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, path)
        self.file = path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        self.trackers.log(record)

    def close(self) -> None:
        self.file.close()
        self.trackers.close()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SmolforgeError(f"train.device: {name!r} asked for, but CUDA is not available here; use 'cpu' or 'auto'")
    return device


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_data(recipe: PretrainRecipe, tokenizer: Any, device: torch.device | None = None,
               run_dir: Path | None = None, dist: DistInfo | None = None):
    """Training loader and (optional) validation loader from the recipe's data section.

    With `dist` of several ranks, the training loader yields this rank's share of each global
    batch; the validation loader stays whole (every rank evaluates all of it).
    """
    world = dist.world_size if dist is not None else 1
    rank = dist.rank if dist is not None else 0
    if world > 1 and isinstance(recipe.data, RLDataConfig):
        raise SmolforgeError(f"data-parallel training ({world} processes) does not cover online RL (grpo) "
                             f"yet: run it as a single process")
    if world > 1 and recipe.train.batch_size % world:
        raise SmolforgeError(f"train.batch_size ({recipe.train.batch_size}) is the global rows per micro-batch "
                             f"and must divide evenly over the {world} processes")
    if isinstance(recipe.data, PreferenceDataConfig):
        from smolforge.data.preference import build_preference_loaders

        with dist_utils.quiet_unless(rank == 0):  # one report of the data per run
            return build_preference_loaders(recipe, tokenizer, device or torch.device("cpu"),
                                            run_dir or Path(recipe.run.dir) / recipe.run.name, rank, world)
    if isinstance(recipe.data, RLDataConfig):
        from smolforge.data.rl import build_rl_loaders

        return build_rl_loaders(recipe, tokenizer, device or torch.device("cpu"), run_dir)
    if isinstance(recipe.data, SFTDataConfig):
        from smolforge.data.sft import build_sft_loaders

        with dist_utils.quiet_unless(rank == 0):
            return build_sft_loaders(recipe.data, tokenizer, recipe.train.batch_size, recipe.run.seed, rank, world)
    if not recipe.data.train:
        raise SmolforgeError("data.train is empty: list at least one directory written by `smolforge data tokenize`")

    def specs(sources):
        return [SourceSpec(shards=s.path, weight=s.weight, name=s.name or Path(s.path).name) for s in sources]

    train = PretrainLoader(specs(recipe.data.train), recipe.data.seq_len, recipe.train.batch_size // world,
                           seed=recipe.run.seed, rank=rank, world_size=world)
    val = (PretrainLoader(specs(recipe.data.val), recipe.data.seq_len, recipe.train.batch_size,
                          seed=recipe.run.seed) if recipe.data.val else None)
    return train, val


TOKEN_OBJECTIVES = ("lm", "sft")


def reward_loader() -> Any:
    from smolforge.train.reward import load_reward_model

    return load_reward_model


def reward_saver() -> Any:
    from smolforge.train.reward import save_reward_model

    return save_reward_model  # evaluated by loss and bits per byte of the labelled tokens


@torch.no_grad()
def evaluate_objective(model: Transformer, batches: Any, objective: Any, tcfg: Any, device: torch.device,
                       autocast: Any) -> dict[str, float]:
    """The objective's own loss and metrics averaged over validation batches, as `val_*`."""
    was_training = model.training
    model.eval()
    sums: dict[str, float] = {}
    count = 0
    for host_batch in batches:
        lengths = host_batch.get("real_tokens")
        host_batch = {k: v for k, v in host_batch.items() if k not in ("step_weight", "real_tokens")}
        batch, kwargs = model_inputs(host_batch, device, False)
        if tcfg.objective == "reward":
            kwargs["lengths"] = lengths.to(device)
        with autocast():
            output = model(batch["input_ids"], **kwargs)
        loss, parts = objective(output, batch, tcfg)
        for key, value in {"loss": loss, **parts}.items():
            sums[key] = sums.get(key, 0.0) + float(value)
        count += 1
    model.train(was_training)
    return {f"val_{key.replace('/', '_')}": value / count for key, value in sums.items()} if count else {}


def resolve_max_steps(recipe: PretrainRecipe, train_data: Any) -> PretrainRecipe:
    """With train.epochs set, max_steps follows from the data: ceil(epochs x rows / rows per step)."""
    tcfg = recipe.train
    if not tcfg.epochs:
        return recipe
    steps_per_epoch = getattr(train_data, "steps_per_epoch", None)
    if steps_per_epoch is None:
        raise SmolforgeError("train.epochs is only available for SFT data; set train.max_steps instead")
    max_steps = max(1, math.ceil(tcfg.epochs * steps_per_epoch(tcfg.grad_accum)))
    if tcfg.warmup_steps > max_steps:
        raise SmolforgeError(f"train.warmup_steps ({tcfg.warmup_steps}) exceeds the {max_steps} steps that "
                             f"train.epochs={tcfg.epochs} gives on this data: lower the warmup")
    return recipe.model_copy(update={"train": tcfg.model_copy(update={"max_steps": max_steps})})


def loss_counts(batches: list[dict[str, torch.Tensor]]) -> list[float]:
    """What each micro-batch's mean loss is a mean over: pairs if the batch says so, else tokens."""
    return [float(b["step_weight"]) if "step_weight" in b else float(int((b["labels"] != IGNORE_INDEX).sum()))
            for b in batches]


def step_weights(batches: list[dict[str, torch.Tensor]], total: float | None = None) -> list[float]:
    """How much each micro-batch's mean loss counts in the step: its share of the labelled tokens.

    The loss of a step is then the mean over every labelled token of the accumulated batch, not a
    mean of per-micro-batch means, which would over-weight tokens of micro-batches with few
    trained tokens (SFT rows differ widely in how many assistant tokens they hold). `total` is the
    count over the whole step when it spans several ranks (default: these batches' own sum).
    """
    counts = loss_counts(batches)
    total = sum(counts) if total is None else total
    if total == 0:
        return [1.0 / len(batches)] * len(batches)
    return [c / total for c in counts]


def load_tokenizer(recipe: PretrainRecipe):
    from smolforge.tokenizer import Tokenizer

    path = recipe.data.tokenizer or recipe.run.init_from
    if not path:
        raise SmolforgeError("data.tokenizer is empty and there is no run.init_from to take one from: "
                             "train one with `smolforge tokenizer train` and set data.tokenizer")
    return Tokenizer.load(path)


def build_model(recipe: PretrainRecipe, tokenizer, device: torch.device) -> tuple[torch.nn.Module, ModelConfig]:
    """The model the stage trains: a causal LM, or a reward model (scalar head) for `reward`."""
    if recipe.train.objective == "reward":
        from smolforge.train.reward import reward_model_from

        pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
        init = recipe.run.init_from
        if not init:
            raise SmolforgeError("the reward objective needs run.init_from: a reward model starts from a "
                                 "trained checkpoint (usually the SFT model)")
        # A reward checkpoint continues as it is; a causal LM gets a new head.
        reward_model, _ = reward_model_from(init, device=device, dtype=torch.float32, pad_id=pad_id)
        return reward_model, reward_model.config
    if recipe.run.init_from:
        model, _ = ckpt.load_model(recipe.run.init_from, device=device, dtype=torch.float32)
        return model, model.config
    cfg = recipe.model
    if cfg.vocab_size == 0:
        cfg = cfg.model_copy(update={"vocab_size": 128 * math.ceil(tokenizer.vocab_size / 128)})
    elif cfg.vocab_size < tokenizer.vocab_size:
        raise SmolforgeError(f"model.vocab_size ({cfg.vocab_size}) is smaller than the tokenizer's "
                             f"vocabulary ({tokenizer.vocab_size}): set it to 0 to take the tokenizer's")
    return Transformer(cfg).to(device), cfg


def train(recipe: PretrainRecipe, resume: bool = False, stage: str = "pretrain") -> RunResult:
    """Run the training loop described by `recipe`; returns where the final model went.

    Under torchrun (WORLD_SIZE > 1) this process is one data-parallel rank of the run."""
    device = resolve_device(recipe.train.device)
    # nccl reduces CUDA tensors only: a CPU run on a GPU node still needs gloo.
    dist = dist_utils.init_distributed("nccl" if device.type == "cuda" else "gloo")
    try:
        return _train(recipe, resume, stage, dist)
    finally:
        dist_utils.cleanup(dist)


def _train(recipe: PretrainRecipe, resume: bool, stage: str, dist: DistInfo) -> RunResult:
    started = time.time()
    tcfg = recipe.train
    run_dir = Path(recipe.run.dir) / recipe.run.name
    device = resolve_device(tcfg.device)
    if dist.enabled and device.type == "cuda":
        device = torch.device(dist.device_hint)  # this rank's own GPU, not cuda:0 for all
    main = dist.main
    # QLoRA: the base loads on the CPU, then quantize_base moves it to the GPU in 4 bits, layer by layer.
    quantized = recipe.lora.r > 0 and recipe.lora.quantize != "none"
    if quantized:
        require_cuda(device)  # before any work: bitsandbytes' 4-bit base is CUDA only
    torch.set_num_threads(tcfg.threads or os.cpu_count() or 1)
    if resume:
        resume_from = ckpt.find_resume_checkpoint(run_dir)
    else:
        resume_from = None
        if (run_dir / "checkpoints").exists() and any((run_dir / "checkpoints").glob("step_*")):
            raise SmolforgeError(f"run directory {run_dir} already holds checkpoints: pass --resume to "
                                 f"continue that run, or choose another --run.name")
    # Trackers (wandb, tensorboard) log once per run: from rank 0.
    trackers = Trackers(tcfg.report_to if main else [], run_dir, recipe.run.name, recipe.model_dump())
    # The same seed on every rank: identical initial weights (DDP also broadcasts rank 0's).
    seed_everything(recipe.run.seed)
    tokenizer = load_tokenizer(recipe)
    train_data, val_data = build_data(recipe, tokenizer, device, run_dir, dist)
    recipe = resolve_max_steps(recipe, train_data)
    tcfg = recipe.train
    model, model_cfg = build_model(recipe, tokenizer, torch.device("cpu") if quantized else device)
    if recipe.data.seq_len > model_cfg.max_seq_len:
        raise SmolforgeError(f"data.seq_len ({recipe.data.seq_len}) exceeds the model's context length "
                             f"({model_cfg.max_seq_len})")
    recipe = recipe.model_copy(update={"model": model_cfg})
    if tcfg.activation_checkpointing:
        if not isinstance(model, Transformer):
            raise SmolforgeError("train.activation_checkpointing is not supported for the reward model yet")
        model.activation_checkpointing = True
    lora = recipe.lora if recipe.lora.r > 0 else None
    is_reward = tcfg.objective == "reward"
    if lora is not None:  # Hu et al. 2021: train low-rank adapters only (and a reward model's head)
        if quantized:  # QLoRA (Dettmers et al. 2023): the frozen base in 4-bit NF4, fp32 adapters
            quantize_base(model, device)
        adapters = apply_lora(model, lora)
        if main:
            print(f"LoRA r={lora.r} alpha={lora.alpha:g} on {', '.join(lora.target_modules)}"
                  f"{' over a 4-bit NF4 base' if quantized else ''}: "
                  f"{format_count(sum(p.numel() for p in adapters))} trainable parameters")
    objective = get_objective(tcfg.objective)
    use_bf16 = tcfg.precision == "bf16" or (tcfg.precision == "auto" and device.type == "cuda")
    # Kernel switches (smolforge.kernels): they change how the model computes, not its weights.
    attention = resolve_attention(tcfg.attention, device, recipe.data.document_masking, use_bf16)
    if tcfg.liger:
        check_liger(device)
    if isinstance(model, Transformer):
        model.attention_backend, model.return_hidden = attention, tcfg.liger
    elif tcfg.attention in ("flex", "flash"):
        raise SmolforgeError(f"train.attention: {tcfg.attention} is not supported for the reward model yet: "
                             f"use train.attention: sdpa or auto")
    sharded = dist.enabled and tcfg.parallel == "fsdp2"
    if sharded:
        if lora is not None:
            raise SmolforgeError("lora.r > 0 with train.parallel: fsdp2 is not supported: LoRA's few trainable "
                                 "weights need no sharding, use train.parallel: ddp")
        # In place, before the optimizer: it must hold the sharded parameters. From here `model`
        # is the FSDP2 module, whose forward gathers each block's weights in turn.
        fsdp.shard_model(model, device, use_bf16)
    optimizer = build_optimizer(model, tcfg, device)

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()

    if hasattr(train_data, "attach_policy"):  # online RL: the loader samples rollouts from the live model
        train_data.attach_policy(model, autocast)

    step = total_tokens = 0
    lr_scale = 1.0  # lowered by each rollback after repeated bad steps

    def restore(path: Path) -> None:
        """Model, optimizer, data position, RNG and counters as saved in checkpoint `path`."""
        nonlocal step, total_tokens, lr_scale
        state = ckpt.load_trainer_state(path)
        # The caller verified the checkpoint (resume) or wrote it in this process (rollback).
        if fsdp.is_sharded_checkpoint(path):  # DCP shards: any number of ranks, sharded or not
            fsdp.load_sharded_checkpoint(path, model, optimizer)
        elif lora is not None:
            # The checkpoint holds merged weights; the frozen base is the one loaded at start, so
            # only the adapters come back (from the trainer state).
            with torch.no_grad():
                for key, param in adapter_state_dict(model).items():
                    param.copy_(state["lora"][key])
            optimizer.load_state_dict(state["optimizer"])
        else:
            load = reward_loader() if is_reward else ckpt.load_model
            saved, _ = load(path, device=device, dtype=torch.float32, verify=False)
            if sharded:  # full weights and optimizer state into this rank's shards
                fsdp.load_full_checkpoint(model, optimizer, saved.state_dict(), state["optimizer"])
            else:
                model.load_state_dict(saved.state_dict())
                optimizer.load_state_dict(state["optimizer"])
            del saved
        train_data.load_state_dict(state["loader"])
        set_rng_state(state["rng"])
        step, total_tokens = state["step"], state.get("tokens", 0)
        lr_scale = state.get("lr_scale", 1.0)

    if resume_from is not None:
        # Every rank restores the same checkpoint; the loader state holds global counters, the
        # same on all ranks, so each rank continues with its own share of the next global batch.
        restore(resume_from)
    metrics_log: MetricsLog | dist_utils.SilentLog = dist_utils.SilentLog()
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_recipe(recipe, run_dir / "recipe.yaml")
        metrics_log = MetricsLog(run_dir / "metrics.jsonl", resume_step=step if resume_from else None,
                                 trackers=trackers)
    # `model` stays the plain module under DDP (checkpoints, evaluation, clipping, rollback all use
    # it); `wrapped` is what the training forward goes through: DDP all-reduces gradients in
    # backward. Under FSDP2 both are the sharded module, which reduce-scatters them itself.
    wrapped: torch.nn.Module = model
    if dist.enabled and not sharded:  # on CPU (gloo) DDP takes no device_ids
        wrapped = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    forward = torch.compile(wrapped) if tcfg.compile else wrapped
    byte_lengths = token_byte_lengths(tokenizer)
    flops_per_token = training_flops_per_token(model_cfg, recipe.data.seq_len)
    peak = peak_flops(device)
    tokens_per_step = train_data.tokens_per_batch * tcfg.grad_accum * dist.world_size
    counts = count_parameters(model_cfg)
    manifest = json.dumps(train_data.manifest(), sort_keys=True).encode()
    meta = {"stage": stage, "parent": recipe.run.init_from or None, "recipe_hash": recipe.fingerprint(),
            "data_manifest_hash": hashlib.sha256(manifest).hexdigest(),
            "smolforge_version": __version__}
    if main:
        print(f"{stage}: {format_count(counts['total'])} parameters, {tokens_per_step:,} tokens/step, "
              f"{tcfg.max_steps} steps on {device}{' (bf16 autocast)' if use_bf16 else ''}"
              + (f" x {dist.world_size} processes ({tcfg.parallel})" if dist.enabled else "") + f" -> {run_dir}"
              + (f" (resuming from {resume_from.name})" if resume_from else ""))

    def evaluate() -> dict[str, float]:
        if val_data is None:
            return {}
        if tcfg.objective not in TOKEN_OBJECTIVES:
            return evaluate_objective(model, val_data.iter_eval(tcfg.eval_batches or None), objective, tcfg,
                                      device, autocast)
        return evaluate_loss_and_bpb(model, val_data.iter_eval(tcfg.eval_batches or None), byte_lengths,
                                     device, autocast, recipe.data.document_masking)

    def save_sharded(final: bool, metrics: dict[str, float]) -> Path:
        """FSDP2: every rank writes its shards of model and optimizer (DCP), rank 0 the rest; `final/`
        is a normal checkpoint of the weights gathered on rank 0."""
        info = {**meta, "step": step, "metrics": metrics}
        state = {"step": step, "loader": train_data.state_dict(), "rng": rng_state(), "tokens": total_tokens,
                 "lr_scale": lr_scale}
        path = fsdp.save_sharded_checkpoint(run_dir / "checkpoints" / ckpt.checkpoint_name(step), model,
                                            optimizer, tokenizer, meta=info, trainer_state=state)
        if main:
            ckpt.mark_latest(path, tcfg.keep_last)
        if final:
            weights = fsdp.full_state_dict(model)  # every rank takes part in the gather
            if main:
                ckpt.save_checkpoint(run_dir / "final", fsdp.plain_model(model_cfg, weights), tokenizer, meta=info)
        dist_utils.barrier()
        return path

    def save(final: bool, metrics: dict[str, float]) -> Path:
        """Rank 0 writes the checkpoint; the others wait until it is complete (a rollback may
        read it next) and get its path."""
        if sharded:
            return save_sharded(final, metrics)
        if not main:
            dist_utils.barrier()
            return run_dir / "checkpoints" / ckpt.checkpoint_name(step)
        state = {"step": step, "optimizer": optimizer.state_dict(), "loader": train_data.state_dict(),
                 "rng": rng_state(), "tokens": total_tokens, "lr_scale": lr_scale}
        info = {**meta, "step": step, "metrics": metrics}
        weights = model
        if lora is not None:
            # Checkpoints hold the merged model, so every later command loads them as they are;
            # the adapters themselves go into the trainer state (resume) and, at the end, into a
            # PEFT adapter directory.
            state["lora"] = {k: v.detach().cpu().clone() for k, v in adapter_state_dict(model).items()}
            weights = merged_copy(model)  # a QLoRA base is dequantised into it (on the CPU)
            info["lora"] = lora.model_dump()
        writer = reward_saver() if is_reward else ckpt.save_checkpoint
        path = ckpt.save_run_checkpoint(run_dir, step, weights, tokenizer, meta=info, trainer_state=state,
                                        keep_last=tcfg.keep_last, writer=writer)
        if final:
            # `final/` is the stage's output model: weights and metadata, no optimizer state.
            writer(run_dir / "final", weights, tokenizer, meta=info)
            if lora is not None:
                save_adapter(run_dir / "adapter", model, lora, recipe.run.init_from or None)
        dist_utils.barrier()
        return path

    def out_of_time_now() -> bool:
        return bool(tcfg.time_limit_minutes) and time.time() - started > tcfg.time_limit_minutes * 60

    model.train()
    progress = TrainProgress(total=tcfg.max_steps, start=step) if main else dist_utils.SilentProgress()
    guard = LossGuard(tcfg.spike_factor, tcfg.spike_window, tcfg.max_bad_steps)
    last_checkpoint = resume_from
    window_loss = torch.zeros((), device=device)
    window_steps, window_start, window_tokens = 0, time.time(), 0
    last_metrics: dict[str, float] = {}
    finished = interrupted = False
    with progress, GracefulStop() as stop:
        while step < tcfg.max_steps:
            lr = tcfg.lr * lr_scale * lr_multiplier(step, tcfg.max_steps, tcfg.warmup_steps, tcfg.schedule,
                                                    tcfg.decay_fraction, tcfg.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            micro_batches = [train_data.next_batch() for _ in range(tcfg.grad_accum)]
            # Real (non-padding) tokens for throughput; pretraining rows have no padding.
            reals = [b.pop("real_tokens", None) for b in micro_batches]
            step_tokens = sum(int(r.sum()) if r is not None else b["input_ids"].numel()
                              for b, r in zip(micro_batches, reals))
            weights = step_weights(micro_batches)
            if dist.enabled:
                # Weights are shares of the GLOBAL count, so that summed over ranks they make
                # the single-process step loss; tokens too, for throughput and `tokens`.
                totals = torch.tensor([sum(loss_counts(micro_batches)), float(step_tokens)],
                                      dtype=torch.float64, device=device)
                totals = dist_utils.all_reduce_sum(totals).cpu()
                step_tokens = int(totals[1])
                weights = (step_weights(micro_batches, float(totals[0])) if totals[0] > 0
                           else [w / dist.world_size for w in weights])
            window_tokens += step_tokens
            total_tokens += step_tokens
            step_loss = torch.zeros((), device=device)
            for index, (host_batch, weight, real) in enumerate(zip(micro_batches, weights, reals)):
                host_batch.pop("step_weight", None)
                batch, kwargs = model_inputs(host_batch, device, recipe.data.document_masking)
                if is_reward:  # a reward is read at each row's last real token
                    kwargs["lengths"] = real.to(device)
                # DDP all-reduces (FSDP2 reduce-scatters) in the backward of the step's last
                # micro-batch only; the others just accumulate locally, which gives the same sum
                # with one reduction.
                with dist_utils.gradient_sync(wrapped, sync=index == len(micro_batches) - 1):
                    with autocast():
                        output = forward(batch["input_ids"], **kwargs)
                    loss, parts = objective(output, batch, tcfg)
                    # Gradients accumulate in the fp32 .grad of the fp32 master weights. DDP
                    # averages gradients over ranks; the wanted gradient is their SUM (each rank's
                    # weight is already a share of the global count), hence x world_size.
                    (loss * (weight * dist.world_size)).backward()
                step_loss += loss.detach() * weight
            if dist.enabled:
                # One reduction carries the global step loss (every rank then takes the same
                # skip / rollback decision) and the stop flags (every rank must stop at the same
                # step, or the others would hang in the next collective).
                flags = torch.stack([step_loss.float(), torch.tensor(float(bool(stop.requested)), device=device),
                                     torch.tensor(float(out_of_time_now()), device=device)])
                dist_utils.all_reduce_sum(flags)
                step_loss, stop_any, time_up = flags[0], bool(flags[1] > 0), bool(flags[2] > 0)
            else:
                stop_any, time_up = bool(stop.requested), out_of_time_now()
            verdict, problem = guard.check(step_loss.item())
            if verdict != "ok":  # a bad batch: no update; repeated: back to the last checkpoint
                optimizer.zero_grad(set_to_none=True)
                event = {"step": step, "event": verdict, "reason": problem, "skipped_total": guard.skipped}
                if verdict == "rollback":
                    if last_checkpoint is None:
                        raise SmolforgeError(
                            f"{problem} at step {step}, {tcfg.max_bad_steps} steps in a row, and no checkpoint "
                            f"to roll back to yet: lower train.lr, raise train.warmup_steps or save earlier "
                            f"(train.save_every)")
                    restore(last_checkpoint)
                    lr_scale *= tcfg.rollback_lr_factor
                    event.update(to_step=step, checkpoint=last_checkpoint.name, lr_scale=lr_scale)
                metrics_log.write(event)
                progress.note(f"step {event['step']}: {problem}: "
                              + ("batch skipped" if verdict == "skip" else
                                 f"rolled back to {last_checkpoint.name}, lr x {lr_scale:g}"))
                continue
            grad_norm = (dist_utils.clip_grad_norm(model.parameters(), tcfg.grad_clip)
                         if tcfg.grad_clip > 0 else None)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            window_loss += step_loss
            step += 1
            window_steps += 1
            last_step = step == tcfg.max_steps
            out_of_time = time_up
            if step % tcfg.log_every == 0 or last_step or out_of_time:
                elapsed = time.time() - window_start
                loss_value = (window_loss / window_steps).item()
                tok_s = window_tokens / max(elapsed, 1e-9)
                record = {"step": step, "loss": loss_value, "lr": lr, "tokens_per_s": tok_s,
                          "tokens": total_tokens, "elapsed_s": time.time() - started}
                part_values = {k: v.detach().float() for k, v in parts.items() if k != "ce"}
                if dist.enabled and part_values:  # the objective's metrics over every rank's share
                    means = dist_utils.all_reduce_mean(torch.stack(list(part_values.values())))
                    part_values = dict(zip(part_values, means))
                record.update({k: v.item() for k, v in part_values.items()})
                # Playbook ch. 05: track epochs per source (e.g. stay under ~5 for small sources).
                record.update({f"epochs/{name}": e for name, e in train_data.epochs_seen().items()})
                if hasattr(train_data, "window_metrics"):  # e.g. rollout rewards and generation time
                    record.update(train_data.window_metrics())
                if grad_norm is not None:
                    record["grad_norm"] = grad_norm.item()
                if peak:
                    record["mfu"] = flops_per_token * tok_s / peak
                metrics_log.write(record)
                progress.update(step, loss=loss_value, lr=lr, tokens_per_s=tok_s)
                window_loss.zero_()
                window_steps, window_start, window_tokens = 0, time.time(), 0
            if (tcfg.eval_every and step % tcfg.eval_every == 0) or last_step or out_of_time:
                last_metrics = evaluate()
                if last_metrics:
                    metrics_log.write({"step": step, **last_metrics})
                    progress.note(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in last_metrics.items()))
            if last_step or out_of_time:
                save(final=True, metrics=last_metrics)
                finished = True
                break
            if stop_any:  # SIGTERM / SIGINT: this step is done; keep it and leave cleanly
                last_checkpoint = save(final=False, metrics=last_metrics)
                metrics_log.write({"step": step, "event": "stopped", "signal": stop.requested or "peer rank"})
                interrupted = True
                break
            if tcfg.save_every and step % tcfg.save_every == 0:
                last_checkpoint = save(final=False, metrics=last_metrics)
    if not finished and not interrupted:  # resumed a run that had already reached max_steps
        last_metrics = evaluate()
        save(final=True, metrics=last_metrics)
    metrics_log.close()
    return RunResult(run_dir=run_dir, final_checkpoint=run_dir / "final", steps=step,
                     metrics=last_metrics, wall_seconds=time.time() - started, interrupted=interrupted,
                     stop_signal=stop.requested)
