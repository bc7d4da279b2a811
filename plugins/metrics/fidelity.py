"""FID, KID, Inception Score and precision/recall through torch-fidelity.

Each metric is built once per experiment (``Metric(cfg, ctx)``) and then scores many
sample sets (one per method and step count) against the same reference images:

* the feature space is resolved at build time (Inception weights looked up, or the
  domain classifier trained/loaded), so a missing file fails before any training;
* inputs go to ``torch_fidelity.calculate_metrics`` as Datasets of uint8 3×H×W tensors
  (grayscale replicated), with torch-fidelity's cache under ``<cache_dir>/torch-fidelity``;
* the reference gets a cache name from its content, the dataset key and the feature
  extractor's identity, so its features (and FID statistics) are extracted once and
  reused by every later call and by the other metrics in the same feature space;
  samples are never cached (each set is scored once);
* every random choice (KID subsets, IS shuffle) is seeded, and CPU feature extraction
  is deterministic, so a fixed input gives a fixed score.
"""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path
from typing import Any, ClassVar

import attrs
import threadpoolctl
import torch
import torch_fidelity
from torch import Tensor
from torch.utils.data import Dataset

from spheregen.interfaces import MetricContext
from spheregen_plugins.metrics import domain_classifier, inception
from spheregen_plugins.metrics.config import FeatureMetricConfig


@attrs.frozen(kw_only=True)
class FeatureSpace:
    """A resolved feature space: which torch-fidelity extractor, from which weights file.

    ``cache_tag`` distinguishes weights under one extractor name in cache file names;
    ``info`` is the human label reports print next to the score.
    """

    name: str
    extractor: str
    weights_path: Path
    cache_tag: str
    info: str
    accuracy: float | None = None


def resolve_features(cfg: FeatureMetricConfig, ctx: MetricContext) -> FeatureSpace:
    """The feature space ``cfg.features`` names, ready to use, or the error saying why not."""
    if cfg.features == "inception":
        path = inception.find_inception_weights()
        return FeatureSpace(
            name="inception",
            extractor=inception.EXTRACTOR,
            weights_path=path,
            cache_tag="tf20151205",
            info=f"inception ({inception.EXTRACTOR}, torch-fidelity {torch_fidelity.__version__})",
        )
    trained = domain_classifier.ensure_classifier(cfg.classifier, ctx)
    domain_classifier.register_with_torch_fidelity()
    return FeatureSpace(
        name="domain-classifier",
        extractor=domain_classifier.EXTRACTOR,
        weights_path=trained.path,
        cache_tag=f"dc{trained.key}",
        info=trained.info,
        accuracy=trained.test_accuracy,
    )


class UInt8Images(Dataset):
    """uint8 N×C×H×W (C = 1 or 3) as torch-fidelity wants it: items of uint8 3×H×W."""

    def __init__(self, images: Tensor):
        self.images = images.cpu()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Tensor:
        x = self.images[i]
        return x.expand(3, -1, -1) if x.shape[0] == 1 else x


