"""Typed configs (one per concern), YAML recipes and dotted command-line overrides.

A recipe is a YAML mapping of sections (`run`, `model`, `data`, `train`). Every field has a
type, a default and a one-line description that becomes its `--section.field` CLI help (the
litgpt `args.py` idea). Unknown keys, wrong types and impossible values fail before any work
starts with a message naming the key, e.g. `train.lrr: unknown key (did you mean 'lr'?)`.
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import json
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from smolforge.errors import SmolforgeError
from smolforge.model import PRESETS, ModelConfig
from smolforge.train.lora import LoraSettings
from smolforge.train.ppo import PPOConfig


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunConfig(Section):
    """Where the run lives and what it starts from."""

    name: str = Field("run", min_length=1, description="Run name: outputs go to <dir>/<name>/.")
    dir: str = Field("runs", description="Parent directory of run directories.")
    init_from: str = Field("", description="Checkpoint directory (smolforge or HF) to start from; empty = random init.")
    seed: int = Field(0, description="Seed for initialisation, data order and sampling.")


class SourceConfig(Section):
    path: str = Field(description="Directory written by `smolforge data tokenize`.")
    weight: float = Field(1.0, gt=0, description="Share of training tokens drawn from this source.")
    name: str = Field("", description="Label used in logs; default = the directory name.")


class DataConfig(Section):
    """Tokenized pretraining data and how it is packed."""

    tokenizer: str = Field("", description="Tokenizer directory; empty = the one of run.init_from.")
    train: list[SourceConfig] = Field(default_factory=list, description="Training sources mixed by token weight.")
    val: list[SourceConfig] = Field(default_factory=list, description="Validation sources (loss and bits per byte).")
    seq_len: int = Field(256, gt=1, description="Tokens per training sequence.")
    document_masking: bool = Field(True, description="Attend only within each packed document (playbook ch. 04).")


class ChatSourceConfig(Section):
    path: str = Field(description="A .jsonl / .json / .parquet file (or directory or glob of them).")
    name: str = Field("", description="Label used in logs and tables; default = the file name.")
    chat_template_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Template switches for this source, e.g. {enable_thinking: false}.")


class SFTSourceConfig(ChatSourceConfig):
    """A file of conversations."""

    format: Literal["auto", "messages", "alpaca", "sharegpt", "prompt_completion"] = Field(
        "auto", description="Record format; auto detects it from the keys of each record.")
    weight: float | None = Field(None, gt=0, description="Share of training tokens from this source "
                                 "(tokens, not examples); unset on every source = each example once per epoch.")


class PreferenceSourceConfig(ChatSourceConfig):
    """A file of prompt/chosen/rejected records."""


class ChatDataConfig(Section):
    """What the chat stages (SFT, preference) share: tokenizer, template, length, validation."""

    tokenizer: str = Field("", description="Tokenizer directory; empty = the one of run.init_from.")
    val_fraction: float = Field(0.02, ge=0, lt=1, description="Share of training records held out for validation when val is empty.")
    template: str = Field("auto", description="Chat template: auto (the tokenizer's own, else smollm3), chatml, smollm3, tokenizer, or a .jinja path.")
    chat_template_kwargs: dict[str, Any] = Field(default_factory=dict, description="Template switches for every source (a source's own win).")
    seq_len: int = Field(2048, gt=1, description="Maximum tokens per sequence (the playbook's max_length).")
    truncation: Literal["truncate", "drop", "error"] = Field(
        "truncate", description="Sequences longer than seq_len: cut at seq_len (the response end), drop them, or stop with an error.")
    document_masking: bool = Field(True, description="Attend only within each packed sequence.")
    skip_invalid: bool = Field(False, description="Skip (and count) malformed records instead of stopping.")


class SFTDataConfig(ChatDataConfig):
    """Conversations, chat template, sequence length and packing for `smolforge sft`."""

    train: list[SFTSourceConfig] = Field(default_factory=list, description="Training sources, mixed by token weight.")
    val: list[SFTSourceConfig] = Field(default_factory=list, description="Validation sources; empty = hold out val_fraction.")
    packing: Literal["none", "bfd", "wrapped"] = Field(
        "none", description="none = one conversation per row; bfd = best-fit-decreasing bin packing of whole "
                            "conversations; wrapped = concatenate and cut (splits conversations).")


class PreferenceDataConfig(ChatDataConfig):
    """Preference pairs, chat template, length and the reference model for `smolforge dpo`."""

    train: list[PreferenceSourceConfig] = Field(default_factory=list, description="Training sources of preference pairs.")
    val: list[PreferenceSourceConfig] = Field(default_factory=list, description="Validation sources; empty = hold out val_fraction.")
    val_fraction: float = Field(0.05, ge=0, lt=1, description="Share of training pairs held out for validation when val is empty.")
    seq_len: int = Field(1024, gt=1, description="Maximum tokens of prompt + response per sequence.")
    reference_model: str = Field("", description="Reference checkpoint; empty = run.init_from (the model before this stage).")
    reference: Literal["cached", "online"] = Field(
        "cached", description="cached = reference log-probs computed once before training and stored in the run; "
                              "online = the reference model stays in memory and scores every batch.")


class TrainConfig(Section):
    """Optimisation, schedule, logging and checkpointing."""

    objective: str = Field("lm", description="Loss function from the objective registry.")
    max_steps: int = Field(1000, gt=0, description="Optimizer steps to run (ignored when epochs is set).")
    epochs: float = Field(0.0, ge=0, description="Passes over the training data; sets max_steps from the data size. 0 = use max_steps.")
    batch_size: int = Field(16, gt=0, description="Sequences per micro-batch.")
    grad_accum: int = Field(1, gt=0, description="Micro-batches accumulated per optimizer step.")
    lr: float = Field(5e-4, gt=0, description="Peak learning rate.")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Final learning rate as a fraction of the peak.")
    schedule: Literal["wsd", "cosine", "linear", "constant"] = Field(
        "wsd", description="LR shape after warmup: warmup-stable-decay, cosine, linear or constant.")
    warmup_steps: int = Field(100, ge=0, description="Linear warmup steps.")
    decay_fraction: float = Field(0.2, gt=0, le=1, description="WSD: share of steps spent decaying linearly (playbook: 10-20%).")
    optimizer: Literal["adamw", "muon"] = Field(
        "adamw", description="adamw = AdamW for every parameter; muon = Muon (Jordan et al. 2024) for the hidden "
                             "layers' matrices, with Moonshot's AdamW-matched update RMS so train.lr and "
                             "weight_decay serve both, and AdamW for embeddings, heads, routers, norms, biases "
                             "and LoRA adapters. Not with parallel: fsdp2.")
    muon_momentum: float = Field(0.95, ge=0, lt=1, description="Muon: Nesterov momentum of its matrices (Jordan et al. 2024: 0.95).")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay (not applied to embeddings, norms, biases); Muon's too.")
    beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1.")
    beta2: float = Field(0.95, ge=0, lt=1, description="AdamW beta2.")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    grad_clip: float = Field(1.0, ge=0, description="Clip the global gradient norm to this; 0 = off.")
    z_loss: float = Field(0.0, ge=0, description="Weight of the z-loss log^2 Z (PaLM); 0 = off (playbook default).")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto = bf16 autocast with fp32 master weights on CUDA, fp32 elsewhere.")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N.")
    compile: bool = Field(False, description="Wrap the model in torch.compile.")
    activation_checkpointing: bool = Field(False, description="Recompute each layer's activations in the backward pass: much less memory, about a third more compute.")
    attention: Literal["auto", "sdpa", "flex", "flash"] = Field(
        "sdpa", description="Attention kernel for document-masked (packed) training batches: sdpa = "
                            "scaled_dot_product_attention with a dense mask (every device); flex = FlexAttention, "
                            "compiled (CUDA); flash = flash-attn's varlen kernel (CUDA, bf16, pip install "
                            "'smolforge[flash]'); auto = flex on CUDA with data.document_masking, sdpa otherwise. The default stays sdpa until the "
                            "CUDA kernels are verified on a GPU (docs/pretraining.md).")
    liger: bool = Field(False, description="lm/sft objectives: Liger-Kernel's fused linear cross-entropy, which never "
                                           "materialises the logits (CUDA, pip install 'smolforge[liger]'). Not with "
                                           "parallel: fsdp2.")
    threads: int = Field(0, ge=0, description="CPU threads for torch; 0 = all cores.")
    parallel: Literal["ddp", "fsdp2"] = Field(
        "ddp", description="Under torchrun (WORLD_SIZE > 1): ddp replicates the model on every rank; fsdp2 shards "
                           "weights, gradients and optimizer state over the ranks (fully_shard per block). "
                           "Ignored in a single process.")
    log_every: int = Field(10, gt=0, description="Steps between log lines and metrics.jsonl records.")
    eval_every: int = Field(200, ge=0, description="Steps between validation passes; 0 = only at the end.")
    eval_batches: int = Field(20, ge=0, description="Validation batches per pass; 0 = the whole validation set.")
    save_every: int = Field(500, ge=0, description="Steps between checkpoints; 0 = only the final one.")
    keep_last: int = Field(3, gt=0, description="Periodic checkpoints kept on disk.")
    spike_factor: float = Field(0.0, ge=0, description="Skip a step whose loss exceeds this x the median of recent steps; 0 = off (non-finite losses are always skipped).")
    spike_window: int = Field(50, gt=1, description="Recent steps whose median the spike check compares with.")
    max_bad_steps: int = Field(3, gt=0, description="Skipped steps in a row before rolling back to the last checkpoint.")
    rollback_lr_factor: float = Field(0.5, gt=0, le=1, description="Learning-rate scale applied at each rollback.")
    time_limit_minutes: float = Field(0.0, ge=0, description="Stop cleanly (eval + save) after this wall time; 0 = none.")
    beta: float = Field(0.1, gt=0, description="Preference objectives: beta, the strength of the anchor to the reference model (playbook: 0.1).")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="Preference objectives (dpo, robust): assumed share of flipped preference labels.")
    simpo_gamma: float = Field(0.5, ge=0, description="SimPO: target reward margin gamma, in reward units (as TRL's CPOConfig.simpo_gamma).")
    orpo_lambda: float = Field(0.1, ge=0, description="ORPO: weight of the odds-ratio term next to the SFT loss.")
    kto_desirable_weight: float = Field(1.0, gt=0, description="KTO: weight of desirable (chosen) examples.")
    kto_undesirable_weight: float = Field(1.0, gt=0, description="KTO: weight of undesirable (rejected) examples.")
    report_to: list[Literal["tensorboard", "wandb"]] = Field(
        default_factory=list, description="Also log metrics to these trackers: tensorboard, wandb.")

    @model_validator(mode="after")
    def _check_warmup(self) -> TrainConfig:
        if self.warmup_steps > self.max_steps:
            raise ValueError(f"train.warmup_steps ({self.warmup_steps}) exceeds train.max_steps ({self.max_steps})")
        if self.optimizer == "muon" and self.parallel == "fsdp2":
            # torch.optim.Muon orthogonalises each whole matrix; FSDP2 hands it row shards (DTensors).
            raise ValueError("train.optimizer: muon is not supported with train.parallel: fsdp2: use "
                             "train.parallel: ddp or train.optimizer: adamw")
        if self.liger and self.objective not in ("lm", "sft"):
            raise ValueError(f"train.liger fuses the LM head into the lm/sft cross-entropy; train.objective "
                             f"{self.objective!r} needs the logits: set train.liger: false")
        if self.liger and self.parallel == "fsdp2":
            # The loss reads the LM head weight outside the model's forward, where FSDP2 has
            # already resharded it.
            raise ValueError("train.liger is not supported with train.parallel: fsdp2: use train.parallel: ddp "
                             "or train.liger: false")
        return self


class PretrainRecipe(Section):
    """A full recipe for `smolforge pretrain` (and the other stages built on the same loop)."""

    run: RunConfig = Field(default_factory=RunConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    lora: LoraSettings = Field(default_factory=LoraSettings)

    # A stage's defaults for the keys a recipe leaves unset (subclasses: SFT, DPO).
    DEFAULT_OVERRIDES: ClassVar[dict[str, dict[str, Any]]] = {}

    @model_validator(mode="before")
    @classmethod
    def _stage_defaults(cls, values: Any) -> Any:
        if not isinstance(values, dict):
            return values
        merged = dict(values)
        for section, defaults in cls.DEFAULT_OVERRIDES.items():
            given = values.get(section) or {}
            if isinstance(given, dict):
                merged[section] = {**defaults, **given}
        return merged

    @model_validator(mode="before")
    @classmethod
    def _expand_preset(cls, values: Any) -> Any:
        """`model: {preset: smol-10m, n_layers: 4}` = the preset with fields overridden."""
        if isinstance(values, dict) and isinstance(values.get("model"), dict) and "preset" in values["model"]:
            fields = dict(values["model"])
            name = fields.pop("preset")
            if name not in PRESETS:
                raise ValueError(f"model.preset: unknown preset {name!r}; choose one of {sorted(PRESETS)}")
            values = {**values, "model": {**PRESETS[name]().model_dump(), **fields}}
        return values

    @model_validator(mode="after")
    def _check_lengths(self) -> PretrainRecipe:
        # With run.init_from the model comes from the checkpoint; the loop checks its context.
        if not self.run.init_from and self.data.seq_len > self.model.max_seq_len:
            raise ValueError(
                f"data.seq_len ({self.data.seq_len}) exceeds model.max_seq_len "
                f"({self.model.max_seq_len}): shorten the sequences or raise the context length")
        return self

    def fingerprint(self) -> str:
        """sha256 of the resolved recipe, recorded in every checkpoint's smolforge.json."""
        return hashlib.sha256(json.dumps(self.model_dump(), sort_keys=True).encode()).hexdigest()


