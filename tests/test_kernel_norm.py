"""Fused adaLN kernels (``stdit.kernels.adaln``) against their torch twin (``stdit.ops.*_torch``).

Rule for every output and every gradient: ``err(kernel) <= 2 * err(torch at the same precision) + atol``, both
measured as ``||a - ref|| / ||ref||`` against the twin in higher precision (fp64 on the CPU, fp32 on the GPU).
On the CPU the kernels run in Triton's interpreter on tiny shapes in fp32 and fp16 (it mis-computes bf16
reductions); bf16 at model sizes runs on the GPU.
"""

import functools
import importlib
import os

import pytest
import torch

if not torch.cuda.is_available():
    # Read when a kernel is decorated; set before the kernels are imported.
    os.environ["TRITON_INTERPRET"] = "1"

from stdit.kernels import adaln  # noqa: E402
from stdit.ops import add_norm_modulate_torch, norm_modulate_torch  # noqa: E402

if not torch.cuda.is_available() and type(adaln._adaln_fwd_kernel).__name__ != "InterpretedFunction":
    # Another module imported the kernels before the interpreter was switched on: decorate them again.
    adaln = importlib.reload(adaln)

DEV = "cuda" if torch.cuda.is_available() else "cpu"

# name -> (residual, gate, shift, scale, affine, norm); the first four are the Wan block's calls.
CASES = {
    "msa_in": (False, False, True, True, False, True),  # norm_modulate(x, shift, scale)
    "norm2": (True, True, False, False, True, True),  # add_norm_modulate(x, attn, gate, weight, bias)
    "cross_out": (True, False, True, True, False, True),  # add_norm_modulate(x, cross, None, shift, scale)
    "ffn_out": (True, True, True, True, False, True),  # add_norm_modulate(x, ffn, gate, shift', scale')
    "residual": (True, True, False, False, False, False),  # last block: norm=False
    "residual_nogate": (True, False, False, False, False, False),
    "everything": (True, True, True, True, True, True),
    "affine_only": (False, False, False, False, True, True),
}


def make_inputs(case, B, S, D, dtype, seed, vec_shape=None):
    residual, gate, shift, scale, affine, _ = CASES[case]
    g = torch.Generator(device=DEV).manual_seed(seed)

    def rnd(*shape, dt=dtype, s=1.0, m=0.0):
        return (torch.randn(*shape, generator=g, device=DEV, dtype=torch.float32) * s + m).to(dt)

    vs = vec_shape or (B, 1, D)
    return dict(
        x=rnd(B, S, D, s=2.0, m=0.3),
        y=rnd(B, S, D) if residual else None,
        gate=rnd(*vs, dt=torch.float32, s=0.5) if gate else None,
        shift=rnd(*vs, dt=torch.float32, s=0.5) if shift else None,
        scale=rnd(*vs, dt=torch.float32, s=0.5) if scale else None,
        weight=rnd(D, dt=torch.float32, s=0.3, m=1.0) if affine else None,
        bias=rnd(D, dt=torch.float32, s=0.3) if affine else None,
    )


def run(case, inp, fused, upstream_seed, up_dtype):
    """Forward, then grads of every tensor input for fixed random upstream grads (values representable in
    ``up_dtype``, so every precision sees the same ones). Returns dict name -> tensor."""
    residual, _, _, _, _, norm = CASES[case]
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inp.items() if v is not None}
    args = {k: leaves.get(k) for k in ("x", "y", "gate", "shift", "scale", "weight", "bias")}
    # fused="compile": the kernels under torch.compile (fullgraph: no break), where they run as custom ops
    wrap = functools.partial(torch.compile, backend="aot_eager", fullgraph=True) if fused == "compile" else None
    if wrap is not None:
        torch._dynamo.reset()  # one fresh compile per case: other tests may have compiled these frames already
    if residual:
        fn = adaln.fused_add_norm_modulate if fused else add_norm_modulate_torch
        h, out = (wrap(fn) if wrap else fn)(**args, eps=1e-6, norm=norm)
        outs = {"h": h} if out is None else {"h": h, "out": out}
    else:
        fn = adaln.fused_norm_modulate if fused else norm_modulate_torch
        args.pop("y"), args.pop("gate")
        outs = {"out": (wrap(fn) if wrap else fn)(**args, eps=1e-6)}
    g = torch.Generator(device=DEV).manual_seed(upstream_seed)
    ups = [torch.randn(o.shape, generator=g, device=DEV).to(up_dtype).to(o.dtype) for o in outs.values()]
    grads = torch.autograd.grad(list(outs.values()), list(leaves.values()), ups)
    res = {k: v.detach() for k, v in outs.items()}
    res.update({"d" + k: v for k, v in zip(leaves, grads)})
    return res


