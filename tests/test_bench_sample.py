"""benchmarks/bench_sample.py: the smoke mode runs every row end to end on the CPU and writes its result files;
the quality measures (PSNR, SSIM) read right."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_sample  # noqa: E402


def test_smoke_run_writes_every_row_and_the_quality_table(tmp_path, capsys):
    assert bench_sample.main(["--smoke", "--results", str(tmp_path), "--teacache", "0.3", "--magcache", "0.3"]) == 0
    data = json.loads((tmp_path / "sample-cpu.json").read_text())
    assert (tmp_path / "sample-cpu.md").is_file() and (tmp_path / "sample-cpu.png").is_file()
    rows = {r["impl"]: r for r in data["rows"]}
    assert not [r for r in data["rows"] if "error" in r]
    assert set(rows) == {"diffusers WanPipeline", "WanPipeline + StDiT", "StDiTPipeline, two calls",
                         "StDiTPipeline, batched guidance", "StDiTPipeline + TeaCache 0.3",
                         "StDiTPipeline + MagCache 0.3", "WanPipeline + StDiT + MagCache 0.3"}
    for name, r in rows.items():
        parts = r["transformer s"] + r["scheduler s"] + r["VAE decode s"]
        assert r["transformer s"] > 0 and r["VAE decode s"] > 0 and parts <= r["total s"] * 1.001, name
    steps = bench_sample.SMOKE["steps"]
    assert rows["diffusers WanPipeline"]["block stacks"] == f"{2 * steps}/{2 * steps}"
    assert rows["StDiTPipeline, batched guidance"]["block stacks"] == f"{steps}/{steps}"
    for name in ("StDiTPipeline + TeaCache 0.3", "StDiTPipeline + MagCache 0.3"):
        done, calls = map(int, rows[name]["block stacks"].split("/"))
        assert calls == steps and done < steps, name  # the cache skipped some block stacks
    # fp32: StDiT in WanPipeline and in StDiTPipeline (both guidance paths) ends where diffusers' Wan ends
    for name in ("WanPipeline + StDiT", "StDiTPipeline, two calls", "StDiTPipeline, batched guidance"):
        assert rows[name]["latent rel err vs diffusers"] < 1e-5, name
    assert rows["StDiTPipeline, batched guidance"]["latent rel err vs uncached"] == 0.0
    quality = data["quality"]
    assert [q["cache"] for q in quality] == ["TeaCache 0.3", "MagCache 0.3"]
    assert all(q["PSNR dB"] > 20 and 0.5 < q["SSIM"] <= 1 for q in quality)
    assert "PSNR" in (tmp_path / "sample-cpu.md").read_text()


def test_psnr_and_ssim():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 3, 16, 16, generator=g)
    assert bench_sample.psnr(a, a) == float("inf") and bench_sample.ssim(a, a) == pytest.approx(1.0)
    noisy = (a + 0.1 * torch.randn(a.shape, generator=g)).clamp(0, 1)
    assert 15 < bench_sample.psnr(noisy, a) < 25  # noise of std 0.1: about 20 dB
    worse = (a + 0.3 * torch.randn(a.shape, generator=g)).clamp(0, 1)
    assert bench_sample.ssim(worse, a) < bench_sample.ssim(noisy, a) < 1
    assert bench_sample.ssim(torch.rand(1, 1, 3, 4, 4), torch.rand(1, 1, 3, 4, 4)) < 1  # frames below the window


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_full_size_run_says_it_needs_a_gpu(capsys):
    assert bench_sample.main([]) == 2
    assert "bench_sample needs a CUDA GPU" in capsys.readouterr().err


def test_stdit_bench_runs_the_script(capsys):
    from stdit.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "sample", "--help"])
    assert exit_info.value.code == 0 and "--tiny-model" in capsys.readouterr().out
