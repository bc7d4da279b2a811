"""The contracts between the core and its plugins.

Every component is built by a factory registered under a kebab-case name together with
a frozen attrs config class: ``factory(cfg, ctx) -> component``. ``ctx`` is a
:class:`BuildContext` for models and a :class:`MetricContext` for metrics.

A config class may define a classmethod ``tiny()`` returning a config small enough to
build and run in a second on a CPU; the contract tests (tests/contract/), which run
against every registered component, use it instead of the defaults.

Conventions shared by every kind:

* images are float tensors in [-1, 1], shape B×C×H×W (C = ``DataSpec.channels``);
* labels are int64 tensors of shape B with values in [0, num_classes); the null
  (unconditional) class is asked for with ``labels=None`` (per sample: a denoiser's
  ``drop`` mask, :class:`NullMaskDenoiser`) and its embedding lives inside each model;
* stored samples are uint8 tensors B×C×H×W (see :func:`spheregen.api.to_uint8`).

Beside the six protocols, *capabilities* (section below) declare what only some
components have; docs/architecture.md tabulates who calls what. Plugins use the core
through :mod:`spheregen.api`.
"""

from __future__ import annotations

import inspect
import typing
from typing import Any, Callable, Iterable, Iterator, Literal, Protocol, Sequence, runtime_checkable

import attrs
import torch
from torch import Tensor


@attrs.frozen(kw_only=True)
class DataSpec:
    """What a model needs to know about the data it will see."""

    image_size: int
    channels: int
    num_classes: int


@attrs.frozen(kw_only=True)
class BuildContext:
    """Passed to tokenizer, denoiser, sampler and method factories.

    ``build(kind, component)`` builds a nested component (a method building its
    tokenizer and denoiser) through the same strict registries, so nesting needs no
    special code. ``component`` is a :class:`spheregen.config.Component` or a name.
    ``build(kind, component, data=spec)`` builds it for other tensors than the
    experiment's images: its factory sees ``ctx.data == spec`` (a denoiser on a
    tokenizer's D×h×h latents gets ``channels = D``, ``image_size = h``; see
    :func:`spheregen.latent.latent_data_spec`); every other field is this context's.
    ``train_data()`` returns the experiment's preprocessed training set (uint8
    N×C×H×W, int64 N) for components that fit something at build time (a tokenizer
    trained by spheregen, dataset statistics); ``cache_dir`` is where they keep it,
    under a subfolder named by their config hash and ``data_key`` (the preprocessed
    data's identity: source, size, channels, split). All three are None in unit tests that
    build components without data.

    ``device.type == "meta"`` asks for the architecture alone (``spheregen flops``,
    parameter counts of paper-scale models): a factory then loads no weights file,
    trains nothing and checks no loss-only weights (LPIPS); the data fields are None.
    """

    data: DataSpec
    build: Callable[..., Any]
    train_data: Callable[[], tuple[Tensor, Tensor]] | None = None
    cache_dir: str | None = None
    data_key: str | None = None
    device: torch.device = torch.device("cpu")

    @classmethod
    def create(cls, build_one: Callable[[str, Any, "BuildContext"], Any], **fields: Any) -> "BuildContext":
        """A context whose ``build(kind, component, data=None)`` is ``build_one(kind,
        component, ctx)`` with ``ctx`` this context, or, given ``data``, a context like
        this one for that DataSpec (built the same way, so it nests again)."""
        ctx: BuildContext | None = None

        def build(kind: str, component: Any, data: DataSpec | None = None) -> Any:
            target = ctx if data is None else cls.create(build_one, **{**fields, "data": data})
            return build_one(kind, component, target)

        ctx = cls(build=build, **fields)
        return ctx


@runtime_checkable
class Tokenizer(Protocol):
    """Maps images to latents and back.

    ``latent_shape`` is the per-image latent shape ``(D, h, w)``: a grid of h×w tokens
    of D channels (the ``patch`` tokenizer: D = C·p², h = H/p).
    ``trainable`` says whether the method trains it jointly; a frozen tokenizer's
    latents may be cached by the runner.
    """

    latent_shape: tuple[int, ...]
    trainable: bool

    def encode(self, images: Tensor) -> Tensor:
        """B×C×H×W in [-1, 1] -> B×latent_shape."""

    def decode(self, latents: Tensor) -> Tensor:
        """B×latent_shape -> B×C×H×W in [-1, 1]."""


