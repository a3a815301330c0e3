"""YAML configs: a ``model:`` section of :class:`~stdit.model.StDiT` arguments plus any other sections."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


def resolve_config_path(path: str | Path) -> Path:
    """A config path as given, or a bare name such as ``"tiny"`` looked up in the repository's ``configs/``."""
    p = Path(path)
    if p.is_file():
        return p
    for candidate in (CONFIG_DIR / p, CONFIG_DIR / f"{p}.yaml"):
        if candidate.is_file():
            return candidate
    known = sorted(q.stem for q in CONFIG_DIR.glob("*.yaml")) if CONFIG_DIR.is_dir() else []
    raise FileNotFoundError(f"Config {str(path)!r} not found; give a YAML path or one of: {', '.join(known)}.")


def load_config(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into a dict (an empty file gives ``{}``)."""
    p = resolve_config_path(path)
    with open(p) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{p}: the top level of a config must be a mapping of sections, got {type(data).__name__}.")
    return data


def model_kwargs(section: dict[str, Any], source: str = "model config") -> dict[str, Any]:
    """Validate a ``model:`` mapping against StDiT's arguments; unknown keys get one error listing valid ones."""
    from stdit.model import StDiT

    valid = [n for n in inspect.signature(StDiT.__init__).parameters if n != "self"]
    unknown = sorted(set(section) - set(valid))
    if unknown:
        raise ValueError(f"{source}: unknown model key(s) {unknown}; valid keys: {', '.join(valid)}.")
    kwargs = dict(section)
    for key in ("patch_size", "rope_axes_dim"):
        if kwargs.get(key) is not None:
            kwargs[key] = tuple(kwargs[key])
    return kwargs


def load_model_config(path: str | Path) -> dict[str, Any]:
    """The validated ``model:`` section of a YAML config."""
    data = load_config(path)
    if "model" not in data or not isinstance(data["model"], dict):
        raise ValueError(f"{path}: no 'model:' section (a mapping of StDiT arguments) found.")
    return model_kwargs(data["model"], source=str(path))
