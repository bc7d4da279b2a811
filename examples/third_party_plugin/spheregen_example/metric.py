"""``pixel-fd``: the Fréchet distance between Gaussians fitted to downsampled pixels.

A cheap, weights-free stand-in for FID: each image is average-pooled to ``size``×``size``
and flattened (C·size² numbers in [-1, 1]), and the distance between the samples' and the
reference's mean and covariance is ‖μ₁ − μ₂‖² + tr Σ₁ + tr Σ₂ − 2 tr (Σ₁^½ Σ₂ Σ₁^½)^½.
It sees colour, layout and pixel correlations at a coarse scale, not what an image shows.

What the report shows is declared on the class (``columns``): the core reads it from the
registered factory without building the metric. The metric also has the optional
``ShardableMetric`` capability (``extract`` / ``score`` / ``reference_features`` /
``batch_size`` / ``feature_key``), so evaluation can share pooling over processes;
``score(extract(samples), reference_features(reference)) == compute(samples, reference)``.
"""

from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor

from spheregen.api import Column, MetricContext, at_least_one, to_float


@attrs.frozen(kw_only=True)
class PixelFDConfig:
    """Fréchet distance between Gaussians of the samples' and the reference's pixels, each
    image average-pooled to ``size``×``size``; pooled in batches of ``batch_size``."""

    size: int = attrs.field(default=4, validator=at_least_one)
    batch_size: int = attrs.field(default=256, validator=at_least_one)


class PixelFD:
    """Fréchet distance between Gaussians of downsampled pixels (no weights needed).

    uint8 N×C×H×W samples and reference (N, M >= 2) -> {"pixel_fd": distance >= 0}."""

    keys = ("pixel_fd",)
    features = "pixels"
    columns = (Column(key="pixel_fd", label="pixel FD", format="{:.3f}", better="lower",
                      features=True, label_features=True, headline=True),)

    def __init__(self, cfg: PixelFDConfig, ctx: MetricContext):
        self.cfg = cfg
        self.batch_size = cfg.batch_size
        # equal keys promise identical features (evaluation extracts once for all of them)
        self.feature_key = f"spheregen-example/pixels-{cfg.size}"
        self.feature_info = f"pixels {cfg.size}×{cfg.size}"  # the report's header names it
        self.device = ctx.device

    def compute(self, samples: Tensor, reference: Tensor) -> dict[str, float]:
        return self.score(self.extract(samples), self.reference_features(reference))

    @torch.no_grad()
    def extract(self, images: Tensor) -> dict[str, Tensor]:
        """uint8 N×C×H×W -> {"pixels": N×(C·size²) float64}, pooled per image (so batches
        and shards concatenate to the whole)."""
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"pixel-fd scores uint8 N×C×H×W images, got {images.dtype} of shape "
                             f"{tuple(images.shape)}")
        b, size = self.batch_size, self.cfg.size
        parts = [F.adaptive_avg_pool2d(to_float(images[i:i + b].to(self.device)), size).flatten(1).double().cpu()
                 for i in range(0, len(images), b)]
        return {"pixels": torch.cat(parts) if parts else torch.empty(0, images.shape[1] * size * size)}

    def reference_features(self, reference: Tensor) -> dict[str, Tensor]:
        return self.extract(reference)

    def score(self, sample_features: dict[str, Tensor],
              reference_features: dict[str, Tensor] | None) -> dict[str, float]:
        if reference_features is None:
            raise ValueError("pixel-fd needs the reference's features")
        return {"pixel_fd": frechet_distance(sample_features["pixels"], reference_features["pixels"])}


def frechet_distance(a: Tensor, b: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to the rows of ``a`` (N×D) and ``b``
    (M×D), N, M >= 2. tr (Σ_a Σ_b)^½ is the sum of the square roots of the eigenvalues of
    the symmetric PSD Σ_a^½ Σ_b Σ_a^½ (no scipy, no complex parts)."""
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"pixel-fd needs at least 2 images on each side, got {len(a)} and {len(b)}")
    a, b = a.double(), b.double()
    cov_a, cov_b = torch.cov(a.T).reshape(a.shape[1], -1), torch.cov(b.T).reshape(b.shape[1], -1)
    w, v = torch.linalg.eigh(cov_a)
    root_a = (v * w.clamp(min=0).sqrt()) @ v.T
    inner = root_a @ cov_b @ root_a
    cross = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp(min=0).sqrt().sum()
    fd = (a.mean(0) - b.mean(0)).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross
    return max(float(fd), 0.0)  # rounding can put a zero distance a hair below 0