@runtime_checkable
class Denoiser(Protocol):
    """A network on latents or pixels; it knows nothing of the process that calls it."""

    def forward(self, x: Tensor, noise_level: Tensor, labels: Tensor | None) -> Tensor:
        """x: B×D×h×w, noise_level: B (float in [0, 1], 1 = pure noise), labels: B
        (int64) or None for the null class -> B×D×h×w. Samples do not interact (no
        batch statistics), so a batch may be split and the parts computed apart."""


# ---------------------------------------------------------------- capabilities
# A capability is a small protocol that not every component of a kind has. The core and
# the built-ins call a capability's members only after checking for it (:func:`lacks`),
# and a method that cannot work without one refuses it when it is built
# (:func:`require`), so a missing capability is a ConfigError at load, not a crash in
# training. ``isinstance`` checks names only; :func:`lacks` also checks values and
# keywords.


def lacks(obj: Any, capability: type) -> list[str]:
    """What ``obj`` misses of the capability protocol ``capability`` ([] when it has it
    all): each attribute, with its value where the protocol's annotation is a
    ``Literal``, and each parameter of each protocol method that the object's method
    would not accept (positional ones by count, keyword-only ones by name; ``*args`` and
    ``**kwargs`` accept anything)."""
    hints = typing.get_type_hints(capability)
    out: list[str] = []
    for name in _members(capability):
        if not hasattr(obj, name):
            out.append(name)
        elif name in hints:
            allowed = typing.get_args(hints[name]) if typing.get_origin(hints[name]) is Literal else None
            if allowed is not None and getattr(obj, name) not in allowed:
                out.append(f"{name} = {' or '.join(map(repr, allowed))}")
        else:
            out += [f"{name}({p})" for p in _unaccepted(getattr(capability, name), getattr(obj, name))]
    return out


def has(obj: Any, capability: type) -> bool:
    """Whether ``obj`` has every member of ``capability`` (:func:`lacks` is empty)."""
    return not lacks(obj, capability)


def require(obj: Any, capability: type, needed_by: str, fix: str) -> None:
    """ConfigError naming ``needed_by``, the capability, what ``obj`` lacks and the
    ``fix``, unless ``obj`` has ``capability``."""
    missing = lacks(obj, capability)
    if missing:
        from spheregen.errors import ConfigError

        summary = (capability.__doc__ or "").strip().split("\n\n")[0]
        raise ConfigError(f"{needed_by} needs the {capability.__name__} capability ({summary}); "
                          f"{type(obj).__name__} lacks {', '.join(missing)}. {fix}")


def accepts_keyword(fn: Callable[..., Any], name: str) -> bool:
    """Whether ``fn`` (an ``nn.Module``: its ``forward``) takes keyword ``name``."""
    try:
        params = inspect.signature(fn.forward if isinstance(fn, torch.nn.Module) else fn).parameters.values()
    except (TypeError, ValueError):  # no signature to read (a builtin): trust the caller
        return True
    return any(p.kind is p.VAR_KEYWORD or (p.name == name and p.kind in _BY_NAME) for p in params)


_BY_NAME = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def _members(capability: type) -> list[str]:
    """The public attributes and methods a protocol (and its protocol bases) declares."""
    names: list[str] = []
    for cls in reversed(capability.__mro__):
        if cls in (object, Protocol, typing.Generic) or not getattr(cls, "_is_protocol", False):
            continue
        for name in [*getattr(cls, "__annotations__", {}), *vars(cls)]:
            if not name.startswith("_") and name not in names:
                names.append(name)
    return names


def _unaccepted(wanted: Callable[..., Any], method: Any) -> list[str]:
    """The parameters of protocol method ``wanted`` that bound ``method`` does not take."""
    try:
        have = list(inspect.signature(method).parameters.values())
    except (TypeError, ValueError):
        return []
    var_pos = any(p.kind is p.VAR_POSITIONAL for p in have)
    var_kw = any(p.kind is p.VAR_KEYWORD for p in have)
    positional = sum(p.kind in _POSITIONAL for p in have)
    names = {p.name for p in have if p.kind in _BY_NAME}
    out = []
    for i, p in enumerate(list(inspect.signature(wanted).parameters.values())[1:]):  # [0] is self
        if p.kind in _POSITIONAL and not (var_pos or i < positional):
            out.append(p.name)
        elif p.kind is p.KEYWORD_ONLY and not (var_kw or p.name in names):
            out.append(p.name)
    return out


