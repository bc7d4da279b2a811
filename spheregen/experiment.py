"""The experiment file: one TOML per comparison, loaded into frozen attrs objects.

Layout (every key optional unless marked)::

    name = "quickstart"                  # required; reports/<name>/, runs/<name>/
    seed = 0
    [data]    source = "mnist-5k", image_size, channels, fit, flip, ...
    [train]   steps, batch_size, lr, ... (defaults for every method)
    [eval]    steps = [1, 2, 4, 8], num_samples, metrics = ["fid", "kid"], ...
    [[methods]]
    name = "fm-pixel"                    # required; the run id
    method = { name = "flow-matching", ... }   # required
    sampler = "euler"                    # default: the method's default sampler
    guidance = 1.0
    steps = [1, 2, 4]                    # default: eval.steps
    [methods.train]                      # overrides of [train] for this method
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import attrs

from spheregen.config import Component, ConfigError, component_field, read_toml, structure

_RUN_ID = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


def _check_run_id(value: str) -> None:
    if not _RUN_ID.match(value):
        raise ValueError(f"method name {value!r} must be lowercase letters, digits, '-' or '_'")


def _positive(_inst: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is not None and value <= 0:
        raise ValueError(f"'{attribute.name}' must be > 0, got {value}")


def _fraction(_inst: Any, attribute: attrs.Attribute, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"'{attribute.name}' must be in [0, 1), got {value}")


def _steps(_inst: Any, attribute: attrs.Attribute, value: tuple[int, ...] | None) -> None:
    if value is None:
        return
    if not value or any(s < 1 for s in value):
        raise ValueError(f"'{attribute.name}' must be a non-empty list of step counts >= 1, got {list(value)}")


@attrs.frozen(kw_only=True)
class DataConfig:
    """Which data and how it is shaped for the models.

    ``fit``: ``resize-crop`` resizes the shorter side to ``image_size`` (bicubic, nearest
    at <= 64 px as the official code) then centre-crops; ``pad`` centre-pads smaller
    images with black (the reference recipe's 28 -> 32 MNIST) and refuses larger ones.
    ``channels``: 3 replicates grayscale to RGB and drops alpha; 1 converts to luminance.
    When the source has no ``test_split``, ``test_fraction`` of train is held out
    (seeded) for the metrics' classifier and rFID.
    ``num_classes`` declares the label count for commands that do not load the data
    (``spheregen flops`` on a hub dataset); when the data is loaded it must agree.
    """

    source: Component = component_field("dataset")
    image_size: int = attrs.field(default=32, validator=_positive)
    channels: Literal[1, 3] = 3
    fit: Literal["resize-crop", "pad"] = "resize-crop"
    flip: bool = False
    train_split: str = "train"
    test_split: str | None = None
    test_fraction: float = attrs.field(default=0.1, validator=_fraction)
    max_examples: int | None = attrs.field(default=None, validator=_positive)
    num_classes: int | None = attrs.field(default=None, validator=attrs.validators.optional(attrs.validators.ge(0)),
                                          metadata={"omit_if_default": True, "identity": False})


@attrs.frozen(kw_only=True)
class TrainConfig:
    """Optimisation budget and recipe. ``steps`` counts optimizer steps; images seen =
    steps × batch_size × grad_accum. ``ema_decay = 0`` disables EMA.

    ``cache_latents = "auto"``: a method on a frozen, lossy tokenizer (one with
    ``latent_loss``) gets the training split encoded once before the first step, both
    orientations when ``data.flip``, kept on the training device when they take at most
    ``cache_latents_max_gb``; otherwise (or with ``"off"``) every batch is encoded as it
    is drawn. The tokenizer is deterministic and frozen, so both paths train on the same
    latents up to float rounding of the encoder's batch composition."""

    steps: int = attrs.field(default=1000, validator=_positive)
    batch_size: int = attrs.field(default=64, validator=_positive)
    grad_accum: int = attrs.field(default=1, validator=_positive)
    lr: float = attrs.field(default=1e-3, validator=_positive)
    min_lr_ratio: float = attrs.field(default=0.01, validator=_fraction)
    warmup_fraction: float = attrs.field(default=0.05, validator=_fraction)
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    ema_decay: float = attrs.field(default=0.0, validator=_fraction)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    checkpoint_every: int = attrs.field(default=0, validator=attrs.validators.ge(0))
    log_every: int = attrs.field(default=10, validator=_positive)
    num_workers: int = attrs.field(default=0, validator=attrs.validators.ge(0))
    cache_latents: Literal["auto", "off"] = attrs.field(default="auto", metadata={"omit_if_default": True})
    cache_latents_max_gb: float = attrs.field(default=4.0, validator=attrs.validators.gt(0),
                                              metadata={"omit_if_default": True})


@attrs.frozen(kw_only=True)
class EvalConfig:
    """Sampling and scoring. Samples are class-balanced (label i % num_classes) and
    drawn with ``seed``; ``reference`` picks the real images the metrics compare to."""

    steps: tuple[int, ...] = attrs.field(default=(1, 2, 4, 8), validator=_steps)
    num_samples: int = attrs.field(default=1000, validator=_positive)
    batch_size: int = attrs.field(default=250, validator=_positive)
    metrics: tuple[Component, ...] = attrs.field(factory=tuple, metadata={"kind": "metric"})
    reference: Literal["train", "test"] = "train"
    grid_per_class: int = attrs.field(default=8, validator=_positive)
    use_ema: bool = True
    seed: int = 2
    throughput_batch: int = attrs.field(default=64, validator=_positive)


@attrs.frozen(kw_only=True)
class MethodEntry:
    """One method of the comparison; ``train`` is the experiment's [train] with this
    method's overrides applied."""

    name: str = attrs.field(validator=lambda _i, _a, v: _check_run_id(v))
    method: Component = component_field("method")
    sampler: Component | None = attrs.field(default=None, metadata={"kind": "sampler"})
    guidance: float = attrs.field(default=1.0, validator=attrs.validators.ge(0.0))
    steps: tuple[int, ...] | None = attrs.field(default=None, validator=_steps)
    train: TrainConfig = attrs.field(factory=TrainConfig)


@attrs.frozen(kw_only=True)
class Experiment:
    name: str
    seed: int = 0
    data: DataConfig = attrs.field(factory=DataConfig)
    train: TrainConfig = attrs.field(factory=TrainConfig)
    eval: EvalConfig = attrs.field(factory=EvalConfig)
    methods: tuple[MethodEntry, ...] = ()
    source: str = "<python>"

    def method(self, name: str) -> MethodEntry:
        for m in self.methods:
            if m.name == name:
                return m
        raise ConfigError(f"{self.source}: no method named {name!r}; methods: {[m.name for m in self.methods]}")

    def steps_for(self, entry: MethodEntry) -> tuple[int, ...]:
        return entry.steps or self.eval.steps


def load_experiment(path: str | Path) -> Experiment:
    """Read and validate an experiment file; every error names the file and key."""
    raw = read_toml(path)
    return experiment_from_dict(raw, str(path))


def experiment_from_dict(raw: dict[str, Any], source: str = "<python>") -> Experiment:
    raw = dict(raw)
    if "source" in raw:
        raise ConfigError(f"{source}: key 'source' is reserved; remove it")
    train_defaults = raw.get("train", {})
    if not isinstance(train_defaults, dict):
        raise ConfigError(f"{source}: key 'train' must be a table")
    methods = raw.get("methods", [])
    if not isinstance(methods, list) or not methods:
        raise ConfigError(f"{source}: needs at least one [[methods]] table (name = ..., method = ...)")
    merged = []
    for i, m in enumerate(methods):
        if not isinstance(m, dict):
            raise ConfigError(f"{source}: key 'methods[{i}]' must be a table")
        overrides = m.get("train", {})
        if not isinstance(overrides, dict):
            raise ConfigError(f"{source}: key 'methods[{i}].train' must be a table")
        merged.append({**m, "train": {**train_defaults, **overrides}})
    raw["methods"] = merged
    exp = structure(Experiment, raw, "", source)
    exp = attrs.evolve(exp, source=source)
    names = [m.name for m in exp.methods]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ConfigError(f"{source}: method names must be unique; repeated: {sorted(dup)}")
    return exp
