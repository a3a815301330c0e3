"""One-pass flash attention backward for Hopper (sm_90), in Gluon.

A program owns a block of 128 keys; two consumer warpgroups own 64 keys each and hold dK, dV for them in
registers (as 64-column chunks of the head dim: at d=128 four [64, 64] fp32 accumulators, at d=64 two). A one-warp
load partition brings K, V once and streams Q and dO in 64-row blocks (each as 64-column chunks, [64, 64] bf16 =
128-byte swizzled rows) through a ring. Per query block each consumer computes S^T = K Q^T and dP^T = V dO^T for
its keys, P^T and dS^T in registers (the A operands of dV += P^T dO and dK += dS^T Q), and writes dS (transposed)
to shared memory. dQ = dS K needs both consumers' dS (an mbarrier): at d=128 consumer w computes dQ[:, 64w:64w+64]
over all 128 keys; at d=64 the consumers take turns computing the whole tile (block i: consumer i % 2), so only
one of them waits. dQ goes to shared memory, where a one-warp writer partition adds it into an fp32 dQ buffer with
a TMA bulk reduce. Five matrix products per tile pair (the two-pass backward does seven).

The load warp also brings each query block's logsumexp and delta into shared memory (published by dO's barrier),
so the consumers never wait on global loads (benchmarks/DECISIONS.md: that and the ring depth, the register split
and the dK/dV stores, each with its measurement). When there are fewer key blocks than SMs (text
cross-attention: 512 keys), each key block's query range is split over several programs (:func:`query_splits`)
and dK, dV are summed with fp32 atomics.

Head dims 72, 80 and 96 are a 64-column chunk plus the forward's 16- or 32-column tail chunk (at 72 overlapping the
first by 8 columns, which are zeroed in the tail tiles of K and V); the consumers take turns computing dQ, as at
d=64.

Scope (as the forward): d=64, 72, 80, 96 and 128, fp16/bf16, no key mask, [B*S, H*D] row views of q, k, v, do;
the caller (:func:`.attention.flash_attention_backward`) checks it.
"""

from __future__ import annotations

import functools

import torch

from ._device import num_sms
from ._launch import cdiv, launch
from .attention_sm90 import HAVE_GLUON, chunks

HEAD_DIMS = (64, 72, 80, 96, 128)

