"""Fused adaLN chain vs the unfused torch path (and torch.compile of it), forward and forward+backward.

The Wan block's elementwise chain outside attention and FFN, at B=1 S=32760, D=1536 (Wan 1.3B) and 5120 (14B),
bf16. Each row is timed with ``do_bench`` (median); every activation is >= 100 MB, far past L2, so inputs are
not rotated. "floor" is the fewest bytes each op must move (each activation read or written once, as the
fused kernels do) over the measured copy bandwidth of this GPU.

    python benchmarks/bench_norm.py [--seq 32760] [--dims 1536 5120] [--no-compile] [--no-sweep]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench_ms, machine, markdown_table, write_results  # noqa: E402

from stdit.kernels import adaln  # noqa: E402
from stdit.ops import add_norm_modulate_torch, norm_modulate_torch  # noqa: E402

# op -> (residual, gate, modulation, affine, norm, fwd passes, bwd passes): a pass is one activation read or
# written once (bwd: dout, dh, h, y read; dx, dy written; none where dx = dh or dy = dx).
OPS = {
    "msa_in": (False, False, True, False, True, 2, 3),
    "norm2": (True, True, False, True, True, 4, 6),
    "cross_out": (True, False, True, False, True, 4, 4),
    "ffn_out": (True, True, True, False, True, 4, 6),
    "residual": (True, True, False, False, False, 3, 3),
}
CHAIN = ("msa_in", "norm2", "cross_out", "ffn_out")


def call(op, impl, x, y, v):
    residual, gate, mod, affine, norm = OPS[op][:5]
    kw = dict(shift=v["shift"] if mod else None, scale=v["scale"] if mod else None,
              weight=v["w"] if affine else None, bias=v["b"] if affine else None, eps=1e-6)
    if not residual:
        fn = adaln.fused_norm_modulate if impl == "fused" else norm_modulate_torch
        return x, fn(x, **kw)
    fn = adaln.fused_add_norm_modulate if impl == "fused" else add_norm_modulate_torch
    return fn(x, y, v["gate"] if gate else None, norm=norm, **kw)


def chain(impl, x, ys, v):
    """The block's four calls; returns every tensor that leaves the chain (normed inputs of attention/FFN, x)."""
    outs = []
    for op, y in zip(CHAIN, (None, *ys)):
        x, n = call(op, impl, x, y, v)
        outs.append(n)
    return (*outs, x)


