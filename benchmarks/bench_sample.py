"""Whole-video generation time: diffusers' WanPipeline with its Wan transformer against StDiT with each speed-up
(the drop-in in WanPipeline, StDiTPipeline with two-call and batched guidance, step caches) on the same random
weights, text features, initial noise and Wan VAE (random weights too), one process.

Each row is one timed run of ``--steps`` steps with classifier-free guidance, split into transformer, scheduler
and VAE decode (CUDA events around each part, summed after the run), its peak memory, and the final latent's
relative error against the uncached StDiTPipeline run (and against diffusers'). With ``--tiny-model DIR`` (the main
job's trained ``runs/tiny/model``) the step caches are also measured on a real learned model: PSNR / SSIM of the
cached videos against the uncached ones from the same noise.

    python benchmarks/bench_sample.py                               # Wan2.1-T2V-1.3B, 480p x 81, 50 steps, CFG 5
    python benchmarks/bench_sample.py --shapes 480p 720p --tiny-model runs/tiny/model
    python benchmarks/bench_sample.py --smoke                       # tiny sizes on the CPU, results to a temp dir
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import GpuClock, bar_plot, machine, markdown_table, write_results  # noqa: E402

# video sizes (frames, height, width) and Wan's recommended flow shift for each
SHAPES = {"480p": (81, 480, 832), "720p": (81, 720, 1280)}
FLOW_SHIFT = {"480p": 3.0, "720p": 5.0}
TEXT_LEN = 512
SMOKE = dict(frames=5, height=32, width=32, steps=6)
SMOKE_WAN = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16,
                 out_channels=16, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=3, cross_attn_norm=True,
                 rope_max_seq_len=32)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="wan2.1-t2v-1.3b", help="a configs/ Wan size (random weights)")
    p.add_argument("--shapes", nargs="+", default=["480p"], choices=list(SHAPES))
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--teacache", type=float, nargs="*", default=[0.2, 0.4], help="TeaCache thresholds (rows)")
    p.add_argument("--magcache", type=float, nargs="*", default=[0.1, 0.2], help="MagCache thresholds (rows)")
    p.add_argument("--max-skip", type=int, default=3, help="step caches: most skipped steps in a row")
    p.add_argument("--extra-backends", nargs="*", default=[], help="more StDiT attention backends, one batched row "
                   "each (plus one with the first MagCache threshold), and a PSNR row on the tiny model; e.g. fp8")
    p.add_argument("--calibration", help="a step_cache.json for the Wan model (default: calibrate on other noise)")
    p.add_argument("--tiny-model", help="a trained tiny model directory (runs/tiny/model) for PSNR / SSIM")
    p.add_argument("--tiny-videos", type=int, default=2, help="videos per class of the tiny model")
    p.add_argument("--no-vae", action="store_true", help="skip the VAE decode (time the denoising only)")
    p.add_argument("--smoke", action="store_true", help="tiny models and sizes on the CPU, to check the script")
    p.add_argument("--results", help="where results go (default benchmarks/results; --smoke: a temp dir)")
    args = p.parse_args(argv)
    if args.steps < 2:
        p.error(f"--steps {args.steps}: a run needs at least 2 steps.")
    if any(t < 0 for t in args.teacache + args.magcache):
        p.error("cache thresholds must be >= 0.")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.smoke:
        args.results = args.results or str(Path(tempfile.gettempdir()) / "stdit-bench-sample-smoke")
    elif not torch.cuda.is_available():
        print("bench_sample needs a CUDA GPU (--smoke runs tiny sizes on the CPU).", file=sys.stderr)
        return 2
    if args.results:
        common.RESULTS = Path(args.results)
    with GpuClock() as clock:
        return _run(args, clock)


# ---- building the models and pipelines ---------------------------------------------------------------------------

def _models(args, device, dtype):
    if not args.smoke:
        from wan_models import random_wan_pair

        return random_wan_pair(args.config, device=device, dtype=dtype)
    from diffusers import WanTransformer3DModel

    from stdit import StDiT

    torch.manual_seed(0)
    wan = WanTransformer3DModel(**SMOKE_WAN).eval()
    with torch.no_grad():
        for p in wan.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return wan.to(device), StDiT.from_wan(wan).eval()


def _vae(args, device):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    if args.smoke:
        vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                               temperal_downsample=[False, True, True])
    else:
        vae = AutoencoderKLWan()  # the Wan 2.1 VAE's architecture, random weights: the decode time is the same
    return vae.eval().to(device)


def _scheduler(shift: float):
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift)


def _pipeline(kind: str, transformer, vae, shift: float):
    if kind == "wan":
        from diffusers import WanPipeline

        pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                           scheduler=_scheduler(shift))
    else:
        from stdit.pipeline import StDiTPipeline

        pipe = StDiTPipeline(transformer, _scheduler(shift), vae=vae)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---- timing one run ----------------------------------------------------------------------------------------------

def _timed(timer, name, fn):
    @functools.wraps(fn)
    def call(*a, **k):
        with timer.part(name):
            return fn(*a, **k)

    return call


@contextlib.contextmanager
def instrumented(pipe, device):
    """A :class:`stdit.pipeline.PartTimer` around the pipeline's transformer calls (forward hooks), scheduler steps
    and VAE decode (instance attributes wrapping the methods), the same for WanPipeline and StDiTPipeline."""
    from stdit.pipeline import PartTimer

    timer, open_parts = PartTimer(device), []

    def enter(module, args):
        open_parts.append(timer.part("transformer"))
        open_parts[-1].__enter__()

    def leave(module, args, out):
        open_parts.pop().__exit__(None, None, None)

    handles = [pipe.transformer.register_forward_pre_hook(enter), pipe.transformer.register_forward_hook(leave)]
    pipe.scheduler.step = _timed(timer, "scheduler", pipe.scheduler.step)
    if pipe.vae is not None:
        pipe.vae.decode = _timed(timer, "vae_decode", pipe.vae.decode)
    try:
        yield timer
    finally:
        for h in handles:
            h.remove()
        del pipe.scheduler.step
        if pipe.vae is not None:
            del pipe.vae.decode


def timed_run(pipe, call: dict, device, clock=None) -> dict:
    """One generation: seconds per part, peak GiB and the final latents."""
    steps, final = call["num_inference_steps"], {}

    def grab(p, i, t, tensors):
        if i == steps - 1:
            final["latents"] = tensors["latents"].float().clone()
        return tensors

    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    with instrumented(pipe, device) as timer:
        frames = pipe(**call, callback_on_step_end=grab).frames
    parts = timer.seconds()
    del frames  # (a 480p x 81 video is 0.4 GB on the GPU)
    out = {"parts": parts, "latents": final["latents"],
           "peak GiB": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}
    out.update(clock.window(t0, time.time()) if clock is not None else {})
    return out


# ---- the run -----------------------------------------------------------------------------------------------------

def _caches(args) -> list[tuple[str, float]]:
    return [("teacache", t) for t in args.teacache] + [("magcache", t) for t in args.magcache]


def _cache_label(method: str, threshold: float) -> str:
    return f"{'TeaCache' if method == 'teacache' else 'MagCache'} {threshold:g}"


def _specs(args, wan, ours) -> list[tuple]:
    """The rows: (name, pipeline kind, transformer, extra call arguments, step cache or None, StDiT backend)."""
    specs = [("diffusers WanPipeline", "wan", wan, {}, None, None),
             ("WanPipeline + StDiT", "wan", ours, {}, None, None),
             ("StDiTPipeline, two calls", "ours", ours, {"guidance_batching": False}, None, None),
             ("StDiTPipeline, batched guidance", "ours", ours, {}, None, None)]
    specs += [(f"StDiTPipeline + {_cache_label(*c)}", "ours", ours, {}, c, None) for c in _caches(args)]
    first_mag = ("magcache", args.magcache[0]) if args.magcache else None
    if first_mag:
        specs.append((f"WanPipeline + StDiT + {_cache_label(*first_mag)}", "wan", ours, {}, first_mag, None))
    for backend in args.extra_backends:
        specs.append((f"StDiTPipeline, batched, {backend}", "ours", ours, {}, None, backend))
        if first_mag:
            specs.append((f"StDiTPipeline, batched, {backend} + {_cache_label(*first_mag)}", "ours", ours, {},
                          first_mag, backend))
    return specs


def _run(args, clock) -> int:
    from stdit.cache import StepCacheCalibration, StepCacheConfig, calibrating, disable_step_cache, enable_step_cache

    device = "cpu" if args.smoke else "cuda"
    dtype = torch.float32 if args.smoke else torch.bfloat16
    wan, ours = _models(args, device, dtype)
    vae = None if args.no_vae else _vae(args, device)
    rows, shapes = [], (["smoke"] if args.smoke else args.shapes)
    for shape in shapes:
        frames, height, width = (SMOKE["frames"], SMOKE["height"], SMOKE["width"]) if args.smoke else SHAPES[shape]
        steps = SMOKE["steps"] if args.smoke else args.steps
        shift = 3.0 if args.smoke else FLOW_SHIFT[shape]
        lat_shape = (1, 16, (frames - 1) // 4 + 1, height // 8, width // 8)  # the Wan VAE's 4x time, 8x space
        gen = torch.Generator(device).manual_seed(0)
        noise, other_noise = (torch.randn(lat_shape, generator=gen, device=device) for _ in range(2))
        text, negative = (torch.randn(1, TEXT_LEN, wan.config.text_dim, generator=gen, device=device).to(dtype)
                          for _ in range(2))
        # StDiTPipeline checks its sizes against the latents: pixels with a VAE, latent sizes without one
        sizes = (frames, height, width) if vae is not None else lat_shape[2:]

        def call(kind, latents=noise, n=steps):
            return dict(num_inference_steps=n, guidance_scale=args.guidance, latents=latents.clone(),
                        prompt_embeds=text, negative_prompt_embeds=negative,
                        output_type="latent" if vae is None else "pt",
                        **dict(zip(("num_frames", "height", "width"), (frames, height, width) if kind == "wan"
                                   else sizes)))

        with torch.no_grad():
            if args.calibration:
                calibration = StepCacheCalibration.load(args.calibration)
            else:  # other noise than the timed rows', as a user calibrates once and samples anew
                with calibrating(ours, info={"shape": shape, "steps": steps, "guidance": args.guidance}) as cal:
                    _pipeline("ours", ours, vae, shift)(**{**call("ours", other_noise), "output_type": "latent"})
                calibration = cal.result()
            if vae is not None:  # the first row's decode should not pay for cuDNN's first-call setup
                vae.decode(noise.to(vae.dtype))
            warmed, latents = set(), {}
            for name, kind, model, extra, cache, backend in _specs(args, wan, ours):
                pipe, hook = _pipeline(kind, model, vae, shift), None
                try:
                    if model is ours:
                        ours.set_attention_backend(backend)
                    if (kind, id(model), backend) not in warmed:  # kernels compiled and tuned before timing
                        pipe(**{**call(kind, n=2), "output_type": "latent"})
                        warmed.add((kind, id(model), backend))
                    if cache is not None:
                        hook = enable_step_cache(ours, StepCacheConfig.from_calibration(
                            calibration, method=cache[0], threshold=cache[1], max_skip_steps=args.max_skip))
                    r = timed_run(pipe, {**call(kind), **extra}, device, clock)
                except Exception as e:  # a failing row is reported, not allowed to hide the others
                    rows.append({"shape": shape, "impl": name, "error": f"{type(e).__name__}: {e}"[:200]})
                    print(f"{shape} {name}: FAILED {e}")
                    continue
                finally:
                    if hook is not None:
                        disable_step_cache(ours)
                    ours.set_attention_backend(None)
                latents[name] = r["latents"]
                calls = steps * (2 if kind == "wan" or extra.get("guidance_batching") is False else 1)
                parts = r["parts"]
                row = {"shape": shape, "impl": name, "total s": parts["total"],
                       "transformer s": parts.get("transformer", 0.0), "scheduler s": parts.get("scheduler", 0.0),
                       "VAE decode s": parts.get("vae_decode", 0.0),
                       "block stacks": f"{hook.computed if hook is not None else calls}/{calls}",
                       "peak GiB": r["peak GiB"], "SM MHz": r.get("SM MHz"), "W": r.get("W")}
                row["other s"] = row["total s"] - row["transformer s"] - row["scheduler s"] - row["VAE decode s"]
                rows.append(row)
                print(row)
        _compare(rows, shape, latents)
        if device == "cuda":
            torch.cuda.empty_cache()

    quality = _tiny_quality(args, device) if (args.tiny_model or args.smoke) else []
    _write(args, rows, quality, shapes)
    return 0


def _compare(rows: list[dict], shape: str, latents: dict) -> None:
    """Each row of ``shape`` against diffusers' row (speedups, latent error) and the uncached StDiT row."""
    base = next((r for r in rows if r["shape"] == shape and r["impl"] == "diffusers WanPipeline"
                 and "total s" in r), None)
    for row in rows:
        if row["shape"] != shape or row["impl"] not in latents:
            continue
        z = latents[row["impl"]]
        if base is not None:
            row["transformer speedup"] = base["transformer s"] / max(row["transformer s"], 1e-9)
            row["total speedup"] = base["total s"] / max(row["total s"], 1e-9)
            row["latent rel err vs diffusers"] = _rel(z, latents["diffusers WanPipeline"])
        if "StDiTPipeline, batched guidance" in latents:
            row["latent rel err vs uncached"] = _rel(z, latents["StDiTPipeline, batched guidance"])


