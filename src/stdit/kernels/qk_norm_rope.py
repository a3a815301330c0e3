"""QK RMSNorm across heads + interleaved 3D RoPE + ``[B, S, H, D]`` layout, fused, in Triton (forward and backward).

One program owns one token of q and of k: it normalizes the whole ``H*D`` row (weight ``[H*D]``), rotates each
interleaved pair ``(x[2i], x[2i+1])`` by the token's angle ``i`` of its head, and writes the row once. The rope
tables ``cos``/``sin`` ``[S, D/2]`` fp32 are read once per token for both q and k. The backward recomputes the
norm factor from the input rather than saving it, and reduces the weight gradients over a persistent grid.
The pure-torch twin is :mod:`stdit.kernels.qk_norm_rope_ref`.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._device import num_sms
from ._launch import launch, next_pow2

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _pair_offsets(HALF: tl.constexpr, HALF_PAD: tl.constexpr, HALF_D: tl.constexpr):
    j = tl.arange(0, HALF_PAD)
    t = tl.arange(0, 2)
    flat = 2 * j[:, None] + t[None, :]
    return flat, flat < 2 * HALF, j % HALF_D, j < HALF


@triton.jit
def _inv_rms(X, sx, flat, mask, eps, HD: tl.constexpr):
    # The row as _pair_offsets lays it out (fp32) and its RMSNorm factor. The 8-bit kernel
    # (qk_norm_rope_quant.py) reduces the same layout, so its factor has these bits too.
    x = tl.load(X + flat * sx, mask=mask, other=0.0).to(tl.float32)
    return x, tl.math.rsqrt(tl.sum(tl.sum(x * x, 1), 0) / HD + eps)


@triton.jit
def _scale_rotate(xe, xo, r, w_e, w_o, c, s):
    # Even and odd elements of the pairs: normalized, scaled by the norm weight, rotated.
    ze = xe * r * w_e
    zo = xo * r * w_o
    return tl.join(ze * c - zo * s, ze * s + zo * c)


@triton.jit
def _norm_rope_row(X, sx, flat, mask, c, s, w_e, w_o, eps, HD: tl.constexpr):
    x, r = _inv_rms(X, sx, flat, mask, eps, HD)
    xe, xo = tl.split(x)
    return _scale_rotate(xe, xo, r, w_e, w_o, c, s)


@triton.jit
def _qk_norm_rope_fwd(Q, K, WQ, WK, COS, SIN, QO, KO,
                      sqb, sqs, sqd, skb, sks, skd, scs, sss, S, eps,
                      HD: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr, HALF_D: tl.constexpr,
                      HAS_W: tl.constexpr):
    row = tl.program_id(0)
    b = (row // S).to(tl.int64)
    pos = row % S
    flat, mask, ang, jmask = _pair_offsets(HALF, HALF_PAD, HALF_D)
    c = tl.load(COS + pos * scs + ang, mask=jmask, other=0.0)
    s = tl.load(SIN + pos * sss + ang, mask=jmask, other=0.0)
    if HAS_W:
        wq_e, wq_o = tl.split(tl.load(WQ + flat, mask=mask, other=0.0).to(tl.float32))
        wk_e, wk_o = tl.split(tl.load(WK + flat, mask=mask, other=0.0).to(tl.float32))
    else:
        wq_e = 1.0
        wq_o = 1.0
        wk_e = 1.0
        wk_o = 1.0
    qo = _norm_rope_row(Q + b * sqb + pos * sqs, sqd, flat, mask, c, s, wq_e, wq_o, eps, HD)
    ko = _norm_rope_row(K + b * skb + pos * sks, skd, flat, mask, c, s, wk_e, wk_o, eps, HD)
    out = row.to(tl.int64) * HD + flat
    tl.store(QO + out, qo.to(QO.dtype.element_ty), mask=mask)
    tl.store(KO + out, ko.to(KO.dtype.element_ty), mask=mask)


@triton.jit
def _norm_rope_row_bwd(X, sx, G, sg, DX, flat, mask, c, s, w_e, w_o, eps, HD: tl.constexpr):
    x, r = _inv_rms(X, sx, flat, mask, eps, HD)
    g = tl.load(G + flat * sg, mask=mask, other=0.0).to(tl.float32)
    ge, go = tl.split(g)
    # The rotation is orthogonal: its transpose carries the gradient back to the normalized, scaled row.
    gz = tl.join(ge * c + go * s, go * c - ge * s)
    n = x * r
    dn_e, dn_o = tl.split(gz)
    dn = tl.join(dn_e * w_e, dn_o * w_o)
    proj = tl.sum(tl.sum(dn * n, 1), 0) / HD
    dx = r * (dn - n * proj)
    tl.store(DX + flat * sx, dx.to(DX.dtype.element_ty), mask=mask)
    return gz * n


@triton.jit
def _qk_norm_rope_bwd(Q, K, GQ, GK, WQ, WK, COS, SIN, DQ, DK, DWQ, DWK,
                      sqb, sqs, sqd, skb, sks, skd, sgqb, sgqs, sgqd, sgkb, sgks, sgkd, scs, sss, S, n_rows, eps,
                      HD: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr, HALF_D: tl.constexpr,
                      HAS_W: tl.constexpr):
    pid = tl.program_id(0)
    step = tl.num_programs(0)
    flat, mask, ang, jmask = _pair_offsets(HALF, HALF_PAD, HALF_D)
    if HAS_W:
        wq_e, wq_o = tl.split(tl.load(WQ + flat, mask=mask, other=0.0).to(tl.float32))
        wk_e, wk_o = tl.split(tl.load(WK + flat, mask=mask, other=0.0).to(tl.float32))
    else:
        wq_e = 1.0
        wq_o = 1.0
        wk_e = 1.0
        wk_o = 1.0
    dwq = tl.zeros([HALF_PAD, 2], tl.float32)
    dwk = tl.zeros([HALF_PAD, 2], tl.float32)
    for row in range(pid, n_rows, step):
        b = tl.cast(row // S, tl.int64)
        pos = row % S
        c = tl.load(COS + pos * scs + ang, mask=jmask, other=0.0)
        s = tl.load(SIN + pos * sss + ang, mask=jmask, other=0.0)
        out = tl.cast(row, tl.int64) * HD
        dwq += _norm_rope_row_bwd(Q + b * sqb + pos * sqs, sqd, GQ + b * sgqb + pos * sgqs, sgqd, DQ + out,
                                  flat, mask, c, s, wq_e, wq_o, eps, HD)
        dwk += _norm_rope_row_bwd(K + b * skb + pos * sks, skd, GK + b * sgkb + pos * sgks, sgkd, DK + out,
                                  flat, mask, c, s, wk_e, wk_o, eps, HD)
    if HAS_W:
        tl.store(DWQ + pid * HD + flat, dwq, mask=mask)
        tl.store(DWK + pid * HD + flat, dwk, mask=mask)


def _meta(q: torch.Tensor, num_heads: int):
    hd = q.shape[-1]
    if hd % num_heads or (hd // num_heads) % 2:
        raise ValueError(f"q's last dim {hd} must be num_heads ({num_heads}) times an even head dim")
    half_pad = next_pow2(hd // 2)
    warps = 1 if _INTERPRET else (4 if half_pad <= 512 else (8 if half_pad <= 2048 else 16))
    return dict(HD=hd, HALF=hd // 2, HALF_PAD=half_pad, HALF_D=hd // num_heads // 2), warps


def _rows(x: torch.Tensor) -> tuple[int, int, int]:
    """(batch, token, element) strides of a ``[B, S, H*D]`` view."""
    return x.stride(0), x.stride(1), x.stride(2)


def qk_norm_rope_forward(q, k, weight_q, weight_k, eps, cos, sin, num_heads):
    b, s, hd = q.shape
    if k.shape != q.shape:
        raise ValueError(f"q and k must have one shape; got {tuple(q.shape)} and {tuple(k.shape)}")
    if tuple(cos.shape) != (s, hd // num_heads // 2) or cos.shape != sin.shape:
        raise ValueError(f"cos/sin must be [S, D/2] = {(s, hd // num_heads // 2)}; got {tuple(cos.shape)}")
    meta, warps = _meta(q, num_heads)
    qo = torch.empty(b, s, hd, device=q.device, dtype=q.dtype)
    ko = torch.empty(b, s, hd, device=k.device, dtype=k.dtype)
    has_w = weight_q is not None
    wq = weight_q if has_w else q
    wk = weight_k if has_w else k
    launch(_qk_norm_rope_fwd, (b * s,), (q, k, wq.contiguous(), wk.contiguous(), cos, sin, qo, ko, *_rows(q),
                                         *_rows(k), cos.stride(0), sin.stride(0), s, eps),
           dict(HAS_W=has_w, **meta), num_warps=warps)
    d = hd // num_heads
    return qo.view(b, s, num_heads, d), ko.view(b, s, num_heads, d)


def qk_norm_rope_backward(gq, gk, q, k, weight_q, weight_k, eps, cos, sin, num_heads):
    b, s, hd = q.shape
    meta, warps = _meta(q, num_heads)
    gq = gq.reshape(b, s, hd)
    gk = gk.reshape(b, s, hd)
    dq = torch.empty(b, s, hd, device=q.device, dtype=q.dtype)
    dk = torch.empty(b, s, hd, device=k.device, dtype=k.dtype)
    n_rows = b * s
    if q.is_cuda:
        programs = min(n_rows, 4 * num_sms(q.device.index))
    else:
        programs = min(n_rows, 4)
    has_w = weight_q is not None
    dwq = torch.empty(programs, hd, device=q.device, dtype=torch.float32) if has_w else dq
    dwk = torch.empty(programs, hd, device=q.device, dtype=torch.float32) if has_w else dk
    wq = weight_q.contiguous() if has_w else q
    wk = weight_k.contiguous() if has_w else k
    launch(_qk_norm_rope_bwd, (programs,), (q, k, gq, gk, wq, wk, cos, sin, dq, dk, dwq, dwk, *_rows(q), *_rows(k),
                                            *_rows(gq), *_rows(gk), cos.stride(0), sin.stride(0), s, n_rows, eps),
           dict(HAS_W=has_w, **meta), num_warps=warps)
    if not has_w:
        return dq, dk, None, None
    return dq, dk, dwq.sum(0).to(weight_q.dtype), dwk.sum(0).to(weight_k.dtype)


# The custom op: what torch.compile and dispatch modes see (one opaque op; Dynamo cannot trace the launches).
@torch.library.custom_op("stdit::qk_norm_rope_fwd", mutates_args=())
def qk_norm_rope_op(
    q: torch.Tensor, k: torch.Tensor, weight_q: torch.Tensor | None, weight_k: torch.Tensor | None, eps: float,
    cos: torch.Tensor, sin: torch.Tensor, num_heads: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    return qk_norm_rope_forward(q, k, weight_q, weight_k, eps, cos, sin, num_heads)


@qk_norm_rope_op.register_fake
def _(q, k, weight_q, weight_k, eps, cos, sin, num_heads):
    b, s, hd = q.shape
    return q.new_empty(b, s, num_heads, hd // num_heads), k.new_empty(b, s, num_heads, hd // num_heads)


@torch.library.custom_op("stdit::qk_norm_rope_bwd", mutates_args=())
def _qk_norm_rope_bwd_op(
    gq: torch.Tensor, gk: torch.Tensor, q: torch.Tensor, k: torch.Tensor, weight_q: torch.Tensor | None,
    weight_k: torch.Tensor | None, eps: float, cos: torch.Tensor, sin: torch.Tensor, num_heads: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, d weight_q, d weight_k)``; the weights' grads are empty without weights."""
    dq, dk, dwq, dwk = qk_norm_rope_backward(gq, gk, q, k, weight_q, weight_k, eps, cos, sin, num_heads)
    return dq, dk, q.new_empty(0) if dwq is None else dwq, k.new_empty(0) if dwk is None else dwk


