"""An offline feature space: a small CNN classifier trained on the experiment's data.

Where the Inception weights cannot be had, FID/KID/IS/precision-recall are computed in
the feature space of a classifier spheregen trains itself on the labelled training split
at the data's native resolution. It is a different, labelled feature space
(``FID[domain-classifier]``), never a stand-in for Inception numbers; its held-out test
accuracy is reported with every score so a reader can judge the features.

The trained weights live in one file (state dict plus the architecture and provenance
as plain data). torch-fidelity builds :class:`DomainClassifierExtractor` from that path
(``feature_extractor_weights_path``), so the extractor works in any process.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

from spheregen.api import ConfigError, DataError, MetricContext, config_hash, to_dict
from spheregen_plugins.metrics.config import ClassifierConfig

EXTRACTOR = "spheregen-domain-classifier"
FORMAT = "spheregen-domain-classifier/1"
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


# ---------------------------------------------------------------- training and cache


@attrs.frozen(kw_only=True)
class TrainedClassifier:
    """A trained classifier on disk: ``path`` is what torch-fidelity loads."""

    path: Path
    key: str
    test_accuracy: float
    train_seconds: float
    trained_now: bool

    @property
    def info(self) -> str:
        return f"domain-classifier (test acc {100 * self.test_accuracy:.1f}%)"


def ensure_classifier(cfg: ClassifierConfig, ctx: MetricContext) -> TrainedClassifier:
    """The classifier for ``ctx``'s dataset: loaded from the cache, or trained and cached.

    The cache entry is ``<cache_dir>/domain-classifier/<dataset>-<hash>/classifier.pt``
    with the hash over the dataset key, this config and the data's shapes, so every
    metric of an experiment (and every later run) shares one training.
    """
    _check_data(ctx)
    key = config_hash(
        {
            "format": FORMAT,
            "dataset_key": ctx.dataset_key,
            "classifier": cfg,
            "train_shape": list(ctx.train_images.shape),
            "test_shape": list(ctx.test_images.shape),
            "num_classes": ctx.data.num_classes,
        }
    )
    path = Path(ctx.cache_dir) / "domain-classifier" / f"{slug(ctx.dataset_key)}-{key}" / "classifier.pt"
    if path.is_file():
        meta = torch.load(path, map_location="cpu", weights_only=True)
        return TrainedClassifier(
            path=path, key=key, test_accuracy=meta["test_accuracy"], train_seconds=meta["train_seconds"], trained_now=False
        )
    start = time.perf_counter()
    model = train_classifier(cfg, ctx.train_images, ctx.train_labels, ctx.data.num_classes, ctx.device)
    seconds = time.perf_counter() - start
    accuracy = classifier_accuracy(model, ctx.test_images, ctx.test_labels, cfg.batch_size)
    checkpoint = {
        "format": FORMAT,
        "width": cfg.width,
        "num_classes": ctx.data.num_classes,
        "image_size": list(ctx.train_images.shape[-2:]),
        "state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
        "test_accuracy": accuracy,
        "train_seconds": seconds,
        "dataset_key": ctx.dataset_key,
        "config": to_dict(cfg),
    }
    _atomic_save(checkpoint, path)
    return TrainedClassifier(path=path, key=key, test_accuracy=accuracy, train_seconds=seconds, trained_now=True)


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
    """Train a :class:`DomainCNN` on uint8 N×C×H×W images and int64 N labels.

    Seeded (initialisation and batch order), so a fixed input gives the same weights on
    a fixed device and thread count. Returns the model in eval mode.
    """
    if len(images) == 0 or len(images) != len(labels):
        raise ValueError(f"need equally many images and labels, got {len(images)} and {len(labels)}")
    device = torch.device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = DomainCNN(cfg.width, num_classes).to(device)
    order = torch.Generator().manual_seed(cfg.seed)
    n = len(images)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch, pct_start=0.15
    )
    model.train()
    for _ in range(cfg.epochs):
        perm = torch.randperm(n, generator=order)
        for i in range(0, n, cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            x = to_input(images[idx].to(device))
            _, logits = model(x)
            loss = F.cross_entropy(logits, labels[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    if not torch.isfinite(loss):
        raise RuntimeError(f"domain classifier training diverged (loss {loss.item()}); lower classifier.lr")
    return model.eval()


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
    """Rebuild a classifier from its cache file; returns (model in eval mode, metadata)."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if checkpoint.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} file (format {checkpoint.get('format')!r})")
    model = DomainCNN(checkpoint["width"], checkpoint["num_classes"])
    model.load_state_dict(checkpoint.pop("state_dict"))
    return model.to(device).eval(), checkpoint


def slug(text: str) -> str:
    """A file-name-safe prefix of a dataset key (caches stay readable)."""
    return re.sub(r"[^A-Za-z0-9_.]+", "-", text).strip("-")[:40] or "data"


def _atomic_save(obj: Any, path: Path) -> None:
    # a concurrent reader sees either no file or a whole one
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


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
