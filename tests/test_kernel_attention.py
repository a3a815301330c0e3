"""Flash attention kernel vs its pure-torch twin: forward and dq/dk/dv, odd sizes, Sq != Sk, key padding masks.

On the CPU the kernels run under the Triton interpreter (tiny shapes, fp32/fp16, one block config); on CUDA the
``gpu`` tests use real sizes in bf16/fp16 with the flash-attention error rule (see ``_kernel_env.check_rule``).
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
import triton
from _kernel_env import HAS_CUDA, check_rule, device, load_kernels, max_err

kernels = load_kernels()
from stdit.kernels.attention_ref import attention_ref  # noqa: E402
from stdit.kernels.config import CONFIG as KCONFIG  # noqa: E402

gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")


def make_inputs(b, sq, sk, h, d, dtype, mask, seed, layout="plain"):
    g = torch.Generator().manual_seed(seed)
    if layout == "fused":
        # q, k, v as strided views of one fused projection output, as the model produces them.
        qkv = torch.randn(b, sq, 3, h, d, generator=g).to(device(), dtype)
        q, k, v = qkv.unbind(2)
    else:
        q = torch.randn(b, sq, h, d, generator=g).to(device(), dtype)
        k = torch.randn(b, sk, h, d, generator=g).to(device(), dtype)
        v = torch.randn(b, sk, h, d, generator=g).to(device(), dtype)
    kpm = None
    if mask:
        kpm = torch.rand(b, k.shape[1], generator=g) > 0.4
        kpm[0, 0] = True
        if b > 1:
            kpm[-1] = False  # a batch whose keys are all padding
        kpm = kpm.to(device())
    do = torch.randn(q.shape, generator=g).to(device(), dtype)
    return q, k, v, kpm, do


def run(fn, q, k, v, kpm, do, **kw):
    # detach(), not clone(): clone() would make the fused layout's strided views contiguous.
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    o = fn(q, k, v, kpm, **kw)
    o.backward(do.to(o.dtype))
    return o.detach(), q.grad, k.grad, v.grad


def check_flash(q, k, v, do, out=None):
    """o, dq, dk, dv of :func:`flash_attention` (``out`` when already computed) against the fp32 reference, by the
    flash-attention rule at the inputs' precision."""
    if out is None:
        out = run(kernels.flash_attention, q, k, v, None, do)
    ref = run(lambda *a: attention_ref(*a, dtype=torch.float32), q, k, v, None, do)
    low = run(lambda *a: attention_ref(*a, dtype=q.dtype), q, k, v, None, do)
    for name, x, r, lo in zip(("o", "dq", "dk", "dv"), out, ref, low):
        check_rule(name, x, r, lo)


CPU_CASES = [
    # b, sq, sk, h, d, dtype, mask, layout
    (2, 40, 40, 2, 64, torch.float32, False, "plain"),
    (1, 37, 21, 2, 72, torch.float32, True, "plain"),
    (2, 1, 19, 1, 96, torch.float32, True, "plain"),
    (1, 17, 33, 1, 128, torch.float32, False, "plain"),
    (1, 35, 35, 2, 64, torch.float32, False, "fused"),
    (2, 33, 47, 1, 32, torch.float16, True, "plain"),
    (1, 20, 20, 1, 72, torch.float16, False, "plain"),
    (1, 23, 29, 2, 80, torch.float32, True, "plain"),
    (1, 19, 19, 1, 48, torch.float16, False, "fused"),
]


@pytest.mark.skipif(HAS_CUDA, reason="interpreter test; the gpu tests cover CUDA")
@pytest.mark.parametrize("b,sq,sk,h,d,dtype,mask,layout", CPU_CASES)
def test_flash_attention_interpreter(b, sq, sk, h, d, dtype, mask, layout):
    q, k, v, kpm, do = make_inputs(b, sq, sk, h, d, dtype, mask, seed=sq * 131 + d, layout=layout)
    out = run(kernels.flash_attention, q, k, v, kpm, do)
    ref = run(lambda *a: attention_ref(*a, dtype=torch.float64), q, k, v, kpm, do)
    tol = 2e-5 if dtype == torch.float32 else 4e-3
    for name, x, r in zip(("o", "dq", "dk", "dv"), out, ref):
        assert x.dtype == dtype and x.shape == r.shape
        assert max_err(x, r) <= tol * max(1.0, r.abs().max().item()), f"{name}: {max_err(x, r):.3e}"
    if mask and b > 1:
        assert out[0][-1].abs().max() == 0 and out[1][-1].abs().max() == 0


@pytest.mark.skipif(HAS_CUDA, reason="interpreter test; the model's compile test covers CUDA")
def test_flash_attention_under_compile():
    """``flash_attention`` called inside torch.compile (``fullgraph``: no break; Dynamo cannot trace the launches)
    runs as the custom op: the same output and gradients as an eager call."""
    torch._dynamo.reset()
    q, k, v, kpm, do = make_inputs(1, 21, 19, 2, 64, torch.float32, True, seed=8)
    compiled = torch.compile(kernels.flash_attention, backend="aot_eager", fullgraph=True)
    for x, y in zip(run(compiled, q, k, v, kpm, do), run(kernels.flash_attention, q, k, v, kpm, do)):
        assert torch.equal(x, y)


