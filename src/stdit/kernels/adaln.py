"""Fused adaLN chain: gated residual + LayerNorm + modulation, forward and backward, in one pass each.

Computes, per token row of ``x [B, S, D]``::

    h   = x + gate * y          (fp32 math, rounded to x's dtype; gate None -> x + y; no y -> h = x)
    out = (LN(h) * weight + bias) * (1 + scale) + shift     (fp32 math, cast to x's dtype)

with ``gate``, ``shift``, ``scale`` per-sample vectors (broadcast as ``[B, 1, D]``) and ``weight``/``bias``
the optional LayerNorm affine ``[D]``; every one of them may be absent. The plain-PyTorch twin is
``stdit.ops.norm_modulate_torch`` / ``stdit.ops.add_norm_modulate_torch``; ``stdit.ops`` dispatches here
for CUDA tensors.

Layout of the work: one program owns a contiguous run of rows of one sample and walks it in tiles of
``[BLOCK_M, BLOCK_D]`` (whole rows, so the LayerNorm statistics stay in registers). Because every row of a
program shares one sample, the backward reduces ``d gate``, ``d shift``, ``d scale`` (and ``d weight``,
``d bias``) over its rows in registers and writes one fp32 partial sum per program; one small torch ``sum``
finishes them. For wide rows (D > 4096, e.g. 5120 padded to 8192 lanes) a whole row plus those accumulators
does not fit in registers, so the backward splits: a light kernel takes the two row sums of the LayerNorm
backward, then the main kernel runs over blocks of D. Bytes per element of activation (bf16, Wan's
``x + gate*y -> LN -> modulate``): forward reads x, y and writes h, out; backward reads d out, d h, h, y and
writes d x, d y (the split form reads d out and h twice).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from ._compat import interpreter_wraps_language
from ._device import num_sms
from ._launch import cdiv as _cdiv
from ._launch import launch
from ._launch import next_pow2 as _pow2


@triton.jit
def _add(a, b):
    return a + b


# tl.sum is a jit function of triton's own, decorated when triton is imported. If triton was imported before
# TRITON_INTERPRET=1 was set, the interpreter cannot call it; a reduction with our own combine function still
# runs there (ten times slower, so only then).
_OWN_REDUCE = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1" and not interpreter_wraps_language())


@triton.jit
def _rsum(x, axis):
    if _OWN_REDUCE:
        return tl.reduce(x, axis, _add)
    else:
        return tl.sum(x, axis)


@triton.jit
def _adaln_fwd_kernel(
    X, Y, GATE, SHIFT, SCALE, W, BIAS,  # inputs; vectors are fp32 [B, D] (W, BIAS [D])
    H, OUT, MEAN, RSTD,  # outputs: h [B*S, D] (if HAS_Y), out [B*S, D], mean/rstd fp32 [B*S]
    S, D, rows_per_prog, eps,
    HAS_Y: tl.constexpr, HAS_GATE: tl.constexpr, NORM: tl.constexpr, HAS_SHIFT: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_W: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    b = tl.program_id(1)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    vec = b * D + cols
    start = pid * rows_per_prog
    end = tl.minimum(start + rows_per_prog, S)
    for r in range(start, end, BLOCK_M):
        rows = r + tl.arange(0, BLOCK_M)
        rmask = rows < end
        mask = rmask[:, None] & cmask[None, :]
        grow = b.to(tl.int64) * S + rows
        offs = grow[:, None] * D + cols[None, :]
        h = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        # The per-sample vectors are re-read (from L1) every tile rather than held across the loop: holding
        # them costs registers that a D = 5120 row needs.
        if HAS_Y:
            y = tl.load(Y + offs, mask=mask, other=0.0).to(tl.float32)
            if HAS_GATE:
                h = h + y * tl.load(GATE + vec, mask=cmask, other=0.0)[None, :]
            else:
                h = h + y
            # The norm reads h as stored (rounded), exactly like the unfused path.
            h = h.to(H.dtype.element_ty)
            tl.store(H + offs, h, mask=mask)
            h = h.to(tl.float32)
        if NORM:
            mean = _rsum(h, axis=1) / D
            hc = tl.where(mask, h - mean[:, None], 0.0)
            var = _rsum(hc * hc, axis=1) / D
            rstd = 1.0 / tl.sqrt(var + eps)
            n = hc * rstd[:, None]
            if HAS_W:
                n = n * tl.load(W + cols, mask=cmask, other=0.0)[None, :]
            if HAS_BIAS:
                n = n + tl.load(BIAS + cols, mask=cmask, other=0.0)[None, :]
            if HAS_SCALE:
                n = n * (1.0 + tl.load(SCALE + vec, mask=cmask, other=0.0)[None, :])
            if HAS_SHIFT:
                n = n + tl.load(SHIFT + vec, mask=cmask, other=0.0)[None, :]
            tl.store(OUT + offs, n.to(OUT.dtype.element_ty), mask=mask)
            tl.store(MEAN + grow, mean, mask=rmask)
            tl.store(RSTD + grow, rstd, mask=rmask)


@triton.jit
def _dnorm(G, H, SCALE, W, MEAN, RSTD, offs, mask, grow, rmask, vec, cols, cmask,
           HAS_SCALE: tl.constexpr, HAS_W: tl.constexpr):
    """Load a tile of d out and h; return (g, xhat, dxhat, rstd): dxhat is g pulled back through the modulation
    and the affine, the grad of the normalized row."""
    mean = tl.load(MEAN + grow, mask=rmask, other=0.0)
    rstd = tl.load(RSTD + grow, mask=rmask, other=0.0)
    h = tl.load(H + offs, mask=mask, other=0.0).to(tl.float32)
    xhat = tl.where(mask, (h - mean[:, None]) * rstd[:, None], 0.0)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    dxhat = g
    if HAS_SCALE:
        dxhat = dxhat * (1.0 + tl.load(SCALE + vec, mask=cmask, other=0.0)[None, :])
    if HAS_W:
        dxhat = dxhat * tl.load(W + cols, mask=cmask, other=0.0)[None, :]
    return g, xhat, dxhat, rstd


@triton.jit
def _acc_init(BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, ACC_ROWS: tl.constexpr):
    if ACC_ROWS:
        return tl.full((BLOCK_M, BLOCK_D), 0.0, tl.float32)
    else:
        return tl.full((BLOCK_D,), 0.0, tl.float32)


@triton.jit
def _acc_add(acc, x, ACC_ROWS: tl.constexpr):
    if ACC_ROWS:
        return acc + x
    else:
        return acc + _rsum(x, axis=0)


@triton.jit
def _acc_sum(acc, ACC_ROWS: tl.constexpr):
    if ACC_ROWS:
        return _rsum(acc, axis=0)
    else:
        return acc


@triton.jit
def _adaln_bwd_stats_kernel(
    DOUT, H, SCALE, W, MEAN, RSTD, C1, C2,  # C1, C2: fp32 [B*S], the row means of dxhat and dxhat * xhat
    S, D, rows_per_prog,
    HAS_SCALE: tl.constexpr, HAS_W: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    b = tl.program_id(1)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    vec = b * D + cols
    start = pid * rows_per_prog
    end = tl.minimum(start + rows_per_prog, S)
    for r in range(start, end, BLOCK_M):
        rows = r + tl.arange(0, BLOCK_M)
        rmask = rows < end
        mask = rmask[:, None] & cmask[None, :]
        grow = b.to(tl.int64) * S + rows
        offs = grow[:, None] * D + cols[None, :]
        g, xhat, dxhat, rstd = _dnorm(DOUT, H, SCALE, W, MEAN, RSTD, offs, mask, grow, rmask, vec, cols, cmask,
                                      HAS_SCALE, HAS_W)
        tl.store(C1 + grow, _rsum(dxhat, axis=1) / D, mask=rmask)
        tl.store(C2 + grow, _rsum(dxhat * xhat, axis=1) / D, mask=rmask)


@triton.jit
def _adaln_bwd_kernel(
    DOUT, DHX, H, Y, GATE, SCALE, W, BIAS, MEAN, RSTD, C1, C2,  # DHX: grad reaching h from elsewhere
    DX, DY,  # grads of x (written only with NORM: else it is DHX itself) and y (only with HAS_GATE)
    PGATE, PSHIFT, PSCALE, PW, PBIAS,  # fp32 partial sums [B, P, D], one row per program
    S, D, rows_per_prog, P,
    NORM: tl.constexpr, STATS_IN: tl.constexpr, HAS_DHX: tl.constexpr, HAS_GATE: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_W: tl.constexpr, HAS_BIAS: tl.constexpr,
    D_GATE: tl.constexpr, D_SHIFT: tl.constexpr, D_SCALE: tl.constexpr, D_W: tl.constexpr,
    D_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, ACC_ROWS: tl.constexpr,
):
    """ACC_ROWS: the column sums (for the gate, shift, scale and affine grads) are kept per tile row and reduced
    once at the end ([BLOCK_M, BLOCK_D] registers: the split form's narrow tiles); without it each tile's rows are
    reduced as it goes ([BLOCK_D]: whole-row tiles of several rows then fit).

    Without STATS_IN a tile spans whole rows and the row sums are taken here; with it (wide rows, where a
    whole row and the accumulators do not fit in registers) the grid's third axis splits D into blocks and the
    row sums come from the stats kernel."""
    pid = tl.program_id(0)
    b = tl.program_id(1)
    cols = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    vec = b * D + cols
    acc_gate = _acc_init(BLOCK_M, BLOCK_D, ACC_ROWS)
    acc_shift = _acc_init(BLOCK_M, BLOCK_D, ACC_ROWS)
    acc_scale = _acc_init(BLOCK_M, BLOCK_D, ACC_ROWS)
    acc_w = _acc_init(BLOCK_M, BLOCK_D, ACC_ROWS)
    acc_bias = _acc_init(BLOCK_M, BLOCK_D, ACC_ROWS)

    start = pid * rows_per_prog
    end = tl.minimum(start + rows_per_prog, S)
    for r in range(start, end, BLOCK_M):
        rows = r + tl.arange(0, BLOCK_M)
        rmask = rows < end
        mask = rmask[:, None] & cmask[None, :]
        grow = b.to(tl.int64) * S + rows
        offs = grow[:, None] * D + cols[None, :]
        dh = tl.full((BLOCK_M, BLOCK_D), 0.0, tl.float32)
        if NORM:
            g, xhat, dxhat, rstd = _dnorm(DOUT, H, SCALE, W, MEAN, RSTD, offs, mask, grow, rmask, vec, cols, cmask,
                                          HAS_SCALE, HAS_W)
            if D_SHIFT:
                acc_shift = _acc_add(acc_shift, g, ACC_ROWS)
            if D_SCALE:
                n = xhat
                if HAS_W:
                    n = n * tl.load(W + cols, mask=cmask, other=0.0)[None, :]
                if HAS_BIAS:
                    n = n + tl.load(BIAS + cols, mask=cmask, other=0.0)[None, :]
                acc_scale = _acc_add(acc_scale, g * n, ACC_ROWS)
            if D_W or D_BIAS:
                dn = g
                if HAS_SCALE:
                    dn = dn * (1.0 + tl.load(SCALE + vec, mask=cmask, other=0.0)[None, :])
                if D_BIAS:
                    acc_bias = _acc_add(acc_bias, dn, ACC_ROWS)
                if D_W:
                    acc_w = _acc_add(acc_w, dn * xhat, ACC_ROWS)
            if STATS_IN:
                c1 = tl.load(C1 + grow, mask=rmask, other=0.0)
                c2 = tl.load(C2 + grow, mask=rmask, other=0.0)
            else:
                c1 = _rsum(dxhat, axis=1) / D
                c2 = _rsum(dxhat * xhat, axis=1) / D
            dh = (dxhat - c1[:, None] - xhat * c2[:, None]) * rstd[:, None]
        if HAS_DHX:
            dh += tl.load(DHX + offs, mask=mask, other=0.0).to(tl.float32)
        if NORM:
            tl.store(DX + offs, dh.to(DX.dtype.element_ty), mask=mask)
        if HAS_GATE:
            if D_GATE:
                y = tl.load(Y + offs, mask=mask, other=0.0).to(tl.float32)
                acc_gate = _acc_add(acc_gate, dh * y, ACC_ROWS)
            gate = tl.load(GATE + vec, mask=cmask, other=0.0)[None, :]
            tl.store(DY + offs, (dh * gate).to(DY.dtype.element_ty), mask=mask)

    part = (b * P + pid) * D + cols
    if D_GATE:
        tl.store(PGATE + part, _acc_sum(acc_gate, ACC_ROWS), mask=cmask)
    if D_SHIFT:
        tl.store(PSHIFT + part, _acc_sum(acc_shift, ACC_ROWS), mask=cmask)
    if D_SCALE:
        tl.store(PSCALE + part, _acc_sum(acc_scale, ACC_ROWS), mask=cmask)
    if D_W:
        tl.store(PW + part, _acc_sum(acc_w, ACC_ROWS), mask=cmask)
    if D_BIAS:
        tl.store(PBIAS + part, _acc_sum(acc_bias, ACC_ROWS), mask=cmask)


# ----------------------------------------------------------------------------------------------- launch

MAX_D = 16384
# Rows wider than this take the split backward: the whole-row kernel spills registers at D = 5120 (8192
# padded lanes, three accumulators), so the row sums come from a light stats kernel and D is blocked.
SPLIT_BLOCK_D = 4096


@functools.lru_cache(maxsize=1024)
def _config(B, S, block_d, device, tile, num_warps=None, d_blocks=1, per_thread=8):
    """Rows per tile, warps, rows per program and programs per sample for tiles of ``block_d`` columns;
    ``tile`` is the elements per tile aimed for, ``per_thread`` the elements each thread holds per tensor."""
    block_m = max(1, min(tile // block_d, _pow2(S)))
    if num_warps is None:
        num_warps = max(1, min(32, block_m * block_d // (32 * per_thread)))
    if device.type == "cuda":
        # A few programs per SM hide latency; more would only grow the partial-sum buffers.
        target = 4 * num_sms(device.index if device.index is not None else torch.cuda.current_device())
    else:
        target = 3  # interpreter: several programs per sample, so the partial sums are exercised
    per_sample = max(1, target // (B * d_blocks))
    rows = block_m * _cdiv(_cdiv(S, block_m), per_sample)
    return block_m, num_warps, rows, _cdiv(S, rows)


def _d_block(D: int) -> int:
    """Column block of the split backward: a power of two up to 1024 that divides D if one of 256+ does."""
    bd = 1024
    while bd > 256 and D % bd:
        bd //= 2
    return min(bd, _pow2(D))


def _vec(v: torch.Tensor | None, B: int, D: int) -> torch.Tensor | None:
    """A per-sample vector broadcastable to ``[B, 1, D]`` as contiguous fp32 ``[B, D]``."""
    if v is None:
        return None
    return v.float().expand(B, 1, D).reshape(B, D).contiguous()


def supported(x: torch.Tensor, *vectors: torch.Tensor | None) -> bool:
    """Whether the fused kernels take these shapes: x ``[B, S, D]``, vectors broadcastable to ``[B, 1, D]``."""
    if x.dim() != 3 or x.dtype not in (torch.float16, torch.bfloat16, torch.float32) or x.shape[-1] > MAX_D:
        return False
    target = (x.shape[0], 1, x.shape[2])
    try:
        return all(v is None or (v.dim() <= 3 and torch.broadcast_shapes(v.shape, target) == target)
                   for v in vectors)
    except RuntimeError:  # not broadcastable at all: let the torch path raise its own error
        return False


def prepare(x, gate, shift, scale, weight, bias):
    """Per-sample vectors as contiguous fp32 ``[B, D]``, the affine as fp32 ``[D]`` (None stays None)."""
    B, _, D = x.shape
    w32 = None if weight is None else weight.float().contiguous()
    b32 = None if bias is None else bias.float().contiguous()
    return _vec(gate, B, D), _vec(shift, B, D), _vec(scale, B, D), w32, b32


def adaln_fwd(x, y, gate32, shift32, scale32, w32, b32, eps, norm, num_warps=None, tile=None):
    """Launch the forward on prepared vectors. Returns ``(h, out, mean, rstd)``; h is None without y."""
    B, S, D = x.shape
    h = torch.empty_like(x) if y is not None else None
    out = torch.empty_like(x) if norm else None
    mean = torch.empty(B * S, device=x.device, dtype=torch.float32) if norm else None
    rstd = torch.empty_like(mean) if norm else None
    block_d = _pow2(D)
    # Measured on H100 (benchmarks/results/norm-h100.md, sweep): 16 elements a thread and at least two rows
    # of 8192 lanes per tile keep enough loads in flight; 4096-element tiles ran 15-25% slower.
    block_m, warps, rows, P = _config(B, S, block_d, x.device, tile or max(8192, 2 * block_d), num_warps,
                                      per_thread=16)
    d = x  # stands in for absent pointers; the constexpr flags keep it unread
    launch(_adaln_fwd_kernel, (P, B),
           (x, _or(y, d), _or(gate32, d), _or(shift32, d), _or(scale32, d), _or(w32, d), _or(b32, d),
            _or(h, d), _or(out, d), _or(mean, d), _or(rstd, d), S, D, rows, eps),
           dict(HAS_Y=y is not None, HAS_GATE=gate32 is not None, NORM=norm, HAS_SHIFT=shift32 is not None,
                HAS_SCALE=scale32 is not None, HAS_W=w32 is not None, HAS_BIAS=b32 is not None,
                BLOCK_M=block_m, BLOCK_D=block_d), num_warps=warps)
    return h, out, mean, rstd


def adaln_bwd(dout, dhx, h, y, gate32, scale32, w32, b32, mean, rstd, need, num_warps=None, tile=None,
              split=None):
    """Launch the backward.

    ``dout`` is the grad of ``out`` (None: no LayerNorm term), ``dhx`` the grad reaching ``h`` from elsewhere
    (None: none), ``h`` the saved LayerNorm input (x itself without a residual; only its shape is used when
    dout is None). ``need`` names the grads wanted among ``gate, shift, scale, weight, bias``. Returns
    ``(dx, dy, grads)`` with fp32 ``[B, D]`` / ``[D]`` grads; dy is None without a gate (then dy equals dx);
    without dout, dx is dhx itself, as for any residual add. ``num_warps``/``tile``/``split`` override the
    defaults (split: row sums from the stats kernel, D blocked).
    """
    B, S, D = h.shape
    norm = dout is not None
    dx = torch.empty_like(h) if norm else dhx
    dy = torch.empty_like(dx) if gate32 is not None else None
    if not norm and gate32 is None:
        return dx, dy, {}
    # Without the norm there are no row sums, so D is always blocked.
    split = (_pow2(D) > SPLIT_BLOCK_D or not norm) if split is None else (split or not norm)
    d = h
    c1 = c2 = None
    if split and norm:
        c1 = torch.empty(B * S, device=h.device, dtype=torch.float32)
        c2 = torch.empty_like(c1)
        block_d = _pow2(D)
        block_m, warps, rows, P = _config(B, S, block_d, h.device, 4096, per_thread=16)
        launch(_adaln_bwd_stats_kernel, (P, B), (dout, h, _or(scale32, d), _or(w32, d), mean, rstd, c1, c2, S, D, rows),
               dict(HAS_SCALE=scale32 is not None, HAS_W=w32 is not None, BLOCK_M=block_m, BLOCK_D=block_d),
               num_warps=warps)
    block_d = _d_block(D) if split else _pow2(D)
    d_blocks = _cdiv(D, block_d)
    # The split form's narrow blocks: 8192-element tiles, 16 elements a thread, sums kept per row (H100). Whole
    # rows up to 2048 lanes: tiles of two rows or more, 16 elements a thread, rows reduced per tile; at the 480p
    # shape on an H200 (1 x 32760 x 1536 bf16) 143 / 241 / 248 us against 196 / 326 / 331 for one-row tiles at 8
    # a thread (norm_modulate / add + norm_modulate / add + affine LayerNorm backward). Wider whole rows keep
    # one-row tiles at 8 a thread (not measured with per-tile reduction).
    if split:
        default_tile, per_thread = 8192, 16
    elif block_d <= 2048:
        default_tile, per_thread = max(4096, 2 * block_d), 16
    else:
        default_tile, per_thread = 2048, 8
    block_m, warps, rows, P = _config(B, S, block_d, h.device, tile or default_tile, num_warps, d_blocks,
                                      per_thread=per_thread)
    buf = torch.empty(len(need), B, P, D, device=h.device, dtype=torch.float32)
    parts = dict(zip(need, buf))
    launch(_adaln_bwd_kernel, (P, B, d_blocks),
           (_or(dout, d), _or(dhx, d), h, _or(y, d), _or(gate32, d), _or(scale32, d), _or(w32, d), _or(b32, d),
            _or(mean, d), _or(rstd, d), _or(c1, d), _or(c2, d), dx, _or(dy, d),
            *(parts.get(k, d) for k in ("gate", "shift", "scale", "weight", "bias")), S, D, rows, P),
           dict(NORM=norm, STATS_IN=c1 is not None, HAS_DHX=dhx is not None, HAS_GATE=gate32 is not None,
                HAS_SCALE=scale32 is not None, HAS_W=w32 is not None, HAS_BIAS=b32 is not None,
                D_GATE="gate" in need, D_SHIFT="shift" in need, D_SCALE="scale" in need, D_W="weight" in need,
                D_BIAS="bias" in need, BLOCK_M=block_m, BLOCK_D=block_d, ACC_ROWS=split), num_warps=warps)
    grads = dict(zip(need, buf.sum(2)))
    for k in ("weight", "bias"):
        if k in grads:
            grads[k] = grads[k].sum(0)
    return dx, dy, grads


def _or(t, default):
    return default if t is None else t


def _vec_grad(g: torch.Tensor | None, meta):
    """Reduce an fp32 ``[B, D]`` (or ``[D]``) grad to the input's own shape and dtype."""
    if g is None:
        return None
    shape, dtype = meta
    if g.dim() == 2:
        g = g.unsqueeze(1)
    return g.sum_to_size(shape).to(dtype)


# ------------------------------------------------------------------------------------------- autograd


# The custom ops: what torch.compile sees (one opaque op; Dynamo cannot trace the launches).
_VECTORS = ("gate", "shift", "scale", "weight", "bias")


@torch.library.custom_op("stdit::adaln_fwd", mutates_args=())
def _adaln_fwd(
    x: torch.Tensor, y: torch.Tensor | None, gate: torch.Tensor | None, shift: torch.Tensor | None,
    scale: torch.Tensor | None, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float, norm: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(h, out, mean, rstd)`` of the fused kernel; one that is absent (h without y, the others without the norm)
    is an empty tensor."""
    x = x.contiguous()
    y = None if y is None else y.contiguous()
    res = adaln_fwd(x, y, *prepare(x, gate, shift, scale, weight, bias), eps, norm)
    return tuple(x.new_empty(0, dtype=dt) if t is None else t
                 for t, dt in zip(res, (x.dtype, x.dtype, torch.float32, torch.float32)))


@_adaln_fwd.register_fake
def _(x, y, gate, shift, scale, weight, bias, eps, norm):
    stats = (x.shape[0] * x.shape[1] if norm else 0,)
    return (x.new_empty(x.shape if y is not None else (0,)), x.new_empty(x.shape if norm else (0,)),
            x.new_empty(stats, dtype=torch.float32), x.new_empty(stats, dtype=torch.float32))


@torch.library.custom_op("stdit::adaln_bwd", mutates_args=())
def _adaln_bwd(
    dout: torch.Tensor | None, dhx: torch.Tensor | None, h: torch.Tensor, y: torch.Tensor | None,
    gate: torch.Tensor | None, scale: torch.Tensor | None, weight: torch.Tensor | None, bias: torch.Tensor | None,
    mean: torch.Tensor, rstd: torch.Tensor, need: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, dy, d gate, d shift, d scale, d weight, d bias)``: the vectors' grads as fp32 ``[B, D]`` / ``[D]``
    sums for those ``need`` asks for. Empty where absent: dx without dout (it is dhx itself), dy without a gate (it
    is dx), an unneeded vector's grad."""
    h = h.contiguous()
    gate32, _, scale32, w32, b32 = prepare(h, gate, None, scale, weight, bias)
    names = [n for n, on in zip(_VECTORS, need) if on]
    dx, dy, g = adaln_bwd(None if dout is None else dout.contiguous(), None if dhx is None else dhx.contiguous(),
                                h, y, gate32, scale32, w32, b32, mean, rstd, names)
    if dout is None:
        dx = None
    # The per-sample vectors' sums are views of one buffer; returns may not alias each other.
    vectors = [None if n not in g else g[n].clone() if g[n].dim() == 2 else g[n] for n in _VECTORS]
    return tuple(h.new_empty(0) if t is None else t for t in (dx, dy, *vectors))


@_adaln_bwd.register_fake
def _(dout, dhx, h, y, gate, scale, weight, bias, mean, rstd, need):
    b, _, d = h.shape
    vec = [(b, d)] * 3 + [(d,)] * 2
    return (h.new_empty(h.shape if dout is not None else (0,)), h.new_empty(h.shape if gate is not None else (0,)),
            *(h.new_empty(shape if on else (0,), dtype=torch.float32 if on else h.dtype)
              for shape, on in zip(vec, need)))


def _adaln_setup(ctx, inputs, output):
    x, y, gate, shift, scale, weight, bias, eps, norm = inputs
    h, _, mean, rstd = output
    ctx.save_for_backward(x if y is None else h, y if gate is not None else None, gate, scale, weight, bias, mean,
                          rstd)
    ctx.vectors = tuple(None if t is None else (t.shape, t.dtype) for t in (gate, shift, scale, weight, bias))
    ctx.residual, ctx.norm = y is not None, norm
    ctx.set_materialize_grads(False)


def _adaln_backward(ctx, dh, dout, _dmean, _drstd):
    h, y, gate, scale, weight, bias, mean, rstd = ctx.saved_tensors
    dh, dout = (dh if ctx.residual else None), (dout if ctx.norm else None)
    need = [t is not None and ctx.needs_input_grad[2 + i] and (dout is not None or i == 0)
            for i, t in enumerate(ctx.vectors)]
    if dout is None and (dh is None or gate is None):  # nothing reaches the kernel: at most a plain residual add
        return dh, dh if ctx.residual else None, None, None, None, None, None, None, None
    dx, dy, *g = _adaln_bwd(dout, dh, h, y, gate, scale, weight, bias, mean, rstd, need)
    dx = dh if dout is None else dx
    dy = None if not ctx.residual else (dx if gate is None else dy)
    return (dx, dy, *(_vec_grad(t, meta) if on else None for t, meta, on in zip(g, ctx.vectors, need)), None, None)


_adaln_fwd.register_autograd(_adaln_backward, setup_context=_adaln_setup)


def adaln_compiled(x, y, gate, shift, scale, weight, bias, eps, norm):
    """The fused kernels as the custom op, which is how :func:`fused_norm_modulate` and
    :func:`fused_add_norm_modulate` run under torch.compile and dispatch modes. Returns ``(h, normed or None)``; h is x
    without y."""
    h, out, _, _ = _adaln_fwd(x, y, gate if y is not None else None, shift, scale, weight, bias, eps, norm)
    return (x if y is None else h), (out if norm else None)


# The eager path: the same kernels through an autograd.Function, without the custom op's dispatch.
class _AdaLN(torch.autograd.Function):
    """One autograd node for ``h = x + gate*y``, ``out = modulate(LN(h))``.

    Outputs ``out`` when ``residual`` is False (then h is x), ``(h, out)`` when both, ``h`` when ``norm`` is
    False.
    """

    @staticmethod
    def forward(ctx, x, y, gate, shift, scale, weight, bias, eps, residual, norm):
        x = x.contiguous()
        y = y.contiguous() if residual else None
        gate = gate if residual else None
        gate32, shift32, scale32, w32, b32 = prepare(x, gate, shift, scale, weight, bias)
        h, out, mean, rstd = adaln_fwd(x, y, gate32, shift32, scale32, w32, b32, eps, norm)
        need_y = gate is not None and ctx.needs_input_grad[2]
        ctx.save_for_backward(x if not residual else (h if norm else None), y if need_y else None,
                              gate32, scale32, w32, b32, mean, rstd)
        ctx.vectors = tuple(None if t is None else (t.shape, t.dtype) for t in (gate, shift, scale, weight, bias))
        ctx.meta = (residual, norm)
        ctx.set_materialize_grads(False)
        if not residual:
            return out
        return (h, out) if norm else h

    @staticmethod
    def backward(ctx, *grads):
        residual, norm = ctx.meta
        h, y, gate32, scale32, w32, b32, mean, rstd = ctx.saved_tensors
        gate, shift, scale, weight, bias = ctx.vectors
        if not residual:
            dhx, dout = None, grads[0]
        elif norm:
            dhx, dout = grads
        else:
            dhx, dout = grads[0], None
        nig = ctx.needs_input_grad
        need = [k for k, i, t in (("gate", 2, gate), ("shift", 3, shift), ("scale", 4, scale),
                                  ("weight", 5, weight), ("bias", 6, bias))
                if t is not None and nig[i] and (dout is not None or k == "gate")]
        if dout is None and dhx is None:
            return (None,) * 10
        dx, dy, g = adaln_bwd(None if dout is None else dout.contiguous(),
                              None if dhx is None else dhx.contiguous(), h if dout is not None else dhx,
                              y, gate32, scale32, w32, b32, mean, rstd, need)
        dy = None if not residual else (dx if dy is None else dy)
        return (dx, dy, _vec_grad(g.get("gate"), gate), _vec_grad(g.get("shift"), shift),
                _vec_grad(g.get("scale"), scale), _vec_grad(g.get("weight"), weight),
                _vec_grad(g.get("bias"), bias), None, None, None)


def fused_norm_modulate(x, shift=None, scale=None, weight=None, bias=None, eps=1e-6):
    """``LN(x) * (1 + scale) + shift`` in one kernel. x ``[B, S, D]``; shift/scale ``[B, 1, D]``; returns x's dtype.
    Under ``torch.compile`` (here and below) the kernels run as the custom ops above."""
    if torch.compiler.is_compiling():
        return adaln_compiled(x, None, None, shift, scale, weight, bias, eps, True)[1]
    return _AdaLN.apply(x, None, None, shift, scale, weight, bias, eps, False, True)


def fused_add_norm_modulate(x, y, gate=None, shift=None, scale=None, weight=None, bias=None, eps=1e-6, norm=True):
    """``h = x + gate * y`` then ``norm_modulate(h, ...)`` in one kernel; returns ``(h, normed or None)``."""
    if torch.compiler.is_compiling():
        return adaln_compiled(x, y, gate, shift, scale, weight, bias, eps, norm)
    res = _AdaLN.apply(x, y, gate, shift, scale, weight, bias, eps, True, norm)
    return res if norm else (res, None)
