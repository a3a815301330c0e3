"""Atomic, verifiable training checkpoints with ``torch.distributed.checkpoint`` (DCP).

Layout: ``<root>/step_00000100/`` holds the DCP files (model, optimizer, EMA; sharded as the run was), one
``rng-<rank>.safetensors`` per rank, and ``meta.json`` (step, scheduler, data position, and the size and CRC-32 of
every file). All of it is written into ``<root>/.tmp-step_00000100/`` and renamed into place only when complete,
so a run killed at any moment leaves either a whole checkpoint or none. Re-saving a step that exists moves the old
one aside (``.old-step_...``) before the rename and deletes it only after, so there is no moment without one; an
interrupted swap is undone on the next resume. Loading re-checks sizes and CRCs, so a truncated or corrupted
checkpoint is reported by name and the previous good one is used instead; when none is good, resuming refuses.

Trust: DCP stores its ``.metadata`` as a pickle and non-tensor values as ``torch.save`` bytes. Both are read here
without running code from the file: ``.metadata`` through an unpickler that only builds DCP's metadata classes and
the torch/builtin types they hold, and the byte values with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import pickle
import shutil
import traceback
import warnings
import zlib
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from stdit.hub import CheckpointError as _ModelCheckpointError
from stdit.parallel.dist import DistInfo, barrier, broadcast_object

META = "meta.json"
PREFIX = "step_"
ASIDE = ".old-"


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns that it assumes one process when there is no process group; that is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


class CheckpointError(_ModelCheckpointError):
    """A training checkpoint that is missing, incomplete or corrupt (a ``stdit.CheckpointError``)."""


def _root_cause(e: BaseException) -> BaseException:
    """The first underlying exception of a DCP ``CheckpointException`` (which wraps each rank's failure)."""
    if isinstance(e, CheckpointException):
        for failure in e.failures.values():
            inner = failure[0] if isinstance(failure, tuple) else failure
            if isinstance(inner, BaseException):
                return _root_cause(inner)
    return e


def _is_disk_full(e: BaseException) -> bool:
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        e = _root_cause(e)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        e = e.__cause__ or e.__context__
    return False


def _short(e: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(c := _root_cause(e)), c)).strip()


def _gather_errors(err: str | None) -> list[str]:
    """Every rank's error (a collective: all ranks call it), so that all ranks fail together or none does."""
    if not dist.is_initialized():
        return [err] if err else []
    errs: list = [None] * dist.get_world_size()
    dist.all_gather_object(errs, err)
    return [f"rank {r}: {x}" if len(errs) > 1 else x for r, x in enumerate(errs) if x]


# DCP's metadata classes and the torch/builtin values they hold: nothing else may be built from a `.metadata` pickle
_DCP_MD = "torch.distributed.checkpoint.metadata"
_SAFE_GLOBALS = {
    (_DCP_MD, n) for n in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                           "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"), ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        value = getattr(torch, name, None) if module == "torch" else None
        if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
            return value
        raise pickle.UnpicklingError(f"{module}.{name} is not one of DCP's metadata types")


def read_dcp_metadata(path: str | Path):
    """DCP's ``.metadata`` of checkpoint ``path``, unpickled without running code from the file (or CheckpointError)."""
    md_path = Path(path) / ".metadata"
    if not md_path.is_file():
        raise CheckpointError(f"checkpoint {path} has no .metadata: it is not a torch.distributed.checkpoint "
                              "directory.")
    return _check_pickle(md_path)


def _check_pickle(md_path: Path):
    try:
        return _MetadataUnpickler(io.BytesIO(md_path.read_bytes())).load()
    except Exception as e:
        raise CheckpointError(f"checkpoint {md_path.parent}: {md_path.name} is not plain DCP metadata ({e}); it was "
                              "refused without running it. Only resume from checkpoints you wrote or trust.") from None


class _WeightsOnlyLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner, but non-tensor values (``torch.save`` bytes) load with ``weights_only=True``."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError(f"the value {read_item.dest_index.fqn} is not plain data; refused without "
                                  f"running it ({str(e).splitlines()[0]})") from None
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._traverse import set_element

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


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


def step_of(path: Path) -> int:
    return int(path.name[len(PREFIX):])


def recover_interrupted_swaps(root: str | Path) -> None:
    """Undo a re-save of a step that was killed after moving the old checkpoint aside (rank 0 only)."""
    root = Path(root)
    if not root.is_dir():
        return
    for aside in root.glob(f"{ASIDE}{PREFIX}*"):
        final = root / aside.name[len(ASIDE):]
        if final.is_dir():
            shutil.rmtree(aside, ignore_errors=True)  # the new one was renamed into place: the swap finished
        else:
            os.replace(aside, final)


def _options(trainable_only: bool) -> StateDictOptions | None:
    """Only the parameters that train (a LoRA run's adapters; the frozen base is reloaded from its checkpoint)."""
    return StateDictOptions(ignore_frozen_params=True, strict=False) if trainable_only else None


