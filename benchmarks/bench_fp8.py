"""8-bit attention: our INT8-QK / FP8-PV forward (and its FP8-QK variant) against our bf16 kernel, cuDNN SDPA and
SageAttention (where its package is installed), same inputs, one process.

Speed: forward TOPS (4·B·H·S²·D operations) with the quantization pass included, and of the attention kernel alone
(inputs quantized once beforehand). Accuracy against an fp64 reference on the first queries of each shape, for two
input kinds: N(0, 1) q, k, v, and the same with a large per-channel offset in K (the outliers video DiTs have):
cosine similarity and relative L2 of the outputs.

Quantization, at the first shape: QK RMSNorm + RoPE then the 8-bit quantization (the norm + RoPE kernel writes bf16
Q and K, ``quantize`` reads them back after a pass over K for its mean) against the kernel that does all three in one
pass (``qk_norm_rope_quantized``), alone and followed by the attention (norm + RoPE + attention end to end).

    python benchmarks/bench_fp8.py              # Wan's 480p and 720p shapes, d=64
    python benchmarks/bench_fp8.py --quick      # one short shape

Writes ``benchmarks/results/fp8-attention-<gpu>.{md,json,png}``.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from stdit.kernels import flash_attention, qk_norm_rope
from stdit.kernels.attention_fp8 import Quantized, attention_fp8, attention_quantized, quantize, quantize_v
from stdit.kernels.qk_norm_rope_quant import qk_norm_rope_attention_fp8, qk_norm_rope_quantized
from stdit.kernels.qk_norm_rope_ref import norm_rope_ref

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when run through `stdit bench fp8` (runpy)
from common import RESULTS, bar_plot, bench_ms_clocked, gpu_slug, run_on_gpu, write_results  # noqa: E402

SHAPES = [("B1 H12 S32760 d128", 1, 12, 32760, 128), ("B1 H24 S16384 d64", 1, 24, 16384, 64),
          ("B1 H12 S75600 d128", 1, 12, 75600, 128)]
QUICK = [("B1 H12 S4096 d128", 1, 12, 4096, 128)]
REF_QUERIES = 512  # exact reference rows per shape (fp64 over all keys)
K_OFFSET = 8.0  # std of the per-channel offset added to K for the outlier input kind


def implementations():
    def cudnn(q, k, v):
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

    impls = {"stdit int8-qk fp8-pv": lambda q, k, v: attention_fp8(q, k, v, qk_format="int8"),
             "stdit fp8-qk fp8-pv": lambda q, k, v: attention_fp8(q, k, v, qk_format="fp8"),
             "stdit bf16": flash_attention, "sdpa-cudnn bf16": cudnn}
    try:
        from sageattention import sageattn

        impls["sageattention"] = lambda q, k, v: sageattn(q, k, v, tensor_layout="NHD", is_causal=False)
    except ImportError:
        pass
    return impls


def inputs(b, h, s, d, kind, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (torch.randn(b, s, h, d, device="cuda", generator=g) for _ in range(3))
    if kind == "k-outliers":
        k = k + K_OFFSET * torch.randn(1, 1, h, d, device="cuda", generator=g)
    return [t.to(torch.bfloat16) for t in (q, k, v)]


def reference(q, k, v, n):
    """fp64 attention of the first ``n`` queries over every key, [B, n, H, D]."""
    q64, k64, v64 = (t.double() for t in (q[:, :n], k, v))
    s = torch.einsum("bqhd,bkhd->bhqk", q64, k64) / math.sqrt(q.shape[-1])
    return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, dim=-1), v64)


def accuracy(out, ref):
    a, r = out[:, :ref.shape[1]].double().flatten(), ref.flatten()
    return F.cosine_similarity(a, r, dim=0).item(), ((a - r).norm() / r.norm()).item()


def quantization_rows(name, b, h, s, d, clock):
    """INT8 Q/K: norm + RoPE then quantize, against the fused kernel; the inputs are the projections ``[B, S, H*D]``
    before the norm (the two kinds of :func:`inputs`), the accuracy against fp64 attention of the exact norm + RoPE."""
    g = torch.Generator(device="cuda").manual_seed(3)
    wq, wk = (1 + 0.1 * torch.randn(2, h * d, device="cuda", generator=g)).to(torch.bfloat16).unbind(0)
    angles = torch.rand(s, d // 2, device="cuda", generator=g) * 20
    cos, sin, eps = angles.cos(), angles.sin(), 1e-6

    def unfused_quant(q, k, v):
        return quantize(*qk_norm_rope(q, k, wq, wk, eps, cos, sin, h), v.unflatten(-1, (h, -1)))

    def fused_quant(q, k, v):
        return Quantized(*qk_norm_rope_quantized(q, k, wq, wk, eps, cos, sin, h), *quantize_v(v.unflatten(-1, (h, -1))))

    def unfused_attn(q, k, v):
        return attention_fp8(*qk_norm_rope(q, k, wq, wk, eps, cos, sin, h), v.unflatten(-1, (h, -1)))

    def fused_attn(q, k, v):
        return qk_norm_rope_attention_fp8(q, k, v, wq, wk, eps, cos, sin, h)

    rows = []
    for iname, quant, attn in (("int8: norm+rope, then quantize", unfused_quant, unfused_attn),
                               ("int8: fused norm+rope+quantize", fused_quant, fused_attn)):
        row = {"shape": name, "impl": iname}
        try:
            with torch.no_grad():
                for kind in ("random", "k-outliers"):
                    q, k, v = (t.flatten(2) for t in inputs(b, h, s, d, kind, seed=7))
                    qn, kn = (norm_rope_ref(x, w, eps, cos, sin, h) for x, w in ((q, wq), (k, wk)))
                    ref = reference(qn, kn, v.unflatten(-1, (h, -1)), REF_QUERIES)
                    row[f"cos {kind}"], row[f"rel L2 {kind}"] = accuracy(attn(q, k, v), ref)
                    del qn, kn, ref
                q, k, v = (t.flatten(2) for t in inputs(b, h, s, d, "random", seed=1))
                row["quant ms"], _ = bench_ms_clocked(lambda: quant(q, k, v), clock)
                row["norm+rope+attn ms"], row["clock"] = bench_ms_clocked(lambda: attn(q, k, v), clock)
        except Exception as e:  # noqa: BLE001 - say why, keep the other rows
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if k != "clock"}, flush=True)
        rows.append(row)
        torch.cuda.empty_cache()
    return rows


def run(args, clock):
    shapes = QUICK if args.quick else SHAPES
    impls = implementations()
    rows = []
    for name, b, h, s, d in shapes:
        ops = 4 * b * h * s * s * d
        for iname, fn in impls.items():
            row = {"shape": name, "impl": iname}
            try:
                with torch.no_grad():
                    for kind in ("random", "k-outliers"):
                        q, k, v = inputs(b, h, s, d, kind, seed=7)
                        cos, rel = accuracy(fn(q, k, v), reference(q, k, v, REF_QUERIES))
                        row[f"cos {kind}"], row[f"rel L2 {kind}"] = cos, rel
                    q, k, v = inputs(b, h, s, d, "random", seed=1)
                    ms, row["clock"] = bench_ms_clocked(lambda: fn(q, k, v), clock)
                    row["ms"], row["TOPS"] = ms, ops / ms / 1e9
                    if iname.startswith("stdit") and "pv" in iname:
                        qz = quantize(q, k, v, qk_format=iname.split()[1].split("-")[0])
                        o = torch.empty_like(q)
                        kms, _ = bench_ms_clocked(lambda: attention_quantized(qz, o, h), clock)
                        row["kernel ms"], row["kernel TOPS"] = kms, ops / kms / 1e9
                        del qz, o
            except Exception as e:  # noqa: BLE001 - a peer may refuse a shape or run out of memory; say why
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if k != "clock"},
                  flush=True)
            rows.append(row)
            torch.cuda.empty_cache()
        if name == shapes[0][0]:
            rows += quantization_rows(name, b, h, s, d, clock)
    cols = ["shape", "impl", "TOPS", "ms", "kernel TOPS", "kernel ms", "quant ms", "norm+rope+attn ms", "cos random",
            "rel L2 random", "cos k-outliers", "rel L2 k-outliers", "error"]
    notes = (f"Forward only, bf16 inputs [B, S, H, D], non-causal, no mask. `TOPS` = 4·B·H·S²·D / time, the "
             f"quantization included for the 8-bit rows; `kernel` = the attention kernel on inputs quantized "
             f"beforehand. Accuracy: the first {REF_QUERIES} queries against fp64 attention over all keys; "
             f"`k-outliers` adds a per-channel offset of std {K_OFFSET} to K. `quant ms`: QK RMSNorm + RoPE and the "
             f"8-bit quantization of Q, K, V (unfused: the norm + RoPE kernel, then `quantize`; fused: "
             f"`qk_norm_rope_quantized` + `quantize_v`); `norm+rope+attn ms`: the same followed by the attention; "
             f"for these rows the inputs are the projections before the norm. Median of `triton.testing.do_bench`.")
    path = write_results("fp8-attention", "8-bit attention forward", rows, cols, notes)
    labels = [n for n, *_ in shapes]
    series = {i: [next((r.get("TOPS", 0.0) for r in rows if r["shape"] == n and r["impl"] == i), 0.0)
                  for n in labels] for i in impls}
    bar_plot(RESULTS / f"fp8-attention-{gpu_slug(torch.cuda.get_device_name())}.png", labels, series, "TOPS",
             "attention forward (quantization included)")
    print(f"wrote {path}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one short shape")
    return run_on_gpu("bench_fp8.py", run, p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
