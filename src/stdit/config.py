"""YAML configs: a ``model:`` section of :class:`~stdit.model.StDiT` arguments plus any other sections.

Files are read with a YAML loader that refuses duplicate keys (PyYAML keeps the last one silently) and remembers
the line of every key, so each error names the file, the line, the key and what is valid there.
"""

from __future__ import annotations

import importlib.resources
import inspect
import math
from pathlib import Path
from typing import Any

import yaml

# configs/ ships as the package stdit.configs (pyproject.toml): found the same way installed or from a checkout.
CONFIG_DIR = Path(str(importlib.resources.files("stdit.configs")))


class ConfigError(ValueError):
    """A config file or value that cannot be used as it is (one message: file, line, key, what is valid)."""


class LocatedDict(dict):
    """A YAML mapping that remembers the line (1-based) each of its keys was written on."""

    def __init__(self, *args, lines: dict[Any, int] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.lines: dict[Any, int] = dict(lines or {})


class _Loader(yaml.SafeLoader):
    pass


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> LocatedDict:
    loader.flatten_mapping(node)
    out = LocatedDict()
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        if key in out.lines:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first written on line {out.lines[key]}); a mapping holds each "
                "key once, so merge the two into one", key_node.start_mark)
        out[key] = loader.construct_object(value_node, deep=True)
        out.lines[key] = line
    return out


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
# A loaded config dumps back like the plain mapping it is (yaml.safe_dump refuses unknown dict subclasses).
yaml.SafeDumper.add_representer(LocatedDict, yaml.representer.SafeRepresenter.represent_dict)


def _yaml_error(source: str, text: str, e: yaml.YAMLError, with_line: bool) -> ConfigError:
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    if mark is None:
        return ConfigError(f"{source}: invalid YAML: {problem}.")
    detail = problem
    context, context_mark = getattr(e, "context", None), getattr(e, "context_mark", None)
    if context:
        started = f" that starts on line {context_mark.line + 1}" if context_mark and context_mark.line != mark.line \
            else ""
        detail += f" ({context.removeprefix('while ')}{started})"
    if problem == "mapping values are not allowed here":
        detail += " (a missing ':' on the line before, or a value with ': ' in it that needs quotes?)"
    lines = text.splitlines()
    here = lines[mark.line].strip() if mark.line < len(lines) else ""
    where = f"{source}:{mark.line + 1}" if with_line else source
    return ConfigError(f"{where}: invalid YAML: {detail}" + (f"; the line reads {here!r}." if here else "."))


def parse_yaml(text: str, source: str = "config", with_line: bool = True):
    """``text`` parsed as YAML (mappings are :class:`LocatedDict`); a syntax error or a duplicate key is one
    :class:`ConfigError` naming ``source`` and the line."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        raise _yaml_error(source, text, e, with_line) from None


def key_lines(raw: dict) -> dict[tuple[str, str], int]:
    """``{(section, key): line}`` for every key of every section of a config read by :func:`load_config`."""
    out = {}
    for section, values in raw.items():
        if isinstance(values, LocatedDict):
            out.update({(section, k): line for k, line in values.lines.items()})
    return out


def locate(source: str, lines: dict | None, section: str, key: str) -> str:
    """Where a key was set, for an error message: ``file:line: section.key`` (or ``source: section.key``)."""
    line = (lines or {}).get((section, key))
    if line == "override":
        return f"{source}: override {section}.{key}"
    return f"{source}:{line}: {section}.{key}" if isinstance(line, int) else f"{source}: {section}.{key}"


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
    """Read a YAML config file into a dict (an empty file gives ``{}``); sections remember their keys' lines."""
    p = resolve_config_path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not a text (UTF-8) file ({e.reason} at byte {e.start}).") from None
    data = parse_yaml(text, str(p))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level of a config must be a mapping of sections, got {type(data).__name__}.")
    return data


