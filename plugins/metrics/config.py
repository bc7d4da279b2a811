"""Config classes of the metric plugins (frozen, keyword-only attrs, as every component).

Every metric names its feature space in ``features``. The default is ``"inception"``
(torch-fidelity's InceptionV3, the published convention); it needs a weights file that
is checked when the metric is built, and a missing file is an error that names the
offline alternative ``"domain-classifier"``. CMMD names its space in ``embedding``
(``"clip"`` by default, same rules). No feature space is ever substituted at run time.
"""

from __future__ import annotations

import typing
from typing import Literal

import attrs

from spheregen.api import non_negative, positive

FEATURES = ("inception", "domain-classifier")
Features = Literal["inception", "domain-classifier"]



@attrs.frozen(kw_only=True)
class ClassifierConfig:
    """The domain classifier spheregen trains as an offline feature space.

    A small CNN of three conv stages (``width``, 2·``width``, 4·``width`` channels) at
    the data's native resolution; its 4·``width``-dim global-pooled features serve
    FID/KID/precision-recall and its logits serve the Inception Score. Trained with
    AdamW and a one-cycle schedule, seeded, on the experiment's training split; the
    result is cached per dataset key and config hash.
    """

    width: int = attrs.field(default=32, validator=positive)
    epochs: int = attrs.field(default=6, validator=positive)
    batch_size: int = attrs.field(default=128, validator=positive)
    lr: float = attrs.field(default=3e-3, validator=positive)
    weight_decay: float = attrs.field(default=1e-4, validator=non_negative)
    seed: int = 0


@attrs.frozen(kw_only=True)
class FeatureMetricConfig:
    """Options every torch-fidelity metric shares.

    ``features``: ``inception`` (torch-fidelity ``inception-v3-compat``; weights from the
    local torch hub cache) or ``domain-classifier`` (trained by spheregen on the
    labelled training split, see :class:`ClassifierConfig`). ``batch_size``: images per
    feature-extractor batch.
    """

    features: Features = attrs.field(default="inception", validator=attrs.validators.in_(FEATURES))
    batch_size: int = attrs.field(default=64, validator=positive)
    classifier: ClassifierConfig = attrs.field(factory=ClassifierConfig)

    @classmethod
    def tiny(cls):
        """The offline feature space with a one-epoch classifier (contract tests)."""
        return cls(features="domain-classifier", classifier=ClassifierConfig(width=8, epochs=1, batch_size=32))


@attrs.frozen(kw_only=True)
class FidConfig(FeatureMetricConfig):
    """Fréchet distance between feature Gaussians of samples and reference."""


@attrs.frozen(kw_only=True)
class KidConfig(FeatureMetricConfig):
    """Kernel (polynomial, degree 3) MMD² averaged over ``subsets`` random subsets.

    The subset size used is ``min(subset_size, n_samples, n_reference)``: torch-fidelity
    refuses a subset larger than either set, and small evaluations (a few hundred
    samples) are normal here. With n_samples <= subset_size every subset holds all
    samples, so ``kid_std`` then only reflects the choice of reference subsets.
    ``seed`` fixes the subsets.
    """

    subsets: int = attrs.field(default=100, validator=positive)
    subset_size: int = attrs.field(default=1000, validator=attrs.validators.ge(2))
    seed: int = 2020


@attrs.frozen(kw_only=True)
class InceptionScoreConfig(FeatureMetricConfig):
    """exp(E KL(p(y|x) || p(y))) over ``splits`` splits of the shuffled samples (the
    splits used are ``min(splits, n_samples)``); ``seed`` fixes the shuffle
    (2020, as the official evaluation)."""

    splits: int = attrs.field(default=10, validator=positive)
    seed: int = 2020


@attrs.frozen(kw_only=True)
class PrecisionRecallConfig(FeatureMetricConfig):
    """Improved precision/recall (Kynkäänniemi et al. 2019) with k-NN manifolds of
    ``neighborhood`` neighbours; both sets need more than ``neighborhood`` images."""

    neighborhood: int = attrs.field(default=3, validator=positive)


EMBEDDINGS = ("clip", "domain-classifier")
Embedding = Literal["clip", "domain-classifier"]
# torch-fidelity 0.4's CLIP extractors (torch_fidelity.feature_extractor_clip.MODEL_METADATA)
ClipModel = Literal[
    "clip-rn50",
    "clip-rn101",
    "clip-rn50x4",
    "clip-rn50x16",
    "clip-rn50x64",
    "clip-vit-b-32",
    "clip-vit-b-16",
    "clip-vit-l-14",
    "clip-vit-l-14-336px",
]
CLIP_MODELS = typing.get_args(ClipModel)


@attrs.frozen(kw_only=True)
class CmmdConfig:
    """CMMD (Jayasumana et al. 2024): MMD² with a Gaussian RBF kernel between
    L2-normalised image embeddings of samples and reference, × ``scale``.

    ``embedding``: ``clip`` (torch-fidelity's CLIP image encoder ``clip_model``, default
    ViT-L/14 at 336 px as in the paper; weights from the local torch hub cache) or
    ``domain-classifier`` (the offline feature space of :class:`ClassifierConfig`).
    ``sigma``: kernel bandwidth, k(x, y) = exp(-‖x − y‖² / (2σ²)); the paper's 10.
    ``scale``: the paper's ×1000. ``batch_size``: images per extractor batch.
    """

    embedding: Embedding = attrs.field(default="clip", validator=attrs.validators.in_(EMBEDDINGS))
    clip_model: ClipModel = attrs.field(default="clip-vit-l-14-336px", validator=attrs.validators.in_(CLIP_MODELS))
    sigma: float = attrs.field(default=10.0, validator=positive)
    scale: float = attrs.field(default=1000.0, validator=positive)
    batch_size: int = attrs.field(default=64, validator=positive)
    classifier: ClassifierConfig = attrs.field(factory=ClassifierConfig)

    @classmethod
    def tiny(cls):
        """The offline feature space with a one-epoch classifier (contract tests)."""
        return cls(embedding="domain-classifier", classifier=ClassifierConfig(width=8, epochs=1, batch_size=32))


@attrs.frozen(kw_only=True)
class ClassAccuracyConfig:
    """Share of class-conditional samples that the domain classifier (trained on the
    experiment's labelled data, see :class:`ClassifierConfig`) assigns to the class they
    were drawn for: an objective "are these recognisable digits of the asked class".
    ``batch_size``: images per classifier batch."""

    batch_size: int = attrs.field(default=256, validator=positive)
    classifier: ClassifierConfig = attrs.field(factory=ClassifierConfig)

    @classmethod
    def tiny(cls):
        return cls(classifier=ClassifierConfig(width=8, epochs=1, batch_size=32))
