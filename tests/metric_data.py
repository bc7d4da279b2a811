"""Shared data for the metric tests: sklearn's 8×8 digits at 16 px, split 1617 / 180,
and a MetricContext over them."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from spheregen.interfaces import DataSpec, MetricContext
from spheregen_plugins.metrics.config import ClassifierConfig

# the domain classifier every metric test trains once per module (cached in ctx)
CLASSIFIER = ClassifierConfig(width=16, epochs=3, batch_size=64)


def digits_16px() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """uint8 train images N×1×16×16, labels, then the 180 held-out images and labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images).float().unsqueeze(1) * (255 / 16)
    x = F.interpolate(x, size=16, mode="bilinear", align_corners=False).round().clamp(0, 255).to(torch.uint8)
    y = torch.from_numpy(d.target).long()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return x[perm[180:]], y[perm[180:]], x[perm[:180]], y[perm[:180]]


def make_ctx(digits, cache_dir, num_classes: int = 10) -> MetricContext:
    xtr, ytr, xte, yte = digits
    return MetricContext(
        data=DataSpec(image_size=16, channels=1, num_classes=num_classes),
        train_images=xtr,
        train_labels=ytr,
        test_images=xte,
        test_labels=yte,
        cache_dir=str(cache_dir),
        device=torch.device("cpu"),
        dataset_key="sklearn-digits-16px",
    )