def inputs(S, D, grad, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *s, dt=torch.bfloat16, k=1.0: (torch.randn(*s, generator=g, device="cuda") * k).to(dt)  # noqa: E731
    x = r(1, S, D, k=2.0)
    ys = [r(1, S, D) for _ in range(3)]
    v = {k: r(1, 1, D, dt=torch.float32, k=0.5) for k in ("shift", "scale", "gate")}
    v["w"], v["b"] = 1 + r(D, dt=torch.float32, k=0.1), r(D, dt=torch.float32, k=0.1)
    if grad:
        for t in (x, *ys, *v.values()):
            t.requires_grad_(True)
    return x, ys, v


def fwd_bwd(fn, leaves):
    """A closure running ``fn`` and the grads of ``leaves`` for fixed upstream grads (made on first call)."""
    ups = []

    def run():
        outs = [o for o in fn() if o is not None and o.requires_grad]
        if not ups:
            ups.extend(torch.randn_like(o) for o in outs)
        torch.autograd.grad(outs, leaves, ups, allow_unused=True)

    return run


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second (GB/s)."""
    src = torch.empty(2**29, device="cuda", dtype=torch.bfloat16).normal_()
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * 2 / ms / 1e6


def sweep(S, D, rows):
    """Launch shapes of the ffn_out call, forward and backward (whole-row vs split), for tuning."""
    x, ys, v = inputs(S, D, grad=False)
    gate32, shift32, scale32, _, _ = adaln.prepare(x, v["gate"], v["shift"], v["scale"], None, None)
    h, out, mean, rstd = adaln.adaln_fwd(x, ys[0], gate32, shift32, scale32, None, None, 1e-6, True)
    dout, dhx = torch.randn_like(out), torch.randn_like(out)
    nbytes = x.numel() * x.element_size()
    for tile, warps in [(2048, 4), (2048, 8), (4096, 8), (4096, 16), (8192, 16), (8192, 32), (16384, 32)]:
        if tile < triton.next_power_of_2(D):
            continue
        ms = bench_ms(lambda: adaln.adaln_fwd(x, ys[0], gate32, shift32, scale32, None, None, 1e-6, True,
                                              num_warps=warps, tile=tile))
        rows.append(dict(D=D, kernel="fwd", tile=tile, warps=warps, ms=ms, GBps=4 * nbytes / ms / 1e6))
        for split in (False, True):
            ms = bench_ms(lambda: adaln.adaln_bwd(dout, dhx, h, ys[0], gate32, scale32, None, None, mean, rstd,
                                                  ["gate", "shift", "scale"], num_warps=warps, tile=tile,
                                                  split=split))
            rows.append(dict(D=D, kernel="bwd split" if split else "bwd whole-row", tile=tile, warps=warps,
                             ms=ms, GBps=6 * nbytes / ms / 1e6))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, default=32760)
    p.add_argument("--dims", type=int, nargs="+", default=[1536, 5120])
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile of the torch chain")
    p.add_argument("--no-sweep", action="store_true", help="skip the launch-shape sweep")
    args = p.parse_args()
    info = machine()
    bw = copy_bandwidth()
    print(f"{info['gpu']}: measured copy bandwidth {bw:,.0f} GB/s", flush=True)
    rows, tune, failures = [], [], []

    def measure(D, mode, op, impl):
        S, grad = args.seq, mode == "fwd+bwd"
        nbytes = S * D * 2
        x, ys, v = inputs(S, D, grad)
        leaves = [x, *ys, *v.values()]
        passes = (sum(OPS[o][5] + (OPS[o][6] if grad else 0) for o in CHAIN) if op == "chain"
                  else OPS[op][5] + (OPS[op][6] if grad else 0))
        if op != "chain":
            fn = lambda: call(op, impl, x, ys[0], v)  # noqa: E731
        elif impl == "compile":
            fn = torch.compile(lambda: chain("torch", x, ys, v), dynamic=False)
        else:
            fn = lambda: chain(impl, x, ys, v)  # noqa: E731
        run = fwd_bwd(fn, leaves) if grad else torch.no_grad()(fn)
        t0 = time.perf_counter()
        run()
        torch.cuda.synchronize()
        first_s = time.perf_counter() - t0
        ms = bench_ms(run)
        floor_ms = passes * nbytes / bw / 1e6
        rows.append(dict(D=D, mode=mode, op=op, impl=impl, ms=ms, GBps=passes * nbytes / ms / 1e6,
                         floor_ms=floor_ms, of_floor=floor_ms / ms, first_call_s=first_s))
        print(f"D={D} {mode:8s} {op:10s} {impl:8s} {ms:8.3f} ms  {rows[-1]['GBps']:7,.0f} GB/s  "
              f"({100 * floor_ms / ms:.0f}% of floor; first call {first_s:.1f} s)", flush=True)
        del x, ys, v, leaves, fn, run
        torch._dynamo.reset()
        torch.cuda.empty_cache()

    def write():
        for r in rows:
            base = next(b for b in rows if b["D"] == r["D"] and b["mode"] == r["mode"] and b["op"] == r["op"]
                        and b["impl"] == "torch")
            r["speedup_vs_torch"] = base["ms"] / r["ms"]
        notes = (f"B=1, S={args.seq}, bf16 activations, fp32 modulation vectors. Measured copy bandwidth "
                 f"{bw:,.0f} GB/s (read + write). GB/s counts the fewest bytes the op must move, so the unfused "
                 "rows are charged the fused byte count (their real traffic is higher). ops: msa_in = "
                 "norm_modulate(x, shift, scale); norm2 = x + gate*y, affine LN; cross_out = x + y, LN, modulate; "
                 "ffn_out = x + gate*y, LN, modulate; residual = x + gate*y only; chain = the first four in a "
                 "row. compile = torch.compile of the torch chain (first_call_s includes compiling).")
        if failures:
            notes += "\n\nFailed: " + "; ".join(failures)
        if tune:
            notes += "\n\nLaunch-shape sweep (ffn_out; tile = elements per tile):\n\n" + markdown_table(
                tune, ["D", "kernel", "tile", "warps", "ms", "GBps"])
        write_results("norm", "Fused adaLN chain (stdit.kernels.adaln) vs torch", rows,
                      ["D", "mode", "op", "impl", "ms", "GBps", "floor_ms", "of_floor", "speedup_vs_torch"],
                      notes=notes, extra={"copy_GBps": bw, "sweep": tune, "seq": args.seq})

    for D in args.dims:
        for mode in ("fwd", "fwd+bwd"):
            for op in (*OPS, "chain"):
                for impl in ("torch", "fused"):
                    measure(D, mode, op, impl)
        if not args.no_sweep:
            sweep(args.seq, D, tune)
            torch.cuda.empty_cache()
    write()
    if not args.no_compile:
        # Last, so a slow compile cannot cost the rows above.
        for D in args.dims:
            for mode in ("fwd", "fwd+bwd"):
                try:
                    measure(D, mode, "chain", "compile")
                except Exception as e:  # a compiler failure is a result to report, not a reason to stop
                    failures.append(f"torch.compile chain D={D} {mode}: {type(e).__name__}: {str(e)[:200]}")
                    print(failures[-1], flush=True)
                    torch._dynamo.reset()
                    torch.cuda.empty_cache()
        write()


if __name__ == "__main__":
    main()