if HAVE_GLUON:
    from ._compat import fence_async_shared, gl, gluon, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
    from ._compat import tma_reduce_add as _tma_reduce_add
    from .attention_sm90 import _cta_barrier, _load_block, _tiles, _tma_load, _tma_store, _zero_leading_cols

    @gluon.jit
    def _bwd_loader(q_desc, k_desc, v_desc, do_desc, qh_desc, kh_desc, vh_desc, doh_desc, LSE, DELTA, q_smem, k_smem,
                    v_smem, do_smem, qh_smem, kh_smem, vh_smem, doh_smem, lse_smem, delta_smem, kv_bar, q_ready,
                    q_empty, do_ready, do_empty, q_row0, k_row, col, lse_base, sq_left, n_m, STAGES: gl.constexpr,
                    HC: gl.constexpr, HW: gl.constexpr):
        # K and V of this program's 128 keys once (consumer w's 64 keys: tile w of each ring; with a second chunk,
        # HW > 0, its columns HC .. HC + HW - 1 too), then Q and dO. Rows and lse_base start at this program's first
        # query block; sq_left queries remain from there.
        HB: gl.constexpr = 64
        vec_layout: gl.constexpr = gl.BlockedLayout([2], [32], [1], [0])
        if HW > 0:
            mbarrier.expect(kv_bar, 2 * (k_desc.block_type.nbytes + v_desc.block_type.nbytes +
                                         kh_desc.block_type.nbytes + vh_desc.block_type.nbytes))
        else:
            mbarrier.expect(kv_bar, 2 * (k_desc.block_type.nbytes + v_desc.block_type.nbytes))
        for w in gl.static_range(2):
            _tma_load(k_desc, [k_row + w * HB, col], kv_bar, k_smem.index(w))
            _tma_load(v_desc, [k_row + w * HB, col], kv_bar, v_smem.index(w))
            if HW > 0:
                _tma_load(kh_desc, [k_row + w * HB, col + HC], kv_bar, kh_smem.index(w))
                _tma_load(vh_desc, [k_row + w * HB, col + HC], kv_bar, vh_smem.index(w))
        for i in range(n_m):
            slot = i % STAGES
            free = ((i // STAGES) & 1) ^ 1
            row = q_row0 + i * HB
            mbarrier.wait(q_empty.index(slot), free)
            _load_block(q_desc, qh_desc, row, col, col + HC, q_ready.index(slot), q_smem.index(slot),
                        qh_smem.index(slot), HW > 0)
            # This block's logsumexp and delta go to shared memory with dO (published by its barrier's arrive), so
            # the consumers read them there instead of waiting on global loads; rows past SQ get lse = +inf (P = 0).
            rows = i * HB + gl.arange(0, HB, layout=vec_layout)
            lse = gl.load(LSE + lse_base + rows, mask=rows < sq_left, other=float("inf"))
            delta = gl.load(DELTA + lse_base + rows, mask=rows < sq_left, other=0.0)
            mbarrier.wait(do_empty.index(slot), free)
            lse_smem.index(slot).store(lse)
            delta_smem.index(slot).store(delta)
            _cta_barrier()
            _load_block(do_desc, doh_desc, row, col, col + HC, do_ready.index(slot), do_smem.index(slot),
                        doh_smem.index(slot), HW > 0)


    @gluon.jit
    def _bwd_writer(dq_desc, dqh_desc, dq_smem, dqh_smem, dq_ready, dq_empty, dk_desc, dkh_desc, dv_desc, dvh_desc,
                    q_smem, qh_smem, do_smem, doh_smem, grads_ready, q_row0, k_row, key0, col, SK, n_m,
                    HC: gl.constexpr, HW: gl.constexpr, TMA_GRADS: gl.constexpr):
        # One warp: each dQ tile (fp32, shared memory) is added to the dQ buffer with a TMA bulk reduce. d=128: per
        # query block one 64-column half from each consumer; otherwise the whole tile (and its second chunk), from
        # consumer (block % 2). Then, with TMA_GRADS, it stores the consumers' dK and dV tiles (see
        # :func:`_bwd_consumer`); the descriptors live here, not in the consumers' registers.
        HB: gl.constexpr = 64
        for i in range(n_m):
            if HW == HB:
                for w in gl.static_range(2):
                    mbarrier.wait(dq_ready.index(w), i & 1)
                    _tma_reduce_add(dq_desc, [q_row0 + i * HB, col + w * HB], dq_smem.index(w))
                tma.store_wait(0)
                mbarrier.arrive(dq_empty.index(0), count=1)
                mbarrier.arrive(dq_empty.index(1), count=1)
            else:
                w = i % 2
                mbarrier.wait(dq_ready.index(w), (i // 2) & 1)
                _tma_reduce_add(dq_desc, [q_row0 + i * HB, col], dq_smem.index(w))
                if HW > 0:
                    _tma_reduce_add(dqh_desc, [q_row0 + i * HB, col + HC], dqh_smem.index(w))
                tma.store_wait(0)
                mbarrier.arrive(dq_empty.index(w), count=1)
        if TMA_GRADS:
            mbarrier.wait(grads_ready, 0)
            for w in gl.static_range(2):
                if key0 + w * HB + HB <= SK:
                    row = k_row + w * HB
                    _tma_store(dk_desc, [row, col], q_smem.index(w))
                    _tma_store(dv_desc, [row, col], do_smem.index(w))
                    if HW > 0 and HC == HB:
                        _tma_store(dkh_desc, [row, col + HC], qh_smem.index(w))
                        _tma_store(dvh_desc, [row, col + HC], doh_smem.index(w))
            tma.store_wait(0)


    @gluon.jit
    def _bwd_block(i, dk_lo, dk_hi, dv_lo, dv_hi, q_smem, k_smem, v_smem, do_smem, qh_smem, kh_smem, vh_smem,
                   doh_smem, lse_smem, delta_smem, ds_smem, dq_smem, dqh_smem, q_ready, q_empty, do_ready, do_empty,
                   ds_ready, dq_ready, dq_empty, keep, qk_scale, sm_scale, WG: gl.constexpr, STAGES: gl.constexpr,
                   HW: gl.constexpr, DQ: gl.constexpr):
        # Query block i for one consumer's 64 keys: S^T = K Q^T and dP^T = V dO^T for its keys, P^T and dS^T in
        # registers (the A operands of dV += P^T dO and dK += dS^T Q), dS (transposed) to shared memory for dQ.
        # The head dim is a 64-column chunk (lo) and, with HW > 0, a second HW-column chunk (hi: d=128 its second
        # half; d=72, 80, 96 a 16- or 32-column tail; d=64 none, the hi arguments unused).
        # DQ: this consumer computes a dQ tile for this block (d=128: always, its 64-column half; otherwise every
        # other block, the whole tile).
        dtype: gl.constexpr = q_smem.dtype
        HB: gl.constexpr = 64
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                             instr_shape=[16, HB, 16])
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
        qry_layout: gl.constexpr = gl.SliceLayout(0, acc_layout)
        slot = i % STAGES
        phase = (i // STAGES) & 1
        q_lo = q_smem.index(slot)
        do_lo = do_smem.index(slot)
        k_lo = k_smem.index(WG)
        v_lo = v_smem.index(WG)
        if HW > 0:
            q_hi = qh_smem.index(slot)
            do_hi = doh_smem.index(slot)
            k_hi = kh_smem.index(WG)
            v_hi = vh_smem.index(WG)
            NCH: gl.constexpr = 2
        else:
            NCH: gl.constexpr = 1
        if HW > 0 and HW < HB:
            acch_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                                  instr_shape=[16, HW, 16])
            ah_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acch_layout, k_width=2)
        mbarrier.wait(q_ready.index(slot), phase)
        zero = gl.zeros([HB, HB], gl.float32, acc_layout)
        st = warpgroup_mma(k_lo, q_lo.permute((1, 0)), zero, use_acc=False, is_async=True)
        if HW > 0:
            st = warpgroup_mma(k_hi, q_hi.permute((1, 0)), st, is_async=True)
        mbarrier.wait(do_ready.index(slot), phase)
        lse = lse_smem.index(slot).load(qry_layout)
        dpt = warpgroup_mma(v_lo, do_lo.permute((1, 0)), zero, use_acc=False, is_async=True)
        if HW > 0:
            dpt = warpgroup_mma(v_hi, do_hi.permute((1, 0)), dpt, is_async=True)
        # Groups retire in order: NCH outstanding = the dP^T products; S^T is done.
        st = warpgroup_mma_wait(NCH, deps=[st])
        # Keys past SK (zeros or the next sequence's rows) and queries past SQ (lse = +inf) get P = 0.
        pt = gl.where(keep, gl.exp2(st * qk_scale - gl.expand_dims(lse, 0)), 0.0)
        delta = delta_smem.index(slot).load(qry_layout)
        dpt = warpgroup_mma_wait(0, deps=[dpt])
        dst = (pt * (dpt - gl.expand_dims(delta, 0))).to(dtype)
        # P^T and dS^T are the register A operands of the dV and dK products (live until those complete).
        pt_a = gl.convert_layout(pt.to(dtype), a_layout)
        dst_a = gl.convert_layout(dst, a_layout)
        if HW > 0 and HW < HB:
            pth_a = gl.convert_layout(pt_a, ah_layout)
            dsth_a = gl.convert_layout(dst_a, ah_layout)
        else:
            pth_a = pt_a
            dsth_a = dst_a
        dv_lo = warpgroup_mma(pt_a, do_lo, dv_lo, is_async=True)
        if HW > 0:
            dv_hi = warpgroup_mma(pth_a, do_hi, dv_hi, is_async=True)
        dk_lo = warpgroup_mma(dst_a, q_lo, dk_lo, is_async=True)
        if HW > 0:
            dk_hi = warpgroup_mma(dsth_a, q_hi, dk_hi, is_async=True)
        # dS for dQ: [queries, keys] in shared memory, both consumers' keys before dQ reads them.
        buf = i % 2
        ds_smem.index(2 * buf + WG).store(gl.permute(dst, [1, 0]))
        fence_async_shared()
        _cta_barrier()  # every thread's part of dS is written before the one arrive
        mbarrier.arrive(ds_ready.index(buf), count=1)
        if DQ:
            mbarrier.wait(ds_ready.index(buf), (i // 2) & 1)
            if HW == HB:  # dQ[:, 64 WG : 64 WG + 64] over all 128 keys
                if WG == 0:
                    k_wg = k_smem
                else:
                    k_wg = kh_smem
                dq = warpgroup_mma(ds_smem.index(2 * buf), k_wg.index(0), zero, use_acc=False, is_async=True)
                dq = warpgroup_mma(ds_smem.index(2 * buf + 1), k_wg.index(1), dq, is_async=True)
                dv_lo, dv_hi, dk_lo, dk_hi, dq, pt_a, dst_a = warpgroup_mma_wait(
                    0, deps=[dv_lo, dv_hi, dk_lo, dk_hi, dq, pt_a, dst_a])
                dq_phase = (i & 1) ^ 1
            else:  # the whole dQ tile over all 128 keys
                dq = warpgroup_mma(ds_smem.index(2 * buf), k_smem.index(0), zero, use_acc=False, is_async=True)
                dq = warpgroup_mma(ds_smem.index(2 * buf + 1), k_smem.index(1), dq, is_async=True)
                if HW > 0:
                    # The second chunk's first columns were zeroed in K where the chunks overlap, so this adds 0
                    # there.
                    zero_h = gl.zeros([HB, HW], gl.float32, acch_layout)
                    dqh = warpgroup_mma(ds_smem.index(2 * buf), kh_smem.index(0), zero_h, use_acc=False,
                                        is_async=True)
                    dqh = warpgroup_mma(ds_smem.index(2 * buf + 1), kh_smem.index(1), dqh, is_async=True)
                    dv_lo, dv_hi, dk_lo, dk_hi, dq, dqh, pt_a, dst_a, pth_a, dsth_a = warpgroup_mma_wait(
                        0, deps=[dv_lo, dv_hi, dk_lo, dk_hi, dq, dqh, pt_a, dst_a, pth_a, dsth_a])
                else:
                    dv_lo, dk_lo, dq, pt_a, dst_a = warpgroup_mma_wait(0, deps=[dv_lo, dk_lo, dq, pt_a, dst_a])
                dq_phase = ((i // 2) & 1) ^ 1
            mbarrier.arrive(q_empty.index(slot), count=1)
            mbarrier.arrive(do_empty.index(slot), count=1)
            # dQ to shared memory once the writer warp's previous bulk reduce has read it; the writer adds it to
            # the fp32 dQ buffer while this warpgroup goes on.
            mbarrier.wait(dq_empty.index(WG), dq_phase)
            dq_smem.index(WG).store(dq * sm_scale)
            if HW > 0 and HW < HB:
                dqh_smem.index(WG).store(dqh * sm_scale)
            fence_async_shared()
            _cta_barrier()
            mbarrier.arrive(dq_ready.index(WG), count=1)
        else:
            if HW == HB:
                dv_lo, dv_hi, dk_lo, dk_hi, pt_a, dst_a = warpgroup_mma_wait(
                    0, deps=[dv_lo, dv_hi, dk_lo, dk_hi, pt_a, dst_a])
            elif HW > 0:
                dv_lo, dv_hi, dk_lo, dk_hi, pt_a, dst_a, pth_a, dsth_a = warpgroup_mma_wait(
                    0, deps=[dv_lo, dv_hi, dk_lo, dk_hi, pt_a, dst_a, pth_a, dsth_a])
            else:
                dv_lo, dk_lo, pt_a, dst_a = warpgroup_mma_wait(0, deps=[dv_lo, dk_lo, pt_a, dst_a])
            mbarrier.arrive(q_empty.index(slot), count=1)
            mbarrier.arrive(do_empty.index(slot), count=1)
        return dk_lo, dk_hi, dv_lo, dv_hi

    @gluon.jit
    def _store_grad(G, ptrs, g, mask, SPLIT: gl.constexpr):
        if SPLIT:  # other programs hold the other query blocks' parts: sum into the fp32 buffer
            gl.atomic_add(G + ptrs, g, mask=mask)
        else:
            gl.store(G + ptrs, g.to(G.dtype.element_ty), mask=mask)

    @gluon.jit
    def _store_grads(DK, DV, dk_lo, dv_lo, dk_hi, dv_hi, key0, sgs, SK, SPLIT: gl.constexpr, HC: gl.constexpr,
                     HW: gl.constexpr, PARTS: gl.constexpr):
        # dK, dV of keys key0 .. key0 + 63 from registers, masked to keys < SK: both chunks (PARTS 0) or only the
        # second (PARTS 2). The second chunk's columns that the first also covers (d=72: 8) are not stored.
        HB: gl.constexpr = 64
        OV: gl.constexpr = HB - HC
        if PARTS == 0:
            layout: gl.constexpr = dk_lo.type.layout
            keys = key0 + gl.arange(0, HB, layout=gl.SliceLayout(1, layout))
            cols = gl.arange(0, HB, layout=gl.SliceLayout(0, layout))
            ptrs = gl.expand_dims(keys, 1) * sgs + gl.expand_dims(cols, 0)
            keep = gl.expand_dims(keys < SK, 1)
            _store_grad(DK, ptrs, dk_lo, keep, SPLIT)
            _store_grad(DV, ptrs, dv_lo, keep, SPLIT)
        if HW > 0:
            layout_h: gl.constexpr = dk_hi.type.layout
            keys_h = key0 + gl.arange(0, HB, layout=gl.SliceLayout(1, layout_h))
            cols_h = gl.arange(0, HW, layout=gl.SliceLayout(0, layout_h))
            ptrs_h = gl.expand_dims(keys_h, 1) * sgs + gl.expand_dims(HC + cols_h, 0)
            mask_h = gl.expand_dims(keys_h < SK, 1) & gl.expand_dims(cols_h >= OV, 0)
            _store_grad(DK, ptrs_h, dk_hi, mask_h, SPLIT)
            _store_grad(DV, ptrs_h, dv_hi, mask_h, SPLIT)

    @gluon.jit
    def _bwd_consumer(q_smem, k_smem, v_smem, do_smem, qh_smem, kh_smem, vh_smem, doh_smem, lse_smem, delta_smem,
                      ds_smem, dq_smem, dqh_smem, kv_bar, q_ready, q_empty, do_ready, do_empty, ds_ready, dq_ready,
                      dq_empty, done, grads_ready, DK, DV, key0, sgs, SK, n_m, qk_scale, sm_scale,
                      WG: gl.constexpr, STAGES: gl.constexpr, SPLIT: gl.constexpr, HC: gl.constexpr, HW: gl.constexpr,
                      TMA_GRADS: gl.constexpr):
        HB: gl.constexpr = 64
        # Columns of the second chunk that the first also covers (d=72: 8): zeroed in this consumer's K and V tiles,
        # so that S and dP count them once; its dK, dV columns there are not stored.
        OV: gl.constexpr = HB - HC
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                             instr_shape=[16, HB, 16])
        key_layout: gl.constexpr = gl.SliceLayout(1, acc_layout)
        dk_lo = gl.zeros([HB, HB], gl.float32, acc_layout)
        dv_lo = gl.zeros([HB, HB], gl.float32, acc_layout)
        if HW > 0 and HW < HB:
            acch_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                                  instr_shape=[16, HW, 16])
        else:
            acch_layout: gl.constexpr = acc_layout
        dk_hi = gl.zeros([HB, HW if HW > 0 else HB], gl.float32, acch_layout)
        dv_hi = gl.zeros([HB, HW if HW > 0 else HB], gl.float32, acch_layout)
        keys = key0 + WG * HB + gl.arange(0, HB, layout=key_layout)
        keep = gl.expand_dims(keys < SK, 1)
        mbarrier.wait(kv_bar, 0)
        if OV > 0:
            _zero_leading_cols(kh_smem.index(WG), OV)
            _zero_leading_cols(vh_smem.index(WG), OV)
        if HW == HB:
            for i in range(n_m):
                dk_lo, dk_hi, dv_lo, dv_hi = _bwd_block(
                    i, dk_lo, dk_hi, dv_lo, dv_hi, q_smem, k_smem, v_smem, do_smem, qh_smem, kh_smem, vh_smem,
                    doh_smem, lse_smem, delta_smem, ds_smem, dq_smem, dqh_smem, q_ready, q_empty, do_ready, do_empty,
                    ds_ready, dq_ready, dq_empty, keep, qk_scale, sm_scale, WG, STAGES, HW, True)
        else:
            # One dQ tile per block (d=64, or a 64-column chunk and a tail): the consumers take turns computing it
            # (block i: consumer i % 2), so only that one waits for the other's dS. The other cannot overwrite its
            # dS buffer too early: it writes it again two blocks on, after this consumer's dQ completed (it first
            # waits for this consumer's dS of the block in between). Two blocks per iteration keep the turn static.
            for i2 in range(n_m // 2):
                for j in gl.static_range(2):
                    dk_lo, dk_hi, dv_lo, dv_hi = _bwd_block(
                        2 * i2 + j, dk_lo, dk_hi, dv_lo, dv_hi, q_smem, k_smem, v_smem, do_smem, qh_smem, kh_smem,
                        vh_smem, doh_smem, lse_smem, delta_smem, ds_smem, dq_smem, dqh_smem, q_ready, q_empty,
                        do_ready, do_empty, ds_ready, dq_ready, dq_empty, keep, qk_scale, sm_scale, WG, STAGES, HW,
                        WG == j)
            if n_m % 2 == 1:
                dk_lo, dk_hi, dv_lo, dv_hi = _bwd_block(
                    n_m - 1, dk_lo, dk_hi, dv_lo, dv_hi, q_smem, k_smem, v_smem, do_smem, qh_smem, kh_smem, vh_smem,
                    doh_smem, lse_smem, delta_smem, ds_smem, dq_smem, dqh_smem, q_ready, q_empty, do_ready, do_empty,
                    ds_ready, dq_ready, dq_empty, keep, qk_scale, sm_scale, WG, STAGES, HW, WG == 0)

        if not TMA_GRADS:
            _store_grads(DK, DV, dk_lo * sm_scale, dv_lo, dk_hi * sm_scale, dv_hi, key0 + WG * HB, sgs, SK, SPLIT,
                         HC, HW, 0)
        else:
            # dK, dV of 64 whole keys leave through shared memory, stored by the writer warp with TMA: from
            # registers, in the wgmma accumulator layout, each warp store covers 16 bytes of 8 rows, and at B4 H12
            # S1024 d128 that took ~6 us of each program's ~54 (H200). Once both consumers are past their last block
            # (the barrier), the Q and dO rings are free: consumer w stages its tiles in slot w. Keys past SK (a
            # tail block: those rows belong to the next sequence) and a tail chunk overlapping the first (d=72) take
            # masked stores from registers.
            mbarrier.arrive(done, count=1)
            mbarrier.wait(done, 0)
            dtype: gl.constexpr = q_smem.dtype
            if key0 + WG * HB + HB <= SK:
                q_smem.index(WG).store((dk_lo * sm_scale).to(dtype))
                do_smem.index(WG).store(dv_lo.to(dtype))
                if HW > 0 and OV == 0:
                    qh_smem.index(WG).store((dk_hi * sm_scale).to(dtype))
                    doh_smem.index(WG).store(dv_hi.to(dtype))
                fence_async_shared()
                _cta_barrier()
                if HW > 0 and OV > 0:
                    _store_grads(DK, DV, dk_lo, dv_lo, dk_hi * sm_scale, dv_hi, key0 + WG * HB, sgs, SK, SPLIT,
                                 HC, HW, 2)
            else:
                _store_grads(DK, DV, dk_lo * sm_scale, dv_lo, dk_hi * sm_scale, dv_hi, key0 + WG * HB, sgs, SK,
                             SPLIT, HC, HW, 0)
            mbarrier.arrive(grads_ready, count=1)


    @gluon.jit
    def _attn_bwd_sm90(Q, K, V, DO, DQA, DK, DV, LSE, DELTA, sqs, sks, svs, sds, sgb, sgs, sgh, B, H, SQ, SK,
                       qk_scale, sm_scale, m_per, D: gl.constexpr, HW: gl.constexpr, STAGES: gl.constexpr,
                       SPLIT: gl.constexpr, REGS: gl.constexpr, TMA_GRADS: gl.constexpr):
        # HW: width of the head dim's second chunk (columns D - HW .. D - 1): 0 at d=64, 64 at d=128, 16 or 32 at
        # d=72, 80, 96.
        HB: gl.constexpr = 64
        HC: gl.constexpr = D - HW
        pid_n = gl.program_id(0)
        pid_bh = gl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        q_desc, q_smem = _tiles(Q, B * SQ, H * D, sqs, HB, HB, STAGES)
        do_desc, do_smem = _tiles(DO, B * SQ, H * D, sds, HB, HB, STAGES)
        k_desc, k_smem = _tiles(K, B * SK, H * D, sks, HB, HB, 2)
        v_desc, v_smem = _tiles(V, B * SK, H * D, svs, HB, HB, 2)
        dq_desc, dq_smem = _tiles(DQA, B * SQ, H * D, H * D, HB, HB, 2)
        tile_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([HB, HB], Q.dtype.element_ty)
        if HW == HB:  # the second half reads through the same descriptors
            qh_desc, doh_desc, kh_desc, vh_desc = q_desc, do_desc, k_desc, v_desc
            qh_smem = gl.allocate_shared_memory(Q.dtype.element_ty, [STAGES, HB, HB], tile_layout)
            doh_smem = gl.allocate_shared_memory(Q.dtype.element_ty, [STAGES, HB, HB], tile_layout)
            kh_smem = gl.allocate_shared_memory(Q.dtype.element_ty, [2, HB, HB], tile_layout)
            vh_smem = gl.allocate_shared_memory(Q.dtype.element_ty, [2, HB, HB], tile_layout)
        elif HW > 0:
            qh_desc, qh_smem = _tiles(Q, B * SQ, H * D, sqs, HB, HW, STAGES)
            doh_desc, doh_smem = _tiles(DO, B * SQ, H * D, sds, HB, HW, STAGES)
            kh_desc, kh_smem = _tiles(K, B * SK, H * D, sks, HB, HW, 2)
            vh_desc, vh_smem = _tiles(V, B * SK, H * D, svs, HB, HW, 2)
        else:  # placeholders, never read
            qh_desc, qh_smem, doh_desc, doh_smem = q_desc, q_smem, do_desc, do_smem
            kh_desc, kh_smem, vh_desc, vh_smem = k_desc, k_smem, v_desc, v_smem
        if HW > 0 and HW < HB:
            dqh_desc, dqh_smem = _tiles(DQA, B * SQ, H * D, H * D, HB, HW, 2)
        else:
            dqh_desc, dqh_smem = dq_desc, dq_smem
        if not TMA_GRADS:  # placeholders, never read
            dk_desc, dkh_desc, dv_desc, dvh_desc = q_desc, q_desc, q_desc, q_desc
        else:  # [64, 64] (and [64, HW]) boxes of the [B * SK, H * D] row views of dK and dV
            dk_desc = tma.make_tensor_descriptor(DK, shape=[B * SK, H * D], strides=[sgs, 1], block_shape=[HB, HB],
                                                 layout=tile_layout)
            dv_desc = tma.make_tensor_descriptor(DV, shape=[B * SK, H * D], strides=[sgs, 1], block_shape=[HB, HB],
                                                 layout=tile_layout)
            if HW > 0 and HW < HB:
                tail_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([HB, HW], Q.dtype.element_ty)
                dkh_desc = tma.make_tensor_descriptor(DK, shape=[B * SK, H * D], strides=[sgs, 1],
                                                      block_shape=[HB, HW], layout=tail_layout)
                dvh_desc = tma.make_tensor_descriptor(DV, shape=[B * SK, H * D], strides=[sgs, 1],
                                                      block_shape=[HB, HW], layout=tail_layout)
            else:
                dkh_desc, dvh_desc = dk_desc, dv_desc
        vec_layout: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[0])
        lse_smem = gl.allocate_shared_memory(gl.float32, [STAGES, HB], vec_layout)
        delta_smem = gl.allocate_shared_memory(gl.float32, [STAGES, HB], vec_layout)
        ds_smem = gl.allocate_shared_memory(Q.dtype.element_ty, [4, HB, HB], tile_layout)
        bar_layout: gl.constexpr = mbarrier.MBarrierLayout()
        kv_bar = gl.allocate_shared_memory(gl.int64, [1], bar_layout)
        q_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar_layout)
        q_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar_layout)
        do_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar_layout)
        do_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar_layout)
        ds_ready = gl.allocate_shared_memory(gl.int64, [2, 1], bar_layout)
        dq_ready = gl.allocate_shared_memory(gl.int64, [2, 1], bar_layout)
        dq_empty = gl.allocate_shared_memory(gl.int64, [2, 1], bar_layout)
        done = gl.allocate_shared_memory(gl.int64, [1], bar_layout)
        grads_ready = gl.allocate_shared_memory(gl.int64, [1], bar_layout)
        mbarrier.init(kv_bar, count=1)
        mbarrier.init(done, count=2)
        mbarrier.init(grads_ready, count=2)
        for i in gl.static_range(STAGES):
            mbarrier.init(q_ready.index(i), count=1)
            mbarrier.init(do_ready.index(i), count=1)
            mbarrier.init(q_empty.index(i), count=2)
            mbarrier.init(do_empty.index(i), count=2)
        for i in gl.static_range(2):
            mbarrier.init(ds_ready.index(i), count=2)
            mbarrier.init(dq_ready.index(i), count=1)
            mbarrier.init(dq_empty.index(i), count=1)
        fence_async_shared()

        # With SPLIT, program (key block, b * H + h, s) takes query blocks [s * m_per, (s + 1) * m_per) only.
        m0 = gl.program_id(2) * m_per
        n_m = gl.minimum(gl.cdiv(SQ, HB) - m0, m_per)
        q_row0 = b * SQ + m0 * HB
        key0 = pid_n * 128
        k_row = b * SK + key0
        col = h * D
        lse_base = pid_bh.to(gl.int64) * SQ + m0 * HB
        sq_left = SQ - m0 * HB
        DK += b.to(gl.int64) * sgb + h * sgh
        DV += b.to(gl.int64) * sgb + h * sgh
        WG0: gl.constexpr = 0
        WG1: gl.constexpr = 1
        gl.warp_specialize([
            (_bwd_consumer, (q_smem, k_smem, v_smem, do_smem, qh_smem, kh_smem, vh_smem, doh_smem, lse_smem,
                             delta_smem, ds_smem, dq_smem, dqh_smem, kv_bar, q_ready, q_empty, do_ready, do_empty,
                             ds_ready, dq_ready, dq_empty, done, grads_ready, DK, DV, key0, sgs, SK, n_m, qk_scale,
                             sm_scale, WG0, STAGES, SPLIT, HC, HW, TMA_GRADS)),
            (_bwd_consumer, (q_smem, k_smem, v_smem, do_smem, qh_smem, kh_smem, vh_smem, doh_smem, lse_smem,
                             delta_smem, ds_smem, dq_smem, dqh_smem, kv_bar, q_ready, q_empty, do_ready, do_empty,
                             ds_ready, dq_ready, dq_empty, done, grads_ready, DK, DV, key0, sgs, SK, n_m, qk_scale,
                             sm_scale, WG1, STAGES, SPLIT, HC, HW, TMA_GRADS)),
            (_bwd_loader, (q_desc, k_desc, v_desc, do_desc, qh_desc, kh_desc, vh_desc, doh_desc, LSE, DELTA, q_smem,
                           k_smem, v_smem, do_smem, qh_smem, kh_smem, vh_smem, doh_smem, lse_smem, delta_smem, kv_bar,
                           q_ready, q_empty, do_ready, do_empty, q_row0, k_row, col, lse_base, sq_left, n_m, STAGES,
                           HC, HW)),
            (_bwd_writer, (dq_desc, dqh_desc, dq_smem, dqh_smem, dq_ready, dq_empty, dk_desc, dkh_desc, dv_desc,
                           dvh_desc, q_smem, qh_smem, do_smem, doh_smem, grads_ready, q_row0, k_row, key0, col, SK, n_m,
                           HC, HW, TMA_GRADS)),
        ], [4, 1, 1], [REGS, 24, 24])