@pytest.mark.skipif(HAS_CUDA, reason="interpreter test; the gpu tests cover the plans")
def test_no_plans_off_the_hopper_paths():
    """Plans replay only the Hopper kernels' launches: calls that take the general kernels (here the interpreter's)
    build none, however often they repeat."""
    from stdit.kernels import attention as ka

    ka._PLANS.clear()
    q, k, v, _, do = make_inputs(1, 20, 20, 1, 64, torch.float32, False, seed=3)
    first = run(kernels.flash_attention, q, k, v, None, do)
    again = run(kernels.flash_attention, q, k, v, None, do)
    assert not ka._PLANS
    for x, y in zip(first, again):
        assert torch.equal(x, y)


@pytest.mark.skipif(HAS_CUDA, reason="interpreter test")
def test_flash_attention_scale_and_errors():
    q, k, v, _, do = make_inputs(1, 18, 18, 1, 64, torch.float32, False, seed=3)
    out = run(kernels.flash_attention, q, k, v, None, do, scale=0.3)
    ref = run(lambda *a, **kw: attention_ref(*a, **kw, dtype=torch.float64), q, k, v, None, do, scale=0.3)
    assert all(max_err(x, r) < 2e-5 for x, r in zip(out, ref))
    with pytest.raises(ValueError, match="head dim"):
        kernels.flash_attention(q[..., :40], k[..., :40], v[..., :40])
    with pytest.raises(ValueError, match="key_padding_mask"):
        kernels.flash_attention(q, k, v, torch.ones(2, 18, dtype=torch.bool))
    assert {64, 72, 96, 128} <= kernels.SUPPORTED_HEAD_DIMS


@pytest.mark.parametrize("sq,h,d", [(37, 2, 64), (1, 3, 128)])
def test_backward_preprocess_delta_and_dq_zeroing(sq, h, d):
    """The preprocess writes delta = rowsum(dO * O) and, for the one-pass backward, zeroes its fp32 dQ buffer (every
    row, the tail block's included), so no separate fill is launched."""
    from stdit.kernels import attention as ka
    from stdit.kernels._launch import launch

    g = torch.Generator().manual_seed(sq + d)
    o, do = (torch.randn(2, sq, h, d, generator=g).to(device()) for _ in range(2))
    delta = torch.full((2, h, sq), float("nan"), device=device())
    dqa = torch.full((2, sq, h, d), float("nan"), device=device())
    block = 16
    launch(ka._attn_bwd_preprocess, (triton.cdiv(sq, block), 2 * h),
           (o, do, delta, dqa, *o.stride(), *do.stride(), h, sq),
           dict(D=d, D_PAD=d, ALIGN=ka._align(o, do), BLOCK_M=block, ZERO_DQ=True))
    torch.testing.assert_close(delta, (o.double() * do.double()).sum(-1).transpose(1, 2).float())
    assert torch.equal(dqa, torch.zeros_like(dqa))


GPU_CASES = [
    (1, 4097, 4097, 2, 128, torch.bfloat16, False, "plain"),
    (2, 1000, 1000, 3, 72, torch.bfloat16, False, "fused"),
    (2, 1000, 77, 4, 64, torch.bfloat16, True, "plain"),
    (2, 77, 1000, 2, 96, torch.bfloat16, True, "plain"),
    (1, 1, 77, 2, 128, torch.bfloat16, False, "plain"),
    (1, 4097, 1000, 2, 64, torch.float16, False, "plain"),
    (2, 1000, 512, 2, 72, torch.float16, True, "plain"),
    (1, 1000, 1000, 2, 128, torch.float16, False, "fused"),
    (1, 1000, 1000, 2, 80, torch.bfloat16, True, "fused"),
]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("b,sq,sk,h,d,dtype,mask,layout", GPU_CASES)
def test_flash_attention_gpu(b, sq, sk, h, d, dtype, mask, layout):
    q, k, v, kpm, do = make_inputs(b, sq, sk, h, d, dtype, mask, seed=sq + sk + d, layout=layout)
    out = run(kernels.flash_attention, q, k, v, kpm, do)
    ref = run(lambda *a: attention_ref(*a, dtype=torch.float32), q, k, v, kpm, do)
    low = run(lambda *a: attention_ref(*a, dtype=dtype), q, k, v, kpm, do)
    for name, x, r, lo in zip(("o", "dq", "dk", "dv"), out, ref, low):
        assert x.dtype == dtype
        check_rule(name, x, r, lo)


@pytest.mark.gpu
@gpu
def test_flash_attention_gpu_fp32():
    q, k, v, kpm, do = make_inputs(2, 300, 200, 2, 72, torch.float32, True, seed=5)
    out = run(kernels.flash_attention, q, k, v, kpm, do)
    ref = run(lambda *a: attention_ref(*a, dtype=torch.float64), q, k, v, kpm, do)
    for name, x, r in zip(("o", "dq", "dk", "dv"), out, ref):
        assert max_err(x, r) <= 1e-4 * max(1.0, r.abs().max().item()), name