@_qk_norm_rope_bwd_op.register_fake
def _(gq, gk, q, k, weight_q, weight_k, eps, cos, sin, num_heads):
    return (q.new_empty(q.shape), k.new_empty(k.shape), q.new_empty(0) if weight_q is None else weight_q.new_empty(
        weight_q.shape), k.new_empty(0) if weight_k is None else weight_k.new_empty(weight_k.shape))


def _qk_norm_rope_setup(ctx, inputs, output):
    q, k, weight_q, weight_k, eps, cos, sin, num_heads = inputs
    ctx.save_for_backward(q, k, weight_q, weight_k, cos, sin)
    ctx.eps, ctx.num_heads = eps, num_heads


def _qk_norm_rope_backward(ctx, gq, gk):
    q, k, weight_q, weight_k, cos, sin = ctx.saved_tensors
    dq, dk, dwq, dwk = _qk_norm_rope_bwd_op(gq, gk, q, k, weight_q, weight_k, ctx.eps, cos, sin, ctx.num_heads)
    if weight_q is None:
        dwq = dwk = None
    return dq, dk, dwq, dwk, None, None, None, None


qk_norm_rope_op.register_autograd(_qk_norm_rope_backward, setup_context=_qk_norm_rope_setup)


# The eager path: the same forward and backward through an autograd.Function, without the custom op's dispatch.
class QKNormRope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, weight_q, weight_k, eps, cos, sin, num_heads):
        ctx.save_for_backward(q, k, weight_q, weight_k, cos, sin)
        ctx.eps, ctx.num_heads = eps, num_heads
        return qk_norm_rope_forward(q, k, weight_q, weight_k, eps, cos, sin, num_heads)

    @staticmethod
    def backward(ctx, gq, gk):
        q, k, weight_q, weight_k, cos, sin = ctx.saved_tensors
        dq, dk, dwq, dwk = qk_norm_rope_backward(gq, gk, q, k, weight_q, weight_k, ctx.eps, cos, sin, ctx.num_heads)
        return dq, dk, dwq, dwk, None, None, None, None


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, weight_q: torch.Tensor | None, weight_k: torch.Tensor | None,
                 eps: float, cos: torch.Tensor, sin: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over each token's whole ``H*D`` row, then interleaved RoPE: q, k ``[B, S, H*D]`` -> ``[B, S, H, D]``.

    q and k may be strided views (e.g. slices of a fused projection). ``weight_q``/``weight_k`` ``[H*D]`` or None
    (both or neither). ``cos``/``sin`` ``[S, D/2]`` fp32. Math in fp32, outputs in the inputs' dtype, contiguous.
    Differentiable in q, k and both weights. Under ``torch.compile`` it runs as the custom op
    ``stdit::qk_norm_rope_fwd`` (Dynamo cannot trace the launches).
    """
    if (weight_q is None) != (weight_k is None):
        raise ValueError("pass both norm weights or neither")
    if torch.compiler.is_compiling():
        return qk_norm_rope_op(q, k, weight_q, weight_k, float(eps), cos, sin, int(num_heads))
    return QKNormRope.apply(q, k, weight_q, weight_k, float(eps), cos, sin, int(num_heads))
