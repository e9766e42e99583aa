"""LoRA: low-rank adapters on the linear layers of a frozen smolforge model, saved in PEFT format.

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") freezes a pretrained
weight W (out x in) and learns its update as a product of two thin matrices:

    y = W x + (alpha / r) * B A dropout(x),   A: r x in,  B: out x r,  r << min(in, out)

B starts at zero, so the adapted model equals the base model at step 0 (Hu et al. §4.1); alpha / r
keeps the update's size roughly independent of r, so a learning rate tuned at one rank carries over.
A is initialised like `nn.Linear` (kaiming-uniform, a = sqrt(5)), as peft does.

`apply_lora` wraps each targeted `nn.Linear` in a `LoraLinear` holding it as `base_layer` (peft's
layout) and freezes the base; `base_state_dict` gives the base weights under their original names
(what `save_checkpoint` expects); `merge_lora` folds the update into W and removes the wrappers.

On disk an adapter is a PEFT directory, loadable with `peft.PeftModel.from_pretrained(hf_model,
dir)` on top of the base checkpoint loaded by transformers: `adapter_config.json` and
`adapter_model.safetensors` with keys `base_model.model.<module>.lora_{A,B}.weight`. smolforge's
module names equal Hugging Face's below `model.` (see `smolforge.model`), so `<module>` is ours.

Reward models (`smolforge.train.reward.RewardModel`) take adapters on their body and train their new
`score` head in full, as peft does for sequence classification (task_type SEQ_CLS, with the head in
`modules_to_save`): the adapter directory then also holds `base_model.model.score.weight`, and
`PeftModel.from_pretrained` on the base loaded by `AutoModelForSequenceClassification` (num_labels=1)
gives the same rewards. A model declares this with the class attributes `peft_task_type` and
`peft_modules_to_save` (see `peft_task`).

QLoRA (Dettmers et al. 2023; `lora.quantize: nf4`, CUDA only): `quantize_base` stores the frozen
base's Linear layers in 4-bit NF4 (`smolforge.train.qlora`) before `apply_lora` wraps them; the
adapters stay fp32. Merging dequantises: the merged weight is the NF4-rounded base plus scaling * B A,
which is the model that was trained, but not the full-precision base plus the update (see
`merged_copy`).

Not expressible in PEFT's per-module format: adapters on MoE experts. transformers 5 fuses each
layer's experts into 3-D parameters (`mlp.experts.gate_up_proj`), so there is no per-expert module
for peft to attach `mlp.experts.3.up_proj.lora_A` to. Such adapters train and merge here
(`smolforge merge-lora`, `merge_lora`), but `save_adapter` refuses them.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from smolforge.data.sources import read_json_object
from smolforge.errors import SmolforgeError, where
from smolforge.model import Transformer
from smolforge.train.checkpoint import _exchange, _fsync_dir, _fsync_tree
from smolforge.train.qlora import dense_linear, is_quantized, require_cuda, to_nf4

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the transformers model
DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Linear layers that are never adapted (nor quantised by QLoRA): the embedding-tied LM head, the MoE
# router `mlp.gate` (a LoRA update on a router changes which experts run, and transformers 5's router
# is no Linear), and a reward model's `score` head, which trains in full (peft's modules_to_save).
_EXCLUDED = ("lm_head", "gate", "score")
# The heads peft itself puts in modules_to_save for task_type SEQ_CLS (its saved configs list both).
_SEQ_CLS_HEADS = ("classifier", "score")
# adapter_config.json fields of PEFT features smolforge does not implement, and their "off" values.
_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "bias": ("none",), "use_dora": (False, None), "use_rslora": (False, None),
    "fan_in_fan_out": (False, None), "layers_to_transform": (None,),
    "rank_pattern": ({}, None), "alpha_pattern": ({}, None), "lora_bias": (False, None),
    "target_parameters": (None, []), "exclude_modules": (None, []), "layer_replication": (None,),
    "trainable_token_indices": (None,), "use_qalora": (False, None), "alora_invocation_tokens": (None,),
}


class LoraSettings(BaseModel):
    """Low-rank adaptation (Hu et al. 2021) of the linear layers; r = 0 trains the full model."""

    model_config = ConfigDict(extra="forbid")

    r: int = Field(0, ge=0, description="Rank of the adapters; 0 = LoRA off (full fine-tuning).")
    alpha: float = Field(16.0, gt=0, description="Scale numerator: the update is multiplied by alpha / r.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter input during training.")
    target_modules: list[str] = Field(
        default_factory=lambda: list(DEFAULT_TARGETS), min_length=1,
        description="Linear layers to adapt, by the last part of their name (q_proj, down_proj, ...).")
    quantize: Literal["none", "nf4"] = Field(
        "none", description="QLoRA (Dettmers et al. 2023): nf4 stores the frozen base's linear layers in 4-bit "
                            "NormalFloat with double quantisation and bf16 compute (bitsandbytes, CUDA only, "
                            "extra 'qlora'); none keeps the base in full precision.")

    @model_validator(mode="after")
    def _check_quantize(self) -> LoraSettings:
        if self.quantize != "none" and self.r == 0:
            raise ValueError(f"lora.quantize: {self.quantize} quantises the frozen base under LoRA adapters, but "
                             f"lora.r is 0 (full fine-tuning, which cannot train a 4-bit base): set lora.r, e.g. 16")
        return self


class LoraLinear(nn.Module):
    """`base_layer(x) + scaling * lora_B(lora_A(dropout(x)))` around a frozen nn.Linear."""

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, dropout: float) -> None:
        super().__init__()
        self.base_layer = base_layer
        weight = base_layer.weight
        # Adapters stay in fp32 over a bf16/fp16 or 4-bit (QLoRA, uint8 storage) base (peft's
        # autocast_adapter_dtype): they are the only trained weights, and DESIGN.md keeps those fp32.
        dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
        self.lora_A = nn.Linear(base_layer.in_features, r, bias=False, device=weight.device, dtype=dtype)
        self.lora_B = nn.Linear(r, base_layer.out_features, bias=False, device=weight.device, dtype=dtype)
        self.lora_dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = alpha / r
        self.r = r
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)  # delta W = B A = 0: the model is unchanged at init

    @property
    def weight(self) -> Tensor:
        return self.base_layer.weight

    def forward(self, x: Tensor) -> Tensor:
        out = self.base_layer(x)
        delta = self.lora_B(self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype))))
        return out + (delta * self.scaling).to(out.dtype)

    def delta_weight(self) -> Tensor:
        """scaling * B A, the dense update this adapter adds to base_layer.weight (fp32)."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling


