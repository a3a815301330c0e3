"""3D rotary position embedding (RoPE) for spatiotemporal tokens.

The head dim ``D`` is split into three even parts, one per axis (t, h, w). Each part rotates interleaved
pairs ``(x[2i], x[2i+1])`` by ``pos_axis * theta^(-2i/d_axis)``. Tables are built for whatever (T, H, W) grid
comes in, so any resolution, duration and aspect ratio works without a learned position table.

Default split (Wan's rule): ``h = w = 2 * (D // 6)``, ``t = D - h - w`` -> 44/42/42 for D = 128.
"""

from __future__ import annotations

import torch
from torch import nn

from stdit.checks import as_int


def axis_split(head_dim: int, split: tuple[int, int, int] | list[int] | None = None) -> tuple[int, int, int]:
    """The (t, h, w) share of the head dim; ``split`` overrides Wan's rule and must be even and sum to D."""
    d = as_int(head_dim)
    if d is None or d < 2 or d % 2:
        # RoPE rotates pairs, so the head dim and each axis share must be even (Wan's rule gives an odd t share for
        # an odd head dim).
        near = f" (nearest: {d - 1} or {d + 1})" if d is not None and d > 2 else ""
        raise ValueError(f"attention_head_dim={head_dim!r} cannot be split into three even (t, h, w) RoPE shares: "
                         f"it must be an even int >= 2{near}.")
    if split is None:
        hw = 2 * (d // 6)
        split = (d - 2 * hw, hw, hw)
    parts = tuple(as_int(s) for s in split) if isinstance(split, (tuple, list)) else (None,)
    if len(parts) != 3 or None in parts or sum(parts) != d or any(s < 0 or s % 2 for s in parts):
        raise ValueError(
            f"rope_axes_dim={list(split) if isinstance(split, (tuple, list)) else split!r} must be three even "
            f"numbers summing to the head dim {d} (for example {list(axis_split(d))})."
        )
    return parts  # type: ignore[return-value]


def axis_angles(dim: int, length: int, theta: float) -> torch.Tensor:
    """Angles ``[length, dim // 2]`` in float64 for positions 0..length-1 of one axis."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64)[: dim // 2] / dim))
    return torch.outer(torch.arange(length, dtype=torch.float64), inv_freq)


class RotaryEmbedding3D(nn.Module):
    """Builds ``(cos, sin)`` tables ``[T*H*W, D/2]`` (fp32, tokens in (t, h, w) row-major order).

    Holds no parameters or persistent buffers; tables are cached per grid and device.
    """

    def __init__(self, head_dim: int, axes_dim: tuple[int, int, int] | None = None, theta: float = 10000.0):
        super().__init__()
        self.head_dim = head_dim
        self.axes_dim = axis_split(head_dim, axes_dim)
        self.theta = float(theta)
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def forward(self, grid: tuple[int, int, int], device: torch.device | str | None = None):
        compiling = torch.compiler.is_compiling()
        key = (tuple(grid), str(device))
        # Under torch.compile the tables are built in the graph from the static grid: reading the cache would make
        # Dynamo guard on the dict's contents, which the first call changes, and recompile on the second call.
        hit = None if compiling else self._cache.get(key)
        if hit is not None:
            return hit
        t, h, w = grid
        at, ah, aw = (axis_angles(d, n, self.theta) for d, n in zip(self.axes_dim, (t, h, w)))
        angles = torch.cat(
            [
                at[:, None, None, :].expand(t, h, w, -1),
                ah[None, :, None, :].expand(t, h, w, -1),
                aw[None, None, :, :].expand(t, h, w, -1),
            ],
            dim=-1,
        ).reshape(t * h * w, self.head_dim // 2)
        tables = (angles.cos().float().to(device), angles.sin().float().to(device))
        if compiling:
            return tables
        if len(self._cache) > 16:
            self._cache.clear()
        self._cache[key] = tables
        return tables


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of ``x`` ``[B, S, H, D]`` by tables ``[S, D/2]``; math in fp32, result in x's dtype."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2).to(x.dtype)
