"""Attention benchmark: our Triton flash attention vs torch SDPA (each backend pinned), xformers and FlexAttention.

Same inputs for every implementation, one process. Forward and forward+backward TFLOP/s (4*B*H*S^2*D forward flops;
the backward counts 2.5x the forward), ``triton.testing.do_bench`` medians over rotating input sets, and the whole
"QK-norm + RoPE + attention" op (our fused kernels vs rmsnorm + rope in torch + the best SDPA backend).

    python benchmarks/bench_attention.py            # full run
    python benchmarks/bench_attention.py --quick    # two short shapes, no FlexAttention

Writes ``benchmarks/results/attention-<gpu>.{md,json,png}``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import re
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from stdit.attention import attention as stdit_attention
from stdit.ops import rms_norm
from stdit.kernels import flash_attention, qk_norm_rope
from stdit.kernels.config import CONFIG as KCONFIG
from stdit.rope import RotaryEmbedding3D, apply_rope

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when run through `stdit bench attention` (runpy)
from common import GpuClock  # noqa: E402

SHAPES = [  # name, B, H, S, D
    ("B1 H12 S32760 d128", 1, 12, 32760, 128),
    ("B1 H12 S75600 d128", 1, 12, 75600, 128),
    ("B1 H40 S32760 d128", 1, 40, 32760, 128),
    ("B1 H24 S16384 d64", 1, 24, 16384, 64),
    ("B2 H16 S4096 d72", 2, 16, 4096, 72),
    ("B1 H12 S4096 d128", 1, 12, 4096, 128),
    ("B4 H12 S1024 d128", 4, 12, 1024, 128),
]
QUICK = ["B1 H12 S4096 d128", "B2 H16 S4096 d72"]
SDPA_BACKENDS = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
                 "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION}


def sdpa_fn(backend):
    def fn(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    return fn


def dynamo_recompile_knob() -> str:
    """The name of Dynamo's per-function recompile limit in this torch (renamed from ``cache_size_limit``)."""
    import torch._dynamo

    return "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"


def implementations(flex: bool, tune: bool = False):
    impls = {"ours": lambda q, k, v: flash_attention(q, k, v)}
    if tune:
        impls["ours-ptr"] = impls["ours"]  # timed with tensor descriptors switched off
    impls.update({name: sdpa_fn(b) for name, b in SDPA_BACKENDS.items()})
    try:
        import xformers.ops as xops
        impls["xformers"] = lambda q, k, v: xops.memory_efficient_attention(q, k, v)
    except ImportError:
        pass
    if flex:
        try:
            import torch._dynamo
            from torch.nn.attention.flex_attention import flex_attention
            # One compiled graph per shape and grad mode: past Dynamo's recompile limit (8) it would fall back to
            # the unfused eager flex_attention, which materializes the S x S scores.
            setattr(torch._dynamo.config, dynamo_recompile_knob(), 64)
            compiled = torch.compile(flex_attention, dynamic=False)
            impls["flex"] = lambda q, k, v: compiled(q.transpose(1, 2), k.transpose(1, 2),
                                                     v.transpose(1, 2)).transpose(1, 2)
        except ImportError:
            pass
    return impls


def rotating(make, nbytes_one: int):
    """Enough input sets that consecutive calls do not find their inputs in L2."""
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
    n = max(1, min(4, math.ceil(2 * l2 / max(nbytes_one, 1))))
    sets = [make(i) for i in range(n)]
    it = itertools.cycle(range(n))
    return sets, it


def bench(fn, sets, it, backward: bool, clock=None) -> tuple[float, dict]:
    """Median milliseconds over rotating input sets, and the GPU's mean SM clock and power in the timed loop."""
    def run():
        args = sets[next(it)]
        if backward:
            out = fn(*args[:-1])
            out.backward(args[-1])
        else:
            with torch.no_grad():
                fn(*args[:-1])
    grads = [t for s in sets for t in s[:-1] if t.requires_grad] if backward else None
    run()
    torch.cuda.synchronize()
    rep_ms = 300
    ms = triton.testing.do_bench(run, warmup=50, rep=rep_ms, grad_to_none=grads, return_mode="median")
    return ms, clock.last(rep_ms / 1e3) if clock is not None else {}


def bench_graph(fn, args, backward: bool = False) -> float:
    """Milliseconds of the forward (or forward+backward, gradients of q, k, v for dO = ``args[3]``) replayed from a
    CUDA graph: the GPU time alone, without the host's launch cost."""
    if backward:
        q, k, v, do = args

        def step():
            torch.autograd.grad(fn(q, k, v), (q, k, v), do)
    else:
        def step():
            with torch.no_grad():
                fn(*args[:3])
    step()  # autotuning and compilation happen outside the capture
    torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(step, rep=100, return_mode="median")