def content_digest(images: Tensor) -> str:
    """A short digest of a uint8 tensor's shape and bytes (the reference's cache identity)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(repr(tuple(images.shape)).encode())
    h.update(images.detach().cpu().contiguous().numpy().data)
    return h.hexdigest()


def check_images(name: str, images: Any) -> Tensor:
    if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
        got = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"{name} must be a uint8 tensor N×C×H×W, got {got}")
    if images.shape[1] not in (1, 3):
        raise ValueError(f"{name} must have 1 or 3 channels, got {images.shape[1]}")
    return images


class FidelityMetric:
    """Base of the torch-fidelity metrics: subclasses name the torch-fidelity switch,
    map its result keys to public keys and add their options."""

    FLAG: ClassVar[str]  # calculate_metrics switch: fid, kid, isc, prc
    KEYS: ClassVar[dict[str, str]]  # public key -> torch-fidelity key
    PREFIX: ClassVar[str]  # of the feature-accuracy key, e.g. fid_features_accuracy
    NEEDS_REFERENCE: ClassVar[bool] = True

    def __init__(self, cfg: FeatureMetricConfig, ctx: MetricContext):
        self.cfg = cfg
        self.ctx = ctx
        self.space = resolve_features(cfg, ctx)
        self.features = self.space.name
        self.feature_info = self.space.info
        self.accuracy_key = f"{self.PREFIX}_features_accuracy"
        extra = (self.accuracy_key,) if self.space.accuracy is not None else ()
        self.keys: tuple[str, ...] = tuple(self.KEYS) + extra
        self._reference_memo: tuple[Tensor, int, str] | None = None

    def compute(self, samples: Tensor, reference: Tensor | None = None) -> dict[str, float]:
        """uint8 N×C×H×W samples and reference -> {public key: float}."""
        samples = check_images("samples", samples)
        kwargs = self._base_kwargs(samples)
        n_ref = 0
        if self.NEEDS_REFERENCE:
            reference = check_images("reference", reference)
            if reference.shape[-2:] != samples.shape[-2:]:
                raise ValueError(
                    f"samples are {tuple(samples.shape[-2:])} but the reference is {tuple(reference.shape[-2:])}; "
                    "score images at one resolution"
                )
            n_ref = len(reference)
            kwargs.update(input2=UInt8Images(reference), input2_cache_name=self._reference_cache_name(reference))
        kwargs.update(self._options(len(samples), n_ref))
        device = self.ctx.device
        scope = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
        # One BLAS thread for torch-fidelity's numpy statistics (covariances, FID's
        # eigvals): the result no longer depends on the core count, and OpenBLAS threads
        # competing with torch's on a busy CPU made a 128-dim FID take 1.7 s instead of 5 ms.
        with scope, threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
            raw = torch_fidelity.calculate_metrics(**kwargs)
        out = {public: float(raw[key]) for public, key in self.KEYS.items()}
        if self.space.accuracy is not None:
            out[self.accuracy_key] = float(self.space.accuracy)
        return out

    def _base_kwargs(self, samples: Tensor) -> dict[str, Any]:
        return {
            "input1": UInt8Images(samples),
            "input1_cache_name": None,
            self.FLAG: True,
            "feature_extractor": self.space.extractor,
            "feature_extractor_weights_path": str(self.space.weights_path),
            "cuda": self.ctx.device.type == "cuda",
            "batch_size": self.cfg.batch_size,
            "cache_root": str(Path(self.ctx.cache_dir) / "torch-fidelity"),
            "cache": True,
            # in-memory tensors: DataLoader workers would only add start-up cost
            "save_cpu_ram": True,
            "verbose": False,
        }

    def _reference_cache_name(self, reference: Tensor) -> str:
        # the same reference object is scored against many sample sets: hash it once
        # (an in-place change bumps the tensor's version and forces a new hash)
        memo = self._reference_memo
        if memo is not None and memo[0] is reference and memo[1] == reference._version:
            return memo[2]
        dataset = domain_classifier.slug(self.ctx.dataset_key)
        name = f"spheregen-ref-{dataset}-{content_digest(reference)}-{self.space.cache_tag}"
        self._reference_memo = (reference, reference._version, name)
        return name

    def _options(self, n_samples: int, n_reference: int) -> dict[str, Any]:
        return {}


class FID(FidelityMetric):
    """Fréchet Inception Distance (or Fréchet distance in the configured feature space)."""

    FLAG = "fid"
    KEYS = {"fid": "frechet_inception_distance"}
    PREFIX = "fid"

    def _options(self, n_samples: int, n_reference: int) -> dict[str, Any]:
        _at_least("FID", 2, n_samples, n_reference)
        return {}


class KID(FidelityMetric):
    """Kernel Inception Distance: mean and std over random subsets (size adapts to small N)."""

    FLAG = "kid"
    KEYS = {"kid": "kernel_inception_distance_mean", "kid_std": "kernel_inception_distance_std"}
    PREFIX = "kid"

    def subset_size(self, n_samples: int, n_reference: int) -> int:
        """min(configured size, n_samples, n_reference): see :class:`KidConfig`."""
        return min(self.cfg.subset_size, n_samples, n_reference)

    def _options(self, n_samples: int, n_reference: int) -> dict[str, Any]:
        _at_least("KID", 2, n_samples, n_reference)
        return {
            "kid_subsets": self.cfg.subsets,
            "kid_subset_size": self.subset_size(n_samples, n_reference),
            "rng_seed": self.cfg.seed,
        }


class InceptionScore(FidelityMetric):
    """Inception Score of the samples (the reference is not used)."""

    FLAG = "isc"
    KEYS = {"is": "inception_score_mean", "is_std": "inception_score_std"}
    PREFIX = "is"
    NEEDS_REFERENCE = False

    def _options(self, n_samples: int, n_reference: int) -> dict[str, Any]:
        _at_least("Inception Score", 2, n_samples)
        return {"isc_splits": min(self.cfg.splits, n_samples), "samples_shuffle": True, "rng_seed": self.cfg.seed}


class PrecisionRecall(FidelityMetric):
    """Improved precision and recall of the samples against the reference."""

    FLAG = "prc"
    KEYS = {"precision": "precision", "recall": "recall"}
    PREFIX = "prc"

    def _options(self, n_samples: int, n_reference: int) -> dict[str, Any]:
        _at_least("precision/recall", self.cfg.neighborhood + 1, n_samples, n_reference)
        return {"prc_neighborhood": self.cfg.neighborhood}


def _at_least(metric: str, minimum: int, *counts: int) -> None:
    if min(counts) < minimum:
        raise ValueError(f"{metric} needs at least {minimum} images in each set, got {list(counts)}")
