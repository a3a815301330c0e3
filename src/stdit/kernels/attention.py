"""Flash attention (non-causal) in Triton: forward and backward over q/k/v read strided as ``[B, S, H, D]``.

Forward: online softmax in base 2 (log2(e) folded into the scale), fp32 accumulators, an unmasked main loop
over whole key blocks plus one masked tail block, logsumexp (base 2) saved for the backward. Backward: the two-pass
kernels of :mod:`.attention_bwd` (dK/dV, then dQ; no atomics, deterministic). This module holds the forward kernel,
the host side of both directions (checks, dispatch, plans), the ``autograd.Function`` and the functional API.

Head dims that are not powers of two (72, 96) are padded to the next power of two inside these kernels with
masked loads. On Hopper the tiles streamed by the inner loops can come through tensor descriptors (TMA), and at
head dims 64, 72, 80, 96 and 128 (no key mask, ``[B * S, H * D]`` row layouts) the forward is the warp-specialized
Gluon kernel of :mod:`.attention_sm90` (``config.override(sm90_forward=False)`` turns it off) and the backward the one-pass Gluon
kernel of :mod:`.attention_sm90_bwd` (dQ summed with bulk reduce-adds), except in torch's deterministic mode or
with ``config.override(sm90_backward=False)``; they read 72, 80 and 96 as a 64-column chunk plus a 16- or 32-column one instead
of padding. The pure-torch twin is :mod:`stdit.kernels.attention_ref`.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from . import attention_sm90 as _sm90
from . import attention_sm90_bwd as _sm90_bwd
from ._compat import HAS_TENSOR_DESCRIPTORS, current_device, ensure_scratch_allocator, in_dispatch_mode
from ._launch import DEFAULT_OPTIONS, cdiv, launch, next_pow2
from .config import CONFIG
from .attention_bwd import _DKDV, _DQ, _attn_bwd_preprocess
from .attention_tiles import (_INTERPRET, _configs, _load_tile, _make_desc, _off, _pick, _store_tile, _stream_tile,
                              _tuned)

SUPPORTED_HEAD_DIMS = frozenset({32, 48, 64, 72, 80, 96, 128})
_LOG2E = 1.4426950408889634


@triton.jit
def _fwd_block(acc, l_i, m_i, q, k_desc, v_desc, K, V, KPM, start_n, SK, sks, skd, svs, svd, sms, qk_scale,
               offs_n0, offs_d, D: tl.constexpr, D_PAD: tl.constexpr, TAIL: tl.constexpr, HAS_MASK: tl.constexpr,
               PREC: tl.constexpr, USE_TMA: tl.constexpr):
    k = _stream_tile(k_desc, K, start_n, offs_n0, offs_d, sks, skd, SK, D, D_PAD, TAIL, USE_TMA)
    qk = tl.dot(q, tl.trans(k), input_precision=PREC)
    if TAIL or HAS_MASK:
        offs_n = start_n + offs_n0
        valid = offs_n < SK
        if HAS_MASK:
            valid = valid & (tl.load(KPM + offs_n * sms, mask=valid, other=0) != 0)
        # A finite floor instead of -inf keeps every exp2 argument finite; rows that never see a valid key
        # are detected by their running max in the epilogue.
        s = tl.where(valid[None, :], qk * qk_scale, -1.0e30)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
    else:
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = _stream_tile(v_desc, V, start_n, offs_n0, offs_d, svs, svd, SK, D, D_PAD, TAIL, USE_TMA)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PREC)
    return acc, l_i, m_new


@triton.jit
def _attn_fwd(Q, K, V, O, LSE, KPM,
              sqb, sqs, sqh, sqd, skb, sks, skh, skd, svb, svs, svh, svd, sob, sos, soh, sod, smb, sms,
              H, SQ, SK, qk_scale, SQ_KEY, SK_KEY,
              D: tl.constexpr, D_PAD: tl.constexpr, HAS_MASK: tl.constexpr, PREC: tl.constexpr,
              USE_TMA: tl.constexpr, ALIGN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    Q += _off(b, sqb, h, sqh, ALIGN)
    K += _off(b, skb, h, skh, ALIGN)
    V += _off(b, svb, h, svh, ALIGN)
    O += _off(b, sob, h, soh, ALIGN)
    KPM += b * smb
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    k_desc = _make_desc(K, SK, sks, BLOCK_N, D, USE_TMA)
    v_desc = _make_desc(V, SK, svs, BLOCK_N, D, USE_TMA)

    q = _load_tile(Q, offs_m, offs_d, sqs, sqd, SQ, D, D_PAD, True)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    sk_full = (SK // BLOCK_N) * BLOCK_N
    for start_n in tl.range(0, sk_full, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        acc, l_i, m_i = _fwd_block(acc, l_i, m_i, q, k_desc, v_desc, K, V, KPM, start_n, SK, sks, skd, svs, svd,
                                   sms, qk_scale, offs_n0, offs_d, D, D_PAD, False, HAS_MASK, PREC, USE_TMA)
    if sk_full < SK:
        acc, l_i, m_i = _fwd_block(acc, l_i, m_i, q, k_desc, v_desc, K, V, KPM, sk_full, SK, sks, skd, svs, svd,
                                   sms, qk_scale, offs_n0, offs_d, D, D_PAD, True, HAS_MASK, PREC, USE_TMA)
    o = acc / l_i[:, None]
    lse = m_i + tl.math.log2(l_i)
    if HAS_MASK:
        # Every key of this query is padding: the output is zero and an infinite logsumexp zeroes its
        # probabilities in the backward.
        dead = m_i < -1.0e29
        o = tl.where(dead[:, None], 0.0, o)
        lse = tl.where(dead, float("inf"), lse)
    _store_tile(O, o.to(O.dtype.element_ty), offs_m, offs_d, sos, sod, SQ, D, D_PAD)
    tl.store(LSE + pid_bh.to(tl.int64) * SQ + offs_m, lse, mask=offs_m < SQ)

_FWD_CONFIGS = _configs([(128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 3), (128, 64, 8, 4), (128, 64, 8, 5),
                         (128, 128, 8, 2), (64, 64, 4, 3), (64, 32, 4, 2)])
_FWD = _tuned(_attn_fwd, _FWD_CONFIGS)


def _launch(kernels, key: tuple, grid, args: tuple, kwargs: dict) -> None:
    """Launch an autotuned kernel; once the tuner has picked a config for ``key``, launch that config directly.

    The tuner rebuilds its cache key from every argument on each call (and keeps references to them); on the short
    sequences where host time sets the pace that is a fifth of a launch. ``key`` must hold what the tuner's key
    holds (``_KEY`` and the dtype). ``grid`` maps the config's kwargs to the launch grid.
    """
    tuned = _pick(kernels)
    picked = tuned.__dict__.setdefault("_stdit_picked", {})
    cfg = picked.get(key)
    if cfg is None:
        tuned[grid](*args, **kwargs, **DEFAULT_OPTIONS)
        tuned.nargs = None  # do not keep this call's tensors alive
        if getattr(tuned, "best_config", None) is not None:
            best = tuned.best_config
            picked[key] = (best, {k: v for k, v in best.all_kwargs().items() if k not in best.kwargs})
        return
    cfg, options = cfg
    launch(tuned.fn, grid(cfg.kwargs), args, {**kwargs, **cfg.kwargs}, **options)


def _bucket(n: int) -> int:
    return min(next_pow2(max(n, 1)), 1 << 16)


@torch.compiler.assume_constant_result  # fixed per process: torch.compile bakes it in instead of breaking the graph
@functools.lru_cache(maxsize=None)
def _capability(index):
    return torch.cuda.get_device_capability(index)


_TMA_API = not _INTERPRET and HAS_TENSOR_DESCRIPTORS


# The eligibility checks below run on every call; at 4k tokens and below the host sets the pace, so they read each
# tensor's strides once and build no device objects.
def _tma_allowed(*tensors: torch.Tensor, any_d: bool = False) -> bool:
    """Tensor descriptors need Hopper, 16-byte aligned bases and strides and a unit inner stride; the general
    kernels also D = D_PAD (a power of two), the Hopper ones (``any_d``) read other head dims in two chunks."""
    if not _TMA_API or not CONFIG.tma:
        return False
    t0 = tensors[0]
    if not t0.is_cuda or _capability(t0.get_device())[0] < 9:
        return False
    d = t0.shape[-1]
    if d & (d - 1) and not any_d:
        return False
    for t in tensors:
        es = t.element_size()
        *outer, inner = t.stride()
        if inner != 1 or t.data_ptr() % 16 or any((s * es) % 16 for s in outer):
            return False
    ensure_scratch_allocator()
    return True


def sm90_forward_covers(q, k, v, key_padding_mask=None) -> bool:
    """Whether the Hopper forward (:mod:`.attention_sm90`) takes a call with these shapes, dtypes, strides and
    device (``config.override(sm90_forward=False)`` turns it off); pointer alignment is checked at launch. Reads no data pointer, so
    it can run while ``torch.compile`` traces."""
    if not CONFIG.sm90_forward or _INTERPRET or not q.is_cuda:
        return False
    return _sm90.supports(q, k, v, key_padding_mask) and _capability(q.get_device()) == (9, 0)


def _sm90_allowed(q, k, v, key_padding_mask) -> bool:
    return sm90_forward_covers(q, k, v, key_padding_mask) and _tma_allowed(q, k, v, any_d=True)


def sm90_backward_covers(q, k, v, key_padding_mask=None) -> bool:
    """Whether the one-pass Hopper backward (:mod:`.attention_sm90_bwd`) takes the backward of a call with these
    q, k, v: within the forward's scope, not in deterministic mode (dQ is summed with bulk reduce-adds);
    ``config.override(sm90_backward=False)`` turns it off. dO must then share the row-view layout (checked at the backward, which
    otherwise runs the two-pass kernels). Reads no data pointer, like :func:`sm90_forward_covers`."""
    return _sm90_backward_on(q) and sm90_forward_covers(q, k, v, key_padding_mask)


def _sm90_backward_on(q) -> bool:
    return (q.shape[-1] in _sm90_bwd.HEAD_DIMS and CONFIG.sm90_backward
            and not torch.are_deterministic_algorithms_enabled())


def _sm90_backward_allowed(do, q, k, v, key_padding_mask, forward_sm90: bool = False) -> bool:
    """``forward_sm90``: the forward ran the Hopper kernel on these q, k, v, so their layout and alignment are known
    to suit (only dO and the backward's own switches are left to check)."""
    if not _sm90_backward_on(q) or not _sm90.row_view(do, q.shape[-1]):
        return False
    if forward_sm90:
        return _tma_allowed(do, any_d=True)
    return sm90_forward_covers(q, k, v, key_padding_mask) and _tma_allowed(q, k, v, do, any_d=True)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [B, S, H, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    b, _, h, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[2] != h or k.shape[3] != d:
        raise ValueError(f"k and v must be [B, Sk, H, D] matching q {tuple(q.shape)}; got {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if d not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head dim {d} is not supported; supported: {sorted(SUPPORTED_HEAD_DIMS)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"q, k, v must share one dtype among fp16/bf16/fp32; got {q.dtype}, {k.dtype}, {v.dtype}")
    if key_padding_mask is not None and tuple(key_padding_mask.shape) != (b, k.shape[1]):
        raise ValueError(f"key_padding_mask must be [B, Sk] = {(b, k.shape[1])}; got {tuple(key_padding_mask.shape)}")
    for t in (q, k, v):
        if max(t.shape[1] * abs(t.stride(1)), t.shape[2] * abs(t.stride(2))) >= 2**31:
            raise ValueError("a single (batch) slice of q/k/v spans 2**31 elements or more; split the batch")


def _align(*tensors: torch.Tensor) -> int:
    """The largest power of two (<= 16) dividing every batch and head stride, in elements."""
    g = 16
    for t in tensors:
        g = math.gcd(g, math.gcd(t.stride(0), t.stride(2)))
    return g & -g if g else 16


def _mask_arg(key_padding_mask: torch.Tensor | None, like: torch.Tensor):
    if key_padding_mask is None:
        return like, 0, 0, False
    m = key_padding_mask.to(device=like.device, dtype=torch.bool).view(torch.uint8)
    return m, m.stride(0), m.stride(1), True


def _prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


# Plans: a call repeating an earlier one's signature (shapes, strides, dtypes, 16-byte alignment, scale, and the
# switches that pick a kernel) replays the Hopper kernels' bound launches, skipping the checks and the dispatch in
# between: at 4k tokens and below the host sets the pace (benchmarks/DECISIONS.md). launch() binds
# to the current device: plans key on it, and are kept only where it is the inputs' own.
_PLANS: dict = {}
_MAX_PLANS = 1024


def _remember(key, plan) -> None:
    if len(_PLANS) >= _MAX_PLANS:
        _PLANS.clear()
    _PLANS[key] = plan


def _forward_plan(run, o_shape, lse_shape):
    def plan(q, k, v):
        o = torch.empty(o_shape, device=q.device, dtype=q.dtype)
        lse = torch.empty(lse_shape, device=q.device, dtype=torch.float32)
        ensure_scratch_allocator()
        run(q, k, v, o, lse)
        return o, lse, True

    return plan


def _backward_plan(pre, pre_scalars, bwd):
    def plan(do, q, k, v, o, lse):
        delta = torch.empty_like(lse)
        dqa = torch.empty(q.shape, device=q.device, dtype=torch.float32)
        ensure_scratch_allocator()
        pre(o, do, delta, dqa, *pre_scalars)
        return bwd(do, q, k, v, lse, delta, dqa)

    return plan


def flash_attention_forward(q, k, v, key_padding_mask=None, scale=None):
    """Returns ``(o [B, Sq, H, D], lse [B, H, Sq] fp32, base 2)``."""
    o, lse, _ = _forward(q, k, v, key_padding_mask, scale)
    return o, lse


def _forward(q, k, v, key_padding_mask, scale):
    """:func:`flash_attention_forward`, and whether it ran the Hopper kernel (the backward then skips re-checking
    q, k, v)."""
    key = None
    if key_padding_mask is None and q.is_cuda:
        key = ("fwd", q.shape, k.shape, v.shape, q.stride(), k.stride(), v.stride(), q.dtype, k.dtype, v.dtype,
               q.get_device(), current_device(), scale, (q.data_ptr() | k.data_ptr() | v.data_ptr()) & 15,
               CONFIG.key())
        plan = _PLANS.get(key)
        if plan is not None:
            return plan(q, k, v)
    _check(q, k, v, key_padding_mask)
    b, sq, h, d = q.shape
    sk = k.shape[1]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    if scale <= 0:
        raise ValueError("scale must be positive")
    o = torch.empty(b, sq, h, d, device=q.device, dtype=q.dtype)
    lse = torch.empty(b, h, sq, device=q.device, dtype=torch.float32)
    if _sm90_allowed(q, k, v, key_padding_mask):
        run = _sm90.forward(q, k, v, o, lse, scale * _LOG2E, tune=CONFIG.autotune)
        if key is not None and run is not None and q.get_device() == current_device():
            _remember(key, _forward_plan(run, o.shape, lse.shape))
        return o, lse, True
    kpm, smb, sms, has_mask = _mask_arg(key_padding_mask, q)
    use_tma = _tma_allowed(k, v)
    prec, sq_key, sk_key = _prec(q.dtype), _bucket(sq), _bucket(sk)
    _launch(_FWD, (d, has_mask, prec, use_tma, sq_key, sk_key, q.dtype),
            lambda meta: (cdiv(sq, meta["BLOCK_M"]), b * h),
            (q, k, v, o, lse, kpm, *q.stride(), *k.stride(), *v.stride(), *o.stride(), smb, sms,
             h, sq, sk, scale * _LOG2E, sq_key, sk_key),
            dict(D=d, D_PAD=max(16, next_pow2(d)), HAS_MASK=has_mask, PREC=prec, USE_TMA=use_tma,
                 ALIGN=_align(q, k, v, o)))
    return o, lse, False


def flash_attention_backward(do, q, k, v, o, lse, key_padding_mask=None, scale=None, forward_sm90=False):
    """Returns ``(dq, dk, dv)``, each contiguous ``[B, S, H, D]`` in the inputs' dtype.

    On Hopper, within its scope (d=64, 72, 80, 96, 128, no key mask, row-view layouts), one pass in Gluon that sums
    dQ in fp32 with bulk reduce-adds (:mod:`.attention_sm90_bwd`; run-to-run bits of dQ may differ). Elsewhere, and
    whenever ``torch.use_deterministic_algorithms(True)`` is on, two passes, dK/dV then dQ, with no atomics
    (deterministic; a one-pass Triton variant with an atomic dQ measured slower: benchmarks/DECISIONS.md).
    ``forward_sm90``: the forward ran the Hopper kernel on these q, k, v.
    """
    key = None
    if key_padding_mask is None and q.is_cuda:
        key = ("bwd", q.shape, k.shape, q.stride(), k.stride(), v.stride(), do.stride(), o.stride(), lse.stride(),
               q.dtype, k.dtype, v.dtype, do.dtype, o.dtype, q.get_device(), current_device(), scale,
               (do.data_ptr() | q.data_ptr() | k.data_ptr() | v.data_ptr() | o.data_ptr() | lse.data_ptr()) & 15,
               forward_sm90,
               torch.are_deterministic_algorithms_enabled(), CONFIG.key())
        plan = _PLANS.get(key)
        if plan is not None:
            return plan(do, q, k, v, o, lse)
    b, sq, h, d = q.shape
    sk = k.shape[1]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    d_pad = max(16, next_pow2(d))
    delta = torch.empty_like(lse)
    pre_block = 16 if _INTERPRET else 64
    one_pass = _sm90_backward_allowed(do, q, k, v, key_padding_mask, forward_sm90)
    # The one-pass backward's fp32 dQ sums, zeroed by the preprocess (otherwise delta stands in, unread).
    dqa = torch.empty(b, sq, h, d, device=q.device, dtype=torch.float32) if one_pass else delta
    pre_scalars = (*o.stride(), *do.stride(), h, sq)
    pre = launch(_attn_bwd_preprocess, (cdiv(sq, pre_block), b * h), (o, do, delta, dqa, *pre_scalars),
                 dict(D=d, D_PAD=d_pad, ALIGN=_align(o, do), BLOCK_M=pre_block, ZERO_DQ=one_pass))
    if one_pass:
        bwd = _sm90_bwd.Plan(q, k, scale)
        grads = bwd(do, q, k, v, lse, delta, dqa)
        if key is not None and pre is not None and bwd.bound is not None and q.get_device() == current_device():
            _remember(key, _backward_plan(pre, pre_scalars, bwd))
        return grads
    dk = torch.empty(b, sk, h, d, device=q.device, dtype=k.dtype)
    dv = torch.empty_like(dk)
    kpm, smb, sms, has_mask = _mask_arg(key_padding_mask, q)
    common = dict(D=d, D_PAD=d_pad, HAS_MASK=has_mask, PREC=_prec(q.dtype), ALIGN=_align(q, k, v, do, dk))
    strides = (*q.stride(), *k.stride(), *v.stride(), *do.stride())
    keys = (h, sq, sk, scale * _LOG2E, scale, _bucket(sq), _bucket(sk))
    tune_key = (d, has_mask, common["PREC"], _bucket(sq), _bucket(sk), q.dtype)
    dq = torch.empty(b, sq, h, d, device=q.device, dtype=q.dtype)
    tma = _tma_allowed(q, do)
    _launch(_DKDV, (*tune_key, tma), lambda meta: (cdiv(sk, meta["BLOCK_N"]), b * h),
            (q, k, v, do, lse, delta, dk, dv, kpm, *strides, *dk.stride(), smb, sms, *keys),
            dict(USE_TMA=tma, **common))
    tma = _tma_allowed(k, v)
    _launch(_DQ, (*tune_key, tma), lambda meta: (cdiv(sq, meta["BLOCK_M"]), b * h),
            (q, k, v, do, lse, delta, dq, kpm, *strides, *dq.stride(), smb, sms, *keys),
            dict(USE_TMA=tma, **common))
    return dq, dk, dv


# The custom op: what torch.compile and dispatch modes (selective checkpointing's policy, fake tensors) see, one
# opaque named op instead of a graph break or a stream of launches.
@torch.library.custom_op("stdit::flash_attention_fwd", mutates_args=())
def flash_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return flash_attention_forward(q, k, v, key_padding_mask, scale)


@flash_attention_op.register_fake
def _(q, k, v, key_padding_mask, scale):
    b, sq, h, d = q.shape
    return q.new_empty(b, sq, h, d), q.new_empty(b, h, sq, dtype=torch.float32)


@torch.library.custom_op("stdit::flash_attention_bwd", mutates_args=())
def _flash_attention_bwd_op(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
    key_padding_mask: torch.Tensor | None, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return flash_attention_backward(do, q, k, v, o, lse, key_padding_mask, scale)


@_flash_attention_bwd_op.register_fake
def _(do, q, k, v, o, lse, key_padding_mask, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _flash_setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, key_padding_mask)
    ctx.scale = scale


def _flash_backward(ctx, do, dlse):
    q, k, v, o, lse, key_padding_mask = ctx.saved_tensors
    dq, dk, dv = _flash_attention_bwd_op(do, q, k, v, o, lse, key_padding_mask, ctx.scale)
    return dq, dk, dv, None, None


flash_attention_op.register_autograd(_flash_backward, setup_context=_flash_setup_context)



# The eager path: the same forward and backward through an autograd.Function, skipping the custom op's dispatch and
# its generated autograd wrapper (629 instead of 847 us of host time per forward+backward of a tiny call on an H200's
# host: benchmarks/DECISIONS.md).
class FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, key_padding_mask=None, scale=None):
        o, lse, ctx.sm90 = _forward(q, k, v, key_padding_mask, scale)
        ctx.save_for_backward(q, k, v, o, lse, key_padding_mask)
        ctx.scale = scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, key_padding_mask = ctx.saved_tensors
        dq, dk, dv = flash_attention_backward(do, q, k, v, o, lse, key_padding_mask, ctx.scale, ctx.sm90)
        return dq, dk, dv, None, None


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None = None,
                    scale: float | None = None) -> torch.Tensor:
    """Non-causal attention: q ``[B, Sq, H, D]``, k/v ``[B, Sk, H, D]`` (any strides) -> o ``[B, Sq, H, D]``.

    ``key_padding_mask`` ``[B, Sk]`` bool, True = attend; a query whose keys are all masked outputs zeros.
    ``scale`` defaults to ``1/sqrt(D)``. Differentiable in q, k and v. Under ``torch.compile`` it runs as the
    custom op ``stdit::flash_attention_fwd`` (Dynamo cannot trace the launches).
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if torch.compiler.is_compiling() or in_dispatch_mode():
        return flash_attention_op(q, k, v, key_padding_mask, scale)[0]
    return FlashAttention.apply(q, k, v, key_padding_mask, scale)

