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
    guidance = 1.0                       # or a list: the scale is chosen per step count
    steps = [1, 2, 4]                    # default: eval.steps
    [methods.train]                      # overrides of [train] for this method
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any, Literal

import attrs

from spheregen.config import Component, ConfigError, component_field, read_toml, structure
from spheregen.validators import non_negative, positive, proper_fraction

_RUN_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
# folders spheregen itself keeps beside the method runs of an experiment
RESERVED_METHOD_NAMES = ("samples", "fit")  # a folder of runs/<experiment>/, and run --jobs's fit job


def _check_name(what: str, value: str) -> None:
    """Experiment and method names become folder names under runs/ and reports/: one
    path component of lowercase letters, digits, '-' and '_' (no '/', '..', leading
    '.', or empty name), so no name can reach outside those roots or into the cache."""
    if not isinstance(value, str) or not _RUN_ID.match(value):
        raise ValueError(f"{what} name {value!r} must be 1-64 lowercase letters, digits, '-' or '_', "
                         "starting with a letter or digit")


def _check_run_id(value: str) -> None:
    _check_name("method", value)
    if value in RESERVED_METHOD_NAMES:
        raise ValueError(f"method name {value!r} is reserved (spheregen names its own folder or job so); rename it")


def _betas(_inst: Any, attribute: attrs.Attribute, value: tuple[float, float]) -> None:
    if not all(0.0 <= b < 1.0 for b in value):
        raise ValueError(f"'{attribute.name}' must be two numbers in [0, 1), got {list(value)}")


def _grid_classes(attribute: attrs.Attribute, value: int | tuple[int, ...]) -> None:
    if isinstance(value, int) and value < 1 or isinstance(value, tuple) and (not value or min(value) < 0):
        raise ValueError(f"'{attribute.name}' must be a count >= 1 or a non-empty list of class indices, got {value}")


def _steps(_inst: Any, attribute: attrs.Attribute, value: tuple[int, ...] | None) -> None:
    if value is None:
        return
    if not value or any(s < 1 for s in value):
        raise ValueError(f"'{attribute.name}' must be a non-empty list of step counts >= 1, got {list(value)}")


def _guidance(_inst: Any, attribute: attrs.Attribute, value: float | tuple[float, ...] | None) -> None:
    scales = value if isinstance(value, tuple) else () if value is None else (value,)
    if isinstance(value, tuple) and not value:
        raise ValueError(f"'{attribute.name}' must be a scale >= 0 or a non-empty list of scales, got []")
    if any(w < 0 for w in scales) or len(set(scales)) != len(scales):
        raise ValueError(f"'{attribute.name}' must be scales >= 0, each listed once, got {value}")


def _seeds(_inst: Any, attribute: attrs.Attribute, value: tuple[int, ...] | None) -> None:
    if value is None:
        return
    if not value or len(set(value)) != len(value) or any(not 0 <= s < 2**32 for s in value):
        raise ValueError(f"'{attribute.name}' must be a non-empty list of distinct seeds in [0, 2**32), got {value}")


def as_scales(value: float | tuple[float, ...]) -> tuple[float, ...]:
    return tuple(float(w) for w in value) if isinstance(value, tuple) else (float(value),)


@attrs.frozen(kw_only=True)
class DataConfig:
    """Which data and how it is shaped for the models.

    ``fit``: ``resize-crop`` resizes the shorter side to ``image_size`` (bicubic, nearest
    at <= 64 px as the official code) then centre-crops; ``pad`` centre-pads smaller
    images with black (the reference recipe's 28 -> 32 MNIST) and refuses larger ones;
    ``adm-center-crop`` is ADM's ``center_crop_arr`` (box-filter halvings, bicubic, centre
    crop), the 256-px ImageNet pipeline of DiT, SiT, RAE and both sphere papers.
    ``channels``: 3 replicates grayscale to RGB and drops alpha; 1 converts to luminance.
    When the source has no ``test_split``, ``test_fraction`` of train is held out
    (seeded) for the metrics' classifier and rFID.
    ``num_classes`` declares the label count for commands that do not load the data
    (``spheregen flops`` on a hub dataset); when the data is loaded it must agree.
    """

    source: Component = component_field("dataset")
    image_size: int = attrs.field(default=32, validator=positive)
    channels: Literal[1, 3] = 3
    fit: Literal["resize-crop", "pad", "adm-center-crop"] = "resize-crop"
    flip: bool = False
    train_split: str = "train"
    test_split: str | None = None
    test_fraction: float = attrs.field(default=0.1, validator=proper_fraction)
    max_examples: int | None = attrs.field(default=None, validator=positive)
    num_classes: int | None = attrs.field(default=None, validator=attrs.validators.optional(attrs.validators.ge(0)),
                                          metadata={"omit_if_default": True, "identity": False})


