"""Shared benchmark plumbing: machine description, timing, and writing results (markdown, JSON, PNG)."""

from __future__ import annotations

import json
import platform
import re
import textwrap
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


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
    return info


def gpu_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100'."""
    m = re.search(r"(H100|H200|H20|A100|L40S|L4|B200|GB200|RTX ?\d+|MI\d+\w*)", name, flags=re.I)
    return (m.group(1) if m else name).replace(" ", "").lower()


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
              f"triton {info['triton']} · diffusers {info['diffusers']}\n\n")
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
