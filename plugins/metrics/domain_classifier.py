"""An offline feature space: a small CNN classifier trained on the experiment's data.

Where the Inception weights cannot be had, FID/KID/IS/precision-recall are computed in
the feature space of a classifier spheregen trains itself on the labelled training split
at the data's native resolution. It is a different, labelled feature space
(``FID[domain-classifier]``), never a stand-in for Inception numbers; its held-out test
accuracy is reported with every score so a reader can judge the features.

Fitting is a stage run by the core's accelerate trainer (:class:`ClassifierFit`, the
FittableComponent capability; ``spheregen fit EXPERIMENT.toml``, and ``run`` first);
the metric factories only load. The fitted weights are one safetensors file with
``fit.json`` beside it (architecture, provenance, test accuracy). torch-fidelity builds
:class:`DomainClassifierExtractor` from that path (``feature_extractor_weights_path``),
so the extractor works in any process.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import attrs
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

from spheregen.api import (BuildContext, ConfigError, DataError, DataSpec, FitPhase, FitRecipe, FitSpec, MetricContext,
                           load_fitted)
from spheregen_plugins.metrics.config import ClassifierConfig

EXTRACTOR = "spheregen-domain-classifier"
FORMAT = "spheregen-domain-classifier/2"  # 1: classifier.pt trained in the factory
FEATURE_LAYER = "features"
LOGITS_LAYER = "logits"


class DomainCNN(nn.Module):
    """Three conv-BN-ReLU-maxpool stages, global average pooling, a linear head.

    ``forward``: float B×3×H×W in [-1, 1] -> (features B×4·width, logits B×num_classes).
    Any H, W >= 8 work; the model is trained and used at one resolution.
    """

    def __init__(self, width: int, num_classes: int):
        super().__init__()
        chans = (3, width, 2 * width, 4 * width)
        self.body = nn.Sequential(*(_stage(i, o) for i, o in zip(chans[:-1], chans[1:])))
        self.head = nn.Linear(chans[-1], num_classes)
        self.feature_dim = chans[-1]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = self.body(x).mean(dim=(2, 3))
        return features, self.head(features)


def _stage(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True), nn.MaxPool2d(2)
    )


def to_input(images: Tensor) -> Tensor:
    """uint8 B×C×H×W (C = 1 or 3) -> float B×3×H×W in [-1, 1]; grayscale is replicated,
    as the extractor always receives 3 channels from torch-fidelity."""
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return images.float() / 127.5 - 1.0


# ---------------------------------------------------------------- fitting and loading


@attrs.frozen(kw_only=True)
class TrainedClassifier:
    """A fitted classifier on disk: ``path`` is what torch-fidelity loads."""

    path: Path
    key: str
    test_accuracy: float
    train_seconds: float
    trained_now: bool

    @property
    def info(self) -> str:
        return f"domain-classifier (test acc {100 * self.test_accuracy:.1f}%)"


class ClassifierObjective(nn.Module):
    """Cross-entropy of the classifier's logits (grayscale replicated to 3 channels, as
    torch-fidelity hands the extractor)."""

    def __init__(self, model: DomainCNN):
        super().__init__()
        self.model = model

    def loss(self, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, float]]:
        x = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
        _, logits = self.model(x)
        return F.cross_entropy(logits, labels), {}


class ClassifierFit:
    """The domain classifier as a component spheregen fits (FittableComponent): one
    phase of ``cfg.epochs`` passes over the labelled training split, AdamW (β 0.9/0.999,
    ``weight_decay``), linear warmup over 15% then cosine to 0, batches of ``batch_size``
    (global, drop-last); the report is the accuracy on the held-out split."""

    def __init__(self, cfg: ClassifierConfig, num_classes: int, shape: tuple[int, int, int]):
        self.cfg, self.num_classes, self.shape = cfg, num_classes, tuple(int(s) for s in shape)
        with torch.random.fork_rng(devices=[]):  # initialised by the config's seed alone
            torch.manual_seed(cfg.seed)
            self.model = DomainCNN(cfg.width, num_classes)

    def fit_spec(self) -> FitSpec:
        cfg = self.cfg
        identity = {"format": FORMAT, "classifier": cfg, "num_classes": self.num_classes,
                    "channels": self.shape[0], "image_size": list(self.shape[1:])}
        recipe = FitRecipe(batch_size=cfg.batch_size, lr=cfg.lr, epochs=cfg.epochs, warmup_fraction=0.15,
                           min_lr_ratio=0.0, betas=(0.9, 0.999), weight_decay=cfg.weight_decay, grad_clip=0.0,
                           seed=cfg.seed)
        return FitSpec(
            name="domain-classifier", identity=identity,
            phases=lambda: [FitPhase(name="classifier", module=ClassifierObjective(self.model), recipe=recipe)],
            state=self.model.state_dict, load=self._load, report=self._report,
        )

    def _load(self, state: dict[str, Tensor], _info: dict[str, Any]) -> None:
        self.model.load_state_dict(state)
        self.model.eval()

    @torch.no_grad()
    def _report(self, batches: Any) -> dict[str, float]:
        self.model.eval()
        correct = count = 0
        for x, y in batches:
            self.model.to(x.device)
            _, logits = self.model(x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x)
            correct += int((logits.argmax(1) == y).sum())
            count += len(y)
        return {"test_accuracy": correct / max(count, 1)}


def ensure_classifier(cfg: ClassifierConfig, ctx: MetricContext) -> TrainedClassifier:
    """The classifier for ``ctx``'s dataset, loaded from its fit
    (``<cache_dir>/fit/domain-classifier/<dataset>-<key>/weights.safetensors``, the key
    over this config, the data's shape and key and the mixed precision), so every metric
    of an experiment (and every later run) shares one fit. ``spheregen fit`` (or ``run``)
    fits it; a build outside the CLI fits it on demand (spheregen.api.load_fitted)."""
    _check_data(ctx)
    fit = ClassifierFit(cfg, ctx.data.num_classes, tuple(ctx.train_images.shape[1:]))
    result = load_fitted(fit, ctx)
    if result.weights is None:
        raise DataError("features = \"domain-classifier\" keeps its fitted classifier in the metric context's "
                        "cache_dir; the context has none")
    return TrainedClassifier(path=result.weights, key=result.key, test_accuracy=result.info["test_accuracy"],
                             train_seconds=result.info.get("seconds", 0.0), trained_now=result.fitted_now)


def _check_data(ctx: MetricContext) -> None:
    if ctx.data.num_classes <= 0:
        raise ConfigError(
            f"features = \"domain-classifier\" trains a classifier on the dataset's labels, but dataset "
            f"'{ctx.dataset_key}' is unlabelled (num_classes = 0). Use features = \"inception\" "
            "(needs its weights file) or a labelled dataset."
        )
    if len(ctx.train_images) == 0 or len(ctx.test_images) == 0:
        raise DataError(
            f"features = \"domain-classifier\" needs training images and held-out test images to report its "
            f"accuracy; dataset '{ctx.dataset_key}' has {len(ctx.train_images)} train and "
            f"{len(ctx.test_images)} test images (set data.test_split or data.test_fraction > 0)."
        )
    for name, labels in (("train", ctx.train_labels), ("test", ctx.test_labels)):
        if labels.numel() and (labels.min() < 0 or labels.max() >= ctx.data.num_classes):
            raise DataError(
                f"dataset '{ctx.dataset_key}': {name} labels must lie in [0, {ctx.data.num_classes}), "
                f"got [{int(labels.min())}, {int(labels.max())}]"
            )


def train_classifier(
    cfg: ClassifierConfig, images: Tensor, labels: Tensor, num_classes: int, device: torch.device | str = "cpu"
) -> DomainCNN:
    """Fit a :class:`DomainCNN` on uint8 N×C×H×W images and int64 N labels, through the
    core's fit (the trainer of :class:`ClassifierFit`), without caching it.

    Seeded (initialisation and batch order), so a fixed input gives the same weights on
    a fixed device and thread count. Returns the model in eval mode.
    """
    if len(images) == 0 or len(images) != len(labels):
        raise ValueError(f"need equally many images and labels, got {len(images)} and {len(labels)}")
    device = torch.device(device)
    fit = ClassifierFit(cfg, num_classes, tuple(images.shape[1:]))
    spec = DataSpec(image_size=int(images.shape[-1]), channels=int(images.shape[1]), num_classes=num_classes)
    load_fitted(fit, BuildContext(data=spec, build=None, train_data=lambda: (images, labels), device=device))
    return fit.model.to(device).eval()


@torch.no_grad()
def classifier_accuracy(model: DomainCNN, images: Tensor, labels: Tensor, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` on uint8 images."""
    device = next(model.parameters()).device
    correct = 0
    for i in range(0, len(images), batch_size):
        _, logits = model(to_input(images[i : i + batch_size].to(device)))
        correct += int((logits.argmax(1).cpu() == labels[i : i + batch_size]).sum())
    return correct / len(images)


def load_classifier(path: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[DomainCNN, dict[str, Any]]:
    """Rebuild a classifier from its fitted weights file (and the ``fit.json`` beside
    it); returns (model in eval mode, metadata: ``image_size`` [H, W], ``width``,
    ``num_classes``, ``test_accuracy``, ...)."""
    path = Path(path)
    try:
        fit = json.loads((path.parent / "fit.json").read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} is not a fitted {FORMAT} classifier: {path.parent / 'fit.json'} is "
                         f"unreadable ({exc})") from exc
    identity = fit.get("identity", {})
    if identity.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} file (format {identity.get('format')!r})")
    width, num_classes = identity["classifier"]["width"], identity["num_classes"]
    model = DomainCNN(width, num_classes)
    model.load_state_dict(load_file(str(path)))
    meta = {"format": FORMAT, "width": width, "num_classes": num_classes, "image_size": identity["image_size"],
            "config": identity["classifier"], "dataset_key": fit.get("data_key"), **fit.get("info", {})}
    return model.to(device).eval(), meta