def _write(args, rows: list[dict], quality: list[dict], shapes: list[str]) -> None:
    cols = ["shape", "impl", "total s", "transformer s", "scheduler s", "VAE decode s", "other s",
            "transformer speedup", "total speedup", "block stacks", "peak GiB", "latent rel err vs uncached",
            "latent rel err vs diffusers", "SM MHz", "W", "error"]
    model = "tiny Wan (smoke)" if args.smoke else args.config
    notes = (f"{model}, {SMOKE['steps'] if args.smoke else args.steps} steps, CFG {args.guidance:g}, UniPC (flow "
             f"shift per shape), random weights (transformer and Wan VAE), text features random ({TEXT_LEN} "
             "tokens), the same initial noise in every row. Parts are CUDA-event spans summed over the run; `other` "
             "is the rest of the wall time (latent setup, postprocessing). `block stacks`: transformer calls that ran "
             "the blocks, of all calls. `speedup`s are against diffusers' WanPipeline of the same run. `latent rel "
             "err vs uncached`: the final latents against the uncached StDiTPipeline run. Step caches calibrated on "
             f"other noise, at most {args.max_skip} skipped steps in a row. `--extra-backends fp8` adds rows on the "
             "8-bit attention.")
    if quality:
        notes += ("\n\nStep caches on a learned model (PSNR / SSIM of the frames, cached against uncached from the "
                  "same noise; calibrated on other seeds):\n\n"
                  + markdown_table(quality, ["model", "cache", "block stacks", "PSNR dB", "SSIM"]))
    md = write_results("sample", "Video generation end to end: diffusers' WanPipeline vs StDiT", rows, cols,
                       notes=notes, extra={"quality": quality, "settings": vars(args)})
    ok = [r for r in rows if "total s" in r]
    labels = [f"{r['impl']} ({r['shape']})" if len(shapes) > 1 else r["impl"] for r in ok]
    bar_plot(md.parent / (md.stem + ".png"), labels,
             {"transformer": [r["transformer s"] for r in ok], "VAE decode": [r["VAE decode s"] for r in ok],
              "total": [r["total s"] for r in ok]}, "seconds (lower is better)",
             f"generation, {model}, {machine()['gpu']}")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


