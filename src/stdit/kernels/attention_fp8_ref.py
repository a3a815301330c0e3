"""Pure-torch twin of :mod:`stdit.kernels.attention_fp8`: the same quantization (K smoothed, Q and K per token,
V shifted and scaled per channel, P times 448 in FP8) and the same products, in fp32, written for reading. One difference: softmax is
taken over the whole key row at once instead of block by block, so P is quantized against the row's final
maximum rather than the running one (the kernel's P is at least as fine)."""

from __future__ import annotations

import math

import torch

FP8 = torch.float8_e4m3fn
QMAX = {"int8": 127.0, "fp8": 448.0}


def quantize_rows(x: torch.Tensor, qk_format: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` ``[..., D]`` -> (the dequantized values, per-row scales): one scale per row, its absolute max over
    the format's largest value, rounded to INT8 or cast to FP8 e4m3."""
    scale = x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-20) / QMAX[qk_format]
    y = x / scale
    y = y.round().clamp(-127, 127) if qk_format == "int8" else y.to(FP8).float()
    return y * scale, scale


def attention_fp8_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None = None,
                      scale: float | None = None, qk_format: str = "int8") -> torch.Tensor:
    """q ``[B, Sq, H, D]``, k/v ``[B, Sk, H, D]``, mask ``[B, Sk]`` (True = attend) -> ``[B, Sq, H, D]`` fp32."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    q, k, v = q.float(), k.float(), v.float()
    k = k - k.mean(dim=1, keepdim=True)  # smoothing: the same shift for every key of a query row
    qd, _ = quantize_rows(q, qk_format)
    kd, _ = quantize_rows(k, qk_format)
    v_min, v_max = v.amin(dim=1, keepdim=True), v.amax(dim=1, keepdim=True)
    v_shift = (v_max + v_min) / 2  # exact: added back below, as each row's probabilities sum to one
    v_scale = ((v_max - v_min) / 2).clamp_min(1e-20) / 448.0
    vd = ((v - v_shift) / v_scale).to(FP8).float() * v_scale
    s = torch.einsum("bqhd,bkhd->bhqk", qd, kd) * scale
    if key_padding_mask is not None:
        s = s.masked_fill(~key_padding_mask[:, None, None, :].bool(), float("-inf"))
    m = s.amax(dim=-1, keepdim=True).clamp_min(-1e30)
    p = torch.exp(s - m)
    l = p.sum(dim=-1, keepdim=True)
    p8 = (p * 448.0).to(FP8).float() / 448.0
    o = torch.einsum("bhqk,bkhd->bqhd", p8, vd) / l.permute(0, 2, 1, 3).clamp_min(1e-30) + v_shift
    if key_padding_mask is not None:
        dead = ~key_padding_mask.bool().any(dim=1)
        o = o.masked_fill(dead[:, None, None, None], 0.0)
    return o
