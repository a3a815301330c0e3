"""StDiT on the triton attention backend (our kernels: fused QK-norm + RoPE, flash attention) matches eager."""

import contextlib
import re

import pytest
import torch

from helpers import rel_err, tiny_model
from stdit import attention_backend

HAS_CUDA = torch.cuda.is_available()


def _forward_backward(m, inputs, backend):
    # backend None: the model's own choice, no attention_backend block (one would break compiled graphs)
    m.zero_grad()
    x, t, text, mask = inputs
    with attention_backend(backend) if backend else contextlib.nullcontext():
        out = m(x, t, text, encoder_attention_mask=mask).sample
    out.float().square().mean().backward()
    return out.detach().float(), {n: p.grad.float().clone() for n, p in m.named_parameters() if p.grad is not None}


def _inputs(b, thw, text_len, device, dtype):
    g = torch.Generator().manual_seed(11)
    mask = torch.ones(b, text_len, dtype=torch.bool)
    mask[-1, text_len // 2:] = False
    x = torch.randn(b, 4, *thw, generator=g).to(device, dtype)
    return x, torch.tensor([30.0, 800.0][:b], device=device), torch.randn(b, text_len, 24, generator=g).to(device, dtype), mask.to(device)


def _bf16_against_fp32(**model_kw):
    """A GPU model's fp32 outputs and gradients (the reference), then the model in bf16 and its eager-attention
    outputs and gradients (what the rule compares against): (m16, inputs16, ref, eager)."""
    m = tiny_model(num_attention_heads=4, attention_head_dim=64, **model_kw).cuda().train()
    inputs32 = _inputs(2, (5, 18, 30), 7, "cuda", torch.float32)
    ref = _forward_backward(m, inputs32, "eager")
    m16 = m.to(torch.bfloat16)
    inputs16 = tuple(t.bfloat16() if t.is_floating_point() and t.ndim > 1 else t for t in inputs32)
    return m16, inputs16, ref, _forward_backward(m16, inputs16, "eager")


def _check_bf16_rule(got, ref, eager, tag=""):
    # the flash-attention rule: error vs fp32 at most 2x the error of the same math in torch at bf16, + atol
    (out, g), (ref_out, ref_g), (eager_out, eager_g) = got, ref, eager
    assert rel_err(out, ref_out) <= 2 * rel_err(eager_out, ref_out) + 1e-3, tag
    for n in ref_g:
        assert rel_err(g[n], ref_g[n]) <= 2 * rel_err(eager_g[n], ref_g[n]) + 2e-3, (tag, n)


@pytest.mark.parametrize("mode", ["full", "factorized"])
def test_triton_backend_matches_eager_on_cpu_interpreter(mode):
    if HAS_CUDA:
        pytest.skip("the GPU variant below covers this")
    m = tiny_model(attention_head_dim=32, attention_mode=mode, num_layers=1).train()
    inputs = _inputs(2, (2, 4, 6), 5, "cpu", torch.float32)
    ref, ref_g = _forward_backward(m, inputs, "eager")
    out, g = _forward_backward(m, inputs, "triton")
    assert rel_err(out, ref) < 1e-5  # fp32 in the interpreter: ~1e-7 measured
    assert ref_g.keys() == g.keys()
    for n in ref_g:
        assert rel_err(g[n], ref_g[n]) < 5e-5, n  # ~3e-6 measured


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["full", "factorized"])
def test_triton_backend_matches_eager_bf16_gpu(mode):
    m16, inputs16, ref, eager = _bf16_against_fp32(attention_mode=mode)
    _check_bf16_rule(_forward_backward(m16, inputs16, "triton"), ref, eager)


@pytest.mark.gpu
def test_triton_backend_under_torch_compile_gpu():
    """Each block under ``torch.compile`` (inductor) on the triton backend, where attention, the norm chain and the
    QK norm + RoPE run as our custom ops (Dynamo cannot trace our launches): outputs and gradients keep the bf16
    rule against the fp32 model."""
    m16, inputs16, ref, eager = _bf16_against_fp32()
    for blk in m16.blocks:
        blk.compile()
    _check_bf16_rule(_forward_backward(m16, inputs16, "triton"), ref, eager)


