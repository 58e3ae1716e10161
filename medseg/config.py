"""Declarative job configs (``pipelines/*.yaml``): parsed with ``yaml.safe_load`` (no code is
ever evaluated), validated against dataclasses: unknown keys are errors with a suggestion,
values are type-checked, and every error names the file and the key."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from medseg.errors import ConfigError

__all__ = ["from_mapping", "read_yaml"]

T = TypeVar("T")


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except FileNotFoundError as exc:
        raise ConfigError("no such config file", path=p) from exc
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read YAML: {exc}", path=p) from exc
    if not isinstance(data, dict):
        raise ConfigError("a config must be a mapping of keys to values", path=p)
    return data


def _check_value(value: Any, tp: Any, where: str, path: Path | None) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping", path=path)
        return from_mapping(tp, value, path=path, where=where)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _check_value(value, a, where, path)
            except ConfigError as exc:
                errors.append(exc.reason)
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}", path=path)
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, got {value!r}", path=path)
        (item_tp, *_rest) = typing.get_args(tp) or (Any,)
        items = [_check_value(v, item_tp, f"{where}[{i}]", path) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}", path=path)
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}", path=path)
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}", path=path)
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}", path=path)
        return value
    return value


def from_mapping(cls: type[T], data: dict[str, Any], *, path: Path | None = None,
                 where: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, checking keys and types."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls} is not a dataclass")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{where}.{key}" if where else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else \
                f" (known: {', '.join(sorted(fields))})"
            raise ConfigError(f"unknown key {name!r}{hint}", path=path)
        kwargs[key] = _check_value(value, hints[key], name, path)
    missing = [n for n, f in fields.items() if n not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"missing key(s): {', '.join(prefix + m for m in missing)}", path=path)
    try:
        return cls(**kwargs)
    except ConfigError as exc:  # a record's own check: name the file it came from
        if exc.path is None:
            raise ConfigError(f"{where or 'config'}: {exc.reason}", path=path) from exc
        raise
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{where or 'config'}: {exc}", path=path) from exc