def host_overhead(impls, dtype, calls: int = 200, rounds: int = 7) -> dict:
    """Microseconds of host time per call on a tiny input (the GPU work is negligible, so the host sets the pace).

    The implementations take turns, one round of ``calls`` calls each, and each reports its fastest and its median
    round: a shared host's speed drifts from second to second, and interleaving spreads that drift over all of them.
    ``ours (dispatch)`` is ours as the model calls it, through :func:`stdit.attention.attention`.
    """
    q, k, v, do = attention_inputs(1, 2, 256, 128, dtype, seed=0)
    fns = {n: f for n, f in impls.items() if n != "ours-ptr"}
    fns["ours (dispatch)"] = lambda q, k, v: stdit_attention(q, k, v, backend="triton")

    def one(fn, backward):
        if backward:
            fn(q, k, v).backward(do)
        else:
            with torch.no_grad():
                fn(q, k, v)

    times, res = {}, {}
    for r in range(rounds + 1):  # round 0 warms up
        for iname, fn in fns.items():
            if iname in res:
                continue
            try:
                for backward in (False, True):
                    torch.cuda.synchronize()
                    t = time.perf_counter()
                    for _ in range(calls if r else 20):
                        one(fn, backward)
                    torch.cuda.synchronize()
                    if r:
                        times.setdefault((iname, backward), []).append((time.perf_counter() - t) / calls * 1e6)
            except Exception as e:  # noqa: BLE001 - a backend may refuse the input; say why
                res[iname] = f"unavailable: {type(e).__name__}"
            for x in (q, k, v):
                x.grad = None
    for iname in fns:
        if iname not in res:
            f, fb = sorted(times[(iname, False)]), sorted(times[(iname, True)])
            res[iname] = {"fwd_us": f[0], "fwdbwd_us": fb[0], "fwd_us_median": f[len(f) // 2],
                          "fwdbwd_us_median": fb[len(fb) // 2], "rounds": rounds, "calls_per_round": calls}
        print(f"  host overhead {iname:15s} {res[iname]}", flush=True)
    return res


def attention_inputs(b, h, s, d, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v, do = (torch.randn(b, s, h, d, device="cuda", dtype=dtype, generator=g) for _ in range(4))
    return [q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), do]


def fused_op_inputs(b, h, s, d, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    qkv = torch.randn(b, s, 3 * h * d, device="cuda", dtype=dtype, generator=g).requires_grad_()
    return [qkv, torch.randn(b, s, h, d, device="cuda", dtype=dtype, generator=g)]


def time_fn_pair(fn, make, nbytes, clock=None):
    """(forward ms, forward+backward ms, {"fwd": clock and power, "fwdbwd": ...})."""
    sets, it = rotating(make, nbytes)
    (fwd, cf), (fb, cb) = bench(fn, sets, it, False, clock), bench(fn, sets, it, True, clock)
    return fwd, fb, {"fwd": cf, "fwdbwd": cb}


def run_shape(name, b, h, s, d, impls, dtype, args, clock=None):
    flops = 4 * b * h * s * s * d
    row = {"shape": name, "B": b, "H": h, "S": s, "D": d, "fwd_tflops": {}, "fwdbwd_tflops": {},
           "graph_fwd_tflops": {}, "graph_fwdbwd_tflops": {}, "ms": {}, "errors": {}, "clock": {}}
    nbytes = 4 * b * s * h * d * 2
    make = lambda i: attention_inputs(b, h, s, d, dtype, seed=i)  # noqa: E731
    check = attention_inputs(b, h, s, d, dtype, seed=123)
    with torch.no_grad():
        ref = impls["ours"](*check[:3]).float()
    for iname, fn in impls.items():
        KCONFIG.tma = iname != "ours-ptr"  # "ours-ptr": ours with tensor descriptors switched off
        try:
            with torch.no_grad():
                out = fn(*check[:3]).float()
            row["errors"][iname] = (out - ref).abs().max().item()
            fwd, fb, row["clock"][iname] = time_fn_pair(fn, make, nbytes, clock)
            row["ms"][iname] = {"fwd": fwd, "fwdbwd": fb}
            row["fwd_tflops"][iname] = flops / fwd / 1e9
            row["fwdbwd_tflops"][iname] = 3.5 * flops / fb / 1e9
            graph = ""
            if s <= args.graph_max_s:
                for key, backward, mult in (("fwd", False, 1.0), ("fwdbwd", True, 3.5)):
                    try:
                        gms = bench_graph(fn, check, backward)
                        row["ms"][iname][f"{key}_graph"] = gms
                        row[f"graph_{key}_tflops"][iname] = mult * flops / gms / 1e9
                        graph += f"   graph {key} {gms:9.3f} ms {row[f'graph_{key}_tflops'][iname]:7.1f} TF/s"
                    except Exception as e:  # noqa: BLE001 - capture can fail for a backend; the eager rows stand
                        graph += f"   graph {key} unavailable: {type(e).__name__}"
        except Exception as e:  # a backend may refuse a head dim or run out of memory; record why
            row["ms"][iname] = f"unavailable: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
            print(f"  {name:22s} {iname:15s} {row['ms'][iname]}", flush=True)
            torch.cuda.empty_cache()
            continue
        finally:
            KCONFIG.tma = True
        print(f"  {name:22s} {iname:15s} fwd {fwd:9.3f} ms {row['fwd_tflops'][iname]:7.1f} TF/s   "
              f"fwd+bwd {fb:9.3f} ms {row['fwdbwd_tflops'][iname]:7.1f} TF/s{graph}", flush=True)
        torch.cuda.empty_cache()
    return row


def run_fused_op(name, b, h, s, d, dtype, best_sdpa):
    """QK RMSNorm across heads + 3D RoPE + attention, from the fused qkv projection output to [B, S, H, D]."""
    t = max(1, s // 1560)
    hw = s // t
    grid = (t, hw, 1) if t * hw == s else (1, s, 1)
    cos, sin = RotaryEmbedding3D(d)(grid, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    wq = (1 + 0.1 * torch.randn(h * d, device="cuda", generator=g)).requires_grad_()
    wk = (1 + 0.1 * torch.randn(h * d, device="cuda", generator=g)).requires_grad_()
    backend = SDPA_BACKENDS[best_sdpa]

    def ours(qkv):
        q, k, v = qkv.split(h * d, dim=-1)
        q, k = qk_norm_rope(q, k, wq, wk, 1e-6, cos, sin, h)
        return flash_attention(q, k, v.unflatten(-1, (h, d)))

    def torch_way(qkv):
        q, k, v = qkv.split(h * d, dim=-1)
        q = apply_rope(rms_norm(q, wq, 1e-6).unflatten(-1, (h, d)), cos, sin)
        k = apply_rope(rms_norm(k, wk, 1e-6).unflatten(-1, (h, d)), cos, sin)
        return sdpa_fn(backend)(q, k, v.unflatten(-1, (h, d)))

    make = lambda i: fused_op_inputs(b, h, s, d, dtype, seed=i)  # noqa: E731
    res = {"shape": name, "torch_sdpa_backend": best_sdpa}
    check = fused_op_inputs(b, h, s, d, dtype, seed=7)
    with torch.no_grad():
        res["max_abs_diff"] = (ours(check[0]).float() - torch_way(check[0]).float()).abs().max().item()
    for label, fn in (("ours_fused", ours), ("torch_unfused", torch_way)):
        fwd, fb, _ = time_fn_pair(fn, make, 4 * b * s * h * d * 2)
        res[label] = {"fwd_ms": fwd, "fwdbwd_ms": fb}
        torch.cuda.empty_cache()
    print(f"  norm+rope+attn {name:22s} ours {res['ours_fused']['fwd_ms']:.3f}/{res['ours_fused']['fwdbwd_ms']:.3f} ms"
          f"  torch+{best_sdpa} {res['torch_unfused']['fwd_ms']:.3f}/{res['torch_unfused']['fwdbwd_ms']:.3f} ms",
          flush=True)
    return res


def print_autotune(verbose: bool):
    """The autotuner's pick per kernel and key; with ``verbose``, every timing of its last tuning run."""
    from stdit.kernels import attention as ka

    for label, (tuned, _) in (("fwd", ka._FWD), ("dkdv", ka._DKDV), ("dq", ka._DQ)):
        for key, best in tuned.cache.items():
            print(f"    autotune {label} key={key} best={best}")
        if verbose:
            for cfg, ms in sorted((getattr(tuned, "configs_timings", None) or {}).items(), key=lambda kv: kv[1]):
                print(f"      {label} {cfg}: {ms}")


def versions():
    return {**GpuClock().info, "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
            "triton": triton.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "python": platform.python_version(),
            "switches": {k: os.environ[k] for k in ("STDIT_AUTOTUNE",)
                         if k in os.environ}}


def write_results(rows, fused, info, out_dir: Path, host=None):
    slug = re.sub(r"[^a-z0-9]+", "-", info["gpu"].lower()).strip("-")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"attention-{slug}.json").write_text(json.dumps({"versions": info, "attention": rows,
                                                                "norm_rope_attention": fused,
                                                                "host_overhead_us": host}, indent=2))
    names = sorted({n for r in rows for n in r["fwd_tflops"]}, key=lambda n: (n != "ours", n))
    lines = [f"# Attention benchmark — {info['gpu']}", "",
             f"torch {info['torch']}, triton {info['triton']}, CUDA {info['cuda']}, cuDNN {info['cudnn']}; bf16, "
             "non-causal; TFLOP/s with forward = 4·B·H·S²·D flops and forward+backward = 3.5× that; "
             "`triton.testing.do_bench` medians.", ""]
    if info.get("merged_from_earlier_run"):
        lines += ["Rows from an earlier run on this GPU (`--merge`): " + ", ".join(info["merged_from_earlier_run"])
                  + "; the other rows and the peers beside them come from this run.", ""]
    for key, title in (("fwd_tflops", "Forward TFLOP/s"), ("fwdbwd_tflops", "Forward + backward TFLOP/s"),
                       ("graph_fwd_tflops", "Forward TFLOP/s replayed from a CUDA graph (GPU time only, no host "
                                            "launch cost)"),
                       ("graph_fwdbwd_tflops", "Forward + backward TFLOP/s replayed from a CUDA graph (GPU time "
                                               "only)")):
        if not any(r.get(key) for r in rows):
            continue
        lines += [f"## {title}", "", "| shape | " + " | ".join(names) + " | ours / best SDPA |",
                  "|---" * (len(names) + 2) + "|"]
        for r in rows:
            if not r.get(key):
                continue
            vals = r[key]
            sd = [vals[n] for n in SDPA_BACKENDS if n in vals]
            ratio = f"{vals['ours'] / max(sd):.2f}×" if sd and "ours" in vals else "—"
            lines.append(f"| {r['shape']} | " + " | ".join(f"{vals[n]:.0f}" if n in vals else "—" for n in names)
                         + f" | {ratio} |")
        lines.append("")
    clocked = [r for r in rows if any(c.get(k) for c in r.get("clock", {}).values() for k in ("fwd", "fwdbwd"))]
    if clocked:
        lines += ["## Mean SM clock in the timed loops (MHz, forward / forward+backward)", "",
                  "Sampled through NVML. A long dense loop holds the GPU at its board power limit"
                  + (f" ({info['power limit W']:g} W)" if "power limit W" in info else "")
                  + ", and the driver lowers the clock to stay under it"
                  + (f" (max {info['max SM MHz']:g} MHz)" if "max SM MHz" in info else "") + ".", "",
                  "| shape | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for r in clocked:
            cells = []
            for n in names:
                c = r["clock"].get(n, {})
                cells.append(" / ".join(f"{c[k]['SM MHz']:.0f}" if c.get(k) else "—" for k in ("fwd", "fwdbwd")))
            lines.append(f"| {r['shape']} | " + " | ".join(cells) + " |")
        lines.append("")
    if fused:
        lines += ["## QK-norm + RoPE + attention (ms, forward / forward+backward)", "",
                  "| shape | ours (fused norm+rope kernel + flash) | torch norm + rope + best SDPA | speedup fwd | "
                  "speedup fwd+bwd |", "|---|---|---|---|---|"]
        for f in fused:
            o, t = f["ours_fused"], f["torch_unfused"]
            lines.append(f"| {f['shape']} | {o['fwd_ms']:.2f} / {o['fwdbwd_ms']:.2f} | {t['fwd_ms']:.2f} / "
                         f"{t['fwdbwd_ms']:.2f} ({f['torch_sdpa_backend']}) | {t['fwd_ms'] / o['fwd_ms']:.2f}× | "
                         f"{t['fwdbwd_ms'] / o['fwdbwd_ms']:.2f}× |")
        lines.append("")
    if host:
        lines += ["## Host time per call (µs, tiny input B1 H2 S256 d128: the host sets the pace)", "",
                  "Fastest / median of interleaved rounds (see `host_overhead`); `ours (dispatch)` is the model's path "
                  "(`stdit.attention.attention`, backend `triton`).", "",
                  "| implementation | forward | forward + backward |", "|---|---|---|"]
        for n, v in host.items():
            if not isinstance(v, dict):
                lines.append(f"| {n} | {v} | |")
            elif "fwd_us_median" in v:
                lines.append(f"| {n} | {v['fwd_us']:.0f} / {v['fwd_us_median']:.0f} | {v['fwdbwd_us']:.0f} / "
                             f"{v['fwdbwd_us_median']:.0f} |")
            else:  # rows of an earlier run: one round
                lines.append(f"| {n} | {v['fwd_us']:.0f} | {v['fwdbwd_us']:.0f} |")
        lines.append("")
    (out_dir / f"attention-{slug}.md").write_text("\n".join(lines))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(1, 2, figsize=(14, 5))
        width = 0.8 / max(len(names), 1)
        for ax, (key, title) in zip(axes, (("fwd_tflops", "forward"), ("fwdbwd_tflops", "forward + backward"))):
            for i, n in enumerate(names):
                ax.bar([j + i * width for j in range(len(rows))], [r[key].get(n, 0) for r in rows], width, label=n)
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))])
            ax.set_xticklabels([r["shape"] for r in rows], rotation=30, ha="right", fontsize=8)
            ax.set_ylabel("TFLOP/s")
            ax.set_title(f"{title} — {info['gpu']}")
        axes[0].legend(fontsize=8)
        fig.suptitle(f"torch {info['torch']}, triton {info['triton']}, CUDA {info['cuda']}", fontsize=9)
        fig.tight_layout()
        fig.savefig(out_dir / f"attention-{slug}.png", dpi=110)
    except ImportError:
        print("matplotlib missing: no plot written")
    return out_dir / f"attention-{slug}.md"


def merge_earlier(rows, fused, old):
    """This run's rows plus an earlier results JSON's rows for the shapes not run now, in the table's shape order;
    returns (rows, fused-op rows, the shapes taken from the earlier run)."""
    done = {r["shape"] for r in rows}
    order = [sh[0] for sh in SHAPES]
    rows = sorted(rows + [r for r in old["attention"] if r["shape"] not in done], key=lambda r: order.index(r["shape"]))
    fused = sorted(fused + [f for f in old.get("norm_rope_attention", []) if f["shape"] not in done],
                   key=lambda f: order.index(f["shape"]))
    return rows, fused, sorted({r["shape"] for r in rows} - done)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="two short shapes, no FlexAttention")
    p.add_argument("--no-flex", action="store_true", help="skip FlexAttention (its compile takes a while)")
    p.add_argument("--shapes", nargs="*", help="only these shape names (as in the table)")
    p.add_argument("--tune", action="store_true", help="also time pointer loads and print every autotune timing")
    p.add_argument("--no-fused", action="store_true", help="skip the norm + rope + attention comparison")
    p.add_argument("--graph-max-s", type=int, default=16384,
                   help="also time the forward and forward+backward from CUDA graphs for sequences up to this length")
    p.add_argument("--merge", type=Path, help="a results JSON of an earlier run on this GPU: keep its rows for the "
                                              "shapes not run now")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_attention needs a CUDA GPU")
    info = versions()
    print(json.dumps(info), flush=True)
    shapes = [s for s in SHAPES if (not args.quick or s[0] in QUICK) and (not args.shapes or s[0] in args.shapes)]
    impls = implementations(flex=not (args.quick or args.no_flex), tune=args.tune)
    dtype = torch.bfloat16
    rows, fused = [], []
    # Read before the first shape's results overwrite it (the merge source is usually the default output file).
    old = json.loads(args.merge.read_text()) if args.merge and args.merge.exists() else None
    t0 = time.time()
    host = host_overhead(impls, dtype)  # before the clock's sampling thread starts: it would take host time
    with GpuClock() as clock:
        for name, b, h, s, d in shapes:
            rows.append(run_shape(name, b, h, s, d, impls, dtype, args, clock))
            sd = {n: v for n, v in rows[-1]["fwdbwd_tflops"].items() if n in SDPA_BACKENDS}
            print_autotune(verbose=args.tune)
            if sd and not args.no_fused:
                fused.append(run_fused_op(name, b, h, s, d, dtype, max(sd, key=sd.get)))
            # After every shape, so a run cut short still leaves its finished rows.
            path = write_results(rows, fused, info, args.out, host)
    if old is not None:
        rows, fused, info["merged_from_earlier_run"] = merge_earlier(rows, fused, old)
        path = write_results(rows, fused, info, args.out, host)
    print(f"\nwrote {path} ({time.time() - t0:.0f} s)\n")
    print(path.read_text())


if __name__ == "__main__":
    main()
