"""The attention benchmark's report: every measured table is written, with ours against the best SDPA backend."""

import json
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_attention  # noqa: E402


def _row(shape, ours, cudnn, flash, graph=True):
    r = {"shape": shape, "fwd_tflops": {"ours": ours, "sdpa-cudnn": cudnn, "sdpa-flash": flash},
         "fwdbwd_tflops": {"ours": ours / 2, "sdpa-cudnn": cudnn / 2, "sdpa-flash": flash / 2},
         "graph_fwd_tflops": {}, "graph_fwdbwd_tflops": {}, "ms": {}, "errors": {}}
    if graph:
        r["graph_fwd_tflops"] = {"ours": ours + 10, "sdpa-cudnn": cudnn + 10}
        r["graph_fwdbwd_tflops"] = {"ours": 300.0, "sdpa-cudnn": 400.0}
    return r


def test_report_tables_and_ratios(tmp_path):
    info = {"gpu": "NVIDIA Test GPU", "torch": "t", "triton": "tr", "cuda": "c", "cudnn": 1}
    rows = [_row("B1 H12 S32760 d128", 620.0, 560.0, 350.0, graph=False),
            _row("B1 H12 S4096 d128", 600.0, 630.0, 300.0)]
    md = bench_attention.write_results(rows, [], info, tmp_path).read_text()
    sections = md.split("## ")
    titles = [s.splitlines()[0] for s in sections[1:]]
    assert titles[:2] == ["Forward TFLOP/s", "Forward + backward TFLOP/s"]
    assert any(t.startswith("Forward TFLOP/s replayed from a CUDA graph") for t in titles)
    graph_fb = next(s for s in sections if s.startswith("Forward + backward TFLOP/s replayed from a CUDA graph"))
    # Only the row with graph timings, ours / best SDPA = 300 / 400.
    assert "B1 H12 S32760 d128" not in graph_fb
    assert "| B1 H12 S4096 d128 | 300 | 400 | — | 0.75× |" in graph_fb
    fwd = sections[1]
    assert "| B1 H12 S32760 d128 | 620 | 560 | 350 | 1.11× |" in fwd  # best SDPA is cuDNN, not flash
    data = json.loads((tmp_path / "attention-nvidia-test-gpu.json").read_text())
    assert data["attention"][1]["graph_fwdbwd_tflops"]["ours"] == 300.0
    assert not any(t.startswith("Mean SM clock") for t in titles)  # no clock samples, no table


def test_merge_keeps_the_earlier_rows_of_the_shapes_not_run(tmp_path):
    """``--merge``: this run's rows replace the earlier run's for the same shapes, the others stay, in table order,
    and the report names the shapes that came from the earlier run."""
    names = [s[0] for s in bench_attention.SHAPES]
    old = {"attention": [_row(n, 600.0 + i, 560.0, 350.0) for i, n in enumerate(names)],
           "norm_rope_attention": [{"shape": n, "old": True} for n in names]}
    new = [_row(names[3], 700.0, 555.0, 340.0)]
    rows, fused, merged = bench_attention.merge_earlier(new, [{"shape": names[3], "old": False}], old)
    assert [r["shape"] for r in rows] == names and rows[3]["fwd_tflops"]["ours"] == 700.0
    assert rows[0]["fwd_tflops"]["ours"] == 600.0 and [f["old"] for f in fused] == [n != names[3] for n in names]
    assert merged == sorted(set(names) - {names[3]})
    info = {"gpu": "NVIDIA Test GPU", "torch": "t", "triton": "tr", "cuda": "c", "cudnn": 1,
            "merged_from_earlier_run": merged}
    md = bench_attention.write_results(rows, [], info, tmp_path).read_text()
    assert "Rows from an earlier run on this GPU" in md and f"| {names[3]} | 700 | 555 | 340 |" in md


def test_report_clock_table(tmp_path):
    info = {"gpu": "NVIDIA Test GPU", "torch": "t", "triton": "tr", "cuda": "c", "cudnn": 1, "power limit W": 700.0,
            "max SM MHz": 1980}
    row = _row("B1 H12 S32760 d128", 620.0, 560.0, 350.0, graph=False)
    row["clock"] = {"ours": {"fwd": {"SM MHz": 1612.4, "W": 690.0}, "fwdbwd": {"SM MHz": 1655.6, "W": 688.0}},
                    "sdpa-cudnn": {"fwd": {"SM MHz": 1700.0, "W": 650.0}, "fwdbwd": {}}}
    md = bench_attention.write_results([row], [], info, tmp_path).read_text()
    table = next(s for s in md.split("## ") if s.startswith("Mean SM clock"))
    assert "(700 W)" in table and "(max 1980 MHz)" in table
    # columns: ours, sdpa-cudnn, sdpa-flash; a pass without samples reads as a dash
    assert "| B1 H12 S32760 d128 | 1612 / 1656 | 1700 / — | — / — |" in table


def test_gpu_clock_window_means_only_the_samples_inside():
    from common import GpuClock

    clock = GpuClock()  # without NVML (a CPU machine) it samples nothing; the window arithmetic is the same
    clock.samples = [(10.0, 1980.0, 300.0), (11.0, 1700.0, 690.0), (12.0, 1600.0, 700.0), (13.0, 1900.0, 400.0)]
    got = clock.window(10.5, 12.5)
    assert got == {"SM MHz": 1650.0, "W": 695.0}
    assert clock.window(20.0, 30.0) == {}
    clock.samples.append((time.time() - 0.1, 1500.0, 699.0))  # the last 0.5 s hold only this sample
    assert clock.last(0.5) == {"SM MHz": 1500.0, "W": 699.0}


def test_flex_peer_keeps_its_compiled_graphs():
    """FlexAttention compiles one graph per shape and grad mode; past Dynamo's default recompile limit (8) it would
    fall back to the eager flex_attention, so the benchmark raises the limit when it times FlexAttention."""
    import torch._dynamo

    pytest.importorskip("torch.nn.attention.flex_attention")
    knob = bench_attention.dynamo_recompile_knob()
    before = getattr(torch._dynamo.config, knob)
    # Dynamo's own patcher restores the knob on exit; pytest's monkeypatch would delete Dynamo's config entry on
    # undo (its config module keeps values outside the module __dict__) and break every later torch.compile.
    with torch._dynamo.config.patch({knob: 8}):
        assert "flex" not in bench_attention.implementations(flex=False)
        assert getattr(torch._dynamo.config, knob) == 8
        impls = bench_attention.implementations(flex=True)
        assert "flex" in impls
        assert getattr(torch._dynamo.config, knob) >= 2 * len(bench_attention.SHAPES)
    assert getattr(torch._dynamo.config, knob) == before
