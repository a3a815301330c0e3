"""Opt-in one-pass flash attention backward in Triton (``STDIT_ATTN_ATOMIC_BWD=1``): dQ summed with fp32 atomics.

A program owns a key block (dK, dV in registers) and adds each query block's share of dQ into an fp32 buffer, so S
and dP are computed once per tile pair (5 matrix products instead of the two-pass backward's 7). On an H100 it
measured slower than the two passes (the kernel holds dK, dV and a dQ partial in registers and pays the dQ reduction
traffic; see ``benchmarks/DECISIONS.md``), and on Hopper the Gluon one-pass backward of
:mod:`.attention_sm90_bwd` is the default at head dims 64 and 128, so this stays a switch. It shares the tiles,
launch helpers and autotuning of :mod:`.attention_tiles`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import cdiv
from .attention import _tma_allowed
from .attention_bwd import _dkdv_step
from .attention_tiles import _KEY, _configs, _load_tile, _make_desc, _off, _pick, _store_tile, _tuned


@triton.jit
def _fused_block(dk, dv, k, v, keep, q_desc, do_desc, Q, DO, LSE, DELTA, DQA, start_m, SQ, sqs, sqd, sds, sdd,
                 sas, qk_scale, offs_m0, offs_d, D: tl.constexpr, D_PAD: tl.constexpr, TAIL: tl.constexpr,
                 HAS_MASK: tl.constexpr, PREC: tl.constexpr, USE_TMA: tl.constexpr, DQ_TMA: tl.constexpr):
    offs_m = start_m + offs_m0
    dk, dv, dst = _dkdv_step(dk, dv, k, v, keep, q_desc, do_desc, Q, DO, LSE, DELTA, start_m, SQ, sqs, sqd, sds, sdd,
                             qk_scale, offs_m0, offs_d, D, D_PAD, TAIL, HAS_MASK, PREC, USE_TMA)
    # Key rows past SK are zeros in k, so their (garbage) dS adds nothing here.
    dq = tl.dot(tl.trans(dst), k, input_precision=PREC)
    if DQ_TMA:
        # A bulk tensor reduce: one asynchronous add of the whole tile in L2; rows past SQ are clipped.
        DQA.atomic_add([start_m, 0], dq)
    else:
        ptrs = DQA + offs_m[:, None] * sas + offs_d[None, :]
        if TAIL or D != D_PAD:
            tl.atomic_add(ptrs, dq, mask=(offs_m[:, None] < SQ) & (offs_d[None, :] < D), sem="relaxed")
        else:
            tl.atomic_add(ptrs, dq, sem="relaxed")
    return dk, dv


@triton.jit
def _attn_bwd_fused(Q, K, V, DO, LSE, DELTA, DK, DV, DQA, KPM,
                    sqb, sqs, sqh, sqd, skb, sks, skh, skd, svb, svs, svh, svd, sdb, sds, sdh, sdd,
                    sgb, sgs, sgh, sgd, sab, sas, sah, smb, sms,
                    H, SQ, SK, qk_scale, sm_scale, SQ_KEY, SK_KEY,
                    D: tl.constexpr, D_PAD: tl.constexpr, HAS_MASK: tl.constexpr, PREC: tl.constexpr,
                    USE_TMA: tl.constexpr, ALIGN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    DQ_TMA: tl.constexpr):
    # One pass: this program owns a key block (dK, dV in registers) and adds each query block's share of dQ into
    # an fp32 buffer with atomics, so S and dP are computed once per tile pair (5 matrix products instead of 7).
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    Q += _off(b, sqb, h, sqh, ALIGN)
    DO += _off(b, sdb, h, sdh, ALIGN)
    DQA += b * sab + h * sah
    LSE += pid_bh.to(tl.int64) * SQ
    DELTA += pid_bh.to(tl.int64) * SQ
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    q_desc = _make_desc(Q, SQ, sqs, BLOCK_M, D, USE_TMA)
    do_desc = _make_desc(DO, SQ, sds, BLOCK_M, D, USE_TMA)
    dqa = _make_desc(DQA, SQ, sas, BLOCK_M, D, DQ_TMA)
    k = _load_tile(K + _off(b, skb, h, skh, ALIGN), offs_n, offs_d, sks, skd, SK, D, D_PAD, True)
    v = _load_tile(V + _off(b, svb, h, svh, ALIGN), offs_n, offs_d, svs, svd, SK, D, D_PAD, True)
    keep = offs_n < SK
    if HAS_MASK:
        # A padded key gets no probability: its dK, dV and its share of dQ are exactly zero.
        keep = tl.load(KPM + b * smb + offs_n * sms, mask=keep, other=0) != 0
    dk = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    dv = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    sq_full = (SQ // BLOCK_M) * BLOCK_M
    for start_m in range(0, sq_full, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        dk, dv = _fused_block(dk, dv, k, v, keep, q_desc, do_desc, Q, DO, LSE, DELTA, dqa, start_m, SQ, sqs, sqd,
                              sds, sdd, sas, qk_scale, offs_m0, offs_d, D, D_PAD, False, HAS_MASK, PREC, USE_TMA,
                              DQ_TMA)
    if sq_full < SQ:
        dk, dv = _fused_block(dk, dv, k, v, keep, q_desc, do_desc, Q, DO, LSE, DELTA, dqa, sq_full, SQ, sqs, sqd,
                              sds, sdd, sas, qk_scale, offs_m0, offs_d, D, D_PAD, True, HAS_MASK, PREC, USE_TMA,
                              DQ_TMA)
    dk = dk * sm_scale
    DK += _off(b, sgb, h, sgh, ALIGN)
    DV += _off(b, sgb, h, sgh, ALIGN)
    _store_tile(DK, dk.to(DK.dtype.element_ty), offs_n, offs_d, sgs, sgd, SK, D, D_PAD)
    _store_tile(DV, dv.to(DV.dtype.element_ty), offs_n, offs_d, sgs, sgd, SK, D, D_PAD)


_FUSED_CONFIGS = _configs([(64, 128, 8, 2), (64, 128, 8, 3), (32, 128, 4, 2), (64, 64, 4, 2), (32, 64, 4, 2)])
_FUSED = _tuned(_attn_bwd_fused, _FUSED_CONFIGS, _KEY + ["DQ_TMA"], ["DQA"])


def backward_atomic(q, k, v, do, lse, delta, dk, dv, kpm, smb, sms, strides: tuple, keys: tuple, common: dict,
                    scale: float):
    """dq (dk, dv are written in place) for :func:`.attention.flash_attention_backward`, which passes the q, k, v, dO
    ``strides``, the mask and its strides, the length/scale ``keys`` and the ``common`` constexprs."""
    b, sq, h, d = q.shape
    dqa = torch.zeros(b, sq, h, d, device=q.device, dtype=torch.float32)
    use_tma = _tma_allowed(q, do)
    # A bulk tensor reduce of the dQ tile measured faster than per-element atomics (45.8 vs 52.1 ms).
    dq_tma = use_tma and hasattr(tl.tensor_descriptor, "atomic_add")
    _pick(_FUSED)[lambda meta: (cdiv(k.shape[1], meta["BLOCK_N"]), b * h)](
        q, k, v, do, lse, delta, dk, dv, dqa, kpm, *strides, *dk.stride(), dqa.stride(0), dqa.stride(1),
        dqa.stride(2), smb, sms, *keys, USE_TMA=use_tma, DQ_TMA=dq_tma, **common,
    )
    return dqa.mul_(scale).to(q.dtype), dk, dv
