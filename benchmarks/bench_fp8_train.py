"""FP8 training of the linears (torchao float8 through ``stdit.fp8.convert_fp8_training``, as ``train.fp8_linears``
does) against bf16, same weights and data, one process:

* **Speed**: one training step (forward + backward, fp32 master weights under bf16 autocast as the trainer runs
  them, activation checkpointing keeping attention, blocks compiled as ``train.compile`` does: without compile
  torchao's casts run as separate ops) of a Wan size with random weights at 480p x 81 frames: tokens/s, peak memory.
* **Loss, Wan**: the same short run from the same random initialization in each precision (AdamW, flow-matching
  loss on a few fixed random latents, the same noise and timesteps per step): the final loss and its gap to bf16.
* **Loss, tiny model**: the main job's model (``configs/tiny.yaml``) trained on the GPU by the trainer for
  ``--tiny-steps`` steps, with and without ``train.fp8_linears``: the loss at the end (mean of the last 50 steps).

    python benchmarks/bench_fp8_train.py                        # Wan2.1-1.3B
    python benchmarks/bench_fp8_train.py --skip-speed --tiny-steps 600
    python benchmarks/bench_fp8_train.py --tiny-only --tiny-steps 1000   # the tiny model alone, on any device

On the CPU (``--tiny-only``) torchao's float8 matmuls run through torch's CPU ``_scaled_mm``: the rounding to e4m3
is the GPU's, the speed is not, so only the loss is reported.

Writes ``benchmarks/results/fp8-train-<gpu>.{md,json,png}``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when run through `stdit bench fp8_train` (runpy)
from bench_model import SHAPES, TEXT_LEN  # noqa: E402
from common import (GpuClock, bar_plot, bench_ms_clocked, machine, peak_memory_gib, run_on_gpu,  # noqa: E402
                    write_results)

PRECISIONS = ("bf16", "fp8 rowwise", "fp8 tensorwise")
LOSS_GRID = (5, 30, 52)  # latent frames, height, width of the loss run (17 frames at 240 x 416: 1,950 tokens)


def build(config: str, precision: str, seed: int = 0):
    """A StDiT of ``config`` with the same random initialization for every precision, fp32 on the GPU, its blocks'
    linears converted for FP8 training where asked."""
    from stdit import StDiT
    from stdit.fp8 import convert_fp8_training

    torch.manual_seed(seed)
    model = StDiT.from_config_file(config)
    model.initialize_weights()
    model = model.cuda().train()
    if precision != "bf16":
        convert_fp8_training(model, precision.split()[1])
    return model


def flow_loss(model, x0, text, noise, t):
    """Flow matching as the trainer computes it: x_t = (1 - t) x0 + t noise, the target noise - x0."""
    tt = t.view(-1, 1, 1, 1, 1)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        pred = model((1 - tt) * x0 + tt * noise, t * 1000, text, return_dict=False)[0]
    return (pred.float() - (noise - x0)).square().mean()


def speed_rows(args, clock: GpuClock) -> list[dict]:
    t, h, w = SHAPES[args.shape]
    tokens = t * (h // 2) * (w // 2)
    gen = torch.Generator("cuda").manual_seed(0)
    x0 = torch.randn(1, 16, t, h, w, device="cuda", generator=gen)
    noise = torch.randn(1, 16, t, h, w, device="cuda", generator=gen)
    text = torch.randn(1, TEXT_LEN, 4096, device="cuda", generator=gen)
    ts = torch.tensor([0.5], device="cuda")
    rows, base = [], None
    for precision in PRECISIONS:
        try:
            ms, mem, clocked = _time_step(args.config, precision, (x0, text, noise, ts), clock)
        except Exception as e:  # a failed variant is a row, not the end of the run
            rows.append({"impl": f"stdit {precision} (speed)", "error": f"{type(e).__name__}: {e}"[:200]})
            print(rows[-1])
            continue
        finally:
            torch.cuda.empty_cache()
        tps = tokens / ms * 1e3
        base = base or tps
        rows.append({"impl": f"stdit {precision} (speed)", "tokens": tokens, "step ms": ms, "tokens/s": tps,
                     "vs bf16": tps / base, "peak GiB": mem, **clocked})
        print(rows[-1], flush=True)
    return rows


def _time_step(config, precision, batch, clock):
    model = build(config, precision)
    model.enable_gradient_checkpointing(keep_attention=True)
    model.compile_blocks()

    def step():
        flow_loss(model, *batch).backward()

    step()  # compiles
    ms, clocked = bench_ms_clocked(step, clock, warmup_ms=200, rep_ms=2000)
    return ms, peak_memory_gib(step), clocked


def loss_rows(args) -> list[dict]:
    t, h, w = LOSS_GRID
    gen = torch.Generator("cuda").manual_seed(1)
    x0 = torch.randn(args.loss_batch, 16, t, h, w, device="cuda", generator=gen)
    text = torch.randn(args.loss_batch, TEXT_LEN, 4096, device="cuda", generator=gen)
    draws = [(torch.randn(x0.shape, device="cuda", generator=gen), torch.rand(args.loss_batch, device="cuda",
                                                                            generator=gen))
             for _ in range(args.loss_steps)]
    rows, ref = [], None
    for precision in PRECISIONS:
        model = build(args.config, precision)
        opt = torch.optim.AdamW(model.parameters(), lr=args.loss_lr, weight_decay=0.0)
        curve = []
        for noise, ts in draws:
            loss = flow_loss(model, x0, text, noise, ts)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            curve.append(loss.item())
        del model, opt
        torch.cuda.empty_cache()
        tail = sum(curve[-10:]) / 10
        ref = ref if ref is not None else curve
        gap = max(abs(a - b) / b for a, b in zip(curve, ref))
        rows.append({"impl": f"stdit {precision} (Wan loss)", "first loss": curve[0], "final loss": tail,
                     "max step gap": gap, "curve": curve})
        print({k: v for k, v in rows[-1].items() if k != "curve"}, flush=True)
    return rows


def tiny_rows(args) -> list[dict]:
    from stdit.train import train
    from stdit.train_config import load_train_config
    from stdit.train_utils import read_log

    # The baseline and the master weights: bf16 autocast on a GPU; on the CPU, where bf16 matmuls run several times
    # slower than fp32 ones, fp32.
    base = "bf16" if torch.cuda.is_available() else "fp32"
    rows, ref = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for precision, fp8 in ((base, None), ("fp8 rowwise", "rowwise"), ("fp8 tensorwise", "tensorwise")):
            out = Path(tmp) / precision.replace(" ", "-")
            overrides = [f"train.output_dir={out}", f"train.steps={args.tiny_steps}", "sample.enabled=false",
                         f"train.ckpt_every={args.tiny_steps}", f"train.precision={base}"]
            if fp8:
                overrides.append(f"train.fp8_linears={fp8}")
            train(load_train_config("tiny", overrides))
            losses = [r["loss"] for r in read_log(out / "log.jsonl")]
            tail = sum(losses[-50:]) / len(losses[-50:])
            ref = ref if ref is not None else (losses, tail)
            rows.append({"impl": f"stdit {precision} (tiny model, {args.tiny_steps} steps)", "first loss": losses[0],
                         "final loss": tail, "final loss gap": abs(tail - ref[1]) / ref[1],
                         "max step gap": max(abs(a - b) / b for a, b in zip(losses, ref[0])),
                         "baseline": base,
                         "curve": losses})
            print(rows[-1], flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="wan2.1-t2v-1.3b", help="a configs/ Wan size (random weights)")
    p.add_argument("--shape", default="480p", choices=list(SHAPES), help="the speed rows' shape")
    p.add_argument("--loss-steps", type=int, default=200)
    p.add_argument("--loss-batch", type=int, default=2)
    p.add_argument("--loss-lr", type=float, default=1e-4)
    p.add_argument("--tiny-steps", type=int, default=1000, help="0 skips the tiny model")
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--skip-loss", action="store_true")
    p.add_argument("--tiny-only", action="store_true", help="only the tiny model's loss rows, on this machine's "
                   "GPU or CPU")
    args = p.parse_args(argv)
    if args.tiny_only:
        return _write(args, tiny_rows(args))
    return run_on_gpu("bench_fp8_train", _run, args)


def _run(args, clock: GpuClock) -> int:
    if torch.cuda.get_device_capability() < (8, 9):
        print("bench_fp8_train needs FP8 tensor cores (compute capability 8.9 or newer).", file=sys.stderr)
        return 2
    rows = [] if args.skip_speed else speed_rows(args, clock)
    rows += [] if args.skip_loss else loss_rows(args)
    rows += tiny_rows(args) if args.tiny_steps else []
    return _write(args, rows)


def _notes(args) -> str:
    tiny = ("Tiny model: the trainer on configs/tiny.yaml, bf16 autocast (fp32 on the CPU), the same batches, noise "
            "and timesteps in each precision; final loss = mean of the last 50 steps. Gaps are relative, to the "
            "first row of each part (the baseline): `final loss gap` of the final losses, `max step gap` the "
            "largest per-step difference of the curves (in the JSON).")
    if args.tiny_only:
        return tiny
    return (f"Speed: {args.shape}, one step, fp32 master weights under bf16 autocast, checkpointing keeps attention, "
            f"blocks compiled. Wan loss: {args.loss_steps} AdamW steps (lr {args.loss_lr}) at latent grid {LOSS_GRID}, "
            f"batch {args.loss_batch}, from one random initialization; final loss = mean of the last 10 steps. "
            + tiny)


def _write(args, rows: list[dict]) -> int:
    gpu = machine()["gpu"]
    base = next((r["baseline"] for r in rows if "baseline" in r), "bf16")
    cols = ["impl", "tokens", "step ms", "tokens/s", "vs bf16", "peak GiB", "SM MHz", "W", "first loss", "final loss",
            "final loss gap", "max step gap", "error"]
    md = write_results(
        "fp8-train-tiny" if args.tiny_only else "fp8-train",
        f"FP8 training of the linears (torchao float8) against {base}, "
        f"{'configs/tiny.yaml' if args.tiny_only else args.config}", rows,
        [c for c in cols if any(c in r for r in rows)],
        notes=_notes(args))
    speed = [r for r in rows if "tokens/s" in r]
    if speed:
        bar_plot(md.parent / (md.stem + ".png"), [r["impl"] for r in speed], {"tokens/s": [r["tokens/s"] for r in speed]},
                 "tokens/s (higher is better)", f"{args.config} training step, {gpu}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
