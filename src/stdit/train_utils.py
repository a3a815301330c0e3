"""Pieces of the training loop that are not the loop: EMA, the learning-rate schedule, garbage collection, logs and
the loss plot."""

from __future__ import annotations

import gc
import json
import math
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
