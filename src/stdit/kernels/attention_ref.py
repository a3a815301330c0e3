"""Pure-torch twin of :mod:`stdit.kernels.attention`: the same function, written for reading, in fp32 or fp64."""

from __future__ import annotations

import math

import torch


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None = None,
                  scale: float | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q ``[B, Sq, H, D]``, k/v ``[B, Sk, H, D]``, mask ``[B, Sk]`` (True = attend) -> ``[B, Sq, H, D]`` in ``dtype``.

    A query whose keys are all masked outputs zeros.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = torch.einsum("bqhd,bkhd->bhqk", q.to(dtype), k.to(dtype)) * scale
    if key_padding_mask is not None:
        s = s.masked_fill(~key_padding_mask[:, None, None, :].bool(), float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return torch.einsum("bhqk,bkhd->bqhd", p, v.to(dtype))