# What each model key may hold: (kind, lowest value, null allowed). The model checks the choices of
# attention_mode / qk_norm and the RoPE split itself; here a value gets the type and range its meaning needs.
_MODEL_KEYS: dict[str, tuple[str, float | None, bool]] = {
    "patch_size": ("int3", 1, False),
    "num_attention_heads": ("int", 1, False),
    "attention_head_dim": ("int", 1, False),
    "in_channels": ("int", 1, False),
    "out_channels": ("int", 1, True),
    "text_dim": ("int", 1, True),
    "freq_dim": ("int", 1, False),
    "ffn_dim": ("int", 1, False),
    "num_layers": ("int", 1, False),
    "cross_attn_norm": ("bool", None, False),
    "qk_norm": ("str", None, True),
    "eps": ("float", 0, False),
    "rope_theta": ("float", 0, False),
    "rope_axes_dim": ("int3", 0, True),
    "num_classes": ("int", 1, True),
    "condition_channels": ("int", 0, False),
    "attention_mode": ("str", None, False),
    "prediction_type": ("str", None, False),
    "image_dim": ("int", 1, True),
    "added_kv_proj_dim": ("int", 1, True),
    "pos_embed_seq_len": ("int", 1, True),
}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_model_value(where: str, key: str, value):
    kind, lo, nullable = _MODEL_KEYS[key]
    null = " or null" if nullable else ""
    if value is None:
        if nullable:
            return None
        raise ConfigError(f"{where}: null is not allowed here.")
    if kind == "int3":
        if not (isinstance(value, (list, tuple)) and len(value) == 3 and all(_is_int(v) and v >= lo for v in value)):
            example = "[1, 2, 2] (pt, ph, pw)" if key == "patch_size" else "[44, 42, 42] (t, h, w; even, summing to " \
                "attention_head_dim)"
            raise ConfigError(f"{where}: got {value!r}; expected a list of three ints{null}, each in [{lo}, inf), "
                              f"e.g. {example}.")
        return tuple(value)
    if kind == "int":
        if not _is_int(value) or value < lo:
            raise ConfigError(f"{where}: got {value!r}; expected an int{null}, valid range [{lo}, inf).")
        return value
    if kind == "float":
        if isinstance(value, str):
            try:
                value = float(value)  # YAML 1.1 reads "1e-6" as a string
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= lo:
            raise ConfigError(f"{where}: got {value!r}; expected a number, valid range ({lo}, inf), "
                              "finite.")
        return float(value)
    if kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: got {value!r}; expected true or false.")
        return value
    if not isinstance(value, str):
        raise ConfigError(f"{where}: got {value!r}; expected a string{null}.")
    return value


def model_kwargs(section: dict[str, Any], source: str = "model config",
                 lines: dict | None = None) -> dict[str, Any]:
    """Validate a ``model:`` mapping against StDiT's arguments: unknown keys get one error listing the valid ones,
    and each value its type and range (``lines``: ``{("model", key): line}`` for the messages)."""
    from stdit.model import StDiT

    if lines is None and isinstance(section, LocatedDict):
        lines = {("model", k): line for k, line in section.lines.items()}
    valid = [n for n in inspect.signature(StDiT.__init__).parameters if n != "self"]
    unknown = sorted(set(section) - set(valid), key=str)
    if unknown:
        line = (lines or {}).get(("model", unknown[0]))
        where = f"{source}:{line}" if isinstance(line, int) else source
        raise ConfigError(f"{where}: unknown model key(s) {unknown}; valid keys: {', '.join(valid)}.")
    return {k: (_check_model_value(locate(source, lines, "model", k), k, v) if k in _MODEL_KEYS else v)
            for k, v in section.items()}


def load_model_config(path: str | Path) -> dict[str, Any]:
    """The validated ``model:`` section of a YAML config."""
    data = load_config(path)
    if "model" not in data or not isinstance(data["model"], dict):
        raise ConfigError(f"{path}: no 'model:' section (a mapping of StDiT arguments) found.")
    return model_kwargs(data["model"], source=str(path))