@pytest.mark.gpu
@gpu
def test_flash_attention_gpu_deterministic_and_fully_written():
    """With torch's deterministic mode on, the backward takes the two-pass kernels (no atomics): same bits twice."""
    q, k, v, kpm, do = make_inputs(1, 4097, 4097, 2, 128, torch.bfloat16, False, seed=11)
    was = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        a = run(kernels.flash_attention, q, k, v, kpm, do)
        b = run(kernels.flash_attention, q, k, v, kpm, do)
    finally:
        torch.use_deterministic_algorithms(was[0], warn_only=was[1])
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("d", [72, 128])
def test_every_tuning_config_gpu(d, monkeypatch):
    """Each config the autotuner may pick, forward and backward, so a miscompiled config cannot hide behind
    the one the tuning happened to choose (tails on both lengths, a key padding mask, a padded head dim)."""
    from stdit.kernels import attention as ka
    from stdit.kernels import attention_bwd as kb
    from stdit.kernels import attention_tiles as kt

    q, k, v, kpm, do = make_inputs(2, 1000, 777, 2, d, torch.bfloat16, True, seed=d)
    ref = run(lambda *a: attention_ref(*a, dtype=torch.float32), q, k, v, kpm, do)
    low = run(lambda *a: attention_ref(*a, dtype=torch.bfloat16), q, k, v, kpm, do)
    flags = {"USE_TMA": ka._tma_allowed(q, k, v)}
    spaces = {name: (kernel, kt._make_prune(False)(configs, {"Q": q}, **flags))
              for name, kernel, configs in (("_FWD", ka._attn_fwd, ka._FWD_CONFIGS),
                                            ("_DKDV", kb._attn_bwd_dkdv, kb._DKDV_CONFIGS),
                                            ("_DQ", kb._attn_bwd_dq, kb._DQ_CONFIGS))}
    for i in range(max(len(allowed) for _, allowed in spaces.values())):
        picked = {}
        for name, (kernel, allowed) in spaces.items():
            picked[name] = allowed[i % len(allowed)]
            monkeypatch.setattr(ka, name, kt._tuned(kernel, [picked[name]]))
        out = run(kernels.flash_attention, q, k, v, kpm, do)
        for name, x, r, lo in zip(("o", "dq", "dk", "dv"), out, ref, low):
            try:
                check_rule(name, x, r, lo)
            except AssertionError as e:
                raise AssertionError(f"{e} with configs {picked}") from None


SM90_CASES = [
    # b, sq, sk, h, d, dtype, layout: tails on both lengths, Sq != Sk, a single query, strided fused q/k/v
    (1, 4097, 4097, 2, 128, torch.bfloat16, "plain"),
    (2, 1000, 77, 3, 128, torch.bfloat16, "plain"),
    (1, 1, 77, 2, 128, torch.float16, "plain"),
    (2, 77, 1000, 2, 128, torch.float16, "plain"),
    (1, 1000, 1000, 2, 128, torch.bfloat16, "fused"),
    (1, 128, 256, 1, 128, torch.bfloat16, "plain"),
    (1, 4097, 1000, 1, 128, torch.float16, "fused"),
    (2, 1000, 77, 3, 64, torch.bfloat16, "plain"),
    (1, 4097, 1000, 2, 64, torch.float16, "fused"),
    # Two column chunks: 72 (overlapping by 8 columns; 3 heads = row stride 216), 80, 96.
    (2, 1000, 77, 3, 72, torch.bfloat16, "plain"),
    (1, 4097, 1000, 2, 72, torch.float16, "fused"),
    (1, 1, 77, 3, 72, torch.bfloat16, "plain"),
    (2, 77, 1000, 2, 80, torch.float16, "plain"),
    (1, 1000, 1000, 3, 96, torch.bfloat16, "fused"),
    (2, 1000, 77, 2, 96, torch.float16, "plain"),
]


@pytest.mark.skipif(not kernels.attention_sm90.HAVE_GLUON, reason="needs a Triton with Gluon")
def test_sm90_scope():
    """The Hopper kernel reads Q, K, V as [B * S, H * D] row views: it takes the model's layouts (separate tensors,
    fused q/k/v projection) and leaves head-major views, masks, fp32 and other head dims to the general kernel."""
    sm90 = kernels.attention_sm90
    for d in (64, 72, 80, 96, 128):
        for layout in ("plain", "fused"):
            q, k, v, _, _ = make_inputs(2, 9, 9, 3, d, torch.bfloat16, False, seed=0, layout=layout)
            assert sm90.supports(q, k, v, None)
            assert not sm90.supports(q, k, v, torch.ones(2, 9, dtype=torch.bool))
            assert not sm90.supports(q.float(), k.float(), v.float(), None)
        # [B, H, S, D] storage seen as [B, S, H, D]: heads are not D apart, so the row view does not exist.
        q_hm = torch.randn(2, 3, 9, d, dtype=torch.float16).transpose(1, 2)
        assert not sm90.supports(q_hm, q_hm, q_hm, None)
    q, k, v, _, _ = make_inputs(1, 9, 9, 2, 48, torch.bfloat16, False, seed=0)
    assert not sm90.supports(q, k, v, None)


