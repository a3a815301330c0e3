"""Pure-torch twin of :mod:`stdit.kernels.qk_norm_rope`: RMSNorm across heads, then interleaved RoPE."""

from __future__ import annotations

import torch


def norm_rope_ref(x: torch.Tensor, weight: torch.Tensor | None, eps: float, cos: torch.Tensor | None,
                  sin: torch.Tensor | None, num_heads: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One of q, k: ``[B, S, H*D]`` -> ``[B, S, H, D]`` in ``dtype``; ``cos``/``sin`` ``[S, D/2]`` or None (no
    rotation)."""
    x = x.to(dtype)
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(dtype)
    if cos is None:
        return y.unflatten(-1, (num_heads, -1))
    a, b = y.unflatten(-1, (num_heads, -1, 2)).unbind(-1)
    c, s = cos.to(dtype)[None, :, None, :], sin.to(dtype)[None, :, None, :]
    return torch.stack((a * c - b * s, a * s + b * c), dim=-1).flatten(-2)


def qk_norm_rope_ref(q: torch.Tensor, k: torch.Tensor, weight_q: torch.Tensor | None, weight_k: torch.Tensor | None,
                     eps: float, cos: torch.Tensor, sin: torch.Tensor, num_heads: int,
                     dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k ``[B, S, H*D]`` -> ``[B, S, H, D]`` each, computed and returned in ``dtype``."""
    return (norm_rope_ref(q, weight_q, eps, cos, sin, num_heads, dtype),
            norm_rope_ref(k, weight_k, eps, cos, sin, num_heads, dtype))
