"""QK RMSNorm + RoPE + 8-bit quantization fused (:mod:`stdit.kernels.qk_norm_rope_quant`) against the unfused path
(the norm + RoPE kernel, then :func:`~stdit.kernels.attention_fp8.quantize`) and the torch twins; its attention
against exact attention, K with per-channel outliers included; the model's fused branch.

On the CPU the kernels run under the Triton interpreter (tiny sizes, fp32); the ``gpu`` test runs bf16 at a real
size. Sizes are not multiples of the blocks or powers of two (S = 37, 70; H = 3; D = 24)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _kernel_env import HAS_CUDA, device, load_kernels
from helpers import rel_err, tiny_model

load_kernels()
from stdit.kernels.attention_fp8 import attention_fp8, quantize  # noqa: E402
from stdit.kernels.attention_fp8_ref import attention_fp8_ref  # noqa: E402
from stdit.kernels.attention_ref import attention_ref  # noqa: E402
from stdit.kernels.qk_norm_rope import qk_norm_rope  # noqa: E402
from stdit.kernels.qk_norm_rope_quant import (  # noqa: E402
    qk_norm_rope_attention_fp8, qk_norm_rope_quantized, sample_k_center)
from stdit.kernels.qk_norm_rope_ref import norm_rope_ref  # noqa: E402
from stdit.rope import RotaryEmbedding3D  # noqa: E402

EPS = 1e-6
GRIDS = {37: (1, 1, 37), 70: (2, 5, 7), 4096: (4, 32, 32)}


def stats(out, ref):
    a, r = out.double().flatten(), ref.double().flatten()
    return F.cosine_similarity(a, r, dim=0).item(), ((a - r).norm() / r.norm()).item()


def make(b, s, h, d, weights=True, rope="random", outliers=False, dtype=torch.float32, seed=0):
    """q, k, v ``[B, S, H*D]`` as strided slices of one fused projection, norm weights, rope tables (random angles,
    the model's 3D tables, or None)."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (2 * torch.randn(b, s, 3 * h * d, generator=g)).split(h * d, dim=-1)
    if outliers:  # large offsets in an eighth of the channels, as video DiTs have in K; they survive the norm
        few = torch.rand(h * d, generator=g) < 0.125
        k = k + 16.0 * torch.randn(h * d, generator=g) * few
    wq = wk = cos = sin = None
    if weights:
        wq, wk = (1 + 0.3 * torch.randn(2, h * d, generator=g)).unbind(0)
    if rope == "random":
        angles = torch.rand(s, d // 2, generator=g, dtype=torch.float64) * 20
        cos, sin = angles.cos().float(), angles.sin().float()
    elif rope == "model":
        cos, sin = RotaryEmbedding3D(d)(GRIDS[s])
    dev = device()
    q, k, v = (x.to(dev, dtype) for x in (q, k, v))
    return q, k, v, *(None if x is None else x.to(dev) for x in (wq, wk, cos, sin))


def identity_tables(s, d):
    return torch.ones(s, d // 2, device=device()), torch.zeros(s, d // 2, device=device())


def step_bound(x, scale, fmt):
    """The largest rounding error of x (already centered) quantized with per-token ``scale``: half an INT8 step, or
    half an e4m3 ulp (3 mantissa bits, subnormal step 2^-9), plus fp32 slack."""
    if fmt == "int8":
        return 0.5 * scale * 1.001
    y = (x / scale).abs()
    return scale * (torch.maximum(y / 16, torch.full_like(y, 2.0 ** -10)) * 1.001 + 1e-5)


CASES = [(2, 37, 3, 16, True, "random"), (1, 70, 2, 24, False, None), (1, 37, 2, 64, True, "model")]


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("b,s,h,d,weights,rope", CASES)
def test_q_and_k_match_the_unfused_quantization(fmt, b, s, h, d, weights, rope):
    q, k, v, wq, wk, cos, sin = make(b, s, h, d, weights, rope, seed=s + d)
    center = sample_k_center(k, wk, EPS, cos, sin, h)  # the default (test_k_center_...), passed to run it once
    q8, qs, k8, ks = qk_norm_rope_quantized(q, k, wq, wk, EPS, cos, sin, h, qk_format=fmt, k_center=center)
    d_pad = max(32, 1 << (d - 1).bit_length())
    assert q8.shape == k8.shape == (b * h, s, d_pad) and qs.shape == ks.shape == (b * h, s)
    assert (q8[..., d:].float() == 0).all() and (k8[..., d:].float() == 0).all()
    # The unfused path on fp32: the norm + RoPE kernel (identity tables for no rotation: exact), then quantize.
    tables = (cos, sin) if cos is not None else identity_tables(s, d)
    qn, kn = qk_norm_rope(q, k, wq, wk, EPS, *tables, h)
    z = quantize(qn, kn, v.unflatten(-1, (h, -1)), qk_format=fmt)
    assert torch.equal(q8.view(torch.int8), z.q.view(torch.int8)) and torch.equal(qs, z.q_scale)  # bitwise
    # Against the torch twin: the same 8-bit values but where the twin's rounding of the norm lands on the other
    # side of a rounding boundary (one step at most), and the dequantized values within the rounding error.
    ref_q = norm_rope_ref(q, wq, EPS, cos, sin, h).transpose(1, 2).reshape(b * h, s, d)
    ref_k = norm_rope_ref(k, wk, EPS, cos, sin, h).transpose(1, 2).reshape(b * h, s, d)
    zr = quantize(ref_q.unflatten(0, (b, h)).transpose(1, 2), ref_k.unflatten(0, (b, h)).transpose(1, 2),
                  v.unflatten(-1, (h, -1)), qk_format=fmt)
    if fmt == "int8":
        assert (q8.int() - zr.q.int()).abs().max() <= 1
    torch.testing.assert_close(qs, zr.q_scale, rtol=1e-5, atol=0)
    q_factor = qs[..., None] / (d ** -0.5 * 1.4426950408889634)
    assert ((q8[..., :d].float() * q_factor - ref_q).abs() <= step_bound(ref_q, q_factor, fmt)).all()
    # K: centered on the sampled mean (every token here: S <= 256), then quantized.
    torch.testing.assert_close(center, ref_k.unflatten(0, (b, h)).mean(2), rtol=0, atol=1e-6)
    centered = ref_k - center.reshape(b * h, 1, d)
    err = (k8[..., :d].float() * ks[..., None] - centered).abs()
    assert (err <= step_bound(centered, ks[..., None], fmt)).all()


def test_k_center_is_a_sampled_mean_and_can_be_passed():
    b, s, h, d = 1, 37, 2, 16
    q, k, v, wq, wk, cos, sin = make(b, s, h, d, seed=5)
    ref_k = norm_rope_ref(k, wk, EPS, cos, sin, h)
    picked = torch.tensor([0, 4, 9, 13, 18, 23, 27, 32])  # 8 evenly spaced tokens, the first included
    torch.testing.assert_close(sample_k_center(k, wk, EPS, cos, sin, h, max_tokens=8), ref_k[:, picked].mean(1))
    _, _, k8, ks = qk_norm_rope_quantized(q, k, wq, wk, EPS, cos, sin, h)
    center = torch.randn(b, h, d)  # any center: the one passed is the one subtracted
    _, _, k8c, ksc = qk_norm_rope_quantized(q, k, wq, wk, EPS, cos, sin, h, k_center=center)
    centered = ref_k.transpose(1, 2).reshape(b * h, s, d) - center.reshape(b * h, 1, d)
    err = (k8c[..., :d].float() * ksc[..., None] - centered).abs()
    assert (err <= step_bound(centered, ksc[..., None], "int8")).all()
    _, _, k8d, _ = qk_norm_rope_quantized(q, k, wq, wk, EPS, cos, sin, h,
                                          k_center=sample_k_center(k, wk, EPS, cos, sin, h))
    assert torch.equal(k8d, k8)  # the default is sample_k_center's


ATTN_CASES = [(2, 37, 3, 16, True, "random", False, None), (1, 70, 2, 64, True, "model", True, None),
              (1, 70, 3, 24, False, None, True, 16)]


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("b,s,h,d,weights,rope,outliers,samples", ATTN_CASES)
def test_attention_matches_exact_attention(fmt, b, s, h, d, weights, rope, outliers, samples):
    """The fused path's attention against fp64 attention of the exact norm + RoPE, with the bounds of the unfused
    8-bit attention's tests; ``samples`` < S centers K on a subsampled mean (what long sequences get)."""
    q, k, v, wq, wk, cos, sin = make(b, s, h, d, weights, rope, outliers, seed=3 * s + d)
    qn, kn = (norm_rope_ref(x, w, EPS, cos, sin, h) for x, w in ((q, wq), (k, wk)))
    vh = v.unflatten(-1, (h, -1))
    with torch.no_grad():
        if samples is None:
            out = qk_norm_rope_attention_fp8(q, k, v, wq, wk, EPS, cos, sin, h, qk_format=fmt)
        else:
            from stdit.kernels.attention_fp8 import Quantized, attention_quantized, quantize_v

            center = sample_k_center(k, wk, EPS, cos, sin, h, max_tokens=samples)
            qz = Quantized(*qk_norm_rope_quantized(q, k, wq, wk, EPS, cos, sin, h, qk_format=fmt, k_center=center),
                           *quantize_v(vh))
            out = attention_quantized(qz, torch.empty_like(qn), h)
    assert out.shape == (b, s, h, d) and out.dtype == q.dtype
    exact = attention_ref(qn.double(), kn.double(), vh.double(), dtype=torch.float64)
    twin = attention_fp8_ref(qn, kn, vh, qk_format=fmt)
    cos_sim, rel = stats(out, exact)
    rel_twin = stats(twin, exact)[1]
    assert rel <= 1.15 * rel_twin + 0.003, (rel, rel_twin)
    if samples is None:  # K centered on the exact mean, as the unfused path centers it: the same rounding
        with torch.no_grad():
            assert stats(out, attention_fp8(qn, kn, vh, qk_format=fmt))[1] < 0.01
    bound = (0.9990, 0.040) if fmt == "int8" else (0.9980, 0.060)
    assert cos_sim >= bound[0] and rel <= bound[1], (cos_sim, rel)


def test_sampled_center_makes_k_outliers_harmless():
    """The error of the 8-bit Q and K alone (dequantized, attention in fp64): K centered on the mean of 8 of its 37
    tokens is as good as on the exact mean, and much better than not centered, whose per-token scales follow the
    offset channels."""
    b, s, h, d = 1, 37, 2, 64
    q, k, v, wq, wk, cos, sin = make(b, s, h, d, True, "model", outliers=True, seed=1)
    qn, kn = (norm_rope_ref(x, w, EPS, cos, sin, h) for x, w in ((q, wq), (k, wk)))
    vh = v.unflatten(-1, (h, -1)).double()
    exact = attention_ref(qn.double(), kn.double(), vh, dtype=torch.float64)

    def qk_error(center):
        q8, qs, k8, ks = qk_norm_rope_quantized(q, k, wq, wk, EPS, cos, sin, h, k_center=center)
        qd = q8[..., :d].double() * qs[..., None] / (d ** -0.5 * 1.4426950408889634)
        kd = k8[..., :d].double() * ks[..., None] + center.reshape(b * h, 1, d)
        qd, kd = (x.unflatten(0, (b, h)).transpose(1, 2) for x in (qd, kd))
        return stats(attention_ref(qd, kd, vh, dtype=torch.float64), exact)[1]

    sampled = qk_error(sample_k_center(k, wk, EPS, cos, sin, h, max_tokens=8))
    full = qk_error(kn.mean(1))
    none = qk_error(torch.zeros(b, h, d))
    assert sampled <= 1.3 * full + 1e-3 and none > 2 * sampled, (sampled, full, none)


def test_refuses_bad_arguments():
    q, k, v, wq, wk, cos, sin = make(1, 8, 2, 16)
    with pytest.raises(ValueError, match="qk_format"):
        qk_norm_rope_quantized(q, k, wq, wk, EPS, cos, sin, 2, qk_format="int4")
    with pytest.raises(ValueError, match="both norm weights"):
        qk_norm_rope_quantized(q, k, wq, None, EPS, cos, sin, 2)
    with pytest.raises(ValueError, match="cos/sin"):
        qk_norm_rope_quantized(q, k, wq, wk, EPS, cos[:5], sin[:5], 2)
    with pytest.raises(ValueError, match="even head dim"):
        qk_norm_rope_quantized(q, k, wq, wk, EPS, cos, sin, 3)
    with pytest.raises(ValueError, match="k_center"):
        qk_norm_rope_quantized(q, k, wq, wk, EPS, cos, sin, 2, k_center=torch.zeros(2, 16))
    with pytest.raises(RuntimeError, match="inference only"):
        qk_norm_rope_attention_fp8(q.requires_grad_(), k, v, wq, wk, EPS, cos, sin, 2)


def test_custom_op_under_compile():
    """Under torch.compile (``fullgraph``: no break) the fused attention runs as its custom op, with the eager
    path's bits."""
    q, k, v, wq, wk, cos, sin = make(1, 20, 2, 16, seed=4)
    with torch.no_grad():
        eager = qk_norm_rope_attention_fp8(q, k, v, wq, wk, EPS, cos, sin, 2)
        torch._dynamo.reset()
        compiled = torch.compile(qk_norm_rope_attention_fp8, backend="aot_eager", fullgraph=True)
        assert torch.equal(compiled(q, k, v, wq, wk, EPS, cos, sin, 2), eager)


# ---- the model's fused branch -------------------------------------------------------------------------------

def model_inputs(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, 3, 6, 6, generator=g)
    text = torch.randn(1, 7, model.config.text_dim, generator=g)
    return x.to(device()), torch.tensor([500.0], device=device()), text.to(device())


def test_model_fused_branch_matches_the_unfused_one(monkeypatch):
    from stdit.attention_layer import StDiTAttention
    from stdit.fp8 import FP8Attention

    calls = []
    real = StDiTAttention.fp8_self_attention
    monkeypatch.setattr(StDiTAttention, "fp8_self_attention",
                        lambda self, *a: calls.append(a[0].shape) or real(self, *a))
    monkeypatch.setattr(StDiTAttention, "fp8_fused_min_tokens", 0)  # the tiny model's 27 tokens take it too
    model = tiny_model(attention_head_dim=32).to(device())
    x, t, text = model_inputs(model)
    model.set_fp8_attention(FP8Attention())
    with torch.no_grad():
        fused = model(x, t, text).sample
        assert len(calls) == 2  # each block's self-attention
        monkeypatch.setattr(StDiTAttention, "fuses_fp8", lambda self, *a: False)
        unfused = model(x, t, text).sample
        model.set_fp8_attention(None)
        exact = model(x, t, text).sample
    assert len(calls) == 2
    # The same 8-bit attention, K centered on the same mean (S = 27 tokens): only the rounding of the norm differs.
    assert rel_err(fused, unfused) < 0.2 * rel_err(unfused, exact), (rel_err(fused, unfused), rel_err(unfused, exact))


def test_model_fused_branch_only_where_exact(monkeypatch):
    from stdit.attention import attention_backend
    from stdit.attention_layer import StDiTAttention
    from stdit.fp8 import FP8Attention

    model = tiny_model(attention_head_dim=32).to(device())
    attn = model.blocks[0].attn1
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 27, 64, generator=g).to(device()) for _ in range(3))
    full = ("full", (3, 3, 3))
    model.set_fp8_attention(FP8Attention())
    assert not attn.fuses_fp8(q, k, v, full)  # 27 tokens: short sequences keep the unfused path
    monkeypatch.setattr(StDiTAttention, "fp8_fused_min_tokens", 27)
    assert attn.fuses_fp8(q, k, v, full) and attn.fuses_fp8(q, k, v, None)
    model.set_fp8_attention(None)
    assert not attn.fuses_fp8(q, k, v, full)  # no 8-bit attention on
    model.set_fp8_attention(FP8Attention())
    assert not attn.fuses_fp8(q, k, v, ("spatial", (3, 3, 3)))
    with attention_backend("sdpa"):  # the context manager overrides the layer's backend
        assert not attn.fuses_fp8(q, k, v, full)
    assert not attn.fuses_fp8(q.requires_grad_(), k, v, full)  # the unfused path refuses it with its error
    q.requires_grad_(False)
    handle = attn.norm_k.register_forward_hook(lambda *a: None)
    assert not attn.fuses_fp8(q, k, v, full)  # a hooked norm runs as its module
    handle.remove()
    attn.sp = object()
    assert not attn.fuses_fp8(q, k, v, full)
    attn.sp = None
    model.set_fp8_attention(FP8Attention(min_timestep=600))
    model._fp8_switch.update(torch.tensor([500.0], device=device()))
    assert not attn.fuses_fp8(q, k, v, full)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("outliers", [False, True])
def test_gpu_fused_matches_unfused(fmt, outliers):
    """Wan-like size in bf16: K centered on 256 of 4096 tokens instead of all of them, and no bf16 copy of the normed
    Q and K in between; the two outputs agree, and the fused one is no further from exact attention."""
    b, s, h, d = 1, 4096, 12, 128
    q, k, v, wq, wk, cos, sin = make(b, s, h, d, True, "model", outliers, dtype=torch.bfloat16, seed=11)
    vh = v.unflatten(-1, (h, -1))
    with torch.no_grad():
        out = qk_norm_rope_attention_fp8(q, k, v, wq, wk, EPS, cos, sin, h, qk_format=fmt)
        qn, kn = qk_norm_rope(q, k, wq, wk, EPS, cos, sin, h)
        unfused = attention_fp8(qn, kn, vh, qk_format=fmt)
        ex_q = norm_rope_ref(q[:, :512], wq, EPS, cos[:512], sin[:512], h)
        ex_k = norm_rope_ref(k, wk, EPS, cos, sin, h)
        exact = attention_ref(ex_q.double(), ex_k.double(), vh.double(), dtype=torch.float64)
    assert stats(out, unfused)[0] >= 0.999
    rel, rel_unfused = stats(out[:, :512], exact)[1], stats(unfused[:, :512], exact)[1]
    assert rel <= 1.1 * rel_unfused + 0.002, (rel, rel_unfused)
    # fp32 inputs: Q's 8 bits as the unfused path's (the same norm factor reduction and elementwise math).
    q, k, v, wq, wk, cos, sin = make(1, 1000, h, d, True, "random", seed=12)
    q8, qs, _, _ = qk_norm_rope_quantized(q, k, wq, wk, EPS, cos, sin, h, qk_format=fmt)
    qn, kn = qk_norm_rope(q, k, wq, wk, EPS, cos, sin, h)
    z = quantize(qn, kn, v.unflatten(-1, (h, -1)), qk_format=fmt)
    assert torch.equal(q8.view(torch.int8), z.q.view(torch.int8)) and torch.equal(qs, z.q_scale)
