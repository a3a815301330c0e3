"""Checkpoint loading with clear errors, and ``stdit push``.

Saving, sharding and the Hub round-trip are diffusers' ``ModelMixin`` (safetensors only); this module turns its
loading failures and silent partial loads into one :class:`CheckpointError` that says what is wrong.
"""

from __future__ import annotations

import argparse
from pathlib import Path

# Files a single-file checkpoint comes as; such a name is a local path, never a Hub repo id.
_WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".gguf")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as it is: corrupt file, or missing / unexpected / mis-shaped keys."""


def _fmt(keys, limit: int = 8) -> str:
    keys = sorted(keys)
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_pretrained(load, name_or_path, strict: bool = True, **kwargs):
    """Call diffusers' ``from_pretrained`` (``load``) and raise :class:`CheckpointError` on a bad checkpoint.

    ``strict=False`` accepts missing/unexpected keys (they are still listed in a warning by diffusers) and a
    config.json with missing or unknown fields (warned). Only safetensors weights load; their stored checksums are
    checked unless ``verify_checksums=False`` (see :mod:`stdit.model_files`).
    """
    from stdit import model_files

    # A local path that does not exist is said to be missing here; diffusers would try it as a Hub repo id and
    # blame the network (or the Hub) after its retries.
    check_local_or_repo(name_or_path, "model")
    local = Path(str(name_or_path)).expanduser()
    if local.is_dir() and not (where := local / (kwargs.get("subfolder") or "")).joinpath("config.json").is_file():
        raise FileNotFoundError(f"{where}: no config.json, so not a model directory (one written by save_pretrained "
                                "holds config.json and its safetensors weights).")
    want_info = kwargs.pop("output_loading_info", False)
    verify = kwargs.pop("verify_checksums", True)
    model_files.refuse_pickle(name_or_path, kwargs)
    if hasattr(load, "__self__"):  # the class whose from_pretrained this is
        model_files.check_saved_config(load.__self__, name_or_path, kwargs, strict)
    kwargs["use_safetensors"] = True  # never diffusers' fallback to a pickle .bin
    try:
        model, info = load(name_or_path, output_loading_info=True, **kwargs)
    except OSError as e:
        model_files.refuse_pickle(name_or_path, kwargs, e)
        if "Unable to load weights from checkpoint file" in str(e) or "safetensors" in type(e.__cause__).__name__.lower():
            raise CheckpointError(
                f"{name_or_path}: a weights file is corrupt or truncated and cannot be read as safetensors ({e}). "
                "Re-download it (huggingface-cli download --force-download) or save the model again.") from e
        raise
    except ValueError as e:
        if "expected shape" in str(e):
            raise CheckpointError(f"{name_or_path}: a weight has the wrong shape for this config: {e}".split(
                " If you want")[0] + " Check that config.json matches the weights.") from e
        raise
    files = model_files.weight_files(name_or_path, kwargs.get("subfolder"), kwargs.get("variant"),
                                     kwargs.get("cache_dir"), kwargs.get("revision"))
    model_files.verify_files(files, model, check_crc=verify)
    problems = []
    if info.get("mismatched_keys"):
        problems.append(f"mis-shaped keys: {_fmt(k for k, *_ in info['mismatched_keys'])}")
    if strict and info.get("missing_keys"):
        problems.append(f"missing keys: {_fmt(info['missing_keys'])}")
    if strict and info.get("unexpected_keys"):
        problems.append(f"unexpected keys: {_fmt(info['unexpected_keys'])}")
    if problems:
        raise CheckpointError(
            f"{name_or_path}: the weights do not match the model config ({'; '.join(problems)}). "
            "Check that config.json belongs to these weights; pass strict=False to load a partial checkpoint.")
    return (model, info) if want_info else model


def check_local_or_repo(name_or_path: str | Path, what: str = "model") -> None:
    """Fail at once on a local path that does not exist, instead of trying it as a Hub repo id (where a typo costs
    network retries and ends in an error about the Hub).

    A name is taken as local when it cannot be an ``org/name`` repo id: an absolute or ``./``/``~`` path, more than
    one ``/``, a weights-file suffix, a single name (Hub diffusers repos have an owner), or an ``org`` part that is a
    local directory.
    """
    s = str(name_or_path)
    if Path(s).expanduser().exists():
        return
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(s)
        repo_like = s.count("/") == 1 and not Path(s.split("/")[0]).is_dir()
    except HFValidationError:
        repo_like = False
    if not repo_like or s.lower().endswith(_WEIGHT_SUFFIXES):
        raise FileNotFoundError(f"{what} {s!r}: no such local file or directory (and not a Hub repo id, which has "
                                "the form org/name).")


# ---- `stdit push` --------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", help="a directory written by save_pretrained or a training run's model/ folder "
                   "(a LoRA run's adapter, pytorch_lora_weights.safetensors, is pushed as an adapter repo)")
    p.add_argument("repo_id", help="Hub repo id, e.g. my-org/stdit-tiny")
    p.add_argument("--private", action="store_true", help="create the repo as private")
    p.add_argument("--token", default=None, help="Hub token (default: the logged-in token / HF_TOKEN)")
    p.add_argument("--message", default=None, help="commit message (default: Upload StDiT / Upload LoRA adapter)")


def run(args: argparse.Namespace) -> int:
    from huggingface_hub import get_token
    from huggingface_hub.utils import validate_repo_id

    from stdit.lora import WEIGHT_NAME, push_adapter
    from stdit.model import StDiT

    # Everything that can be checked here is, before the model is loaded or a repo created.
    validate_repo_id(args.repo_id)
    if not (args.token or get_token()):
        raise ValueError("no Hugging Face token: log in with `hf auth login` (or `huggingface-cli login`), set "
                         "HF_TOKEN, or pass --token.")
    model_dir = Path(args.model_dir)
    has_config = (model_dir / "config.json").is_file()
    if not has_config and (model_dir / WEIGHT_NAME).is_file():
        push_adapter(model_dir, args.repo_id, private=args.private, token=args.token,
                     message=args.message or "Upload LoRA adapter")
        print(f"pushed the LoRA adapter {model_dir / WEIGHT_NAME} to {args.repo_id}")
        return 0
    if not has_config:
        raise FileNotFoundError(f"{model_dir} is not a saved model directory (no config.json); push a directory "
                                "written by save_pretrained, e.g. runs/tiny/model, or a LoRA run's model/ (with "
                                f"{WEIGHT_NAME}).")
    model = StDiT.from_pretrained(model_dir)  # refuses a corrupt or mismatched checkpoint before uploading
    model.push_to_hub(args.repo_id, private=args.private, token=args.token,
                      commit_message=args.message or "Upload StDiT")
    print(f"pushed {args.model_dir} to {args.repo_id}")
    return 0