@runtime_checkable
class NullMaskDenoiser(Protocol):
    """a per-sample null-class mask: forward(x, noise_level, labels, *, drop)

    ``drop``: B bool or None; True gives that sample the null class, so one batch mixes
    conditional and null samples (label dropout in training, a 2B guidance batch). A
    denoiser without it gets the same result from :func:`spheregen.guidance.call_denoiser`,
    which then runs the dropped samples apart with ``labels=None``."""

    def forward(self, x: Tensor, noise_level: Tensor, labels: Tensor | None, *,
                drop: Tensor | None = None) -> Tensor: ...


@runtime_checkable
class TwoTimeDenoiser(Protocol):
    """a second time input: time_inputs = 2 and forward(x, noise_level, labels, noise_level2)

    ``noise_level2``: B floats, a second time embedded apart (MeanFlow passes the
    interval length t − r). Needed by ``meanflow``; nothing emulates it."""

    time_inputs: Literal[2]

    def forward(self, x: Tensor, noise_level: Tensor, labels: Tensor | None,
                noise_level2: Tensor | None = None) -> Tensor: ...


@runtime_checkable
class ExplicitAttentionDenoiser(Protocol):
    """forward-mode-differentiable attention on request: forward(..., *, attention)

    ``attention="explicit"`` computes softmax(QKᵀ/√d)V with plain matmuls, which
    ``torch.func.jvp`` differentiates (the fused SDPA kernels have no forward-mode
    rule); ``"sdpa"`` is the fast default. ``meanflow`` asks for it in its JVP when the
    denoiser has it and otherwise calls the denoiser as is, which must then be
    forward-mode differentiable itself."""

    def forward(self, x: Tensor, noise_level: Tensor, labels: Tensor | None, *,
                attention: Literal["sdpa", "explicit"] = "sdpa") -> Tensor: ...


@runtime_checkable
class LosslessTokenizer(Protocol):
    """an exact round trip: lossless = True

    decode(encode(x)) == x (the ``patch`` tokenizer), so evaluation reports no
    reconstruction scores and the runner never caches latents that are the pixels."""

    lossless: Literal[True]


@runtime_checkable
class Method(Protocol):
    """What a plugin trains (an ``nn.Module``).

    ``loss`` sees a batch of images in [-1, 1] (B×C×H×W) and labels (B) and returns the
    scalar loss plus float logs. ``param_groups`` lets a method scale learning rates per
    group (the Sphere Encoder's encoder at 0.1×): a list of
    ``{"params": [...], "lr_scale": float}``. ``default_sampler`` names a sampler plugin.

    Optional: ``reconstruct(images, labels=None)`` (:class:`ReconstructingMethod`) -> the
    round trip through the method's tokenizer (or its own encoder-decoder); evaluation
    then reports rFID and PSNR for it, unless the method's ``tokenizer`` is a
    :class:`LosslessTokenizer`. Also optional: :class:`LatentMethod` (training on cached
    latents) and :class:`EditableMethod` (image edits).
    ``tokenizer_identity()`` -> ``(label, key)`` or None names what ``reconstruct`` goes
    through: methods with equal keys share one reconstruction row, None reports none.
    Without it the core decides: a frozen ``tokenizer`` config is the identity (its name
    and config hash), otherwise the method entry's run is (``<entry> (own autoencoder)``).
    """

    default_sampler: str

    def loss(self, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, float]]: ...

    def param_groups(self) -> list[dict[str, Any]]: ...

    def parameters(self, recurse: bool = True) -> Iterator[torch.nn.Parameter]: ...


@runtime_checkable
class LatentMethod(Protocol):
    """training on a frozen tokenizer's latents: tokenizer, encode, latent_loss

    ``tokenizer`` (``trainable = False``) is what the runner asks whether latents may be
    cached (and how large they are, ``latent_shape``); ``encode(images)`` (B×C×H×W ->
    B×latent_shape, no autograd) fills the cache, and ``latent_loss(latents, labels)``
    trains on it, equal to ``loss(images, labels)`` on the images the latents came from.
    :class:`spheregen.latent.TokenizerDenoiserMethod` implements it."""

    tokenizer: Tokenizer

    def encode(self, images: Tensor) -> Tensor: ...

    def latent_loss(self, latents: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, float]]: ...


