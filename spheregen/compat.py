"""Which sampler fits which method, from what samplers declare.

A sampler's optional ``requires`` (see :class:`spheregen.interfaces.Sampler`) lists what it
calls on a method: capability protocols, checked with :func:`spheregen.interfaces.lacks`
(members, ``Literal`` values, the parameters each method must take), or attribute names,
checked with ``hasattr``. Neither calls the method, so one built on the meta device
(shapes, no weights, no data) answers in milliseconds: a misfit pairing is refused when
the experiment is loaded, not after training. A sampler that declares nothing is assumed
to fit every method.
"""

from __future__ import annotations

from typing import Any

import torch

from spheregen.errors import ConfigError
from spheregen.interfaces import BuildContext, DataSpec, lacks
from spheregen.plugins import registries

# the data `spheregen list` builds every method for (the contract tests' size)
LIST_SPEC = DataSpec(image_size=16, channels=3, num_classes=10)


def _gap(method: Any, need: Any) -> str | None:
    """``need`` (a protocol, with what ``method`` lacks of it, or an attribute name) when
    ``method`` does not meet it, else None."""
    if isinstance(need, str):
        return None if hasattr(method, need) else need
    gaps = lacks(method, need)
    return f"{need.__name__} ({', '.join(gaps)})" if gaps else None


def missing(sampler: Any, method: Any) -> list[str]:
    """The sampler's declared requirements that ``method`` does not meet ([]: it fits)."""
    return [gap for need in getattr(sampler, "requires", ()) if (gap := _gap(method, need)) is not None]


def meta_context(spec: DataSpec) -> BuildContext:
    """A context that builds architectures only: meta device, no data, no cache."""

    def build(kind: str, component: Any, ctx: BuildContext) -> Any:
        name, cfg = (component, None) if isinstance(component, str) else (component.name, component.config)
        return _build(kind, name, cfg, ctx)

    return BuildContext.create(build, data=spec, device=torch.device("meta"))


def _config(kind: str, name: str) -> Any:
    """The config `spheregen list` builds a component with: ``tiny()`` when the class has
    one, else the defaults."""
    cls = registries()[kind].get(name).config_cls
    return cls.tiny() if hasattr(cls, "tiny") else cls()


def _build(kind: str, name: str, cfg: Any, ctx: BuildContext) -> Any:
    with torch.device("meta"):
        return registries()[kind].build(name, cfg if cfg is not None else _config(kind, name), ctx)


def fitting_samplers(method: Any, ctx: BuildContext) -> list[str]:
    """Names of the registered samplers (default configs) whose requirements ``method`` meets."""
    return [e.name for e in registries().sampler if not missing(_build("sampler", e.name, None, ctx), method)]


def check_pair(where: str, method_name: str, method: Any, sampler_name: str, sampler: Any,
               ctx: BuildContext) -> None:
    """ConfigError naming the method, the sampler, what the method lacks and the samplers
    that fit, unless ``sampler`` fits ``method``."""
    gaps = missing(sampler, method)
    if gaps:
        fits = fitting_samplers(method, ctx)
        raise ConfigError(
            f"{where}: sampler '{sampler_name}' does not fit method '{method_name}': the sampler needs "
            f"{', '.join(gaps)}, which {type(method).__name__} lacks. Samplers that fit '{method_name}': "
            f"{', '.join(fits) or '(none registered)'}"
        )


def fit_table() -> dict[str, list[str]]:
    """{sampler: registered methods it fits}, each method built from its ``tiny()`` config
    (else its defaults) on the meta device for :data:`LIST_SPEC`. A method that cannot be
    built so (it needs a user-given option) is left out of every list."""
    ctx = meta_context(LIST_SPEC)
    methods = {}
    for e in registries().method:
        try:
            methods[e.name] = _build("method", e.name, None, ctx)
        except (TypeError, ValueError, ConfigError):
            continue
    samplers = {e.name: _build("sampler", e.name, None, ctx) for e in registries().sampler}
    return {s: [m for m, method in methods.items() if not missing(sampler, method)] for s, sampler in samplers.items()}
