"""attrs validators for component configs, one wording for every plugin:
``'name' must be <rule>, got <value>``. A value of None (an unset optional) passes."""

from __future__ import annotations

from typing import Any

import attrs


def _check(ok: bool, attribute: attrs.Attribute, rule: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"'{attribute.name}' must be {rule}, got {value!r}")


def positive(_inst: Any, attribute: attrs.Attribute, value: float | None) -> None:
    """> 0."""
    _check(value is None or value > 0, attribute, "> 0", value)


def non_negative(_inst: Any, attribute: attrs.Attribute, value: float | None) -> None:
    """>= 0."""
    _check(value is None or value >= 0, attribute, ">= 0", value)


def at_least_one(_inst: Any, attribute: attrs.Attribute, value: int | None) -> None:
    """>= 1 (counts and sizes)."""
    _check(value is None or value >= 1, attribute, ">= 1", value)


def fraction(_inst: Any, attribute: attrs.Attribute, value: float | None) -> None:
    """In [0, 1] (probabilities, weights of a mix)."""
    _check(value is None or 0.0 <= value <= 1.0, attribute, "in [0, 1]", value)


def acute_angle(_inst: Any, attribute: attrs.Attribute, value: float | None) -> None:
    """An angle in degrees in (0, 90)."""
    _check(value is None or 0.0 < value < 90.0, attribute, "an angle in degrees in (0, 90)", value)


def proper_fraction(_inst: Any, attribute: attrs.Attribute, value: float | None) -> None:
    """In [0, 1) (a share that must leave something: mask ratios, warmup)."""
    _check(value is None or 0.0 <= value < 1.0, attribute, "in [0, 1)", value)
