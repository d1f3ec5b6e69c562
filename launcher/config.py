"""YAML experiment files + ``key.sub=value`` overrides -> a validated :class:`Config`.

The builder walks the dataclass type hints, so unknown keys, wrong types and
values outside a ``Literal`` are rejected with the full dotted key and the
allowed values; range checks live in each section's ``__post_init__`` (in the
package that owns the section), whose ``ValueError`` becomes a ConfigError
naming the full dotted key.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from launcher.schema import Config, ConfigError

__all__ = ["Config", "ConfigError", "load_config", "apply_overrides", "from_dict", "to_dict", "flatten", "dump_yaml"]


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return f"a mapping of name to {_type_name(typing.get_args(tp)[1])}"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {type(None): "null", bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against type ``tp`` and return it converted (int -> float, nested dataclasses)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed or isinstance(value, bool) != isinstance(allowed[0], bool):
            raise ConfigError(f"{key}: {value!r} is not allowed; allowed values: {', '.join(map(repr, allowed))}")
        return value
    if origin in (Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            try:
                return _convert(value, arg, key)
            except ConfigError as e:
                errors.append((arg, e))
        for arg, e in errors:  # a mapping meant for a section: its own error names the bad field
            if dataclasses.is_dataclass(arg) and isinstance(value, dict):
                raise e
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_convert(v, item, f"{key}.{i}") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        _, item = typing.get_args(tp)
        return {str(k): _convert(v, item, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{key}: expected null, got {value!r}")
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 5e-4 (no dot) as a string; accept it as the number it is
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):  # YAML reads .inf and .nan as floats; no setting here means them
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp!r} at {key}")


def from_dict(cls: type, data: Any, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a plain mapping, validating every key.

    Raises:
        ConfigError: naming the dotted key, for unknown keys, missing required
            keys, wrong types, disallowed values and out-of-range values.
    """
    where = prefix or "config"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    dot = f"{prefix}." if prefix else ""
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{dot}{unknown[0]}: unknown key; allowed keys in {where}: {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], f"{dot}{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{dot}{name}: required key is missing")
    try:
        return cls(**kwargs)
    except ValueError as e:  # a section's own check: "field: message"; add where the section sits
        raise ConfigError(f"{dot}{e}") from None


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides to a raw mapping (values parsed as YAML).

    List items are addressed by index (``phases.0.epochs=3``). Unknown keys are
    inserted as given so that validation reports them by name.
    """
    out = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key.sub=value")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r}: empty key segment")
        node: Any = out
        for i, part in enumerate(parts[:-1]):
            node = _step(node, part, ".".join(parts[: i + 1]), create=True)
        last = parts[-1]
        if isinstance(node, list):
            idx = _index(node, last, key)
            node[idx] = _parse_value(text)
        elif isinstance(node, dict):
            node[last] = _parse_value(text)
        else:
            raise ConfigError(f"{key}: {'.'.join(parts[:-1])} is a value, not a section")
    return out


def _index(node: list, part: str, key: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"{key}: list index must be 0..{len(node) - 1}, got {part!r}")
    return int(part)


def _step(node: Any, part: str, key: str, create: bool) -> Any:
    if isinstance(node, list):
        return node[_index(node, part, key)]
    if not isinstance(node, dict):
        raise ConfigError(f"{key}: cannot descend into a value")
    if node.get(part) is None and create:
        node[part] = {}
    return node[part]


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML experiment file, apply overrides and validate."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a directory; give a YAML file (e.g. configs/quickstart.yaml)")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist (see configs/ for examples)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a UTF-8 text file (byte {e.start} is {e.object[e.start:e.start + 1]!r}); "
                          "save it as UTF-8 YAML") from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {_yaml_error_line(e)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    raw.setdefault("name", path.stem)
    return from_dict(Config, apply_overrides(raw, overrides or []))


def _yaml_error_line(e: yaml.YAMLError) -> str:
    """PyYAML's multi-line error as one line: where (line, column, 1-based) and what is wrong."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    context = getattr(e, "context", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}{problem}" + (f" ({context})" if context else "")


def to_dict(cfg: Any) -> dict:
    """Plain nested dict of a config (round-trips through :func:`from_dict`); ``name`` first where there is one."""
    d = dataclasses.asdict(cfg)
    return {"name": d.pop("name"), **d} if "name" in d else d


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}, "l": [{"x": 2}]}`` -> ``{"a.b": 1, "l.0.x": 2}`` (for MLflow params)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{key}."))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            for i, x in enumerate(v):
                out.update(flatten(x, f"{key}.{i}."))
        else:
            out[key] = v
    return out


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
