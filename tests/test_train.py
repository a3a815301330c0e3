"""The trainer in one process: outputs, exact resume after SIGKILL, atomic and verified checkpoints."""

import os
import random
import signal
import subprocess
import sys
import math
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from stdit.parallel.checkpoint import CheckpointError, find_resume, list_checkpoints, verify_checkpoint
from stdit.parallel.dist import DistInfo
from stdit.train import train
from stdit.train_config import build_config
from stdit.train_utils import read_log

TINY = {
    "model": {"patch_size": [1, 4, 4], "num_attention_heads": 2, "attention_head_dim": 16, "in_channels": 3,
              "out_channels": 3, "text_dim": None, "freq_dim": 32, "ffn_dim": 64, "num_layers": 2,
              "num_classes": 4},
    "data": {"kind": "synthetic", "num_frames": 4, "height": 16, "width": 16, "num_videos": 64},
    "train": {"steps": 6, "batch_size": 4, "lr": 1e-3, "warmup_steps": 2, "ema_decay": 0.9, "ckpt_every": 2,
              "progress": False},
    "sample": {"enabled": False},
}


def write_config(path: Path, **sections) -> Path:
    cfg = {k: dict(v) for k, v in TINY.items()}
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(cfg))
    return path


def tiny(tmp_path, overrides=()):
    return build_config({k: dict(v) for k, v in TINY.items()}, [f"train.output_dir={tmp_path}", *overrides])


