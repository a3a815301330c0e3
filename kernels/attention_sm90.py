"""Flash attention forward for Hopper (sm_90) in Gluon, warp-specialized: the tensor cores stay busy in the softmax.

Triton's ``tl.dot`` waits for every outstanding warpgroup MMA right after the score product, so a tile's softmax
runs while the tensor cores idle, and a CTA barrier before each TMA refill keeps both warpgroups in lockstep
(``benchmarks/NOTES-attention.md``). Gluon exposes the asynchronous ``wgmma``, its wait, mbarriers and warp
specialization, and this kernel uses them:

* a one-warp load partition streams Q once and K, V through ``STAGES``-deep shared-memory rings (TMA completing on
  "ready" mbarriers; a slot is refilled after both consumers arrive on its "empty" mbarrier);
* two consumer warpgroups each own 64 query rows and synchronize only through those mbarriers, so one's softmax
  runs under the other's matrix products; within each, ``S_{j+1} = Q K_{j+1}^T`` is issued before the softmax of
  ``S_j``.

Scope: non-causal, no key padding mask, fp16/bf16, head dim 128 (d=64 measured slower than the general kernel),
any Sq and Sk (TMA zero-fills rows past the end; the last key block is masked). The general kernel in
:mod:`stdit.kernels.attention` covers everything else and computes the same function with the same logsumexp
(base 2), so the backward is shared. Gluon has no interpreter path: the CPU tests exercise the general kernel, the
``gpu`` tests this one.
"""

from __future__ import annotations

import torch
import triton
import triton.testing

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma
    from triton.experimental.gluon.language.nvidia.hopper import (warpgroup_mma, warpgroup_mma_init,
                                                                   warpgroup_mma_wait)
    # Renamed between Triton releases (3.6: async_copy_global_to_shared; later: async_load).
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    HAVE_GLUON = True
except (ImportError, AttributeError):  # pragma: no cover - Triton without Gluon's Hopper API
    HAVE_GLUON = False

# d=64 measured slower here than the general kernel (359 vs 426 TFLOP/s at B1 H24 S16384 on an H200): with
# half the matrix work per key block the softmax dominates, so only d=128 takes this path.
HEAD_DIMS = (128,)


