"""Data parallelism on torch's own machinery: `torchrun` starts the processes, DDP or FSDP2
(`train.parallel`, see `smolforge.train.fsdp`) keeps them in step.

Design: no home-made cluster code. `torchrun --nproc_per_node N -m smolforge.cli pretrain ...`
sets RANK, WORLD_SIZE and LOCAL_RANK; `init_distributed` reads them and opens the process group
(nccl on CUDA, gloo on CPU, which is how the tests check the multi-process path). A plain
`smolforge pretrain` has no such variables and stays a single process with no process group.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext, redirect_stdout
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from smolforge.errors import SmolforgeError


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits among the data-parallel ranks."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device_hint: str = "cpu"  # "cuda:<local_rank>" on a GPU node: the one device this rank owns
    owns_group: bool = False  # True when init_distributed opened the group (and cleanup closes it)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise SmolforgeError(f"environment variable {name}={value!r} is not an integer") from None


def init_distributed(backend: str | None = None) -> DistInfo:
    """Read torchrun's environment and, with more than one process, open the process group.

    `backend` defaults to nccl when CUDA is available, else gloo; the caller passes "gloo" when
    the recipe trains on the CPU of a CUDA machine (nccl cannot reduce CPU tensors).
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if world_size < 1 or not 0 <= rank < world_size:
        raise SmolforgeError(f"RANK={rank} is outside WORLD_SIZE={world_size}: launch with torchrun")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    device_hint = f"cuda:{local_rank}" if backend == "nccl" else "cpu"
    if world_size == 1:
        return DistInfo(device_hint=device_hint)
    if backend == "nccl":
        # Each rank owns one GPU; set it before the group so NCCL's communicators bind to it.
        torch.cuda.set_device(local_rank)
    owns = False
    if not dist.is_initialized():  # a caller (or an earlier stage in this process) may have opened it
        dist.init_process_group(backend=backend)
        owns = True
    return DistInfo(rank, world_size, local_rank, device_hint, owns)


def is_main() -> bool:
    """True on rank 0, and in a single process: the rank that writes files and prints."""
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place (the tensor itself in a single process)."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over ranks, in place."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= dist.get_world_size()
    return tensor


def gradient_sync(module: torch.nn.Module, sync: bool) -> AbstractContextManager[Any]:
    """Context for one micro-batch's backward: gradients are reduced over ranks only when `sync`.

    Gradient accumulation needs one reduction per optimizer step, on the last micro-batch; the
    others accumulate locally. DDP: `no_sync()`. FSDP2: `set_requires_gradient_sync(False)` skips
    the reduce-scatter (unsharded gradients accumulate until the last micro-batch). A plain
    module: nothing to do.
    """
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(module, DistributedDataParallel):
        return nullcontext() if sync else module.no_sync()
    if isinstance(module, FSDPModule):
        module.set_requires_gradient_sync(sync)
    return nullcontext()


def clip_grad_norm(parameters: Iterable[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """`clip_grad_norm_` that also takes FSDP2's sharded (DTensor) gradients; returns the full
    pre-clip norm as a plain tensor (the same on every rank)."""
    from torch.distributed.tensor import DTensor

    norm = torch.nn.utils.clip_grad_norm_(list(parameters), max_norm)
    # Over DTensor gradients the norm is itself a DTensor (a reduction over the shards).
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


@contextmanager
def quiet_unless(main: bool) -> Iterator[None]:
    """Silence prints and warnings on ranks other than 0: one report per run, not one per rank."""
    if main:
        yield
        return
    with redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def cleanup(info: DistInfo) -> None:
    """Close the process group if `init_distributed` opened it."""
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


class SilentLog:
    """What ranks other than 0 log to: nothing (rank 0 writes the one metrics.jsonl)."""

    def write(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class SilentProgress:
    """What ranks other than 0 show: nothing (one progress display per run, not one per rank)."""

    def __enter__(self) -> SilentProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def update(self, step: int, loss: float, lr: float, tokens_per_s: float) -> None:
        pass

    def note(self, text: str) -> None:
        pass
