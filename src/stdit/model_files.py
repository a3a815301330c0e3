"""What ``StDiT.save_pretrained`` / ``from_pretrained`` add to diffusers' file handling.

- **Checksums.** ``save_pretrained`` stores a CRC-32 of every tensor's bytes in its safetensors file's metadata
  (``__metadata__["stdit.crc32"]``, so the file stays a plain safetensors file that diffusers, safetensors and the
  Hub read as before). ``from_pretrained`` re-checks them when present and names the corrupt tensors.
  Detected: any changed byte in a tensor's data, a tensor added to or removed from a stamped file, a header that no
  longer parses. Not detected: files written without a stamp (by diffusers' Wan, other tools, older stdit), which
  load unverified; a stamp rewritten together with the data (CRC-32 is an integrity check, not a signature); a
  changed ``config.json`` (see the config checks below).
- **No pickle.** Only safetensors weights load; a directory or repo with only ``.bin`` / ``.pt`` weights is refused
  (``torch.load`` of an untrusted file can run code, and its ``weights_only`` mode has had escapes).
- **Dtype class.** A float parameter whose tensor in the file is an integer or bool is refused (diffusers would
  cast it silently).
- **config.json.** A StDiT config missing a field, or holding one StDiT does not know, is refused: the defaults of
  ``StDiT.__init__`` are a 1.3B Wan's, not the saved model's. Values of the wrong type get one error naming the file.
"""

from __future__ import annotations

import difflib
import inspect
import json
import os
import shutil
import zlib
from pathlib import Path

from stdit.hub import CheckpointError