@attrs.frozen(kw_only=True)
class TrainConfig:
    """Optimisation budget and recipe. ``steps`` counts optimizer steps; ``batch_size`` is
    the global batch: images per optimizer step over all processes and ``grad_accum``
    micro-steps (each process draws batch_size / (processes × grad_accum) per micro-step,
    which must divide), so images seen = steps × batch_size whatever the launch.
    ``ema_decay = 0`` disables EMA.

    ``cache_latents = "auto"``: a method on a frozen, lossy tokenizer (one with
    ``latent_loss``) gets the training split encoded once before the first step, both
    orientations when ``data.flip``, kept on the training device when they take at most
    ``cache_latents_max_gb`` and in memory-mapped files under ``runs/.cache/latents/``
    beyond (extracted once per tokenizer and data, sharded over processes, resumable;
    spheregen.latent_cache); ``"memory"`` / ``"disk"`` force one; with ``"off"`` every batch
    is encoded as it is drawn. The tokenizer is deterministic and frozen, so both paths train on the same
    latents up to float rounding of the encoder's batch composition.

    Checkpoints are written every ``checkpoint_every`` steps (0: off) and, whichever
    comes first, after ``checkpoint_minutes`` of training since the last one (0: off),
    so a preempted run loses minutes, not the run; the final step always checkpoints.
    Neither cadence nor ``log_every`` is part of the run's identity.

    Precision and speed (spheregen.precision, docs/scale.md), each off by default and
    applied to the method's training only (a fit stage runs without them): ``tf32`` lets
    CUDA matmuls and convolutions use TF32 tensor cores while this method trains and
    samples (no effect on a CPU); ``compile`` runs the training step (the method's loss
    and its networks) through ``torch.compile``, in place, so checkpoints and weights keep
    their keys; ``activation_checkpointing`` recomputes each block's activations in the
    backward pass instead of keeping them (less memory, about one more forward pass of
    compute; the method lists its blocks: spheregen.interfaces.CheckpointableBlocks, or
    the experiment is refused at load); ``fused_adamw`` steps AdamW in torch's fused
    kernel. ``mixed_precision`` (above) is accelerate's autocast of training.
    ``thread_shards`` (on by default): on a CPU with N ≥ 2 intra-op threads, one process,
    no autocast, no compile and micro-batches of at least 16·N rows, a method with
    :class:`~spheregen.interfaces.ShardableLoss` (the Sphere Encoder) evaluates each
    micro-batch as N shards side by side, one thread each, with the batch's random
    numbers drawn before the split (spheregen.shards: the tiny Sphere Encoder's step
    1.09-1.16× faster at 2 threads); off, the batch runs whole on the N threads."""

    steps: int = attrs.field(default=1000, validator=positive)
    batch_size: int = attrs.field(default=64, validator=positive)
    grad_accum: int = attrs.field(default=1, validator=positive)
    lr: float = attrs.field(default=1e-3, validator=positive)
    min_lr_ratio: float = attrs.field(default=0.01, validator=proper_fraction)
    warmup_fraction: float = attrs.field(default=0.05, validator=proper_fraction)
    weight_decay: float = attrs.field(default=0.0, validator=non_negative)
    betas: tuple[float, float] = attrs.field(default=(0.9, 0.95), validator=_betas)
    grad_clip: float = attrs.field(default=1.0, validator=non_negative)
    ema_decay: float = attrs.field(default=0.0, validator=proper_fraction)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    # cadence of checkpoints and logs: not part of the run's identity (they change no weight)
    checkpoint_every: int = attrs.field(default=0, validator=attrs.validators.ge(0), metadata={"identity": False})
    checkpoint_minutes: float = attrs.field(default=10.0, validator=non_negative,
                                            metadata={"identity": False, "omit_if_default": True})
    log_every: int = attrs.field(default=10, validator=positive, metadata={"identity": False})
    # accelerate trackers for losses, learning rate and images/s (the jsonl log is always written)
    log_with: tuple[Literal["tensorboard", "wandb", "mlflow", "aim", "comet_ml", "clearml", "dvclive", "swanlab",
                            "trackio"], ...] = attrs.field(default=(), metadata={"identity": False,
                                                                                   "omit_if_default": True})
    # DataLoader worker processes that decode training images: speed only, same batches
    num_workers: int = attrs.field(default=0, validator=attrs.validators.ge(0), metadata={"identity": False})
    cache_latents: Literal["auto", "memory", "disk", "off"] = attrs.field(default="auto",
                                                                          metadata={"omit_if_default": True})
    cache_latents_max_gb: float = attrs.field(default=4.0, validator=attrs.validators.gt(0),
                                              metadata={"omit_if_default": True, "identity": False})
    # precision and speed (spheregen.precision); omitted at their defaults, so adding them
    # changed no run identity. TF32, compiled kernels and the fused AdamW kernel round
    # differently from the plain fp32 step, so the trained weights differ: part of the
    # run's identity. Activation checkpointing replays the same forward (RNG state
    # included) and gives the same loss and gradients, so it is not: it may be turned on
    # to --resume a run that ran out of memory.
    tf32: bool = attrs.field(default=False, metadata={"omit_if_default": True})
    compile: bool = attrs.field(default=False, metadata={"omit_if_default": True})
    activation_checkpointing: bool = attrs.field(default=False, metadata={"omit_if_default": True, "identity": False})
    fused_adamw: bool = attrs.field(default=False, metadata={"omit_if_default": True})
    # one shard of each batch per intra-op thread on a CPU (spheregen.shards): the same
    # math and random numbers, summed in another order, as another thread count already
    # rounds differently; like the thread count, not part of the run's identity.
    thread_shards: bool = attrs.field(default=True, metadata={"omit_if_default": True, "identity": False})


