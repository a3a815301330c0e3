"""The benchmark profile's op families: every kernel the model launches lands in the family it belongs to."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_model  # noqa: E402

# Kernel names as the CUDA profiler reports them for one Wan2.1 forward / training step (H200 runs).
CASES = [
    ("_attn_fwd_sm90", "attention"),
    ("_attn_bwd_sm90", "attention"),
    ("_attn_bwd_dkdv", "attention"),
    ("_attn_bwd_preprocess", "attention"),
    ("pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4, false, false>", "attention"),
    ("fmha_cutlassF_bf16_aligned_64x128_rf_sm80", "attention"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x128x128_4x1x1", "attention"),
    ("_adaln_fwd_kernel", "norm+modulate"),
    ("_adaln_bwd_kernel", "norm+modulate"),
    ("_qk_norm_rope_fwd", "qk-norm+rope"),
    ("_qk_norm_rope_bwd", "qk-norm+rope"),
    ("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::BFloat16, float, true>", "norm+modulate"),
    ("void at::native::(anonymous namespace)::GammaBetaBackwardCUDAKernelTemplate<c10::BFloat16, float>", "norm+modulate"),
    ("nvjet_sm90_tst_256x152_64x4_1x2_h_bz_coopA_bias_TNT", "matmul"),
    ("nvjet_sm90_tst_256x152_64x4_1x2_h_bz_coopA_gelubias_TNT", "matmul"),
    ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x256x64", "matmul"),
    ("void at::native::vectorized_elementwise_kernel<8, at::native::GeluCUDAKernelImpl(at::TensorIteratorBase&)", "gelu"),
    ("void cudnn::engines_precompiled::nhwcToNchwKernel<__nv_bfloat16, __nv_bfloat16, float, true, false>",
     "copy/layout"),
    ("void at::native::reduce_kernel<128, 4, at::native::ReduceOp<c10::BFloat16>>", "reduce"),
    ("void at::native::vectorized_elementwise_kernel<8, at::native::CUDAFunctor_add<c10::BFloat16>>", "elementwise"),
    ("Memset (Device)", "elementwise"),
]


@pytest.mark.parametrize("name,expected", CASES)
def test_profile_family(name, expected):
    assert bench_model.family(name) == expected


def test_busy_and_span_counts_overlap_once_and_finds_idle_gaps():
    # kernels [0, 10] and [5, 12] overlap (two streams); then a 3-unit gap; then [15, 20]
    busy, span = bench_model.busy_and_span([(15.0, 20.0), (0.0, 10.0), (5.0, 12.0)])
    assert (busy, span) == (17.0, 20.0)
    # one kernel inside another counts once; back-to-back kernels leave no idle time
    assert bench_model.busy_and_span([(0.0, 10.0), (2.0, 3.0), (10.0, 11.0)]) == (11.0, 11.0)
    assert bench_model.busy_and_span([]) == (0.0, 0.0)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_model_and_train_benchmarks_say_they_need_a_gpu(capsys):
    import bench_train

    assert bench_model.main([]) == 2
    assert bench_train.main(["--no-profile"]) == 2
    err = capsys.readouterr().err
    assert "bench_model needs a CUDA GPU." in err and "bench_train needs a CUDA GPU." in err


@pytest.mark.parametrize("name", ["attention", "model", "train"])
def test_stdit_bench_runs_the_scripts(name, capsys, monkeypatch):
    """`stdit bench NAME` runs benchmarks/bench_NAME.py through runpy, which does not put the script's folder on
    sys.path: the scripts must find their shared module themselves."""
    from stdit.cli import main

    monkeypatch.setattr(sys, "path", list(sys.path))
    sys.modules.pop("common", None)
    sys.path[:] = [p for p in sys.path if not p.endswith("benchmarks")]
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", name, "--help"])
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_regional_compile_wraps_the_blocks_and_gives_them_back():
    """``--compile`` rows: each block is wrapped by torch.compile, and the model gets its eager blocks back for the
    rows that follow (the eager rows of the next shape must not run compiled)."""
    import torch

    model = torch.nn.Module()
    model.blocks = torch.nn.ModuleList(torch.nn.Linear(2, 2) for _ in range(3))
    eager = list(model.blocks)
    bench_model.regional_compile(model, False)  # never compiled: nothing to do
    assert list(model.blocks) == eager
    bench_model.regional_compile(model, True)
    wrapped = list(model.blocks)
    assert all(isinstance(b, torch._dynamo.eval_frame.OptimizedModule) for b in wrapped)
    assert [b._orig_mod for b in wrapped] == eager
    bench_model.regional_compile(model, False)
    assert list(model.blocks) == eager
    bench_model.regional_compile(model, True)  # the same wrappers again: compiled code is kept
    assert list(model.blocks) == wrapped


@pytest.mark.parametrize("flf2v", [False, True])
def test_model_flops_counts_the_image_branch(flf2v):
    """bench_model's TFLOP/s for Wan 2.1 I2V / FLF2V: the FLOPs ``model_flops`` adds for the CLIP image tokens equal
    what torch's FLOP counter sees the image branch cost (the same model with and without it)."""
    import torch
    from diffusers import WanTransformer3DModel
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from wan_models import model_flops

    image_len = 6 if flf2v else 3
    base = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=8, out_channels=4,
                text_dim=24, freq_dim=16, ffn_dim=48, num_layers=2, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads")
    i2v = dict(base, image_dim=20, added_kv_proj_dim=32, pos_embed_seq_len=image_len if flf2v else None)
    grid, text_len = (2, 3, 4), 5
    x = torch.randn(1, 8, grid[0], 2 * grid[1], 2 * grid[2])
    text, t = torch.randn(1, text_len, 24), torch.tensor([500.0])

    def counted(cfg, **kw):  # attention through the math backend: its two matmuls are what the counter sees
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            WanTransformer3DModel(**cfg).eval()(x, t, text, **kw)
        return counter.get_total_flops()

    # FLF2V's two images come as a batch of two, which the image embedder joins into one row of 2 x 3 tokens
    image = torch.randn(2, image_len // 2, 20) if flf2v else torch.randn(1, image_len, 20)
    measured = counted(i2v, encoder_hidden_states_image=image) - counted(base)
    predicted = model_flops(i2v, grid, text_len, image_len) - model_flops(base, grid, text_len)
    assert predicted == measured
    assert bench_model.image_tokens(i2v) == ((2, image_len // 2) if flf2v else (1, 257))
    assert bench_model.image_tokens(base) == (0, 0)