@runtime_checkable
class CheckpointableBlocks(Protocol):
    """activation checkpointing per block: checkpoint_blocks()

    ``checkpoint_blocks()`` -> the modules (a network's transformer blocks) whose
    activations ``train.activation_checkpointing`` recomputes in the backward pass
    instead of keeping them (:func:`spheregen.precision.checkpoint_activations`). Each
    must be a pure function of its arguments and parameters (no state it updates, such
    as batch-norm statistics): it runs twice. A method lists its trained networks'
    blocks; a network (the ``dit`` denoiser, the Sphere Encoder's ViTs) lists its own."""

    def checkpoint_blocks(self) -> list[torch.nn.Module]: ...


@runtime_checkable
class ShardableLoss(Protocol):
    """a batch's loss evaluated in shards: loss_draws(images, labels), loss(..., draws=)

    ``loss_draws(images, labels)`` -> a dict of tensors, every random number one
    ``loss(images, labels)`` call on that batch would draw (from the global RNG, in the
    same order), each with the batch as its leading dim; ``loss(images[rows],
    labels[rows], draws={k: v[rows]})`` then draws nothing and gives that shard's loss.
    Every term of the loss must be a mean over the batch's samples of per-sample values
    (no batch statistics, nothing drawn per batch that is not in the draws), so the
    shards' losses weighted by their sizes are the batch's loss and their gradients the
    batch's gradient. On a CPU with several intra-op threads the trainer evaluates such a
    method's batch as one shard per thread, each on one thread at once
    (:mod:`spheregen.shards`, ``train.thread_shards``); the draws make the result the
    batch's whatever the shards. The Sphere Encoder has it."""

    def loss_draws(self, images: Tensor, labels: Tensor | None) -> dict[str, Tensor]: ...

    def loss(self, images: Tensor, labels: Tensor | None,
             draws: dict[str, Tensor] | None = None) -> tuple[Tensor, dict[str, float]]: ...


@runtime_checkable
class ReconstructingMethod(Protocol):
    """a tokenizer round trip: reconstruct(images, labels=None)

    B×C×H×W in [-1, 1] -> the same through the method's tokenizer (or its own
    encoder-decoder), scored against the originals (rFID, PSNR)."""

    def reconstruct(self, images: Tensor, labels: Tensor | None = None) -> Tensor: ...


@runtime_checkable
class EditableMethod(Protocol):
    """image edits: edit_ops and edit(op, images, labels, **options)

    ``edit_ops`` names the operations; ``edit`` returns image grids B×K×C×H×W in
    [-1, 1], row b from input image b (the report's editing figures)."""

    edit_ops: tuple[str, ...]

    def edit(self, op: str, images: Tensor, labels: Tensor | None = None, **options: Any) -> Tensor: ...