@attrs.frozen(kw_only=True)
class EvalConfig:
    """Sampling and scoring. Samples are class-balanced (label i % num_classes) and
    drawn with ``seed``; ``reference`` picks the real images the metrics compare to.

    ``reference_stats``: an .npz of the reference's feature mean and covariance (arrays
    ``mu``, ``sigma``: the ADM / Sphere Encoder ``fid_stats_*.npz`` layout, or a file
    written by ``spheregen reference-stats``) that FID scores against instead of the
    split; a relative path is read from the experiment file's folder. The other
    reference-based metrics keep the split. ``reference_subset``: KID, precision/recall,
    CMMD and metrics without reference statistics see a seeded, class-balanced subset of
    at most this many reference images (the whole split when it is smaller).

    ``seeds``: sample and score every set once per seed (replaces ``seed``); the report
    shows mean ± std over them. ``guidance``: the guidance scale, or a list of scales,
    of every method that sets none itself. With a list, each method is sampled at every
    scale with ``guidance_seed`` (``guidance_samples`` images; default ``num_samples``)
    and, per step count, the scale with the best headline metric (FID) there is the one
    sampled with ``seeds`` and scored: the choice is made on other samples than the
    scored ones (spheregen.selection).

    ``batch_size``: images per sampling call. Each batch draws from its own seed, so it
    is part of a sample set's identity. On a CPU the network evaluations of the samplers
    (spheregen.guidance.guided) see at most spheregen.guidance.CPU_MICRO_BATCH (64)
    samples at a time whatever the batch, so a large batch costs little more per image
    there (benchmarks/bench_sample_batch.py); so do the cost rows' throughput calls when
    ``throughput_batch`` exceeds 64 on a CPU (their peak memory is then that of a slice).

    ``mixed_precision = "bf16"``: sampling and the metrics' feature extraction (samples
    and reference alike) run under bf16 autocast, on CUDA and CPU. Samples, features and
    scores then differ from fp32 ones (sample files, cached reference features and result
    rows are keyed by it), so compare scores only at one setting."""

    steps: tuple[int, ...] = attrs.field(default=(1, 2, 4, 8), validator=_steps)
    num_samples: int = attrs.field(default=1000, validator=positive)
    batch_size: int = attrs.field(default=250, validator=positive)
    metrics: tuple[Component, ...] = attrs.field(factory=tuple, metadata={"kind": "metric"})
    reference: Literal["train", "test"] = "train"
    reference_stats: str | None = attrs.field(default=None, metadata={"omit_if_default": True})
    reference_subset: int = attrs.field(default=10_000, validator=attrs.validators.ge(2),
                                        metadata={"omit_if_default": True})
    grid_per_class: int = attrs.field(default=8, validator=positive)
    # rows of the sample grids: this many classes, evenly spread over the class range
    # (10 of ImageNet's 1,000: 0, 111, 222, ...), or the listed class indices
    grid_classes: int | tuple[int, ...] = attrs.field(default=10, validator=lambda _i, a, v: _grid_classes(a, v),
                                                      metadata={"omit_if_default": True})
    use_ema: bool = True
    seed: int = 2  # in [0, 2**32), checked for every seed by spheregen.config
    throughput_batch: int = attrs.field(default=64, validator=positive)
    seeds: tuple[int, ...] | None = attrs.field(default=None, validator=_seeds, metadata={"omit_if_default": True})
    guidance: float | tuple[float, ...] | None = attrs.field(default=None, validator=_guidance,
                                                             metadata={"omit_if_default": True})
    guidance_seed: int = attrs.field(default=1000, metadata={"omit_if_default": True})
    guidance_samples: int | None = attrs.field(default=None, validator=attrs.validators.optional(positive),
                                               metadata={"omit_if_default": True})
    # bf16 autocast of sampling and feature extraction (spheregen.precision): it changes
    # the samples and the features, so it is part of their identity when set
    mixed_precision: Literal["no", "bf16"] = attrs.field(default="no", metadata={"omit_if_default": True})

    def __attrs_post_init__(self) -> None:
        if self.guidance_seed in self.scored_seeds:
            raise ValueError(f"'guidance_seed' {self.guidance_seed} is also a scored seed {list(self.scored_seeds)}: "
                             "the guidance scale must be chosen on other samples than the scored ones; pick another")

    @property
    def scored_seeds(self) -> tuple[int, ...]:
        """The seeds every sample set is drawn (and scored) with."""
        return self.seeds or (self.seed,)

    def reference_stats_path(self, source: str) -> Path | None:
        """``reference_stats`` as a path: a relative one is read from the folder of the
        experiment file ``source``."""
        if self.reference_stats is None:
            return None
        path = Path(self.reference_stats).expanduser()
        return path if path.is_absolute() else Path(source).parent / path