def test_train_writes_log_checkpoints_samples_plot_and_model(tmp_path, capsys):
    cfg = tiny(tmp_path / "run", ["sample.enabled=true", "sample.num_inference_steps=2", "sample.videos_per_class=1",
                                  "train.sample_every=3"])
    summary = train(cfg)
    out = tmp_path / "run"
    records = read_log(out / "log.jsonl")
    assert [r["step"] for r in records] == list(range(1, 7))
    assert all(r["loss"] > 0 for r in records) and records[1]["lr"] > records[0]["lr"] > 0  # warmup
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step_00000004", "step_00000006"]
    assert {p.name for p in (out / "samples").iterdir()} == {"step_00000003.mp4", "step_00000003.gif",
                                                              "final.mp4", "final.gif"}
    assert (out / "loss.png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert str(out / "samples" / "final.mp4") in printed and "loss curve" in printed

    from stdit.model import StDiT

    model = StDiT.from_pretrained(summary["model_dir"])
    ema = load_file(str(out / "model" / "diffusion_pytorch_model.safetensors"))
    assert model.config.num_layers == 2 and set(ema) == set(model.state_dict())
    assert (out / "model" / "scheduler_config.json").is_file()


def sigkill_at_step(proc: subprocess.Popen, log: Path, step: int, timeout: float = 240) -> None:
    """SIGKILL a training run ``proc`` once its ``log`` holds ``step`` records (it must still be running then)."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and len(read_log(log)) >= step:
            break
        time.sleep(0.01)
    assert proc.poll() is None, f"the run ended before step {step}: {proc.stdout.read()}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _run(cfg_path, out_dir, extra=()):
    cmd = [sys.executable, "-m", "stdit.train", str(cfg_path), f"train.output_dir={out_dir}", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_sigkill_at_a_random_step_resumes_to_the_same_loss_curve(tmp_path):
    steps, every = 14, 3
    cfg = write_config(tmp_path / "cfg.yaml", train={"steps": steps, "ckpt_every": every, "keep_ckpts": 2})
    reference = _run(cfg, tmp_path / "ref")
    killed = _run(cfg, tmp_path / "killed")
    kill_at = random.Random(os.getpid()).randint(every + 1, steps - 2)
    log = tmp_path / "killed" / "log.jsonl"
    sigkill_at_step(killed, log, kill_at)
    ckpts = list_checkpoints(tmp_path / "killed" / "checkpoints")
    assert ckpts, "no checkpoint was written before the kill"
    for c in ckpts:  # whatever the kill interrupted, every listed checkpoint is whole
        verify_checkpoint(c)

    resumed = _run(cfg, tmp_path / "killed")
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    assert "resumed from" in out
    ref_out, _ = reference.communicate(timeout=300)
    assert reference.returncode == 0, ref_out

    ref, got = read_log(tmp_path / "ref" / "log.jsonl"), read_log(log)
    assert [r["step"] for r in got] == list(range(1, steps + 1))
    assert [r["loss"] for r in got] == [r["loss"] for r in ref], f"killed at step {kill_at}"
    a = load_file(str(tmp_path / "ref" / "model" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "model" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not list((tmp_path / "killed" / "checkpoints").glob(".tmp-*"))


def test_corrupt_or_truncated_checkpoint_falls_back_to_the_previous_good_one(tmp_path, capsys):
    train(tiny(tmp_path, ["train.steps=4", "train.keep_ckpts=3", "train.export=false"]))
    root = tmp_path / "checkpoints"
    good, bad = list_checkpoints(root)
    assert good.name == "step_00000002" and bad.name == "step_00000004"
    shard = max((p for p in bad.iterdir() if p.suffix == ".distcp"), key=lambda p: p.stat().st_size)
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"step_00000004: file .*distcp is truncated"):
        verify_checkpoint(bad)
    info = DistInfo()
    assert find_resume(root, "auto", info) == good
    assert "Falling back" in capsys.readouterr().out
    with pytest.raises(CheckpointError, match=r"truncated.*The newest good checkpoint is .*step_00000002"):
        find_resume(root, str(bad), info)

    shard.write_bytes(data[:-8] + bytes(8 if data[-8:] != bytes(8) else [1] * 8))  # same size, altered bytes
    with pytest.raises(CheckpointError, match="CRC-32 mismatch"):
        verify_checkpoint(bad)
    (bad / "meta.json").unlink()
    with pytest.raises(CheckpointError, match="not completely written"):
        verify_checkpoint(bad)

    # training resumes from the good checkpoint and reproduces the original steps 3-4
    before = read_log(tmp_path / "log.jsonl")
    train(tiny(tmp_path, ["train.steps=4", "train.keep_ckpts=3", "train.export=false"]))
    after = read_log(tmp_path / "log.jsonl")
    assert [r["loss"] for r in after] == [r["loss"] for r in before]
    assert "resumed from" in capsys.readouterr().out


def test_grad_accumulation_matches_a_larger_batch(tmp_path):
    """2 micro-batches of 2 = 1 batch of 4: same samples, same noise, same update."""
    a = train(tiny(tmp_path / "a", ["train.steps=2", "train.ckpt_every=0", "train.ema_decay=0"]))
    b = train(tiny(tmp_path / "b", ["train.steps=2", "train.ckpt_every=0", "train.ema_decay=0",
                                    "train.batch_size=2", "train.grad_accum=2"]))
    la, lb = read_log(Path(a["output_dir"]) / "log.jsonl"), read_log(Path(b["output_dir"]) / "log.jsonl")
    for x, y in zip(la, lb):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)
    wa = load_file(str(Path(a["model_dir"]) / "diffusion_pytorch_model.safetensors"))
    wb = load_file(str(Path(b["model_dir"]) / "diffusion_pytorch_model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-6)


def test_activation_checkpointing_trains_the_same(tmp_path):
    """Checkpointing (full recompute, keeping the self-attention outputs, keeping those and the matmul outputs)
    changes memory and time, not the training: the same losses and weights as without it."""
    base = ["train.steps=2", "train.ckpt_every=0", "train.ema_decay=0"]
    runs = {name: train(tiny(tmp_path / name, base + extra)) for name, extra in (
        ("plain", []),
        ("full", ["train.activation_checkpointing=true", "train.checkpoint_keep_attention=false"]),
        ("keep", ["train.activation_checkpointing=true"]),
        ("keep_mm", ["train.activation_checkpointing=true", "train.checkpoint_keep_matmuls=true"]))}
    ref = load_file(str(Path(runs["plain"]["model_dir"]) / "diffusion_pytorch_model.safetensors"))
    ref_log = read_log(Path(runs["plain"]["output_dir"]) / "log.jsonl")
    for name in ("full", "keep", "keep_mm"):
        log = read_log(Path(runs[name]["output_dir"]) / "log.jsonl")
        assert [r["loss"] for r in log] == pytest.approx([r["loss"] for r in ref_log], rel=1e-5), name
        w = load_file(str(Path(runs[name]["model_dir"]) / "diffusion_pytorch_model.safetensors"))
        for k in ref:
            torch.testing.assert_close(w[k], ref[k], rtol=1e-4, atol=1e-6)


def test_mismatched_data_and_model_get_clear_errors(tmp_path):
    with pytest.raises(ValueError, match=r"the data has 3 channels but the model takes 4 \(model.in_channels=4\)"):
        train(tiny(tmp_path, ["model.in_channels=4", "model.out_channels=4"]))
    with pytest.raises(ValueError, match=r"in_channels=5 with out_channels=3 is Wan 2.1 image-to-video: .* a "
                                         r"2-channel condition, which the data does not have"):
        train(tiny(tmp_path, ["model.in_channels=5", "model.out_channels=3"]))
    with pytest.raises(ValueError, match="model.text_dim is set but the data has no text features"):
        train(tiny(tmp_path, ["model.text_dim=8"]))


def test_garbage_collection_runs_at_fixed_steps_and_is_restored(tmp_path, monkeypatch):
    """train.gc_every: the automatic collector is off during the steps, collections run after every gc_every-th
    step (young generations; all of them every FULL_EVERY-th time) and the collector is back on afterwards, also
    when training fails; 0 leaves it alone."""
    import gc

    from stdit.diffusion import RectifiedFlow
    from stdit.train_utils import ManualGC

    calls = []
    real_collect = gc.collect
    monkeypatch.setattr(gc, "collect", lambda *a: calls.append((a, gc.isenabled())) or real_collect(*a))
    steps_seen = []
    real_loss = RectifiedFlow.loss

    def loss(self, *a, **kw):
        steps_seen.append(gc.isenabled())
        return real_loss(self, *a, **kw)

    monkeypatch.setattr(RectifiedFlow, "loss", loss)
    monkeypatch.setattr(ManualGC, "FULL_EVERY", 2)
    assert gc.isenabled()
    train(tiny(tmp_path / "a", ["train.steps=5", "train.gc_every=2", "train.ckpt_every=0", "train.export=false"]))
    assert gc.isenabled()
    assert steps_seen == [False] * 5
    assert [a for a, _ in calls] == [(), (1,), (2,)]  # once on entry, after step 2, in full after step 4
    assert not any(enabled for _, enabled in calls[1:])

    calls.clear()
    steps_seen.clear()
    train(tiny(tmp_path / "b", ["train.steps=2", "train.gc_every=0", "train.ckpt_every=0", "train.export=false"]))
    assert calls == [] and steps_seen == [True, True] and gc.isenabled()

    def broken(self, *a, **kw):
        raise RuntimeError("boom")

    monkeypatch.setattr(RectifiedFlow, "loss", broken)
    with pytest.raises(RuntimeError, match="boom"):
        train(tiny(tmp_path / "c", ["train.steps=2", "train.gc_every=1", "train.ckpt_every=0"]))
    assert gc.isenabled()


def test_first_frame_training_runs_and_is_refused_where_it_cannot_apply(tmp_path):
    """train.first_frame_prob (Wan 2.2 TI2V's image-to-video samples): a model with per-frame tokens trains with a
    mix of clean-first-frame and plain samples (the real StDiT takes the per-token timesteps); a temporal patch
    of 2 gets one clear error naming the setting."""
    summary = train(tiny(tmp_path / "a", ["train.first_frame_prob=0.5", "train.steps=3"]))
    losses = [r["loss"] for r in read_log(tmp_path / "a" / "log.jsonl")]
    assert summary["steps"] == 3 and len(losses) == 3 and all(math.isfinite(x) and x > 0 for x in losses)
    with pytest.raises(ValueError, match=r"train.first_frame_prob=0.5 .* needs a model with temporal patch 1"):
        train(tiny(tmp_path / "b", ["train.first_frame_prob=0.5", "model.patch_size=[2,4,4]"]))


def test_a_wan21_image_model_without_image_features_is_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match=r"model.image_dim=8 \(Wan 2.1 image-to-video's CLIP image branch\) needs "
                                         r"image features in the data; encode the data with `stdit encode"):
        train(tiny(tmp_path / "a", ["model.image_dim=8", "model.added_kv_proj_dim=32", "model.text_dim=24",
                                    "model.num_classes=null"]))
    assert not (tmp_path / "a" / "log.jsonl").exists()
