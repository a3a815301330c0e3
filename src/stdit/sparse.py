"""Sliding-tile attention in StDiT: which blocks and which timesteps attend over windows of 3D tiles.

A runtime choice, like the attention backend (never stored in the Hub config): ``model.set_tile_attention(
TileAttention(tile=(4, 4, 4), window=(3, 3, 3)))`` makes the chosen blocks' self-attention attend, for each tile of
query tokens, only to the ``window`` of key tiles around it (Sliding Tile Attention). Dense attention is kept for
the noisiest steps above ``max_timestep`` (where a video's layout is decided, and where sparse attention on a model
trained dense costs the most quality), and for blocks not in ``layers``.

On CUDA it runs the block-sparse Triton kernels of :mod:`stdit.kernels.attention_sparse`; elsewhere torch SDPA
with the same mask expanded to tokens (the same math, for CPU training and tests). Under Ulysses sequence
parallelism each rank holds every token of its heads, so the tiles stay whole on a rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stdit.kernels.attention_sparse import TileLayout, TileMask, sliding_tile_mask, tile_attention


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
        window: key tiles around each query tile along (t, h, w); a window as large as the tile grid is dense
            along that axis.
        layers: the block indices that use it (None: every block).
        max_timestep: the largest timestep (0..1000) that uses it; calls at noisier timesteps attend densely.
    """

    tile: tuple[int, int, int] = (4, 4, 4)
    window: tuple[int, int, int] = (3, 3, 3)
    layers: tuple[int, ...] | None = None
    max_timestep: float = 1000.0

    def __post_init__(self):
        object.__setattr__(self, "tile", _triple("tile", self.tile))
        object.__setattr__(self, "window", _triple("window", self.window))
        n = self.tile[0] * self.tile[1] * self.tile[2]
        if n < 16 or n & (n - 1):
            raise ValueError(f"TileAttention.tile={self.tile} holds {n} tokens; a tile must hold a power of two >= 16 "
                             "(the kernels' block), e.g. (4, 4, 4) = 64 or (2, 8, 8) = 128.")
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))
        if not 0 <= float(self.max_timestep) <= 1000:
            raise ValueError(f"TileAttention.max_timestep must be in [0, 1000]; got {self.max_timestep}.")

    def density(self, grid: tuple[int, int, int]) -> float:
        """The fraction of (query tile, key tile) pairs computed on a ``(t, h, w)`` token grid."""
        return _plan(self, tuple(grid), torch.device("cpu"))[1].density()


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


def _token_mask(layout: TileLayout, mask: TileMask, cache: dict) -> torch.Tensor:
    """``[S, S]`` bool over the tile-ordered tokens (query tile's window, real keys only), for SDPA."""
    if "tokens" not in cache:
        tile_of = torch.arange(layout.num_tiles * layout.tile_tokens, device=layout.n_valid.device)
        tile_of = tile_of // layout.tile_tokens
        inner = torch.arange(layout.tile_tokens, device=tile_of.device).repeat(layout.num_tiles)
        real = inner < layout.n_valid.long()[tile_of]
        cache["tokens"] = mask.dense(layout.num_tiles)[0, 0][tile_of[:, None], tile_of[None, :]] & real[None, :]
    return cache["tokens"]


def tile_self_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, int, int],
                        config: TileAttention) -> torch.Tensor:
    """Sliding-tile attention over ``[B, t*h*w, H, D]`` q, k, v in grid order; returns the same layout."""
    layout, mask, cache = _plan(config, tuple(int(g) for g in grid), q.device)
    qt, kt, vt = (layout.to_tiles(x) for x in (q, k, v))
    if q.is_cuda:
        out = tile_attention(qt, kt, vt, mask, layout)
    else:
        allowed = _token_mask(layout, mask, cache)
        out = torch.nn.functional.scaled_dot_product_attention(
            qt.transpose(1, 2), kt.transpose(1, 2), vt.transpose(1, 2), attn_mask=allowed).transpose(1, 2)
    return layout.untile(out)
