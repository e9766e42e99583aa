"""FSDP2 (`train.parallel: fsdp2`): weights, gradients and optimizer state sharded over the ranks.

Built on torch's own per-parameter sharding, `torch.distributed.fsdp.fully_shard` (FSDP2; ZeRO-3,
Rajbhandari et al. 2020), applied as torchtitan does: to each transformer block, then to the root,
whose group holds the embedding, the final norm and the LM head (tied embeddings stay one tensor
in one group). Every parameter becomes a DTensor sharded on dim 0; a block's full weights exist
only between its all-gather and its reshard. Master weights and optimizer state stay fp32; with
bf16 precision a `MixedPrecisionPolicy` computes in bf16 and reduce-scatters gradients in fp32
(playbook ch. 04/07: bf16-only accumulation drifts).

Checkpoints. A periodic checkpoint of an FSDP2 run is a torch.distributed.checkpoint (DCP)
directory: every rank writes its shards of the model and the optimizer into `dcp/`, rank 0 adds
config, tokenizer, `trainer_state.pt` (data position, RNG, step) and `smolforge.json` with the
hash of every file, and the directory is moved into place only when complete, like every other
checkpoint. DCP reshards on load, so such a checkpoint resumes on any number of processes and
with either parallelism, single process included (`load_sharded_checkpoint`). `final/` is a
normal checkpoint directory (the full weights gathered on rank 0), read by every other command;
`smolforge consolidate CKPT OUT` turns a periodic DCP checkpoint into one (`consolidate`).
"""

from __future__ import annotations

import argparse
import os
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from smolforge.errors import SmolforgeError
from smolforge.model import ModelConfig, Transformer
from smolforge.train import checkpoint as ckpt


def is_sharded(model: nn.Module) -> bool:
    """True once `fully_shard` has turned `model` into an FSDP2 module."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def is_sharded_checkpoint(path: str | Path) -> bool:
    """A checkpoint whose weights are DCP shards (written by an FSDP2 run), not safetensors."""
    return (Path(path) / ckpt.DCP_METADATA).is_file()


def shard_model(model: nn.Module, device: torch.device, bf16: bool) -> nn.Module:
    """Shard `model` in place over all ranks of the process group: each block, then the root.

    Call before building the optimizer: it must hold the sharded (DTensor) parameters.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not isinstance(model, Transformer):
        raise SmolforgeError("train.parallel: fsdp2 shards causal language models only; train the reward "
                             "model with train.parallel: ddp")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    # fp32 parameters are the master weights; bf16 is only the compute copy all-gathered per block.
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16
              else MixedPrecisionPolicy())
    for block in model.model.layers:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


# --- whole state dicts ----------------------------------------------------------------------------


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) weights on rank 0's CPU, {} on the other ranks. Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def plain_model(config: ModelConfig, state: dict[str, torch.Tensor]) -> Transformer:
    """An ordinary CPU `Transformer` holding `state` (e.g. gathered from the shards), for saving."""
    with torch.device("meta"):
        model = Transformer(config)
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_embeddings:  # `assign` replaced the shared tensor in one place only
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


def load_full_checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer, weights: dict[str, torch.Tensor],
                         optimizer_state: dict[str, Any]) -> None:
    """Load a normal checkpoint (full weights, `optimizer.state_dict()` keyed by position) into a
    sharded model and its optimizer: each rank keeps its own shards. Collective.

    The saved optimizer state names parameters by their position in the param groups; the
    distributed state-dict API names them by FQN. Both follow `model.parameters()` order (FSDP2
    keeps names and order), so position i of group g is the i-th FQN of group g.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    full = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, weights, options=full)
    layout = get_optimizer_state_dict(model, optimizer)  # this rank's shards: only the FQNs are read
    saved_groups = optimizer_state["param_groups"]
    if [len(g["params"]) for g in saved_groups] != [len(g["params"]) for g in layout["param_groups"]]:
        raise SmolforgeError("the checkpoint's optimizer state does not match this model's parameter groups")
    state, groups = {}, []
    for saved, live in zip(saved_groups, layout["param_groups"]):
        for index, fqn in zip(saved["params"], live["params"]):
            if index in optimizer_state["state"]:
                state[fqn] = optimizer_state["state"][index]
        groups.append({**saved, "params": live["params"]})
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": groups}, options=full)


# --- DCP checkpoints -----------------------------------------------------------------------------


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def save_sharded_checkpoint(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, tokenizer: Any,
                            *, meta: dict[str, Any], trainer_state: dict[str, Any]) -> Path:
    """Write a DCP checkpoint at `directory` (see the module docstring). Collective: every rank calls it.

    `trainer_state` (without the optimizer, which goes into the shards) is rank 0's to save.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    main = not _distributed() or dist.get_rank() == 0
    # Rank 0 picks the temporary directory and tells the others; a problem there stops every rank.
    staged: list[Any] = [None]
    if main:
        try:
            tmp = ckpt.staging_dir(directory)
            (tmp / ckpt.DCP_DIR).mkdir()
            staged[0] = str(tmp)
        except SmolforgeError as exc:
            staged[0] = exc
    if _distributed():
        dist.broadcast_object_list(staged, src=0)
    if isinstance(staged[0], BaseException):
        raise SmolforgeError(str(staged[0]))
    tmp = Path(staged[0])
    weights, optim = get_state_dict(model, optimizer)
    dcp.save({"model": weights, "optimizer": optim}, checkpoint_id=tmp / ckpt.DCP_DIR)
    if main:  # dcp.save returned on rank 0 after every rank's shards and the metadata were written
        ckpt.write_checkpoint_dir(directory, model.config, tokenizer, lambda _: None,
                                  meta={**meta, "format": "dcp"}, trainer_state=trainer_state,
                                  dtype_name="float32", tmp=tmp)
    if _distributed():
        dist.barrier()  # the checkpoint is complete before any rank may read it (rollback)
    return directory


