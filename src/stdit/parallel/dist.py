"""Process-group setup and data-parallel wrapping (DDP or FSDP2 per block).

Works the same under ``torchrun`` (reads ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``) and in a plain process, where
every helper degrades to the single-process case.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    distributed: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(backend: str = "auto") -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment, if any; pick the device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if "WORLD_SIZE" not in os.environ:
        return DistInfo(device=device)
    if not dist.is_initialized():
        if backend == "auto":
            backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"
        if backend == "nccl" and not cuda:
            raise RuntimeError("parallel.backend=nccl needs CUDA; use gloo (or auto) on the CPU.")
        kwargs = {"device_id": device} if cuda and "nccl" in backend else {}
        dist.init_process_group(backend=backend, **kwargs)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device, distributed=True)


def cleanup(wait_for_all: bool = True) -> None:
    """Leave the process group. Modules and pending work that reference it are collected first: gloo aborts the
    process when such objects are only freed during interpreter shutdown. After an error, do not wait for ranks
    that may never arrive."""
    if dist.is_initialized():
        import gc

        gc.collect()
        if wait_for_all:
            dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    """``obj`` from rank ``src`` on every rank (the object itself without a process group)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= dist.get_world_size()
    return value


def resolve_mode(mode: str, info: DistInfo) -> str:
    if mode == "auto":
        return "ddp" if info.world_size > 1 else "none"
    if mode == "ddp" and not info.distributed:
        return "none"
    return mode


def data_parallel_mesh(info: DistInfo, sp: int = 1, dp_shard: int = -1, dp_replicate: int = 1):
    """A ``(dp_replicate, dp_shard)`` device mesh (HSDP when ``dp_replicate > 1``); checks the degrees."""
    if not dist.is_initialized():
        raise RuntimeError("parallel.mode=fsdp needs a process group: launch with torchrun.")
    if dp_shard == -1:
        if info.world_size % (dp_replicate * sp):
            raise ValueError(f"parallel.dp_replicate={dp_replicate} x sp={sp} does not divide the world size "
                             f"{info.world_size}.")
        dp_shard = info.world_size // (dp_replicate * sp)
    if dp_shard * dp_replicate * sp != info.world_size:
        raise ValueError(f"parallel.dp_replicate ({dp_replicate}) x dp_shard ({dp_shard}) x sp ({sp}) must equal "
                         f"the world size {info.world_size}.")
    from torch.distributed.device_mesh import init_device_mesh

    # Sequence-parallel peers hold the same parameters and compute gradients on different tokens of the same
    # samples: parameters are sharded over them too, and the gradient average over the whole shard dim is exact
    # (see stdit.parallel.ulysses). Peers are consecutive ranks, the innermost mesh dim.
    shard = dp_shard * sp
    if dp_replicate > 1:
        return init_device_mesh(info.device.type, (dp_replicate, shard), mesh_dim_names=("dp_replicate", "dp_shard"))
    return init_device_mesh(info.device.type, (shard,), mesh_dim_names=("dp_shard",))


def wrap_model(model: nn.Module, info: DistInfo, mode: str, param_dtype: torch.dtype | None = None,
               reshard_after_forward: bool = True, mesh=None) -> nn.Module:
    """Wrap ``model`` for data parallelism.

    ``fsdp``: FSDP2 ``fully_shard`` on each of ``model.blocks`` and then the root, with a
    ``MixedPrecisionPolicy`` computing in ``param_dtype`` and reducing gradients in fp32. ``ddp``:
    ``DistributedDataParallel``. ``none``: the model as is. FSDP2 modifies the model in place (parameters
    become DTensors), so the returned module and ``model`` are the same object.
    """
    if mode == "none":
        return model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [info.local_rank] if info.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    if mode != "fsdp":
        raise ValueError(f"parallel.mode={mode!r}; choose one of auto, ddp, fsdp, none.")
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not dist.is_initialized():
        raise RuntimeError("parallel.mode=fsdp needs a process group: launch with torchrun.")
    mesh = mesh if mesh is not None else data_parallel_mesh(info)
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    # Blocks get activations already in the compute dtype from the root; not casting their inputs keeps the fp32
    # RoPE tables fp32, and a cast that activation checkpointing's recompute would not repeat cannot happen.
    block_mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=block_mp, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The underlying model of a DDP wrapper (FSDP2 modules are their own model)."""
    return model.module if hasattr(model, "module") and not hasattr(model, "blocks") else model
