"""The kernels' switches, read once: ``STDIT_AUTOTUNE`` from the environment at import, the ablation switches
(which kernel paths run) only through :func:`override`, in tests and benchmark scripts.

``STDIT_AUTOTUNE=0`` (user-facing): one fixed config per kernel instead of autotuning over the list, so the first
calls at a new shape start at once (at a few percent of speed). The ablation switches turn off, one at a time, a
path the defaults take where it measured faster (``benchmarks/DECISIONS.md``): the Hopper Gluon forward and
backward, tensor-descriptor (TMA) loads, the split of a last round of tiles, the bound fast launch.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, fields
from typing import Iterator

SPLITS = ("auto", "never", "always")


@dataclass
class KernelConfig:
    autotune: bool = True  # autotune over each kernel's configs (False: its first, or smallest, config)
    sm90_forward: bool = True  # the Gluon Hopper forward where it covers a call (else the general Triton kernel)
    sm90_backward: bool = True  # the one-pass Gluon Hopper backward where it covers a call (else two passes)
    tma: bool = True  # tensor-descriptor loads on Hopper
    split: str = "auto"  # split a launch's last round of tiles: by the measured rule, never, or wherever it can
    fast_launch: bool = True  # relaunch compiled kernels directly (``_launch``), skipping Triton's argument binding

    def key(self) -> tuple:
        """The switches that change which kernel a call runs, for the call plans' keys."""
        return (self.autotune, self.sm90_forward, self.sm90_backward, self.tma, self.split, self.fast_launch)


CONFIG = KernelConfig(autotune=os.environ.get("STDIT_AUTOTUNE", "1") != "0")


@contextlib.contextmanager
def override(**switches) -> Iterator[KernelConfig]:
    """Set some of :data:`CONFIG`'s switches inside the ``with`` block (restored after), e.g.
    ``override(sm90_forward=False)`` to time the general kernel."""
    known = {f.name for f in fields(KernelConfig)}
    bad = sorted(set(switches) - known)
    if bad:
        raise ValueError(f"unknown kernel switch(es) {bad}; known: {sorted(known)}")
    if "split" in switches and switches["split"] not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}; got {switches['split']!r}")
    old = {name: getattr(CONFIG, name) for name in switches}
    for name, value in switches.items():
        setattr(CONFIG, name, value)
    try:
        yield CONFIG
    finally:
        for name, value in old.items():
            setattr(CONFIG, name, value)