@runtime_checkable
class Sampler(Protocol):
    """Turns a trained method into images in a fixed number of network evaluations.

    ``sample`` returns float images in [-1, 1], B×C×H×W with B = len(labels);
    ``nfe(steps, guidance)`` is the number of network forward passes per image
    (each classifier-free-guidance pass counted). ``guidance <= 1`` disables CFG.
    Samplers receive a method and call its networks; networks never import samplers.

    Optional: ``requires``, a tuple of what ``sample`` needs of a method, each a
    runtime-checkable capability protocol (e.g. :class:`VelocityMethod`, checked by
    ``isinstance``) or an attribute name (``"velocity"``, checked by ``hasattr``). It is
    checked when the experiment is loaded, against the method built on the meta device
    (:func:`spheregen.compat.missing`), so a pairing that cannot sample is a config error
    before anything trains. A sampler that declares nothing is assumed to fit every method.
    """

    def sample(
        self,
        method: Any,
        labels: Tensor,
        steps: int,
        guidance: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> Tensor: ...

    def nfe(self, steps: int, guidance: float = 1.0) -> int: ...


def check_steps(steps: Any) -> int:
    """A sampler's ``steps`` as the contract has it (an int >= 1, not a bool), or a
    ValueError naming the value."""
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    return steps


# ----------------------------------------------------------- what built-in samplers need
# The capabilities the built-in samplers declare in ``requires``; a third-party sampler
# may name them too. Each lists exactly what one sampler calls on a method (and the
# method's ``parameters()``, which every ``nn.Module`` has, for the device). As for a
# Denoiser, samples do not interact in these functions (no batch statistics, no random
# draws) in eval mode: spheregen.guidance.guided calls them on slices of a CPU batch.


@runtime_checkable
class VelocityMethod(Protocol):
    """Integrated by ``euler`` / ``heun``: a flow velocity on latents (noise at t = 0,
    data at t = 1) and the decoder back to images. ``time_shift`` (a float) is optional."""

    latent_shape: tuple[int, ...]

    def velocity(self, x: Tensor, t: Tensor, labels: Tensor | None, drop: Tensor | None = None) -> Tensor:
        """x: B×latent_shape, t: B, drop: B bool (True: null class) -> B×latent_shape."""

    def decode(self, latents: Tensor) -> Tensor:
        """B×latent_shape -> B×C×H×W in [-1, 1]."""


@runtime_checkable
class AverageVelocityMethod(Protocol):
    """Jumped by ``meanflow``: the average velocity u(z, r, t) between times r < t (noise
    at t = 1), and the decoder."""

    latent_shape: tuple[int, ...]

    def average_velocity(self, z: Tensor, r: Tensor, t: Tensor, labels: Tensor | None,
                         drop: Tensor | None = None) -> Tensor:
        """z: B×latent_shape, r, t: B, drop: B bool -> B×latent_shape."""

    def decode(self, latents: Tensor) -> Tensor:
        """B×latent_shape -> B×C×H×W in [-1, 1]."""


@runtime_checkable
class SphereAutoencoderMethod(Protocol):
    """Looped by ``sphere``: encode, project on the sphere, re-noise by up to
    ``sigma_max``, decode; ``labels=None`` asks for the null class."""

    latent_shape: tuple[int, ...]
    sigma_max: float
    conditional: bool

    def encode_raw(self, images: Tensor, labels: Tensor | None = None) -> Tensor:
        """B×C×H×W -> B×latent_shape, before the projection on the sphere."""

    def decode(self, z: Tensor, labels: Tensor | None = None) -> Tensor:
        """B×latent_shape -> B×C×H×W in [-1, 1]."""

    def spherify(self, z: Tensor) -> Tensor:
        """B×latent_shape -> the same, projected on the sphere."""


@runtime_checkable
class SphereDenoiserMethod(Protocol):
    """Stepped by ``sphere-latent``: a denoiser of points on the latent sphere (with its
    own classifier-free guidance), and one decode at the end. ``denoiser`` is the network
    (an ``nn.Module``; its parameters give the device); ``num_classes`` 0: unconditional."""

    latent_shape: tuple[int, ...]
    sigma_max: float
    num_classes: int
    denoiser: torch.nn.Module

    def spherify(self, z: Tensor) -> Tensor:
        """B×latent_shape -> the same, projected on the sphere."""

    def denoise(self, v: Tensor, sigma: Tensor | float, labels: Tensor | None, guidance: float = 1.0) -> Tensor:
        """v: B×latent_shape at noise ``sigma`` -> the clean latents B×latent_shape."""

    def decode(self, latents: Tensor) -> Tensor:
        """B×latent_shape -> B×C×H×W in [-1, 1]."""


# ---------------------------------------------------------------- fitting
# What spheregen trains for a component before the component can be used (the RAE
# decoder, its MAE encoder, the domain classifier): the component declares it, the core
# fits it through the methods' accelerate trainer (spheregen.fit) and the factory only
# loads the result (:func:`spheregen.api.load_fitted`).


def _one_budget(inst: Any, _attribute: Any, _value: Any) -> None:
    if (inst.steps is None) == (inst.epochs is None):
        raise ValueError(f"a FitRecipe needs exactly one of steps and epochs, got steps={inst.steps}, "
                         f"epochs={inst.epochs}")


@attrs.frozen(kw_only=True)
class FitRecipe:
    """How one :class:`FitPhase` is optimised: AdamW (``betas``, ``weight_decay``),
    linear warmup over ``warmup_fraction`` then cosine to ``min_lr_ratio`` × ``lr`` (the
    methods' schedule), gradient clipping at ``grad_clip`` (0: off). ``batch_size`` is the
    global batch; the budget is ``steps`` optimizer steps or ``epochs`` passes over the
    training split (⌊N / batch_size⌋ steps each). ``seed`` seeds the phase's random draws.
    Launch settings (mixed precision, accumulation, workers, checkpoint and log cadence)
    are the experiment's ``[train]``."""

    batch_size: int = attrs.field(validator=attrs.validators.ge(1))
    lr: float = attrs.field(validator=attrs.validators.gt(0))
    steps: int | None = attrs.field(default=None, validator=_one_budget)
    epochs: int | None = None
    warmup_fraction: float = 0.05
    min_lr_ratio: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0


@attrs.frozen(kw_only=True)
class FitPhase:
    """One optimisation phase of a fit. ``module`` is an ``nn.Module`` with
    ``loss(images, labels) -> (loss, logs)`` (float B×C×H×W in [-1, 1], int64 B) and
    optionally ``param_groups()`` (as :class:`Method`); its parameters with
    ``requires_grad`` are trained. ``start()`` runs before the first (or resumed) step
    (unfreeze what the phase trains), ``finish()`` after the last (freeze it, warm-start
    the next phase)."""

    name: str
    module: Any
    recipe: FitRecipe
    start: Callable[[], None] | None = None
    finish: Callable[[], None] | None = None


@attrs.frozen(kw_only=True)
class FitStatistics:
    """A gradient-free pass over the whole training split (dataset statistics):
    ``sums(images, labels)`` returns tensors for one batch (float images in [-1, 1] on
    the training device; the component follows them there), which the core adds up over
    batches and processes and hands to ``finish(totals)``."""

    name: str
    sums: Callable[[Tensor, Tensor], dict[str, Tensor]]
    finish: Callable[[dict[str, Tensor]], None]
    batch_size: int = 256


@attrs.frozen(kw_only=True)
class FitSpec:
    """What to fit and how to keep it. ``name`` names the component (folder names);
    ``identity`` is everything besides the data that determines the fitted weights (the
    config, the data's shape, a format version), hashed with the data's key. ``phases()``
    builds the phases, run in order (called only when fitting: their modules and loss
    networks cost memory). ``state()`` is the fitted state to save (after each phase and
    at the end) and ``load(state, info)`` puts a saved one in place (``info``: what the
    fit measured; empty for a phase's intermediate state). Optional ``report(batches)``
    scores the fitted component on held-out (float images on the training device,
    labels) batches, e.g. test accuracy or PSNR, kept in ``info``."""

    name: str
    identity: Any
    phases: Callable[[], Sequence[FitPhase | FitStatistics]]
    state: Callable[[], dict[str, Tensor]]
    load: Callable[[dict[str, Tensor], dict[str, Any]], None]
    report: Callable[[Iterable[tuple[Tensor, Tensor]]], dict[str, float]] | None = None


@runtime_checkable
class FittableComponent(Protocol):
    """weights spheregen fits before use: fit_spec()

    ``fit_spec()`` -> :class:`FitSpec`. The factory builds the architecture and calls
    :func:`spheregen.api.load_fitted`, which loads the fitted weights (``spheregen fit
    EXPERIMENT.toml``; ``run`` and ``train`` fit first) or says how to get them."""

    def fit_spec(self) -> FitSpec: ...


@attrs.frozen(kw_only=True)
class MetricContext:
    """Passed to metric factories.

    ``train_images`` / ``train_labels`` (uint8 N×C×H×W, int64 N) and the test pair are
    the experiment's data after preprocessing; ``cache_dir`` is where a metric may keep
    what it trains or precomputes (keyed by its own config hash); ``device`` is where it
    runs. ``mixed_precision`` (``[eval] mixed_precision``, ``"no"`` or ``"bf16"``) is the
    autocast feature extraction runs under (:func:`spheregen.precision.autocast`), of the
    samples and the reference alike; a metric that honours it keys its cached reference
    features by it.
    """

    data: DataSpec
    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    cache_dir: str
    device: torch.device
    dataset_key: str
    mixed_precision: Literal["no", "bf16"] = "no"


@attrs.frozen(kw_only=True)
class Column:
    """How reports show one result key of a metric (a metric's optional ``columns``).

    ``label`` heads the column; a value is shown as ``format.format(value × scale)``
    (KID is stored raw and shown ×10³). ``better``: ``"lower"``, ``"higher"`` or None
    (neither), said in plot titles. ``features``: evaluation also writes
    ``<key>_features``, the feature space the value was computed in (the metric's
    ``feature_info``, else ``features``); ``label_features``: the header then names it,
    ``FID[inception ...]``. ``reconstruction``: the key is also scored on each tokenizer's
    reconstructions of the test split against the originals, stored as ``r<key>`` and
    shown as ``r<label>`` (rFID). ``headline``: the report's per-step table (``FID@k``),
    its plots against steps and GFLOPs and their Pareto front use the first headline
    column present; a list of guidance scales is chosen by the first headline column
    that also says which way is ``better`` (spheregen.selection).
    """

    key: str
    label: str
    format: str = "{:.4g}"
    scale: float = 1.0
    better: Literal["lower", "higher"] | None = None
    features: bool = False
    label_features: bool = False
    reconstruction: bool = False
    headline: bool = False


@runtime_checkable
class Metric(Protocol):
    """Scores samples against real images.

    ``compute(samples, reference)``: uint8 N×C×H×W each -> ``{key: float}`` with stable
    public keys listed in ``keys`` (e.g. ``fid``, ``kid``). ``features`` names the feature
    space used (``inception``, ``domain-classifier``), or None when no features are used.

    Optional capabilities: :class:`ShardableMetric` (sharded evaluation; a metric without
    it is computed whole by ``compute`` on the main process) and :class:`LabelledMetric`
    (``compute`` also receives the sampled classes).

    Optional, for reports: ``columns``, a tuple of :class:`Column`, the keys shown and
    how; keys it leaves out stay in ``results.parquet`` only (``kid_std``). Reports read
    it, and ``keys``, from the registered factory (a class attribute), since they build no
    metric: a metric that declares no ``columns`` has its class's ``keys`` shown as-is.
    """

    keys: tuple[str, ...]
    features: str | None

    def compute(self, samples: Tensor, reference: Tensor) -> dict[str, float]: ...


@runtime_checkable
class ShardableMetric(Protocol):
    """sharded evaluation: extract, score, reference_features, batch_size, feature_key

    ``extract(images)``: uint8 N×C×H×W -> ``{name: N×D features}``, computed in batches
    of ``batch_size`` taken in order, so batch-aligned shards over processes concatenate
    to the whole; ``score(sample_features, reference_features)`` -> ``{key: float}``
    equals ``compute`` on the images (``reference_features`` is None for a metric with
    ``NEEDS_REFERENCE = False``); ``reference_features(reference)`` may be cached.
    Metrics with equal ``feature_key`` (not None) extract identical features, so
    evaluation extracts once for all of them."""

    batch_size: int
    feature_key: str | None

    def extract(self, images: Tensor) -> dict[str, Tensor]: ...

    def score(self, sample_features: dict[str, Tensor],
              reference_features: dict[str, Tensor] | None) -> dict[str, float]: ...

    def reference_features(self, reference: Tensor) -> dict[str, Tensor]: ...


@runtime_checkable
class LabelledMetric(Protocol):
    """scores that need the sampled classes: needs_labels = True

    ``compute(samples, reference, labels=...)`` also receives the int64 N classes the
    samples were drawn for (``class-accuracy``)."""

    needs_labels: Literal[True]

    def compute(self, samples: Tensor, reference: Tensor | None, *, labels: Tensor) -> dict[str, float]: ...


@runtime_checkable
class DataSource(Protocol):
    """Raw examples of a dataset, by split.

    ``split(name)`` is a random-access sequence of ``(image, label)`` with the image a
    uint8 numpy array (H×W grayscale, H×W×3 or H×W×4) or a PIL image of any size;
    preprocessing (size, channels, range) is the core's job (``spheregen.data``).
    Rows are read one at a time by DataLoader worker processes, so the sequence must
    survive a fork (an Arrow memory-map, a file list, an array do). Optional on the
    sequence: ``labels() -> int array of len N``, every label without decoding an image
    (the core otherwise reads each row once to collect them).
    ``num_classes`` is the label count (0 for unlabelled data); ``key`` names the data
    (dataset id, revision, options; it appears in cache file names). Optional
    ``fingerprint: str``: the content's identity (local files' paths, sizes and mtimes;
    a hub dataset's fingerprint); caches and run identities include it, so data changed
    in place is never served from an old cache. Without it, ``key`` alone identifies
    the data (right for data shipped inside a package).
    """

    num_classes: int
    key: str

    def splits(self) -> tuple[str, ...]: ...

    def split(self, name: str) -> Sequence[tuple[Any, int]]: ...