# Registers per thread of each consumer warpgroup (setmaxnreg); the load and dQ-writer warps keep 24 each.
CONSUMER_REGS = 240


def default_stages(d: int) -> int:
    """Depth of the Q/dO ring, as measured per head dim (benchmarks/DECISIONS.md)."""
    return 4 if d == 64 else 3


# At these head dims, programs sweeping at most TMA_GRADS_MAX_BLOCKS 64-row query blocks store dK and dV through
# shared memory with TMA (the writer warp issues the stores); the others store them from registers. The TMA stores
# save the register stores' few microseconds per program, but ptxas schedules that build's consumer loop slightly
# worse, which a program pays on every block: a gain only for short sweeps (benchmarks/DECISIONS.md).
TMA_GRADS_HEAD_DIMS = (72, 128)
TMA_GRADS_MAX_BLOCKS = 32


def constexprs(d: int, stages: int, split: bool, tma_grads: bool = False) -> dict:
    """The kernel's compile-time arguments at head dim ``d``; ``tma_grads`` (not with ``split``): dK and dV leave
    through shared memory and TMA stores."""
    if split and tma_grads:
        raise ValueError("tma_grads needs split=False: split programs add fp32 partial sums from registers")
    return dict(D=d, HW=second_chunk(d), STAGES=stages, SPLIT=split, REGS=CONSUMER_REGS, TMA_GRADS=tma_grads)