def test_sm90_output_tma_store_scope():
    """O leaves through TMA staging tiles only where they fit in shared memory beside the Q tiles and the K, V rings
    (sm_90: 227 KB a block; d=128 with three stages already takes 224 KB) and only when O is a row view; the
    compile report (test_sm90_compile.py) checks the built kernels' shared memory."""
    sm90 = kernels.attention_sm90
    for d, cfgs in sm90._CONFIGS.items():
        for cfg in cfgs:
            expected = not (d == 128 and cfg.stages == 3)
            assert sm90.constexprs(cfg, d)["O_TMA"] is expected, (d, cfg)
            assert sm90.constexprs(cfg, d, o_row_view=False)["O_TMA"] is False, (d, cfg)
    assert sm90._CONFIGS[128][0].stages == 2  # the d=128 default keeps the TMA store


def test_sm90_long_sequences_take_their_config(monkeypatch):
    """Long sequences run the length-picked config without tuning; shorter ones are tuned among the others only
    (the length-picked one is far slower there: B4 S1024)."""
    sm90 = kernels.attention_sm90
    C = sm90.Config
    short, long_cfg = C(128, 2, 2, True, True), C(128, 2, 3, True, True)
    monkeypatch.setattr(sm90, "LONG_CONFIGS", {128: long_cfg})
    monkeypatch.setattr(sm90, "_CONFIGS", {128: [short, C(128, 3, 2, True, True), long_cfg]})
    monkeypatch.setattr(sm90, "_TUNED", {})
    launched = []
    monkeypatch.setattr(sm90, "_launch", lambda cfg, *args: launched.append(cfg))
    def do_bench(fn, **kwargs):  # the tuner's timing: the length-picked config would win if it were a candidate
        fn()
        return 0.5 if launched[-1] == long_cfg else 1.0

    monkeypatch.setattr(sm90.triton.testing, "do_bench", do_bench)

    def run(sq, sk, tune=True):
        q, k = torch.empty(1, sq, 2, 128, device="meta"), torch.empty(1, sk, 2, 128, device="meta")
        launched.clear()
        sm90.forward(q, k, k, None, None, 1.0, tune=tune)
        return launched[-1], launched[:-1]

    assert run(sm90.LONG_MIN, sm90.LONG_MIN) == (long_cfg, [])
    assert run(75600, 32760, tune=False) == (long_cfg, [])
    picked, timed = run(1024, 1024)
    assert long_cfg not in timed and set(timed) == {short, C(128, 3, 2, True, True)} and picked in timed
    assert run(sm90.LONG_MIN, 512, tune=False)[0] == short  # text keys: short on one side


def test_sm90_head_dim_chunks():
    """Head dims 72, 80, 96 are read as a 64-column chunk and a tail chunk: together they cover every column, the
    tail is a power of two of at least 16 columns (one wgmma K step) and starts on a 16-byte boundary (TMA), and
    only 72 overlaps (by 8 columns, the ones the kernels zero). 64 and 128 are one chunk in the forward; the
    backward splits 128 into halves."""
    from stdit.kernels.attention_sm90 import HEAD_DIMS, chunks
    from stdit.kernels.attention_sm90_bwd import second_chunk

    assert chunks(64) == (64, 0) and chunks(128) == (128, 0)
    assert second_chunk(64) == 0 and second_chunk(128) == 64
    overlaps = {}
    for d in HEAD_DIMS:
        if d in (64, 128):
            continue
        d0, dt = chunks(d)
        start = d - dt
        assert d0 == 64 and dt >= 16 and dt & (dt - 1) == 0 and 0 < start <= d0, (d, d0, dt)
        assert (start * 2) % 16 == 0 and (d * 2) % 16 == 0, d
        assert set(range(d0)) | set(range(start, d)) == set(range(d)), d
        assert second_chunk(d) == dt
        overlaps[d] = d0 - start
    assert overlaps == {72: 8, 80: 0, 96: 0}


