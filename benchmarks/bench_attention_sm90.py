"""Ablation of the Hopper (Gluon) attention forward: each schedule option, kernel only, against the general Triton
kernel and cuDNN on the same inputs.

Times ``attention_sm90._launch`` per config (no host-side checks or tuning), so the rows compare the kernels'
schedules: stages, consumer warpgroups, ping-pong turns, persistent grid. Needs an sm_90 GPU.

    python benchmarks/bench_attention_sm90.py

Writes ``benchmarks/results/attention-sm90-configs-<gpu>.{md,json}``; the schedule table in ``benchmarks/DECISIONS.md``
was measured with the same loop.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_attention import SHAPES  # noqa: E402
from common import bench_ms, write_results  # noqa: E402

from stdit.kernels.attention_sm90 import Config  # noqa: E402
from stdit.kernels.config import override  # noqa: E402

# (BLOCK_N, STAGES, consumer warpgroups, ping-pong, persistent grid), as in attention_sm90._CONFIGS.
C = Config
ABLATION = {
    128: [C(128, 2, 2, True, True), C(128, 3, 2, True, True), C(128, 2, 2, False, True), C(128, 2, 2, True, False),
          C(128, 2, 3, True, True)],
    64: [C(128, 3, 3, True, True), C(128, 3, 2, True, True), C(128, 3, 3, False, True)],
}


def label(cfg: Config) -> str:
    return (f"N{cfg.block_n} st{cfg.stages} wg{cfg.warpgroups}" + (" pp" if cfg.pingpong else "")
            + (" persistent" if cfg.persistent else ""))


def tflops(ms: float, b: int, h: int, s: int, d: int) -> float:
    return 4 * b * h * s * s * d / ms / 1e9


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="*", help="only these shape names (as in bench_attention)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        print("bench_attention_sm90 needs an sm_90 GPU (H100/H200).", file=sys.stderr)
        return 2
    from stdit.kernels import attention as ka
    from stdit.kernels._compat import ensure_scratch_allocator

    if not ka._sm90.HAVE_GLUON:
        print("bench_attention_sm90 needs a Triton with Gluon's Hopper API.", file=sys.stderr)
        return 2
    ensure_scratch_allocator()
    rows = []
    for name, b, h, s, d in SHAPES:
        if d not in ABLATION or (args.shapes and name not in args.shapes):
            continue
        torch.manual_seed(0)
        q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            ref = F.scaled_dot_product_attention(qt, kt, vt).transpose(1, 2).float()
        rep = 1000 if s > 20000 else 500
        qk_scale = d ** -0.5 * ka._LOG2E
        for cfg in ABLATION[d]:
            o = torch.empty_like(q)
            lse = torch.empty(b, h, s, device="cuda")
            ms = bench_ms(lambda: ka._sm90._launch(cfg, q, k, v, o, lse, qk_scale), warmup_ms=100, rep_ms=rep)
            rows.append({"shape": name, "kernel": f"Gluon {label(cfg)}", "TFLOP/s": tflops(ms, b, h, s, d),
                         "max |diff| vs cuDNN": (o.float() - ref).abs().max().item()})
            print(rows[-1], flush=True)
        with override(sm90_forward=False):
            ms = bench_ms(lambda: ka.flash_attention(q, k, v), warmup_ms=100, rep_ms=rep)
        rows.append({"shape": name, "kernel": "general Triton kernel", "TFLOP/s": tflops(ms, b, h, s, d)})
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            ms = bench_ms(lambda: F.scaled_dot_product_attention(qt, kt, vt), warmup_ms=100, rep_ms=rep)
        rows.append({"shape": name, "kernel": "cuDNN SDPA", "TFLOP/s": tflops(ms, b, h, s, d)})
        print(rows[-2], rows[-1], flush=True)
    write_results("attention-sm90-configs", "Hopper attention forward: schedule ablation (kernel only, bf16)", rows,
                  ["shape", "kernel", "TFLOP/s", "max |diff| vs cuDNN"],
                  notes="`pp`: ping-pong turns between the consumer warpgroups; `persistent`: min(tiles, SMs) programs "
                        "(else one program per output tile); `wg`: consumer warpgroups of 64 query rows.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
