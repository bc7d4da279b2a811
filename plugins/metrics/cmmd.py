"""CMMD (Jayasumana et al. 2024, "Rethinking FID"): MMD² between image embeddings.

CMMD = ``scale`` · MMD²(X, Y) with a Gaussian RBF kernel k(x, y) = exp(-‖x − y‖² / (2σ²)),
σ = 10, scale = 1000, between the L2-normalised embeddings of the samples X (n of
them) and the reference Y (m). The estimator is the one of the reference code
(google-research/cmmd ``distance.py``): the biased, minimum-variance V-statistic of
Gretton et al. 2012, Eq. 5, whose three kernel means include the diagonal k(x, x) = 1::

    MMD² = 1/n² Σ_ij k(x_i, x_j) + 1/m² Σ_ij k(y_i, y_j) − 2/(nm) Σ_ij k(x_i, y_j)

It is exactly 0 for identical sets and never negative (unlike KID's unbiased estimate),
which is why CMMD reports it. It is computed in float64 on the metric's device, in
blocks of at most :data:`CHUNK`² kernel entries (50k × 50k never exists at once), as
means of expm1(−‖x − y‖²/(2σ²)) = k − 1: the constant 1s cancel between the three
terms, and with σ = 10 on unit vectors every k lies in [0.98, 1], so subtracting 1
before summing keeps the digits that the difference of three means near 1 would lose.

Embeddings, named by ``embedding``:

* ``clip``: torch-fidelity's CLIP image encoder (default ``clip-vit-l-14-336px``, the
  paper's ViT-L/14 at 336 px), its weights read from the torch hub cache and never
  downloaded (:func:`find_clip_weights`). torch-fidelity resizes with TF1-style bilinear
  interpolation where the reference code resizes bicubically, so values can differ from
  the reference implementation's in the last digits; they are comparable with each other.
* ``domain-classifier``: the pooled features of the classifier spheregen trains on the
  experiment's data (:mod:`spheregen_plugins.metrics.domain_classifier`), an offline and
  separately labelled feature space. Its features are L2-normalised too, so σ = 10 means
  the same thing in both spaces (the kernel sees only directions, distances ≤ 2).

For sharded evaluation: :meth:`CMMD.extract` turns images into features batch by batch
in order (so batch-aligned shards concatenated equal the whole), :meth:`CMMD.score`
scores gathered features, and ``compute = score(extract(samples), reference features)``.
The extractor instance is the one FID/KID use for the same network and weights, and the
reference's embeddings are cached like theirs: in memory and on disk under
``<cache_dir>/features/`` (CLIP ViT-L/14-336 embeds a reference once, not at every
``evaluate``). Evaluation hands CMMD the reference's capped, class-balanced subset
(``eval.reference_subset`` images, the whole split below it), as it does KID.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F
import torch_fidelity
from torch import Tensor
from torch_fidelity.feature_extractor_clip import MODEL_METADATA, MODEL_URLS, FeatureExtractorCLIP

from spheregen.api import Column, MetricContext, autocast, require_hub_file
from spheregen_plugins.metrics import domain_classifier
from spheregen_plugins.metrics.config import CmmdConfig, FeatureMetricConfig
from spheregen_plugins.metrics.fidelity import (
    FeatureSpace,
    ReferenceCache,
    ReferenceMemo,
    check_images,
    extract_layers,
    precision_info,
    precision_tag,
    resolve_features,
    shared_extractor,
)

FEATURES_KEY = "embeddings"
CLIP_LAYER = "clip"
CHUNK = 4096  # rows of a kernel block: 4096² float64 = 128 MiB


# ---------------------------------------------------------------- the estimator


def mmd2(x: Tensor, y: Tensor, sigma: float, chunk: int = CHUNK, k_yy: float | None = None) -> float:
    """Biased (V-statistic) MMD² of float n×d ``x`` and m×d ``y`` with a Gaussian RBF
    kernel of bandwidth ``sigma``, in float64 on ``x``'s device, in ``chunk``-row blocks.
    ``k_yy``: :func:`self_kernel_mean` of ``y`` when already known (it depends on the
    reference alone).

    The inputs are used as given (no normalisation, no scale): see the module docstring.
    """
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"need n×d and m×d embeddings, got {tuple(x.shape)} and {tuple(y.shape)}")
    if len(x) == 0 or len(y) == 0:
        raise ValueError(f"need at least one embedding in each set, got {len(x)} and {len(y)}")
    x = x.to(torch.float64)
    y = y.to(device=x.device, dtype=torch.float64)
    gamma = 1.0 / (2.0 * sigma**2)
    k_xx = self_kernel_mean(x, sigma, chunk)
    k_yy = self_kernel_mean(y, sigma, chunk) if k_yy is None else k_yy
    k_xy = float(_kernel_sum(x, y, gamma, chunk, symmetric=False)) / (len(x) * len(y))
    return k_xx + k_yy - 2.0 * k_xy


def self_kernel_mean(x: Tensor, sigma: float, chunk: int = CHUNK) -> float:
    """1/n² Σ_ij (k(x_i, x_j) − 1) of float64 n×d ``x`` (the k_xx / k_yy term of :func:`mmd2`)."""
    return float(_kernel_sum(x, x, 1.0 / (2.0 * sigma**2), chunk, symmetric=True)) / (len(x) * len(x))


def _kernel_sum(a: Tensor, b: Tensor, gamma: float, chunk: int, symmetric: bool) -> Tensor:
    """Σ_ij (k(a_i, b_j) − 1) over all pairs, diagonal included, block by block; with
    ``symmetric`` (a is b) each off-diagonal block is computed once and counted twice."""
    a_sq = (a * a).sum(1)
    b_sq = (b * b).sum(1)
    total = torch.zeros((), dtype=torch.float64, device=a.device)
    for i in range(0, len(a), chunk):
        for j in range(i if symmetric else 0, len(b), chunk):
            d2 = a_sq[i : i + chunk, None] + b_sq[None, j : j + chunk] - 2.0 * (a[i : i + chunk] @ b[j : j + chunk].T)
            block = torch.expm1(d2.clamp_min_(0.0).mul_(-gamma)).sum()
            total += 2.0 * block if symmetric and j != i else block
    return total


# ---------------------------------------------------------------- CLIP weights


def clip_weight_files(model: str) -> tuple[str, str]:
    """(torch-fidelity's file name for ``model``, OpenAI's name for the same file)."""
    meta = MODEL_METADATA[model]
    return f"{model}-{meta['hash']}.pt", f"{meta['filename']}.pt"


def find_clip_weights(model: str) -> Path:
    """The local CLIP weights of ``model`` in the torch hub cache, where torch-fidelity's
    download would put them, or a WeightsError saying how to get them."""
    return require_hub_file(
        clip_weight_files(model), MODEL_URLS[model], f'embedding = "clip" with clip_model = "{model}"',
        'set embedding = "domain-classifier" in the cmmd config: a classifier spheregen trains on the '
        "experiment's labelled data, reported as its own feature space (CMMD[domain-classifier]), not "
        "comparable with published CMMD numbers",
    )


def resolve_embedding(cfg: CmmdConfig, ctx: MetricContext) -> tuple[FeatureSpace, str, str]:
    """(feature space, extractor layer, weights identity) of ``cfg.embedding``, ready to use."""
    if cfg.embedding == "clip":
        path = find_clip_weights(cfg.clip_model)
        digest = MODEL_METADATA[cfg.clip_model]["hash"]  # the published file's sha256
        space = FeatureSpace(
            name="clip",
            extractor=cfg.clip_model,
            weights_path=path,
            cache_tag=f"clip{digest[:8]}" + precision_tag(ctx),
            info=f"clip ({cfg.clip_model}, torch-fidelity {torch_fidelity.__version__}{precision_info(ctx)})",
        )
        return space, CLIP_LAYER, digest[:16]
    space = resolve_features(
        FeatureMetricConfig(features="domain-classifier", batch_size=cfg.batch_size, classifier=cfg.classifier), ctx
    )
    # the trained file itself: its config hash alone does not pin weights trained elsewhere
    digest = hashlib.blake2b(space.weights_path.read_bytes(), digest_size=8).hexdigest()
    return space, domain_classifier.FEATURE_LAYER, digest


# ---------------------------------------------------------------- the metric


class CMMD:
    """CLIP-MMD (or MMD in the domain-classifier space) of samples against a reference.

    ``keys``: ``cmmd`` (plus ``cmmd_features_accuracy``, the classifier's held-out
    accuracy, in the domain-classifier space). ``feature_key`` names extractor, layer
    and weights: two metrics with equal feature_key extract identical features on one device.
    """

    PREFIX = "cmmd"
    # the feature space is recorded (cmmd_features) but not put in the header
    columns = (Column(key="cmmd", label="CMMD", format="{:.3f}", better="lower", features=True),)

    def __init__(self, cfg: CmmdConfig, ctx: MetricContext):
        self.cfg = cfg
        self.ctx = ctx
        self.device = torch.device(ctx.device)
        self.space, self.layer, digest = resolve_embedding(cfg, ctx)
        self.features = self.space.name
        self.feature_info = self.space.info
        # batch size included: features are bit-exact only for equal batch composition
        self.batch_size = cfg.batch_size
        self.feature_key = f"{self.space.extractor}:{self.layer}:{digest}:b{cfg.batch_size}{precision_tag(ctx)}"
        self.accuracy_key = f"{self.PREFIX}_features_accuracy"
        self.keys: tuple[str, ...] = ("cmmd",) + ((self.accuracy_key,) if self.space.accuracy is not None else ())
        self.extractor = shared_extractor(self.space, self.device)
        model = self.extractor.model
        self.dim = model.visual.output_dim if isinstance(self.extractor, FeatureExtractorCLIP) else model.feature_dim
        self._reference_kernel = ReferenceMemo()  # k_yy per reference embeddings
        self._references = ReferenceCache(ctx, f"cmmd-{self.space.cache_tag}-{self.layer}-{digest}-b{cfg.batch_size}",
                                          lambda images: self.extract(images))

    def extract(self, images: Tensor) -> dict[str, Tensor]:
        """uint8 N×C×H×W -> {"embeddings": float32 N×D on the CPU}, raw (normalised in
        :meth:`score`), in batches of ``cfg.batch_size`` taken in order."""
        images = check_images("images", images)
        with autocast(self.device, self.ctx.mixed_precision):
            layers = extract_layers(self.extractor, images, self.cfg.batch_size, self.device)
        return {FEATURES_KEY: layers.get(self.layer, torch.empty(0, self.dim)).float()}

    def score(self, sample_features: dict[str, Tensor], reference_features: dict[str, Tensor]) -> dict[str, float]:
        """Features from :meth:`extract` (shards concatenated) -> {public key: float}."""
        x = self._embeddings("sample_features", sample_features)
        y = self._embeddings("reference_features", reference_features)
        if min(len(x), len(y)) < 2:
            raise ValueError(f"CMMD needs at least 2 images in each set, got {[len(x), len(y)]}")
        raw_y = y
        x = F.normalize(x.to(self.device, torch.float64), dim=1)
        y = F.normalize(y.to(self.device, torch.float64), dim=1)
        k_yy = self._reference_kernel.get(raw_y, lambda: self_kernel_mean(y, self.cfg.sigma))
        out = {"cmmd": self.cfg.scale * mmd2(x, y, self.cfg.sigma, k_yy=k_yy)}
        if self.space.accuracy is not None:
            out[self.accuracy_key] = float(self.space.accuracy)
        return out

    def compute(self, samples: Tensor, reference: Tensor) -> dict[str, float]:
        """uint8 N×C×H×W samples and reference -> {public key: float}."""
        samples = check_images("samples", samples)
        reference = check_images("reference", reference)
        if reference.shape[-2:] != samples.shape[-2:]:
            raise ValueError(
                f"samples are {tuple(samples.shape[-2:])} but the reference is {tuple(reference.shape[-2:])}; "
                "score images at one resolution"
            )
        return self.score(self.extract(samples), self.reference_features(reference))

    def reference_features(self, reference: Tensor) -> dict[str, Tensor]:
        """:meth:`extract` of the reference, cached in memory and on disk (:class:`ReferenceCache`)."""
        return self._references(reference)

    def _embeddings(self, name: str, features: dict[str, Tensor]) -> Tensor:
        x = features.get(FEATURES_KEY) if isinstance(features, dict) else None
        if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[1] != self.dim:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{name} must be {{'{FEATURES_KEY}': N×{self.dim} tensor}} from extract(), got {got}")
        return x