# ---- quality on a learned model ----------------------------------------------------------------------------------

def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR (dB) of frames in [0, 1]."""
    mse = torch.mean((a.double() - b.double()) ** 2).item()
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


def ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean SSIM of frames ``[..., C, H, W]`` in [0, 1]: an 11 x 11 Gaussian window (sigma 1.5; smaller frames take
    a window their size), per channel, constants (0.01)^2 and (0.03)^2, as Wang et al. 2004."""
    a, b = a.reshape(-1, 1, *a.shape[-2:]).double(), b.reshape(-1, 1, *b.shape[-2:]).double()
    size = min(11, a.shape[-1], a.shape[-2])
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x**2 / (2 * 1.5**2))
    g = (g / g.sum()).to(a.device)
    window = (g[:, None] * g[None, :])[None, None]

    def blur(t):
        return torch.nn.functional.conv2d(t, window)

    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b, cov = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2, blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.mean().item()


def _tiny_model(args, device):
    from stdit import StDiT
    from stdit.pipeline import StDiTPipeline, make_scheduler

    if args.tiny_model:  # the main job saves its sampling scheduler beside the model (see the README)
        from diffusers import FlowMatchEulerDiscreteScheduler

        model = StDiT.from_pretrained(args.tiny_model).to(device).eval()
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(args.tiny_model)
        return "tiny (trained)", StDiTPipeline(model, scheduler), 8, 32
    torch.manual_seed(0)
    model = StDiT(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=3, out_channels=3,
                  text_dim=None, freq_dim=32, ffn_dim=48, num_layers=2, num_classes=3).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return "tiny (random, smoke)", StDiTPipeline(model.to(device), make_scheduler("euler", 1.0)), 3, 8


