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
  (unconditional) class is handled inside each model, never passed in;
* stored samples are uint8 tensors B×C×H×W (see :func:`spheregen.images.to_uint8`).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Protocol, Sequence, runtime_checkable

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
    build: Callable[[str, Any], Any]
    train_data: Callable[[], tuple[Tensor, Tensor]] | None = None
    cache_dir: str | None = None
    data_key: str | None = None
    device: torch.device = torch.device("cpu")


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
        """x: B×D×h×w, noise_level: B (float), labels: B (int64) or None for the
        null class -> B×D×h×w."""


@runtime_checkable
class Method(Protocol):
    """What a plugin trains (an ``nn.Module``).

    ``loss`` sees a batch of images in [-1, 1] (B×C×H×W) and labels (B) and returns the
    scalar loss plus float logs. ``param_groups`` lets a method scale learning rates per
    group (the Sphere Encoder's encoder at 0.1×): a list of
    ``{"params": [...], "lr_scale": float}``. ``default_sampler`` names a sampler plugin.

    Optional: ``reconstruct(images, labels=None)`` -> B×C×H×W in [-1, 1], the round trip
    through the method's tokenizer (or its own encoder-decoder); evaluation then reports
    rFID and PSNR for it, unless the method's ``tokenizer`` says ``lossless = True``.
    """

    default_sampler: str

    def loss(self, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, float]]: ...

    def param_groups(self) -> list[dict[str, Any]]: ...

    def parameters(self, recurse: bool = True) -> Iterator[torch.nn.Parameter]: ...


@runtime_checkable
class Sampler(Protocol):
    """Turns a trained method into images in a fixed number of network evaluations.

    ``sample`` returns float images in [-1, 1], B×C×H×W with B = len(labels);
    ``nfe(steps, guidance)`` is the number of network forward passes per image
    (each classifier-free-guidance pass counted). ``guidance <= 1`` disables CFG.
    Samplers receive a method and call its networks; networks never import samplers.
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


@attrs.frozen(kw_only=True)
class MetricContext:
    """Passed to metric factories.

    ``train_images`` / ``train_labels`` (uint8 N×C×H×W, int64 N) and the test pair are
    the experiment's data after preprocessing; ``cache_dir`` is where a metric may keep
    what it trains or precomputes (keyed by its own config hash); ``device`` is where it
    runs.
    """

    data: DataSpec
    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    cache_dir: str
    device: torch.device
    dataset_key: str


@runtime_checkable
class Metric(Protocol):
    """Scores samples against real images.

    ``compute(samples, reference)``: uint8 N×C×H×W each -> ``{key: float}`` with stable
    public keys listed in ``keys`` (e.g. ``fid``, ``kid``). ``features`` names the feature
    space used (``inception``, ``domain-classifier``), or None when no features are used.

    Optional, for sharded evaluation: ``extract(images) -> {name: N×D features}`` computed
    batch by batch in order (batch-aligned shards concatenate to the whole),
    ``score(sample_features, reference_features) -> {key: float}``,
    ``reference_features(reference)`` (cached) and ``feature_key`` (metrics
    with equal keys produce identical features, so evaluation extracts once for all of
    them). A metric without them is computed whole by ``compute`` on the main process.
    ``needs_labels = True``: ``compute(samples, reference, labels=...)`` also receives the
    int64 N classes the samples were drawn for (``class-accuracy``).
    """

    keys: tuple[str, ...]
    features: str | None

    def compute(self, samples: Tensor, reference: Tensor) -> dict[str, float]: ...


@runtime_checkable
class DataSource(Protocol):
    """Raw examples of a dataset, by split.

    ``split(name)`` is a random-access sequence of ``(image, label)`` with the image a
    uint8 numpy array (H×W grayscale, H×W×3 or H×W×4) or a PIL image of any size;
    preprocessing (size, channels, range) is the core's job (``spheregen.data``).
    ``num_classes`` is the label count (0 for unlabelled data); ``key`` identifies the
    data for caches (dataset id, revision, options).
    """

    num_classes: int
    key: str

    def splits(self) -> tuple[str, ...]: ...

    def split(self, name: str) -> Sequence[tuple[Any, int]]: ...