def load_sharded_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Weights (and optimizer state) from a DCP checkpoint into `model`, sharded or not, under any
    number of processes or none: DCP reads each rank's part of every tensor (resharding)."""
    folder = Path(path) / ckpt.DCP_DIR
    with warnings.catch_warnings():
        # Without a process group DCP warns that it assumes one process: that is the intent here.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        _load(folder, model, optimizer)


def _load(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_state_dict,
        set_state_dict,
    )

    if optimizer is None:
        weights = get_model_state_dict(model)
        dcp.load({"model": weights}, checkpoint_id=folder, no_dist=not _distributed())
        model.load_state_dict(weights)
        return
    weights, optim = get_state_dict(model, optimizer)
    dcp.load({"model": weights, "optimizer": optim}, checkpoint_id=folder, no_dist=not _distributed())
    set_state_dict(model, optimizer, model_state_dict=weights, optim_state_dict=optim)


def consolidate(source: str | Path, destination: str | Path) -> Path:
    """A normal checkpoint directory (model.safetensors, loadable by transformers) from a DCP one.

    Runs in one process, no process group: DCP reads every shard into full tensors. The metadata
    (stage, step, metrics, ...) is kept and `consolidated_from` names the source.
    """
    source, destination = Path(source), Path(destination)
    if not is_sharded_checkpoint(source):
        raise SmolforgeError(f"{source} is not a sharded (DCP) checkpoint: it has no {ckpt.DCP_METADATA}")
    if destination.resolve() == source.resolve():
        raise SmolforgeError(f"{destination}: write the consolidated checkpoint to another directory")
    ckpt.verify_checkpoint(source)
    meta = ckpt.read_meta(source)
    config = ModelConfig(**meta["model"])
    with torch.device("meta"):
        model = Transformer(config)
    model = model.to_empty(device="cpu")
    if config.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    load_sharded_checkpoint(source, model, None)
    from smolforge.tokenizer import Tokenizer

    keep = {k: v for k, v in meta.items() if k not in ("files", "format", "created", "architecture", "model",
                                                         "smolforge_version")}
    return ckpt.save_checkpoint(destination, model, Tokenizer.load(source),
                                meta={**keep, "consolidated_from": str(source)})


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "consolidate", help="Turn a sharded (FSDP2 / DCP) training checkpoint into a normal checkpoint directory.",
        description="Read the torch.distributed.checkpoint shards of a periodic checkpoint of a "
                    "`train.parallel: fsdp2` run (checkpoints/step_N) in one process and write a normal "
                    "checkpoint directory (model.safetensors, config, tokenizer), which every smolforge "
                    "command and transformers load. Resuming needs no conversion: --resume reads DCP "
                    "checkpoints on any number of processes.")
    parser.add_argument("checkpoint", help="The DCP checkpoint directory (holds dcp/.metadata).")
    parser.add_argument("out", help="Where to write the normal checkpoint directory.")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    path = consolidate(args.checkpoint, args.out)
    print(f"wrote {path} ({os.path.getsize(path / ckpt.WEIGHTS_FILE):,} bytes of weights)")
    return 0