@pytest.mark.gpu
def test_compile_blocks_with_selective_checkpointing_gpu():
    """``compile_blocks`` with each checkpointing policy on the triton backend (inductor, bf16): outputs and
    gradients keep the bf16 rule against the fp32 model, and keeping matmuls takes every block's matrix products
    out of the backward's recompute."""
    from torch.profiler import ProfilerActivity, profile

    m16, inputs16, ref, eager = _bf16_against_fp32()
    m16.set_attention_backend("triton")
    m16.compile_blocks()
    matmuls = {}
    for keep in ("attention", "matmuls"):
        m16.enable_gradient_checkpointing(keep_attention=keep == "attention", keep_matmuls=keep == "matmuls")
        _check_bf16_rule(_forward_backward(m16, inputs16, None), ref, eager, keep)
        x, t, text, mask = inputs16
        loss = m16(x, t, text, encoder_attention_mask=mask).sample.float().square().mean()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            loss.backward()
            torch.cuda.synchronize()
        # GEMM kernels the backward launched (cuBLAS names): aten::mm events would also count the calls that
        # selective checkpointing answers from its saved outputs without launching anything
        matmuls[keep] = sum(bool(re.search(r"gemm|nvjet|xmma|cutlass", e.name, re.I)) for e in prof.events()
                            if e.device_type == torch.autograd.DeviceType.CUDA)
    assert matmuls["attention"] - matmuls["matmuls"] == 10 * len(m16.blocks), matmuls


class _CountOps(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls[func.name()] = self.calls.get(func.name(), 0) + 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
def test_checkpointing_that_keeps_attention(backend):
    """``enable_gradient_checkpointing(keep_attention=True)``: the same gradients as no checkpointing and as full
    checkpointing, and the backward's recompute runs no self-attention forward (cross-attention is recomputed);
    with ``keep_matmuls=True`` it runs no attention and no matrix product either (the same counts as no
    checkpointing)."""
    if HAS_CUDA and backend == "sdpa":
        pytest.skip("op names differ per GPU backend; the CPU run checks the policy")
    device = "cuda" if HAS_CUDA else "cpu"
    inputs = _inputs(2, (2, 4, 6), 5, device, torch.float32)
    op = "stdit::flash_attention_fwd" if backend == "triton" else "aten::_scaled_dot_product_flash_attention_for_cpu"
    grads, counts, matmuls = {}, {}, {}
    for mode in ("none", "full", "keep", "keep_mm"):
        m = tiny_model(attention_head_dim=32, num_layers=2).to(device).train()
        if mode != "none":
            m.enable_gradient_checkpointing(keep_attention=mode == "keep", keep_matmuls=mode == "keep_mm")
        with _CountOps() as c:
            _, grads[mode] = _forward_backward(m, inputs, backend)
        counts[mode] = c.calls.get(op, 0)
        matmuls[mode] = sum(c.calls.get(name, 0) for name in ("aten::mm", "aten::addmm", "aten::bmm"))
    layers = 2  # one self- and one cross-attention each
    assert counts["none"] == 2 * layers
    assert counts["full"] == 4 * layers
    assert counts["keep"] == 3 * layers
    assert counts["keep_mm"] == 2 * layers
    assert matmuls["full"] == matmuls["keep"] > matmuls["none"] > 0
    assert matmuls["keep_mm"] == matmuls["none"]
    for mode in ("full", "keep", "keep_mm"):
        assert grads[mode].keys() == grads["none"].keys()
        for n in grads["none"]:
            assert rel_err(grads[mode][n], grads["none"][n]) < 1e-6, (mode, n)
    with pytest.raises(ValueError, match="not both"):
        m.enable_gradient_checkpointing(lambda *a: None, keep_attention=True)