def _tiny_quality(args, device) -> list[dict]:
    """Cached against uncached videos of a small class-conditional model, every class, the same noise."""
    from stdit.cache import StepCacheConfig, calibrating, disable_step_cache, enable_step_cache

    label, pipe, frames, size = _tiny_model(args, device)
    pipe.set_progress_bar_config(disable=True)
    model = pipe.transformer
    labels = [c for c in range(model.config.num_classes) for _ in range(1 if args.smoke else args.tiny_videos)]
    steps = SMOKE["steps"] + 2 if args.smoke else args.steps
    kw = dict(class_labels=labels, num_frames=frames, height=size, width=size, num_inference_steps=steps,
              guidance_scale=2.0)

    def sample(seed):
        return pipe(generator=torch.Generator().manual_seed(seed), **kw).frames.float().cpu()

    with torch.no_grad():
        with calibrating(model) as cal:
            for seed in (100, 101):
                sample(seed)
        calibration = cal.result()
        ref = sample(0)
        rows = []
        for method, threshold in _caches(args):
            hook = enable_step_cache(model, StepCacheConfig.from_calibration(
                calibration, method=method, threshold=threshold, max_skip_steps=args.max_skip))
            try:
                out = sample(0)
            finally:
                disable_step_cache(model)
            rows.append({"model": label, "cache": _cache_label(method, threshold),
                         "block stacks": f"{hook.computed}/{steps}", "PSNR dB": psnr(out, ref), "SSIM": ssim(out, ref)})
            print(rows[-1])
        for backend in args.extra_backends:  # e.g. fp8: the same noise, uncached, on that attention backend
            model.set_attention_backend(backend)
            try:
                out = sample(0)
            finally:
                model.set_attention_backend(None)
            rows.append({"model": label, "cache": f"none, {backend} attention", "block stacks": f"{steps}/{steps}",
                         "PSNR dB": psnr(out, ref), "SSIM": ssim(out, ref)})
            print(rows[-1])
    return rows


if __name__ == "__main__":
    sys.exit(main())