@attrs.frozen(kw_only=True)
class MethodEntry:
    """One method of the comparison; ``train`` is the experiment's [train] with this
    method's overrides applied."""

    name: str = attrs.field(validator=lambda _i, _a, v: _check_run_id(v))
    method: Component = component_field("method")
    sampler: Component | None = attrs.field(default=None, metadata={"kind": "sampler"})
    # None: eval.guidance, else 1.0; a list: chosen per step count (EvalConfig)
    guidance: float | tuple[float, ...] | None = attrs.field(default=None, validator=_guidance,
                                                             metadata={"omit_if_default": True})
    steps: tuple[int, ...] | None = attrs.field(default=None, validator=_steps)
    train: TrainConfig = attrs.field(factory=TrainConfig)


@attrs.frozen(kw_only=True)
class Experiment:
    name: str = attrs.field(validator=lambda _i, _a, v: _check_name("experiment", v))
    seed: int = 0
    data: DataConfig = attrs.field(factory=DataConfig)
    train: TrainConfig = attrs.field(factory=TrainConfig)
    eval: EvalConfig = attrs.field(factory=EvalConfig)
    methods: tuple[MethodEntry, ...] = ()
    source: str = "<python>"
    overrides: tuple[str, ...] = ()  # the --set KEY=VALUE options applied to the file, in order

    def method(self, name: str) -> MethodEntry:
        for m in self.methods:
            if m.name == name:
                return m
        raise ConfigError(f"{self.source}: no method named {name!r}; methods: {[m.name for m in self.methods]}")

    def steps_for(self, entry: MethodEntry) -> tuple[int, ...]:
        return entry.steps or self.eval.steps

    def guidances_for(self, entry: MethodEntry) -> tuple[float, ...]:
        """The guidance scales ``entry`` is sampled at: its own, else ``eval.guidance``,
        else 1.0 (no guidance); more than one means the scale is chosen per step count."""
        for value in (entry.guidance, self.eval.guidance):
            if value is not None:
                return as_scales(value)
        return (1.0,)