class SFTRecipe(PretrainRecipe):
    """A full recipe for `smolforge sft`: the pretraining sections with SFT data and defaults."""

    # Playbook ch. 07 for fine-tuning a pretrained base: lr 1e-5, effective batch 128, 1 epoch,
    # warmup then linear decay to zero. Applied to the keys a recipe leaves unset.
    DEFAULT_OVERRIDES: ClassVar[dict[str, dict[str, Any]]] = {"train": {
        "objective": "sft", "epochs": 1.0, "batch_size": 8, "grad_accum": 16, "lr": 1e-5,
        "schedule": "linear", "warmup_steps": 0, "weight_decay": 0.0, "eval_every": 100}}

    data: SFTDataConfig = Field(default_factory=SFTDataConfig)  # type: ignore[assignment]


class DPORecipe(PretrainRecipe):
    """A full recipe for `smolforge dpo`: preference data, a preference objective and its defaults."""

    # Playbook ch. 07: lr 5-20x below SFT (1e-6), beta 0.1, one epoch.
    DEFAULT_OVERRIDES: ClassVar[dict[str, dict[str, Any]]] = {"train": {
        "objective": "dpo", "epochs": 1.0, "batch_size": 8, "grad_accum": 4, "lr": 1e-6,
        "schedule": "linear", "warmup_steps": 0, "weight_decay": 0.0, "eval_every": 100}}

    data: PreferenceDataConfig = Field(default_factory=PreferenceDataConfig)  # type: ignore[assignment]


