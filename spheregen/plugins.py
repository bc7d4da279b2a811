"""Loads plugins from the ``spheregen`` entry-point group and fills the registries.

Built-ins are listed in this project's own pyproject exactly like a third party's, so
they are loaded by the same code. ``SPHEREGEN_PLUGINS`` (comma-separated entry-point
names) restricts what is loaded.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
from typing import Any, Iterable

import pluggy

from spheregen import hookspecs
from spheregen.errors import PluginError, SpheregenError
from spheregen.registry import KINDS, Provider, Registry

GROUP = "spheregen"


class Registries:
    """One :class:`Registry` per kind, filled by the loaded plugins."""

    def __init__(self) -> None:
        self.by_kind = {kind: Registry(kind) for kind in KINDS}

    def __getitem__(self, kind: str) -> Registry:
        return self.by_kind[kind]

    def __getattr__(self, kind: str) -> Registry:
        try:
            return self.__dict__["by_kind"][kind]
        except KeyError:
            raise AttributeError(kind) from None


def new_plugin_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(GROUP)
    pm.add_hookspecs(hookspecs)
    return pm


def _selected() -> set[str] | None:
    raw = os.environ.get("SPHEREGEN_PLUGINS", "").strip()
    return {p.strip() for p in raw.split(",") if p.strip()} if raw else None


def load_entry_points(pm: pluggy.PluginManager) -> dict[str, Provider]:
    """Import every selected entry point of the group; returns plugin name -> provider."""
    selected = _selected()
    providers: dict[str, Provider] = {}
    for ep in importlib.metadata.entry_points(group=GROUP):
        if selected is not None and ep.name not in selected:
            continue
        if ep.name in providers:
            continue  # the same distribution seen twice on sys.path
        dist = getattr(ep, "dist", None)
        provider = Provider(ep.name, dist.name if dist else "unknown", dist.version if dist else "unknown")
        try:
            module = ep.load()
        except Exception as exc:
            raise PluginError(f"{provider}: importing '{ep.value}' failed: {type(exc).__name__}: {exc}") from exc
        pm.register(module, name=ep.name)
        providers[ep.name] = provider
    if selected:
        missing = selected - set(providers)
        if missing:
            raise PluginError(
                f"SPHEREGEN_PLUGINS names {sorted(missing)}, which no installed distribution provides; "
                f"installed plugins: {sorted(ep.name for ep in importlib.metadata.entry_points(group=GROUP))}"
            )
    return providers


def fill(pm: pluggy.PluginManager, providers: dict[str, Provider]) -> Registries:
    """Call every plugin's register hooks, one plugin at a time, so each entry records
    its provider and a failure names the plugin and the hook."""
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"a plugin implements a hook spheregen does not define: {exc}") from exc
    regs = Registries()
    for kind, hook_name in hookspecs.HOOKS.items():
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            provider = providers.get(impl.plugin_name, Provider(impl.plugin_name))
            register = functools.partial(regs[kind].add, provider=provider)
            try:
                impl.function(register=register)
            except SpheregenError:
                raise
            except Exception as exc:
                raise PluginError(f"{provider} failed in hook {hook_name}: {type(exc).__name__}: {exc}") from exc
    return regs


def build_registries(extra: Iterable[tuple[str, Any]] = ()) -> Registries:
    """Load entry points (plus ``extra`` (name, module) pairs, used by tests) and fill."""
    pm = new_plugin_manager()
    providers = load_entry_points(pm)
    for name, module in extra:
        pm.register(module, name=name)
        providers[name] = Provider(name, "in-process", "-")
    return fill(pm, providers)


_current: Registries | None = None


def registries() -> Registries:
    """The process-wide registries, loaded once."""
    global _current
    if _current is None:
        _current = build_registries()
    return _current


def set_registries(regs: Registries | None) -> Registries | None:
    """Replace the process-wide registries (tests add in-process plugins this way);
    None reloads from entry points on next use. Returns the previous value."""
    global _current
    previous, _current = _current, regs
    return previous