def save_checkpoint(root: str | Path, step: int, model, optimizer, info: DistInfo, ema=None,
                    extra: dict[str, Any] | None = None, rng: dict[str, torch.Tensor] | None = None,
                    keep: int = 2, trainable_only: bool = False) -> Path:
    """Write checkpoint ``step`` atomically (every rank must call this); prune all but the newest ``keep`` of those
    up to ``step`` (newer ones, e.g. left by a resume from an earlier checkpoint, are not touched).
    ``trainable_only``: the model's frozen parameters are left out.

    A failed write (disk full, ...) removes the partial temporary directory, keeps every earlier checkpoint, and
    raises one CheckpointError on every rank.
    """
    root = Path(root)
    final = checkpoint_dir(root, step)
    tmp = root / f".tmp-{final.name}"
    err = None
    if info.is_main:
        try:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        except OSError as e:
            err = _save_failure(root, step, e)
    errs = _gather_errors(err)
    if not errs:
        try:
            model_sd, optim_sd = get_state_dict(model, optimizer, options=_options(trainable_only))
            state = {"model": model_sd, "optim": optim_sd}
            if ema is not None:
                state["ema"] = ema.state_dict()
            with _quiet_single_process():
                dcp.save(state, checkpoint_id=str(tmp))
            save_file({k: v.contiguous() for k, v in (rng or {}).items()}, str(tmp / f"rng-{info.rank}.safetensors"))
        except (Exception, CheckpointException) as e:
            err = _save_failure(root, step, e)
        errs = _gather_errors(err)
    if not errs and info.is_main:
        try:
            _finish(root, final, tmp, step, info, extra, keep)
        except OSError as e:
            err = _save_failure(root, step, e)
    errs = errs or [e for e in [broadcast_object(err)] if e]
    if errs:
        if info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        barrier()
        raise CheckpointError(errs[0] if len(set(errs)) == 1 else "; ".join(errs))
    barrier()
    return final


def _save_failure(root: Path, step: int, e: BaseException) -> str:
    good = [c.name for c in list_checkpoints(root) if step_of(c) != step]
    kept = f"the earlier checkpoint {root / good[-1]} is intact" if good else "no earlier checkpoint exists"
    what = "no space left on device" if _is_disk_full(e) else f"the write failed ({_short(e)})"
    return (f"could not save checkpoint step {step} under {root}: {what}. The partial checkpoint was removed and "
            f"{kept}. Free space (or lower train.keep_ckpts, or pick another train.output_dir) and run the same "
            "command again to resume.")


def _finish(root: Path, final: Path, tmp: Path, step: int, info: DistInfo, extra, keep: int) -> None:
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
    aside = root / f"{ASIDE}{final.name}"
    if final.exists():  # moved aside, not deleted, so a kill before the rename below still leaves it
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(final, aside)
    os.replace(tmp, final)
    _fsync_dir(root)
    shutil.rmtree(aside, ignore_errors=True)
    older = [c for c in list_checkpoints(root) if step_of(c) <= step]
    for old in older[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def find_resume(root: str | Path, resume: str, info: DistInfo, log=print) -> Path | None:
    """The checkpoint to resume from, agreed on by all ranks.

    ``resume="none"``: none. ``"auto"``: the newest checkpoint under ``root`` that verifies; bad ones are reported
    and skipped; if there are checkpoints and none verifies, a CheckpointError naming each (nothing is changed).
    A path: that checkpoint, or a CheckpointError that names the newest good one, if any.
    """
    if resume == "none":
        return None
    choice: str | None = None
    error: str | None = None
    if info.is_main:
        if resume == "auto":
            recover_interrupted_swaps(root)
            bad = []
            for ckpt in reversed(list_checkpoints(root)):
                try:
                    verify_checkpoint(ckpt)
                    choice = str(ckpt)
                    break
                except CheckpointError as e:
                    bad.append(str(e))
                    log(f"warning: {e} Falling back to an earlier checkpoint.")
            if bad and choice is None:
                error = (f"every checkpoint under {root} is corrupt, so there is nothing to resume from: "
                         + "; ".join(bad) + " Nothing was changed or deleted. To start over, run with "
                         "train.resume=none and a new train.output_dir (keep or move this one); to resume from a "
                         "repaired copy, pass train.resume=PATH.")
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


def load_checkpoint(path: str | Path, model, optimizer, info: DistInfo, ema=None,
                    trainable_only: bool = False) -> tuple[dict, dict]:
    """Load a verified checkpoint into ``model``, ``optimizer`` and ``ema`` in place (``trainable_only``: as saved
    with it; the frozen parameters keep their values).

    Returns the metadata and this rank's saved RNG tensors (empty when the world size changed).
    """
    path = Path(path)
    meta = json.loads((path / META).read_text())
    read_dcp_metadata(path)  # refuses a crafted pickle before DCP unpickles it
    for rank_md in path.glob("__*.metadata"):  # per-rank metadata, which DCP falls back to: checked the same way
        _check_pickle(rank_md)
    options = _options(trainable_only)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
    state = {"model": model_sd, "optim": optim_sd}
    if ema is not None:
        state["ema"] = ema.state_dict()
    try:
        with _quiet_single_process():
            dcp.load(state, checkpoint_id=str(path), planner=_WeightsOnlyLoadPlanner())
    except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
        cause = _root_cause(e)
        if isinstance(cause, CheckpointError):
            raise CheckpointError(f"checkpoint {path}: {cause}") from None
        raise CheckpointError(f"checkpoint {path} could not be loaded into this model/optimizer "
                              f"({_short(e)}).") from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=options)
    if ema is not None:
        ema.load_state_dict(state["ema"])
    rng_file = path / f"rng-{info.rank}.safetensors"
    rng = load_file(str(rng_file)) if rng_file.is_file() and meta.get("world_size") == info.world_size else {}
    return meta, rng
