"""Pure-torch twin of :mod:`stdit.kernels.attention_sparse`: the same block-sparse attention as a masked dense
softmax, written for reading, in fp32 or fp64."""

from __future__ import annotations

import math

import torch


def tile_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tile_mask: torch.Tensor,
                       n_valid: torch.Tensor, scale: float | None = None,
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Tile-ordered q, k, v ``[B, S, H, D]``; ``tile_mask`` bool ``[B|1, H|1, NQ, NK]`` (query tile i attends to
    key tile j); ``n_valid`` ``[NK]`` the real tokens at the start of each tile. Returns ``[B, S, H, D]`` in ``dtype``.
    """
    b, s, h, d = q.shape
    num_tiles = n_valid.numel()
    tile = s // num_tiles
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    tile_of = torch.arange(s, device=q.device) // tile
    real_key = (torch.arange(s, device=q.device) % tile) < n_valid.to(q.device).long()[tile_of]
    allowed = tile_mask.to(q.device)[..., tile_of[:, None], tile_of[None, :]] & real_key
    scores = torch.einsum("bqhd,bkhd->bhqk", q.to(dtype), k.to(dtype)) * scale
    p = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    return torch.einsum("bhqk,bkhd->bqhd", p, v.to(dtype))
