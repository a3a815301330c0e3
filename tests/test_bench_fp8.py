"""benchmarks/bench_fp8.py: its exact reference and accuracy measures, and the clear exit without a GPU."""

import sys
from pathlib import Path

import pytest
import torch
from _kernel_env import load_kernels

load_kernels()
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_fp8  # noqa: E402

from stdit.kernels.attention_ref import attention_ref  # noqa: E402


def test_reference_is_exact_attention_of_the_first_queries():
    q, k, v = (torch.randn(2, 30, 3, 16) for _ in range(3))
    ref = bench_fp8.reference(q, k, v, 7)
    assert ref.shape == (2, 7, 3, 16) and ref.dtype == torch.float64
    torch.testing.assert_close(ref, attention_ref(q, k, v, dtype=torch.float64)[:, :7])
    cos, rel = bench_fp8.accuracy(attention_ref(q, k, v), ref)
    assert cos == pytest.approx(1.0, abs=1e-6) and rel < 1e-5
    cos, rel = bench_fp8.accuracy(torch.zeros(2, 30, 3, 16), ref)
    assert rel == pytest.approx(1.0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only exit")
def test_needs_a_gpu(capsys):
    assert bench_fp8.main(["--quick"]) == 2
    assert "bench_fp8.py needs a CUDA GPU" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only exit")
def test_train_bench_needs_a_gpu(capsys):
    import bench_fp8_train

    assert bench_fp8_train.main(["--tiny-steps", "0"]) == 2
    assert "bench_fp8_train needs a CUDA GPU" in capsys.readouterr().err


def test_train_bench_tiny_rows_anywhere(tmp_path, monkeypatch):
    """``--tiny-only`` trains the tiny model in bf16 and both FP8 recipes from the same start and writes the table."""
    pytest.importorskip("torchao")
    import bench_fp8_train
    import common

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    assert bench_fp8_train.main(["--tiny-only", "--tiny-steps", "2"]) == 0
    md = next(tmp_path.glob("fp8-train-tiny-*.md")).read_text()
    for name in ("fp32" if not torch.cuda.is_available() else "bf16", "fp8 rowwise", "fp8 tensorwise"):
        assert f"stdit {name} (tiny model, 2 steps)" in md
    import json

    rows = json.loads(next(tmp_path.glob("fp8-train-tiny-*.json")).read_text())["rows"]
    # One start and the same first batch; the zero-initialized output layer makes the first prediction the same too.
    assert len({r["first loss"] for r in rows}) == 1
    assert all(len(r["curve"]) == 2 for r in rows)