class RewardRecipe(DPORecipe):
    """A full recipe for `smolforge reward`: a Bradley-Terry reward model on preference pairs."""

    DEFAULT_OVERRIDES: ClassVar[dict[str, dict[str, Any]]] = {"train": {
        "objective": "reward", "epochs": 1.0, "batch_size": 8, "grad_accum": 4, "lr": 1e-5,
        "schedule": "linear", "warmup_steps": 0, "weight_decay": 0.0, "eval_every": 100}}


class RLSourceConfig(ChatSourceConfig):
    """A file of RL prompts: {"prompt" | "messages", optional "answer", "check", "constraints", ...}."""


class RLDataConfig(Section):
    """Prompts for online RL (`smolforge grpo`): the policy writes the responses itself."""

    # One prompt + completion per row: there is never a second document to mask (the loop reads this).
    document_masking: ClassVar[bool] = False

    tokenizer: str = Field("", description="Tokenizer directory; empty = the one of run.init_from.")
    train: list[RLSourceConfig] = Field(default_factory=list, description="Prompt files, read in a seeded order, reshuffled every epoch.")
    template: str = Field("auto", description="Chat template: auto (the tokenizer's own, else smollm3), chatml, smollm3, tokenizer, or a .jinja path.")
    chat_template_kwargs: dict[str, Any] = Field(default_factory=dict, description="Template switches for every source (a source's and a record's own win).")
    seq_len: int = Field(512, gt=1, description="Most tokens of prompt + completion: a prompt may take seq_len - grpo.max_new_tokens.")
    truncation: Literal["drop", "truncate", "error"] = Field(
        "drop", description="Prompts too long for seq_len - grpo.max_new_tokens: drop them (counted), keep their last tokens, or stop with an error.")
    skip_invalid: bool = Field(False, description="Skip (and count) malformed records instead of stopping.")


