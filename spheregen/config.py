"""Typed configuration: TOML experiment files -> frozen attrs objects.

Every component config is a frozen, keyword-only attrs class registered with its
component. :func:`structure` turns plain data into those classes strictly: unknown keys,
wrong types and unknown component names raise :class:`ConfigError` naming the file, the
key path and the allowed values. Nothing is ignored or patched up.

Two rules hold for every config class, the plugins' included: no float option takes NaN
or ±inf (none is meant to: an infinite guidance or learning rate would run and write
real-looking numbers from saturated samples), and every integer option named ``seed``
or ``*_seed`` lies in [0, 2**32) (torch and numpy seed range).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Literal

import attrs

from spheregen.errors import ConfigError, RegistryError


@attrs.frozen
class Component:
    """A named component and its validated config (an instance of the registered
    config class). In TOML either ``"name"`` or ``{ name = "name", key = value, ... }``."""

    name: str
    config: Any

    def to_dict(self, identity: bool = False) -> dict[str, Any]:
        return {"name": self.name, **to_dict(self.config, identity)}


def component_field(kind: str, default: str | None = None) -> Any:
    """An attrs field holding a :class:`Component` of ``kind`` (built from ``default``
    with its default config when omitted)."""
    if default is None:
        return attrs.field(metadata={"kind": kind})
    return attrs.field(factory=lambda: make_component(kind, default), metadata={"kind": kind})


def make_component(kind: str, name: str, **options: Any) -> Component:
    """Build a Component from python values (used by defaults and tests)."""
    return _structure_component(kind, {"name": name, **options}, "", "<python>")


# ---------------------------------------------------------------- structuring


def structure(cls: type, data: Any, path: str = "", source: str = "<python>") -> Any:
    """Strictly convert ``data`` (dicts, lists, scalars) to ``cls``."""
    return _convert(cls, data, path, source, kind=None)


def _where(source: str, path: str) -> str:
    return f"{source}: key '{path}'" if path else f"{source}"


def _structure_attrs(cls: type, data: Any, path: str, source: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{_where(source, path)} must be a table of {cls.__name__} options, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in attrs.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(key, fields, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(
            f"{_where(source, _join(path, key))}: unknown key.{hint} "
            f"Allowed keys of {cls.__name__}: {', '.join(fields) or '(none)'}"
        )
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            if f.default is attrs.NOTHING:
                raise ConfigError(f"{_where(source, _join(path, name))}: required key is missing")
            continue
        kind = f.metadata.get("kind")
        kwargs[name] = _convert(hints[name], data[name], _join(path, name), source, kind)
        _check_seed(name, kwargs[name], _join(path, name), source)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        key = _failing_field(cls, kwargs)
        where = _where(source, _join(path, key)) if key else _where(source, path)
        raise ConfigError(f"{where}: invalid {cls.__name__}: {exc}") from exc


SEED_RANGE = 2**32


def _check_seed(name: str, value: Any, path: str, source: str) -> None:
    if (name == "seed" or name.endswith("_seed")) and isinstance(value, int) and not 0 <= value < SEED_RANGE:
        raise ConfigError(f"{_where(source, path)}: seed {value} is outside [0, 2**32); choose a seed in that range")


def _failing_field(cls: type, kwargs: dict[str, Any]) -> str | None:
    """The first given field whose own validator rejects its value (so the error can
    name the key), or None when the failure is a cross-field check."""
    for f in attrs.fields(cls):
        if f.name in kwargs and f.validator is not None:
            try:
                f.validator(None, f, kwargs[f.name])
            except (ValueError, TypeError):
                return f.name
            except Exception:  # a validator that needs the instance: not this one's to judge
                continue
    return None


def _join(path: str, key: Any) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else str(key)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(tp: Any, value: Any, path: str, source: str, kind: str | None) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if tp is Component:
        return _structure_component(kind, value, path, source)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        errors = []
        for a in non_none:
            try:
                return _convert(a, value, path, source, kind)
            except ConfigError as exc:
                errors.append(str(exc))
        # a scalar given for "float | list", or a list: the error of the alternative of that shape
        shaped = [e for a, e in zip(non_none, errors)
                  if (typing.get_origin(a) in (tuple, list)) == isinstance(value, (list, tuple))]
        if len(errors) == 1 or len(shaped) == 1:
            raise ConfigError((shaped or errors)[0])
        options = " or ".join(str(list(typing.get_args(a))) if typing.get_origin(a) is Literal else _type_name(a)
                              for a in non_none)
        raise ConfigError(f"{_where(source, path)}: {value!r} is not allowed; expected {options}")
    if origin is Literal:
        if value not in args or type(value) is not type(next(a for a in args if a == value)):
            raise ConfigError(f"{_where(source, path)}: {value!r} is not allowed; choose one of {list(args)}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{_where(source, path)}: expected a list, got {value!r}")
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise ConfigError(f"{_where(source, path)}: expected a list of {len(args)} values, got {value!r}")
            items = [_convert(a, v, _join(path, i), source, kind) for i, (a, v) in enumerate(zip(args, value))]
        else:
            item_tp = args[0] if args else Any
            items = [_convert(item_tp, v, _join(path, i), source, kind) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{_where(source, path)}: expected a table, got {value!r}")
        return dict(value)
    if attrs.has(tp):
        return _structure_attrs(tp, value, path, source)
    return _scalar(tp, value, path, source)


def _scalar(tp: Any, value: Any, path: str, source: str) -> Any:
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
        if ok and not math.isfinite(value):
            raise ConfigError(f"{_where(source, path)}: {value} is not a finite number; give a finite value")
    elif tp is str:
        ok = isinstance(value, str)
    else:
        raise TypeError(f"config type {tp!r} at {path} is not supported by spheregen.config")
    if not ok:
        raise ConfigError(f"{_where(source, path)}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    return value


def _structure_component(kind: str | None, value: Any, path: str, source: str) -> Component:
    from spheregen.plugins import registries

    if kind is None:
        raise TypeError(f"Component field at {path} has no kind; declare it with component_field(kind)")
    if isinstance(value, Component):
        return value
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, dict) or "name" not in value:
        raise ConfigError(
            f"{_where(source, path)}: a {kind} is given as \"name\" or {{ name = \"...\", <options> }}, got {value!r}"
        )
    options = dict(value)
    name = options.pop("name")
    registry = registries()[kind]
    try:
        entry = registry.get(name)
    except RegistryError as exc:
        raise ConfigError(f"{_where(source, _join(path, 'name'))}: {exc}") from None
    return Component(name, _structure_attrs(entry.config_cls, options, path, source))


# ---------------------------------------------------------------- unstructuring


def to_dict(obj: Any, identity: bool = False) -> Any:
    """Plain data (JSON-able) from configs, components, tuples. ``identity``: only what
    identifies the config (for :func:`config_hash`): fields with metadata
    ``identity = False`` (declarations that are checked, not used) are left out."""
    if isinstance(obj, Component):
        return obj.to_dict(identity)
    if attrs.has(type(obj)):
        return {f.name: to_dict(getattr(obj, f.name), identity) for f in attrs.fields(type(obj))
                if f.init and not _omitted(f, getattr(obj, f.name), identity)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v, identity) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v, identity) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _omitted(field: attrs.Attribute, value: Any, identity: bool) -> bool:
    # fields marked omit_if_default (added after results existed) stay out of the dict at
    # their default, so adding them changes no existing config hash
    if field.metadata.get("omit_if_default") and value == field.default:
        return True
    return identity and field.metadata.get("identity") is False


def config_hash(obj: Any) -> str:
    """A short, stable hash of what identifies a config (for caches and result rows)."""
    blob = json.dumps(to_dict(obj, identity=True), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def read_toml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: no such experiment file")
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{p}: not UTF-8 text (byte {exc.start}: {exc.reason}); TOML files are UTF-8: "
                          "re-save the file as UTF-8") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}") from exc