CRC_KEY = "stdit.crc32"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Fields added to StDiT after models were first saved. None is what a model saved before them computes (no Wan
# image branch, no VACE control blocks), and strict weight loading refuses a file that has those weights.
ADDED_LATER = {"image_dim": None, "added_kv_proj_dim": None, "pos_embed_seq_len": None, "vace_layers": None,
               "vace_in_channels": None}
_HUB_KWARGS = ("cache_dir", "force_download", "proxies", "token", "local_files_only", "revision", "subfolder")
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit


def _crc_range(f, start: int, length: int) -> int:
    f.seek(start)
    crc = 0
    while length > 0:
        chunk = f.read(min(length, 1 << 24))
        if not chunk:
            raise EOFError
        crc = zlib.crc32(chunk, crc)
        length -= len(chunk)
    return crc


def read_header(path: Path) -> tuple[dict, int]:
    """The safetensors header of ``path`` and the offset its data starts at."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 2 <= n <= _MAX_HEADER:
                raise ValueError(f"header length {n}")
            return json.loads(f.read(n)), 8 + n
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e}); re-download it or save the model "
                              "again.") from None


def _tensor_crcs(path: Path, header: dict, start: int) -> dict[str, str]:
    with open(path, "rb") as f:
        return {k: f"{_crc_range(f, start + v['data_offsets'][0], v['data_offsets'][1] - v['data_offsets'][0]):08x}"
                for k, v in header.items() if k != "__metadata__"}


def stamp_file(path: Path) -> None:
    """Store the CRC-32 of each tensor in ``path``'s safetensors metadata (rewrites the file, atomically)."""
    header, start = read_header(path)
    meta = dict(header.get("__metadata__") or {})
    if CRC_KEY in meta:
        return
    meta[CRC_KEY] = json.dumps(_tensor_crcs(path, header, start), separators=(",", ":"), sort_keys=True)
    header["__metadata__"] = meta
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors pads its header to 8 bytes
    tmp = path.with_name(f".{path.name}.stdit-tmp")
    with open(path, "rb") as src, open(tmp, "wb") as dst:
        dst.write(len(raw).to_bytes(8, "little"))
        dst.write(raw)
        src.seek(start)
        shutil.copyfileobj(src, dst, 1 << 24)
    os.replace(tmp, path)


def _locate(name_or_path, filename: str, subfolder: str | None, cache_dir, revision) -> Path | None:
    if os.path.isdir(name_or_path):
        p = Path(name_or_path, subfolder or "", filename)
        return p if p.is_file() else None
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(str(name_or_path), f"{subfolder}/{filename}" if subfolder else filename,
                                       cache_dir=cache_dir, revision=revision)
    except Exception:  # an unusual repo id or cache: nothing to verify, diffusers' load already succeeded
        return None
    return Path(found) if isinstance(found, str) else None


def weight_files(name_or_path, subfolder: str | None = None, variant: str | None = None, cache_dir=None,
                 revision=None) -> list[Path]:
    """The safetensors files a ``from_pretrained`` of this directory / cached repo reads (index shards or one)."""
    from diffusers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFETENSORS_WEIGHTS_NAME, _add_variant

    index = _locate(name_or_path, _add_variant(SAFE_WEIGHTS_INDEX_NAME, variant), subfolder, cache_dir, revision)
    if index is not None:
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: the shard index is corrupt ({e}).") from None
        return [p for s in shards if (p := _locate(name_or_path, s, subfolder, cache_dir, revision)) is not None]
    single = _locate(name_or_path, _add_variant(SAFETENSORS_WEIGHTS_NAME, variant), subfolder, cache_dir, revision)
    return [single] if single is not None else []


def stamp_directory(directory, variant: str | None = None, every_file: bool = False) -> None:
    """Stamp the weight files ``save_pretrained`` wrote to ``directory`` (``every_file``: all its safetensors)."""
    files = sorted(Path(directory).glob("*.safetensors")) if every_file else weight_files(directory, variant=variant)
    for f in files:
        stamp_file(f)


def verify_files(files: list[Path], model, check_crc: bool = True) -> None:
    """Refuse corrupt tensors (against the stored CRC-32s, with ``check_crc``) and integer/bool tensors in float
    slots (always: it reads only the headers)."""
    slots = {k: v.is_floating_point() for k, v in model.state_dict().items()}
    corrupt, wrong_class = [], []
    for path in files:
        header, start = read_header(path)
        meta = header.get("__metadata__") or {}
        for key, info in header.items():
            if key != "__metadata__" and slots.get(key) and not str(info.get("dtype", "")).startswith(("F", "BF")):
                wrong_class.append(f"{path.name}: {key} ({info.get('dtype')})")
        if not check_crc or CRC_KEY not in meta:
            continue
        try:
            stored = json.loads(meta[CRC_KEY])
        except ValueError:
            raise CheckpointError(f"{path}: the stored checksums are corrupt.") from None
        try:
            actual = _tensor_crcs(path, header, start)
        except EOFError:
            raise CheckpointError(f"{path} is truncated; re-download it or save the model again.") from None
        bad = sorted(k for k in set(stored) | set(actual) if stored.get(k) != actual.get(k))
        corrupt += [f"{path.name}: {k}" for k in bad]
    if wrong_class:
        raise CheckpointError(f"integer or bool tensors where the model has float parameters: "
                              f"{', '.join(sorted(wrong_class)[:8])}; these are not weights of this model.")
    if corrupt:
        more = f" (+{len(corrupt) - 8} more)" if len(corrupt) > 8 else ""
        raise CheckpointError(
            f"tensors that do not match the CRC-32 save_pretrained stored (the file is corrupt): "
            f"{', '.join(corrupt[:8])}{more}. Re-download it (huggingface-cli download --force-download) or save "
            "the model again.")


def refuse_pickle(name_or_path, kwargs: dict, error: Exception | None = None) -> None:
    """One clear error for pickle weights (asked for with ``use_safetensors=False``, or the only ones there)."""
    if kwargs.get("use_safetensors") is False:
        raise CheckpointError("StDiT loads safetensors weights only (use_safetensors=False would read pickle "
                              "files, which can run code).")
    if error is None:
        return
    where = Path(name_or_path, kwargs.get("subfolder") or "")
    pickles = sorted(p.name for p in where.iterdir() if p.suffix in PICKLE_SUFFIXES) if where.is_dir() else []
    has_safetensors = where.is_dir() and any(where.glob("*.safetensors"))
    if not has_safetensors and (pickles or "no file named" in str(error)):
        found = f"holds only pickle weights ({', '.join(pickles)})" if pickles else "has no safetensors weights"
        raise CheckpointError(
            f"{where} {found}. StDiT loads safetensors only: a pickle file can run code when loaded. Convert it "
            "where you trust its source (load it with torch and save_pretrained it again).") from error


def check_saved_config(cls, name_or_path, kwargs: dict, strict: bool) -> None:
    """Refuse a StDiT ``config.json`` that lacks fields, has unknown ones or holds values of the wrong type."""
    import warnings

    from stdit.checks import check_config

    config = cls.load_config(name_or_path, **{k: kwargs[k] for k in _HUB_KWARGS if k in kwargs})
    where = Path(str(name_or_path), kwargs.get("subfolder") or "", "config.json")
    if config.get("_class_name", cls.__name__) != cls.__name__:
        return  # another class's config (a Wan one, through StDiT.from_wan): its fields come as kwargs
    params = [n for n in inspect.signature(cls.__init__).parameters if n != "self"]
    fields = {k: v for k, v in config.items() if not k.startswith("_")}
    missing = [n for n in params if n not in fields and n not in kwargs and n not in ADDED_LATER]
    from stdit.convert import _WAN_ONLY  # Wan fields a StDiT converted from Wan keeps in its config and ignores

    unknown = [k for k in fields if k not in params and k not in _WAN_ONLY]
    problems = []
    if missing:
        problems.append(f"missing {', '.join(missing)} (StDiT's defaults, which would be used, are a Wan-1.3B's, "
                        "not necessarily the saved model's)")
    for k in unknown:
        near = difflib.get_close_matches(k, params, n=1)
        problems.append(f"unknown field {k!r}" + (f" (did you mean {near[0]!r}?)" if near else ""))
    if problems:
        message = f"{where}: {'; '.join(problems)}."
        if strict:
            raise CheckpointError(message + " Fix config.json (or pass strict=False to load it anyway).")
        warnings.warn(message, UserWarning, stacklevel=4)
    try:
        check_config({**fields, **{k: v for k, v in kwargs.items() if k in params}})
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from None