def rel_err(a, ref):
    a, ref = a.double(), ref.double()
    return ((a - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def check(case, B, S, D, dtype, ref_dtype, seed, atol, vec_shape=None, fused=True):
    inp = make_inputs(case, B, S, D, dtype, seed, vec_shape)
    ref_inp = {k: None if v is None else v.to(torch.promote_types(v.dtype, ref_dtype)) for k, v in inp.items()}
    ref = run(case, ref_inp, fused=False, upstream_seed=seed + 1, up_dtype=dtype)
    low = run(case, inp, fused=False, upstream_seed=seed + 1, up_dtype=dtype)
    ker = run(case, inp, fused=fused, upstream_seed=seed + 1, up_dtype=dtype)
    assert set(ker) == set(ref)
    report = {}
    for k in ref:
        assert ker[k].dtype == low[k].dtype and ker[k].shape == low[k].shape, k
        assert torch.isfinite(ker[k]).all(), k
        ek, et = rel_err(ker[k], ref[k]), rel_err(low[k], ref[k])
        report[k] = (ek, et)
        assert ek <= 2 * et + atol, f"{case} {k}: kernel {ek:.3e} vs torch {et:.3e} (B={B} S={S} D={D} {dtype})"
    return report


# ------------------------------------------------------------------------------------------------ CPU

CPU_DTYPES = [torch.float32, torch.float16]


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", list(CASES))
def test_cases(case, dtype):
    seed = int.from_bytes(os.urandom(2), "little")
    check(case, 2, 77, 72, dtype, torch.float64, seed, atol=1e-6)


@pytest.mark.parametrize("case", list(CASES))
def test_custom_op_under_compile(case):
    """Under torch.compile (``fullgraph``: no break) the kernels run as the custom ops ``stdit::adaln_fwd`` /
    ``adaln_bwd``: every output and gradient as right as the eager kernels'."""
    check(case, 2, 9, 72, torch.float32, torch.float64, 7, atol=1e-6, fused="compile")


def test_custom_op_checks():
    """The ops' schema, fake (meta) functions and autograd registration agree with what they compute."""
    for case in ("everything", "residual", "msa_in"):
        inp = make_inputs(case, 1, 5, 24, torch.float32, 3)
        inp = {k: None if v is None else v.requires_grad_() for k, v in inp.items()}
        norm = CASES[case][-1]
        torch.library.opcheck(adaln._adaln_fwd, (*inp.values(), 1e-6, norm))


@pytest.mark.parametrize("B,S,D", [(1, 1, 64), (3, 5, 1000), (1, 1000, 64), (1, 77, 1536), (1, 1000, 1000),
                                   (1, 2, 5120)])
@pytest.mark.parametrize("case", ["everything", "msa_in", "ffn_out"])
def test_sizes(case, B, S, D):
    seed = int.from_bytes(os.urandom(2), "little")
    check(case, B, S, D, torch.float32, torch.float64, seed, atol=1e-6)


@pytest.mark.parametrize("B,S,D", [(2, 77, 72), (1, 33, 1000), (2, 5, 1536), (1, 3, 5120)])
@pytest.mark.parametrize("case", ["everything", "msa_in", "norm2", "ffn_out", "residual"])
def test_split_backward(case, B, S, D, monkeypatch):
    """The wide-row backward (row sums from the stats kernel, D in blocks), forced on at every width."""
    monkeypatch.setattr(adaln, "SPLIT_BLOCK_D", 16)
    check(case, B, S, D, torch.float32, torch.float64, int.from_bytes(os.urandom(2), "little"), atol=1e-6)


@pytest.mark.parametrize("vec_shape", [(1, 1, 64), (64,)], ids=["1x1xD", "D"])
def test_broadcast_vectors(vec_shape):
    """Vectors shared by the whole batch get their grads summed over it too."""
    check("everything", 3, 9, 64, torch.float32, torch.float64, 7, atol=1e-6, vec_shape=vec_shape)


@pytest.mark.parametrize("use", ["h", "out"])
def test_one_output_used(use):
    """Only one output reaches the loss: the other grad is None inside the Function."""
    inp = make_inputs("ffn_out", 2, 17, 72, torch.float32, 3)
    grads = []
    for fused in (True, False):
        leaves = {k: v.clone().requires_grad_(True) for k, v in inp.items() if v is not None}
        fn = adaln.fused_add_norm_modulate if fused else add_norm_modulate_torch
        h, out = fn(leaves["x"], leaves["y"], leaves["gate"], leaves["shift"], leaves["scale"])
        loss = (h if use == "h" else out).double().pow(2).sum()
        grads.append(torch.autograd.grad(loss, list(leaves.values()), allow_unused=True))
    for a, b in zip(*grads):
        if b is None or not b.abs().sum():
            assert a is None or not a.abs().sum()
        else:
            assert rel_err(a, b) < 1e-5


def test_no_grad_inputs():
    """Inputs without grads skip their reductions and still give correct outputs."""
    inp = make_inputs("everything", 2, 33, 72, torch.float32, 11)
    x = inp["x"].clone().requires_grad_(True)
    h, out = adaln.fused_add_norm_modulate(x, inp["y"], inp["gate"], inp["shift"], inp["scale"], inp["weight"],
                                           inp["bias"])
    (dx,) = torch.autograd.grad(out.sum() + h.sum(), [x])
    x2 = inp["x"].clone().requires_grad_(True)
    h2, out2 = add_norm_modulate_torch(x2, inp["y"], inp["gate"], inp["shift"], inp["scale"], inp["weight"],
                                       inp["bias"])
    (dx2,) = torch.autograd.grad(out2.sum() + h2.sum(), [x2])
    assert rel_err(out, out2) < 1e-5 and rel_err(h, h2) < 1e-6 and rel_err(dx, dx2) < 1e-5


def test_supported():
    x = torch.zeros(2, 5, 8)
    assert adaln.supported(x, torch.zeros(2, 1, 8), None, torch.zeros(1, 1, 8))
    assert not adaln.supported(x, torch.zeros(2, 5, 8))  # per-token modulation: torch path
    assert not adaln.supported(x.reshape(10, 8))
    assert not adaln.supported(torch.zeros(2, 5, 8, dtype=torch.float64))


# ------------------------------------------------------------------------------------------------ GPU

WAN_CASES = ["msa_in", "norm2", "cross_out", "ffn_out", "residual"]


def _poison_allocator():
    """Fill the caching allocator's free memory with NaN so an unwritten output element cannot pass."""
    free = torch.cuda.mem_get_info()[0]
    torch.empty(int(free * 0.5) // 4, device="cuda").fill_(float("nan"))


@pytest.mark.gpu
@pytest.mark.parametrize("D", [1536, 5120])
@pytest.mark.parametrize("case", WAN_CASES)
def test_gpu_bf16_model_size(case, D):
    _poison_allocator()
    seed = int.from_bytes(os.urandom(2), "little")
    rep = check(case, 1, 32760, D, torch.bfloat16, torch.float32, seed, atol=1e-5)
    print(case, D, {k: f"{a:.2e}/{b:.2e}" for k, (a, b) in rep.items()})


@pytest.mark.gpu
@pytest.mark.parametrize("split_above", [16, 16384], ids=["split", "whole-row"])
def test_gpu_backward_modes(split_above, monkeypatch):
    """Both backward forms at D = 5120, whichever of them is the default there."""
    monkeypatch.setattr(adaln, "SPLIT_BLOCK_D", split_above)
    for case in ("everything", "ffn_out", "norm2"):
        check(case, 2, 4097, 5120, torch.bfloat16, torch.float32, int.from_bytes(os.urandom(2), "little"), 1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("B,S,D", [(2, 1, 64), (3, 77, 72), (1, 1000, 1000), (2, 4097, 1536)])
def test_gpu_odd_sizes(B, S, D):
    _poison_allocator()
    seed = int.from_bytes(os.urandom(2), "little")
    for case in CASES:
        check(case, B, S, D, torch.bfloat16, torch.float32, seed, atol=1e-5)
    for dtype, ref in ((torch.float16, torch.float32), (torch.float32, torch.float64)):
        for case in ("everything", "msa_in"):
            check(case, B, S, D, dtype, ref, seed, atol=1e-5 if dtype == torch.float16 else 1e-6)
