"""Attention dispatch: backend selection, the triton backend and its fallback, xformers' error, torch.compile."""

from __future__ import annotations

import importlib
import warnings

import pytest
import torch
from _kernel_env import HAS_CUDA, device, load_kernels, max_err

load_kernels()
# The package re-exports the function ``attention``, which shadows the submodule's attribute name.
A = importlib.import_module("stdit.attention")
from stdit.checkpointing import keep_self_attention_policy  # noqa: E402


def qkv(b=2, sq=24, sk=24, h=2, d=64, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, s, h, d, generator=g).to(device(), dtype) for s in (sq, sk, sk)]


def key_mask(sk, seed, mask=True):
    """A random [2, sk] key padding mask whose second batch has every key masked (None without ``mask``)."""
    if not mask:
        return None
    kpm = torch.rand(2, sk, generator=torch.Generator().manual_seed(seed)) > 0.5
    kpm[1] = False
    return kpm.to(device())


def test_unknown_backend_is_one_clear_error(monkeypatch):
    with pytest.raises(ValueError, match="Unknown attention backend"):
        A.check_backend("flash3")
    monkeypatch.setenv(A.ENV_VAR, "Eager")
    assert A.resolve_backend() == "eager"
    with A.attention_backend("sdpa"):
        assert A.resolve_backend("eager") == "sdpa"


def test_xformers_missing_says_how_to_install():
    pytest.importorskip("torch")
    try:
        import xformers  # noqa: F401
        pytest.skip("xformers is installed")
    except ImportError:
        pass
    q, k, v = qkv()
    with pytest.raises(ImportError, match=r"stdit\[xformers\]"):
        A.attention(q, k, v, backend="xformers")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("mask", [False, True])
def test_xformers_backend_matches_eager_gpu(mask):
    """The optional xformers backend against eager in fp32, bf16 inputs, key lengths that are no multiple of 8 (its
    bias rows must be aligned), and a batch whose keys are all masked (zeros, like the other backends)."""
    pytest.importorskip("xformers.ops")
    q, k, v = qkv(sq=77, sk=100, d=64, dtype=torch.bfloat16)
    kpm = key_mask(100, 2, mask)
    out = A.attention(q, k, v, key_padding_mask=kpm, backend="xformers")
    ref = A.attention(q.float(), k.float(), v.float(), key_padding_mask=kpm, backend="eager")
    low = A.attention(q, k, v, key_padding_mask=kpm, backend="eager")
    assert out.dtype == q.dtype and torch.isfinite(out).all()
    assert max_err(out, ref) <= 2 * max_err(low, ref) + 1e-3
    if mask:
        assert out[1].abs().max() == 0


@pytest.mark.parametrize("mask", [False, True])
def test_triton_backend_matches_eager(mask):
    q, k, v = qkv(sq=19, sk=33, d=72)
    kpm = key_mask(33, 1, mask)
    out = A.attention(q, k, v, key_padding_mask=kpm, backend="triton")
    ref = A.attention(q, k, v, key_padding_mask=kpm, backend="eager")
    assert max_err(out, ref) < 1e-4
    if mask:
        assert out[1].abs().max() == 0
        sd = A.attention(q, k, v, key_padding_mask=kpm, backend="sdpa")
        assert max_err(sd, ref) < 1e-4


def test_triton_fallback_warns_once_for_unsupported_shapes():
    A._warned.clear()
    q, k, v = qkv(d=100)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for _ in range(3):
            out = A.attention(q, k, v, backend="triton")
    msgs = [str(w.message) for w in rec if "falling back to sdpa" in str(w.message)]
    assert len(msgs) == 1 and "head dim 100" in msgs[0]
    assert max_err(out, A.eager_attention(q, k, v)) < 1e-4
    assert A.triton_supports(q.to(torch.int32), k) is not None


def test_every_named_backend_is_in_the_registry_and_fp8_falls_back_with_its_reason(monkeypatch):
    assert set(A.BACKENDS) == {"auto", *A.REGISTRY}
    A._warned.clear()
    q, k, v = qkv(d=64)
    monkeypatch.setitem(A.REGISTRY, "fp8", A.Backend(A.REGISTRY["fp8"].run, lambda q, k: "no FP8 here"))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out = [A.attention(q, k, v, backend="fp8") for _ in range(2)]
    msgs = [str(w.message) for w in rec if "falling back to sdpa" in str(w.message)]
    assert msgs == ["stdit: fp8 attention unavailable (no FP8 here); falling back to sdpa."]
    assert torch.equal(out[0], A.sdpa_attention(q, k, v))


def test_triton_backend_gradients_and_compile():
    q, k, v = (x.requires_grad_() for x in qkv(sq=20, sk=20, d=64))
    kpm = torch.ones(2, 20, dtype=torch.bool, device=device())
    kpm[0, 5:] = False

    def f(q, k, v):
        return A.triton_attention(q, k, v, key_padding_mask=kpm)

    # The custom op keeps the kernels opaque to dynamo: one graph, forward and backward.
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    for fn in (f, compiled):
        out = fn(q, k, v)
        grads = torch.autograd.grad(out.square().sum(), (q, k, v))
        ref = A.eager_attention(q, k, v, key_padding_mask=kpm)
        ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
        assert max_err(out, ref) < 1e-4
        assert all(max_err(g, r) < 1e-4 for g, r in zip(grads, ref_grads))


