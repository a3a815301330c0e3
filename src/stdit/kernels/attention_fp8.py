"""8-bit attention forward for inference, in Triton: SageAttention2's recipe on Hopper's 8-bit tensor cores.

* Q and K are quantized per token (one scale per row of each head), to INT8 (default) or FP8 e4m3. K is first
  smoothed: its mean over the tokens is subtracted per channel. That is exact for softmax (``q . mean`` is the same
  for every key of a query row, so the row's probabilities do not change) and removes the large per-channel offsets
  video DiTs have in K, which would otherwise set every token's scale. The softmax scale and log2(e) are folded into
  Q's scales.
* P (in [0, 1] under the online softmax's running max) is multiplied by 448 and cast to FP8 e4m3; V is cast to FP8
  with one scale per channel (its absolute maximum over the tokens over 448), stored transposed so that the P V
  product reads it K-major, as Hopper's 8-bit MMA requires of both operands. V is first shifted by its channels'
  mid-range (exact: each row's probabilities sum to one, so the shift is added back to the output).
* Scores and output accumulate in fp32, the output in two levels: each key block's P V product starts from zero
  and is then added to the fp32 accumulator, because Hopper's FP8 MMA keeps fewer accumulator bits than fp32 over
  a long sum (DeepSeek-V3 measured about 14).

:func:`quantize` is one pass over Q, K and V after two reductions (K's mean, V's channel maxima, in torch: a
per-channel reduction over all tokens must finish before any token is quantized); :func:`quantize_v` is its V part,
which the self-attention's fused path (:mod:`stdit.kernels.qk_norm_rope_quant`: QK norm, RoPE and Q/K's quantization
in one kernel) shares. The quantized copies pad the
head dim to a power of two with zeros, so every head dim runs. The plain-torch twin, the same quantization and the
same products in fp32, is :mod:`stdit.kernels.attention_fp8_ref`. Inference only: there is no backward.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from ._compat import HAS_TENSOR_DESCRIPTORS, ensure_scratch_allocator
from ._launch import DEFAULT_OPTIONS, cdiv, next_pow2

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_LOG2E = 1.4426950408889634
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
QK_FORMATS = {"int8": (torch.int8, 127.0), "fp8": (FP8, FP8_MAX)}


class Quantized(NamedTuple):
    """8-bit Q, K, V of one call. ``q``/``k`` ``[B * H, S, D_PAD]`` (int8 or fp8), ``q_scale``/``k_scale``
    ``[B * H, S]`` fp32 (Q's times softmax scale times log2(e)), ``v`` ``[B * H, D_PAD, S_PAD]`` fp8 (transposed,
    key columns padded with zeros to a multiple of 16), ``v_shift``/``v_scale`` ``[B * H, D_PAD]`` fp32."""
    q: torch.Tensor
    q_scale: torch.Tensor
    k: torch.Tensor
    k_scale: torch.Tensor
    v: torch.Tensor
    v_shift: torch.Tensor
    v_scale: torch.Tensor


@triton.jit
def _to_fp8(x, INTERPRET: tl.constexpr):
    # Round to nearest e4m3. Triton's interpreter (the CPU tests) drops the carry when a value rounds up to the
    # next power of two (1.96 -> 1.0), so there the value is first rounded onto the e4m3 grid in fp32 (3 mantissa
    # bits, subnormal step 2^-9), which its cast then keeps exactly.
    if INTERPRET:
        e = tl.maximum(tl.floor(tl.math.log2(tl.maximum(tl.abs(x), 1e-30))), -6.0)
        ulp = tl.math.exp2(e - 3.0)
        x = tl.floor(x / ulp + 0.5) * ulp
    return x.to(tl.float8e4nv, fp_downcast_rounding="rtne")


@triton.jit
def _round_8bit(y, INT8: tl.constexpr, INTERPRET: tl.constexpr):
    # Values already divided by their scale, to INT8 (round half away from zero: the cast truncates) or FP8 e4m3.
    if INT8:
        y = tl.where(y >= 0, y + 0.5, y - 0.5).to(tl.int8)
    else:
        y = _to_fp8(y, INTERPRET)
    return y


@triton.jit
def _load_token_block(X, sxb, sxs, sxh, sxd, H, S, D: tl.constexpr, D_PAD: tl.constexpr, BLOCK: tl.constexpr):
    # This program's block of tokens of one (batch, head) of a [B, S, H, D] tensor, fp32, zeros past S and D.
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, D_PAD)
    inside = (rows[:, None] < S) & (cols[None, :] < D)
    x = tl.load(X + b * sxb + h * sxh + rows[:, None] * sxs + cols[None, :] * sxd, mask=inside, other=0.0)
    return pid_bh, rows, cols, inside, x.to(tl.float32)


@triton.jit
def _quant_rows(X, MEAN, X8, XS, sxb, sxs, sxh, sxd, H, S, factor, QMAX: tl.constexpr, D: tl.constexpr,
                D_PAD: tl.constexpr, HAS_MEAN: tl.constexpr, INT8: tl.constexpr, BLOCK: tl.constexpr,
                INTERPRET: tl.constexpr):
    # One block of tokens of one (batch, head): subtract the channel means, one scale per token, round to 8 bits.
    pid_bh, rows, cols, inside, x = _load_token_block(X, sxb, sxs, sxh, sxd, H, S, D, D_PAD, BLOCK)
    if HAS_MEAN:
        mean = tl.load(MEAN + pid_bh * D + cols, mask=cols < D, other=0.0)
        x = tl.where(inside, x - mean[None, :], 0.0)
    scale = tl.maximum(tl.max(tl.abs(x), 1), 1e-20) / QMAX
    y = _round_8bit(x / scale[:, None], INT8, INTERPRET)
    base = pid_bh.to(tl.int64) * S
    tl.store(X8 + (base + rows[:, None]) * D_PAD + cols[None, :], y, mask=rows[:, None] < S)
    tl.store(XS + base + rows, scale * factor, mask=rows < S)


@triton.jit
def _quant_v(V, VSHIFT, VS, V8, svb, svs, svh, svd, H, S, S_PAD, D: tl.constexpr, D_PAD: tl.constexpr,
             BLOCK: tl.constexpr, INTERPRET: tl.constexpr):
    # One block of tokens of one (batch, head) of V, shifted and divided by the channel scales, cast to FP8 and
    # stored transposed; the blocks past S write the zero padding.
    pid_bh, rows, cols, inside, x = _load_token_block(V, svb, svs, svh, svd, H, S, D, D_PAD, BLOCK)
    shift = tl.load(VSHIFT + pid_bh * D_PAD + cols)
    scale = tl.load(VS + pid_bh * D_PAD + cols)
    y = tl.where(inside, (x - shift[None, :]) / scale[None, :], 0.0)
    y = _to_fp8(y, INTERPRET)
    tl.store(V8 + (pid_bh.to(tl.int64) * D_PAD + cols[None, :]) * S_PAD + rows[:, None], y,
             mask=rows[:, None] < S_PAD)


@triton.jit
def _fp8_block(acc, l_i, m_i, q, qs, k_desc, v_desc, K8, KS, V8, KPM, start_n, SK, S_PAD, sms, offs_n0, offs_d,
               D_PAD: tl.constexpr, TAIL: tl.constexpr, HAS_MASK: tl.constexpr, USE_TMA: tl.constexpr,
               INTERPRET: tl.constexpr):
    offs_n = start_n + offs_n0
    if USE_TMA:  # the descriptors zero-fill keys past SK
        k = k_desc.load([start_n, 0])
    elif TAIL:
        k = tl.load(K8 + offs_n[:, None] * D_PAD + offs_d[None, :], mask=offs_n[:, None] < SK, other=0.0)
    else:
        k = tl.load(K8 + offs_n[:, None] * D_PAD + offs_d[None, :])
    if TAIL:
        ks = tl.load(KS + offs_n, mask=offs_n < SK, other=0.0)
    else:
        ks = tl.load(KS + offs_n)
    s = tl.dot(q, tl.trans(k)).to(tl.float32) * qs[:, None] * ks[None, :]
    if TAIL or HAS_MASK:
        valid = offs_n < SK
        if HAS_MASK:
            valid = valid & (tl.load(KPM + offs_n * sms, mask=valid, other=0) != 0)
        # A finite floor instead of -inf keeps every exp2 argument finite; rows that never see a valid key are
        # detected by their running max in the epilogue.
        s = tl.where(valid[None, :], s, -1.0e30)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.math.exp2(s - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    if USE_TMA:
        vt = v_desc.load([0, start_n])
    elif TAIL:
        vt = tl.load(V8 + offs_d[:, None] * S_PAD + offs_n[None, :], mask=offs_n[None, :] < S_PAD, other=0.0)
    else:
        vt = tl.load(V8 + offs_d[:, None] * S_PAD + offs_n[None, :])
    pv = tl.dot(_to_fp8(p * 448.0, INTERPRET), tl.trans(vt))
    acc = acc * alpha[:, None] + pv
    return acc, l_i, m_new


@triton.jit
def _attn_fwd_fp8(Q8, QS, K8, KS, V8, VSHIFT, VS, O, KPM, sob, sos, soh, sod, smb, sms, H, SQ, SK, S_PAD, SQ_KEY, SK_KEY,
                  D: tl.constexpr, D_PAD: tl.constexpr, HAS_MASK: tl.constexpr, USE_TMA: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, INTERPRET: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    bh = pid_bh.to(tl.int64)
    b = bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    q = tl.load(Q8 + (bh * SQ + offs_m[:, None]) * D_PAD + offs_d[None, :], mask=offs_m[:, None] < SQ, other=0.0)
    qs = tl.load(QS + bh * SQ + offs_m, mask=offs_m < SQ, other=0.0)
    K8 += bh * SK * D_PAD
    KS += bh * SK
    V8 += bh * D_PAD * S_PAD
    KPM += b * smb
    if USE_TMA:
        k_desc = tl.make_tensor_descriptor(K8, shape=[SK, D_PAD], strides=[D_PAD, 1], block_shape=[BLOCK_N, D_PAD])
        v_desc = tl.make_tensor_descriptor(V8, shape=[D_PAD, S_PAD], strides=[S_PAD, 1],
                                           block_shape=[D_PAD, BLOCK_N])
    else:
        k_desc = K8
        v_desc = V8
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    sk_full = (SK // BLOCK_N) * BLOCK_N
    for start_n in tl.range(0, sk_full, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        acc, l_i, m_i = _fp8_block(acc, l_i, m_i, q, qs, k_desc, v_desc, K8, KS, V8, KPM, start_n, SK, S_PAD, sms,
                                   offs_n0, offs_d, D_PAD, False, HAS_MASK, USE_TMA, INTERPRET)
    if sk_full < SK:
        acc, l_i, m_i = _fp8_block(acc, l_i, m_i, q, qs, k_desc, v_desc, K8, KS, V8, KPM, sk_full, SK, S_PAD, sms,
                                   offs_n0, offs_d, D_PAD, True, HAS_MASK, USE_TMA, INTERPRET)
    vs = tl.load(VS + bh * D_PAD + offs_d)
    o = acc * (vs / 448.0)[None, :] / l_i[:, None] + tl.load(VSHIFT + bh * D_PAD + offs_d)[None, :]
    if HAS_MASK:
        o = tl.where((m_i < -1.0e29)[:, None], 0.0, o)  # every key of this query is padding: zeros
    ptrs = O + b * sob + h * soh + offs_m[:, None] * sos + offs_d[None, :] * sod
    tl.store(ptrs, o.to(O.dtype.element_ty), mask=(offs_m[:, None] < SQ) & (offs_d[None, :] < D))


def _configs():
    if _INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
            for m, n, w, s in [(128, 128, 8, 3), (128, 64, 8, 3), (128, 128, 8, 4), (128, 64, 4, 3),
                               (128, 128, 8, 2), (64, 128, 4, 3), (64, 64, 4, 3)]]


_FWD = triton.autotune(_configs(), key=["D_PAD", "HAS_MASK", "USE_TMA", "SQ_KEY", "SK_KEY"])(_attn_fwd_fp8)
_QUANT_BLOCK = 16 if _INTERPRET else 64


def _bucket(n: int) -> int:
    return min(next_pow2(max(n, 1)), 1 << 16)


def _use_tma(q: torch.Tensor) -> bool:
    if _INTERPRET or not q.is_cuda or not HAS_TENSOR_DESCRIPTORS:
        return False
    if torch.cuda.get_device_capability(q.device)[0] < 9:
        return False
    ensure_scratch_allocator()
    return True


def _check(q, k, v, key_padding_mask, qk_format):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [B, S, H, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    b, _, h, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[2] != h or k.shape[3] != d:
        raise ValueError(f"k and v must be [B, Sk, H, D] matching q {tuple(q.shape)}; got {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if d > 256:
        raise ValueError(f"head dim {d} is larger than 256, which the 8-bit attention does not take")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"q, k, v must share one dtype among fp16/bf16/fp32; got {q.dtype}, {k.dtype}, {v.dtype}")
    if key_padding_mask is not None and tuple(key_padding_mask.shape) != (b, k.shape[1]):
        raise ValueError(f"key_padding_mask must be [B, Sk] = {(b, k.shape[1])}; got {tuple(key_padding_mask.shape)}")
    if qk_format not in QK_FORMATS:
        raise ValueError(f"qk_format must be one of {sorted(QK_FORMATS)}; got {qk_format!r}")
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        raise RuntimeError("8-bit attention is inference only (it has no backward); run it under torch.no_grad() or "
                           "torch.inference_mode(), or use a bf16 backend to train")


def quantize(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
             qk_format: str = "int8") -> Quantized:
    """The 8-bit copies and scales :func:`attention_fp8` multiplies (q, k, v ``[B, S, H, D]``, any strides)."""
    b, sq, h, d = q.shape
    sk = k.shape[1]
    d_pad = max(32, next_pow2(d))
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    qk_dtype, qmax = QK_FORMATS[qk_format]
    dev = q.device
    block = _QUANT_BLOCK
    q8 = torch.empty(b * h, sq, d_pad, device=dev, dtype=qk_dtype)
    qs = torch.empty(b * h, sq, device=dev, dtype=torch.float32)
    k8 = torch.empty(b * h, sk, d_pad, device=dev, dtype=qk_dtype)
    ks = torch.empty(b * h, sk, device=dev, dtype=torch.float32)
    k_mean = k.mean(dim=1, dtype=torch.float32).reshape(b * h, d)
    common = dict(QMAX=qmax, D=d, D_PAD=d_pad, INT8=qk_dtype == torch.int8, BLOCK=block, INTERPRET=_INTERPRET)
    _quant_rows[(cdiv(sq, block), b * h)](q, k_mean, q8, qs, *q.stride(), h, sq, scale * _LOG2E, HAS_MEAN=False,
                                          **common, **DEFAULT_OPTIONS)
    _quant_rows[(cdiv(sk, block), b * h)](k, k_mean, k8, ks, *k.stride(), h, sk, 1.0, HAS_MEAN=True, **common,
                                          **DEFAULT_OPTIONS)
    return Quantized(q8, qs, k8, ks, *quantize_v(v))


def quantize_v(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """V's part of :class:`Quantized` (v ``[B, S, H, D]``, any strides): ``(v, v_shift, v_scale)``."""
    b, sk, h, d = v.shape
    d_pad = max(32, next_pow2(d))
    dev = v.device
    block = _QUANT_BLOCK
    # V is shifted by its channels' mid-range (exact: the probabilities of a row sum to one, so the shift is added
    # back to the output) and scaled by their half-range, both from one pass.
    s_pad = cdiv(sk, 16) * 16
    v_min, v_max = torch.aminmax(v, dim=1)
    v_min, v_max = v_min.float().reshape(b * h, d), v_max.float().reshape(b * h, d)
    v_shift = torch.zeros(b * h, d_pad, device=dev, dtype=torch.float32)
    v_scale = torch.ones(b * h, d_pad, device=dev, dtype=torch.float32)
    v_shift[:, :d] = (v_max + v_min) / 2
    v_scale[:, :d] = ((v_max - v_min) / 2).clamp_min(1e-20) / FP8_MAX
    v8 = torch.empty(b * h, d_pad, s_pad, device=dev, dtype=FP8)
    _quant_v[(cdiv(s_pad, block), b * h)](v, v_shift, v_scale, v8, *v.stride(), h, sk, s_pad, D=d, D_PAD=d_pad,
                                          BLOCK=block, INTERPRET=_INTERPRET, **DEFAULT_OPTIONS)
    return v8, v_shift, v_scale