class GRPOTrainConfig(TrainConfig):
    """Optimisation as for every stage, plus the GRPO loss (Shao et al. 2024; DAPO; Dr. GRPO)."""

    loss_type: Literal["grpo", "dr_grpo", "dapo"] = Field(
        "dapo", description="Loss normalisation: grpo = per-sequence token mean, then mean over sequences (Shao et al. "
                            "2024); dr_grpo = token sum / (sequences x grpo.max_new_tokens) (Liu et al. 2025); dapo = "
                            "mean over every completion token of the step (Yu et al. 2025; TRL's default).")
    epsilon: float = Field(0.2, gt=0, lt=1, description="Clip range of the policy ratio: [1 - epsilon, 1 + epsilon_high] (PPO's 0.2).")
    epsilon_high: float | None = Field(None, gt=0, description="Upper clip range; empty = epsilon. DAPO's clip-higher uses 0.28.")
    beta: float = Field(0.0, ge=0, description="Weight of the k3 KL penalty to the reference model; 0 = no reference at all "
                                               "(DAPO, Dr. GRPO, TRL's default). DeepSeekMath used 0.04.")


class RewardSpec(BaseModel):
    """One reward function and its weight; any other key is an option of the function (e.g. max_len)."""

    model_config = ConfigDict(extra="allow")

    name: str = Field(description="A reward of the registry: smol_task, gsm8k, ifeval, think_format, length, overlong, "
                                  "contains, reward_model (see docs/rl.md).")
    weight: float = Field(1.0, description="Multiplies this reward in the weighted sum that is a completion's reward.")

    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class GRPOConfig(Section):
    """Rollouts, rewards and the reference model of GRPO (Shao et al. 2024, DeepSeekMath)."""

    group_size: int = Field(8, ge=2, description="Completions sampled per prompt (G); advantages compare the completions of a group.")
    prompts_per_step: int = Field(8, gt=0, description="Prompts per rollout; a rollout holds prompts_per_step x group_size completions "
                                                       "and must be a multiple of train.batch_size x train.grad_accum.")
    num_iterations: int = Field(1, gt=0, description="Optimisation passes over each rollout (mu in Shao et al. 2024); with more than one "
                                                     "step per rollout the old log-probs are recorded at generation.")
    max_new_tokens: int = Field(256, gt=0, description="Most tokens per completion; a completion cut there is flagged truncated.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature; log-probs are taken at the same temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass; 1 = off.")
    top_k: int = Field(0, ge=0, description="Sample among the k likeliest tokens; 0 = off.")
    rewards: list[RewardSpec] = Field(default_factory=list, description="Reward functions summed with their weights, e.g. "
                                      "[{name: smol_task}, {name: overlong, weight: 1, max_len: 96, soft: 24}].")
    scale_rewards: Literal["auto", "group", "none"] = Field(
        "auto", description="Divide advantages by the group's reward std (group) or not (none, Dr. GRPO); auto = none "
                            "for loss_type dr_grpo, else group.")
    mask_truncated: bool = Field(False, description="Give truncated completions no loss (DAPO's overlong filtering); "
                                                    "they still count in their group's advantages.")
    reference: Literal["cached", "online"] = Field(
        "cached", description="With train.beta > 0: cached = reference log-probs computed once per rollout, at generation; "
                              "online = recomputed for every micro-batch served (same numbers, more compute).")
    reference_model: str = Field("", description="Reference checkpoint; empty = run.init_from. With LoRA the frozen base "
                                                 "(adapters off) is the reference and none is loaded.")
    reference_device: str = Field("auto", description="Where the reference model lives: auto (the training device) or cpu "
                                                      "(frees accelerator memory; it scores once per rollout).")
    generation_batch_size: int = Field(0, ge=0, description="Completions per engine call; 0 = the whole rollout at once.")


