"""QK RMSNorm + interleaved RoPE + the 8-bit quantization of Q and K, fused, in Triton (inference only).

The 8-bit attention (:mod:`stdit.kernels.attention_fp8`) quantizes Q and K per token of each head. After the fused
norm + RoPE kernel (:mod:`stdit.kernels.qk_norm_rope`) that costs a write of the normed Q and K, a pass over K for its
channel mean, and a read of each again to quantize. Here one program owns one token: it normalizes the token's whole
``H*D`` row of q and of k, rotates the pairs, and writes the 8-bit rows and the per-token scales of every head
straight into :class:`~stdit.kernels.attention_fp8.Quantized`'s layout. Q and K are read once from memory (the row's
sum of squares and its per-head tiles load the same addresses, the second time from cache); no normed copy is
written. Q's bits are those of the unfused path on fp32 inputs: the norm factor is reduced over the same layout as
the norm + RoPE kernel's and the rest is the same elementwise math.

K's smoothing needs a center per (batch, head) before the first token is quantized. Subtracting any per-channel
vector ``c`` from every key leaves softmax exact (``q . c`` is the same for every key of a query row), so ``c`` need
not be the exact token mean: :func:`sample_k_center` takes the mean of the normed, rotated K over at most
``K_CENTER_TOKENS`` evenly spaced tokens, computed on just those rows. The offsets smoothing is for are shared by
every token (the large per-channel offsets video DiTs have in K), so a few hundred tokens find them about as well as
all of them do, without a pass over K. Deterministic: no atomics.
"""

from __future__ import annotations

import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from ._launch import launch, next_pow2
from .attention_fp8 import _LOG2E, QK_FORMATS, Quantized, _check, _round_8bit, attention_quantized, quantize_v
from .qk_norm_rope import _inv_rms, _meta, _norm_rope_row, _pair_offsets, _rows, _scale_rotate

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
K_CENTER_TOKENS = 256  # tokens sample_k_center averages over (every token of a shorter sequence)


@triton.jit
def _norm_rope_quant_row(X, sx, W, CENTER, X8, XS, flat, mask, offs, col, inside, h3, hh, b, H, pos, S, c, s, eps,
                         factor, HD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, QMAX: tl.constexpr,
                         INT8: tl.constexpr, HAS_W: tl.constexpr, HAS_ROPE: tl.constexpr, HAS_CENTER: tl.constexpr,
                         INTERPRET: tl.constexpr):
    # One token of q or k: the norm factor from the flat row, then the row as [head, pair, 2] tiles (zeros past H
    # and D), normed, rotated, centered, one scale per head, 8 bits.
    _, r = _inv_rms(X, sx, flat, mask, eps, HD)
    xe, xo = tl.split(tl.load(X + offs * sx, mask=inside, other=0.0).to(tl.float32))
    if HAS_W:
        w_e, w_o = tl.split(tl.load(W + offs, mask=inside, other=0.0).to(tl.float32))
    else:
        w_e = 1.0
        w_o = 1.0
    if HAS_ROPE:
        x = _scale_rotate(xe, xo, r, w_e, w_o, c, s)
    else:
        x = tl.join(xe * r * w_e, xo * r * w_o)
    bh3 = b * H + h3
    if HAS_CENTER:
        x = x - tl.load(CENTER + bh3 * D + col, mask=inside, other=0.0)
    scale = tl.maximum(tl.max(tl.reshape(tl.abs(x), (x.shape[0], D_PAD)), 1), 1e-20) / QMAX
    y = _round_8bit(x / scale[:, None, None], INT8, INTERPRET)
    tl.store(X8 + (bh3 * S + pos) * D_PAD + col, y, mask=(h3 < H) & (col < D_PAD))  # the padding columns: zeros
    tl.store(XS + (b * H + hh) * S + pos, scale * factor, mask=hh < H)


