"""Flash attention forward for Hopper (sm_90) in Gluon: warp-specialized, ping-pong scheduled, persistent.

Triton's ``tl.dot`` waits for every outstanding warpgroup MMA right after the score product, so a tile's softmax
runs while the tensor cores idle, and a CTA barrier before each TMA refill keeps the warpgroups in lockstep
(``benchmarks/DECISIONS.md``). Gluon exposes the asynchronous ``wgmma``, its wait, mbarriers and warp
specialization, and this kernel uses them:

* a one-warp load partition streams each tile's Q blocks and K, V through ``STAGES``-deep shared-memory rings
  (TMA completing on "ready" mbarriers; a slot is refilled after every consumer arrived on its "empty" mbarrier);
* ``NW`` consumer warpgroups (2 or 3 at d=128, 3 at d=64) each own 64 query rows. Per key block a consumer issues
  ``S_j = Q K_j^T`` and ``O += P_{j-1} V_{j-1}`` back to back, then runs the softmax of ``S_j`` under them. Three
  consumers at d=128 have no registers left for P: it reaches the P V product through their O staging tiles;
* ping-pong: the consumers take turns to issue (a ring of "turn" mbarriers), so one's softmax runs under the
  others' matrix products instead of all softmaxes at once;
* persistent: ``min(tiles, SMs)`` programs walk the output tiles, and the load warp fetches the next tile's
  blocks during this tile's last products and epilogue (no cold start per tile). Where the last round of tiles
  would leave many SMs idle, the launch is split (``PART``; :data:`SPLIT_TAIL_MAX`; ``config.override(
  split="never")`` turns it off): the whole rounds, then the last round's key blocks in one even range per program, merged after;
* at d=128 with two consumers Q is the score products' register operand, read from shared memory once per tile;
  at d=64 the softmax's row sums run on the tensor cores (P times a ones tile), not as adds;
* epilogue: a whole 64-row block of O goes to a shared-memory staging tile and leaves with an asynchronous TMA
  store, so the consumer starts its next tile without issuing a store per register pair (masked stores remain for
  a block that ends past Sq, the overlapping d=72 tail chunk, and d=128 with three stages, where no staging fits).

Q, K and V are read through descriptors on their ``[B * S, H * D]`` row views, so one descriptor per tensor serves
every (batch, head). Head dims 72, 80 and 96 are read as two column chunks, a 64-column one and a 16- or 32-column
tail (at 72 the tail starts at column 56, so the chunks overlap by 8 columns, zeroed in the tail of Q), instead of
being padded to 128: 80 or 96 columns of matrix work per row instead of 128. Scope: non-causal, no key padding
mask, fp16/bf16, head dim 64, 72, 80, 96 or 128, any Sq and Sk (rows past the end are the next sequence's or TMA
zeros: the last key block is masked, extra query rows are not stored). The
general kernel in :mod:`stdit.kernels.attention` covers everything else and computes the same function with the
same logsumexp (base 2), so the backward is shared. Gluon has no interpreter path: the CPU tests exercise the
general kernel, the ``gpu`` tests this one.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
import triton.testing

from ._compat import HAVE_GLUON, TRITON_VERSION
from ._device import num_sms
from ._launch import cdiv, launch, next_pow2
from .config import CONFIG

if HAVE_GLUON:
    from ._compat import cta_barrier as _cta_barrier
    from ._compat import fence_async_shared, gl, gluon, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
    from ._compat import tma_load as _tma_load
    from ._compat import tma_store as _tma_store

# d=64 needs the third consumer warpgroup and the ping-pong: with half the matrix work per key block the softmax
# dominates (benchmarks/DECISIONS.md).
HEAD_DIMS = (64, 72, 80, 96, 128)


def chunks(d: int) -> tuple[int, int]:
    """(main chunk width D0, tail chunk width DT) of head dim ``d``: one chunk at d=64 and 128; 72 = 64 + 16 (the
    tail starts at column 56, overlapping the main chunk by 8 columns), 80 = 64 + 16, 96 = 64 + 32."""
    if d in (64, 128):
        return d, 0
    return 64, 16 if d <= 80 else 32


if HAVE_GLUON:

    @gluon.jit
    def _load_block(desc, tdesc, row, col, tcol, bar, dst, tdst, TAIL: gl.constexpr):
        # One block into shared memory through TMA, completing on ``bar``; with TAIL its second column chunk (from
        # column tcol, through tdesc) too, on the same barrier.
        if TAIL:
            mbarrier.expect(bar, desc.block_type.nbytes + tdesc.block_type.nbytes)
            _tma_load(tdesc, [row, tcol], bar, tdst)
        else:
            mbarrier.expect(bar, desc.block_type.nbytes)
        _tma_load(desc, [row, col], bar, dst)

    @gluon.jit
    def _full_tiles(n_tiles, PART: gl.constexpr):
        # The whole tiles a launch walks, program by program in turn (pid, pid + G, ...): all of them (PART 0), or
        # only the whole rounds (PART 1, a split launch's first part: the last, partial round is left to PART 2).
        if PART == 1:
            return (n_tiles // gl.num_programs(0)) * gl.num_programs(0)
        else:
            return n_tiles

    @gluon.jit
    def _tail_range(n_tiles, n_kv):
        # A split launch's second part (PART 2): this program's share of the last round's key blocks. Those
        # (n_tiles - n_full) x n_kv blocks, tile after tile, are cut into G even contiguous ranges [u0, u1), one per
        # program, so the programs end within a key block of each other instead of a whole tile apart. A range is
        # shorter than a tile, so it spans at most two tiles: n_seg segments. (:func:`split_ranges` is the same
        # arithmetic on the host.)
        G = gl.num_programs(0)
        pid = gl.program_id(0)
        n_full = (n_tiles // G) * G  # the first part's whole rounds, on as many programs
        L = (n_tiles - n_full) * n_kv
        u0 = pid * L // G
        u1 = (pid + 1) * L // G
        n_seg = gl.where(u1 > u0, (u1 - 1) // n_kv - u0 // n_kv + 1, 0)
        return n_full, u0, u1, n_seg

    @gluon.jit
    def _segment(i, n_full, u0, u1, n_kv):
        # Segment i (0 or 1) of this program's tail range: (tile, first key block, key blocks).
        ti = u0 // n_kv + i
        j0 = gl.where(i == 0, u0 - ti * n_kv, 0)
        return n_full + ti, j0, gl.minimum(n_kv, u1 - ti * n_kv) - j0

    @gluon.jit
    def _load_tile(q_desc, k_desc, v_desc, qt_desc, kt_desc, vt_desc, q_smem, k_smem, v_smem, qt_smem, kt_smem, vt_smem,
                   q_ready, q_empty, k_ready, v_ready, k_empty, v_empty, H, SQ, SK, n_m, tile, j0, n_blk, t, tc,
                   NW: gl.constexpr, D: gl.constexpr, DT: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
        # One output tile's Q blocks (one per consumer), then its key blocks j0 .. j0 + n_blk - 1 through the rings.
        WG_ROWS: gl.constexpr = q_smem.shape[1]
        CT: gl.constexpr = D - DT
        bh = tile // n_m
        b = bh // H
        col = (bh % H) * D
        q_row = b * SQ + (tile % n_m) * (NW * WG_ROWS)
        for w in gl.static_range(NW):
            # A fresh barrier is in phase 0, so waiting on parity 1 passes: the first round needs no release.
            mbarrier.wait(q_empty.index(w), (tc & 1) ^ 1)
            _load_block(q_desc, qt_desc, q_row + w * WG_ROWS, col, col + CT, q_ready.index(w), q_smem.index(w),
                        qt_smem.index(w), DT > 0)
        for j in range(n_blk):
            slot = t % STAGES
            free = ((t // STAGES) & 1) ^ 1
            row = b * SK + (j0 + j) * BLOCK_N
            mbarrier.wait(k_empty.index(slot), free)
            _load_block(k_desc, kt_desc, row, col, col + CT, k_ready.index(slot), k_smem.index(slot),
                        kt_smem.index(slot), DT > 0)
            mbarrier.wait(v_empty.index(slot), free)
            _load_block(v_desc, vt_desc, row, col, col + CT, v_ready.index(slot), v_smem.index(slot),
                        vt_smem.index(slot), DT > 0)
            t += 1
        return t, tc + 1

    @gluon.jit
    def _loader(q_desc, k_desc, v_desc, qt_desc, kt_desc, vt_desc, q_smem, k_smem, v_smem, qt_smem, kt_smem, vt_smem,
                q_ready, q_empty, k_ready, v_ready, k_empty, v_empty, H, SQ, SK, n_m, n_tiles, NW: gl.constexpr,
                D: gl.constexpr, DT: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                PART: gl.constexpr):
        # One warp issues every TMA load: per output tile one Q block per consumer, then K and V through the rings.
        # The rings' slot counter runs on across tiles, so the next tile's first blocks load under this tile's end.
        # DT > 0: each block also has a tail chunk (columns D - DT .. D - 1), loaded on the same barrier.
        n_kv = gl.cdiv(SK, BLOCK_N)
        t = 0
        tc = 0
        if PART < 2:
            n_full = _full_tiles(n_tiles, PART)
            for tile in range(gl.program_id(0), n_full, gl.num_programs(0)):
                t, tc = _load_tile(q_desc, k_desc, v_desc, qt_desc, kt_desc, vt_desc, q_smem, k_smem, v_smem, qt_smem,
                                   kt_smem, vt_smem, q_ready, q_empty, k_ready, v_ready, k_empty, v_empty, H, SQ, SK,
                                   n_m, tile, 0, n_kv, t, tc, NW, D, DT, BLOCK_N, STAGES)
        else:
            n_full, u0, u1, n_seg = _tail_range(n_tiles, n_kv)
            for i in range(n_seg):
                tile, j0, n_blk = _segment(i, n_full, u0, u1, n_kv)
                t, tc = _load_tile(q_desc, k_desc, v_desc, qt_desc, kt_desc, vt_desc, q_smem, k_smem, v_smem,
                                   qt_smem, kt_smem, vt_smem, q_ready, q_empty, k_ready, v_ready, k_empty, v_empty, H,
                                   SQ, SK, n_m, tile, j0, n_blk, t, tc, NW, D, DT, BLOCK_N, STAGES)

    @gluon.jit
    def _turn_wait(turn, WG: gl.constexpr, k, PINGPONG: gl.constexpr):
        # Ping-pong: consumer WG issues its matrix products only in its turn (WG 0 starts without waiting).
        if PINGPONG:
            if WG == 0:
                mbarrier.wait(turn.index(0), (k & 1) ^ 1)
            else:
                mbarrier.wait(turn.index(WG), k & 1)

    @gluon.jit
    def _turn_pass(turn, WG: gl.constexpr, NW: gl.constexpr, PINGPONG: gl.constexpr):
        if PINGPONG:
            mbarrier.arrive(turn.index((WG + 1) % NW), count=1)

    @gluon.jit
    def _last_key_block(s, q_empty, WG: gl.constexpr, last_cols, n_left, SK, QREG: gl.constexpr,
                        LOCAL_COLS: gl.constexpr, masked):
        # The tile's last key block: Q is free for the next tile (with QREG it was freed when read into registers).
        # With ``masked`` the block is the sequence's last, and only it reaches past SK (those K, V rows are zeros
        # or the next sequence's; their probabilities are set to 0).
        if not QREG:
            mbarrier.arrive(q_empty.index(WG), count=1)
        if masked:
            if LOCAL_COLS:  # the column indices made here, not held across the key loop (registers: P_SMEM)
                cols = gl.arange(0, s.shape[1], layout=gl.SliceLayout(0, s.type.layout))
                keep = cols < n_left
            else:
                keep = last_cols < SK
            s = gl.where(gl.expand_dims(keep, 0), s, -1.0e30)
        return s

    @gluon.jit
    def _zero_leading_cols(tile, N: gl.constexpr):
        # Zero the first N columns of a [rows, cols] shared-memory tile that this warpgroup reads next with wgmma:
        # every thread stores its part, fences it for the async proxy, and the warpgroup syncs.
        COLS: gl.constexpr = tile.shape[1]
        layout: gl.constexpr = gl.BlockedLayout([1, 8], [256 // COLS, COLS // 8], [4, 1], [1, 0])
        x = tile.load(layout)
        cols = gl.arange(0, COLS, layout=gl.SliceLayout(0, layout))
        tile.store(gl.where(gl.expand_dims(cols >= N, 0), x, gl.zeros_like(x)))
        fence_async_shared()
        _cta_barrier()

    @gluon.jit
    def _stage_p(p, p_smem, O_TMA: gl.constexpr):
        # P_SMEM: this warpgroup's 16-bit P into its staging tile, the A operand of the next P V product (which the
        # caller has made sure is past reading the previous P; with O_TMA the tile may still be an O block leaving).
        if O_TMA:
            tma.store_wait(0)
        p_smem.store(p)
        fence_async_shared()
        _cta_barrier()

    @gluon.jit
    def _store_rows(ptr, x, row0, row_stride, SQ, FIRST_COL: gl.constexpr):
        # x [rows, cols] (a wgmma accumulator layout) to rows row0 + i (those < SQ), columns FIRST_COL and up.
        layout: gl.constexpr = x.type.layout
        offs_m = row0 + gl.arange(0, x.shape[0], layout=gl.SliceLayout(1, layout))
        offs_d = gl.arange(0, x.shape[1], layout=gl.SliceLayout(0, layout))
        mask = gl.expand_dims(offs_m < SQ, 1) & gl.expand_dims(offs_d >= FIRST_COL, 0)
        gl.store(ptr + gl.expand_dims(offs_m, 1) * row_stride + gl.expand_dims(offs_d, 0), x, mask=mask)

    @gluon.jit
    def _store_o(ptr, out, out_t, row0, row_stride, SQ, CT: gl.constexpr, OV: gl.constexpr, DT: gl.constexpr):
        # Masked stores of O's rows (< SQ) from registers: the first chunk, then the tail chunk from column CT + OV.
        _store_rows(ptr, out, row0, row_stride, SQ, 0)
        if DT > 0:
            _store_rows(ptr + CT, out_t, row0, row_stride, SQ, OV)

    @gluon.jit
    def _store_partial(acc, m_i, l_i, WS, seg, WG: gl.constexpr, NW: gl.constexpr):
        # Segment ``seg`` (0 or 1) of this program's range, a piece of a cut tile (PART 2): this warpgroup's
        # unnormalized O rows, row maxima and row sums go to the program's slot for it; :func:`_merge_tail` combines
        # the pieces after the launch.
        o_layout: gl.constexpr = acc.type.layout
        row_layout: gl.constexpr = m_i.type.layout
        ROWS: gl.constexpr = acc.shape[0]
        D0: gl.constexpr = acc.shape[1]
        ml = gl.num_programs(0) * (2 * NW * ROWS * D0)  # the (max, sum) rows follow the O rows
        slot = (2 * gl.program_id(0) + seg) * NW + WG
        orows = gl.arange(0, ROWS, layout=gl.SliceLayout(1, o_layout))
        ocols = gl.arange(0, D0, layout=gl.SliceLayout(0, o_layout))
        gl.store(WS + slot * (ROWS * D0) + gl.expand_dims(orows, 1) * D0 + gl.expand_dims(ocols, 0), acc)
        rows = gl.arange(0, ROWS, layout=row_layout)
        gl.store(WS + ml + slot * (2 * ROWS) + rows, m_i)
        gl.store(WS + ml + slot * (2 * ROWS) + ROWS + rows, l_i)

    @gluon.jit
    def _consume_tile(q_smem, k_smem, v_smem, qt_smem, kt_smem, vt_smem, q_ready, q_empty, k_ready, v_ready, k_empty,
                      v_empty, turn, O, LSE, o_desc, o_smem, ot_desc, ot_smem, ones_smem, sob, sos, soh, H, SQ, SK, n_m,
                      qk_scale, tile, n_blk, masked, t, tc, k, s_zero, last_cols, n_left, WS, seg,
                      WG: gl.constexpr, NW: gl.constexpr, D: gl.constexpr, DT: gl.constexpr, BLOCK_N: gl.constexpr,
                      STAGES: gl.constexpr, PINGPONG: gl.constexpr, O_TMA: gl.constexpr, QREG: gl.constexpr, SUM_MMA:
                      gl.constexpr, P_SMEM: gl.constexpr, PARTIAL: gl.constexpr):
        # One output tile's rows of this warpgroup over key blocks t .. t + n_blk - 1 of the rings (the tile's
        # blocks j0 .. j0 + n_blk - 1; ``masked``: the last is the sequence's last). PARTIAL: segment ``seg`` of the
        # program's range, a piece of a cut tile, whose partial result goes to the workspace WS instead of O.
        dtype: gl.constexpr = q_smem.dtype
        WG_ROWS: gl.constexpr = q_smem.shape[1]
        D0: gl.constexpr = q_smem.shape[2]
        CT: gl.constexpr = D - DT
        OV: gl.constexpr = D0 - CT
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, D0, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
        orow_layout: gl.constexpr = gl.SliceLayout(1, o_layout)
        if DT > 0:
            ot_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                                instr_shape=[16, DT, 16])
            pt_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=ot_layout, k_width=2)
            otrow_layout: gl.constexpr = gl.SliceLayout(1, ot_layout)
            # PV issues one MMA group per chunk: waiting for the score products leaves this many outstanding.
            NPV: gl.constexpr = 2
        else:
            NPV: gl.constexpr = 1
        if SUM_MMA:
            # Row sums of P on the tensor cores: P times a ones tile, an 8-column accumulator rescaled with O.
            l_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                               instr_shape=[16, 8, 16])
            pl_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=l_layout, k_width=2)
            lrow_layout: gl.constexpr = gl.SliceLayout(1, l_layout)
            NPV_ALL: gl.constexpr = NPV + 1
        else:
            NPV_ALL: gl.constexpr = NPV
        q_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=s_layout, k_width=2)
        mbarrier.wait(q_ready.index(WG), tc & 1)
        if OV > 0:
            _zero_leading_cols(qt_smem.index(WG), OV)
        if QREG:
            # Q as the score products' register operand (a third less shared-memory traffic per score product):
            # read from shared memory once per tile, and its slot is free for the next tile's Q at once. The 32
            # registers it takes fit because P also crosses the loop edge in 16 bits (see below).
            q = q_smem.index(WG).load(q_layout)
            mbarrier.arrive(q_empty.index(WG), count=1)
        else:
            q = q_smem.index(WG)
        slot = t % STAGES
        mbarrier.wait(k_ready.index(slot), (t // STAGES) & 1)
        _turn_wait(turn, WG, k, PINGPONG)
        s = warpgroup_mma(q, k_smem.index(slot).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        if DT > 0:
            s = warpgroup_mma(qt_smem.index(WG), kt_smem.index(slot).permute((1, 0)), s, is_async=True)
        _turn_pass(turn, WG, NW, PINGPONG)
        k += 1
        s = warpgroup_mma_wait(0, deps=[s])
        mbarrier.arrive(k_empty.index(slot), count=1)
        if n_blk == 1:
            s = _last_key_block(s, q_empty, WG, last_cols, n_left, SK, QREG, P_SMEM, masked)
        m_i = gl.max(s, 1) * qk_scale
        p = gl.exp2(s * qk_scale - gl.expand_dims(m_i, 1))
        if not SUM_MMA:
            l_i = gl.sum(p, 1)
        if QREG:  # P crosses the loop edge as 16-bit values: its fp32 copy is dead before the next products
            p = p.to(dtype)
        if P_SMEM:  # P crosses the loop edge in shared memory, as the P V products' A operand
            _stage_p(p.to(dtype), o_smem.index(WG), O_TMA)
        acc = gl.zeros([WG_ROWS, D0], gl.float32, o_layout)
        if SUM_MMA:
            acc_l = gl.zeros([WG_ROWS, 8], gl.float32, l_layout)
        if DT > 0:
            acc_t = gl.zeros([WG_ROWS, DT], gl.float32, ot_layout)
        for j in range(1, n_blk):
            tj = t + j
            slot = tj % STAGES
            pslot = (tj - 1) % STAGES
            mbarrier.wait(k_ready.index(slot), (tj // STAGES) & 1)
            mbarrier.wait(v_ready.index(pslot), ((tj - 1) // STAGES) & 1)
            _turn_wait(turn, WG, k, PINGPONG)
            s = warpgroup_mma(q, k_smem.index(slot).permute((1, 0)), s_zero, use_acc=False, is_async=True)
            if DT > 0:
                s = warpgroup_mma(qt_smem.index(WG), kt_smem.index(slot).permute((1, 0)), s, is_async=True)
            if P_SMEM:
                acc = warpgroup_mma(o_smem.index(WG), v_smem.index(pslot), acc, is_async=True)
            else:
                p16 = p.to(dtype)  # a no-op with QREG (converted at the end of the softmax)
                acc = warpgroup_mma(gl.convert_layout(p16, p_layout), v_smem.index(pslot), acc, is_async=True)
            if DT > 0:
                acc_t = warpgroup_mma(gl.convert_layout(p16, pt_layout), vt_smem.index(pslot), acc_t,
                                      is_async=True)
            if SUM_MMA:
                acc_l = warpgroup_mma(gl.convert_layout(p16, pl_layout), ones_smem.permute((1, 0)), acc_l,
                                      is_async=True)
            _turn_pass(turn, WG, NW, PINGPONG)
            k += 1
            # Groups retire in order: NPV_ALL outstanding means S_j is done and P_{j-1} V_{j-1} may still run.
            s = warpgroup_mma_wait(NPV_ALL, deps=[s])
            mbarrier.arrive(k_empty.index(slot), count=1)
            if j == n_blk - 1:
                s = _last_key_block(s, q_empty, WG, last_cols, n_left, SK, QREG, P_SMEM, masked)
            m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
            p = gl.exp2(s * qk_scale - gl.expand_dims(m_new, 1))
            alpha = gl.exp2(m_i - m_new)
            if not SUM_MMA:
                l_i = l_i * alpha + gl.sum(p, 1)
            m_i = m_new
            if QREG:
                p = p.to(dtype)
            if DT > 0:
                acc, acc_t = warpgroup_mma_wait(0, deps=[acc, acc_t])
                acc_t = acc_t * gl.expand_dims(gl.convert_layout(alpha, otrow_layout), 1)
            elif SUM_MMA:
                acc, acc_l = warpgroup_mma_wait(0, deps=[acc, acc_l])
                acc_l = acc_l * gl.expand_dims(gl.convert_layout(alpha, lrow_layout), 1)
            else:
                acc = warpgroup_mma_wait(0, deps=[acc])
            mbarrier.arrive(v_empty.index(pslot), count=1)
            acc = acc * gl.expand_dims(gl.convert_layout(alpha, orow_layout), 1)
            if P_SMEM:  # P_{j-1} V_{j-1} is done with the staging tile
                _stage_p(p.to(dtype), o_smem.index(WG), False)

        lslot = (t + n_blk - 1) % STAGES
        mbarrier.wait(v_ready.index(lslot), ((t + n_blk - 1) // STAGES) & 1)
        _turn_wait(turn, WG, k, PINGPONG)
        if P_SMEM:
            acc = warpgroup_mma(o_smem.index(WG), v_smem.index(lslot), acc, is_async=True)
        else:
            p16 = p.to(dtype)
            acc = warpgroup_mma(gl.convert_layout(p16, p_layout), v_smem.index(lslot), acc, is_async=True)
        if DT > 0:
            acc_t = warpgroup_mma(gl.convert_layout(p16, pt_layout), vt_smem.index(lslot), acc_t, is_async=True)
        if SUM_MMA:
            acc_l = warpgroup_mma(gl.convert_layout(p16, pl_layout), ones_smem.permute((1, 0)), acc_l,
                                  is_async=True)
        _turn_pass(turn, WG, NW, PINGPONG)
        k += 1
        if DT > 0:
            acc, acc_t = warpgroup_mma_wait(0, deps=[acc, acc_t])
        elif SUM_MMA:
            acc, acc_l = warpgroup_mma_wait(0, deps=[acc, acc_l])
            l_i = gl.convert_layout(gl.max(acc_l, 1), row_layout)
        else:
            acc = warpgroup_mma_wait(0, deps=[acc])
        mbarrier.arrive(v_empty.index(lslot), count=1)

        if PARTIAL:
            _store_partial(acc, m_i, l_i, WS, seg, WG, NW)
        else:
            # Epilogue, under the loads of the next tile's first blocks.
            bh = tile // n_m
            row0 = (tile % n_m) * (NW * WG_ROWS) + WG * WG_ROWS
            base = (bh // H).to(gl.int64) * sob + (bh % H) * soh
            inv_l = 1.0 / l_i
            out = (acc * gl.expand_dims(gl.convert_layout(inv_l, orow_layout), 1)).to(dtype)
            if DT > 0:
                out_t = (acc_t * gl.expand_dims(gl.convert_layout(inv_l, otrow_layout), 1)).to(dtype)
            else:
                out_t = out  # unused
            # Whole 64-row blocks go out through shared memory with asynchronous TMA stores (the last ones must have
            # read the buffers first); a block reaching past SQ would write the next sequence's rows, so it takes
            # masked stores, as does a tail chunk that overlaps the first (d=72: its first OV columns are not O's).
            if O_TMA:
                if row0 + WG_ROWS <= SQ:
                    tma.store_wait(0)
                    o_smem.index(WG).store(out)
                    if DT > 0 and OV == 0:
                        ot_smem.index(WG).store(out_t)
                    fence_async_shared()
                    _cta_barrier()
                    o_row = (bh // H) * SQ + row0
                    _tma_store(o_desc, [o_row, (bh % H) * D], o_smem.index(WG))
                    if DT > 0 and OV == 0:
                        _tma_store(ot_desc, [o_row, (bh % H) * D + CT], ot_smem.index(WG))
                    elif DT > 0:
                        _store_rows(O + base + CT, out_t, row0, sos, SQ, OV)
                else:
                    _store_o(O + base, out, out_t, row0, sos, SQ, CT, OV, DT)
            else:
                _store_o(O + base, out, out_t, row0, sos, SQ, CT, OV, DT)
            rows = row0 + gl.arange(0, WG_ROWS, layout=row_layout)
            gl.store(LSE + bh.to(gl.int64) * SQ + rows, m_i + gl.log2(l_i), mask=rows < SQ)
        return t + n_blk, tc + 1, k

    @gluon.jit
    def _consumer(q_smem, k_smem, v_smem, qt_smem, kt_smem, vt_smem, q_ready, q_empty, k_ready, v_ready, k_empty,
                  v_empty, turn, O, LSE, o_desc, o_smem, ot_desc, ot_smem, ones_smem, sob, sos, soh, H, SQ, SK, n_m,
                  n_tiles, qk_scale, WS, WG: gl.constexpr, NW: gl.constexpr, D: gl.constexpr, DT: gl.constexpr,
                  BLOCK_N: gl.constexpr, STAGES: gl.constexpr, PINGPONG: gl.constexpr, O_TMA: gl.constexpr, QREG:
                  gl.constexpr, SUM_MMA: gl.constexpr, P_SMEM: gl.constexpr, PART: gl.constexpr):
        # One warpgroup, WG_ROWS query rows of each tile. Per key block j it issues S_j = Q K_j^T and
        # O += P_{j-1} V_{j-1} back to back (in its ping-pong turn), then runs the softmax of S_j while O's product
        # and the other consumers' products keep the tensor cores busy.
        # DT > 0 (head dims 72, 80, 96): the head dim is a 64-column chunk plus a DT-column tail chunk at column
        # CT = D - DT; every product is two (S = Q K^T + Qt Kt^T; O and its tail Ot = P Vt are two accumulators).
        # At d=72 the chunks overlap by OV = 8 columns: those are zeroed in the tail of Q, so S counts them once,
        # and the tail of O is stored without them. QREG (one chunk only): Q is the score products' register operand.
        WG_ROWS: gl.constexpr = q_smem.shape[1]
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        s_zero = gl.zeros([WG_ROWS, BLOCK_N], gl.float32, s_layout)
        n_kv = gl.cdiv(SK, BLOCK_N)
        n_left = SK - (n_kv - 1) * BLOCK_N  # valid keys in the last key block
        if P_SMEM:
            last_cols = n_left  # placeholder, unused
        else:
            last_cols = (n_kv - 1) * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        t = 0
        tc = 0
        k = 0
        if PART < 2:
            n_full = _full_tiles(n_tiles, PART)
            for tile in range(gl.program_id(0), n_full, gl.num_programs(0)):
                t, tc, k = _consume_tile(q_smem, k_smem, v_smem, qt_smem, kt_smem, vt_smem, q_ready, q_empty, k_ready,
                                         v_ready, k_empty, v_empty, turn, O, LSE, o_desc, o_smem, ot_desc, ot_smem,
                                         ones_smem, sob, sos, soh, H, SQ, SK, n_m, qk_scale, tile, n_kv, True, t, tc,
                                         k, s_zero, last_cols, n_left, WS, 0, WG, NW, D, DT, BLOCK_N, STAGES,
                                         PINGPONG, O_TMA, QREG, SUM_MMA, P_SMEM, False)
        else:
            n_full, u0, u1, n_seg = _tail_range(n_tiles, n_kv)
            for i in range(n_seg):
                tile, j0, n_blk = _segment(i, n_full, u0, u1, n_kv)
                t, tc, k = _consume_tile(q_smem, k_smem, v_smem, qt_smem, kt_smem, vt_smem, q_ready, q_empty, k_ready,
                                         v_ready, k_empty, v_empty, turn, O, LSE, o_desc, o_smem, ot_desc, ot_smem,
                                         ones_smem, sob, sos, soh, H, SQ, SK, n_m, qk_scale, tile, n_blk,
                                         j0 + n_blk == n_kv, t, tc, k, s_zero, last_cols, n_left, WS, i, WG, NW, D,
                                         DT, BLOCK_N, STAGES, PINGPONG, O_TMA, QREG, SUM_MMA, P_SMEM, True)
        if O_TMA:
            tma.store_wait(0)

    @gluon.jit
    def _tiles(X, rows, cols, row_stride, BLOCK: gl.constexpr, WIDTH: gl.constexpr, COUNT: gl.constexpr):
        # A descriptor for [BLOCK, WIDTH] boxes of the [rows, cols] row view of X, and a ring of COUNT such tiles.
        layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK, WIDTH], X.dtype.element_ty)
        desc = tma.make_tensor_descriptor(X, shape=[rows, cols], strides=[row_stride, 1], block_shape=[BLOCK, WIDTH],
                                          layout=layout)
        return desc, gl.allocate_shared_memory(X.dtype.element_ty, [COUNT, BLOCK, WIDTH], layout)

    @gluon.jit
    def _attn_fwd_sm90(Q, K, V, O, LSE, WS, sqs, sks, svs, sob, sos, soh, B, H, SQ, SK, qk_scale,
                       D: gl.constexpr, D0: gl.constexpr, DT: gl.constexpr, BLOCK_N: gl.constexpr,
                       STAGES: gl.constexpr, NW: gl.constexpr, PINGPONG: gl.constexpr, REGS: gl.constexpr,
                       O_TMA: gl.constexpr, QREG: gl.constexpr, SUM_MMA: gl.constexpr, P_SMEM: gl.constexpr,
                       PART: gl.constexpr):
        # Persistent: program i takes output tiles i, i + grid, ... (tiles of one head are consecutive, so the
        # programs running at once share K and V in L2). Q, K, V are read through descriptors on their
        # [B * S, H * D] views (rows of a batch are S-strided, heads D apart: checked by the host).
        # Partitions: this default one and NW - 1 workers are the consumer warpgroups (64 query rows each);
        # a one-warp worker loads. D0: columns of the main chunk (D, or 64 when a DT-column tail chunk follows).
        dtype: gl.constexpr = Q.dtype.element_ty
        WG_ROWS: gl.constexpr = 64
        q_desc, q_smem = _tiles(Q, B * SQ, H * D, sqs, WG_ROWS, D0, NW)
        k_desc, k_smem = _tiles(K, B * SK, H * D, sks, BLOCK_N, D0, STAGES)
        v_desc, v_smem = _tiles(V, B * SK, H * D, svs, BLOCK_N, D0, STAGES)
        if DT > 0:
            qt_desc, qt_smem = _tiles(Q, B * SQ, H * D, sqs, WG_ROWS, DT, NW)
            kt_desc, kt_smem = _tiles(K, B * SK, H * D, sks, BLOCK_N, DT, STAGES)
            vt_desc, vt_smem = _tiles(V, B * SK, H * D, svs, BLOCK_N, DT, STAGES)
        else:  # no tail: placeholders, never read
            qt_desc, qt_smem, kt_desc, kt_smem, vt_desc, vt_smem = q_desc, q_smem, k_desc, k_smem, v_desc, v_smem
        # O_TMA: O leaves through 64-row staging tiles, one per consumer (and column chunk; O is a [B * SQ, H * D]
        # row view). At d=72 the tail chunk overlaps the first and is stored from registers.
        if O_TMA:
            o_desc, o_smem = _tiles(O, B * SQ, H * D, sos, WG_ROWS, D0, NW)
        elif P_SMEM:  # the P staging tiles (BLOCK_N = D0 columns)
            o_desc = q_desc
            o_smem = gl.allocate_shared_memory(dtype, [NW, WG_ROWS, D0],
                                               gl.NVMMASharedLayout.get_default_for([WG_ROWS, D0], dtype))
        else:  # placeholders, never read
            o_desc, o_smem = q_desc, q_smem
        if O_TMA and DT > 0 and D0 + DT == D:
            ot_desc, ot_smem = _tiles(O, B * SQ, H * D, sos, WG_ROWS, DT, NW)
        else:
            ot_desc, ot_smem = o_desc, o_smem
        if SUM_MMA:  # ones, read as the [BLOCK_N, 8] B operand (K-major) of the row-sum products
            ones_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([8, BLOCK_N], dtype)
            fill_layout: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [4, 1], [1, 0])
            ones_smem = gl.allocate_shared_memory(dtype, [8, BLOCK_N], ones_layout,
                                                  gl.full([8, BLOCK_N], 1.0, dtype, fill_layout))
        else:
            ones_smem = q_smem  # placeholder, never read
        bar_layout: gl.constexpr = mbarrier.MBarrierLayout()
        q_ready = gl.allocate_shared_memory(gl.int64, [NW, 1], bar_layout)
        q_empty = gl.allocate_shared_memory(gl.int64, [NW, 1], bar_layout)
        turn = gl.allocate_shared_memory(gl.int64, [NW, 1], bar_layout)
        k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar_layout)
        v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar_layout)
        k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar_layout)
        v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar_layout)
        for i in gl.static_range(NW):
            mbarrier.init(q_ready.index(i), count=1)
            mbarrier.init(q_empty.index(i), count=1)
            mbarrier.init(turn.index(i), count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(k_ready.index(i), count=1)
            mbarrier.init(v_ready.index(i), count=1)
            mbarrier.init(k_empty.index(i), count=NW)
            mbarrier.init(v_empty.index(i), count=NW)
        fence_async_shared()

        n_m = gl.cdiv(SQ, NW * WG_ROWS)
        n_tiles = n_m * B * H
        WG0: gl.constexpr = 0
        WG1: gl.constexpr = 1
        WG2: gl.constexpr = 2
        # One list per consumer count: the partitions' argument tuples must be spelled out here (a tuple built
        # in the kernel body passes its constexpr members on as runtime values).
        if NW == 2:
            gl.warp_specialize([
                (_consumer, (q_smem, k_smem, v_smem, qt_smem, kt_smem, vt_smem, q_ready, q_empty, k_ready, v_ready,
                             k_empty, v_empty, turn, O, LSE, o_desc, o_smem, ot_desc, ot_smem, ones_smem, sob, sos, soh,
                             H, SQ, SK, n_m, n_tiles, qk_scale, WS, WG0, NW, D, DT, BLOCK_N, STAGES, PINGPONG,
                             O_TMA, QREG, SUM_MMA, P_SMEM, PART)),
                (_consumer, (q_smem, k_smem, v_smem, qt_smem, kt_smem, vt_smem, q_ready, q_empty, k_ready, v_ready,
                             k_empty, v_empty, turn, O, LSE, o_desc, o_smem, ot_desc, ot_smem, ones_smem, sob, sos, soh,
                             H, SQ, SK, n_m, n_tiles, qk_scale, WS, WG1, NW, D, DT, BLOCK_N, STAGES, PINGPONG,
                             O_TMA, QREG, SUM_MMA, P_SMEM, PART)),
                (_loader, (q_desc, k_desc, v_desc, qt_desc, kt_desc, vt_desc, q_smem, k_smem, v_smem, qt_smem, kt_smem,
                           vt_smem, q_ready, q_empty, k_ready, v_ready, k_empty, v_empty, H, SQ, SK, n_m, n_tiles,
                           NW, D, DT, BLOCK_N, STAGES, PART)),
            ], [4, 1], [REGS, 24])
        else:
            gl.warp_specialize([
                (_consumer, (q_smem, k_smem, v_smem, qt_smem, kt_smem, vt_smem, q_ready, q_empty, k_ready, v_ready,
                             k_empty, v_empty, turn, O, LSE, o_desc, o_smem, ot_desc, ot_smem, ones_smem, sob, sos, soh,
                             H, SQ, SK, n_m, n_tiles, qk_scale, WS, WG0, NW, D, DT, BLOCK_N, STAGES, PINGPONG,
                             O_TMA, QREG, SUM_MMA, P_SMEM, PART)),
                (_consumer, (q_smem, k_smem, v_smem, qt_smem, kt_smem, vt_smem, q_ready, q_empty, k_ready, v_ready,
                             k_empty, v_empty, turn, O, LSE, o_desc, o_smem, ot_desc, ot_smem, ones_smem, sob, sos, soh,
                             H, SQ, SK, n_m, n_tiles, qk_scale, WS, WG1, NW, D, DT, BLOCK_N, STAGES, PINGPONG,
                             O_TMA, QREG, SUM_MMA, P_SMEM, PART)),
                (_consumer, (q_smem, k_smem, v_smem, qt_smem, kt_smem, vt_smem, q_ready, q_empty, k_ready, v_ready,
                             k_empty, v_empty, turn, O, LSE, o_desc, o_smem, ot_desc, ot_smem, ones_smem, sob, sos, soh,
                             H, SQ, SK, n_m, n_tiles, qk_scale, WS, WG2, NW, D, DT, BLOCK_N, STAGES, PINGPONG,
                             O_TMA, QREG, SUM_MMA, P_SMEM, PART)),
                (_loader, (q_desc, k_desc, v_desc, qt_desc, kt_desc, vt_desc, q_smem, k_smem, v_smem, qt_smem, kt_smem,
                           vt_smem, q_ready, q_empty, k_ready, v_ready, k_empty, v_empty, H, SQ, SK, n_m, n_tiles,
                           NW, D, DT, BLOCK_N, STAGES, PART)),
            ], [4, 4, 1], [REGS, REGS, 24])


class Config(NamedTuple):
    """One schedule of the forward kernel; BLOCK_M = 64 * warpgroups. The tuner picks among :data:`_CONFIGS` per
    shape; the A/B of each field (stages, ping-pong, persistence, BLOCK_N) is in benchmarks/DECISIONS.md."""
    block_n: int
    stages: int
    warpgroups: int  # consumer warpgroups
    pingpong: bool
    persistent: bool  # a grid of one program per SM looping over tiles


_C = Config
_CONFIGS = {
    128: [_C(128, 2, 2, True, True), _C(128, 2, 2, True, False), _C(128, 3, 2, True, True)],
    64: [_C(128, 3, 3, True, True)],
    # Two consumers: three (160 registers each) spill and serialize the products with the tail accumulators.
    72: [_C(128, 2, 2, True, True), _C(128, 3, 2, True, True)],
    80: [_C(128, 2, 2, True, True), _C(128, 3, 2, True, True)],
    96: [_C(128, 2, 2, True, True), _C(128, 3, 2, True, True)],
}
# Long sequences take a config by length, not by the tuner: at d=128 three consumers (192 x 128 tiles, 160 registers
# each, so P reaches the P V products through the O staging tiles: P_SMEM). It wins only in sustained loops at the
# power limit, which the tuner's short timings do not reach (benchmarks/DECISIONS.md). Measured with Triton 3.6;
# Triton 3.9's build of it spills and has not run on a GPU, so newer Tritons leave it out.
LONG_CONFIGS = {128: _C(128, 2, 3, True, True)} if TRITON_VERSION < (3, 7) else {}
LONG_MIN = 16384  # queries and keys
for _d, _cfg in LONG_CONFIGS.items():
    _CONFIGS[_d].append(_cfg)  # built and tested with the others (sm90_report, the every-config GPU test)
_TUNED = {}
# Registers per thread of each consumer warpgroup (setmaxnreg), by consumer count; the load warp keeps 24. Two
# consumers: 240 rather than 232 or 248 (benchmarks/DECISIONS.md).
CONSUMER_REGS = {2: 240, 3: 160}
# Head dims whose Q is held in registers as the score products' A operand, with P converted to 16 bits at the end
# of each softmax (so its fp32 copy does not live across the next products beside Q): 1-3% at d=128
# (benchmarks/DECISIONS.md). Only a head dim read as one chunk can take it (Q's slot is freed once Q is in registers, and the tail
# chunk of d=72-96 is read from there); d=64's three consumers have 160 registers each, no room for Q's 32.
Q_IN_REGISTERS = (128,)
# Head dims whose softmax row sums run on the tensor cores: the 16-bit P times a ones tile, into an 8-column
# accumulator rescaled with O, instead of 64 FADDs and the shuffles per key block per thread. The softmax's
# instruction count bounds the forward at d=64; at d=128, where the matrix work per softmax is twice as large, the
# extra products cost more than the adds (benchmarks/DECISIONS.md). The row sums are then of the rounded P that the P V product uses, so the logsumexp
# differs from an fp32 sum's by up to log2(1 + 2^-8) (bf16's unit roundoff). Measured with Triton 3.6; Triton 3.9's
# build of it spills and has not run on a GPU, so newer Tritons keep the adds.
SUM_MMA_HEAD_DIMS = (64,) if TRITON_VERSION < (3, 7) else ()
# The last round of a persistent launch: T tiles on G programs take ceil(T / G) rounds, and the last keeps only
# T mod G of the programs busy (B1 H12 S32760 d128: 2,052 tiles of 192 rows on 132 SMs, 15 whole rounds and 72 tiles,
# 55%). A split launch runs the whole rounds (PART 1), then cuts the key blocks of the last round's tiles into one
# even range per program (PART 2: each program writes the unnormalized O rows, row maxima and sums of its one or two
# pieces of tiles to a workspace), and :func:`_merge_tail` combines the pieces of each tile into O and the logsumexp.
# A partial round is not all loss: with SMs idle the busy ones run faster, so the split pays only where the last
# round is mostly idle and the tiles are long (benchmarks/DECISIONS.md): the rule below.
SPLIT_HEAD_DIMS = (64, 128)  # read as one chunk: a piece is one fp32 O accumulator per row
SPLIT_TAIL_MAX = 0.7  # split where the last round keeps less than this share of the programs busy
SPLIT_MIN_BLOCKS = 128  # key blocks per tile (16,384 keys): shorter rounds gain less than the split costs


def splits(cfg, d: int, n_tiles: int, n_kv: int, sms: int) -> bool:
    """Whether a launch of ``cfg`` with ``n_tiles`` tiles of ``n_kv`` key blocks on ``sms`` SMs splits its last
    round (see :data:`SPLIT_TAIL_MAX`)."""
    if CONFIG.split == "never" or not cfg.persistent or d not in SPLIT_HEAD_DIMS or n_tiles % sms == 0:
        return False
    return CONFIG.split == "always" or (n_kv >= SPLIT_MIN_BLOCKS and n_tiles % sms < SPLIT_TAIL_MAX * sms)


def split_ranges(n_tiles: int, n_kv: int, programs: int) -> list[list[tuple[int, int, int]]]:
    """Per program of a split launch's second part, its pieces ``(tile, first key block, key blocks)``: the kernel's
    arithmetic (``_tail_range``, ``_segment``), for the tests and for reading."""
    n_full = n_tiles // programs * programs
    total = (n_tiles - n_full) * n_kv
    out = []
    for p in range(programs):
        u0, u1 = p * total // programs, (p + 1) * total // programs
        pieces = []
        u = u0
        while u < u1:
            ti, j0 = divmod(u, n_kv)
            n = min(n_kv - j0, u1 - u)
            pieces.append((n_full + ti, j0, n))
            u += n
        out.append(pieces)
    return out


@triton.jit
def _merge_tail(WS, O, LSE, sob, sos, soh, H, SQ, n_m, n_tiles, n_kv, G, NW: tl.constexpr, D0: tl.constexpr,
                ROWS: tl.constexpr):
    # One program per (tile of the last round, consumer warpgroup's ROWS rows): the pieces of the tile, from the
    # programs whose key-block ranges meet it (the first holds its first key block, the last its last; a program with
    # an empty range wrote nothing), merged in program order, into O and the logsumexp (base 2).
    ti = tl.program_id(0)
    wg = tl.program_id(1)
    n_full = n_tiles // G * G
    total = (n_tiles - n_full) * n_kv
    p_first = ((ti * n_kv + 1) * G - 1) // total
    p_last = ((ti + 1) * n_kv * G - 1) // total
    rows = tl.arange(0, ROWS)
    cols = tl.arange(0, D0)
    ml = G * (2 * NW * ROWS * D0)  # the (max, sum) rows follow the O rows
    m = tl.full([ROWS], float("-inf"), tl.float32)
    for p in range(p_first, p_last + 1):
        pu0 = p * total // G
        if (p + 1) * total // G > pu0:
            sp = (2 * p + ti - pu0 // n_kv) * NW + wg
            m = tl.maximum(m, tl.load(WS + ml + sp * (2 * ROWS) + rows))
    acc = tl.zeros([ROWS, D0], tl.float32)
    l_sum = tl.zeros([ROWS], tl.float32)
    for p in range(p_first, p_last + 1):
        pu0 = p * total // G
        if (p + 1) * total // G > pu0:
            sp = (2 * p + ti - pu0 // n_kv) * NW + wg
            w = tl.exp2(tl.load(WS + ml + sp * (2 * ROWS) + rows) - m)
            l_sum += w * tl.load(WS + ml + sp * (2 * ROWS) + ROWS + rows)
            acc += tl.load(WS + sp * (ROWS * D0) + rows[:, None] * D0 + cols[None, :]) * w[:, None]
    tile = n_full + ti
    bh = tile // n_m
    row = (tile % n_m) * (NW * ROWS) + wg * ROWS + rows
    keep = row < SQ
    out = O + (bh // H).to(tl.int64) * sob + (bh % H) * soh + row[:, None] * sos + cols[None, :]
    tl.store(out, (acc / l_sum[:, None]).to(O.dtype.element_ty), mask=keep[:, None])
    tl.store(LSE + bh.to(tl.int64) * SQ + row, m + tl.log2(l_sum), mask=keep)


def supports(q, k, v, key_padding_mask) -> bool:
    """Whether this kernel covers the call: dtype, head dim, no mask, and Q, K, V readable as [B * S, H * D] row
    views (batch stride = S x sequence stride, heads D apart, unit inner stride); the caller checks the device
    (sm_90) and TMA alignment."""
    if (not HAVE_GLUON or key_padding_mask is not None or q.dtype not in (torch.float16, torch.bfloat16)
            or k.dtype != q.dtype or v.dtype != q.dtype):
        return False
    d = q.shape[-1]
    return d in HEAD_DIMS and row_view(q, d) and row_view(k, d) and row_view(v, d)


def row_view(t, d: int) -> bool:
    """Whether ``t [B, S, H, d]`` reads as a ``[B * S, H * d]`` row view: batch stride = S x sequence stride, heads d
    apart, unit inner stride."""
    s0, s1, s2, s3 = t.stride()
    return s3 == 1 and s2 == d and s0 == t.shape[1] * s1


# Shared memory per block on sm_90, less what the barriers and the compiler's scratch take.
_SMEM_BYTES = 220 * 1024


def constexprs(cfg, d: int, o_row_view: bool = True, part: int = 0) -> dict:
    """The kernel's compile-time arguments for config ``cfg`` at head dim ``d`` (the persistent flag only sets the
    grid). ``o_row_view``: O reads as a ``[B * Sq, H * D]`` row view, so whole blocks of it can be stored with TMA
    (where the staging tiles fit beside the Q tiles and the K, V rings). The host passes False below 64 queries,
    where no block is whole (Triton 3.6 fails to build the d=72 kernel specialized for Sq = 1 with it)."""
    block_n, stages, nw, pingpong = cfg.block_n, cfg.stages, cfg.warpgroups, cfg.pingpong
    d0, dt = chunks(d)
    smem = 2 * (d0 + dt) * (2 * nw * 64 + 2 * stages * block_n)  # Q and O staging tiles, K and V rings (16-bit)
    # Three consumers at d=128 have no registers for P (160 each; O and S take 128): P goes through the O staging
    # tiles, which are then there for O as well.
    p_smem = d == 128 and nw == 3
    return dict(D=d, D0=d0, DT=dt, BLOCK_N=block_n, STAGES=stages, NW=nw, PINGPONG=pingpong, REGS=CONSUMER_REGS[nw],
                O_TMA=o_row_view and (smem <= _SMEM_BYTES or p_smem),
                QREG=d in Q_IN_REGISTERS and dt == 0 and not p_smem,
                SUM_MMA=d in SUM_MMA_HEAD_DIMS and dt == 0, P_SMEM=p_smem, PART=part)


def _launch(cfg, q, k, v, o, lse, qk_scale, split: bool | None = None, programs: int | None = None):
    """Launch config ``cfg``; returns ``run(q, k, v, o, lse)``, which repeats this launch on new tensors of the same
    shapes, strides, dtypes and alignment (None where launches are not cached). ``split``: split the last round
    (None: :func:`splits` decides); ``programs``: the persistent grid (default: one program per SM)."""
    b, sq, h, d = q.shape
    block_n, nw, persistent = cfg.block_n, cfg.warpgroups, cfg.persistent
    n_m = cdiv(sq, 64 * nw)
    n_tiles = n_m * b * h
    n_kv = cdiv(k.shape[1], block_n)
    sms = programs or num_sms(q.device.index)
    if split is None:
        split = splits(cfg, d, n_tiles, n_kv, sms)
    scalars = (q.stride(1), k.stride(1), v.stride(1), o.stride(0), o.stride(1), o.stride(2), b, h, sq, k.shape[1],
               qk_scale)
    o_tma = row_view(o, d) and sq >= 64
    if not split:
        grid = min(n_tiles, sms) if persistent else n_tiles
        bound = launch(_attn_fwd_sm90, (grid,), (q, k, v, o, lse, lse, *scalars), constexprs(cfg, d, o_tma),
                       num_warps=4)
        if bound is None:
            return None
        return lambda q, k, v, o, lse: bound(q, k, v, o, lse, lse, *scalars)
    if not persistent or d not in SPLIT_HEAD_DIMS or n_tiles % sms == 0:
        raise ValueError(f"config {cfg} at d={d} with {n_tiles} tiles on {sms} programs has no last round to split")
    n_tail = n_tiles % sms
    # Per program of the second part: two pieces' O rows, row maxima and sums (fp32), per consumer warpgroup.
    ws_size = sms * 2 * nw * 64 * (d + 2)
    merge_args = (o.stride(0), o.stride(1), o.stride(2), h, sq, n_m, n_tiles, n_kv, sms)
    merge_cx = dict(NW=nw, D0=d, ROWS=64)

    ws = torch.empty(ws_size, device=q.device, dtype=torch.float32)
    parts = (1, 2) if n_tiles >= sms else (2,)  # the whole rounds (if any), then the pieces
    bounds = [launch(_attn_fwd_sm90, (sms,), (q, k, v, o, lse, ws, *scalars), constexprs(cfg, d, o_tma, part=p),
                     num_warps=4) for p in parts]
    bounds.append(launch(_merge_tail, (n_tail, nw), (ws, o, lse, *merge_args), merge_cx, num_warps=4))
    if any(x is None for x in bounds):
        return None

    def replay(q, k, v, o, lse):
        ws = torch.empty(ws_size, device=q.device, dtype=torch.float32)
        for x in bounds[:-1]:
            x(q, k, v, o, lse, ws, *scalars)
        bounds[-1](ws, o, lse, *merge_args)

    return replay


def forward(q, k, v, o, lse, qk_scale: float, tune: bool = True):
    """Write ``o`` and ``lse`` (base 2) for ``q [B, Sq, H, D]``, ``k, v [B, Sk, H, D]``. Long sequences at a head dim
    of :data:`LONG_CONFIGS` take that config; otherwise the config is picked once per (head dim, dtype, length
    bucket) by timing the candidates, or is the first with ``tune=False``. Returns the launch's replay (see
    :func:`_launch`)."""
    d = q.shape[-1]
    long_cfg = LONG_CONFIGS.get(d)
    if long_cfg is not None and min(q.shape[1], k.shape[1]) >= LONG_MIN:
        return _launch(long_cfg, q, k, v, o, lse, qk_scale)
    key = (d, q.dtype, next_pow2(q.shape[1]), next_pow2(k.shape[1]))
    cfg = _TUNED.get(key)
    if cfg is None:
        cands = [c for c in _CONFIGS[d] if c != long_cfg]
        if tune and len(cands) > 1:
            times = [triton.testing.do_bench(lambda c=c: _launch(c, q, k, v, o, lse, qk_scale), warmup=5, rep=20)
                     for c in cands]
            cfg = cands[min(range(len(cands)), key=times.__getitem__)]
        else:
            cfg = cands[0]
        _TUNED[key] = cfg
    return _launch(cfg, q, k, v, o, lse, qk_scale)
