"""2-rank gloo runs on the CPU (DDP and FSDP2) take the same steps as one process with the same global batch."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from stdit.train import train
from stdit.train_utils import read_log

from test_train import tiny, write_config


def _torchrun(cfg_path: Path, out_dir: Path, extra=()):
    # The launcher's own logs go under the test's directory (by default it leaves a torchelastic_* dir in /tmp).
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           f"--log-dir={out_dir.parent / (out_dir.name + '-logs')}", "-m", "stdit.train",
           "--config", str(cfg_path), f"train.output_dir={out_dir}", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout


def _weights(run: Path):
    return load_file(str(run / "model" / "diffusion_pytorch_model.safetensors"))


@pytest.mark.parametrize("mode, extra", [
    ("ddp", ["train.ema_decay=0", "train.ckpt_every=0"]),
    ("fsdp", ["train.ckpt_every=2", "train.grad_accum=2"]),  # sharded checkpoints, EMA and accumulation too
])
def test_two_ranks_match_one_process(tmp_path, mode, extra):
    steps = ["train.steps=4"]
    cfg = write_config(tmp_path / "cfg.yaml", train={"batch_size": 2})
    out = _torchrun(cfg, tmp_path / mode, [f"parallel.mode={mode}", *steps, *extra])
    assert f"on 2 x cpu ({mode}, fp32)" in out
    single = train(tiny(tmp_path / "single", ["train.batch_size=4", *steps, *extra]))
    assert single["steps"] == 4

    dist_log, one_log = read_log(tmp_path / mode / "log.jsonl"), read_log(tmp_path / "single" / "log.jsonl")
    assert len(dist_log) == len(one_log) == 4
    for a, b in zip(dist_log, one_log):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    wd, w1 = _weights(tmp_path / mode), _weights(tmp_path / "single")
    assert set(wd) == set(w1)
    for k in w1:
        torch.testing.assert_close(wd[k], w1[k], rtol=1e-4, atol=1e-6, msg=k)
    if mode == "fsdp":
        ckpt = tmp_path / mode / "checkpoints" / "step_00000004"
        assert len(list(ckpt.glob("__*_0.distcp"))) == 2  # one shard file per rank
        assert {p.name for p in ckpt.glob("rng-*.safetensors")} == {"rng-0.safetensors", "rng-1.safetensors"}


def test_fsdp_resume_on_two_ranks_continues_the_curve(tmp_path):
    cfg = write_config(tmp_path / "cfg.yaml", train={"batch_size": 2, "ckpt_every": 2})
    _torchrun(cfg, tmp_path / "ref", ["parallel.mode=fsdp", "train.steps=4"])
    _torchrun(cfg, tmp_path / "cut", ["parallel.mode=fsdp", "train.steps=2"])
    out = _torchrun(cfg, tmp_path / "cut", ["parallel.mode=fsdp", "train.steps=4"])
    assert "resumed from" in out
    ref, cut = read_log(tmp_path / "ref" / "log.jsonl"), read_log(tmp_path / "cut" / "log.jsonl")
    assert [r["loss"] for r in cut] == [r["loss"] for r in ref]
    a, b = _weights(tmp_path / "ref"), _weights(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fsdp_without_a_process_group_is_a_clear_error(tmp_path):
    with pytest.raises(RuntimeError, match="parallel.mode=fsdp needs a process group: launch with torchrun"):
        train(tiny(tmp_path, ["parallel.mode=fsdp"]))
    with pytest.raises(ValueError, match="parallel.sp=2"):
        train(tiny(tmp_path, ["parallel.sp=2"]))
