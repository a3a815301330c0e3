"""Ulysses sequence parallelism: each rank of a group holds a contiguous shard of the tokens.

Everything per-token (projections, norms, RoPE, FFN, cross-attention, the final layer) runs on the shard. Around
self-attention an all-to-all turns ``[B, S/sp, H, D]`` sequence shards into ``[B, S, H/sp, D]`` head shards and
back, so each rank attends over the whole sequence for its heads. Sequences that ``sp`` does not divide are padded
at the end; the attention core ignores the padding.

Gradients: ``gather`` sums the incoming gradients over the group in its backward, so with the same loss on every
rank of a group, averaging parameter gradients over the group (what DDP/FSDP do) gives the single-process gradient.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist


def valid_sp_sizes(num_heads: int, world_size: int | None = None) -> list[int]:
    """Sequence-parallel sizes that divide the heads (and the world size, if given)."""
    return [s for s in range(1, num_heads + 1) if num_heads % s == 0 and (world_size is None or world_size % s == 0)]


def check_sp_size(sp: int, num_heads: int, world_size: int | None = None) -> None:
    """One clear error, before any work starts, for a sequence-parallel size that cannot work."""
    if sp < 1:
        raise ValueError(f"parallel.sp={sp} must be >= 1.")
    if num_heads % sp:
        raise ValueError(f"parallel.sp={sp} does not divide the {num_heads} attention heads; "
                         f"valid sizes: {valid_sp_sizes(num_heads, world_size)}.")
    if world_size is not None and world_size % sp:
        raise ValueError(f"parallel.sp={sp} does not divide the world size {world_size}; "
                         f"valid sizes: {valid_sp_sizes(num_heads, world_size)}.")


class _AllToAll(torch.autograd.Function):
    """all-to-all over ``group``: split ``x`` along ``scatter_dim`` into ``sp`` chunks, send chunk i to rank i, and
    concatenate what arrives along ``gather_dim``. The backward is the same exchange with the dims swapped."""

    @staticmethod
    def forward(ctx, x, group, scatter_dim, gather_dim):
        ctx.group, ctx.dims = group, (scatter_dim, gather_dim)
        return _all_to_all(x, group, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad):
        scatter_dim, gather_dim = ctx.dims
        return _all_to_all(grad.contiguous(), ctx.group, gather_dim, scatter_dim), None, None, None


def _all_to_all(x, group, scatter_dim, gather_dim):
    sp = dist.get_world_size(group)
    send = torch.stack(x.chunk(sp, dim=scatter_dim)).contiguous()  # [sp, ...chunk]
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return torch.cat(recv.unbind(0), dim=gather_dim)


class _Gather(torch.autograd.Function):
    """all-gather of sequence shards along dim 1; backward sums the gradient over the group, keeps the own shard."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group, ctx.rank, ctx.n = group, dist.get_rank(group), x.shape[1]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad[:, ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n], None


class SequenceParallel:
    """The sequence-parallel group of this rank, and the length of the sequence currently being processed."""

    def __init__(self, group=None):
        self.group = group if group is not None else dist.group.WORLD
        self.size = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)
        self.seq_len = 0  # the unpadded length, set by shard()

    def padded_len(self, n: int) -> int:
        return math.ceil(n / self.size) * self.size

    def shard(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's contiguous shard of ``x`` along ``dim`` (padded with zeros at the end to a multiple of sp)."""
        n = x.shape[dim]
        pad = self.padded_len(n) - n
        if pad:
            shape = list(x.shape)
            shape[dim] = pad
            x = torch.cat([x, x.new_zeros(shape)], dim=dim)
        return x.chunk(self.size, dim=dim)[self.rank]

    def gather(self, x: torch.Tensor, seq_len: int) -> torch.Tensor:
        """The whole sequence ``[B, seq_len, ...]`` from every rank's shard ``[B, S/sp, ...]`` (autograd-aware)."""
        return _Gather.apply(x, self.group)[:, :seq_len]

    def seq_to_heads(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, S/sp, H, D]`` -> ``[B, S, H/sp, D]``."""
        return _AllToAll.apply(x, self.group, 2, 1)

    def heads_to_seq(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, S, H/sp, D]`` -> ``[B, S/sp, H, D]``."""
        return _AllToAll.apply(x, self.group, 1, 2)


def new_sp_group(sp: int):
    """This rank's sequence-parallel group: consecutive blocks of ``sp`` ranks (every rank must call this)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    mine = None
    for start in range(0, world, sp):
        group = dist.new_group(list(range(start, start + sp)))
        if start <= rank < start + sp:
            mine = group
    return mine