class GRPORecipe(PretrainRecipe):
    """A full recipe for `smolforge grpo`: RL prompts, rewards, rollouts and the GRPO loss."""

    # DeepSeekMath's and DAPO's constant 1e-6 learning rate (TRL's default too), no weight decay;
    # 16 x 4 = 64 completions per optimizer step = one rollout of 8 prompts x 8 completions.
    DEFAULT_OVERRIDES: ClassVar[dict[str, dict[str, Any]]] = {"train": {
        "objective": "grpo", "max_steps": 200, "batch_size": 16, "grad_accum": 4, "lr": 1e-6,
        "schedule": "constant", "warmup_steps": 0, "weight_decay": 0.0, "eval_every": 0, "save_every": 50,
        "log_every": 1}}

    data: RLDataConfig = Field(default_factory=RLDataConfig)  # type: ignore[assignment]
    train: GRPOTrainConfig = Field(default_factory=GRPOTrainConfig)  # type: ignore[assignment]
    grpo: GRPOConfig = Field(default_factory=GRPOConfig)

    @model_validator(mode="after")
    def _check_rollouts(self) -> GRPORecipe:
        g, t = self.grpo, self.train
        if not g.rewards:
            raise ValueError("grpo.rewards is empty: list at least one reward, e.g. [{name: smol_task}]")
        rollout, per_step = g.prompts_per_step * g.group_size, t.batch_size * t.grad_accum
        if rollout % per_step:
            raise ValueError(f"a rollout of grpo.prompts_per_step x grpo.group_size = {rollout} completions is not a "
                             f"multiple of train.batch_size x train.grad_accum = {per_step}, the completions of one "
                             f"optimizer step")
        if g.max_new_tokens >= self.data.seq_len:
            raise ValueError(f"grpo.max_new_tokens ({g.max_new_tokens}) leaves no room for a prompt within "
                             f"data.seq_len ({self.data.seq_len})")
        return self


