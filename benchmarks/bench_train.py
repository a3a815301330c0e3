"""One training step (forward + backward, activation checkpointing on, bf16) of StDiT and of diffusers'
WanTransformer3DModel holding the same weights: tokens/s, model FLOP utilization (MFU) and peak memory.

    python benchmarks/bench_train.py                      # Wan2.1-T2V-1.3B, 480p x 81 frames (32,760 tokens)
    python benchmarks/bench_train.py --compile            # add torch.compile rows (regional, both models)
    python benchmarks/bench_train.py --lora               # a LoRA step (peft, rank 64) of both models instead

With ``--compile`` diffusers' blocks are compiled inside its checkpoints, and ours through ``StDiT.compile_blocks``
as ``train.compile`` does (the checkpointed calls compiled too, so the selective-checkpointing policies still apply).

With ``--lora`` both bases are frozen and carry the same peft LoRA adapters (``--lora-rank``, on every attention
q/k/v/out and FFN projection, as ``train.lora``'s default; the adapters in bf16 like the base, as FSDP2 computes
them in training), and only the adapters get gradients.

Rows per backend: full recompute; selective checkpointing that keeps each self-attention's output; and one that also
keeps every matmul output (only elementwise ops recomputed). The fastest stdit row is profiled per op family
(``train-profile-<gpu>.txt``; ``--no-profile`` skips it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_model import SHAPES, TEXT_LEN, profile, regional_compile  # noqa: E402
from common import (RESULTS, GpuClock, bar_plot, bench_ms_clocked, gpu_slug, machine,  # noqa: E402
                    peak_memory_gib, run_on_gpu, write_results)
from wan_models import model_flops, random_wan_pair  # noqa: E402

# dense bf16 tensor-core peak (no sparsity) by GPU, for MFU
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "B200": 2250.0}


def peak_tflops(gpu: str) -> float | None:
    return next((v for k, v in PEAK_TFLOPS.items() if k in gpu), None)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="wan2.1-t2v-1.3b")
    p.add_argument("--shape", default="480p", choices=list(SHAPES))
    p.add_argument("--backends", nargs="+", default=["triton", "sdpa"])
    p.add_argument("--compile", action="store_true",
                   help="add torch.compile rows (regional: each block), after the eager ones")
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--lora", action="store_true", help="time a LoRA step (frozen base, peft adapters) instead")
    p.add_argument("--lora-rank", type=int, default=64)
    return run_on_gpu("bench_train", _run, p.parse_args(argv))


def add_lora(models, rank: int) -> None:
    """The same peft LoRA adapters (same init) on each frozen model."""
    from peft import LoraConfig

    from stdit.train_config import LORA_TARGETS

    for model in models:
        model.requires_grad_(False)
        torch.manual_seed(0)
        model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_TARGETS), adapter_name="default")


def _run(args, clock: GpuClock) -> int:
    wan, ours = random_wan_pair(args.config)
    if args.lora:
        add_lora((wan, ours), args.lora_rank)
    for m in (wan, ours):
        m.train()
        m.enable_gradient_checkpointing()
    t, h, w = SHAPES[args.shape]
    grid = (t, h // 2, w // 2)
    tokens = grid[0] * grid[1] * grid[2]
    gen = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(1, 16, t, h, w, device="cuda", dtype=torch.bfloat16, generator=gen)
    target = torch.randn(1, 16, t, h, w, device="cuda", dtype=torch.float32, generator=gen)
    text = torch.randn(1, TEXT_LEN, 4096, device="cuda", dtype=torch.bfloat16, generator=gen)
    ts = torch.tensor([500.0], device="cuda")
    params = [p for m in (wan, ours) for p in m.parameters() if p.requires_grad]
    cfg = dict(ours.config)
    flops = 3 * model_flops(cfg, grid, TEXT_LEN)  # forward + backward; recompute not counted
    if args.lora:  # no weight gradients of the frozen matmuls: 2x their forward; attention's backward stays 2x
        d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
        attn = cfg["num_layers"] * (4 * tokens * tokens * d + 4 * tokens * TEXT_LEN * d)
        flops = 2 * model_flops(cfg, grid, TEXT_LEN) + attn
    peak = peak_tflops(machine()["gpu"])

    def step(model):
        def fn():
            out = model(x, ts, text, return_dict=False)[0]
            (out.float() - target).square().mean().backward()
        return fn

    rows, base = [], None
    lora = " + LoRA" if args.lora else ""
    candidates = [(f"diffusers Wan{' + peft LoRA' if args.lora else ''}", wan, None, "none", False)]
    candidates += [(f"stdit{lora} ({b})", ours, b, "none", False) for b in args.backends]
    # Selective checkpointing: the recompute skips each self-attention forward (its output is kept instead), and
    # with matmuls kept too, it runs only the elementwise ops.
    candidates += [(f"stdit{lora} ({b}, checkpoint keeps attention)", ours, b, "attention", False)
                   for b in args.backends]
    candidates += [(f"stdit{lora} ({b}, checkpoint keeps attention + matmuls)", ours, b, "matmuls", False)
                   for b in args.backends]
    # Compiled rows come last: compiling our blocks has no way back.
    compiled_rows = [(f"{name} + compile", model, backend, keep, True)
                     for name, model, backend, keep, _ in candidates] if args.compile else []

    def setup(model, backend, keep, compiled=False):
        if model is ours:  # compiled: by compile_blocks, once, before the compiled rows
            ours.set_attention_backend(backend)
            ours.enable_gradient_checkpointing(keep_attention=keep == "attention", keep_matmuls=keep == "matmuls")
        else:
            regional_compile(model, compiled)  # diffusers: each block compiled inside its (eager) checkpoint

    def time_row(row_name, model, backend, keep, compiled):
        nonlocal base
        setup(model, backend, keep, compiled)
        fn = step(model)
        try:
            fn()
            ms, clocked = bench_ms_clocked(fn, clock, warmup_ms=200, rep_ms=2000)
            mem = peak_memory_gib(fn)
        except Exception as e:
            rows.append({"impl": row_name, "error": f"{type(e).__name__}: {e}"[:200]})
            print(f"{row_name}: FAILED {e}")
            return None
        finally:
            for p_ in params:
                p_.grad = None
        base = base or tokens / ms * 1e3
        tps = tokens / ms * 1e3
        rows.append({"impl": row_name, "tokens": tokens, "step ms": ms, "tokens/s": tps, "vs diffusers": tps / base,
                     "TFLOP/s": flops / ms / 1e9, "MFU": (flops / ms / 1e9 / peak) if peak else None,
                     "peak GiB": mem, **clocked})
        print(rows[-1])
        return tps

    name = ("train-lora" if args.lora else "train") + ("" if args.config == "wan2.1-t2v-1.3b" else f"-{args.config}")
    best = None
    for row_name, model, backend, keep, _ in candidates:
        tps = time_row(row_name, model, backend, keep, False)
        if model is ours and tps is not None and (best is None or tps > best[0]):
            best = (tps, row_name, backend, keep)
    if best is not None and not args.no_profile:  # the fastest eager row, before any block of ours is compiled
        _, best_name, backend, keep = best
        setup(ours, backend, keep)
        profile(step(ours), RESULTS / f"{name}-profile-{gpu_slug(machine()['gpu'])}.txt",
                what=f"one training step, {best_name}", clock=clock)
        for p_ in params:
            p_.grad = None
    if compiled_rows:
        # As ``train.compile`` does: the blocks and the checkpointed calls, so that the selective checkpointing
        # policy applies inside the compiled region.
        ours.compile_blocks()
    for row in compiled_rows:
        time_row(*row)
    step_name = f"LoRA (rank {args.lora_rank}) training step" if args.lora else "Training step"
    counted = ("2x forward matmul + 3x attention FLOPs: the frozen base has no weight gradients" if args.lora
               else "3x forward matmul + attention FLOPs")
    md = write_results(
        name, f"{step_name} (fwd+bwd, activation checkpointing), {args.config}, {args.shape}, bf16", rows,
        ["impl", "tokens", "step ms", "tokens/s", "vs diffusers", "TFLOP/s", "MFU", "peak GiB", "SM MHz", "W", "error"],
        notes=f"MFU = model FLOPs ({counted}; recompute not counted) / step time / "
              f"{peak} TFLOP/s dense bf16 peak. `SM MHz` and `W`: the GPU's mean SM clock and board power in the "
              f"timed loop (NVML).")
    ok = [r for r in rows if "tokens/s" in r]
    bar_plot(md.parent / (md.stem + ".png"), [r["impl"] for r in ok], {"tokens/s": [r["tokens/s"] for r in ok]},
             "tokens/s (higher is better)", f"{args.config} training step, {machine()['gpu']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
