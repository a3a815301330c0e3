"""StDiT against diffusers' WanTransformer3DModel holding the same weights: forward latency, peak memory, and
the relative error between the two outputs, bf16, one process, same inputs; and, as a peer row, that very diffusers
model running stdit's kernels (``stdit.integrations.apply_to_diffusers``). Also writes a profile per op family.

    python benchmarks/bench_model.py                      # Wan2.1-T2V-1.3B at 480p and 720p x 81 frames
    python benchmarks/bench_model.py --config wan2.1-t2v-14b --shapes 480p
    python benchmarks/bench_model.py --compile            # add torch.compile rows (per block, both models)

Image-to-video configs run too, at their native resolution: ``--config wan2.1-i2v-14b --shapes 480p`` (CLIP image
tokens as an input), ``--config wan2.1-flf2v-14b --shapes 720p``, ``--config wan2.2-i2v-a14b --shapes 720p`` (one
expert; the condition channels are part of the latent input).
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (RESULTS, GpuClock, bar_plot, bench_ms_clocked, gpu_slug, machine,  # noqa: E402
                    peak_memory_gib, run_on_gpu, write_results)
from wan_models import model_flops, random_wan_pair  # noqa: E402

# latent grids of 81-frame videos through the Wan VAE (4x time, 8x space), before the (1, 2, 2) patch
SHAPES = {"480p": (21, 60, 104), "720p": (21, 90, 160)}
# Wan 2.2 TI2V-5B's VAE (48 latent channels) compresses space 16x instead of 8x: 480x832 and 704x1280 videos
SHAPES_WAN22_VAE = {"480p": (21, 30, 52), "720p": (21, 44, 80)}
TEXT_LEN = 512

# First match wins, so the specific names come first: our norm kernels are called _adaln_fwd_kernel and
# _qk_norm_rope_fwd, which the attention patterns' "_fwd_kernel" would otherwise take.
FAMILIES = [
    ("qk-norm+rope", r"qk_norm_rope|rope|rotary"),
    ("norm+modulate", r"adaln|layer_norm|rms_?norm|gammabeta|modulate|norm"),
    ("attention", r"attn|attention|flash|fmha|sdpa|_fwd_kernel|_bwd_kernel"),
    ("matmul", r"gemm|matmul|cutlass|xmma|nvjet|sm90_|addmm|\bmm\b|linear|gemv"),
    ("gelu", r"gelu"),
    ("copy/layout", r"copy|cat|transpose|contiguous|permute|index|nchw|nhwc"),
    ("reduce", r"reduce"),
    ("elementwise", r"elementwise|vectorized|add|mul|fill|memset"),
]


def family(name: str) -> str:
    for fam, pattern in FAMILIES:
        if re.search(pattern, name, flags=re.I):
            return fam
    return "other"


def busy_and_span(intervals: list[tuple[float, float]]) -> tuple[float, float]:
    """(time some kernel runs, first start to last end) of GPU ``(start, end)`` intervals; overlapping kernels
    (several streams) count once. ``span - busy`` is the time the GPU sat idle between them."""
    if not intervals:
        return 0.0, 0.0
    busy, cur_start, cur_end = 0.0, None, None
    for start, end in sorted(intervals):
        if cur_end is None or start > cur_end:
            if cur_end is not None:
                busy += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    busy += cur_end - cur_start
    return busy, max(e for _, e in intervals) - min(s for s, _ in intervals)


def profile(fn, path: Path, what: str = "one forward", calls: int = 3, clock: GpuClock | None = None) -> list[dict]:
    """GPU time per op family and the top kernels, per call, of ``calls`` back-to-back profiled calls, written to
    ``path``. A second of unprofiled calls runs first, so the profiled ones run at the clock of the timed loops (at
    its power limit the GPU runs a long loop at a lower clock than one call after an idle moment)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    end = time.time() + 1.0
    while time.time() < end:
        fn()
        torch.cuda.synchronize()
    t0 = time.time()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    t1 = time.time()
    per_family: dict[str, float] = defaultdict(float)
    kernels = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    attr = "device_time_total" if hasattr(kernels[0], "device_time_total") else "cuda_time_total"
    for e in kernels:
        per_family[family(e.key)] += getattr(e, attr) / 1e3 / calls
    total = sum(per_family.values())
    rows = [{"family": k, "ms": v, "share": v / total} for k, v in sorted(per_family.items(), key=lambda kv: -kv[1])]
    top = sorted(kernels, key=lambda e: -getattr(e, attr))[:25]
    sustained = clock.window(t0, t1) if clock is not None else {}
    text = (f"GPU time per op family ({what}; per call, mean of {calls} back-to-back calls"
            + (f" at a mean SM clock of {sustained['SM MHz']:.0f} MHz, {sustained['W']:.0f} W" if sustained else "")
            + ")\n" + "\n".join(f"{r['family']:>14}  {r['ms']:9.2f} ms  {100 * r['share']:5.1f}%" for r in rows))
    events = [e for e in prof.events() if e.device_type.name == "CUDA"]
    busy, span = busy_and_span([(e.time_range.start, e.time_range.end) for e in events])
    if span:  # idle: the GPU waiting for the host (launches, syncs) or between dependent kernels
        text += (f"\n\nFirst kernel start to last kernel end, per call {span / 1e3 / calls:.2f} ms: kernels running "
                 f"{busy / 1e3 / calls:.2f} ms, GPU idle {(span - busy) / 1e3 / calls:.2f} ms "
                 f"({len(events) / calls:g} GPU events)")
    text += "\n\nTop kernels (ms and launches per call)\n" + "\n".join(
        f"{getattr(e, attr) / 1e3 / calls:9.2f} ms  x{e.count / calls:<5g} {e.key[:110]}" for e in top)
    path.write_text(text + "\n")
    print(text.split("\n\nTop")[0])
    return rows


