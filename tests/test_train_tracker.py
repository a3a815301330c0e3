"""train.tracker: every log.jsonl record also goes to TensorBoard or wandb (rank 0), and the tracker is closed."""

import signal
import sys
import types

import pytest

import stdit.train
from stdit.train import TrainingStopped, train
from stdit.train_utils import read_log
from test_train import tiny


class FakeTracker(stdit.train.Tracker):
    def __init__(self):
        self.records, self.closed = [], 0

    def log(self, record):
        self.records.append(dict(record))

    def close(self):
        self.closed += 1


def test_tracker_gets_every_log_record_and_is_closed(tmp_path, monkeypatch):
    made = []

    def make(name, out, cfg):
        made.append((name, out, cfg.train.steps))
        made.append(FakeTracker())
        return made[-1]

    monkeypatch.setattr(stdit.train, "_make_tracker", make)
    train(tiny(tmp_path, ["train.steps=4", "train.log_every=3", "train.export=false"]))
    (name, out, steps), tracker = made
    assert (name, out, steps) == (None, tmp_path, 4)
    assert [r["step"] for r in tracker.records] == [3, 4]  # every log_every steps and the last
    assert tracker.records == read_log(tmp_path / "log.jsonl") and tracker.closed == 1


def test_tensorboard_writes_each_numeric_key_at_its_step(tmp_path, monkeypatch):
    writers = []

    class SummaryWriter:
        def __init__(self, log_dir):
            self.log_dir, self.scalars, self.closed = log_dir, [], False
            writers.append(self)

        def add_scalar(self, tag, value, step):
            self.scalars.append((tag, value, step))

        def close(self):
            self.closed = True

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=SummaryWriter))
    train(tiny(tmp_path, ["train.steps=3", "train.tracker=tensorboard", "train.export=false"]))
    (writer,) = writers
    assert writer.log_dir == str(tmp_path / "tensorboard") and writer.closed
    expected = [(k, v, r["step"]) for r in read_log(tmp_path / "log.jsonl") for k, v in r.items() if k != "step"]
    assert writer.scalars == expected and {k for k, _, _ in expected} >= {"loss", "lr", "grad_norm"}


def test_wandb_logs_records_and_finishes_when_a_signal_stops_training(tmp_path, monkeypatch):
    calls = []
    fake = types.SimpleNamespace(init=lambda **kw: calls.append(("init", kw)),
                                 log=lambda record, step: calls.append(("log", dict(record), step)),
                                 finish=lambda: calls.append(("finish",)))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    real = stdit.train._stop_requested

    def sigterm_in_step_2(stopper, info, device):
        return signal.SIGTERM if calls[-1][0] == "log" and calls[-1][2] == 2 else real(stopper, info, device)

    monkeypatch.setattr(stdit.train, "_stop_requested", sigterm_in_step_2)
    cfg = tiny(tmp_path, ["train.steps=6", "train.tracker=wandb"])
    with pytest.raises(TrainingStopped, match="stopped by SIGTERM at step 2 of 6"):
        train(cfg)
    init, *logs, finish = calls
    assert init == ("init", {"project": "stdit", "dir": str(tmp_path), "config": cfg.to_dict()})
    assert logs == [("log", r, r["step"]) for r in read_log(tmp_path / "log.jsonl")] and len(logs) == 2
    assert finish == ("finish",)


@pytest.mark.parametrize("name, module", [("tensorboard", "torch.utils.tensorboard"), ("wandb", "wandb")])
def test_missing_tracker_package_fails_before_training(tmp_path, monkeypatch, name, module):
    monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError
    made = []
    monkeypatch.setattr(stdit.train, "_make_tracker", lambda *a: made.append(a))
    monkeypatch.setattr(stdit.train, "_setup", lambda *a: pytest.fail("the run was set up"))
    with pytest.raises(ImportError, match=rf"train.tracker={name} needs the {name} package.*pip install {name}"):
        train(tiny(tmp_path / "run", [f"train.tracker={name}"]))
    assert not made and not (tmp_path / "run" / "log.jsonl").exists()


def test_an_unknown_tracker_is_refused_by_the_config(tmp_path):
    with pytest.raises(ValueError, match=r"train.tracker.*'mlflow' is not one of \[None, 'tensorboard', 'wandb'\]"):
        tiny(tmp_path, ["train.tracker=mlflow"])
    assert tiny(tmp_path, ["train.tracker=wandb"]).train.tracker == "wandb"