def second_chunk(d: int) -> int:
    """Width of the head dim's second chunk in this kernel (the first is 64 columns wide): none at d=64, the second
    half at d=128, the forward's tail chunk (:func:`.attention_sm90.chunks`) at d=72, 80 and 96."""
    if d in (64, 128):
        return d - 64
    return chunks(d)[1]


@functools.lru_cache(maxsize=1024)
def query_splits(key_programs: int, query_blocks: int, sms: int) -> int:
    """How many parts to split each key block's query range into. A program owns 128 keys, so a short key range
    (text cross-attention: 512 keys x 12 heads = 48 programs) leaves most SMs idle; then the query blocks are spread
    over more programs, picking the count that minimizes waves x (query blocks per program + 2, for the program's
    K/V load and its dK/dV atomics). One wave or more of key programs: no split."""
    if key_programs >= sms or query_blocks < 2:
        return 1
    best, best_cost = 1, None
    for n in range(1, min(query_blocks, 64) + 1):
        per = -(-query_blocks // n)
        cost = -(-key_programs * -(-query_blocks // per) // sms) * (per + 2)
        if best_cost is None or cost < best_cost:
            best, best_cost = n, cost
    return best


class Plan:
    """The backward's launch for one call signature (q's and k's shapes, the scale, the ring depth and the query
    split): ``plan(do, q, k, v, lse, delta, dqa)`` allocates the gradients, launches, and returns (dq, dk, dv).
    After its first call it keeps the launch bound (:class:`~._launch.Bound`), so later calls on tensors of the same
    shapes, strides, dtypes and alignment skip the launch's key."""

    def __init__(self, q, k, scale, stages=None, splits=None):
        b, sq, h, d = q.shape
        sk = k.shape[1]
        if stages is None:
            stages = default_stages(d)
        n_kb, n_m = cdiv(sk, 128), cdiv(sq, 64)
        if splits is None:
            splits = query_splits(n_kb * b * h, n_m, num_sms(q.device.index))
        per = cdiv(n_m, splits)
        splits = cdiv(n_m, per)
        self.split = splits > 1
        self.q_shape, self.k_shape, self.dtype = q.shape, k.shape, q.dtype
        self.grid = (n_kb, b * h, splits)
        tma_grads = not self.split and d in TMA_GRADS_HEAD_DIMS and per <= TMA_GRADS_MAX_BLOCKS
        self.constexprs = constexprs(d, stages, self.split, tma_grads)
        self.tail = (b, h, sq, sk, scale * 1.4426950408889634, scale, per)
        self.bound = None

    def __call__(self, do, q, k, v, lse, delta, dqa=None):
        dev = q.device
        if dqa is None:
            dqa = torch.zeros(self.q_shape, device=dev, dtype=torch.float32)
        if self.split:
            dk, dv = torch.zeros((2, *self.k_shape), device=dev, dtype=torch.float32).unbind(0)
        else:
            dk = torch.empty(self.k_shape, device=dev, dtype=self.dtype)
            dv = torch.empty_like(dk)
        args = (q, k, v, do, dqa, dk, dv, lse, delta, q.stride(1), k.stride(1), v.stride(1), do.stride(1),
                dk.stride(0), dk.stride(1), dk.stride(2), *self.tail)
        if self.bound is None:
            self.bound = launch(_attn_bwd_sm90, self.grid, args, self.constexprs, num_warps=4)
        else:
            self.bound(*args)
        # Separate casts: the gradients must not share storage (custom ops may not return aliases of each other).
        if self.split:
            return dqa.to(self.dtype), dk.to(self.dtype), dv.to(self.dtype)
        return dqa.to(self.dtype), dk, dv


def backward(do, q, k, v, o, lse, delta, scale, stages=None, splits=None, dqa=None):
    """dq, dk, dv for the forward's ``o`` and base-2 ``lse``; ``delta = rowsum(do * o)`` ([B, H, Sq] fp32).
    ``dqa``: a zeroed, contiguous fp32 ``[B, Sq, H, D]`` buffer that dQ is summed into (allocated here if None).
    ``stages``: depth of the Q/dO ring (default :func:`default_stages`: 4 at d=64, else 3).
    ``splits``: query-range parts per key block (default: :func:`query_splits`)."""
    return Plan(q, k, scale, stages, splits)(do, q, k, v, lse, delta, dqa)
