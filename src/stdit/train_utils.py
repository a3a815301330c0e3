"""Pieces of the training loop that are not the loop: EMA, the learning-rate schedule, garbage collection, the
output-directory lock, stopping on a signal, logs and the loss plot."""

from __future__ import annotations

import gc
import json
import math
import os
import signal
import socket
import threading
import time
from pathlib import Path

import torch
from torch import nn


class ManualGC:
    """Python's garbage collector off while training, and a collection of the young generations every ``every``
    optimizer steps instead, of all of them every ``FULL_EVERY``-th time (``every=0``: the collector is left as it
    is).

    An automatic collection starts at whatever allocation crosses its threshold; in a multi-GPU run the rank it
    pauses holds the others at the next collective, at a different step each time. Collecting at fixed steps puts
    the pause at the same step on every rank; the occasional full collection keeps garbage that reached the oldest
    generation from piling up over a long run. The collector's state is restored on exit, exception or not.
    """

    FULL_EVERY = 20

    def __init__(self, every: int):
        self.every = every

    def __enter__(self) -> "ManualGC":
        self.was_enabled = gc.isenabled()
        if self.every:
            gc.disable()
            gc.collect()
        return self

    def step(self, step: int) -> None:
        """Call after optimizer step ``step`` (1-based)."""
        if self.every and step % self.every == 0:
            gc.collect(2 if step % (self.every * self.FULL_EVERY) == 0 else 1)

    def __exit__(self, *exc) -> None:
        if self.every and self.was_enabled:
            gc.enable()


class OutputDirLocked(ValueError):
    """Another trainer holds the output directory."""


class OutputDirLock:
    """One trainer per output directory: ``<dir>/.lock`` holds the owner's pid and host and an ``flock``.

    A second trainer gets :class:`OutputDirLocked` naming the owner. A lock left by a process that died (same host,
    pid gone, or the ``flock`` free because the kernel dropped it with the process) is taken over with a warning;
    a lock from another host whose ``flock`` is free cannot be checked, so it is refused with how to clear it.
    """

    NAME = ".lock"

    def __init__(self, directory: str | Path, log=print):
        self.path = Path(directory) / self.NAME
        self.log = log
        self.fd: int | None = None

    def __enter__(self) -> "OutputDirLock":
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                owner = self._owner(fd)
                os.close(fd)
                raise OutputDirLocked(self._busy(owner)) from None
            if os.path.exists(self.path) and os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                break
            os.close(fd)  # the previous owner removed the file between our open and flock: take the new one
        else:
            raise OutputDirLocked(f"could not lock {self.path}: it keeps being replaced.")
        owner = self._owner(fd)
        if owner:
            here = owner.get("host") == socket.gethostname()
            if not here:
                os.close(fd)
                raise OutputDirLocked(self._busy(owner) + " If no trainer runs there any more, delete the lock file.")
            if owner.get("pid") != os.getpid() and _pid_alive(owner.get("pid")):
                os.close(fd)
                raise OutputDirLocked(self._busy(owner) + " If that process is not a trainer (its pid was reused), "
                                      "delete the lock file.")
            self.log(f"warning: taking over the stale lock {self.path} of process {owner.get('pid')}, which is no "
                     "longer running.")
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                  "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode(), 0)
        os.fsync(fd)
        self.fd = fd
        return self

    @staticmethod
    def _owner(fd: int) -> dict:
        try:
            owner = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
            return owner if isinstance(owner, dict) else {"pid": None, "host": "?"}
        except (ValueError, UnicodeDecodeError):
            return {"pid": None, "host": "?"}

    def _busy(self, owner: dict) -> str:
        return (f"{self.path.parent} is in use by another trainer (pid {owner.get('pid')} on host {owner.get('host')}, "
                f"started {owner.get('started', '?')}; lock file {self.path}). Wait for it to finish, stop it, or "
                "pick another train.output_dir.")

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            os.close(self.fd)  # closing releases the flock
            self.fd = None


def _pid_alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StopOnSignal:
    """SIGINT/SIGTERM ask the training loop to stop after the current step instead of killing it mid-step.

    The first signal sets :attr:`signum` and puts the previous handler back, so a second Ctrl-C stops at once.
    Only the main thread can install handlers; elsewhere this does nothing.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum = 0
        self.previous: dict = {}

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signum = signum
        signal.signal(signum, self.previous.get(signum, signal.SIG_DFL))

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous.clear()


class EMA:
    """Exponential moving average of a model's parameters, kept in the parameters' own layout.

    Under FSDP2 the shadows are DTensors sharded like the parameters, so the EMA costs 1/world of a copy per rank
    and is saved by ``torch.distributed.checkpoint`` like any other sharded state. (timm's ``ModelEmaV3`` deep-copies
    the whole module, which does not compose with per-block ``fully_shard``.)
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True):
        self.decay, self.warmup = decay, warmup
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        params = dict(model.named_parameters())
        self.params = [params[n] for n in self.names]
        self.shadow = [p.detach().clone() for p in self.params]

    def decay_at(self, step: int) -> float:
        """The decay used at optimizer step ``step`` (0-based); warmup keeps early averages from lagging."""
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, step: int) -> None:
        weight = 1.0 - self.decay_at(step)
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach(), weight)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.shadow))

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = sorted(set(self.names) - set(state))
        if missing:
            raise KeyError(f"EMA state is missing {len(missing)} parameter(s), e.g. {missing[:3]}.")
        for n, s in zip(self.names, self.shadow):
            s.copy_(state[n])

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Unsharded CPU copies of the shadows (a collective under FSDP2: call on every rank)."""
        out = {}
        for n, s in zip(self.names, self.shadow):
            t = s.full_tensor() if hasattr(s, "full_tensor") else s
            out[n] = t.detach().float().cpu()
        return out


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                  min_lr_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup to the optimizer's lr, then cosine decay to ``min_lr_ratio * lr`` at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def read_log(path: str | Path) -> list[dict]:
    """The records of a jsonl log, keeping for each step the last one written (a resumed run rewrites steps)."""
    by_step: dict[int, dict] = {}
    p = Path(path)
    if not p.exists():
        return []
    for line in p.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
        if "step" in rec and "loss" in rec:
            by_step[int(rec["step"])] = rec
    return [by_step[k] for k in sorted(by_step)]


def loss_drop(records: list[dict], window: int = 20) -> float:
    """Mean loss of the first ``window`` steps divided by that of the last ``window`` steps."""
    losses = [r["loss"] for r in records]
    if len(losses) < 2 * window:
        window = max(1, len(losses) // 2)
    first = sum(losses[:window]) / window
    last = sum(losses[-window:]) / window
    return first / last


def plot_loss(records: list[dict], path: str | Path, title: str = "training loss") -> Path:
    """A PNG of the loss per step (log scale) with a moving average."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    losses = [r["loss"] for r in records]
    k = max(1, len(losses) // 50)
    smooth = [sum(losses[max(0, i - k + 1):i + 1]) / len(losses[max(0, i - k + 1):i + 1]) for i in range(len(losses))]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=0.8, label="loss")
    ax.plot(steps, smooth, color="tab:blue", linewidth=1.8, label=f"moving average ({k} steps)")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("rectified-flow MSE")
    if len(losses) >= 2:
        title += f" (first/last 20-step mean: {loss_drop(records):.1f}x)"
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
