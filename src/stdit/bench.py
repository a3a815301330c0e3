"""``stdit bench NAME [args...]``: run ``benchmarks/bench_NAME.py`` (shipped with the package)."""

from __future__ import annotations

import argparse
import importlib.resources
import runpy
import sys
from pathlib import Path

# benchmarks/ ships as the package stdit.benchmarks (pyproject.toml), so this works from a wheel install too.
BENCH_DIR = Path(str(importlib.resources.files("stdit.benchmarks")))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="benchmark name, e.g. attention (runs benchmarks/bench_attention.py)")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the benchmark script")


def run(args: argparse.Namespace) -> int:
    script = BENCH_DIR / f"bench_{args.name}.py"
    if not script.is_file():
        known = sorted(p.stem.removeprefix("bench_") for p in BENCH_DIR.glob("bench_*.py"))
        print(f"stdit bench: no benchmark {args.name!r} in {BENCH_DIR}; available: {', '.join(known) or 'none'}",
              file=sys.stderr)
        return 2
    sys.argv = [str(script), *args.args]
    runpy.run_path(str(script), run_name="__main__")
    return 0