@triton.jit
def _qk_norm_rope_quant(Q, K, WQ, WK, COS, SIN, KC, Q8, QS, K8, KS,
                        sqb, sqs, sqd, skb, sks, skd, scs, sss, S, H, eps, q_factor,
                        HD: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr, D: tl.constexpr,
                        D_PAD: tl.constexpr, H_PAD: tl.constexpr, QMAX: tl.constexpr, INT8: tl.constexpr,
                        HAS_W: tl.constexpr, HAS_ROPE: tl.constexpr, INTERPRET: tl.constexpr):
    row = tl.program_id(0)
    b = (row // S).to(tl.int64)
    pos = row % S
    flat, mask, _, _ = _pair_offsets(HALF, HALF_PAD, D // 2)
    hh = tl.arange(0, H_PAD)
    h3 = hh[:, None, None]
    jj = tl.arange(0, D_PAD // 2)
    col = 2 * jj[None, :, None] + tl.arange(0, 2)[None, None, :]
    offs = h3 * D + col
    inside = (h3 < H) & (col < D)
    if HAS_ROPE:  # one angle per pair, the same in every head
        c = tl.load(COS + pos * scs + jj, mask=jj < D // 2, other=0.0)[None, :]
        s = tl.load(SIN + pos * sss + jj, mask=jj < D // 2, other=0.0)[None, :]
    else:
        c = 1.0
        s = 0.0
    _norm_rope_quant_row(Q + b * sqb + pos * sqs, sqd, WQ, KC, Q8, QS, flat, mask, offs, col, inside, h3, hh, b, H,
                         pos, S, c, s, eps, q_factor, HD, D, D_PAD, QMAX, INT8, HAS_W, HAS_ROPE, False, INTERPRET)
    _norm_rope_quant_row(K + b * skb + pos * sks, skd, WK, KC, K8, KS, flat, mask, offs, col, inside, h3, hh, b, H,
                         pos, S, c, s, eps, 1.0, HD, D, D_PAD, QMAX, INT8, HAS_W, HAS_ROPE, True, INTERPRET)


@triton.jit
def _sampled_rows(K, WK, COS, SIN, OUT, skb, sks, skd, scs, sss, S, N, eps, HD: tl.constexpr, HALF: tl.constexpr,
                  HALF_PAD: tl.constexpr, HALF_D: tl.constexpr, HAS_W: tl.constexpr, HAS_ROPE: tl.constexpr):
    # Token (i * S) // N of batch b, normed and rotated as the norm + RoPE kernel does it, in fp32.
    i = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    pos = (i * S) // N
    flat, mask, ang, jmask = _pair_offsets(HALF, HALF_PAD, HALF_D)
    if HAS_ROPE:
        c = tl.load(COS + pos * scs + ang, mask=jmask, other=0.0)
        s = tl.load(SIN + pos * sss + ang, mask=jmask, other=0.0)
    else:
        c = 1.0
        s = 0.0
    if HAS_W:
        w_e, w_o = tl.split(tl.load(WK + flat, mask=mask, other=0.0).to(tl.float32))
    else:
        w_e = 1.0
        w_o = 1.0
    y = _norm_rope_row(K + b * skb + pos * sks, skd, flat, mask, c, s, w_e, w_o, eps, HD)
    tl.store(OUT + (b * N + i) * HD + flat, y, mask=mask)


def sample_k_center(k: torch.Tensor, weight_k: torch.Tensor | None, eps: float, cos: torch.Tensor | None,
                    sin: torch.Tensor | None, num_heads: int, max_tokens: int = K_CENTER_TOKENS) -> torch.Tensor:
    """K's smoothing center ``[B, H, D]`` fp32: the mean of the normed, rotated k (``[B, S, H*D]``) over at most
    ``max_tokens`` evenly spaced tokens, ``(i * S) // n`` for ``i < n`` (the first included). Any center is exact
    for softmax (see the module docstring); the sampled mean is close to the full one for the offsets that smoothing
    removes. One small launch and a mean (a few microseconds of host time, where torch ops on the sampled rows
    would take one launch per op)."""
    b, s, hd = k.shape
    n = min(s, max_tokens)
    rows = torch.empty(b, n, hd, device=k.device, dtype=torch.float32)
    meta, warps = _meta(k, num_heads)
    has_w, has_rope = weight_k is not None, cos is not None
    cos_t, sin_t = (cos, sin) if has_rope else (rows, rows)
    if n and b:
        launch(_sampled_rows, (n, b), (k, weight_k.contiguous() if has_w else k, cos_t, sin_t, rows, *_rows(k),
                                       cos_t.stride(0), sin_t.stride(0), s, n, float(eps)),
               dict(HAS_W=has_w, HAS_ROPE=has_rope, **meta), num_warps=warps)
    return rows.view(b, n, num_heads, hd // num_heads).mean(dim=1)


def _check_rows(q, k, weight_q, weight_k, cos, sin, num_heads):
    if q.dim() != 3 or k.shape != q.shape:
        raise ValueError(f"q and k must be [B, S, H*D] of one shape; got {tuple(q.shape)} and {tuple(k.shape)}")
    b, s, hd = q.shape
    if hd % num_heads or (hd // num_heads) % 2:
        raise ValueError(f"q's last dim {hd} must be num_heads ({num_heads}) times an even head dim")
    if (weight_q is None) != (weight_k is None):
        raise ValueError("pass both norm weights or neither")
    if (cos is None) != (sin is None):
        raise ValueError("pass both cos and sin or neither")
    if cos is not None and (tuple(cos.shape) != (s, hd // num_heads // 2) or cos.shape != sin.shape):
        raise ValueError(f"cos/sin must be [S, D/2] = {(s, hd // num_heads // 2)}; got {tuple(cos.shape)}")


def qk_norm_rope_quantized(q: torch.Tensor, k: torch.Tensor, weight_q: torch.Tensor | None,
                           weight_k: torch.Tensor | None, eps: float, cos: torch.Tensor | None,
                           sin: torch.Tensor | None, num_heads: int, scale: float | None = None,
                           qk_format: str = "int8", k_center: torch.Tensor | None = None,
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """RMSNorm over each token's ``H*D`` row, interleaved RoPE, and the 8-bit quantization of
    :func:`~stdit.kernels.attention_fp8.quantize`, in one pass: q, k ``[B, S, H*D]`` (strided views allowed),
    ``weight_q``/``weight_k`` ``[H*D]`` or None, ``cos``/``sin`` ``[S, D/2]`` fp32 or None (no rotation) ->
    ``(q8, q_scale, k8, k_scale)`` as :class:`~stdit.kernels.attention_fp8.Quantized` holds them (``[B * H, S,
    D_PAD]`` int8 or fp8 e4m3, ``[B * H, S]`` fp32; Q's scales times ``scale`` (default ``D ** -0.5``) times
    log2(e)). K is smoothed by ``k_center`` ``[B, H, D]`` (in the normed, rotated space), by default
    :func:`sample_k_center`'s mean."""
    _check_rows(q, k, weight_q, weight_k, cos, sin, num_heads)
    if qk_format not in QK_FORMATS:
        raise ValueError(f"qk_format must be one of {sorted(QK_FORMATS)}; got {qk_format!r}")
    b, _, hd = q.shape
    if k_center is not None and tuple(k_center.shape) != (b, num_heads, hd // num_heads):
        raise ValueError(f"k_center must be [B, H, D] = {(b, num_heads, hd // num_heads)}; got "
                         f"{tuple(k_center.shape)}")
    return _quantize_qk(q, k, weight_q, weight_k, eps, cos, sin, num_heads, scale, qk_format, k_center)


def _quantize_qk(q, k, weight_q, weight_k, eps, cos, sin, num_heads, scale, qk_format, k_center):
    # qk_norm_rope_quantized past its checks (the fused attention makes its own).
    b, s, hd = q.shape
    h = num_heads
    d = hd // h
    d_pad = max(32, next_pow2(d))
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    qk_dtype, qmax = QK_FORMATS[qk_format]
    if k_center is None:
        k_center = sample_k_center(k, weight_k, eps, cos, sin, h)
    center = k_center.to(device=q.device, dtype=torch.float32).reshape(b * h, d).contiguous()
    q8 = torch.empty(b * h, s, d_pad, device=q.device, dtype=qk_dtype)
    k8 = torch.empty(b * h, s, d_pad, device=q.device, dtype=qk_dtype)
    qs = torch.empty(b * h, s, device=q.device, dtype=torch.float32)
    ks = torch.empty(b * h, s, device=q.device, dtype=torch.float32)
    has_w, has_rope = weight_q is not None, cos is not None
    wq, wk = (weight_q.contiguous(), weight_k.contiguous()) if has_w else (q, k)
    cos_t, sin_t = (cos, sin) if has_rope else (center, center)
    meta, warps = _meta(q, h)  # the norm + RoPE kernel's warps: its flat-row reduction, in the same order
    if s and b:
        launch(_qk_norm_rope_quant, (b * s,),
               (q, k, wq, wk, cos_t, sin_t, center, q8, qs, k8, ks, *_rows(q), *_rows(k), cos_t.stride(0),
                sin_t.stride(0), s, h, float(eps), scale * _LOG2E),
               dict(HD=hd, HALF=hd // 2, HALF_PAD=meta["HALF_PAD"], D=d, D_PAD=d_pad, H_PAD=next_pow2(h), QMAX=qmax,
                    INT8=qk_dtype == torch.int8, HAS_W=has_w, HAS_ROPE=has_rope, INTERPRET=_INTERPRET),
               num_warps=warps)
    return q8, qs, k8, ks


def qk_norm_rope_attention_fp8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, weight_q: torch.Tensor | None,
                               weight_k: torch.Tensor | None, eps: float, cos: torch.Tensor | None,
                               sin: torch.Tensor | None, num_heads: int, scale: float | None = None,
                               qk_format: str = "int8") -> torch.Tensor:
    """Self-attention of the 8-bit backend on the projections: q, k, v ``[B, S, H*D]`` -> ``[B, S, H, D]`` in q's
    dtype, Q and K normed, rotated and quantized by :func:`qk_norm_rope_quantized`, V by
    :func:`~stdit.kernels.attention_fp8.quantize_v`. The unfused equivalent is
    :func:`~stdit.kernels.qk_norm_rope.qk_norm_rope` then :func:`~stdit.kernels.attention_fp8.attention_fp8`; the
    two differ only in K's smoothing center. No gradient. Under ``torch.compile`` it runs as the custom op
    ``stdit::qk_norm_rope_attention_fp8``."""
    _check_rows(q, k, weight_q, weight_k, cos, sin, num_heads)
    if v.shape != q.shape:
        raise ValueError(f"v must be [B, S, H*D] = {tuple(q.shape)}; got {tuple(v.shape)}")
    views = [x.unflatten(-1, (num_heads, -1)) for x in (q, k, v)]
    _check(*views, None, qk_format)
    if torch.compiler.is_compiling():
        return _qk_norm_rope_attention_fp8_op(q, k, v, weight_q, weight_k, float(eps), cos, sin, int(num_heads),
                                              scale, qk_format)
    return _qk_norm_rope_attention_fp8(q, k, v, weight_q, weight_k, eps, cos, sin, num_heads, scale, qk_format)


def _qk_norm_rope_attention_fp8(q, k, v, weight_q, weight_k, eps, cos, sin, num_heads, scale, qk_format):
    qz = Quantized(*_quantize_qk(q, k, weight_q, weight_k, eps, cos, sin, num_heads, scale, qk_format, None),
                   *quantize_v(v.unflatten(-1, (num_heads, -1))))
    b, s, hd = q.shape
    out = torch.empty(b, s, num_heads, hd // num_heads, device=q.device, dtype=q.dtype)
    return attention_quantized(qz, out, num_heads)


@torch.library.custom_op("stdit::qk_norm_rope_attention_fp8", mutates_args=())
def _qk_norm_rope_attention_fp8_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                   weight_q: Optional[torch.Tensor], weight_k: Optional[torch.Tensor], eps: float,
                                   cos: Optional[torch.Tensor], sin: Optional[torch.Tensor], num_heads: int,
                                   scale: Optional[float], qk_format: str) -> torch.Tensor:
    return _qk_norm_rope_attention_fp8(q, k, v, weight_q, weight_k, eps, cos, sin, num_heads, scale, qk_format)


@_qk_norm_rope_attention_fp8_op.register_fake
def _(q, k, v, weight_q, weight_k, eps, cos, sin, num_heads, scale, qk_format):
    b, s, hd = q.shape
    return q.new_empty(b, s, num_heads, hd // num_heads)
