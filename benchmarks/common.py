"""Shared benchmark plumbing: machine description, timing, and writing results (markdown, JSON, PNG)."""

from __future__ import annotations

import ctypes
import json
import platform
import re
import sys
import textwrap
import threading
import time
from pathlib import Path

import torch

# In a checkout, results go beside the scripts (they are committed there); run from an installed package (the
# scripts ship as stdit.benchmarks), under the working directory instead of inside site-packages.
_HERE = Path(__file__).resolve().parent
RESULTS = _HERE / "results" if (_HERE / "results").is_dir() else Path.cwd() / "benchmarks-results"


def machine() -> dict:
    """GPU, driver-side CUDA, torch and triton versions, for every result file."""
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    try:
        import diffusers

        info["diffusers"] = diffusers.__version__
    except ImportError:
        info["diffusers"] = None
    info["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    if torch.cuda.is_available():
        info.update(GpuClock().info)  # power limit and max SM clock, where NVML answers
    return info


def gpu_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100'."""
    m = re.search(r"(H100|H200|H20|A100|L40S|L4|B200|GB200|RTX ?\d+|MI\d+\w*)", name, flags=re.I)
    return (m.group(1) if m else name).replace(" ", "").lower()


class GpuClock:
    """The SM clock and board power of the current GPU, sampled in a background thread through NVML (the driver's
    ``libnvidia-ml``, loaded with ctypes; no Python package needed), so each timed loop can say what clock it ran at.

    A long run of dense kernels holds an H100/H200 at its board power limit, and the driver lowers the SM clock
    to stay under it: a single call after an idle moment runs at the boost clock, the same call in a timed loop
    several percent slower. ``window(t0, t1)`` gives the mean clock and power between two ``time.time()`` stamps.
    Without NVML (no NVIDIA driver) every window is empty and nothing else changes.
    """

    SM = 1  # NVML_CLOCK_SM

    def __init__(self, interval_s: float = 0.02):
        self.interval_s, self.samples, self.info = interval_s, [], {}
        self._stop, self._thread, self._lib, self._dev = threading.Event(), None, None, None
        try:
            lib = ctypes.CDLL("libnvidia-ml.so.1")
            if lib.nvmlInit_v2() != 0:
                return
            dev = ctypes.c_void_p()
            uuid = getattr(torch.cuda.get_device_properties(0), "uuid", None) if torch.cuda.is_available() else None
            found = uuid is not None and lib.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}".encode(), ctypes.byref(dev)) == 0
            if not found:  # by index only where that cannot pick another GPU than torch's
                count = ctypes.c_uint()
                if (lib.nvmlDeviceGetCount_v2(ctypes.byref(count)) != 0 or count.value != 1
                        or lib.nvmlDeviceGetHandleByIndex_v2(0, ctypes.byref(dev)) != 0):
                    return
        except (OSError, AttributeError):
            return
        self._lib, self._dev = lib, dev
        limit, max_clock = ctypes.c_uint(), ctypes.c_uint()
        if lib.nvmlDeviceGetEnforcedPowerLimit(dev, ctypes.byref(limit)) == 0:
            self.info["power limit W"] = limit.value / 1e3
        if lib.nvmlDeviceGetMaxClockInfo(dev, self.SM, ctypes.byref(max_clock)) == 0:
            self.info["max SM MHz"] = max_clock.value

    def read(self) -> tuple[float, float] | None:
        """(SM MHz, board W) now, or None without NVML."""
        if self._lib is None:
            return None
        mhz, mw = ctypes.c_uint(), ctypes.c_uint()
        if self._lib.nvmlDeviceGetClockInfo(self._dev, self.SM, ctypes.byref(mhz)) != 0:
            return None
        if self._lib.nvmlDeviceGetPowerUsage(self._dev, ctypes.byref(mw)) != 0:
            return None
        return float(mhz.value), mw.value / 1e3

    def _run(self):
        while not self._stop.wait(self.interval_s):
            r = self.read()
            if r is not None:
                self.samples.append((time.time(), *r))

    def __enter__(self) -> "GpuClock":
        if self._lib is not None:
            self._thread = threading.Thread(target=self._run, name="gpu-clock", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def window(self, t0: float, t1: float) -> dict:
        """Mean SM clock and board power of the samples between ``t0`` and ``t1`` (``time.time()``); {} if none."""
        got = [(mhz, w) for t, mhz, w in self.samples if t0 <= t <= t1]
        if not got:
            return {}
        return {"SM MHz": sum(m for m, _ in got) / len(got), "W": sum(w for _, w in got) / len(got)}

    def last(self, seconds: float) -> dict:
        """:meth:`window` of the last ``seconds`` (a timed loop that just ended)."""
        now = time.time()
        return self.window(now - seconds, now)


def run_on_gpu(script: str, run, args) -> int:
    """``run(args, clock)`` with a :class:`GpuClock` sampling; exit status 2 and a message without a CUDA GPU."""
    if not torch.cuda.is_available():
        print(f"{script} needs a CUDA GPU.", file=sys.stderr)
        return 2
    with GpuClock() as clock:
        return run(args, clock)


def bench_ms_clocked(fn, clock: GpuClock | None, warmup_ms: float = 100, rep_ms: float = 500) -> tuple[float, dict]:
    """:func:`bench_ms`, and the clock and power of the timed part of the loop (the last ``rep_ms``)."""
    ms = bench_ms(fn, warmup_ms=warmup_ms, rep_ms=rep_ms)
    return ms, clock.last(rep_ms / 1e3) if clock is not None else {}


def bench_ms(fn, warmup_ms: float = 100, rep_ms: float = 500) -> float:
    """Median milliseconds of ``fn()`` (CUDA events via triton.testing.do_bench)."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def peak_memory_gib(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e-2 and v != 0 else f"{v:,.1f}" if abs(v) >= 100 else f"{v:.3f}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_results(name: str, title: str, rows: list[dict], columns: list[str], notes: str = "",
                  extra: dict | None = None) -> Path:
    """Print the table and write ``results/<name>-<gpu>.md`` and ``.json``; returns the markdown path."""
    info = machine()
    table = markdown_table(rows, columns)
    header = (f"# {title}\n\nGPU: {info['gpu']} · torch {info['torch']} · CUDA {info['cuda']} · "
              f"triton {info['triton']} · diffusers {info['diffusers']}"
              + "".join(f" · {k} {info[k]:g}" for k in ("power limit W", "max SM MHz") if k in info) + "\n\n")
    print(header + table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = f"{name}-{gpu_slug(info['gpu'])}"  # names hold dots ("wan2.1"): no Path.with_suffix
    (RESULTS / f"{stem}.md").write_text(header + table + "\n" + (f"\n{notes}\n" if notes else ""))
    (RESULTS / f"{stem}.json").write_text(json.dumps({"machine": info, "rows": rows, **(extra or {})}, indent=1))
    return RESULTS / f"{stem}.md"


def bar_plot(path: Path, labels: list[str], series: dict[str, list[float]], ylabel: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(labels)), 4))
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        xs = [j + i * width for j in range(len(labels))]
        bars = ax.bar(xs, values, width, label=name)
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    # Long labels ("stdit (triton, checkpoint keeps attention + matmuls)") wrap within their bar's width.
    ax.set_xticks([j + width * (len(series) - 1) / 2 for j in range(len(labels))],
                  [textwrap.fill(label, 18) for label in labels], fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
