"""Typed dataclass configuration: defaults <- YAML file <- dotted ``key=value`` overrides.

Configs are plain (optionally nested) dataclasses whose fields all have defaults.
Every value is checked/coerced against its field annotation; unknown keys and
wrong types raise :class:`ConfigError` naming the full dotted key.
Only the stdlib and PyYAML are used.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePath
from typing import Any, Literal, TypeVar, Union

import yaml

from s4v.fileio import atomic_write_bytes

__all__ = ["ConfigError", "load_config", "config_from_dict", "config_to_dict", "dump_config"]

T = TypeVar("T")


class ConfigError(ValueError):
    """Invalid configuration: bad file, unknown key, wrong type or failed validation."""


# ----------------------------------------------------------------------------- helpers


def _join(prefix: str, key: object) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def _is_dc_type(tp: Any) -> bool:
    return typing.get_origin(tp) is None and isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _fields(cls: type) -> dict[str, Any]:
    """Init-able field name -> resolved annotation (in definition order)."""
    try:
        hints = typing.get_type_hints(cls)
    except Exception as e:  # unresolvable forward reference etc.
        raise ConfigError(f"cannot resolve type hints of {cls.__qualname__}: {e}") from e
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls) if f.init}


def _default(cls: type[T]) -> T:
    try:
        return cls()
    except TypeError as e:
        raise ConfigError(f"{cls.__qualname__} must be constructible without arguments: {e}") from e


def _section_type(tp: Any) -> type | None:
    """Dataclass type behind ``tp`` (also ``Optional[Section]``), else None."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = args[0] if len(args) == 1 else None
    return tp if _is_dc_type(tp) else None


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None):
        return "None"
    if origin is Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is not None:
        inner = ", ".join("..." if a is Ellipsis else _type_name(a) for a in args)
        return f"{getattr(origin, '__name__', origin)}[{inner}]"
    if _is_dc_type(tp):
        return f"{tp.__name__} section (mapping)"
    return getattr(tp, "__name__", str(tp))


def _fail(key: str, tp: Any, value: Any, expected: str | None = None) -> typing.NoReturn:
    expected = expected or _type_name(tp)
    raise ConfigError(f"{key}: expected {expected}, got {value!r} ({type(value).__name__})")


def _unknown(full: str, prefix: str, name: object, valid: Sequence[str]) -> ConfigError:
    match = difflib.get_close_matches(str(name), list(valid), n=1, cutoff=0.6)
    if match:
        return ConfigError(f"unknown config key '{full}'; did you mean '{_join(prefix, match[0])}'?")
    where = f" under '{prefix}'" if prefix else ""
    return ConfigError(f"unknown config key '{full}'; valid keys{where}: {', '.join(valid)}")


# ----------------------------------------------------------------------------- coercion


def _coerce(tp: Any, value: Any, key: str, current: Any = None) -> Any:
    """Check ``value`` against annotation ``tp``; return the (possibly converted) value."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any or tp is object:
        return value
    if origin in (Union, types.UnionType):
        if value is None:
            return None if type(None) in args else _fail(key, tp, value)
        members = [a for a in args if a is not type(None)]
        if len(members) == 1:  # Optional[X]: keep X's precise error message
            return _coerce(members[0], value, key, current)
        for member in members:
            with contextlib.suppress(ConfigError):
                return _coerce(member, value, key, current)
        _fail(key, tp, value)
    if origin is Literal:
        for choice in args:  # type check too, so True does not match Literal[1]
            if value == choice and type(value) is type(choice):
                return choice
        _fail(key, tp, value)
    if value is None:
        _fail(key, tp, value)
    if _is_dc_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            _fail(key, tp, value)
        return _merge(current if isinstance(current, tp) else _default(tp), value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        _fail(key, tp, value)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        _fail(key, tp, value)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            with contextlib.suppress(ValueError):
                return float(value)
        _fail(key, tp, value)
    if tp is str:
        return value if isinstance(value, str) else _fail(key, tp, value)
    if isinstance(tp, type) and issubclass(tp, PurePath):
        return tp(value) if isinstance(value, (str, PurePath)) else _fail(key, tp, value)
    if tp in (list, tuple) or origin in (list, tuple, Sequence):
        if not isinstance(value, (list, tuple)):
            _fail(key, tp, value)
        if (origin or tp) is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):  # fixed-length tuple[X, Y]
                _fail(key, tp, value, f"{_type_name(tp)} ({len(args)} items)")
            return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        elem = args[0] if args else Any
        items = [_coerce(elem, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if (origin or tp) is tuple else items
    if tp is dict or origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            _fail(key, tp, value)
        kt, vt = args if len(args) == 2 else (Any, Any)
        return {_coerce(kt, k, f"{key} (key {k!r})"): _coerce(vt, v, _join(key, k)) for k, v in value.items()}
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    _fail(key, tp, value)


def _merge(obj: T, data: Any, prefix: str) -> T:
    """Return a copy of dataclass ``obj`` with mapping ``data`` merged in (never mutates ``obj``)."""
    if not isinstance(data, Mapping):
        _fail(prefix or "config", type(obj), data)
    hints = _fields(type(obj))
    changes: dict[str, Any] = {}
    for name, value in data.items():
        full = _join(prefix, name)
        if name not in hints:
            raise _unknown(full, prefix, name, list(hints))
        changes[name] = _coerce(hints[name], value, full, getattr(obj, name))
    return dataclasses.replace(obj, **changes) if changes else obj


def _validate(obj: Any) -> None:
    """Call ``validate()`` on every dataclass instance, children before parents."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            _validate(getattr(obj, f.name))
        hook = getattr(obj, "validate", None)
        if callable(hook):
            hook()
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _validate(v)
    elif isinstance(obj, Mapping):
        for v in obj.values():
            _validate(v)


