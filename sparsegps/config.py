"""Typed configs: dataclasses loaded from YAML, overridable from the command line, saved with each run.

Every config is a tree of dataclasses. `load_config(Cls, "file.yaml", ["a.b=3"])` reads the file,
applies `key=value` overrides (values parsed as YAML), and builds `Cls`, rejecting unknown keys
and wrong types before any work starts.
"""
from __future__ import annotations

import dataclasses
import types
from pathlib import Path
from typing import Any, Literal, Sequence, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from sparsegps.errors import UsageError

T = TypeVar("T")


class ConfigError(UsageError, ValueError):
    """A config with an unknown key, a wrong type, or a bad override."""


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp, where: str):
    origin = get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {type(value).__name__}")
        return from_dict(tp, value, where)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: {value!r} matches none of {_type_name(tp)}")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{where}: {value!r} is not one of {list(get_args(tp))}")
        return value
    if origin in (list, Sequence, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        kt, vt = get_args(tp) or (Any, Any)
        return {_coerce(k, kt, where): _coerce(v, vt, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "2e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict, where: str = "") -> T:
    """Build dataclass `cls` from a mapping; unknown keys and wrong types raise `ConfigError`."""
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where or cls.__name__}: unknown key(s) {unknown}; known: {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(value, hints[name], f"{where}.{name}" if where else name)
    try:
        built = cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where or cls.__name__}: {e}") from None
    check_limits(built, where)
    return built


def check_limits(cfg, where: str = "") -> None:
    """`ConfigError` naming the key and its allowed range when a field of `cfg` breaks its class's
    `LIMITS` (a ClassVar mapping field name -> ">= 1", "> 0", ...; None values are not checked)."""
    limits: dict[str, str] = {}
    for klass in reversed(type(cfg).__mro__):  # a subclass adds to its bases' limits
        limits.update(vars(klass).get("LIMITS", {}))
    for name, rule in limits.items():
        value = getattr(cfg, name)
        if value is None or isinstance(value, bool):
            continue
        op, bound = rule.split()
        if not (value > float(bound) if op == ">" else value >= float(bound)):
            key = f"{where}.{name}" if where else name
            raise ConfigError(f"{key}: {value!r} is out of range; allowed: {rule}")


def to_dict(cfg) -> dict:
    """Plain nested dicts/lists, ready for YAML or JSON."""
    def plain(v):
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, Path):
            return str(v)
        return v
    return plain(cfg)


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """Apply `a.b.c=value` overrides (value parsed as YAML) to a nested mapping, in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: cannot parse value ({e})") from None
        set_value(data, key, value, f"override {item!r}")
    return data


def set_value(data: dict, key: str, value: Any, where: str = "") -> dict:
    """Set the dotted `key` of a nested mapping to `value` as given (not parsed: a command-line flag's
    path stays a path whatever it spells), in place."""
    node = data
    parts = key.strip().split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{where or key}: {p} is not a section")
    node[parts[-1]] = value
    return data


def read_yaml_mapping(path: str | Path) -> dict:
    """The mapping at the top of a YAML file; `ConfigError` for a missing file, bad YAML or a non-mapping."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return data


def merge_mappings(base: dict, update: dict) -> dict:
    """`base` with `update` written over it, section by section (a list or value replaces)."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            value = merge_mappings(merged[key], value)
        merged[key] = value
    return merged


def read_config_file(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """The YAML mapping at `path`; a top-level `base: OTHER.yaml` (relative to this file) is read
    first and this file's keys are written over it."""
    path = Path(path)
    if path.resolve() in _seen:
        raise ConfigError(f"{path}: its base chain loops ({' -> '.join(str(p) for p in _seen)} -> {path})")
    data = read_yaml_mapping(path)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base must be a path to a YAML config, got {base!r}")
    return merge_mappings(read_config_file(path.parent / base, (*_seen, path.resolve())), data)


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = (),
                values: dict[str, Any] | None = None) -> T:
    """Read YAML at `path` (with its `base` chain; or start from the defaults), apply the `key=value`
    overrides (values parsed as YAML), then `values` ({dotted key: value}, as given: a command's
    flags), and build `cls`."""
    data: dict = read_config_file(path) if path is not None else {}
    apply_overrides(data, overrides)
    for key, value in (values or {}).items():
        set_value(data, key, value)
    try:
        return from_dict(cls, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None


def differences(a, b, prefix: str = "") -> list[tuple[str, object, object]]:
    """(dotted key, value in a, value in b) of every field where two configs of one class differ."""
    out = []
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if dataclasses.is_dataclass(x) and dataclasses.is_dataclass(y):
            out += differences(x, y, f"{prefix}{f.name}.")
        elif x != y:
            out.append((f"{prefix}{f.name}", x, y))
    return out


def save_config(cfg, path: str | Path) -> None:
    """Write the resolved config as YAML next to a run's output (atomically)."""
    from sparsegps.files import atomic_write_text
    atomic_write_text(Path(path), yaml.safe_dump(to_dict(cfg), sort_keys=False))


__all__ = ["ConfigError", "apply_overrides", "from_dict", "load_config", "merge_mappings", "read_config_file",
           "read_yaml_mapping", "save_config", "to_dict"]
