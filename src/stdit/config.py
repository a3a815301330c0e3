"""YAML configs: a ``model:`` section of :class:`~stdit.model.StDiT` arguments plus any other sections.

Files are read with a YAML loader that refuses duplicate keys (PyYAML keeps the last one silently) and remembers
the line of every key, so each error names the file, the line, the key and what is valid there.
"""

from __future__ import annotations

import importlib.resources
import inspect
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


def _check_model_value(where: str, key: str, value):
    """``value`` as the model takes it (a tuple for a list, a number for YAML 1.1's "1e-6" string), or one error
    naming the file, line and key with what the value must be (:data:`stdit.checks.MODEL_VALUES`)."""
    from stdit.checks import MODEL_VALUES, model_value_problem

    if MODEL_VALUES[key][0] == "float" and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if (want := model_value_problem(key, value)) is not None:
        raise ConfigError(f"{where}: got {value!r}; must be {want}.")
    return tuple(value) if isinstance(value, list) else value


def model_kwargs(section: dict[str, Any], source: str = "model config",
                 lines: dict | None = None) -> dict[str, Any]:
    """Validate a ``model:`` mapping against StDiT's arguments: unknown keys get one error listing the valid ones,
    and each value its type and range (``lines``: ``{("model", key): line}`` for the messages)."""
    from stdit.checks import MODEL_VALUES
    from stdit.model import StDiT

    if lines is None and isinstance(section, LocatedDict):
        lines = {("model", k): line for k, line in section.lines.items()}
    valid = [n for n in inspect.signature(StDiT.__init__).parameters if n != "self"]
    unknown = sorted(set(section) - set(valid), key=str)
    if unknown:
        line = (lines or {}).get(("model", unknown[0]))
        where = f"{source}:{line}" if isinstance(line, int) else source
        raise ConfigError(f"{where}: unknown model key(s) {unknown}; valid keys: {', '.join(valid)}.")
    return {k: (_check_model_value(locate(source, lines, "model", k), k, v) if k in MODEL_VALUES else v)
            for k, v in section.items()}


def load_model_config(path: str | Path) -> dict[str, Any]:
    """The validated ``model:`` section of a YAML config."""
    data = load_config(path)
    if "model" not in data or not isinstance(data["model"], dict):
        raise ConfigError(f"{path}: no 'model:' section (a mapping of StDiT arguments) found.")
    return model_kwargs(data["model"], source=str(path))