# --- applying, inspecting, merging -------------------------------------------------------------


def _targetable(model: nn.Module) -> dict[str, nn.Linear]:
    """Every Linear that LoRA may wrap, by full name (the LM head and MoE routers left out)."""
    return {name: module for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] not in _EXCLUDED}


def lora_modules(model: nn.Module) -> dict[str, LoraLinear]:
    """The LoRA wrappers of `model` by module name (empty when none were applied)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def peft_task(model: nn.Module) -> tuple[str, list[str]]:
    """(task_type, modules_to_save) of `model` in PEFT's terms, from its class attributes
    `peft_task_type` and `peft_modules_to_save`: ("CAUSAL_LM", []) for a language model, ("SEQ_CLS",
    ["score"]) for a reward model, whose new head trains in full next to the adapters."""
    return getattr(model, "peft_task_type", "CAUSAL_LM"), list(getattr(model, "peft_modules_to_save", ()))


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _chosen(model: nn.Module, settings: LoraSettings) -> dict[str, nn.Linear]:
    """The Linear layers `settings` targets (name ends with `.<target>`, peft's rule), validated."""
    if settings.r <= 0:
        raise SmolforgeError("LoRA is off (lora.r = 0): set lora.r to the adapter rank, e.g. 8 or 16")
    if lora_modules(model):
        raise SmolforgeError("the model already has LoRA adapters: merge them with merge_lora first")
    candidates = _targetable(model)
    valid = sorted({name.rsplit(".", 1)[-1] for name in candidates})
    unknown = [t for t in settings.target_modules if t not in valid]
    if unknown:
        raise SmolforgeError(f"unknown LoRA target module(s) {unknown}: this model's adaptable linear "
                             f"layers are {valid} (the LM head, embeddings, MoE router and a reward "
                             f"model's score head are never adapted)")
    return {name: m for name, m in candidates.items() if name.rsplit(".", 1)[-1] in settings.target_modules}


def apply_lora(model: Transformer, settings: LoraSettings) -> list[nn.Parameter]:
    """Wrap each targeted Linear in a LoraLinear, freeze all base weights, return the trained params:
    the adapters, and the modules a reward model trains in full (its `score` head, see `peft_task`).

    Raises SmolforgeError, before changing anything, when LoRA is off (r = 0), the model already
    has adapters, or a target names no adaptable layer of this model.
    """
    chosen = _chosen(model, settings)
    if any(".experts." in name for name in chosen):
        warnings.warn("LoRA on MoE experts: the adapter can be merged (merge_lora, `smolforge "
                      "merge-lora`) but not saved in PEFT format, which has no per-expert modules "
                      "under transformers 5; target only attention projections to save adapters",
                      stacklevel=2)
    model.requires_grad_(False)
    for name, linear in chosen.items():
        _replace(model, name, LoraLinear(linear, settings.r, settings.alpha, settings.dropout))
    return lora_parameters(model)


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapter weights (A then B of each wrapper, in module order), then the parameters of the
    model's modules_to_save (`peft_task`), made trainable."""
    params = []
    for module in lora_modules(model).values():
        params += [module.lora_A.weight, module.lora_B.weight]
    for name in peft_task(model)[1]:
        params += list(model.get_submodule(name).parameters())
    for p in params:
        p.requires_grad_(True)
    return params


def base_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """model.state_dict() without the adapters, with `x.base_layer.weight` renamed back to `x.weight`.

    The names equal those of the model before apply_lora, so the result feeds the HF key maps
    (`smolforge.interop.hf.to_hf`) and `load_state_dict` of a plain Transformer.
    """
    renames: dict[str, str] = {}
    dropped: set[str] = set()
    for name in lora_modules(model):
        for param in ("weight", "bias"):
            renames[f"{name}.base_layer.{param}"] = f"{name}.{param}"
        dropped |= {f"{name}.lora_A.weight", f"{name}.lora_B.weight"}
    return {renames.get(k, k): v for k, v in model.state_dict().items() if k not in dropped}


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapter tensors under PEFT's names: base_model.model.<module>.lora_{A,B}.weight, and the
    modules_to_save in full as peft saves them (base_model.model.score.weight for a reward model)."""
    state = {}
    for name, module in lora_modules(model).items():
        state[f"{PEFT_PREFIX}{name}.lora_A.weight"] = module.lora_A.weight
        state[f"{PEFT_PREFIX}{name}.lora_B.weight"] = module.lora_B.weight
    if state:  # a model without adapters has nothing of an adapter to save
        for name in peft_task(model)[1]:
            for key, param in model.get_submodule(name).named_parameters():
                state[f"{PEFT_PREFIX}{name}.{key}"] = param
    return state


@torch.no_grad()
def merge_lora(model: Transformer) -> Transformer:
    """Fold scaling * B A into each base weight and put the plain nn.Linear back, in place.

    After merging, inference costs nothing extra (Hu et al. §4.1: "no additional inference
    latency"). Base parameters stay frozen; call `model.requires_grad_(True)` to train them.
    A 4-bit (QLoRA) base layer becomes an fp32 nn.Linear holding its dequantised weight plus the
    update, on the same device; 4-bit layers without an adapter stay as they are.
    """
    for name, module in lora_modules(model).items():
        if is_quantized(module.base_layer):
            _replace(model, name, dense_linear(module.base_layer, module.delta_weight()))
            continue
        weight = module.base_layer.weight
        # Add in fp32 and round once: a bf16 base would otherwise lose the small update twice.
        weight.copy_((weight.float() + module.delta_weight()).to(weight.dtype))
        _replace(model, name, module.base_layer)
    return model


@torch.no_grad()
def merged_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` with its adapters merged, for writing a checkpoint; `model` keeps training.

    A model with a 4-bit base (QLoRA) is copied to the CPU in fp32, one layer at a time: each 4-bit
    Linear is dequantised on the GPU (plus its adapter's update) and moved over, so the GPU never
    holds the full-precision model that QLoRA exists to avoid. Precision: the merged weight is the
    NF4-rounded base (bf16 values) plus scaling * B A in fp32 — the model that was trained, not the
    original full-precision base plus the update (which is what applying the PEFT adapter to the
    full-precision base computes: the two differ by the quantisation error, up to ~15% of each
    block's largest weight, half the widest NF4 gap).
    """
    if not any(is_quantized(m) for m in model.modules()):
        return merge_lora(copy.deepcopy(model))
    cpu = torch.device("cpu")
    # copy.deepcopy takes what `memo` holds for an object instead of copying it: CPU stand-ins for
    # every 4-bit layer and adapter wrapper, and CPU copies of every other tensor.
    memo: dict[int, Any] = {}
    replaced: list[str] = []
    for name, module in model.named_modules():  # parents before their children
        if any(name.startswith(f"{outer}.") for outer in replaced):
            continue  # inside a layer already replaced: nothing of it is copied
        if isinstance(module, LoraLinear):
            memo[id(module)] = dense_linear(module.base_layer, module.delta_weight(), cpu)
            replaced.append(name)
            continue
        if is_quantized(module):
            memo[id(module)] = dense_linear(module, device=cpu)
            replaced.append(name)
            continue
        for param in module.parameters(recurse=False):
            memo.setdefault(id(param), nn.Parameter(param.detach().to(cpu, copy=True),
                                                    requires_grad=param.requires_grad))
        for buffer in module.buffers(recurse=False):
            memo.setdefault(id(buffer), buffer.detach().to(cpu, copy=True))
    return copy.deepcopy(model, memo)


def quantize_base(model: nn.Module, device: torch.device) -> int:
    """QLoRA's base: replace every adaptable Linear (all but the LM head, MoE routers and a reward
    head) by a frozen NF4 `Linear4bit` on `device`, and move the rest of `model` there; returns how
    many layers were quantised. Call it on a model still on the CPU (the full-precision weights then
    never reach the GPU together), before `apply_lora`.
    """
    require_cuda(device)
    if lora_modules(model):
        raise SmolforgeError("quantize_base comes before apply_lora: the model already has adapters")
    linears = _targetable(model)
    for name, linear in linears.items():
        _replace(model, name, to_nf4(linear, device))
    with torch.no_grad():
        for module in model.modules():
            if is_quantized(module):
                continue
            for param in module.parameters(recurse=False):  # `.data =` keeps tied weights tied
                param.data = param.data.to(device)
            for key, buffer in module.named_buffers(recurse=False):
                setattr(module, key, buffer.to(device))
    return len(linears)


# --- PEFT directories -----------------------------------------------------------------------------


def peft_config(settings: LoraSettings, base_model_path: str | None, task_type: str = "CAUSAL_LM",
                modules_to_save: list[str] | None = None) -> dict[str, Any]:
    """adapter_config.json for `settings`: the fields peft reads, every unused feature switched off.
    `task_type` and `modules_to_save` as `peft_task` gives them (SEQ_CLS and ["score"] for a reward
    model: peft then loads it as a PeftModelForSequenceClassification with the saved head)."""
    return {
        "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base_model_path,
        "revision": None, "inference_mode": True, "r": settings.r, "lora_alpha": settings.alpha,
        "lora_dropout": settings.dropout, "target_modules": list(dict.fromkeys(settings.target_modules)),
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "modules_to_save": modules_to_save or None, "layers_to_transform": None,
        "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "lora_bias": False,
    }


def save_adapter(directory: str | Path, model: nn.Module, settings: LoraSettings,
                 base_model_path: str | None) -> Path:
    """Write the adapters of `model` as a PEFT directory, atomically (temp dir, then rename).

    `base_model_path` is recorded as base_model_name_or_path (the checkpoint the adapter belongs
    to). An existing adapter directory at `directory` is replaced only once the new one is complete.
    A reward model's adapter also holds its trained `score` head (task_type SEQ_CLS, see `peft_task`).
    """
    directory = Path(directory)
    modules = lora_modules(model)
    if not modules:
        raise SmolforgeError("the model has no LoRA adapters to save (call apply_lora first)")
    ranks = {m.r for m in modules.values()}
    if ranks != {settings.r}:
        raise SmolforgeError(f"the model's adapters have rank {sorted(ranks)} but the settings say "
                             f"r={settings.r}: pass the settings the adapters were built with")
    experts = sorted(name for name in modules if ".experts." in name)
    if experts:
        raise SmolforgeError(
            f"cannot save LoRA adapters on MoE experts ({experts[0]} and {len(experts) - 1} more) in "
            f"PEFT format: transformers 5 fuses experts into 3-D parameters, so peft has no module to "
            f"load them onto. Target attention projections only (q_proj, k_proj, v_proj, o_proj), or "
            f"fold the adapters into the weights with merge_lora and save a checkpoint")
    if directory.exists() and any(directory.iterdir()) and not (directory / CONFIG_FILE).is_file():
        raise SmolforgeError(f"{directory} exists and is not a LoRA adapter (no {CONFIG_FILE}); "
                             f"refusing to replace it: choose another path or remove it")
    state = {k: v.detach().cpu().contiguous() for k, v in adapter_state_dict(model).items()}
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.parent / f".tmp-{directory.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)  # a leftover of an earlier failed save in this process
    tmp.mkdir()
    try:
        save_file(state, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        config = peft_config(settings, base_model_path, *peft_task(model))
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        _fsync_tree(tmp)
        if not directory.exists():
            os.replace(tmp, directory)
        elif not _exchange(tmp, directory):  # one atomic swap on Linux, else two renames
            os.replace(directory, old := tmp.with_name(tmp.name + ".old"))
            os.replace(tmp, directory)
            tmp = old
        shutil.rmtree(tmp, ignore_errors=True)  # the old adapter, if one was replaced
        _fsync_dir(directory.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _adapter_files(directory: str | Path) -> tuple[Path, Path]:
    directory = Path(directory)
    expected = f"expected a PEFT LoRA adapter directory holding {CONFIG_FILE} and {WEIGHTS_FILE}"
    if not directory.is_dir():
        raise SmolforgeError(f"{directory}: no such directory; {expected}")
    config, weights = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    if not config.is_file():
        raise SmolforgeError(f"{directory} has no {CONFIG_FILE}: {expected}")
    if not weights.is_file():
        hint = (" (adapter_model.bin is not read: re-save it with peft's "
                "save_pretrained(safe_serialization=True))") if (directory / "adapter_model.bin").exists() else ""
        raise SmolforgeError(f"{directory} has no {WEIGHTS_FILE}{hint}: {expected}")
    return config, weights


def read_adapter_config(directory: str | Path) -> tuple[LoraSettings, str | None]:
    """(settings, base_model_name_or_path) from a PEFT adapter directory, or a SmolforgeError."""
    file, _ = _adapter_files(directory)
    config = read_json_object(file)
    if config.get("peft_type") != "LORA":
        raise SmolforgeError(f"{where(file, field='peft_type')}: {config.get('peft_type')!r}; "
                             f"smolforge reads LoRA adapters only ('LORA')")
    for key, off in _UNSUPPORTED.items():
        if key in config and config[key] not in off:
            raise SmolforgeError(f"{where(file, field=key)}: {config[key]!r} is not supported; "
                                 f"smolforge reads plain LoRA adapters ({key} = {off[0]!r})")
    saved = config.get("modules_to_save") or []
    heads = _SEQ_CLS_HEADS if config.get("task_type") == "SEQ_CLS" else ()
    if not isinstance(saved, list) or any(name not in heads for name in saved):
        raise SmolforgeError(f"{where(file, field='modules_to_save')}: {saved!r} is not supported; smolforge "
                             f"reads plain LoRA adapters, with a reward model's head ({_SEQ_CLS_HEADS[1]!r}) "
                             f"for task_type SEQ_CLS")
    targets = config.get("target_modules")
    if not isinstance(targets, list):
        raise SmolforgeError(f"{where(file, field='target_modules')}: {targets!r}; expected a list "
                             f"of module names (regular expressions and 'all-linear' are not read)")
    try:
        settings = LoraSettings(r=config.get("r", 8), alpha=config.get("lora_alpha", 8),
                                dropout=config.get("lora_dropout", 0.0), target_modules=targets)
    except ValidationError as exc:
        raise SmolforgeError(f"{file}: not a valid LoRA config: {exc}") from None
    return settings, config.get("base_model_name_or_path")


def read_adapter_task(directory: str | Path) -> str:
    """The adapter's task_type: "SEQ_CLS" for a reward model's adapter, else "CAUSAL_LM"."""
    file, _ = _adapter_files(directory)
    return "SEQ_CLS" if read_json_object(file).get("task_type") == "SEQ_CLS" else "CAUSAL_LM"


def load_adapter(model: Transformer, directory: str | Path) -> list[nn.Parameter]:
    """Apply the PEFT LoRA adapter saved at `directory` to `model`; return the trained parameters
    (the adapters, and a reward model's `score` head, which the adapter holds in full).

    Every tensor must match a targeted module by name and shape; anything missing, unexpected or
    misshapen is an error naming the tensor and the file, raised before `model` is changed.
    """
    settings, _ = read_adapter_config(directory)
    config_file, weights_file = _adapter_files(directory)
    task, saved = peft_task(model)
    if (adapter_task := read_adapter_task(directory)) != task:
        kinds = {"SEQ_CLS": "a reward model (sequence classifier)", "CAUSAL_LM": "a causal language model"}
        raise SmolforgeError(f"{where(config_file, field='task_type')}: the adapter is for {kinds[adapter_task]}, "
                             f"but the model is {kinds.get(task, task)}")
    try:
        tensors = load_file(weights_file)
        chosen = _chosen(model, settings)
    except (SafetensorError, OSError) as exc:
        raise SmolforgeError(f"{weights_file}: cannot read the weights ({type(exc).__name__}: {exc})") from None
    except SmolforgeError as exc:
        raise SmolforgeError(f"{config_file}: {exc}") from None
    # peft saves without the adapter name, but older files may keep ".default" in the key.
    tensors = {k.replace(".default.weight", ".weight"): v for k, v in tensors.items()}
    shapes = {}
    for name, linear in chosen.items():
        shapes[f"{PEFT_PREFIX}{name}.lora_A.weight"] = (settings.r, linear.in_features)
        shapes[f"{PEFT_PREFIX}{name}.lora_B.weight"] = (linear.out_features, settings.r)
    for name in saved:
        for key, param in model.get_submodule(name).named_parameters():
            shapes[f"{PEFT_PREFIX}{name}.{key}"] = tuple(param.shape)
    missing, unexpected = sorted(set(shapes) - set(tensors)), sorted(set(tensors) - set(shapes))
    if missing or unexpected:
        raise SmolforgeError(f"{weights_file}: the adapter does not fit this model (missing "
                             f"{_few(missing)}, unexpected {_few(unexpected)}); was it trained on "
                             f"another base?")
    for key, shape in shapes.items():
        if tuple(tensors[key].shape) != shape:
            raise SmolforgeError(f"{weights_file}: tensor {key} has shape {list(tensors[key].shape)} "
                                 f"but {config_file.name} (r={settings.r}) and the model imply "
                                 f"{list(shape)}")
    params = apply_lora(model, settings)
    with torch.no_grad():
        for key, param in adapter_state_dict(model).items():
            param.copy_(tensors[key])
    return params


def _few(keys: list[str]) -> str:
    return (str(keys[:3]) + f" and {len(keys) - 3} more") if len(keys) > 3 else str(keys)


# --- `smolforge merge-lora` ---------------------------------------------------------------------


def merge_adapter_checkpoint(adapter_dir: str | Path, base: str | Path | None, out: str | Path) -> Path:
    """Load `base` (None: the adapter's base_model_name_or_path), apply the adapter, merge, save.
    A reward model's adapter (task_type SEQ_CLS) gives a reward model: `base` is then the reward
    model or the causal LM its run started from (`smolforge.train.reward.reward_model_from`)."""
    from smolforge.train.checkpoint import load_model, save_checkpoint

    settings, recorded = read_adapter_config(adapter_dir)  # fail on a bad adapter before loading
    base = base or recorded
    if not base:
        raise SmolforgeError(f"{Path(adapter_dir) / CONFIG_FILE} records no base_model_name_or_path: "
                             f"pass the base checkpoint with --base")
    writer: Any = save_checkpoint
    if read_adapter_task(adapter_dir) == "SEQ_CLS":  # a reward model's: the base body + the saved head
        from smolforge.train.reward import reward_model_from, save_reward_model

        model, tokenizer = reward_model_from(base)
        writer = save_reward_model
    else:
        model, tokenizer = load_model(base)
    load_adapter(model, adapter_dir)
    merge_lora(model)
    meta = {"stage": "merge-lora", "parent": str(adapter_dir), "base": str(base),
            "lora": settings.model_dump()}
    return writer(out, model, tokenizer, meta=meta)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "merge-lora", help="Fold a LoRA adapter into its base model and save a full checkpoint.",
        description="Load the base checkpoint, apply the PEFT LoRA adapter, add scaling * B A to each "
                    "adapted weight and write a checkpoint that transformers loads without peft.",
    )
    parser.add_argument("adapter", metavar="ADAPTER_DIR",
                        help="PEFT adapter directory (adapter_config.json + adapter_model.safetensors).")
    parser.add_argument("--base", default=None,
                        help="Base checkpoint, Hugging Face model directory or Hub id (default: the "
                             "adapter's base_model_name_or_path).")
    parser.add_argument("--out", required=True, help="Directory to write the merged checkpoint to.")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    path = merge_adapter_checkpoint(args.adapter, args.base, args.out)
    print(f"merged {args.adapter} into {args.base or 'its base model'} -> {path}")
    return 0