_BLOCKS: dict = {}  # id(model) -> (its eager blocks, the same blocks each wrapped by torch.compile)


def regional_compile(model: torch.nn.Module, on: bool) -> None:
    """Run ``model`` with each transformer block wrapped by ``torch.compile`` (regional compilation: the blocks
    share one code object, so Dynamo compiles it once), or with its eager blocks again."""
    if id(model) not in _BLOCKS:
        if not on:
            return
        _BLOCKS[id(model)] = (model.blocks, torch.nn.ModuleList(torch.compile(b) for b in model.blocks))
    model.blocks = _BLOCKS[id(model)][1 if on else 0]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="wan2.1-t2v-1.3b")
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--backends", nargs="+", default=["triton", "sdpa"])
    p.add_argument("--compile", action="store_true", help="add torch.compile rows (regional: each block)")
    p.add_argument("--fp8", action="store_true", help="add stdit rows with 8-bit attention, and with FP8 linears "
                   "(torchao) too, on a quantized copy of the model")
    p.add_argument("--no-profile", action="store_true")
    return run_on_gpu("bench_model", _run, p.parse_args(argv))


def image_tokens(cfg: dict) -> tuple[int, int]:
    """(images, CLIP tokens per image) of a Wan 2.1 image-to-video model's image input as WanImageToVideoPipeline
    passes it: one image of 257 ViT-H/14 tokens, or FLF2V's first and last frame as a batch of two that the image
    embedder joins into one row of ``pos_embed_seq_len`` tokens; (0, 0) for a model without the image branch."""
    if not cfg.get("image_dim"):
        return 0, 0
    if cfg.get("pos_embed_seq_len"):
        return 2, cfg["pos_embed_seq_len"] // 2
    return 1, 257


def fp8_candidates(ours, x, ts, text, kw) -> list[tuple]:
    """stdit with 8-bit attention in every block (the model itself, switched on for its call), then with the blocks'
    linears in FP8 too (a quantized copy: torchao's conversion is in place)."""
    from stdit.fp8 import FP8Attention

    def with_fp8_attention(model):
        def call():
            model.set_fp8_attention(FP8Attention())
            try:
                return model(x, ts, text, **kw, return_dict=False)[0]
            finally:
                model.set_fp8_attention(None)
        return call

    rows = [("stdit (triton) + fp8 attention", ours, with_fp8_attention(ours), "triton", False, False)]
    try:
        quantized = copy.deepcopy(ours)
        quantized.quantize_fp8()
        quantized.set_attention_backend("triton")
        rows.append(("stdit (triton) + fp8 attention + fp8 linears", quantized, with_fp8_attention(quantized),
                     "triton", False, False))
    except (ImportError, RuntimeError) as e:  # no torchao, or a GPU without FP8
        print(f"fp8 linears skipped: {e}")
    return rows


