"""Tile loads and stores, and the autotuning helpers, shared by the general Triton attention kernels: the forward
(:mod:`.attention`) and the two-pass backward (:mod:`.attention_bwd`). Each of those modules lists its own configs.

Tiles are ``[rows, D_PAD]`` slices of one (batch, head) of a ``[B, S, H, D]`` tensor read with any strides; a head
dim that is not a power of two is padded to ``D_PAD`` with masked loads. On Hopper the tiles that the inner loops
stream can come through tensor descriptors (TMA) instead, which zero-fill rows past the end.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

from .config import CONFIG

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _off(b, stride_b, h, stride_h, ALIGN: tl.constexpr):
    # Triton proves alignment only for strides divisible by 16; a head stride such as 72 hides that every
    # (batch, head) slice still starts on a 16-byte boundary, and without that proof the loads go scalar.
    return tl.multiple_of(b * stride_b + h * stride_h, ALIGN)


@triton.jit
def _load_tile(base, offs_r, offs_d, stride_r, stride_d, n_rows,
               D: tl.constexpr, D_PAD: tl.constexpr, ROW_MASK: tl.constexpr):
    ptrs = base + offs_r[:, None] * stride_r + offs_d[None, :] * stride_d
    if ROW_MASK:
        mask = offs_r[:, None] < n_rows
        if D != D_PAD:
            mask = mask & (offs_d[None, :] < D)
        x = tl.load(ptrs, mask=mask, other=0.0)
    else:
        if D != D_PAD:
            x = tl.load(ptrs, mask=offs_d[None, :] < D, other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def _store_tile(base, x, offs_r, offs_d, stride_r, stride_d, n_rows, D: tl.constexpr, D_PAD: tl.constexpr):
    mask = offs_r[:, None] < n_rows
    if D != D_PAD:
        mask = mask & (offs_d[None, :] < D)
    tl.store(base + offs_r[:, None] * stride_r + offs_d[None, :] * stride_d, x, mask=mask)


@triton.jit
def _stream_tile(desc, base, start, offs_r0, offs_d, stride_r, stride_d, n_rows,
                 D: tl.constexpr, D_PAD: tl.constexpr, TAIL: tl.constexpr, USE_TMA: tl.constexpr):
    # The tensor descriptor zero-fills rows past n_rows, so the tail needs no mask on that path.
    if USE_TMA:
        x = desc.load([start, 0])
    else:
        x = _load_tile(base, start + offs_r0, offs_d, stride_r, stride_d, n_rows, D, D_PAD, TAIL)
    return x


@triton.jit
def _make_desc(base, n_rows, stride_r, BLOCK: tl.constexpr, D: tl.constexpr, USE_TMA: tl.constexpr):
    if USE_TMA:
        desc = tl.make_tensor_descriptor(base, shape=[n_rows, D], strides=[stride_r, 1], block_shape=[BLOCK, D])
    else:
        desc = base
    return desc


def _configs(pairs, **extra):
    """Autotune space: (outer block, inner block, warps, stages); one small config under the interpreter."""
    if _INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, **extra}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, **extra}, num_warps=w, num_stages=s) for m, n, w, s in pairs]


def _make_prune(single: bool):
    def prune(configs, named_args, **kwargs):
        # fp32 tiles need twice the shared memory and registers; keep the small blocks for them.
        wide = named_args["Q"].element_size() > 2
        kept = [c for c in configs if not wide or c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 64]
        kept = kept or configs[-1:]
        return kept[:1] if single else kept
    return prune



_KEY = ["D", "HAS_MASK", "PREC", "USE_TMA", "SQ_KEY", "SK_KEY"]


def _tuned(kernel, configs, key=_KEY):
    """(autotuned over ``configs``, one fixed config); ``STDIT_AUTOTUNE=0`` picks the second at launch.

    The fixed variant takes the first config, or the last (the smallest) for fp32 inputs.
    """
    return (triton.autotune(configs, key=key,
                            prune_configs_by={"early_config_prune": _make_prune(False)})(kernel),
            triton.autotune(configs[:1] + configs[-1:], key=key,
                            prune_configs_by={"early_config_prune": _make_prune(True)})(kernel))



def _pick(kernels):
    return kernels[0] if CONFIG.autotune else kernels[1]