def attention_fp8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None = None,
                  scale: float | None = None, qk_format: str = "int8") -> torch.Tensor:
    """Non-causal attention with 8-bit products: q ``[B, Sq, H, D]``, k/v ``[B, Sk, H, D]`` -> ``[B, Sq, H, D]`` in
    q's dtype. ``key_padding_mask`` ``[B, Sk]``, True = attend (a query with every key masked outputs zeros).
    ``qk_format``: ``"int8"`` or ``"fp8"`` (e4m3) for Q and K; P and V are FP8 either way. No gradient."""
    _check(q, k, v, key_padding_mask, qk_format)
    if torch.compiler.is_compiling():  # one opaque op for torch.compile instead of a graph break
        return _attention_fp8_op(q, k, v, key_padding_mask, scale, qk_format)
    return _attention_fp8(q, k, v, key_padding_mask, scale, qk_format)


def _attention_fp8(q, k, v, key_padding_mask, scale, qk_format):
    o = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    return attention_quantized(quantize(q, k, v, scale, qk_format), o, q.shape[2], key_padding_mask)


@torch.library.custom_op("stdit::attention_fp8", mutates_args=())
def _attention_fp8_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: Optional[torch.Tensor],
                      scale: Optional[float], qk_format: str) -> torch.Tensor:
    return _attention_fp8(q, k, v, key_padding_mask, scale, qk_format)