def _run(args, clock: GpuClock) -> int:
    from stdit.integrations import apply_to_diffusers, remove_from_diffusers

    wan, ours = random_wan_pair(args.config)
    cfg = dict(ours.config)
    images, per_image = image_tokens(cfg)
    image_len = images * per_image
    rows, slug = [], gpu_slug(machine()["gpu"])
    for shape in args.shapes:
        t, h, w = (SHAPES_WAN22_VAE if cfg["in_channels"] == 48 else SHAPES)[shape]
        gen = torch.Generator("cuda").manual_seed(0)
        x = torch.randn(1, cfg["in_channels"], t, h, w, device="cuda", dtype=torch.bfloat16, generator=gen)
        text = torch.randn(1, TEXT_LEN, cfg["text_dim"], device="cuda", dtype=torch.bfloat16, generator=gen)
        ts = torch.tensor([500.0], device="cuda")
        # image-to-video: the condition channels are part of x (in_channels); Wan 2.1 also reads CLIP image tokens
        kw = {} if not image_len else {"encoder_hidden_states_image": torch.randn(
            images, per_image, cfg["image_dim"], device="cuda", dtype=torch.bfloat16, generator=gen)}
        pt, ph, pw = cfg["patch_size"]
        grid = (t // pt, h // ph, w // pw)
        flops = model_flops(cfg, grid, TEXT_LEN, image_len)
        with torch.no_grad():
            ref = wan(x, ts, text, **kw, return_dict=False)[0].float()
            run_wan = lambda: wan(x, ts, text, **kw, return_dict=False)[0]  # noqa: E731
            run_ours = lambda: ours(x, ts, text, **kw, return_dict=False)[0]  # noqa: E731
            # (name, model, call, stdit backend, regional compile, diffusers' Wan on stdit's kernels)
            candidates = [("diffusers Wan", wan, run_wan, None, False, False),
                          ("diffusers Wan + stdit kernels", wan, run_wan, None, False, True)]
            candidates += [(f"stdit ({b})", ours, run_ours, b, False, False) for b in args.backends]
            if args.fp8:
                candidates += fp8_candidates(ours, x, ts, text, kw)
            if args.compile:  # after the eager rows; each model gets its eager blocks back below
                candidates += [("diffusers Wan + compile", wan, run_wan, None, True, False),
                               ("diffusers Wan + stdit kernels + compile", wan, run_wan, None, True, True)]
                candidates += [(f"stdit ({b}) + compile", ours, run_ours, b, True, False) for b in args.backends]
            base_ms = None
            for name, model, fn, backend, compiled, stdit_kernels in candidates:
                regional_compile(model, compiled)
                if model is wan or model is ours:
                    ours.set_attention_backend(backend)
                if stdit_kernels:  # stdit's default backend, auto, as a user of apply_to_diffusers gets it
                    apply_to_diffusers(wan)
                try:
                    out = fn().float()
                    ms, clocked = bench_ms_clocked(fn, clock, warmup_ms=200, rep_ms=1500)
                    mem = peak_memory_gib(fn)
                except Exception as e:  # a failing candidate is reported, not allowed to hide the others
                    rows.append({"shape": shape, "impl": name, "error": f"{type(e).__name__}: {e}"[:200]})
                    print(f"{shape} {name}: FAILED {e}")
                    continue
                finally:
                    if stdit_kernels:  # diffusers' own processors again for the rows that time Wan as it ships
                        remove_from_diffusers(wan)
                base_ms = base_ms or ms
                rows.append({"shape": shape, "tokens": grid[0] * grid[1] * grid[2], "impl": name, "ms": ms,
                             "speedup": base_ms / ms, "TFLOP/s": flops / ms / 1e9, "peak GiB": mem,
                             "rel err vs Wan": ((out - ref).norm() / ref.norm()).item(), **clocked})
                print(rows[-1])
            for m in (wan, ours):
                regional_compile(m, False)
            candidates.clear()  # the FP8 copy's memory back before the next shape
            model = fn = None
            if shape == "480p" and not args.no_profile:
                ours.set_attention_backend(args.backends[0])
                profile(lambda: ours(x, ts, text, **kw, return_dict=False), RESULTS / f"model-profile-{slug}.txt",
                        clock=clock)
        torch.cuda.empty_cache()

    name = "model" if args.config == "wan2.1-t2v-1.3b" else f"model-{args.config}"
    cols = ["shape", "tokens", "impl", "ms", "speedup", "TFLOP/s", "peak GiB", "rel err vs Wan", "SM MHz", "W",
            "error"]
    md = write_results(name, f"Forward latency, {args.config}, bf16, batch 1, text length {TEXT_LEN}", rows, cols,
                       notes="`speedup` is against diffusers' Wan of the same run; TFLOP/s counts matmuls and "
                             "attention only. Both models hold the same tensors. `diffusers Wan + stdit kernels`: "
                             "the same diffusers model with `stdit.integrations.apply_to_diffusers` (stdit's fused "
                             "QK-norm+RoPE and attention, backend auto), removed again for the other rows. `SM MHz` "
                             "and `W`: the GPU's mean SM clock and board power in the timed loop (NVML).")
    ok = [r for r in rows if "ms" in r]
    impls = list(dict.fromkeys(r["impl"] for r in ok))
    bar_plot(md.parent / (md.stem + ".png"), args.shapes,
             {i: [next((r["ms"] for r in ok if r["impl"] == i and r["shape"] == s), 0.0) for s in args.shapes]
              for i in impls}, "forward latency (ms, lower is better)", f"{args.config} forward, {machine()['gpu']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
