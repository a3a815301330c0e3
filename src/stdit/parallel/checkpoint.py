"""Atomic, verifiable training checkpoints with ``torch.distributed.checkpoint`` (DCP).

Layout: ``<root>/step_00000100/`` holds the DCP files (model, optimizer, EMA; sharded as the run was), one
``rng-<rank>.safetensors`` per rank, and ``meta.json`` (step, scheduler, data position, and the size and CRC-32 of
every file). All of it is written into ``<root>/.tmp-step_00000100/`` and renamed into place only when complete,
so a run killed at any moment leaves either a whole checkpoint or none. Loading re-checks sizes and CRCs, so a
truncated or corrupted checkpoint is reported by name and the previous good one is used instead.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
import zlib
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from stdit.hub import CheckpointError as _ModelCheckpointError
from stdit.parallel.dist import DistInfo, barrier, broadcast_object

META = "meta.json"
PREFIX = "step_"


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns that it assumes one process when there is no process group; that is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


class CheckpointError(_ModelCheckpointError):
    """A training checkpoint that is missing, incomplete or corrupt (a ``stdit.CheckpointError``)."""


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return crc


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"{PREFIX}{step:08d}"


def list_checkpoints(root: str | Path) -> list[Path]:
    """Finished checkpoints under ``root``, oldest first (temp dirs of interrupted saves are not listed)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def verify_checkpoint(path: str | Path) -> dict[str, Any]:
    """Check every file of a checkpoint against its manifest; return the metadata or raise CheckpointError."""
    path = Path(path)
    meta_path = path / META
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist.")
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} has no {META}: it was not completely written.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint {path}: {META} is corrupt ({e}).") from None
    for name, (size, crc) in meta.get("files", {}).items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path}: file {name} is missing.")
        actual = f.stat().st_size
        if actual != size:
            raise CheckpointError(f"checkpoint {path}: file {name} is truncated or altered "
                                  f"({actual} bytes, expected {size}).")
        if _crc32(f) != crc:
            raise CheckpointError(f"checkpoint {path}: file {name} is corrupt (CRC-32 mismatch).")
    return meta


def save_checkpoint(root: str | Path, step: int, model, optimizer, info: DistInfo, ema=None,
                    extra: dict[str, Any] | None = None, rng: dict[str, torch.Tensor] | None = None,
                    keep: int = 2) -> Path:
    """Write checkpoint ``step`` atomically (every rank must call this); prune all but the newest ``keep``."""
    root = Path(root)
    final = checkpoint_dir(root, step)
    tmp = root / f".tmp-{final.name}"
    if info.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    if ema is not None:
        state["ema"] = ema.state_dict()
    with _quiet_single_process():
        dcp.save(state, checkpoint_id=str(tmp))
    save_file({k: v.contiguous() for k, v in (rng or {}).items()}, str(tmp / f"rng-{info.rank}.safetensors"))
    barrier()
    if info.is_main:
        files = {}
        for f in sorted(tmp.iterdir()):
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())
            files[f.name] = (f.stat().st_size, _crc32(f))
        meta = {"step": step, "world_size": info.world_size, "files": files, **(extra or {})}
        with open(tmp / META, "w") as fh:
            json.dump(meta, fh)
            fh.flush()
            os.fsync(fh.fileno())
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def find_resume(root: str | Path, resume: str, info: DistInfo, log=print) -> Path | None:
    """The checkpoint to resume from, agreed on by all ranks.

    ``resume="none"``: none. ``"auto"``: the newest checkpoint under ``root`` that verifies; bad ones are reported
    and skipped. A path: that checkpoint, or a CheckpointError that names the newest good one, if any.
    """
    if resume == "none":
        return None
    choice: str | None = None
    error: str | None = None
    if info.is_main:
        if resume == "auto":
            for ckpt in reversed(list_checkpoints(root)):
                try:
                    verify_checkpoint(ckpt)
                    choice = str(ckpt)
                    break
                except CheckpointError as e:
                    log(f"warning: {e} Falling back to an earlier checkpoint.")
        else:
            try:
                verify_checkpoint(resume)
                choice = resume
            except CheckpointError as e:
                good = []
                for c in reversed(list_checkpoints(Path(resume).parent)):
                    try:
                        verify_checkpoint(c)
                        good.append(str(c))
                        break
                    except CheckpointError:
                        continue
                hint = f" The newest good checkpoint is {good[0]}." if good else " No good checkpoint was found."
                error = f"{e}{hint}"
    choice, error = broadcast_object((choice, error))
    if error:
        raise CheckpointError(error)
    return Path(choice) if choice else None


def load_checkpoint(path: str | Path, model, optimizer, info: DistInfo, ema=None) -> tuple[dict, dict]:
    """Load a verified checkpoint into ``model``, ``optimizer`` and ``ema`` in place.

    Returns the metadata and this rank's saved RNG tensors (empty when the world size changed).
    """
    path = Path(path)
    meta = json.loads((path / META).read_text())
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    if ema is not None:
        state["ema"] = ema.state_dict()
    try:
        with _quiet_single_process():
            dcp.load(state, checkpoint_id=str(path))
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} could not be loaded into this model/optimizer ({e}).") from e
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    if ema is not None:
        ema.load_state_dict(state["ema"])
    rng_file = path / f"rng-{info.rank}.safetensors"
    rng = load_file(str(rng_file)) if rng_file.is_file() and meta.get("world_size") == info.world_size else {}
    return meta, rng