@_attention_fp8_op.register_fake
def _(q, k, v, key_padding_mask, scale, qk_format):
    return torch.empty(q.shape, device=q.device, dtype=q.dtype)


def attention_quantized(qz: Quantized, out: torch.Tensor, num_heads: int,
                        key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The attention of :func:`quantize`'s output into ``out`` ``[B, Sq, H, D]`` (any strides); returns ``out``."""
    b, sq, h, d = out.shape
    if h != num_heads or qz.q.shape[0] != b * h or qz.q.shape[1] != sq:
        raise ValueError(f"out {tuple(out.shape)} does not match the quantized q {tuple(qz.q.shape)}")
    sk = qz.k.shape[1]
    if key_padding_mask is None:
        kpm, smb, sms, has_mask = qz.q_scale, 0, 0, False
    else:
        kpm = key_padding_mask.to(device=out.device, dtype=torch.bool).view(torch.uint8)
        smb, sms, has_mask = kpm.stride(0), kpm.stride(1), True
    use_tma = _use_tma(out)
    _FWD[lambda meta: (cdiv(sq, meta["BLOCK_M"]), b * h)](
        qz.q, qz.q_scale, qz.k, qz.k_scale, qz.v, qz.v_shift, qz.v_scale, out, kpm, *out.stride(), smb, sms, h, sq,
        sk, qz.v.shape[-1], _bucket(sq), _bucket(sk), D=d, D_PAD=qz.q.shape[-1], HAS_MASK=has_mask,
        USE_TMA=use_tma, INTERPRET=_INTERPRET, **DEFAULT_OPTIONS)
    return out
