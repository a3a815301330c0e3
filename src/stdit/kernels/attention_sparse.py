"""Block-sparse flash attention over 3D tiles of a video's token grid, forward and backward, in Triton.

A video's ``(t, h, w)`` token grid is cut into tiles of ``(tt, th, tw)`` tokens (a power of two, at least 16); the
tokens are reordered so that each tile's tokens are contiguous (:class:`TileLayout`). Each query tile then attends
to a list of key tiles (:class:`TileMask`): a sliding window of neighbouring tiles (:func:`sliding_tile_mask`, as
Sliding Tile Attention does, usable on a model trained dense) or any per-(batch, head, query tile) selection.
Attention inside the chosen tiles is exact; a key tile that is not listed gets no probability.

Tiles cut by the grid's edge hold fewer tokens; :class:`TileLayout` puts a tile's real tokens first, so a key tile is
its first ``n_valid`` rows and the kernels mask the rest like a tail block. The padding rows' outputs are dropped by
:meth:`TileLayout.untile`.

Kernels: a forward (online softmax in base 2, fp32 accumulators, logsumexp saved) that walks each query tile's key
list; a dK/dV pass that walks each key tile's query list (the transposed mask) and a dQ pass that walks the key list
again, so the backward has no atomics and is deterministic. The dense kernel is the special case "all tiles"; the
pure-torch twin (a masked dense softmax) is :mod:`stdit.kernels.attention_sparse_ref`.

This module imports nothing from ``stdit`` outside ``stdit.kernels``: the kernels can be used on their own.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_LOG2E = 1.4426950408889634
SUPPORTED_HEAD_DIMS = frozenset({32, 48, 64, 72, 80, 96, 128})


# --- token layout ---------------------------------------------------------------------------------------------


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class TileLayout:
    """The reorder of a ``(t, h, w)`` token grid into tiles of ``tile = (tt, th, tw)`` tokens.

    Tiles are numbered in ``(t, h, w)`` row-major order over the tile grid ``tiles = (ceil(t/tt), ceil(h/th),
    ceil(w/tw))``; within a tile, its tokens in the grid come first in row-major order, then padding.
    ``gather`` ``[num_tiles * tile_tokens]`` holds for each tiled position its token index in the grid, or
    ``t*h*w`` for padding; ``scatter`` ``[t*h*w]`` each token's tiled position; ``n_valid`` ``[num_tiles]`` int32
    each tile's token count.
    """

    grid: tuple[int, int, int]
    tile: tuple[int, int, int]
    tiles: tuple[int, int, int]
    gather: torch.Tensor
    scatter: torch.Tensor
    n_valid: torch.Tensor

    @classmethod
    def build(cls, grid, tile, device=None) -> "TileLayout":
        grid, tile = tuple(int(g) for g in grid), tuple(int(x) for x in tile)
        if len(grid) != 3 or len(tile) != 3 or min(grid) < 1 or min(tile) < 1:
            raise ValueError(f"grid and tile must be three positive sizes (t, h, w); got grid={grid}, tile={tile}.")
        n = tile[0] * tile[1] * tile[2]
        if n < 16 or n & (n - 1):
            raise ValueError(f"a tile must hold a power of two >= 16 tokens (the kernels' block); tile={tile} holds "
                             f"{n}. Try (4, 4, 4) = 64 or (2, 8, 8) = 128.")
        tiles = tuple(_cdiv(g, x) for g, x in zip(grid, tile))
        t, h, w = grid
        # every padded-grid position: its tile (row-major over tiles) and its offset inside the tile
        pos = torch.stack(torch.meshgrid(*(torch.arange(nt * x) for nt, x in zip(tiles, tile)), indexing="ij"), -1)
        pos = pos.reshape(-1, 3)
        tile_id = ((pos[:, 0] // tile[0]) * tiles[1] + pos[:, 1] // tile[1]) * tiles[2] + pos[:, 2] // tile[2]
        inner = ((pos[:, 0] % tile[0]) * tile[1] + pos[:, 1] % tile[1]) * tile[2] + pos[:, 2] % tile[2]
        real = (pos[:, 0] < t) & (pos[:, 1] < h) & (pos[:, 2] < w)
        token = torch.where(real, (pos[:, 0] * h + pos[:, 1]) * w + pos[:, 2], t * h * w)
        # sort by (tile, padding last, offset): a tile's real tokens first, in row-major order
        order = torch.argsort(tile_id * (2 * n) + (~real).long() * n + inner, stable=True)
        gather = token[order]
        num_tiles = tiles[0] * tiles[1] * tiles[2]
        n_valid = real.long().view(-1)[order].view(num_tiles, n).sum(1).to(torch.int32)
        scatter = torch.empty(t * h * w, dtype=torch.long)
        is_real = gather < t * h * w
        scatter[gather[is_real]] = torch.arange(num_tiles * n)[is_real]
        return cls(grid, tile, tiles, gather.to(device), scatter.to(device), n_valid.to(device))

    @property
    def tile_tokens(self) -> int:
        return self.tile[0] * self.tile[1] * self.tile[2]

    @property
    def num_tiles(self) -> int:
        return self.tiles[0] * self.tiles[1] * self.tiles[2]

    def to_tiles(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, t*h*w, ...]`` in grid order -> ``[B, num_tiles * tile_tokens, ...]`` in tile order (padding zero)."""
        if x.shape[1] != self.scatter.numel():
            raise ValueError(f"expected {self.scatter.numel()} tokens (grid {self.grid}); got {x.shape[1]}.")
        padded = torch.cat([x, x.new_zeros(x.shape[0], 1, *x.shape[2:])], 1)
        return padded.index_select(1, self.gather.to(x.device))

    def untile(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`to_tiles`: tile order -> grid order, padding rows dropped."""
        return x.index_select(1, self.scatter.to(x.device))


@dataclass(frozen=True)
class TileMask:
    """Which key tiles each query tile attends to, as index lists the kernels walk.

    ``kv_index`` ``[B, H, NQ, max_k]`` int32 (each row's first ``kv_count`` entries, ascending) and ``kv_count``
    ``[B, H, NQ]``; ``q_index`` / ``q_count`` the transpose (for each key tile, the query tiles that attend to it),
    which the dK/dV pass walks. B and H may be 1 for a mask shared by every batch row or head.
    """

    kv_index: torch.Tensor
    kv_count: torch.Tensor
    q_index: torch.Tensor
    q_count: torch.Tensor

    @staticmethod
    def _lists(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        count = mask.sum(-1)
        width = max(1, int(count.max()))
        # ascending tile indices of the True entries first: sort the keys (False -> after every index)
        n = mask.shape[-1]
        keyed = torch.where(mask, torch.arange(n, device=mask.device), n)
        index = keyed.sort(-1).values[..., :width].clamp(max=n - 1)
        return index.to(torch.int32).contiguous(), count.to(torch.int32).contiguous()

    @classmethod
    def from_dense(cls, mask: torch.Tensor) -> "TileMask":
        """From a boolean ``[B, H, NQ, NK]`` (or ``[NQ, NK]``) tile mask; each query tile needs at least one key
        tile."""
        if mask.dtype != torch.bool:
            raise ValueError(f"a tile mask is boolean; got {mask.dtype}.")
        while mask.dim() < 4:
            mask = mask.unsqueeze(0)
        if mask.dim() != 4:
            raise ValueError(f"a tile mask is [B, H, NQ, NK] or [NQ, NK]; got shape {tuple(mask.shape)}.")
        if not bool(mask.any(-1).all()):
            raise ValueError("every query tile must attend to at least one key tile; some rows of the mask are empty.")
        kv_index, kv_count = cls._lists(mask)
        q_index, q_count = cls._lists(mask.transpose(-1, -2))
        return cls(kv_index, kv_count, q_index, q_count)

    def dense(self, num_key_tiles: int | None = None) -> torch.Tensor:
        """The boolean ``[B, H, NQ, NK]`` mask these lists describe."""
        nk = num_key_tiles or self.q_count.shape[-1]
        live = torch.arange(self.kv_index.shape[-1], device=self.kv_index.device) < self.kv_count[..., None]
        out = torch.zeros(*self.kv_index.shape[:-1], nk, dtype=torch.int32, device=self.kv_index.device)
        # a row's unused entries repeat its last index: add them up instead of letting them overwrite it
        return out.scatter_add_(-1, self.kv_index.long(), live.int()) > 0

    def density(self) -> float:
        """The fraction of (query tile, key tile) pairs computed."""
        return float(self.kv_count.float().mean()) / self.q_count.shape[-1]


def sliding_tile_mask(layout: TileLayout, window: tuple[int, int, int], device=None) -> TileMask:
    """Each query tile attends to the ``window = (wt, wh, ww)`` tiles around it (Sliding Tile Attention).

    The window is centred on the query tile and shifted inwards at the grid's edges, so every query tile sees the
    same number of key tiles; a window as large as the tile grid along an axis is dense along it.
    """
    window = tuple(int(x) for x in window)
    if len(window) != 3 or min(window) < 1:
        raise ValueError(f"window must be three positive tile counts (t, h, w); got {window}.")
    axes = []
    for n, wdt in zip(layout.tiles, window):
        wdt = min(wdt, n)
        centre = torch.arange(n)
        start = (centre - wdt // 2).clamp(0, n - wdt)
        axes.append((centre[None, :] >= start[:, None]) & (centre[None, :] < start[:, None] + wdt))  # [q, k]
    m = axes[0][:, None, None, :, None, None] & axes[1][None, :, None, None, :, None] & axes[2][None, None, :, None,
                                                                                               None, :]
    return TileMask.from_dense(m.reshape(layout.num_tiles, layout.num_tiles).to(device))


def topk_tile_mask(q: torch.Tensor, k: torch.Tensor, layout: TileLayout, num_tiles: int) -> TileMask:
    """Each query tile attends to the ``num_tiles`` key tiles of highest pooled attention score, per batch row and
    head (Video Sparse Attention's coarse stage): q and k tile-ordered ``[B, S, H, D]``, mean-pooled over each tile's
    real tokens, scored ``q_pool . k_pool``. Not differentiable (a selection)."""
    b, s, h, d = q.shape
    n, tile = layout.num_tiles, layout.tile_tokens
    if not 1 <= num_tiles <= n:
        raise ValueError(f"num_tiles must be in [1, {n}] (the key tiles of this layout); got {num_tiles}.")
    count = layout.n_valid.to(q.device).float().view(1, n, 1, 1)
    with torch.no_grad():
        qp, kp = (x.detach().float().view(b, n, tile, h, d).sum(2) / count for x in (q, k))
        chosen = torch.einsum("bqhd,bkhd->bhqk", qp, kp).topk(num_tiles, dim=-1).indices
        dense = torch.zeros(b, h, n, n, dtype=torch.bool, device=q.device).scatter_(-1, chosen, True)
    return TileMask.from_dense(dense)


# --- kernels --------------------------------------------------------------------------------------------------


@triton.jit
def _rows(base, offs, offs_d, stride_s, D: tl.constexpr):
    return tl.load(base + offs[:, None] * stride_s + offs_d[None, :], mask=offs_d[None, :] < D, other=0.0)


@triton.jit
def _sparse_fwd(Q, K, V, O, LSE, KV_IDX, KV_CNT, NVALID,
                sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sob, sos, soh,
                sib, sih, siq, scb, sch, H, S, qk_scale,
                D: tl.constexpr, D_PAD: tl.constexpr, TILE: tl.constexpr, PREC: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    offs = tl.arange(0, TILE)
    offs_d = tl.arange(0, D_PAD)
    q = _rows(Q + b * sqb + h * sqh, pid_m * TILE + offs, offs_d, sqs, D)
    K += b * skb + h * skh
    V += b * svb + h * svh
    idx = KV_IDX + b * sib + h * sih + pid_m * siq
    count = tl.load(KV_CNT + b * scb + h * sch + pid_m)
    m_i = tl.full([TILE], -1.0e30, tl.float32)
    l_i = tl.zeros([TILE], tl.float32)
    acc = tl.zeros([TILE, D_PAD], tl.float32)
    for j in range(count):
        n = tl.load(idx + j)
        rows = n.to(tl.int64) * TILE + offs
        k = _rows(K, rows, offs_d, sks, D)
        # a tile cut by the grid's edge: its real tokens first, the padding rows get no probability
        valid = offs < tl.load(NVALID + n)
        s = tl.where(valid[None, :], tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale, -1.0e30)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _rows(V, rows, offs_d, svs, D)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PREC)
        m_i = m_new
    o = acc / l_i[:, None]
    out_rows = pid_m * TILE + offs
    tl.store(O + b * sob + h * soh + out_rows[:, None] * sos + offs_d[None, :], o.to(O.dtype.element_ty),
             mask=offs_d[None, :] < D)
    tl.store(LSE + pid_bh.to(tl.int64) * S + out_rows, m_i + tl.math.log2(l_i))


@triton.jit
def _sparse_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, Q_IDX, Q_CNT, NVALID,
                     sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sdb, sds, sdh, sgb, sgs, sgh,
                     sib, sih, siq, scb, sch, H, S, qk_scale, sm_scale,
                     D: tl.constexpr, D_PAD: tl.constexpr, TILE: tl.constexpr, PREC: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    offs = tl.arange(0, TILE)
    offs_d = tl.arange(0, D_PAD)
    rows_k = pid_n * TILE + offs
    k = _rows(K + b * skb + h * skh, rows_k, offs_d, sks, D)
    v = _rows(V + b * svb + h * svh, rows_k, offs_d, svs, D)
    valid = offs < tl.load(NVALID + pid_n)
    Q += b * sqb + h * sqh
    DO += b * sdb + h * sdh
    LSE += pid_bh.to(tl.int64) * S
    DELTA += pid_bh.to(tl.int64) * S
    idx = Q_IDX + b * sib + h * sih + pid_n * siq
    count = tl.load(Q_CNT + b * scb + h * sch + pid_n)
    dk = tl.zeros([TILE, D_PAD], tl.float32)
    dv = tl.zeros([TILE, D_PAD], tl.float32)
    for j in range(count):
        rows_q = tl.load(idx + j).to(tl.int64) * TILE + offs
        q = _rows(Q, rows_q, offs_d, sqs, D)
        do = _rows(DO, rows_q, offs_d, sds, D)
        lse = tl.load(LSE + rows_q)
        delta = tl.load(DELTA + rows_q)
        pt = tl.math.exp2(tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale - lse[None, :])
        pt = tl.where(valid[:, None], pt, 0.0)
        dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=PREC)
        dpt = tl.dot(v, tl.trans(do), input_precision=PREC)
        dst = (pt * (dpt - delta[None, :])).to(q.dtype)
        dk = tl.dot(dst, q, dk, input_precision=PREC)
    base = b * sgb + h * sgh + rows_k[:, None] * sgs + offs_d[None, :]
    tl.store(DK + base, (dk * sm_scale).to(DK.dtype.element_ty), mask=offs_d[None, :] < D)
    tl.store(DV + base, dv.to(DV.dtype.element_ty), mask=offs_d[None, :] < D)


@triton.jit
def _sparse_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, KV_IDX, KV_CNT, NVALID,
                   sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sdb, sds, sdh, sgb, sgs, sgh,
                   sib, sih, siq, scb, sch, H, S, qk_scale, sm_scale,
                   D: tl.constexpr, D_PAD: tl.constexpr, TILE: tl.constexpr, PREC: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    offs = tl.arange(0, TILE)
    offs_d = tl.arange(0, D_PAD)
    rows_q = pid_m * TILE + offs
    q = _rows(Q + b * sqb + h * sqh, rows_q, offs_d, sqs, D)
    do = _rows(DO + b * sdb + h * sdh, rows_q, offs_d, sds, D)
    lse = tl.load(LSE + pid_bh.to(tl.int64) * S + rows_q)
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * S + rows_q)
    K += b * skb + h * skh
    V += b * svb + h * svh
    idx = KV_IDX + b * sib + h * sih + pid_m * siq
    count = tl.load(KV_CNT + b * scb + h * sch + pid_m)
    dq = tl.zeros([TILE, D_PAD], tl.float32)
    for j in range(count):
        n = tl.load(idx + j)
        rows = n.to(tl.int64) * TILE + offs
        k = _rows(K, rows, offs_d, sks, D)
        v = _rows(V, rows, offs_d, svs, D)
        p = tl.math.exp2(tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale - lse[:, None])
        p = tl.where((offs < tl.load(NVALID + n))[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PREC)
    tl.store(DQ + b * sgb + h * sgh + rows_q[:, None] * sgs + offs_d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty),
             mask=offs_d[None, :] < D)


def _configs():
    if _INTERPRET:
        return [triton.Config({}, num_warps=4, num_stages=1)]
    return [triton.Config({}, num_warps=w, num_stages=s) for w, s in ((4, 2), (4, 3), (8, 2), (8, 3))]


_KEY = ["D", "TILE", "PREC"]
_FWD = triton.autotune(_configs(), key=_KEY)(_sparse_fwd)
_DKDV = triton.autotune(_configs(), key=_KEY)(_sparse_bwd_dkdv)
_DQ = triton.autotune(_configs(), key=_KEY)(_sparse_bwd_dq)


# --- host side ------------------------------------------------------------------------------------------------


def _check(q, k, v, kv_index, kv_count, n_valid) -> tuple[int, int]:
    """Returns ``(tile_tokens, num_tiles)``; raises one clear error for inputs the kernels would read wrongly."""
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must be [B, S, H, D] of one shape (self-attention over tiles); got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}.")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"q, k, v must share one dtype among fp16/bf16/fp32; got {q.dtype}, {k.dtype}, {v.dtype}.")
    b, s, h, d = q.shape
    if d not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head dim {d} is not supported; supported: {sorted(SUPPORTED_HEAD_DIMS)}.")
    num_tiles = n_valid.numel()
    if num_tiles == 0 or s % num_tiles or (s // num_tiles) & (s // num_tiles - 1) or s // num_tiles < 16:
        raise ValueError(f"{s} tokens do not split into {num_tiles} tiles of a power of two >= 16 tokens; reorder "
                         "them with TileLayout.to_tiles first.")
    nq = kv_count.shape[-1]
    if nq != num_tiles or kv_index.shape[:-1] != kv_count.shape or kv_count.dim() != 3:
        raise ValueError(f"the tile mask is for {nq} query tiles ({tuple(kv_index.shape)}, {tuple(kv_count.shape)}); "
                         f"the layout has {num_tiles}.")
    for name, t in (("kv_index", kv_index), ("kv_count", kv_count)):
        if t.shape[0] not in (1, b) or t.shape[1] not in (1, h):
            raise ValueError(f"{name} must have batch 1 or {b} and heads 1 or {h}; got {tuple(t.shape)}.")
    return s // num_tiles, num_tiles


def _bcast_strides(t: torch.Tensor) -> tuple[int, ...]:
    """Strides of an index tensor with its size-1 batch and head dims read as broadcast (stride 0)."""
    return tuple(0 if t.shape[i] == 1 else t.stride(i) for i in range(t.dim()))


def _prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _inner_contiguous(*ts: torch.Tensor) -> list[torch.Tensor]:
    return [t if t.stride(-1) == 1 else t.contiguous() for t in ts]


def tile_attention_forward(q, k, v, kv_index, kv_count, n_valid, scale: float | None = None):
    """Returns ``(o [B, S, H, D], lse [B, H, S] fp32, base 2)`` for tile-ordered q, k, v."""
    tile, num_tiles = _check(q, k, v, kv_index, kv_count, n_valid)
    q, k, v = _inner_contiguous(q, k, v)
    b, s, h, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    o = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(b, h, s, device=q.device, dtype=torch.float32)
    si, sc = _bcast_strides(kv_index), _bcast_strides(kv_count)
    _FWD[(num_tiles, b * h)](
        q, k, v, o, lse, kv_index, kv_count, n_valid,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
        si[0], si[1], si[2], sc[0], sc[1], h, s, scale * _LOG2E,
        D=d, D_PAD=max(16, 1 << (d - 1).bit_length()), TILE=tile, PREC=_prec(q.dtype))
    return o, lse


def tile_attention_backward(do, q, k, v, o, lse, kv_index, kv_count, q_index, q_count, n_valid,
                            scale: float | None = None):
    """Returns ``(dq, dk, dv)``, contiguous ``[B, S, H, D]`` in the inputs' dtype; deterministic (no atomics)."""
    tile, num_tiles = _check(q, k, v, kv_index, kv_count, n_valid)
    do, q, k, v = _inner_contiguous(do, q, k, v)
    b, s, h, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    # rowsum(dO * O), what the softmax's gradient subtracts; one elementwise pass, left to torch
    delta = (do.float() * o.float()).sum(-1).transpose(1, 2).contiguous()
    dq, dk, dv = (torch.empty(q.shape, device=q.device, dtype=q.dtype) for _ in range(3))
    common = dict(D=d, D_PAD=max(16, 1 << (d - 1).bit_length()), TILE=tile, PREC=_prec(q.dtype))
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
               dk.stride(0), dk.stride(1), dk.stride(2))
    si, sc = _bcast_strides(q_index), _bcast_strides(q_count)
    _DKDV[(num_tiles, b * h)](q, k, v, do, lse, delta, dk, dv, q_index, q_count, n_valid, *strides,
                              si[0], si[1], si[2], sc[0], sc[1], h, s, scale * _LOG2E, scale, **common)
    si, sc = _bcast_strides(kv_index), _bcast_strides(kv_count)
    _DQ[(num_tiles, b * h)](q, k, v, do, lse, delta, dq, kv_index, kv_count, n_valid, *strides,
                            si[0], si[1], si[2], sc[0], sc[1], h, s, scale * _LOG2E, scale, **common)
    return dq, dk, dv


# --- the op ---------------------------------------------------------------------------------------------------


@torch.library.custom_op("stdit::tile_attention_fwd", mutates_args=())
def _tile_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_index: torch.Tensor,
                        kv_count: torch.Tensor, q_index: torch.Tensor, q_count: torch.Tensor, n_valid: torch.Tensor,
                        scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return tile_attention_forward(q, k, v, kv_index, kv_count, n_valid, scale)


@_tile_attention_fwd.register_fake
def _(q, k, v, kv_index, kv_count, q_index, q_count, n_valid, scale):
    b, s, h, d = q.shape
    return q.new_empty(b, s, h, d), q.new_empty(b, h, s, dtype=torch.float32)


@torch.library.custom_op("stdit::tile_attention_bwd", mutates_args=())
def _tile_attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                        lse: torch.Tensor, kv_index: torch.Tensor, kv_count: torch.Tensor, q_index: torch.Tensor,
                        q_count: torch.Tensor, n_valid: torch.Tensor,
                        scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tile_attention_backward(do, q, k, v, o, lse, kv_index, kv_count, q_index, q_count, n_valid, scale)


@_tile_attention_bwd.register_fake
def _(do, q, k, v, o, lse, kv_index, kv_count, q_index, q_count, n_valid, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup(ctx, inputs, output):
    q, k, v, kv_index, kv_count, q_index, q_count, n_valid, scale = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], kv_index, kv_count, q_index, q_count, n_valid)
    ctx.scale = scale


def _backward(ctx, do, dlse):
    q, k, v, o, lse, kv_index, kv_count, q_index, q_count, n_valid = ctx.saved_tensors
    dq, dk, dv = _tile_attention_bwd(do, q, k, v, o, lse, kv_index, kv_count, q_index, q_count, n_valid, ctx.scale)
    return dq, dk, dv, None, None, None, None, None, None


_tile_attention_fwd.register_autograd(_backward, setup_context=_setup)


def tile_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: TileMask, layout: TileLayout,
                   scale: float | None = None) -> torch.Tensor:
    """Block-sparse attention over tile-ordered ``[B, S, H, D]`` q, k, v (``S = layout.num_tiles *
    layout.tile_tokens``, see :meth:`TileLayout.to_tiles`): each query tile attends to the key tiles ``mask``
    lists for it. ``scale`` defaults to ``1/sqrt(D)``. Differentiable in q, k and v; a custom op, so
    ``torch.compile`` traces it."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    dev = q.device
    return _tile_attention_fwd(q, k, v, mask.kv_index.to(dev), mask.kv_count.to(dev), mask.q_index.to(dev),
                               mask.q_count.to(dev), layout.n_valid.to(dev), scale)[0]