# ----------------------------------------------------------------------------- sources


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last one silently,
    so a second `model:` block would replace the first)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: its keys may be overridden here
                continue
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if isinstance(key, typing.Hashable) and key in seen:
                raise ConfigError(f"{self.name}: duplicate key {key!r} on line {line} (first on line "
                                  f"{seen[key]}); merge the two blocks")
            if isinstance(key, typing.Hashable):
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: str | Path) -> Mapping[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read config file {p}: {e}") from e
    if b"\0" in raw:
        raise ConfigError(f"config file {p} is not a YAML text file (binary content at byte {raw.index(bytes(1))}); "
                          "pass the experiment's .yaml file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ConfigError(f"config file {p} is not UTF-8 text (byte {e.start}, line {line}); save it as "
                          "UTF-8") from e
    loader = _UniqueKeyLoader(text)
    loader.name = str(p)
    try:
        data = loader.get_single_data()
    except yaml.YAMLError as e:
        raise ConfigError(f"cannot read config file {p}: {e}") from e
    finally:
        loader.dispose()
    if data is None:  # empty file
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"config file {p} must contain a mapping at top level, got {type(data).__name__}")
    return data


def _parse_override(cls: type, text: str) -> dict[str, Any]:
    """Turn ``a.b.c=value`` into ``{'a': {'b': {'c': value}}}``, checking the key path."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"invalid override {text!r}: expected key=value, e.g. model.num_frames=16")
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(f"invalid override key {key!r}: empty component")
    section: type = cls
    for i, part in enumerate(parts):
        hints, prefix = _fields(section), ".".join(parts[:i])
        if part not in hints:
            raise _unknown(_join(prefix, part), prefix, part, list(hints))
        if i < len(parts) - 1:
            sub = _section_type(hints[part])
            if sub is None:
                raise ConfigError(
                    f"cannot set '{key}': '{_join(prefix, part)}' is a {_type_name(hints[part])} value, not a section"
                )
            section = sub
    raw = raw.strip()
    try:
        value: Any = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{key}': cannot parse value {raw!r}: {e}") from e
    for part in reversed(parts):
        value = {part: value}
    return value


# ----------------------------------------------------------------------------- public API


def config_from_dict(cls: type[T], data: Mapping[str, Any]) -> T:
    """Build ``cls`` from its defaults plus a (nested) mapping; type-checked and validated."""
    cfg = _merge(_default(cls), data, "")
    _validate(cfg)
    return cfg


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Defaults of ``cls`` <- YAML mapping at ``path`` <- ``key=value`` overrides (in order)."""
    if not _is_dc_type(cls):
        raise TypeError(f"load_config expects a dataclass type, got {cls!r}")
    if isinstance(overrides, str):
        raise TypeError("overrides must be a sequence of 'key=value' strings, not a single str")
    cfg = _default(cls)
    if path is not None:
        cfg = _merge(cfg, _read_yaml(path), "")
    for text in overrides:
        cfg = _merge(cfg, _parse_override(cls, text), "")
    _validate(cfg)
    return cfg


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, PurePath):
        return str(value)
    return value


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-python (YAML-safe) nested dict of a config instance; tuples become lists."""
    if not (dataclasses.is_dataclass(cfg) and not isinstance(cfg, type)):
        raise TypeError(f"config_to_dict expects a dataclass instance, got {type(cfg).__name__}")
    return _plain(cfg)


def dump_config(cfg: Any, path: str | Path) -> Path:
    """Write ``cfg`` as YAML atomically (temp file in the same directory + ``os.replace``)."""
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False)
    return atomic_write_bytes(path, text.encode("utf-8"))