def _sm90_or_skip(q, k, v):
    from stdit.kernels import attention as ka

    if torch.cuda.get_device_capability() != (9, 0) or not ka._sm90.HAVE_GLUON:
        pytest.skip("the Gluon forward needs an sm_90 GPU and a Triton with Gluon")
    assert ka._sm90_allowed(q, k, v, None) == (q.shape[-1] in ka._sm90.HEAD_DIMS)
    return ka


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("b,sq,sk,h,d,dtype,layout", SM90_CASES)
def test_sm90_forward_every_config_gpu(b, sq, sk, h, d, dtype, layout, monkeypatch):
    """The Hopper forward, each of its configs, against the fp32 reference (poisoned outputs, so every element
    must be written), and its logsumexp against the general kernel's on the same inputs."""
    q, k, v, _, _ = make_inputs(b, sq, sk, h, d, dtype, False, seed=sq * 7 + sk + d, layout=layout)
    ka = _sm90_or_skip(q, k, v)
    ref = attention_ref(q, k, v, None, dtype=torch.float32)
    low = attention_ref(q, k, v, None, dtype=dtype)
    monkeypatch.setattr(KCONFIG, "sm90_forward", False)
    o_general, lse_general = ka.flash_attention_forward(q, k, v)
    check_rule("o (general kernel)", o_general, ref, low)
    for cfg in ka._sm90._CONFIGS[d]:
        o = torch.full((b, sq, h, d), float("nan"), device="cuda", dtype=dtype)
        lse = torch.full((b, h, sq), float("nan"), device="cuda")
        ka._sm90._launch(cfg, q, k, v, o, lse, d ** -0.5 * ka._LOG2E)
        # Row sums on the tensor cores add the rounded P: up to log2(1 + u) more than an fp32 sum, u the dtype's unit
        # roundoff (bf16 5.6e-3, fp16 7.0e-4).
        lse_tol = 1e-3 + (math.log2(1 + torch.finfo(dtype).eps / 2) if d in ka._sm90.SUM_MMA_HEAD_DIMS else 0)
        try:
            check_rule("o", o, ref, low)
            assert torch.isfinite(lse).all()
            assert max_err(lse, lse_general) < lse_tol
        except AssertionError as e:
            raise AssertionError(f"{e} with config {cfg}") from None


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("d", [64, 72, 96, 128])
def test_sm90_forward_growing_row_maxima_gpu(d):
    """Scores whose row maxima keep growing across key blocks, by different amounts at different blocks for
    different rows (keys scaled up along the sequence, and some rows given a spike at a random key): the running
    maximum and the rescaling of O are right on every config (random inputs alone rarely move the maximum after
    the first key block)."""
    b, sq, sk, h = 1, 200, 1000, 2
    g = torch.Generator(device="cuda").manual_seed(d)
    q = torch.randn(b, sq, h, d, device="cuda", generator=g)
    k = torch.randn(b, sk, h, d, device="cuda", generator=g)
    k *= torch.linspace(0.25, 4.0, sk, device="cuda").view(1, sk, 1, 1)
    spike = torch.randint(0, sk, (sq,), device="cuda", generator=g)
    rows = torch.arange(0, sq, 3, device="cuda")
    q[:, rows] += k[:, spike[rows]] / k[:, spike[rows]].norm(dim=-1, keepdim=True) * d ** 0.5
    v = torch.randn(b, sk, h, d, device="cuda", generator=g)
    q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
    ka = _sm90_or_skip(q, k, v)
    scale = d ** -0.5 * ka._LOG2E
    logits = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * scale
    growth = logits.amax(-1) - logits[..., :128].amax(-1)  # over the first key block's maximum, log2 units
    assert (growth > 8).float().mean() > 0.5 and (growth > 24).float().mean() > 0.05
    ref = attention_ref(q, k, v, None, dtype=torch.float32)
    low = attention_ref(q, k, v, None, dtype=torch.bfloat16)
    ref_lse = torch.logsumexp(logits * math.log(2), -1) / math.log(2)
    for cfg in ka._sm90._CONFIGS[d]:
        o = torch.full((b, sq, h, d), float("nan"), device="cuda", dtype=torch.bfloat16)
        lse = torch.full((b, h, sq), float("nan"), device="cuda")
        ka._sm90._launch(cfg, q, k, v, o, lse, scale)
        try:
            check_rule("o", o, ref, low)
            assert max_err(lse, ref_lse) < 1e-2
        except AssertionError as e:
            raise AssertionError(f"{e} with config {cfg}") from None


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("b,sq,sk,h,d,programs", [
    (1, 1000, 1000, 3, 128, 5),  # 8 key blocks a tile; whole rounds, then 4 tiles cut over 5 programs
    (2, 300, 777, 2, 128, 7),  # ragged queries and keys
    (1, 512, 4097, 2, 128, 3),  # a 1-key last block; ranges of 22 blocks across tile ends
    (1, 40, 1000, 2, 128, 9),  # under 64 queries: O from registers; fewer tiles than programs
    (1, 256, 640, 3, 128, 11),  # 5 key blocks a tile on 11 programs: empty ranges, tiles cut in several places
    (2, 1000, 1000, 3, 64, 7),  # three consumers
])
def test_sm90_forward_split_gpu(b, sq, sk, h, d, programs):
    """A split launch (the whole rounds, then the last round's key blocks cut into one range per program, then the
    pieces merged) against the fp32 reference and the unsplit launch, for every config that can split, on small
    grids so that tiles are cut in several places, ragged lengths; the same bits run to run and from the replay."""
    q, k, v, _, _ = make_inputs(b, sq, sk, h, d, torch.bfloat16, False, seed=sq + sk + programs)
    ka = _sm90_or_skip(q, k, v)
    sm90 = ka._sm90
    ref = attention_ref(q, k, v, None, dtype=torch.float32)
    low = attention_ref(q, k, v, None, dtype=torch.bfloat16)
    scale = d ** -0.5 * ka._LOG2E
    cfgs = [c for c in sm90._CONFIGS[d] if c.persistent and triton.cdiv(sq, 64 * c.warpgroups) * b * h % programs]
    assert cfgs and d in sm90.SPLIT_HEAD_DIMS
    for cfg in cfgs:
        runs = []
        for split in (False, True, True):
            o = torch.full((b, sq, h, d), float("nan"), device="cuda", dtype=q.dtype)
            lse = torch.full((b, h, sq), float("nan"), device="cuda")
            run = sm90._launch(cfg, q, k, v, o, lse, scale, split=split, programs=programs)
            runs.append((o, lse))
        o3, lse3 = torch.full_like(o, float("nan")), torch.full_like(lse, float("nan"))
        run(q, k, v, o3, lse3)  # the replay of the last launch
        (o0, lse0), (o1, lse1), (o2, lse2) = runs
        try:
            check_rule("o", o1, ref, low)
            # Row sums on the tensor cores (SUM_MMA) add the rounded P: pieces round differently.
            assert max_err(lse1, lse0) < 1e-4 + (math.log2(1 + 2 ** -8) if d in sm90.SUM_MMA_HEAD_DIMS else 0)
            assert max_err(o1, o0) <= 2 * max_err(o0, ref) + 1e-3
            assert torch.equal(o1, o2) and torch.equal(lse1, lse2)
            assert torch.equal(o1, o3) and torch.equal(lse1, lse3)
        except AssertionError as e:
            raise AssertionError(f"{e} with config {cfg}") from None


