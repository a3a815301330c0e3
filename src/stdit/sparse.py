"""Sliding-tile attention in StDiT: which blocks and which timesteps attend over windows of 3D tiles.

A runtime choice, like the attention backend (never stored in the Hub config): ``model.set_tile_attention(
TileAttention(tile=(4, 4, 4), window=(3, 3, 3)))`` makes the chosen blocks' self-attention attend, for each tile of
query tokens, only to the ``window`` of key tiles around it (Sliding Tile Attention), or with ``select="topk"`` to
the key tiles of highest mean-pooled attention score (Video Sparse Attention's selection). Dense attention is kept for
the noisiest steps above ``max_timestep`` (where a video's layout is decided, and where sparse attention on a model
trained dense costs the most quality), and for blocks not in ``layers``.

On CUDA it runs the block-sparse Triton kernels of :mod:`stdit.kernels.attention_sparse` (at the head dims they
take); elsewhere torch SDPA with the same mask expanded to tokens (the same math, for CPU training and tests). Under Ulysses sequence
parallelism each rank holds every token of its heads, so the tiles stay whole on a rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stdit.kernels.attention_sparse import (SUPPORTED_HEAD_DIMS, TileLayout, TileMask, sliding_tile_mask,
                                            tile_attention, topk_tile_mask)

SELECTIONS = ("window", "topk")


def _triple(name: str, value) -> tuple[int, int, int]:
    try:
        out = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        out = ()
    if len(out) != 3 or min(out) < 1 or any(float(a) != b for a, b in zip(value, out)):
        raise ValueError(f"TileAttention.{name} must be three positive ints (t, h, w); got {value!r}.")
    return out


@dataclass(frozen=True)
class TileAttention:
    """Sliding-tile self-attention settings.

    Args:
        tile: tokens per tile along (t, h, w), in latent tokens after patchify; their product is the kernels' block
            (a power of two >= 16: 64 or 128 on a GPU).
        window: with ``select="window"``, the key tiles around each query tile along (t, h, w); a window as large
            as the tile grid is dense along that axis.
        select: ``"window"`` (Sliding Tile Attention: a fixed neighbourhood, the same for every head) or ``"topk"``
            (Video Sparse Attention's selection: per batch row, head and query tile, the key tiles of highest
            mean-pooled attention score, chosen again at every call).
        keep: with ``select="topk"``, the fraction of key tiles each query tile attends to (at least one).
        layers: the block indices that use it (None: every block).
        max_timestep: the largest timestep (0..1000) that uses it; calls at noisier timesteps attend densely.
    """

    tile: tuple[int, int, int] = (4, 4, 4)
    window: tuple[int, int, int] = (3, 3, 3)
    layers: tuple[int, ...] | None = None
    max_timestep: float = 1000.0
    select: str = "window"
    keep: float = 0.125

    def __post_init__(self):
        object.__setattr__(self, "tile", _triple("tile", self.tile))
        object.__setattr__(self, "window", _triple("window", self.window))
        n = self.tile[0] * self.tile[1] * self.tile[2]
        if n < 16 or n & (n - 1):
            raise ValueError(f"TileAttention.tile={self.tile} holds {n} tokens; a tile must hold a power of two >= 16 "
                             "(the kernels' block), e.g. (4, 4, 4) = 64 or (2, 8, 8) = 128.")
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))
        if self.select not in SELECTIONS:
            raise ValueError(f"TileAttention.select={self.select!r}; choose one of {SELECTIONS}.")
        if not 0 < float(self.keep) <= 1:
            raise ValueError(f"TileAttention.keep must be in (0, 1] (a fraction of the key tiles); got {self.keep}.")
        if not 0 <= float(self.max_timestep) <= 1000:
            raise ValueError(f"TileAttention.max_timestep must be in [0, 1000]; got {self.max_timestep}.")

    def density(self, grid: tuple[int, int, int]) -> float:
        """The fraction of (query tile, key tile) pairs computed on a ``(t, h, w)`` token grid."""
        layout, mask, _ = _plan(self, tuple(grid), torch.device("cpu"))
        return mask.density() if self.select == "window" else self.key_tiles(layout) / layout.num_tiles

    def key_tiles(self, layout: TileLayout) -> int:
        """How many key tiles a query tile attends to with ``select="topk"``."""
        return max(1, min(layout.num_tiles, round(self.keep * layout.num_tiles)))


class TileSwitch:
    """Shared by the attention layers of one model: whether the current call uses tile attention (set by
    ``StDiT.forward`` from the call's timestep)."""

    def __init__(self, config: TileAttention):
        self.config = config
        self.active = True


_PLANS: dict = {}


def _plan(config: TileAttention, grid: tuple[int, int, int], device: torch.device):
    """The layout, the kernels' mask and the token-level mask for one grid, built once per (config, grid, device)."""
    key = (config.tile, config.window, grid, str(device))
    plan = _PLANS.get(key)
    if plan is None:
        layout = TileLayout.build(grid, config.tile, device=device)
        mask = sliding_tile_mask(layout, config.window, device=device)
        if len(_PLANS) > 64:
            _PLANS.clear()
        plan = _PLANS[key] = (layout, mask, {})
    return plan


def _token_mask(layout: TileLayout, mask: TileMask) -> torch.Tensor:
    """``[B|1, H|1, S, S]`` bool over the tile-ordered tokens (the listed key tiles' real tokens), for SDPA."""
    tile_of = torch.arange(layout.num_tiles * layout.tile_tokens, device=layout.n_valid.device)
    tile_of = tile_of // layout.tile_tokens
    inner = torch.arange(layout.tile_tokens, device=tile_of.device).repeat(layout.num_tiles)
    real = inner < layout.n_valid.long()[tile_of]
    return mask.dense(layout.num_tiles)[..., tile_of[:, None], tile_of[None, :]] & real


def tile_self_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, int, int],
                        config: TileAttention) -> torch.Tensor:
    """Sliding-tile attention over ``[B, t*h*w, H, D]`` q, k, v in grid order; returns the same layout."""
    layout, mask, cache = _plan(config, tuple(int(g) for g in grid), q.device)
    qt, kt, vt = (layout.to_tiles(x) for x in (q, k, v))
    if config.select == "topk":
        mask = topk_tile_mask(qt, kt, layout, config.key_tiles(layout))
    if q.is_cuda and q.shape[-1] in SUPPORTED_HEAD_DIMS:
        out = tile_attention(qt, kt, vt, mask, layout)
    else:
        if config.select == "topk":
            allowed = _token_mask(layout, mask)
        else:
            allowed = cache.get("tokens")
            if allowed is None:
                allowed = cache["tokens"] = _token_mask(layout, mask)
        out = torch.nn.functional.scaled_dot_product_attention(
            qt.transpose(1, 2), kt.transpose(1, 2), vt.transpose(1, 2), attn_mask=allowed).transpose(1, 2)
    return layout.untile(out)
