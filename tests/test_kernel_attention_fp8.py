"""8-bit attention (:mod:`stdit.kernels.attention_fp8`) against its torch twin and against exact attention: sizes
that are not multiples of the blocks, key masks, K with per-channel outliers, both Q/K formats; clear errors.

On the CPU the kernels run under the Triton interpreter (tiny sizes); the ``gpu`` tests run bf16 at real sizes.
The bounds are what 8-bit products allow: P and V in FP8 e4m3 alone carry about 2.5% relative error each on N(0, 1)
inputs (their outputs are near-cancelling sums), INT8 Q and K under 1%."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _kernel_env import HAS_CUDA, device, load_kernels

load_kernels()
from stdit.kernels.attention_fp8 import attention_fp8, quantize  # noqa: E402
from stdit.kernels.attention_fp8_ref import attention_fp8_ref, quantize_rows  # noqa: E402
from stdit.kernels.attention_ref import attention_ref  # noqa: E402

gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")


def stats(out, ref):
    a, r = out.double().flatten(), ref.double().flatten()
    return F.cosine_similarity(a, r, dim=0).item(), ((a - r).norm() / r.norm()).item()


def make(b, sq, sk, h, d, outliers=False, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = torch.randn(b, sq, h, d, generator=g), torch.randn(b, sk, h, d, generator=g), torch.randn(b, sk, h, d,
                                                                                                     generator=g)
    if outliers:
        k = k + 8.0 * torch.randn(1, 1, h, d, generator=g)  # a large per-channel offset, as video DiTs have in K
    return [t.to(device=device(), dtype=dtype) for t in (q, k, v)]


CASES = [(2, 37, 53, 3, 64, False, False), (1, 45, 70, 2, 72, True, False), (1, 33, 90, 2, 128, False, True),
         (1, 20, 41, 1, 32, True, True)]


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("b,sq,sk,h,d,masked,outliers", CASES)
def test_matches_twin_and_exact_attention(fmt, b, sq, sk, h, d, masked, outliers):
    q, k, v = make(b, sq, sk, h, d, outliers)
    mask = None
    if masked:
        mask = torch.rand(b, sk, generator=torch.Generator().manual_seed(1)) > 0.3
        mask[:, 0] = True
        mask = mask.to(device())
    with torch.no_grad():
        out = attention_fp8(q, k, v, mask, qk_format=fmt)
    assert out.shape == q.shape and out.dtype == q.dtype
    exact = attention_ref(q.double(), k.double(), v.double(), mask, dtype=torch.float64)
    twin = attention_fp8_ref(q, k, v, mask, qk_format=fmt)
    cos, rel = stats(out, exact)
    _, rel_twin = stats(twin, exact)
    # The kernel quantizes P against the running row max, the twin against the final one: the same error level.
    assert rel <= 1.15 * rel_twin + 0.003, (rel, rel_twin)
    assert stats(out, twin)[1] < 0.03
    bound = (0.9990, 0.040) if fmt == "int8" else (0.9980, 0.060)  # FP8 Q and K: 3 mantissa bits
    assert cos >= bound[0] and rel <= bound[1], (cos, rel)


def test_smoothing_makes_k_outliers_harmless():
    q, k, v = make(1, 40, 64, 2, 64, outliers=True)
    exact = attention_ref(q.double(), k.double(), v.double(), dtype=torch.float64)
    with torch.no_grad():
        rel = stats(attention_fp8(q, k, v), exact)[1]
    clean = [t.double() for t in make(1, 40, 64, 2, 64)]
    rel_clean = stats(attention_fp8(*(t.float() for t in clean)), attention_ref(*clean, dtype=torch.float64))[1]
    assert rel <= 1.3 * rel_clean + 0.005  # the offset costs (almost) nothing
    # Without smoothing each token's K scale follows the offset channels and the scores lose their resolution.
    qd = quantize_rows(q, "int8")[0].double()
    qk_only = [stats(attention_ref(qd, quantize_rows(kk, "int8")[0].double(), v.double(), dtype=torch.float64),
                     exact)[1] for kk in (k, k - k.mean(dim=1, keepdim=True))]
    assert qk_only[0] > 4 * qk_only[1], qk_only


def test_fully_masked_query_rows_output_zeros():
    q, k, v = make(2, 19, 33, 2, 64)
    mask = torch.ones(2, 33, dtype=torch.bool)
    mask[1] = False
    with torch.no_grad():
        out = attention_fp8(q, k, v, mask.to(device()))
    assert (out[1] == 0).all() and out[0].abs().sum() > 0


def test_quantized_layout():
    q, k, v = make(2, 21, 35, 3, 72)
    z = quantize(q, k, v, qk_format="int8")
    assert z.q.dtype == torch.int8 and z.q.shape == (6, 21, 128) and (z.q[..., 72:] == 0).all()
    assert z.v.dtype == torch.float8_e4m3fn and z.v.shape == (6, 128, 48)  # transposed, keys padded to 16
    assert (z.v[:, :, 35:].float() == 0).all()
    assert (z.k.float().abs().amax(-1) == 127).all()  # every token uses the full INT8 range


def test_refuses_gradients_and_bad_arguments():
    q, k, v = make(1, 8, 8, 1, 64)
    with pytest.raises(RuntimeError, match="inference only"):
        attention_fp8(q.requires_grad_(), k, v)
    with torch.no_grad():
        with pytest.raises(ValueError, match="qk_format"):
            attention_fp8(q, k, v, qk_format="int4")
        with pytest.raises(ValueError, match="must be \\[B, Sk, H, D\\]"):
            attention_fp8(q, k[:, :, :, :32], v)
        with pytest.raises(ValueError, match="key_padding_mask"):
            attention_fp8(q, k, v, torch.ones(1, 7, dtype=torch.bool))


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("sq,sk,h,d,outliers", [(1000, 1533, 4, 128, False), (4133, 4133, 2, 64, True),
                                                 (777, 2049, 3, 96, True)])
def test_gpu_bf16_accuracy(fmt, sq, sk, h, d, outliers):
    q, k, v = make(1, sq, sk, h, d, outliers, dtype=torch.bfloat16, seed=3)
    with torch.no_grad():
        out = attention_fp8(q, k, v, qk_format=fmt)
    exact = attention_ref(q.double(), k.double(), v.double(), dtype=torch.float64)
    twin = attention_fp8_ref(q, k, v, qk_format=fmt)
    cos, rel = stats(out, exact)
    assert rel <= 1.15 * stats(twin, exact)[1] + 0.005
    bound = (0.9990, 0.045) if fmt == "int8" else (0.9980, 0.065)
    assert cos >= bound[0] and rel <= bound[1], (cos, rel)