if HAVE_GLUON:

    @gluon.jit
    def _load_kv(desc, smem, bars, tile, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
        slot = tile % STAGES
        bar = bars.index(slot)
        mbarrier.expect(bar, desc.block_type.nbytes)
        _tma_load(desc, [tile * BLOCK_N, 0], bar, smem.index(slot))

    @gluon.jit
    def _softmax_update(s, m_i, l_i, acc, qk_scale):
        m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
        p = gl.exp2(s * qk_scale - gl.expand_dims(m_new, 1))
        alpha = gl.exp2(m_i - m_new)
        l_i = l_i * alpha + gl.sum(p, 1)
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, acc.type.layout)), 1)
        return p, m_new, l_i, acc

    @gluon.jit
    def _loader(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, k_empty, v_empty,
                q_row, n_tiles, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
        # One warp streams Q once and K, V through the rings; a slot is refilled after both consumers released it.
        mbarrier.expect(q_bar, 2 * q_desc.block_type.nbytes)
        _tma_load(q_desc, [q_row, 0], q_bar, q_smem.index(0))
        _tma_load(q_desc, [q_row + q_desc.block_type.shape[0], 0], q_bar, q_smem.index(1))
        for t in range(n_tiles):
            slot = t % STAGES
            # A fresh barrier is in phase 0, so waiting on parity 1 passes: the first round needs no release.
            free = ((t // STAGES) & 1) ^ 1
            mbarrier.wait(k_empty.index(slot), free)
            _load_kv(k_desc, k_smem, k_ready, t, BLOCK_N, STAGES)
            mbarrier.wait(v_empty.index(slot), free)
            _load_kv(v_desc, v_smem, v_ready, t, BLOCK_N, STAGES)

    @gluon.jit
    def _consumer(q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, k_empty, v_empty, O, LSE, sos, row0, lse_base,
                  SQ, SK, n_tiles, qk_scale, WG: gl.constexpr, D: gl.constexpr, BLOCK_N: gl.constexpr,
                  STAGES: gl.constexpr):
        # One warpgroup, 64 query rows. S_{j+1} = Q K_{j+1}^T is issued before the softmax of S_j, and the other
        # warpgroup runs independently, so its matrix products fill the tensor cores during this one's softmax.
        dtype: gl.constexpr = q_smem.dtype
        BM: gl.constexpr = q_smem.shape[1]
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, D, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
        q = q_smem.index(WG)
        m_i = gl.full([BM], float("-inf"), gl.float32, row_layout)
        l_i = gl.full([BM], 0.0, gl.float32, row_layout)
        # Loop-carried MMA results are accumulator handles until a wait turns them back into tensors.
        acc = warpgroup_mma_init(gl.zeros([BM, D], gl.float32, o_layout))
        s_zero = gl.zeros([BM, BLOCK_N], gl.float32, s_layout)

        mbarrier.wait(q_bar, 0)
        mbarrier.wait(k_ready.index(0), 0)
        s = warpgroup_mma(q, k_smem.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        for j in range(0, n_tiles - 1):
            nxt = j + 1
            mbarrier.wait(k_ready.index(nxt % STAGES), (nxt // STAGES) & 1)
            s_next = warpgroup_mma(q, k_smem.index(nxt % STAGES).permute((1, 0)), s_zero, use_acc=False,
                                   is_async=True)
            # All but the newest group are done: S_j and P_{j-1} V_{j-1}; K_j and V_{j-1} can be refilled.
            s, acc = warpgroup_mma_wait(1, deps=[s, acc])
            mbarrier.arrive(k_empty.index(j % STAGES), count=1)
            if j > 0:
                mbarrier.arrive(v_empty.index((j - 1) % STAGES), count=1)
            p, m_i, l_i, acc = _softmax_update(s, m_i, l_i, acc, qk_scale)
            mbarrier.wait(v_ready.index(j % STAGES), (j // STAGES) & 1)
            acc = warpgroup_mma(gl.convert_layout(p.to(dtype), p_layout), v_smem.index(j % STAGES), acc,
                                is_async=True)
            s = s_next

        # The last key block: the only one that can reach past SK (TMA zero-filled those rows of K and V).
        last = n_tiles - 1
        s, acc = warpgroup_mma_wait(0, deps=[s, acc])
        cols = last * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        s = gl.where(gl.expand_dims(cols < SK, 0), s, -1.0e30)
        p, m_i, l_i, acc = _softmax_update(s, m_i, l_i, acc, qk_scale)
        mbarrier.wait(v_ready.index(last % STAGES), (last // STAGES) & 1)
        acc = warpgroup_mma(gl.convert_layout(p.to(dtype), p_layout), v_smem.index(last % STAGES), acc,
                            is_async=True)
        acc = warpgroup_mma_wait(0, deps=[acc])

        acc = acc / gl.expand_dims(gl.convert_layout(l_i, gl.SliceLayout(1, o_layout)), 1)
        offs_m = row0 + WG * BM + gl.arange(0, BM, layout=gl.SliceLayout(1, o_layout))
        offs_d = gl.arange(0, D, layout=gl.SliceLayout(0, o_layout))
        gl.store(O + gl.expand_dims(offs_m, 1) * sos + gl.expand_dims(offs_d, 0), acc.to(dtype),
                 mask=gl.expand_dims(offs_m < SQ, 1))
        rows = row0 + WG * BM + gl.arange(0, BM, layout=row_layout)
        gl.store(LSE + lse_base + rows, m_i + gl.log2(l_i), mask=rows < SQ)

    @gluon.jit
    def _attn_fwd_sm90(Q, K, V, O, LSE, sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sob, sos, soh,
                       H, SQ, SK, qk_scale,
                       D: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
        # Warp-specialized: this (default) partition and one worker are the two consumer warpgroups, each owning
        # BLOCK_M / 2 query rows; a one-warp worker issues every TMA load.
        dtype: gl.constexpr = Q.dtype.element_ty
        HALF: gl.constexpr = BLOCK_M // 2
        pid_m = gl.program_id(0)
        pid_bh = gl.program_id(1)
        b = (pid_bh // H).to(gl.int64)
        h = pid_bh % H
        Q += b * sqb + h * sqh
        K += b * skb + h * skh
        V += b * svb + h * svh
        O += b * sob + h * soh

        q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([HALF, D], dtype)
        kv_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, D], dtype)
        q_desc = tma.make_tensor_descriptor(Q, shape=[SQ, D], strides=[sqs, 1], block_shape=[HALF, D],
                                            layout=q_layout)
        k_desc = tma.make_tensor_descriptor(K, shape=[SK, D], strides=[sks, 1], block_shape=[BLOCK_N, D],
                                            layout=kv_layout)
        v_desc = tma.make_tensor_descriptor(V, shape=[SK, D], strides=[svs, 1], block_shape=[BLOCK_N, D],
                                            layout=kv_layout)
        q_smem = gl.allocate_shared_memory(dtype, [2, HALF, D], q_layout)
        k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, D], kv_layout)
        v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, D], kv_layout)
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_bar, count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(k_ready.index(i), count=1)
            mbarrier.init(v_ready.index(i), count=1)
            mbarrier.init(k_empty.index(i), count=2)
            mbarrier.init(v_empty.index(i), count=2)
        fence_async_shared()

        n_tiles = gl.cdiv(SK, BLOCK_N)
        row0 = pid_m * BLOCK_M
        lse_base = pid_bh.to(gl.int64) * SQ
        WG0: gl.constexpr = 0
        WG1: gl.constexpr = 1
        gl.warp_specialize([
            (_consumer, (q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, k_empty, v_empty, O, LSE, sos, row0,
                         lse_base, SQ, SK, n_tiles, qk_scale, WG0, D, BLOCK_N, STAGES)),
            (_consumer, (q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, k_empty, v_empty, O, LSE, sos, row0,
                         lse_base, SQ, SK, n_tiles, qk_scale, WG1, D, BLOCK_N, STAGES)),
            (_loader, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, k_empty, v_empty,
                       row0, n_tiles, BLOCK_N, STAGES)),
        ], [4, 1], [232, 24])


# (BLOCK_N, STAGES) per head dim; BLOCK_M = 128: two consumer warpgroups of 64 query rows, plus the load warp.
# BLOCK_N = 64 measured 17% slower at d=128.
_CONFIGS = {128: [(128, 3), (128, 2)]}
_TUNED = {}


def supports(q: torch.Tensor, key_padding_mask) -> bool:
    """Whether this kernel covers the call's dtype, head dim and masking; the caller checks the device (sm_90),
    shapes and, for TMA, strides and alignment."""
    return (HAVE_GLUON and key_padding_mask is None and q.dtype in (torch.float16, torch.bfloat16)
            and q.shape[-1] in HEAD_DIMS)


def _launch(cfg, q, k, v, o, lse, qk_scale):
    b, sq, h, d = q.shape
    block_n, stages = cfg
    _attn_fwd_sm90[(triton.cdiv(sq, 128), b * h)](
        q, k, v, o, lse, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
        h, sq, k.shape[1], qk_scale, D=d, BLOCK_M=128, BLOCK_N=block_n, STAGES=stages, num_warps=4,
    )


def forward(q, k, v, o, lse, qk_scale: float, tune: bool = True) -> None:
    """Write ``o`` and ``lse`` (base 2) for ``q [B, Sq, H, D]``, ``k, v [B, Sk, H, D]``; picks its config once per
    (head dim, dtype, length bucket) by timing the candidates, or takes the first with ``tune=False``."""
    d = q.shape[-1]
    key = (d, q.dtype, triton.next_power_of_2(q.shape[1]), triton.next_power_of_2(k.shape[1]))
    cfg = _TUNED.get(key)
    if cfg is None:
        cands = _CONFIGS[d]
        if tune and len(cands) > 1:
            times = [triton.testing.do_bench(lambda c=c: _launch(c, q, k, v, o, lse, qk_scale), warmup=5, rep=20)
                     for c in cands]
            cfg = cands[min(range(len(cands)), key=times.__getitem__)]
        else:
            cfg = cands[0]
        _TUNED[key] = cfg
    _launch(cfg, q, k, v, o, lse, qk_scale)
