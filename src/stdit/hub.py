"""Checkpoint loading with clear errors, and ``stdit push``.

Saving, sharding and the Hub round-trip are diffusers' ``ModelMixin`` (safetensors only); this module turns its
loading failures and silent partial loads into one :class:`CheckpointError` that says what is wrong.
"""

from __future__ import annotations

import argparse


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as it is: corrupt file, or missing / unexpected / mis-shaped keys."""


def _fmt(keys, limit: int = 8) -> str:
    keys = sorted(keys)
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_pretrained(load, name_or_path, strict: bool = True, **kwargs):
    """Call diffusers' ``from_pretrained`` (``load``) and raise :class:`CheckpointError` on a bad checkpoint.

    ``strict=False`` accepts missing/unexpected keys (they are still listed in a warning by diffusers).
    """
    want_info = kwargs.pop("output_loading_info", False)
    try:
        model, info = load(name_or_path, output_loading_info=True, **kwargs)
    except OSError as e:
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


# ---- `stdit push` --------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", help="a directory written by save_pretrained (or a training run's export)")
    p.add_argument("repo_id", help="Hub repo id, e.g. my-org/stdit-tiny")
    p.add_argument("--private", action="store_true", help="create the repo as private")
    p.add_argument("--token", default=None, help="Hub token (default: the logged-in token / HF_TOKEN)")
    p.add_argument("--message", default="Upload StDiT", help="commit message")


def run(args: argparse.Namespace) -> int:
    from stdit.model import StDiT

    model = StDiT.from_pretrained(args.model_dir)  # refuses a corrupt or mismatched checkpoint before uploading
    model.push_to_hub(args.repo_id, private=args.private, token=args.token, commit_message=args.message)
    print(f"pushed {args.model_dir} to {args.repo_id}")
    return 0