def test_sm90_split_rule(monkeypatch):
    """Which launches split their last round: persistent configs at d=64 and 128 with long rounds (at least 128 key
    blocks a tile) whose last round keeps under 70% of the SMs busy (B1 H12 S32760 d128: 72 of 2,052 tiles of 192
    rows on 132 SMs, 55%); where it keeps more, the busy SMs run fast enough that a split does not pay."""
    sm90 = kernels.attention_sm90
    monkeypatch.setattr(KCONFIG, "split", "auto")
    C = sm90.Config
    two, three, unpersistent = C(128, 2, 2, True, True), C(128, 2, 3, True, True), C(128, 2, 2, True, False)
    assert sm90.splits(three, 128, 2052, 256, 132) and sm90.splits(two, 128, 3072, 256, 132)  # 55%, 27%
    assert sm90.splits(three, 64, 2064, 128, 132)  # B1 H24 S16384 d64: 84 of 132
    assert sm90.splits(three, 128, 50, 256, 132)  # fewer tiles than SMs: spread over all of them
    assert not sm90.splits(three, 128, 1032, 128, 132)  # B1 H12 S16384: 108 of 132
    assert not sm90.splits(three, 128, 4728, 591, 132)  # S75600: 108 of 132
    assert not sm90.splits(two, 128, 384 + 60, 32, 132)  # short rounds
    assert not sm90.splits(two, 128, 264 * 8, 256, 132)  # whole rounds
    assert not sm90.splits(unpersistent, 128, 2052, 256, 132)
    assert not sm90.splits(two, 96, 2052, 256, 132)  # two column chunks
    monkeypatch.setattr(KCONFIG, "split", "never")
    assert not sm90.splits(three, 128, 2052, 256, 132)
    monkeypatch.setattr(KCONFIG, "split", "always")
    assert sm90.splits(two, 128, 384, 32, 132) and not sm90.splits(two, 128, 264, 32, 132)


@pytest.mark.parametrize("n_tiles,n_kv,programs", [(6, 3, 4), (24, 8, 5), (4, 5, 11), (7, 1, 3), (2052, 256, 132)])
def test_sm90_split_ranges(n_tiles, n_kv, programs):
    """The second part's pieces cover every key block of the last round's tiles exactly once, in order; the
    programs' ranges are even to within a block, and each spans at most two tiles."""
    sm90 = kernels.attention_sm90
    ranges = sm90.split_ranges(n_tiles, n_kv, programs)
    n_full = n_tiles // programs * programs
    covered = [(t, j) for pieces in ranges for t, j0, n in pieces for j in range(j0, j0 + n)]
    assert covered == [(t, j) for t in range(n_full, n_tiles) for j in range(n_kv)]
    sizes = [sum(n for _, _, n in pieces) for pieces in ranges]
    assert max(sizes) - min(sizes) <= 1 and all(len(p) <= 2 and all(n > 0 for _, _, n in p) for p in ranges)


@pytest.mark.parametrize("sq,h,parts", [(1000, 3, (1, 2)), (300, 1, (2,))])
def test_sm90_split_launch_sequence(sq, h, parts, monkeypatch):
    """A split launch issues the whole rounds (only if there are any), then the pieces, on one program per SM with
    one workspace, then the merge over the last round's tiles and consumers; its replay issues the same launches
    again with a fresh workspace (the kernels themselves are checked by test_sm90_forward_split_gpu)."""
    sm90 = kernels.attention_sm90
    calls = []

    def launch(fn, grid, args, constexprs, **options):
        calls.append((fn, grid, args, constexprs.get("PART")))
        return lambda *a: calls.append((fn, grid, a, constexprs.get("PART")))

    monkeypatch.setattr(sm90, "launch", launch)
    cfg, programs = sm90.Config(128, 2, 2, True, True), 5
    q = torch.empty(1, sq, h, 128, device="meta", dtype=torch.bfloat16)
    o = torch.empty_like(q)
    lse = torch.empty(1, h, sq, device="meta")
    n_tiles = triton.cdiv(sq, 128) * h
    replay = sm90._launch(cfg, q, q, q, o, lse, 1.0, split=True, programs=programs)
    for rnd in range(2):
        issued, calls[:] = list(calls), []
        assert [(c[0], c[1], c[3]) for c in issued] == (
            [(sm90._attn_fwd_sm90, (programs,), p) for p in parts] + [(sm90._merge_tail, (n_tiles % programs, 2), None)])
        ws = issued[-1][2][0]
        assert ws.numel() == programs * 2 * 2 * 64 * (128 + 2)
        assert all(c[2][5] is ws for c in issued[:-1])
        replay(q, q, q, o, lse)
    with pytest.raises(ValueError, match="no last round"):
        sm90._launch(cfg, q, q, q, o, lse, 1.0, split=True, programs=n_tiles)


