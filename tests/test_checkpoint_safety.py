"""The trainer never loses or silently replaces a run: corrupt checkpoints, re-saves, locks, a full disk, changed
configs, Ctrl-C, and crafted DCP metadata (issue 36, sections 2 and 3)."""

import contextlib
import errno
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import types
import zlib
from pathlib import Path

import pytest
import torch

from stdit.parallel import checkpoint as ck
from stdit.parallel.checkpoint import (CheckpointError, checkpoint_dir, find_resume, list_checkpoints,
                                       load_checkpoint, save_checkpoint, verify_checkpoint)
from stdit.parallel.dist import DistInfo
from stdit.train import train
from stdit.train_config import resume_report
from stdit.train_utils import OutputDirLock, OutputDirLocked, read_log

from test_train import _run, tiny, write_config

FAST = ["train.export=false"]


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _linear_state(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    return model, opt


def _rewrite_manifest(ckpt: Path, name: str) -> None:
    """Make a planted file pass verification (whoever can plant it can also edit meta.json)."""
    meta = json.loads((ckpt / "meta.json").read_text())
    data = (ckpt / name).read_bytes()
    meta["files"][name] = [len(data), zlib.crc32(data)]
    (ckpt / "meta.json").write_text(json.dumps(meta))


def test_every_checkpoint_corrupt_refuses_and_changes_nothing(tmp_path):
    overrides = ["train.steps=4", "train.keep_ckpts=3"]
    train(tiny(tmp_path, overrides))
    ckpts = list_checkpoints(tmp_path / "checkpoints")
    assert [c.name for c in ckpts] == ["step_00000002", "step_00000004"]
    for c in ckpts:
        shard = max(c.glob("*.distcp"), key=lambda p: p.stat().st_size)
        shard.write_bytes(shard.read_bytes()[:100])
    before = _snapshot(tmp_path)
    with pytest.raises(CheckpointError, match=r"every checkpoint under .* is corrupt") as e:
        train(tiny(tmp_path, overrides))
    msg = str(e.value)
    assert "step_00000002" in msg and "step_00000004" in msg and "train.resume=none" in msg
    assert _snapshot(tmp_path) == before  # log.jsonl, model/ and both checkpoints untouched, nothing new
    # starting over into the same directory would truncate the log and overwrite model/: refused as well
    with pytest.raises(CheckpointError, match=r"already holds a run .*train.resume=none starts a new run"):
        train(tiny(tmp_path, [*overrides, "train.resume=none"]))
    assert _snapshot(tmp_path) == before


def test_a_kill_while_resaving_a_step_leaves_a_checkpoint(tmp_path, monkeypatch):
    root, info = tmp_path / "ckpts", DistInfo()
    model, opt = _linear_state()
    save_checkpoint(root, 2, model, opt, info, extra={"tag": "old"})

    class Killed(BaseException):
        pass

    real_replace = os.replace

    def replace(src, dst):  # the kill lands just before the new checkpoint is renamed into place
        if Path(src).name.startswith(".tmp-"):
            raise Killed
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(Killed):
        save_checkpoint(root, 2, model, opt, info, extra={"tag": "new"})
    monkeypatch.setattr(os, "replace", real_replace)
    found = find_resume(root, "auto", info)  # undoes the interrupted swap
    assert found == checkpoint_dir(root, 2)
    assert verify_checkpoint(found)["tag"] == "old"
    meta, _ = load_checkpoint(found, *_linear_state(1), info)
    assert meta["step"] == 2 and not list(root.glob(".old-*"))

    save_checkpoint(root, 2, model, opt, info, extra={"tag": "new"})  # a completed re-save replaces it
    assert verify_checkpoint(checkpoint_dir(root, 2))["tag"] == "new"
    assert [p.name for p in root.iterdir()] == ["step_00000002"]


def test_a_second_trainer_is_refused_and_a_stale_lock_is_taken_over(tmp_path, capsys):
    out = tmp_path / "run"
    with OutputDirLock(out):
        with pytest.raises(OutputDirLocked, match=rf"{out} is in use by another trainer \(pid {os.getpid()} on host"):
            train(tiny(out, ["train.steps=1", "train.ckpt_every=0", *FAST]))
    assert [p.name for p in out.iterdir()] == []  # the refused trainer wrote nothing

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / ".lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    train(tiny(out, ["train.steps=1", "train.ckpt_every=0", *FAST]))
    assert f"taking over the stale lock {out / '.lock'} of process {dead.pid}" in capsys.readouterr().out
    assert not (out / ".lock").exists() and len(read_log(out / "log.jsonl")) == 1

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / ".lock").write_text(json.dumps({"pid": 1, "host": "another-host"}))
    with pytest.raises(OutputDirLocked, match="on host another-host.*delete the lock file"):
        train(tiny(tmp_path / "other", ["train.steps=1", *FAST]))


def test_disk_full_during_a_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    from torch.distributed.checkpoint.filesystem import FileSystem

    real = FileSystem.create_stream

    @contextlib.contextmanager
    def create_stream(self, path, mode):
        with real(self, path, mode) as stream:
            if "w" in mode and ".tmp-step_00000004" in str(path):
                stream.write(b"\0" * 64)
                raise OSError(errno.ENOSPC, "No space left on device")
            yield stream

    monkeypatch.setattr(FileSystem, "create_stream", create_stream)
    with pytest.raises(CheckpointError, match=r"could not save checkpoint step 4 under .*: no space left on device\. "
                                              r"The partial checkpoint was removed and the earlier checkpoint "
                                              r".*step_00000002 is intact"):
        train(tiny(tmp_path, ["train.steps=6", *FAST]))
    root = tmp_path / "checkpoints"
    assert [c.name for c in list_checkpoints(root)] == ["step_00000002"]
    verify_checkpoint(root / "step_00000002")
    assert not list(root.glob(".tmp-*")) and not (tmp_path / ".lock").exists()


