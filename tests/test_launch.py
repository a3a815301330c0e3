"""The launch cache (``stdit.kernels._launch``): its call-signature key and parameter order on the CPU; on a GPU, that
cached launches compute what Triton's own launches compute and that a call Triton would specialize differently
(alignment, integer values, constexprs) compiles anew instead of reusing a kernel."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from _kernel_env import HAS_CUDA, load_kernels

load_kernels()
from stdit.kernels import _launch  # noqa: E402


def _axpy(X, Y, OUT, n, alpha, BLOCK: tl.constexpr, NEG: tl.constexpr = False):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    out = alpha * tl.load(X + offs, mask=mask) + tl.load(Y + offs, mask=mask)
    if NEG:
        out = -out
    tl.store(OUT + offs, out, mask=mask)


def test_signature_separates_what_triton_specializes_on():
    x = torch.zeros(64, dtype=torch.float16)
    sig = _launch._signature
    assert sig((x, 8, 2.5)) == sig((x.clone(), 8, -1.0))  # floats: one fp32 slot whatever the value
    assert sig((x, 8)) != sig((x[1:], 8))  # a 2-byte offset breaks the 16-byte alignment
    assert sig((x, 8)) != sig((x.float(), 8))  # dtype
    assert sig((x, 8)) != sig((x, 16)) != sig((x, 1))  # integers by value (16-divisible and 1 specialize)
    assert sig((x, None)) != sig((x, 0))
    assert sig((x, True)) != sig((x, 1))  # Triton types a bool i1, an int i32


def test_trailing_follows_parameter_order_and_defaults():
    fn = triton.runtime.JITFunction(_axpy)
    assert _launch._trailing(fn, 5, {"BLOCK": 32}) == (32, False)
    assert _launch._trailing(fn, 5, {"NEG": True, "BLOCK": 64}) == (64, True)
    with pytest.raises(TypeError, match="BLOCK"):
        _launch._trailing(fn, 5, {"NEG": True})


def test_default_options_fill_in_and_yield_to_the_caller():
    """Every launch asks for FP fusion (Triton 3.10 turns it off by default) unless the call sets it."""
    seen = []

    class Kernel:  # not a JITFunction: launch() takes the plain ``fn[grid](...)`` path
        def __getitem__(self, grid):
            return lambda *args, **kw: seen.append((grid, args, kw))

    _launch.launch(Kernel(), (3,), (1, 2), dict(BLOCK=8), num_warps=4)
    _launch.launch(Kernel(), (3,), (1, 2), dict(BLOCK=8), enable_fp_fusion=False)
    assert seen[0] == ((3,), (1, 2), dict(BLOCK=8, enable_fp_fusion=True, num_warps=4))
    assert seen[1][2]["enable_fp_fusion"] is False
    assert _launch.DEFAULT_OPTIONS == {"enable_fp_fusion": True}


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_cached_launches_match_and_respecialize():
    fn = triton.jit(_axpy)
    g = torch.Generator(device="cuda").manual_seed(0)
    buf = torch.randn(3, 1001, device="cuda", generator=g)

    def run(x, y, alpha, block=128, **kw):
        out = torch.empty_like(x)
        _launch.launch(fn, (triton.cdiv(x.numel(), block),), (x, y, out, x.numel(), alpha), dict(BLOCK=block, **kw))
        return out

    x, y = buf[0], buf[1]
    before = len(_launch._compiled)
    for alpha in (2.0, -0.5, 3.0):  # the first call compiles and is kept, the later ones take the cached kernel
        torch.testing.assert_close(run(x, y, alpha), alpha * x + y)
    assert len(_launch._compiled) == before + 1
    torch.testing.assert_close(run(x, y, 1.5, NEG=True), -(1.5 * x + y))
    # Misaligned views (4-byte offset), another length (not 16-divisible), another block: each a new signature.
    xo, yo = buf[0, 1:], buf[2, 1:]
    torch.testing.assert_close(run(xo, yo, 2.0), 2.0 * xo + yo)
    torch.testing.assert_close(run(x[:992], y[:992], 2.0, block=64), 2.0 * x[:992] + y[:992])
    assert len(_launch._compiled) == before + 4
    torch.testing.assert_close(run(xo, yo, -2.0), -2.0 * xo + yo)  # cached again
    assert len(_launch._compiled) == before + 4


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_launch_hooks_see_every_launch():
    fn = triton.jit(_axpy)
    x = torch.randn(300, device="cuda")
    seen = []
    hook = triton.knobs.runtime.launch_enter_hook
    hook.add(seen.append)
    try:
        for _ in range(3):
            out = torch.empty_like(x)
            _launch.launch(fn, (3,), (x, x, out, 300, 1.0), dict(BLOCK=128))
    finally:
        hook.remove(seen.append)
    torch.testing.assert_close(out, 2 * x)
    assert len(seen) == 3  # a profiler hooked into Triton is never bypassed


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_bound_launches_replay_and_yield_to_hooks():
    """launch() returns the launch bound to its signature; replaying it computes the same as launching anew, and a
    profiler's hook installed afterwards still sees the replays."""
    fn = triton.jit(_axpy)
    x, y = torch.randn(2, 300, device="cuda").unbind(0)
    out = torch.empty_like(x)
    bound = _launch.launch(fn, (3,), (x, y, out, 300, 2.0), dict(BLOCK=128))
    assert bound is not None
    torch.testing.assert_close(out, 2 * x + y)
    x2, y2 = torch.randn(2, 300, device="cuda").unbind(0)
    bound(x2, y2, out, 300, -1.0)
    torch.testing.assert_close(out, -x2 + y2)
    seen = []
    hook = triton.knobs.runtime.launch_enter_hook
    hook.add(seen.append)
    try:
        bound(x, y, out, 300, 3.0)
    finally:
        hook.remove(seen.append)
    torch.testing.assert_close(out, 3 * x + y)
    assert len(seen) == 1