@pytest.mark.parametrize("programs", [4, 5])
def test_sm90_merge_tail(programs):
    """The split launch's merge (a plain Triton kernel, so it runs here): pieces of the last round's tiles, made in
    torch the way the second part writes them (unnormalized O rows, row maxima and sums, base 2, in the slot of the
    program's first or second piece), merge into O and the logsumexp over all keys; no other row is written."""
    sm90 = kernels.attention_sm90
    from stdit.kernels._launch import launch

    b, sq, sk, h, d, nw, rows = 1, 200, 300, 3, 64, 2, 64
    g = torch.Generator().manual_seed(programs)
    q, k, v = (torch.randn(b, s, h, d, generator=g) for s in (sq, sk, sk))
    scale = d ** -0.5 * math.log2(math.e)
    n_m = triton.cdiv(sq, rows * nw)
    n_tiles, n_kv = n_m * b * h, triton.cdiv(sk, 128)
    n_full = n_tiles // programs * programs
    ws = torch.full((programs * 2 * nw * rows * (d + 2),), float("nan"))
    ml = programs * 2 * nw * rows * d
    for p, pieces in enumerate(sm90.split_ranges(n_tiles, n_kv, programs)):
        for i, (tile, j0, n) in enumerate(pieces):
            bh, m_blk = divmod(tile, n_m)
            keys = slice(j0 * 128, min((j0 + n) * 128, sk))
            for wg in range(nw):
                r0 = m_blk * rows * nw + wg * rows
                qr = torch.zeros(rows, d)  # rows past Sq: zeros, as TMA reads them past the tensor's end
                qr[:max(0, min(rows, sq - r0))] = q[bh // h, r0:r0 + rows, bh % h]
                s = qr @ k[bh // h, keys, bh % h].T * scale
                m = s.max(1).values
                pr = torch.exp2(s - m[:, None])
                slot = (2 * p + i) * nw + wg
                ws[slot * rows * d:(slot + 1) * rows * d] = (pr @ v[bh // h, keys, bh % h]).flatten()
                ws[ml + slot * 2 * rows:ml + slot * 2 * rows + rows] = m
                ws[ml + slot * 2 * rows + rows:ml + (slot + 1) * 2 * rows] = pr.sum(1)
    o = torch.full((b, sq, h, d), float("nan"))
    lse = torch.full((b, h, sq), float("nan"))
    launch(sm90._merge_tail, (n_tiles - n_full, nw),
           (ws, o, lse, *o.stride()[:3], h, sq, n_m, n_tiles, n_kv, programs), dict(NW=nw, D0=d, ROWS=rows))
    logits = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * scale
    ref_o = torch.einsum("bhqk,bkhd->bhqd", torch.softmax(logits * math.log(2), -1), v.double())
    ref_lse = torch.logsumexp(logits * math.log(2), -1) / math.log(2)
    written = torch.zeros(b, h, sq, dtype=torch.bool)
    for tile in range(n_full, n_tiles):
        bh, m_blk = divmod(tile, n_m)
        written[bh // h, bh % h, m_blk * rows * nw:(m_blk + 1) * rows * nw] = True
    assert written.any() and not written.all()
    torch.testing.assert_close(lse[written], ref_lse[written].float(), atol=1e-4, rtol=1e-5)
    o_bh = o.transpose(1, 2)
    torch.testing.assert_close(o_bh[written], ref_o[written].float(), atol=1e-4, rtol=1e-4)
    assert torch.isnan(lse[~written]).all() and torch.isnan(o_bh[~written]).all()


@pytest.mark.gpu
@gpu
def test_plans_replay_and_follow_the_switches_gpu(monkeypatch):
    """Repeated calls replay the Hopper kernels' bound launches (plans) and stay right on new data; a call that
    differs in alignment, in a kernel switch or in deterministic mode takes the path it would take without plans."""
    q, k, v, _, do = make_inputs(2, 300, 333, 2, 128, torch.bfloat16, False, seed=5)
    ka = _sm90_or_skip(q, k, v)
    ka._PLANS.clear()
    calls = []
    real_call = ka._sm90_bwd.Plan.__call__
    monkeypatch.setattr(ka._sm90_bwd.Plan, "__call__", lambda self, *a: calls.append(1) or real_call(self, *a))

    for _ in range(4):  # the first call binds the launches, the later ones replay them
        check_flash(*(torch.randn_like(t) for t in (q, k, v, do)))
    assert sorted(key[0] for key in ka._PLANS) == ["bwd", "fwd"] and len(calls) == 4
    assert ka._forward(q, k, v, None, None)[2]
    # Misaligned inputs (a 2-byte offset): no TMA, so the general kernels, right as well.
    buf = torch.randn(q.numel() + 8, device="cuda").to(q.dtype)
    q_off = buf[1:1 + q.numel()].view(q.shape)
    assert not ka._forward(q_off, k, v, None, None)[2]
    check_flash(q_off, k, v, do)
    monkeypatch.setattr(KCONFIG, "sm90_forward", False)
    assert not ka._forward(q, k, v, None, None)[2]
    monkeypatch.setattr(KCONFIG, "sm90_forward", True)
    calls.clear()
    was = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        out = run(kernels.flash_attention, q, k, v, None, do)  # the two-pass backward
    finally:
        torch.use_deterministic_algorithms(was[0], warn_only=was[1])
    assert not calls
    check_flash(q, k, v, do, out)
    check_flash(q, k, v, do)
    assert len(calls) == 1


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("d", [64, 72, 96, 128])
def test_sm90_backward_grad_stores_gpu(d, monkeypatch):
    """dK and dV leave the one-pass backward either from registers or, in short programs, through shared memory and
    TMA stores issued by the writer warp: both give the same bits, for whole key blocks, a tail key block (1000 keys)
    and two sequences in one row view, and the head dims and block threshold pick the path."""
    from stdit.kernels import attention_sm90_bwd as bwd

    q, k, v, _, do = make_inputs(2, 300, 1000, 3, d, torch.bfloat16, False, seed=d)
    ka = _sm90_or_skip(q, k, v)
    o, lse = ka.flash_attention_forward(q, k, v)
    delta = (o.float() * do.float()).sum(-1).transpose(1, 2).contiguous()
    assert bwd.Plan(q, k, d ** -0.5, splits=1).constexprs["TMA_GRADS"] is (d in bwd.TMA_GRADS_HEAD_DIMS)
    monkeypatch.setattr(bwd, "TMA_GRADS_HEAD_DIMS", (d,))
    grads = {}
    for limit in (0, 1 << 20):
        monkeypatch.setattr(bwd, "TMA_GRADS_MAX_BLOCKS", limit)
        plan = bwd.Plan(q, k, d ** -0.5, splits=1)
        assert plan.constexprs["TMA_GRADS"] is (limit > 0)
        grads[limit] = plan(do, q, k, v, lse, delta)
    check_flash(q, k, v, do, (o, *grads[1 << 20]))
    for name, a, b in zip(("dk", "dv"), grads[0][1:], grads[1 << 20][1:]):  # dQ: atomics, in no fixed order
        assert torch.equal(a, b), (name, max_err(a, b))
    with pytest.raises(ValueError, match="split"):
        bwd.constexprs(d, 3, True, True)


@pytest.mark.gpu
@gpu
def test_sm90_forward_then_backward_gpu(monkeypatch):
    """Forward on the Hopper kernel, backward on the two-pass kernels from its logsumexp: all gradients right."""
    q, k, v, _, do = make_inputs(2, 1000, 777, 2, 128, torch.bfloat16, False, seed=21)
    ka = _sm90_or_skip(q, k, v)
    monkeypatch.setattr(KCONFIG, "sm90_backward", False)
    assert not ka._sm90_backward_allowed(do, q, k, v, None)
    check_flash(q, k, v, do)


def test_sm90_backward_query_splits():
    """Short key ranges (text cross-attention) spread each key block's queries over more programs so that every SM
    gets work; a wave or more of key programs keeps one program per key block."""
    from stdit.kernels.attention_sm90_bwd import query_splits

    assert query_splits(3072, 512, 132) == 1 and query_splits(200, 512, 132) == 1
    assert query_splits(48, 1, 132) == 1
    for programs, blocks in [(48, 512), (6, 1000)]:
        n = query_splits(programs, blocks, 132)
        assert 1 < n <= blocks and programs * n >= 120, (programs, blocks, n)
    assert 1 < query_splits(1, 300, 132) <= 64  # one key program: split, up to the 64-part cap


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("b,sq,sk,h,dtype,layout", [
    (1, 1000, 1000, 2, torch.bfloat16, "plain"), (2, 1000, 77, 3, torch.bfloat16, "plain"),
    (2, 77, 1000, 2, torch.float16, "plain"), (1, 4097, 4097, 2, torch.bfloat16, "fused"),
    (1, 1, 300, 2, torch.float16, "plain")])
@pytest.mark.parametrize("d,splits", [(128, None), (128, 1), (128, 3), (64, 1), (64, 3), (72, 1), (72, 3), (80, None),
                                      (96, 1), (96, 3)])
def test_sm90_one_pass_backward_gpu(b, sq, sk, h, dtype, layout, d, splits, monkeypatch):
    """The one-pass Gluon backward (the default on Hopper at d=64, 72, 80, 96, 128): all gradients right, with tails
    on both lengths, cross-attention lengths, batches sharing one row view, a fused q/k/v layout and a single query;
    with each key block's query range in one program (``splits=1``, what long sequences take) or split over several
    (dK, dV summed with atomics: short key ranges; odd and even query-block counts per program, which matters where
    the two consumers take turns computing dQ: every head dim but 128), and with the automatic choice; at 72 the
    two column chunks overlap."""
    q, k, v, _, do = make_inputs(b, sq, sk, h, d, dtype, False, seed=sq + sk, layout=layout)
    ka = _sm90_or_skip(q, k, v)
    assert ka._sm90_backward_allowed(do, q, k, v, None)
    if splits is not None:
        monkeypatch.setattr(ka._sm90_bwd, "backward", functools.partial(ka._sm90_bwd.backward, splits=splits))
    out = run(kernels.flash_attention, q, k, v, None, do)
    ref = run(lambda *a: attention_ref(*a, dtype=torch.float32), q, k, v, None, do)
    low = run(lambda *a: attention_ref(*a, dtype=dtype), q, k, v, None, do)
    for name, x, r, lo in zip(("o", "dq", "dk", "dv"), out, ref, low):
        check_rule(name, x, r, lo)