def test_a_changed_config_is_refused_or_reported_and_applied(tmp_path, capsys):
    train(tiny(tmp_path, ["train.steps=2"]))
    before = _snapshot(tmp_path)
    with pytest.raises(CheckpointError, match=r"trained with a different config: model\.num_layers: 2 -> 1\. "
                                              r"Nothing was changed"):
        train(tiny(tmp_path, ["train.steps=2", "model.num_layers=1"]))
    assert _snapshot(tmp_path) == before  # step_2 and model/ keep the 2-layer model
    capsys.readouterr()

    train(tiny(tmp_path, ["train.steps=4", "train.lr=5e-4"]))
    printed = capsys.readouterr().out
    assert "changed since that checkpoint (applies from step 3):" in printed
    assert "train.lr: 0.001 -> 0.0005" in printed and "train.steps: 2 -> 4" in printed
    log = read_log(tmp_path / "log.jsonl")
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    # the new lr and step count drive the schedule: lr after step 3 = 5e-4 * cosine(1/2) (warmup 2, 4 steps)
    assert log[2]["lr"] == pytest.approx(5e-4 * 0.5)

    step4 = checkpoint_dir(tmp_path / "checkpoints", 4)
    inode = step4.stat().st_ino
    train(tiny(tmp_path, ["train.steps=4", "train.lr=5e-4"]))  # re-running a finished run: no re-save
    assert step4.stat().st_ino == inode


def test_resume_report_flags_world_size_steps_and_ema():
    cfg = tiny("/unused").to_dict()
    refusals, notes = resume_report(cfg, cfg, 6, 8, 16, 1, 2)
    assert refusals == [] and notes[0].startswith("global batch: 8 -> 16 (world size 1 -> 2)")
    other = {**cfg, "train": {**cfg["train"], "steps": 4, "ema_decay": 0.0}}
    refusals, _ = resume_report(cfg, other, 6, 8, 8, 1, 1)
    assert any("train.ema_decay: 0.9 -> 0.0 (turns the EMA off" in r for r in refusals)
    assert any("train.steps=4 is below the checkpoint's step 6" in r for r in refusals)


def test_a_torch_checkpoint_exception_becomes_a_checkpoint_error(tmp_path):
    root, info = tmp_path / "ckpts", DistInfo()
    save_checkpoint(root, 1, *_linear_state(), info)
    other = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 3))
    with pytest.raises(CheckpointError, match="could not be loaded into this model/optimizer"):
        load_checkpoint(checkpoint_dir(root, 1), other, torch.optim.AdamW(other.parameters()), info)


def test_sigint_saves_the_current_step_and_says_how_to_resume(tmp_path):
    cfg = write_config(tmp_path / "cfg.yaml", train={"steps": 1000, "ckpt_every": 0, "export": False})
    out = tmp_path / "run"
    proc = _run(cfg, out)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and len(read_log(out / "log.jsonl")) < 2:
        time.sleep(0.05)
    assert proc.poll() is None, proc.stdout.read()
    proc.send_signal(signal.SIGINT)
    printed, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, printed
    assert "Traceback" not in printed
    steps = len(read_log(out / "log.jsonl"))
    ckpt = checkpoint_dir(out / "checkpoints", steps)
    line = (f"stopped by SIGINT at step {steps} of 1000; checkpoint {ckpt}. To resume, run the same command again "
            "(train.resume=auto continues from it).")
    assert line in printed.splitlines()
    assert list_checkpoints(out / "checkpoints") == [ckpt] and verify_checkpoint(ckpt)["step"] == steps
    assert not (out / ".lock").exists()


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def test_crafted_dcp_metadata_is_refused_without_running_it(tmp_path):
    import pickle

    root, info = tmp_path / "ckpts", DistInfo()
    save_checkpoint(root, 1, *_linear_state(), info)
    ckpt = checkpoint_dir(root, 1)
    meta, _ = load_checkpoint(ckpt, *_linear_state(1), info)  # a real checkpoint loads through the checks
    assert meta["step"] == 1

    marker = tmp_path / "code-ran"
    (ckpt / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    _rewrite_manifest(ckpt, ".metadata")
    assert find_resume(root, "auto", info) == ckpt  # sizes and CRCs match: only the content is hostile
    with pytest.raises(CheckpointError, match=r"\.metadata is not plain DCP metadata \(builtins\.exec is not one of "
                                              r"DCP's metadata types\); it was refused without running it"):
        load_checkpoint(ckpt, *_linear_state(1), info)
    assert not marker.exists()

    # DCP's non-tensor values (torch.save bytes) would be torch.load-ed with weights_only=False: refused too
    buf = io.BytesIO()
    torch.save({"lr": _Payload(marker)}, buf)
    buf.seek(0)
    planner = ck._WeightsOnlyLoadPlanner()
    planner.flatten_state_dict, planner.state_dict = False, {}
    item = types.SimpleNamespace(dest_index=types.SimpleNamespace(fqn="optim.param_groups"))
    with pytest.raises(CheckpointError, match="optim.param_groups is not plain data; refused without running it"):
        planner.load_bytes(item, buf)
    assert not marker.exists()