@pytest.mark.parametrize("policy", [None, "keep"])
def test_triton_backend_eager_and_checkpoint_policy(monkeypatch, policy):
    """Eager calls take the autograd.Function; under selective checkpointing (a dispatch mode) the calls go through
    the custom op, so the policy sees the attention, keeps its output and the recompute skips the kernel."""
    import functools

    import stdit.kernels.attention as K
    from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

    calls = []
    forward = K._forward
    monkeypatch.setattr(K, "_forward", lambda *a: calls.append(1) or forward(*a))
    q, k, v = (x.requires_grad_() for x in qkv(sq=20, sk=20, d=64))

    def f(q, k, v):
        return A.triton_attention(q, k, v).square().sum()

    if policy is None:
        loss = checkpoint(f, q, k, v, use_reentrant=False)
    else:
        ctx = functools.partial(create_selective_checkpoint_contexts, keep_self_attention_policy)
        loss = checkpoint(f, q, k, v, use_reentrant=False, context_fn=ctx)
    grads = torch.autograd.grad(loss, (q, k, v))
    ref = A.eager_attention(q, k, v).square().sum()
    ref_grads = torch.autograd.grad(ref, (q, k, v))
    assert all(max_err(g, r) < 1e-4 for g, r in zip(grads, ref_grads))
    assert len(calls) == (2 if policy is None else 1)  # plain checkpointing recomputes the forward


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_triton_backend_inductor_bf16():
    q, k, v = (x.requires_grad_() for x in qkv(b=1, sq=300, sk=300, h=4, d=128, dtype=torch.bfloat16))
    compiled = torch.compile(lambda q, k, v: A.triton_attention(q, k, v), fullgraph=True)
    out = compiled(q, k, v)
    out.float().sum().backward()
    assert max_err(out, A.eager_attention(q, k, v)) < 2e-2
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_auto_is_the_default_and_takes_sdpa_off_hopper(monkeypatch):
    monkeypatch.delenv(A.ENV_VAR, raising=False)
    assert A.resolve_backend() == "auto"
    q, k, v = qkv()
    if not q.is_cuda:
        assert A.auto_backend(q, k, v) == "sdpa"
    # whatever auto picks, the result is attention, eager and traced by torch.compile in one graph
    ref = A.eager_attention(q, k, v)
    assert max_err(A.attention(q, k, v), ref) < 1e-4
    compiled = torch.compile(lambda q, k, v: A.attention(q, k, v), backend="aot_eager", fullgraph=True)
    assert max_err(compiled(q, k, v), ref) < 1e-4


def test_auto_rule_for_training_calls(monkeypatch):
    """The rule itself, with the kernels' coverage checks stubbed: without a backward to come, our forward where it
    covers the call; with one, also the one-pass backward's coverage and at least ``AUTO_TRAIN_MIN_QUERIES``
    queries."""
    from types import SimpleNamespace

    from stdit.kernels import attention as ka

    covers = {"fwd": True, "bwd": True}
    monkeypatch.setattr(ka, "sm90_forward_covers", lambda *a: covers["fwd"])
    monkeypatch.setattr(ka, "sm90_backward_covers", lambda *a: covers["bwd"])

    def call(sq, grad):
        t = SimpleNamespace(is_cuda=True, requires_grad=grad, shape=(1, sq, 2, 64))
        return A.auto_backend(t, t, t)

    n = A.AUTO_TRAIN_MIN_QUERIES
    assert [call(300, False), call(300, True), call(n, True), call(n - 1, True)] == [
        "triton", "sdpa", "triton", "sdpa"]
    with torch.no_grad():
        assert call(300, True) == "triton"
    covers["bwd"] = False
    assert (call(n, False), call(n, True)) == ("triton", "sdpa")
    covers["fwd"] = False
    assert (call(n, False), call(300, False)) == ("sdpa", "sdpa")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_auto_takes_our_hopper_kernels_where_they_are_faster():
    """On sm_90, ``auto`` runs our forward where it covers the call and nothing will ask for a backward (it beats
    cuDNN there), and for training calls too from ``AUTO_TRAIN_MIN_QUERIES`` queries on, where our one-pass
    backward beats cuDNN's (not in deterministic mode); short training calls, masks and other head dims go to
    sdpa."""
    from stdit.kernels import attention as ka

    q, k, v = qkv(b=1, sq=300, sk=300, h=4, d=128, dtype=torch.bfloat16)
    hopper = torch.cuda.get_device_capability() == (9, 0) and ka._sm90.HAVE_GLUON
    assert A.auto_backend(q, k, v) == ("triton" if hopper else "sdpa")
    with torch.no_grad():
        assert A.auto_backend(*(x.requires_grad_() for x in (q, k, v))) == ("triton" if hopper else "sdpa")
    assert A.auto_backend(q, k, v) == "sdpa"  # they require grad now, and 300 queries are few
    long_q = qkv(b=1, sq=A.AUTO_TRAIN_MIN_QUERIES, sk=512, h=1, d=64, dtype=torch.bfloat16)
    long_q = [x.requires_grad_() for x in long_q]
    assert A.auto_backend(*long_q) == ("triton" if hopper else "sdpa")
    torch.use_deterministic_algorithms(True)
    try:
        assert A.auto_backend(*long_q) == "sdpa"
    finally:
        torch.use_deterministic_algorithms(False)
    q, k, v = (x.detach() for x in (q, k, v))
    assert A.auto_backend(q, k, v, torch.ones(1, 300, dtype=torch.bool, device="cuda")) == "sdpa"
    # 72 is read in two column chunks by the Hopper kernels; 48 is left to the general kernel, so to sdpa.
    assert A.auto_backend(*qkv(b=1, sq=300, sk=300, h=4, d=72, dtype=torch.bfloat16)) == ("triton" if hopper
                                                                                          else "sdpa")
    assert A.auto_backend(*qkv(b=1, sq=300, sk=300, h=4, d=48, dtype=torch.bfloat16)) == "sdpa"
    out = A.attention(q, k, v)
    assert max_err(out, A.eager_attention(q, k, v)) < 2e-2
