"""Flash attention backward in Triton, two passes with no atomics (deterministic): a ``delta = rowsum(dO * O)``
preprocess, one pass that owns a key block and sweeps the queries (dK, dV), and one that owns a query block and
sweeps the keys (dQ): 7 matrix products per tile pair instead of a one-pass kernel's 5, but no dQ reduction. The host
side, which picks between these and the Hopper one-pass kernel of :mod:`.attention_sm90_bwd`, is
:func:`.attention.flash_attention_backward`.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .attention_tiles import _configs, _load_tile, _make_desc, _off, _store_tile, _stream_tile, _tuned


@triton.jit
def _attn_bwd_preprocess(O, DO, DELTA, DQA, sob, sos, soh, sod, sdb, sds, sdh, sdd, H, SQ,
                         D: tl.constexpr, D_PAD: tl.constexpr, ALIGN: tl.constexpr, BLOCK_M: tl.constexpr,
                         ZERO_DQ: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    o = _load_tile(O + _off(b, sob, h, soh, ALIGN), offs_m, offs_d, sos, sod, SQ, D, D_PAD, True)
    do = _load_tile(DO + _off(b, sdb, h, sdh, ALIGN), offs_m, offs_d, sds, sdd, SQ, D, D_PAD, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + pid_bh.to(tl.int64) * SQ + offs_m, delta, mask=offs_m < SQ)
    if ZERO_DQ:
        # The one-pass backward adds dQ into a contiguous fp32 [B, SQ, H, D] buffer: zero its rows here, which
        # saves the host a fill launch per call.
        zeros = tl.zeros([BLOCK_M, D_PAD], tl.float32)
        _store_tile(DQA + ((b * SQ) * H + h) * D, zeros, offs_m, offs_d, H * D, 1, SQ, D, D_PAD)


@triton.jit
def _dkdv_block(dk, dv, k, v, q_desc, do_desc, Q, DO, LSE, DELTA, start_m, SQ, sqs, sqd, sds, sdd, qk_scale,
                offs_m0, offs_d, D: tl.constexpr, D_PAD: tl.constexpr, TAIL: tl.constexpr, PREC: tl.constexpr,
                USE_TMA: tl.constexpr):
    """One query block's share of dK and dV for this key block."""
    offs_m = start_m + offs_m0
    q = _stream_tile(q_desc, Q, start_m, offs_m0, offs_d, sqs, sqd, SQ, D, D_PAD, TAIL, USE_TMA)
    if TAIL:
        lse = tl.load(LSE + offs_m, mask=offs_m < SQ, other=float("inf"))
        delta = tl.load(DELTA + offs_m, mask=offs_m < SQ, other=0.0)
    else:
        lse = tl.load(LSE + offs_m)
        delta = tl.load(DELTA + offs_m)
    st = tl.dot(k, tl.trans(q), input_precision=PREC)
    pt = tl.math.exp2(st * qk_scale - lse[None, :])
    do = _stream_tile(do_desc, DO, start_m, offs_m0, offs_d, sds, sdd, SQ, D, D_PAD, TAIL, USE_TMA)
    dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=PREC)
    dpt = tl.dot(v, tl.trans(do), input_precision=PREC)
    dst = (pt * (dpt - delta[None, :])).to(q.dtype)
    dk = tl.dot(dst, q, dk, input_precision=PREC)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, KPM,
                   sqb, sqs, sqh, sqd, skb, sks, skh, skd, svb, svs, svh, svd, sdb, sds, sdh, sdd,
                   sgb, sgs, sgh, sgd, smb, sms,
                   H, SQ, SK, qk_scale, sm_scale, SQ_KEY, SK_KEY,
                   D: tl.constexpr, D_PAD: tl.constexpr, HAS_MASK: tl.constexpr, PREC: tl.constexpr,
                   USE_TMA: tl.constexpr, ALIGN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    Q += _off(b, sqb, h, sqh, ALIGN)
    DO += _off(b, sdb, h, sdh, ALIGN)
    LSE += pid_bh.to(tl.int64) * SQ
    DELTA += pid_bh.to(tl.int64) * SQ
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    q_desc = _make_desc(Q, SQ, sqs, BLOCK_M, D, USE_TMA)
    do_desc = _make_desc(DO, SQ, sds, BLOCK_M, D, USE_TMA)
    # Key rows past SK load as zeros; whatever they accumulate is never stored.
    k = _load_tile(K + _off(b, skb, h, skh, ALIGN), offs_n, offs_d, sks, skd, SK, D, D_PAD, True)
    v = _load_tile(V + _off(b, svb, h, svh, ALIGN), offs_n, offs_d, svs, svd, SK, D, D_PAD, True)
    dk = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    dv = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    sq_full = (SQ // BLOCK_M) * BLOCK_M
    for start_m in range(0, sq_full, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        dk, dv = _dkdv_block(dk, dv, k, v, q_desc, do_desc, Q, DO, LSE, DELTA, start_m, SQ, sqs, sqd, sds, sdd,
                             qk_scale, offs_m0, offs_d, D, D_PAD, False, PREC, USE_TMA)
    if sq_full < SQ:
        dk, dv = _dkdv_block(dk, dv, k, v, q_desc, do_desc, Q, DO, LSE, DELTA, sq_full, SQ, sqs, sqd, sds, sdd,
                             qk_scale, offs_m0, offs_d, D, D_PAD, True, PREC, USE_TMA)
    dk = dk * sm_scale
    if HAS_MASK:
        # A padded key gets no probability, so its gradients are exactly zero.
        keep = tl.load(KPM + b * smb + offs_n * sms, mask=offs_n < SK, other=0) != 0
        dk = tl.where(keep[:, None], dk, 0.0)
        dv = tl.where(keep[:, None], dv, 0.0)
    DK += _off(b, sgb, h, sgh, ALIGN)
    DV += _off(b, sgb, h, sgh, ALIGN)
    _store_tile(DK, dk.to(DK.dtype.element_ty), offs_n, offs_d, sgs, sgd, SK, D, D_PAD)
    _store_tile(DV, dv.to(DV.dtype.element_ty), offs_n, offs_d, sgs, sgd, SK, D, D_PAD)


@triton.jit
def _dq_block(dq, q, do, lse, delta, k_desc, v_desc, K, V, KPM, start_n, SK, sks, skd, svs, svd, sms, qk_scale,
              offs_n0, offs_d, D: tl.constexpr, D_PAD: tl.constexpr, TAIL: tl.constexpr, HAS_MASK: tl.constexpr,
              PREC: tl.constexpr, USE_TMA: tl.constexpr):
    k = _stream_tile(k_desc, K, start_n, offs_n0, offs_d, sks, skd, SK, D, D_PAD, TAIL, USE_TMA)
    s = tl.dot(q, tl.trans(k), input_precision=PREC)
    p = tl.math.exp2(s * qk_scale - lse[:, None])
    if TAIL or HAS_MASK:
        offs_n = start_n + offs_n0
        valid = offs_n < SK
        if HAS_MASK:
            valid = valid & (tl.load(KPM + offs_n * sms, mask=valid, other=0) != 0)
        p = tl.where(valid[None, :], p, 0.0)
    v = _stream_tile(v_desc, V, start_n, offs_n0, offs_d, svs, svd, SK, D, D_PAD, TAIL, USE_TMA)
    dp = tl.dot(do, tl.trans(v), input_precision=PREC)
    ds = p * (dp - delta[:, None])
    dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PREC)
    return dq


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, KPM,
                 sqb, sqs, sqh, sqd, skb, sks, skh, skd, svb, svs, svh, svd, sdb, sds, sdh, sdd,
                 sgb, sgs, sgh, sgd, smb, sms,
                 H, SQ, SK, qk_scale, sm_scale, SQ_KEY, SK_KEY,
                 D: tl.constexpr, D_PAD: tl.constexpr, HAS_MASK: tl.constexpr, PREC: tl.constexpr,
                 USE_TMA: tl.constexpr, ALIGN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    K += _off(b, skb, h, skh, ALIGN)
    V += _off(b, svb, h, svh, ALIGN)
    KPM += b * smb
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    k_desc = _make_desc(K, SK, sks, BLOCK_N, D, USE_TMA)
    v_desc = _make_desc(V, SK, svs, BLOCK_N, D, USE_TMA)
    q = _load_tile(Q + _off(b, sqb, h, sqh, ALIGN), offs_m, offs_d, sqs, sqd, SQ, D, D_PAD, True)
    do = _load_tile(DO + _off(b, sdb, h, sdh, ALIGN), offs_m, offs_d, sds, sdd, SQ, D, D_PAD, True)
    row = pid_bh.to(tl.int64) * SQ + offs_m
    lse = tl.load(LSE + row, mask=offs_m < SQ, other=float("inf"))
    delta = tl.load(DELTA + row, mask=offs_m < SQ, other=0.0)
    dq = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    sk_full = (SK // BLOCK_N) * BLOCK_N
    for start_n in range(0, sk_full, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        dq = _dq_block(dq, q, do, lse, delta, k_desc, v_desc, K, V, KPM, start_n, SK, sks, skd, svs, svd, sms,
                       qk_scale, offs_n0, offs_d, D, D_PAD, False, HAS_MASK, PREC, USE_TMA)
    if sk_full < SK:
        dq = _dq_block(dq, q, do, lse, delta, k_desc, v_desc, K, V, KPM, sk_full, SK, sks, skd, svs, svd, sms,
                       qk_scale, offs_n0, offs_d, D, D_PAD, True, HAS_MASK, PREC, USE_TMA)
    dq = dq * sm_scale
    _store_tile(DQ + _off(b, sgb, h, sgh, ALIGN), dq.to(DQ.dtype.element_ty), offs_m, offs_d, sgs, sgd, SQ, D, D_PAD)


_DKDV_CONFIGS = _configs([(64, 128, 8, 2), (64, 128, 8, 3), (64, 128, 8, 4), (32, 128, 4, 3), (32, 128, 4, 5),
                          (32, 128, 8, 4), (128, 64, 8, 2), (64, 128, 4, 2), (64, 64, 4, 3), (32, 64, 4, 2)])
_DQ_CONFIGS = _configs([(128, 64, 8, 2), (128, 64, 8, 3), (128, 64, 8, 4), (128, 32, 4, 3), (128, 32, 4, 5),
                        (64, 128, 8, 2), (128, 64, 4, 2), (64, 64, 4, 3), (64, 32, 4, 2)])
_DKDV = _tuned(_attn_bwd_dkdv, _DKDV_CONFIGS)
_DQ = _tuned(_attn_bwd_dq, _DQ_CONFIGS)