def slug(text: str) -> str:
    """A file-name-safe prefix of a dataset key (caches stay readable)."""
    return re.sub(r"[^A-Za-z0-9_.]+", "-", text).strip("-")[:40] or "data"


# ---------------------------------------------------------------- torch-fidelity


class DomainClassifierExtractor(FeatureExtractorBase):
    """torch-fidelity feature extractor over a trained :class:`DomainCNN`.

    Layers: ``features`` (pooled, 4·width dims; FID, KID, precision/recall) and
    ``logits`` (num_classes; Inception Score). Input: uint8 B×3×H×W at the resolution
    the classifier was trained at (resizing would silently change the feature space).
    """

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        if feature_extractor_weights_path is None:
            raise ValueError(
                f"feature extractor '{name}' loads a spheregen domain classifier from "
                "feature_extractor_weights_path; none was given"
            )
        model, meta = load_classifier(feature_extractor_weights_path)
        self.model = model
        self.image_size = tuple(meta["image_size"])
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def get_provided_features_list():
        return (FEATURE_LAYER, LOGITS_LAYER)

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return LOGITS_LAYER if metric == "isc" else FEATURE_LAYER

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 32, 32, dtype=torch.uint8)

    def forward(self, x):
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"{self.name} expects uint8 B×3×H×W images, got {x.dtype} {tuple(x.shape)}")
        if tuple(x.shape[-2:]) != self.image_size:
            raise ValueError(
                f"{self.name} was trained at {self.image_size[0]}×{self.image_size[1]}, got images of "
                f"{x.shape[-2]}×{x.shape[-1]}; score samples at the dataset's resolution"
            )
        features, logits = self.model(to_input(x))
        out = {FEATURE_LAYER: features, LOGITS_LAYER: logits}
        return tuple(out[name] for name in self.features_list)


def register_with_torch_fidelity() -> None:
    """Register the extractor under :data:`EXTRACTOR` (idempotent: torch-fidelity's
    registry refuses a second registration of a name)."""
    if EXTRACTOR not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(EXTRACTOR, DomainClassifierExtractor)