class PPOStageConfig(PPOConfig):
    """PPO (Mini-LLM's `ppo_*` names, `smolforge.train.ppo.PPOConfig`) plus where rollouts and rewards come from."""

    reward_model: str = Field("", description="Reward model checkpoint (written by `smolforge reward`); its score is "
                                              "the reward, paid at each completion's last token.")
    reward_model_weight: float = Field(1.0, description="Weight of the reward model's score in a completion's reward.")
    rewards: list[RewardSpec] = Field(default_factory=list, description="Verifiable rewards added to the reward model's "
                                      "score, as in grpo.rewards, e.g. [{name: smol_task, weight: 0.5}].")
    reward_device: str = Field("auto", description="Where the reward model scores: auto (the training device) or cpu.")
    max_new_tokens: int = Field(64, gt=0, description="Most tokens per completion; a completion cut there is flagged truncated.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass; 1 = off.")
    top_k: int = Field(0, ge=0, description="Sample among the k likeliest tokens; 0 = off.")
    reference_model: str = Field("", description="Reference checkpoint of the KL penalty; empty = run.init_from (the start "
                                                 "policy). With LoRA the frozen base (adapters off) is the reference.")
    reference_device: str = Field("auto", description="Where the reference model lives: auto (the training device) or cpu.")
    generation_batch_size: int = Field(0, ge=0, description="Completions per engine call; 0 = the whole batch at once.")


class PPOTrainConfig(Section):
    """Device, precision, logging and checkpointing of the PPO loop (its optimisers are set in `ppo`)."""

    device: str = Field("auto", description="auto, cpu, cuda or cuda:N.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto = bf16 autocast with fp32 master weights on CUDA, fp32 elsewhere.")
    threads: int = Field(0, ge=0, description="CPU threads for torch; 0 = all cores.")
    log_every: int = Field(1, gt=0, description="PPO iterations between log lines and metrics.jsonl records.")
    save_every: int = Field(50, ge=0, description="PPO iterations between checkpoints; 0 = only the final one.")
    keep_last: int = Field(2, gt=0, description="Periodic checkpoints kept on disk.")
    report_to: list[Literal["tensorboard", "wandb"]] = Field(
        default_factory=list, description="Also log metrics to these trackers: tensorboard, wandb.")


