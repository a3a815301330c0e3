"""Fused QK RMSNorm (across heads) + interleaved RoPE vs its pure-torch twin: outputs and grads of q, k, weights."""

from __future__ import annotations

import functools

import pytest
import torch
from _kernel_env import HAS_CUDA, check_rule, device, load_kernels, max_err

kernels = load_kernels()
from stdit.kernels.qk_norm_rope_ref import qk_norm_rope_ref  # noqa: E402
from stdit.rope import RotaryEmbedding3D  # noqa: E402

gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")


def make_inputs(b, s, h, d, dtype, weights, seed):
    g = torch.Generator().manual_seed(seed)
    # q and k as strided slices of one fused projection output.
    qk = (torch.randn(b, s, 2 * h * d, generator=g) * 3).to(device(), dtype)
    q, k = qk.split(h * d, dim=-1)
    wq = wk = None
    if weights:
        wq = (1 + 0.3 * torch.randn(h * d, generator=g)).to(device())
        wk = (1 + 0.3 * torch.randn(h * d, generator=g)).to(device())
    angles = torch.rand(s, d // 2, generator=g, dtype=torch.float64) * 20
    cos, sin = angles.cos().float().to(device()), angles.sin().float().to(device())
    gq = torch.randn(b, s, h, d, generator=g).to(device(), dtype)
    gk = torch.randn(b, s, h, d, generator=g).to(device(), dtype)
    return q, k, wq, wk, cos, sin, gq, gk


def run(fn, q, k, wq, wk, cos, sin, gq, gk, h, eps=1e-6):
    leaves = [x.detach().clone().requires_grad_() if x is not None else None for x in (q, k, wq, wk)]
    qo, ko = fn(*leaves, eps, cos, sin, h)
    qo, ko = qo.reshape(gq.shape), ko.reshape(gk.shape)
    ((qo.float() * gq.float()).sum() + (ko.float() * gk.float()).sum()).backward()
    return [qo.detach(), ko.detach()] + [x.grad for x in leaves if x is not None]


CPU_CASES = [(2, 5, 3, 8, torch.float32, True), (1, 7, 2, 72, torch.float32, False),
             (1, 1, 4, 12, torch.float32, True), (2, 3, 2, 64, torch.float16, True)]


@pytest.mark.skipif(HAS_CUDA, reason="interpreter test; the gpu tests cover CUDA")
@pytest.mark.parametrize("b,s,h,d,dtype,weights", CPU_CASES)
def test_qk_norm_rope_interpreter(b, s, h, d, dtype, weights):
    args = make_inputs(b, s, h, d, dtype, weights, seed=s * 7 + d)
    out = run(kernels.qk_norm_rope, *args, h)
    ref = run(lambda *a: qk_norm_rope_ref(*a, dtype=torch.float64), *args, h)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    names = ("q", "k", "dq", "dk", "dwq", "dwk")
    for name, x, r in zip(names, out, ref):
        assert x.shape == r.shape and x.dtype == (dtype if name in ("q", "k", "dq", "dk") else torch.float32)
        assert max_err(x, r) <= tol * max(1.0, r.abs().max().item()), f"{name}: {max_err(x, r):.3e}"


@pytest.mark.skipif(HAS_CUDA, reason="interpreter test")
def test_qk_norm_rope_matches_model_tables_and_checks_args():
    h, d = 2, 12
    cos, sin = RotaryEmbedding3D(d)((2, 2, 3))
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 2, 12, h * d, generator=g).unbind(0)
    out = kernels.qk_norm_rope(q, k, None, None, 1e-6, cos, sin, h)
    ref = qk_norm_rope_ref(q, k, None, None, 1e-6, cos, sin, h)
    assert all(max_err(x, r) < 1e-5 for x, r in zip(out, ref))
    with pytest.raises(ValueError, match="both norm weights"):
        kernels.qk_norm_rope(q, k, torch.ones(h * d), None, 1e-6, cos, sin, h)
    with pytest.raises(ValueError, match="cos/sin"):
        kernels.qk_norm_rope(q, k, None, None, 1e-6, cos[:5], sin[:5], h)


@pytest.mark.skipif(HAS_CUDA, reason="interpreter test; the model's compile test covers CUDA")
@pytest.mark.parametrize("weights", [True, False])
def test_qk_norm_rope_custom_op_under_compile(weights):
    """Under torch.compile (``fullgraph``: no break) the kernel runs as the custom ops ``stdit::qk_norm_rope_fwd``
    / ``_bwd``: outputs and every gradient the eager kernel's bits; schema, fake functions and autograd
    registration pass torch's op checks."""
    from stdit.kernels.qk_norm_rope import qk_norm_rope_op as _qk_norm_rope_fwd
    from stdit.ops import qk_norm_rope

    h = 2
    args = make_inputs(2, 5, h, 8, torch.float32, weights, seed=5)
    torch._dynamo.reset()  # earlier tests' graph breaks leave compiled entries on qk_norm_rope's code
    compiled = torch.compile(functools.partial(qk_norm_rope, backend="triton"), backend="aot_eager", fullgraph=True)
    out = run(lambda *a: compiled(*a), *args, h)
    ref = run(kernels.qk_norm_rope, *args, h)
    assert len(out) == len(ref)
    for x, r in zip(out, ref):
        assert torch.equal(x, r)  # the same kernels
    q, k, wq, wk, cos, sin, _, _ = args
    torch.library.opcheck(_qk_norm_rope_fwd, (q.detach().requires_grad_(), k.detach().requires_grad_(),
                                              None if wq is None else wq.requires_grad_(),
                                              None if wk is None else wk.requires_grad_(), 1e-6, cos, sin, h))


def torch_path(q, k, wq, wk, eps, cos, sin, h):
    """The unfused torch ops the model runs without the kernel (norm and rope each rounding to q's dtype)."""
    from stdit.ops import rms_norm
    from stdit.rope import apply_rope

    q = rms_norm(q, wq, eps).unflatten(-1, (h, -1))
    k = rms_norm(k, wk, eps).unflatten(-1, (h, -1))
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("b,s,h,d,dtype,weights", [
    (2, 1000, 12, 128, torch.bfloat16, True), (1, 4097, 40, 128, torch.bfloat16, True),
    (2, 77, 5, 72, torch.bfloat16, False), (1, 1, 24, 64, torch.bfloat16, True),
    (2, 1000, 16, 72, torch.float16, True), (1, 300, 12, 96, torch.float16, False),
])
def test_qk_norm_rope_gpu(b, s, h, d, dtype, weights):
    args = make_inputs(b, s, h, d, dtype, weights, seed=s + d)
    out = run(kernels.qk_norm_rope, *args, h)
    ref = run(lambda *a: qk_norm_rope_ref(*a, dtype=torch.float32), *args, h)
    low = run(torch_path, *args, h)
    for name, x, r, lo in zip(("q", "k", "dq", "dk", "dwq", "dwk"), out, ref, low):
        check_rule(name, x, r, lo)
