"""Build the Hopper (Gluon) attention kernels for sm_90 without a GPU and report what ptxas says about them.

    python -m stdit.kernels.sm90_report           # a table: registers, spills, shared memory, wgmma count
    python -m stdit.kernels.sm90_report --json    # the same as JSON (what tests/test_sm90_compile.py reads)

Every forward config of :data:`.attention_sm90._CONFIGS` (O stored with TMA and without) and every backward
variant (head dim x one program per key block / split query range) is compiled with the same compile-time
arguments the host code launches with, through Triton's own compiler (``GluonASTSource``, target ``cuda:90``) and
its bundled ptxas. Two things to look for after a kernel change: spill stores, and ptxas' note that it serialized
the ``wgmma`` products (out of registers), which takes away the overlap the kernels are built on. Needs
``TRITON_INTERPRET`` unset (the interpreter replaces the language functions the compiler needs).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile


def _ptxas_report(ptx: str) -> str | None:
    from ._compat import bundled_ptxas

    for exe in bundled_ptxas():  # the newest bundled ptxas that reads this PTX version
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
            f.write(ptx)
        try:
            out = subprocess.run([exe, "-arch=sm_90a", "-v", f.name, "-o", os.devnull], capture_output=True,
                                 text=True, timeout=300)
        finally:
            os.unlink(f.name)
        if out.returncode == 0:
            return out.stdout + out.stderr
    return None


def build(fn, constexprs: dict, pointers: dict) -> dict:
    """Compile ``fn`` for sm_90 with these compile-time arguments (pointers: name -> Triton pointer type, assumed
    16-byte aligned; other arguments i32, the scales fp32) and summarize the result."""
    from ._compat import gluon_compile, jit_params
    from ._launch import DEFAULT_OPTIONS

    names = [name for name, _, _ in jit_params(fn)]
    sig = {}
    for name in names:
        if name in constexprs:
            sig[name] = "constexpr"
        else:
            sig[name] = pointers.get(name, "fp32" if name in ("qk_scale", "sm_scale") else "i32")
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in pointers}
    compiled = gluon_compile(fn, sig, constexprs, attrs, 90, dict(DEFAULT_OPTIONS, num_warps=4))
    ptx = compiled.asm["ptx"]
    report = _ptxas_report(ptx)
    spills = [int(x) for x in re.findall(r"(\d+) bytes spill stores", report or "")]
    return {"wgmma": ptx.count("wgmma.mma_async"), "bulk_reduce": "cp.reduce.async.bulk.tensor" in ptx,
            "shared_bytes": compiled.metadata.shared, "ptxas": report is not None,
            "spill_bytes": max(spills) if spills else None, "serialized": "serialized" in (report or "")}


def variants():
    """(name, kernel, constexprs, pointers) for everything the host code can launch."""
    from . import attention_sm90 as fwd
    from . import attention_sm90_bwd as bwd

    t = "*bf16"
    seen = set()
    for d, cfgs in sorted(fwd._CONFIGS.items()):
        # O stored through TMA staging tiles, and from registers (an O that is no row view, fewer than 64 queries)
        for cfg, o_row_view in ((c, r) for c in cfgs for r in (True, False)):
            cx = fwd.constexprs(cfg, d, o_row_view)
            key = tuple(sorted(cx.items()))
            if key in seen:  # configs that differ only in the grid compile to one kernel
                continue
            seen.add(key)
            name = (f"fwd d{d} BLOCK_N={cfg.block_n} STAGES={cfg.stages} NW={cfg.warpgroups} PINGPONG={cfg.pingpong} "
                    f"O_TMA={cx['O_TMA']}")
            ptrs = dict(Q=t, K=t, V=t, O=t, LSE="*fp32", WS="*fp32")
            yield name, fwd._attn_fwd_sm90, cx, ptrs
            if cfg.persistent and d in fwd.SPLIT_HEAD_DIMS:  # persistent: a split launch's two parts
                for part in (1, 2):
                    yield f"{name} PART={part}", fwd._attn_fwd_sm90, fwd.constexprs(cfg, d, o_row_view, part), ptrs
    for d in bwd.HEAD_DIMS:
        for split, tma_grads in ((False, False), (False, True), (True, False)):
            g = "*fp32" if split else t
            yield (f"bwd d{d} STAGES={bwd.default_stages(d)} SPLIT={split} TMA_GRADS={tma_grads}",
                   bwd._attn_bwd_sm90, bwd.constexprs(d, bwd.default_stages(d), split, tma_grads),
                   dict(Q=t, K=t, V=t, DO=t, DQA="*fp32", DK=g, DV=g, LSE="*fp32", DELTA="*fp32"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        p.error("unset TRITON_INTERPRET: the interpreter cannot compile for a GPU")
    from ._compat import HAVE_GLUON

    if not HAVE_GLUON:
        p.error("this Triton has no Gluon Hopper API")
    results = {}
    for name, fn, cx, ptrs in variants():
        results[name] = build(fn, cx, ptrs)
        if not args.json:
            r = results[name]
            print(f"{name:60s} wgmma {r['wgmma']:4d}  spill {r['spill_bytes']!s:>5} B  "
                  f"{'SERIALIZED' if r['serialized'] else 'async':10s}  shared {r['shared_bytes']:7d} B", flush=True)
    if args.json:
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