class PPORecipe(Section):
    """A full recipe for `smolforge ppo`: RL prompts (as for GRPO), a reward model and PPO's settings."""

    run: RunConfig = Field(default_factory=RunConfig)
    data: RLDataConfig = Field(default_factory=RLDataConfig)
    train: PPOTrainConfig = Field(default_factory=PPOTrainConfig)
    lora: LoraSettings = Field(default_factory=LoraSettings)
    ppo: PPOStageConfig = Field(default_factory=PPOStageConfig)

    @model_validator(mode="after")
    def _check_ppo(self) -> PPORecipe:
        p = self.ppo
        if p.max_new_tokens >= self.data.seq_len:
            raise ValueError(f"ppo.max_new_tokens ({p.max_new_tokens}) leaves no room for a prompt within "
                             f"data.seq_len ({self.data.seq_len})")
        return self

    def check_complete(self) -> None:
        """What a run needs that a recipe inside `smolforge rlhf` gets filled in later."""
        if not self.run.init_from:
            raise SmolforgeError("run.init_from is empty: PPO starts from a trained (SFT) checkpoint")
        if not self.ppo.reward_model and not self.ppo.rewards:
            raise SmolforgeError("no reward: set ppo.reward_model (a checkpoint of `smolforge reward`) and/or "
                                 "ppo.rewards (verifiable rewards, e.g. [{name: smol_task}])")
        if self.ppo.value_init == "reward_model" and not self.ppo.reward_model:
            raise SmolforgeError("ppo.value_init reward_model needs ppo.reward_model (the critic starts as its copy)")
        if not self.data.train:
            raise SmolforgeError("data.train is empty: list at least one file of RL prompts")

    def fingerprint(self) -> str:
        """sha256 of the resolved recipe, recorded in every checkpoint's smolforge.json."""
        return hashlib.sha256(json.dumps(self.model_dump(), sort_keys=True).encode()).hexdigest()


class RLHFRunConfig(Section):
    """Where the pipeline lives and the model its SFT stage starts from."""

    name: str = Field("rlhf", min_length=1, description="Run name: outputs go to <dir>/<name>/{sft,reward_model,ppo,logs}/.")
    dir: str = Field("runs", description="Parent directory of run directories.")
    init_from: str = Field("", description="Checkpoint the SFT stage starts from (a pretrained base); empty = sft.run.init_from.")
    seed: int = Field(0, description="Seed of every stage that does not set its own run.seed.")


# rlhf recipe section -> (its recipe schema, the stage's folder under the run directory)
RLHF_STAGES: dict[str, tuple[type[BaseModel], str]] = {"sft": (SFTRecipe, "sft"), "reward": (RewardRecipe, "reward_model"),
                                                       "ppo": (PPORecipe, "ppo")}


class RLHFRecipe(Section):
    """A recipe for `smolforge rlhf`: the Mini-LLM pipeline SFT -> reward model -> PPO, one section per stage
    in its own schema. Each stage's run.dir / run.name are set to <run.dir>/<run.name>/<folder>, and the
    chain is filled in: reward.run.init_from (when empty) and ppo.run.init_from = sft/final,
    ppo.ppo.reward_model (when empty) = reward_model/final."""

    run: RLHFRunConfig = Field(default_factory=RLHFRunConfig)
    sft: SFTRecipe = Field(default_factory=SFTRecipe)
    reward: RewardRecipe = Field(default_factory=RewardRecipe)
    ppo: PPORecipe = Field(default_factory=PPORecipe)

    @model_validator(mode="before")
    @classmethod
    def _fill_chain(cls, values: Any) -> Any:
        if not isinstance(values, dict):
            return values
        values = dict(values)
        run = values.get("run") if isinstance(values.get("run"), dict) else {}
        root = f"{run.get('dir', 'runs')}/{run.get('name', 'rlhf')}"
        sft_final = f"{root}/sft/final"
        chained = {"sft": run.get("init_from", ""), "reward": sft_final, "ppo": sft_final}
        for section, (_, folder) in RLHF_STAGES.items():
            given = values.get(section) or {}
            if not isinstance(given, dict) or not isinstance(given.get("run") or {}, dict):
                continue  # the schema names the wrong type
            stage_run = {"seed": run.get("seed", 0), **(given.get("run") or {}), "dir": root, "name": folder}
            stage_run["init_from"] = stage_run.get("init_from") or chained[section]
            stage = {**given, "run": stage_run}
            if section == "ppo" and isinstance(stage.get("ppo") or {}, dict):
                settings = dict(stage.get("ppo") or {})
                settings["reward_model"] = settings.get("reward_model") or f"{root}/reward_model/final"
                stage["ppo"] = settings
            values[section] = stage
        return values


# --- loading, overriding, saving ----------------------------------------------------------------


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for key in parents:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise SmolforgeError(f"--{dotted}: '{key}' is not a section")
        node = child
    node[leaf] = value


