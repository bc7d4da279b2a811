"""One strict, generic registry per kind of component.

A registry is the single source of names: the CLI's ``list``, config validation and the
contract tests all read it. Registration checks the name, refuses duplicates (naming
both providers) and records which distribution provided each entry.
"""

from __future__ import annotations

import difflib
import re
from typing import Any, Callable, Iterator

import attrs

from spheregen.errors import RegistryError

KINDS = ("tokenizer", "denoiser", "sampler", "metric", "method", "dataset")
_NAME = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")


@attrs.frozen
class Provider:
    """Who registered an entry: the plugin (entry-point) name and its distribution."""

    plugin: str
    distribution: str = "unknown"
    version: str = "unknown"

    def __str__(self) -> str:
        return f"plugin '{self.plugin}' ({self.distribution} {self.version})"


@attrs.frozen
class Entry:
    kind: str
    name: str
    factory: Callable[..., Any]
    config_cls: type
    provider: Provider

    @property
    def doc(self) -> str:
        text = (self.factory.__doc__ or self.config_cls.__doc__ or "").strip()
        return text.splitlines()[0] if text else ""


class Registry:
    """Components of one kind, by name."""

    def __init__(self, kind: str):
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}; kinds are {KINDS}")
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def add(self, name: str, factory: Callable[..., Any], config_cls: type, provider: Provider) -> None:
        if not isinstance(name, str) or not _NAME.match(name):
            raise RegistryError(
                f"{provider} registers {self.kind} {name!r}: names are lowercase kebab-case "
                "(letters, digits, single '-'), e.g. 'flow-matching'"
            )
        if not callable(factory):
            raise RegistryError(f"{provider} registers {self.kind} '{name}' with a factory that is not callable")
        if not attrs.has(config_cls):
            raise RegistryError(
                f"{provider} registers {self.kind} '{name}' with config class {config_cls!r}, "
                "which is not an attrs class; use @attrs.frozen(kw_only=True)"
            )
        if name in self._entries:
            other = self._entries[name].provider
            raise RegistryError(
                f"duplicate {self.kind} '{name}': registered by {other} and again by {provider}; "
                "uninstall one of them or restrict loading with SPHEREGEN_PLUGINS"
            )
        self._entries[name] = Entry(self.kind, name, factory, config_cls, provider)

    def get(self, name: str) -> Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise RegistryError(self.unknown_message(name)) from None

    def unknown_message(self, name: Any) -> str:
        close = difflib.get_close_matches(str(name), self.names(), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return f"unknown {self.kind} {name!r}{hint}. Registered {self.kind}s: {', '.join(self.names()) or '(none)'}"

    def build(self, name: str, cfg: Any, ctx: Any) -> Any:
        entry = self.get(name)
        if not isinstance(cfg, entry.config_cls):
            raise TypeError(f"{self.kind} '{name}' needs a {entry.config_cls.__name__}, got {type(cfg).__name__}")
        return entry.factory(cfg, ctx)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry]:
        return iter(self._entries[n] for n in self.names())

    def __len__(self) -> int:
        return len(self._entries)