def load_experiment(path: str | Path, overrides: tuple[str, ...] | list[str] = ()) -> Experiment:
    """Read and validate an experiment file with ``--set KEY=VALUE`` overrides applied
    (:func:`apply_override`); every error names the file and key."""
    raw = read_toml(path)
    for option in overrides:
        apply_override(raw, option, str(path))
    exp = experiment_from_dict(raw, str(path))
    return attrs.evolve(exp, overrides=tuple(overrides))


def apply_override(raw: dict[str, Any], option: str, source: str) -> None:
    """One ``KEY=VALUE`` into the raw TOML data, before any checking (so the value is
    typed and validated exactly as if the file said it). KEY is dotted:
    ``train.steps``, ``eval.steps``, ``data.source.path``; ``methods.NAME.KEY`` reaches
    the method entry named NAME (``methods.fm-pixel.train.steps``). A ``train.KEY``
    override also replaces that key in every method's own ``[methods.train]``: the
    command line wins over the file. VALUE is read as a TOML value (``5``, ``1e-3``,
    ``[1, 2]``, ``true``, ``"text"``); anything that is not one is taken as a string."""
    key, sep, text = option.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        raise ConfigError(f"--set {option!r}: expected KEY=VALUE with a dotted KEY, e.g. --set train.steps=50")
    value = _toml_value(text.strip())
    if parts[0] == "methods":
        if len(parts) < 3:
            raise ConfigError(f"--set {option!r}: a method is reached as methods.NAME.KEY, e.g. "
                              "methods.fm-pixel.train.steps=50")
        _set(_method_table(raw, parts[1], option, source), parts[2:], value, option)
        return
    if parts[0] in ("name", "seed", "source", "overrides") and len(parts) > 1:
        raise ConfigError(f"--set {option!r}: '{parts[0]}' is a plain value, not a table")
    _set(raw, parts, value, option)
    if parts[0] == "train" and len(parts) == 2:
        for m in raw.get("methods", []):
            if isinstance(m, dict) and isinstance(m.get("train"), dict) and parts[1] in m["train"]:
                m["train"][parts[1]] = value


def _toml_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _method_table(raw: dict[str, Any], name: str, option: str, source: str) -> dict[str, Any]:
    methods = [m for m in raw.get("methods", []) if isinstance(m, dict)]
    for m in methods:
        if m.get("name") == name:
            return m
    raise ConfigError(f"--set {option!r}: {source} has no method named {name!r}; methods: "
                      f"{[m.get('name') for m in methods]}")


def _set(table: dict[str, Any], parts: list[str], value: Any, option: str) -> None:
    for i, part in enumerate(parts[:-1]):
        nxt = table.get(part)
        if nxt is None:
            nxt = table[part] = {}
        elif isinstance(nxt, str) and i == len(parts) - 2:  # a component given by name: make it a table
            nxt = table[part] = {"name": nxt}
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {option!r}: '{'.'.join(parts[:i + 1])}' is not a table")
        table = nxt
    table[parts[-1]] = value


def experiment_from_dict(raw: dict[str, Any], source: str = "<python>") -> Experiment:
    raw = dict(raw)
    for reserved in ("source", "overrides"):
        if reserved in raw:
            raise ConfigError(f"{source}: key '{reserved}' is reserved; remove it")
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