def _known_keys(schema: type[BaseModel], loc: tuple) -> list[str]:
    """Field names of the section that holds `loc[-1]` (list indices are stepped over)."""
    model: Any = schema
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        annotation = field.annotation if field else None
        if get_origin(annotation) is list:
            annotation = get_args(annotation)[0]
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def _describe(error: ValidationError, schema: type[BaseModel], origin: str) -> str:
    lines = []
    for item in error.errors():
        loc = tuple(p for p in item["loc"] if p != "__root__")
        key = ".".join(str(p) for p in loc) or "(recipe)"
        if item["type"] == "extra_forbidden":
            known = _known_keys(schema, loc)
            close = difflib.get_close_matches(str(loc[-1]), known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (known keys: {', '.join(known)})"
            lines.append(f"  {key}: unknown key{hint}")
        else:
            message = item["msg"].removeprefix("Value error, ")
            got = item.get("input")
            shown = "" if isinstance(got, dict) or item["type"].startswith("value_error") else f" (got {got!r})"
            lines.append(f"  {key}: {message}{shown}")
    return f"invalid recipe {origin}:\n" + "\n".join(lines)


def resolve_recipe_path(path: Path) -> Path:
    """`path` itself, else the bundled recipe of that name when `path` is a bare name or
    `recipes/NAME` (the docs' commands then work from any directory, not only a clone)."""
    if path.is_file():
        return path
    bundled = Path(str(resources.files("smolforge.recipes").joinpath(path.name)))
    if path.parent in (Path("."), Path("recipes")) and bundled.is_file():
        return bundled
    raise SmolforgeError(f"recipe {path} not found: pass the path of a YAML recipe, or the name of a "
                         "bundled one (smolforge/recipes/: "
                         + ", ".join(sorted(p.name for p in bundled.parent.glob("*.yaml"))) + ")")


def load_recipe(path: str | Path | None, overrides: dict[str, Any] | None = None,
                schema: type[BaseModel] = PretrainRecipe) -> Any:
    """Read a YAML recipe, apply dotted overrides, and validate it against `schema`."""
    tree: dict = {}
    origin = "(command line)"
    if path is not None:
        path = resolve_recipe_path(Path(path))
        origin = str(path)
        try:
            tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise SmolforgeError(f"recipe {path} is not valid YAML: {exc}") from None
        if not isinstance(tree, dict):
            raise SmolforgeError(f"recipe {path} must be a mapping of sections, got {type(tree).__name__}")
    for dotted, value in (overrides or {}).items():
        _set_dotted(tree, dotted, value)
    try:
        return schema.model_validate(tree)
    except ValidationError as exc:
        raise SmolforgeError(_describe(exc, schema, origin)) from None


def save_recipe(recipe: BaseModel, path: str | Path) -> None:
    """Write the fully resolved recipe (defaults + recipe + overrides) as YAML."""
    Path(path).write_text(yaml.safe_dump(recipe.model_dump(), sort_keys=False), encoding="utf-8")


def add_recipe_arguments(parser: argparse.ArgumentParser, schema: type[BaseModel] = PretrainRecipe) -> None:
    """Add one `--section.field VALUE` option per recipe field, with the field's doc as help."""
    for section_name, section in schema.model_fields.items():
        section_type = section.annotation
        group = parser.add_argument_group(f"{section_name} (recipe section)", section_type.__doc__)
        if section_name == "model":
            group.add_argument("--model.preset", dest="override:model.preset", default=argparse.SUPPRESS,
                               metavar="NAME", help=f"Start from a preset: {', '.join(PRESETS)}.")
        stage_defaults = getattr(schema, "DEFAULT_OVERRIDES", {}).get(section_name, {})
        for name, field in section_type.model_fields.items():
            value = stage_defaults.get(name, field.get_default(call_default_factory=True))
            default = "" if field.is_required() else f" [default: {value}]"
            group.add_argument(f"--{section_name}.{name}", dest=f"override:{section_name}.{name}",
                               default=argparse.SUPPRESS, metavar="VALUE",
                               help=f"{field.description or ''}{default}".replace("%", "%%"))


def collect_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Dotted overrides from parsed args; values are parsed as YAML (`3e-4`, `true`, `[a, b]`)."""
    overrides = {}
    for dest, raw in vars(args).items():
        if dest.startswith("override:"):
            overrides[dest.removeprefix("override:")] = yaml.safe_load(raw) if isinstance(raw, str) else raw
    return overrides
