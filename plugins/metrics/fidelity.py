"""FID, KID, Inception Score and precision/recall through torch-fidelity.

Each metric is built once per experiment (``Metric(cfg, ctx)``) and then scores many
sample sets (one per method and step count) against the same reference images:

* the feature space is resolved at build time (Inception weights looked up, or the
  domain classifier trained/loaded), so a missing file fails before any training;
* features are extracted here with torch-fidelity's extractors (one shared instance per
  network, weights and device), batch by batch in order, and scored by torch-fidelity's
  own ``*_featuresdict_to_metric`` functions: the numbers are ``calculate_metrics``' on
  the same inputs, while evaluation can shard extraction over processes and extract a
  sample set once for all metrics of one feature space (equal ``feature_key``);
* the reference's features are cached on disk under ``<cache_dir>/features/`` by
  content, dataset key, feature space and batch size, so they are extracted once;
  samples are never cached (each set is scored once). Evaluation hands KID and
  precision/recall the reference's capped, class-balanced subset; FID scores against
  the reference's statistics (``reference_statistics``: mean and covariance of the whole
  split, streamed and cached, or the arrays of ``[eval] reference_stats``, checked to be
  in FID's feature space);
* every random choice (KID subsets, IS shuffle) is seeded, and CPU feature extraction
  is deterministic, so a fixed input gives a fixed score.
"""

from __future__ import annotations

import functools
import hashlib
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, ClassVar

import attrs
import numpy as np
import threadpoolctl
import torch
import torch_fidelity
from torch import Tensor
from tqdm.auto import tqdm
from torch_fidelity.metric_fid import fid_featuresdict_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import isc_featuresdict_to_metric
from torch_fidelity.metric_kid import kid_featuresdict_to_metric
from torch_fidelity.metric_prc import prc_featuresdict_to_metric
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from torch_fidelity.utils import create_feature_extractor

from spheregen.api import Column, ConfigError, MetricContext, atomic_write, autocast
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
    """The feature space ``cfg.features`` names, ready to use, or the error saying why not.
    Under ``ctx.mixed_precision`` its cache tag and label say so (:func:`precision_tag`)."""
    if cfg.features == "inception":
        path = inception.find_inception_weights()
        return FeatureSpace(
            name="inception",
            extractor=inception.EXTRACTOR,
            weights_path=path,
            cache_tag="tf20151205" + precision_tag(ctx),
            info=f"inception ({inception.EXTRACTOR}, torch-fidelity {torch_fidelity.__version__}"
                 f"{precision_info(ctx)})",
        )
    trained = domain_classifier.ensure_classifier(cfg.classifier, ctx)
    domain_classifier.register_with_torch_fidelity()
    return FeatureSpace(
        name="domain-classifier",
        extractor=domain_classifier.EXTRACTOR,
        weights_path=trained.path,
        cache_tag=f"dc{trained.key}" + precision_tag(ctx),
        info=trained.info + precision_info(ctx),
        accuracy=trained.test_accuracy,
    )


def precision_tag(ctx: MetricContext) -> str:
    """What ``[eval] mixed_precision`` adds to cache tags and feature keys ("" at "no"):
    features extracted under bf16 autocast differ from fp32 ones, so neither may be served
    for the other from a cache, nor fp32 reference statistics be read as bf16 ones."""
    return "" if ctx.mixed_precision == "no" else f"-{ctx.mixed_precision}"


def precision_info(ctx: MetricContext) -> str:
    """What it adds to the feature space's label in reports."""
    return "" if ctx.mixed_precision == "no" else f", {ctx.mixed_precision} autocast"


def content_digest(images: Tensor) -> str:
    """A short digest of a uint8 tensor's shape and bytes (the reference's cache identity)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(repr(tuple(images.shape)).encode())
    h.update(images.detach().cpu().contiguous().numpy().data)
    return h.hexdigest()


def cached_tensors(path: Path, compute: Callable[[], dict[str, Tensor]]) -> dict[str, Tensor]:
    """The tensors saved at ``path``, else ``compute()`` saved there (atomically) first."""
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True)
    tensors = compute()
    atomic_write(path, lambda p: torch.save(tensors, p))
    return tensors


def check_images(name: str, images: Any) -> Tensor:
    if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
        got = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"{name} must be a uint8 tensor N×C×H×W, got {got}")
    if images.shape[1] not in (1, 3):
        raise ValueError(f"{name} must have 1 or 3 channels, got {images.shape[1]}")
    return images


@functools.lru_cache(maxsize=8)
def _extractor(name: str, weights_path: str, device: str, stamp: tuple[int, int]) -> torch.nn.Module:
    """One feature extractor per (network, weights file, device), shared by the metrics
    that use it (FID, KID, IS and precision/recall need one Inception, not four).
    ``stamp`` (the file's size and mtime) is only part of the key: a file replaced at the
    same path (a retrained classifier) loads anew instead of serving the old weights."""
    cls = FEATURE_EXTRACTORS_REGISTRY[name]
    layers = list(cls.get_provided_features_list())
    dev = torch.device(device)
    with warnings.catch_warnings():
        # torch-fidelity reads OpenAI's CLIP files with torch.jit.load, which recent torch
        # flags as deprecated on every build; nothing for a user to act on
        warnings.filterwarnings("ignore", message="`torch.jit.load` is deprecated", category=FutureWarning)
        net = create_feature_extractor(name, layers, cuda=False, feature_extractor_weights_path=weights_path,
                                       verbose=False)
    return net.to(dev).eval()


def shared_extractor(space: FeatureSpace, device: torch.device | str) -> torch.nn.Module:
    """The one extractor instance of ``space`` on ``device`` (every layer it provides)."""
    stat = Path(space.weights_path).stat()
    return _extractor(space.extractor, str(space.weights_path), str(device), (stat.st_size, stat.st_mtime_ns))


@torch.no_grad()
def extract_layers(net: torch.nn.Module, images: Tensor, batch_size: int, device: torch.device | str) -> dict[str, Tensor]:
    """uint8 N×C×H×W -> {layer: float N×D on the CPU} for every layer ``net`` provides, in
    batches of ``batch_size`` taken in order (so batch-aligned shards concatenate to
    exactly the whole); grayscale is replicated to RGB. No images: an empty dict. More than
    one batch (a reference): a progress bar."""
    parts: dict[str, list[Tensor]] = {}
    for i in tqdm(range(0, len(images), batch_size), desc=f"features ({type(net).__name__})", leave=False,
                  disable=len(images) <= batch_size):
        x = images[i:i + batch_size].to(device)
        feats = net.convert_features_tuple_to_dict(net(x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x))
        for k, v in feats.items():
            parts.setdefault(k, []).append(v.cpu())
    return {k: torch.cat(v) for k, v in parts.items()}


class ReferenceCache:
    """A metric's features of its reference images: in memory by tensor identity (same
    tensor, same version: an in-place change re-extracts), and on disk as
    ``<cache_dir>/features/spheregen-ref-<dataset>-<content digest>-<tag>.pt``, so a
    reference is extracted once across evaluations. ``tag`` must name everything the
    features depend on besides the images (feature space, weights, layers, batch size).
    The memory is shared by every instance (the :data:`KEEP` latest references), so the
    metrics of one feature space (FID, KID, precision/recall) hold one copy; it can hold
    several references (gFID's train split and rFID's test split)."""

    KEEP = 4
    _recent: OrderedDict[tuple[str, str, str, int], tuple[Tensor, int, dict[str, Tensor]]] = OrderedDict()

    def __init__(self, ctx: MetricContext, tag: str, extract: Callable[[Tensor], dict[str, Tensor]]):
        self.ctx, self.tag, self.extract = ctx, tag, extract

    def __call__(self, reference: Tensor) -> dict[str, Tensor]:
        key = (str(self.ctx.cache_dir), self.ctx.dataset_key, self.tag, id(reference))
        memo = self._recent.get(key)
        if memo is not None and memo[0] is reference and memo[1] == reference._version:
            return memo[2]
        dataset = domain_classifier.slug(self.ctx.dataset_key)
        name = f"spheregen-ref-{dataset}-{content_digest(reference)}-{self.tag}"
        features = cached_tensors(Path(self.ctx.cache_dir) / "features" / f"{name}.pt",
                                  lambda: self.extract(reference))
        self._recent[key] = (reference, reference._version, features)
        self._recent.move_to_end(key)
        while len(self._recent) > self.KEEP:
            self._recent.popitem(last=False)
        return features


class ReferenceMemo:
    """Values derived from a reference's features alone (FID's mean and covariance,
    CMMD's kernel mean over reference pairs), kept per features tensor (the same object,
    which :class:`ReferenceCache` hands out for one reference), so scoring every method
    and step count against one reference computes them once."""

    def __init__(self) -> None:
        self._memo: dict[int, tuple[Tensor, Any]] = {}

    def get(self, features: Tensor, compute: Callable[[], Any]) -> Any:
        hit = self._memo.get(id(features))
        if hit is None or hit[0] is not features:
            hit = (features, compute())
            self._memo[id(features)] = hit
        return hit[1]


class FidelityMetric:
    """Base of the torch-fidelity metrics: features are extracted here, batch by batch,
    and scored by torch-fidelity's own ``*_featuresdict_to_metric`` functions, so the
    numbers are those of ``torch_fidelity.calculate_metrics`` on the same inputs at the
    same batch size (precision/recall: its ``save_cpu_ram=True`` blockwise path).

    ``extract`` / ``score`` are split so evaluation can shard extraction over processes
    and share one extraction among the metrics of one feature space (``feature_key``).
    Subclasses name the torch-fidelity metric, map its result keys to public keys and
    implement ``_score``."""

    FLAG: ClassVar[str]  # torch-fidelity metric name: fid, kid, isc, prc
    columns: ClassVar[tuple[Column, ...]]  # what reports show (the std keys stay in the parquet)
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
        extractor = FEATURE_EXTRACTORS_REGISTRY[self.space.extractor]
        self.layer = extractor.get_default_feature_layer_for_metric(self.FLAG)
        # what any metric of this feature space reads (they share one extraction): for
        # Inception 2048 + logits_unbiased, 3,056 of the 5,088 floats per image it provides
        self.layers = frozenset(extractor.get_default_feature_layer_for_metric(f) for f in ("fid", "kid", "isc", "prc"))
        # batch size is part of the identity: features are bit-exact only for equal batches
        self.batch_size = cfg.batch_size
        self.feature_key = f"{self.space.extractor}:{self.space.cache_tag}:b{cfg.batch_size}"
        self._references = ReferenceCache(ctx, f"{self.space.cache_tag}-b{cfg.batch_size}",
                                          lambda images: self.extract(images))

    def extract(self, images: Tensor) -> dict[str, Tensor]:
        """uint8 N×C×H×W -> {layer: float N×D on the CPU} for the layers the torch-fidelity
        metrics read (``self.layers``; :func:`extract_layers`, batches of ``cfg.batch_size``)."""
        images = check_images("images", images)
        net = shared_extractor(self.space, self.ctx.device)
        with autocast(self.ctx.device, self.ctx.mixed_precision):
            layers = extract_layers(net, images, self.cfg.batch_size, self.ctx.device)
        # float32 whatever autocast made of a layer (numpy, which scores, has no bfloat16)
        return {k: v.float() for k, v in layers.items() if k in self.layers}

    def score(self, sample_features: dict[str, Tensor], reference_features: dict[str, Tensor] | None) -> dict[str, float]:
        """Features from :meth:`extract` (shards concatenated) -> {public key: float}."""
        n_ref = _count(reference_features, self.layer) if self.NEEDS_REFERENCE else 0
        # One BLAS thread for the numpy statistics (covariances, FID's eigvals): the
        # result no longer depends on the core count, and OpenBLAS threads competing
        # with torch's on a busy CPU made a 128-dim FID take 1.7 s instead of 5 ms.
        with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
            raw = self._score(sample_features, reference_features, len(sample_features[self.layer]), n_ref)
        out = {public: float(raw[key]) for public, key in self.KEYS.items()}
        if self.space.accuracy is not None:
            out[self.accuracy_key] = float(self.space.accuracy)
        return out

    def compute(self, samples: Tensor, reference: Tensor | None = None) -> dict[str, float]:
        """uint8 N×C×H×W samples and reference -> {public key: float}."""
        samples = check_images("samples", samples)
        ref_features = None
        if self.NEEDS_REFERENCE:
            reference = check_images("reference", reference)
            if reference.shape[-2:] != samples.shape[-2:]:
                raise ValueError(
                    f"samples are {tuple(samples.shape[-2:])} but the reference is {tuple(reference.shape[-2:])}; "
                    "score images at one resolution"
                )
            ref_features = self.reference_features(reference)
        return self.score(self.extract(samples), ref_features)

    def reference_features(self, reference: Tensor) -> dict[str, Tensor]:
        """:meth:`extract` of the reference, cached in memory and on disk (:class:`ReferenceCache`)."""
        return self._references(reference)

    def _score(self, samples: dict[str, Tensor], reference: dict[str, Tensor] | None, n_samples: int,
               n_reference: int) -> dict[str, float]:
        raise NotImplementedError


class FID(FidelityMetric):
    """Fréchet Inception Distance (or Fréchet distance in the configured feature space).

    The reference ``score`` takes is its features (``reference_features``, as
    ``compute`` uses) or its statistics (``reference_statistics``: float64 ``mu`` D and
    ``sigma`` D×D). ``statistics_features`` names the feature space, layer and weights,
    as statistics files record it."""

    FLAG = "fid"
    KEYS = {"fid": "frechet_inception_distance"}
    PREFIX = "fid"
    # also scored on tokenizer reconstructions (rFID); the header names the feature space;
    # the report's step table, plots and Pareto front follow it
    columns = (Column(key="fid", label="FID", format="{:.2f}", better="lower", features=True,
                      label_features=True, reconstruction=True, headline=True),)

    def __init__(self, cfg: FeatureMetricConfig, ctx: MetricContext):
        super().__init__(cfg, ctx)
        self._reference_stats = ReferenceMemo()
        self._streamed: dict[str, dict[str, Any]] = {}  # reference key -> statistics
        self.statistics_features = f"{self.space.name}:{self.space.extractor}:{self.layer}:{self.space.cache_tag}"

    def reference_statistics(self, reference: Any) -> dict[str, Any]:
        """float64 ``mu`` and ``sigma`` of ``reference`` (a ReferenceSet: ``key``,
        ``stats``, ``cap``, ``batches``, ``subset_images``): the checked statistics file
        when it has one; else, when the whole split is its subset, those of the subset's
        cached features (as ``compute`` takes them); else streamed over the whole split
        once, in batches of ``cfg.batch_size``, and cached on disk by the reference's key."""
        if reference.stats is not None:
            return self._checked(reference.stats)
        if len(reference) <= reference.cap:
            features = self.reference_features(reference.subset_images())
            return self._reference_stats.get(features[self.layer],
                                             lambda: fid_featuresdict_to_statistics(features, self.layer))
        if reference.key not in self._streamed:
            name = f"spheregen-refstats-{domain_classifier.slug(reference.key)}-{self.space.cache_tag}-" \
                   f"{self.layer}-b{self.cfg.batch_size}"
            stats = cached_tensors(Path(self.ctx.cache_dir) / "features" / f"{name}.pt",
                                   lambda: self._stream(reference))
            self._streamed[reference.key] = {k: v.numpy() for k, v in stats.items() if k in ("mu", "sigma")}
        return self._streamed[reference.key]

    def _stream(self, reference: Any) -> dict[str, Tensor]:
        moments = Moments()
        desc = f"FID statistics of the {reference.name} ({len(reference)} images, {self.features})"
        for images in reference.batches(self.cfg.batch_size, desc=desc):
            moments.add(self.extract(images)[self.layer])
        return moments.statistics()

    def _checked(self, stats: dict[str, Any]) -> dict[str, Any]:
        """The statistics file's arrays, once they are known to be in this FID's feature
        space: its recorded ``features`` (a file recording none holds Inception
        statistics, as ADM's and the Sphere Encoder's do) and its dimension."""
        where = f"eval.reference_stats = {stats['path']!r}"
        recorded = stats["features"] if stats["features"] is not None else "inception (recorded in no 'features' array)"
        if stats["features"] != self.statistics_features and (stats["features"] is not None or
                                                               self.space.name != "inception"):
            raise ConfigError(f"{where} holds statistics in the feature space {recorded}, but this FID measures in "
                              f"{self.statistics_features} ({self.feature_info}): write the file for this "
                              "experiment with `spheregen reference-stats EXPERIMENT.toml --out FILE.npz`, or set "
                              "the metric's features to the file's")
        dim = self._dimension()
        if stats["mu"].shape != (dim,):
            raise ConfigError(f"{where} holds {len(stats['mu'])}-dimensional statistics, but this FID's features "
                              f"({self.statistics_features}) have {dim} dimensions")
        return {"mu": stats["mu"], "sigma": stats["sigma"]}

    def _dimension(self) -> int:
        """Size of the FID layer, from the features of one black image."""
        spec = self.ctx.data
        probe = torch.zeros((1, spec.channels, spec.image_size, spec.image_size), dtype=torch.uint8)
        return int(self.extract(probe)[self.layer].shape[1])

    def _score(self, samples, reference, n_samples, n_reference):
        _at_least("FID", 2, n_samples, *([n_reference] if n_reference is not None else []))
        if "mu" in reference:
            ref_stats = reference
        else:
            ref_stats = self._reference_stats.get(reference[self.layer],
                                                  lambda: fid_featuresdict_to_statistics(reference, self.layer))
        sample_stats = fid_featuresdict_to_statistics(samples, self.layer)
        if sample_stats["mu"].dtype != ref_stats["mu"].dtype:  # float32 means of features, float64 of a file
            sample_stats = {k: v.astype(np.float64) for k, v in sample_stats.items()}
            ref_stats = {k: np.asarray(v, np.float64) for k, v in ref_stats.items()}
        return fid_statistics_to_metric(sample_stats, ref_stats, verbose=False)


class Moments:
    """Mean and covariance (float64, as ``np.cov``) of feature rows added batch by batch,
    shifted by the first batch's mean so the sums stay well conditioned."""

    def __init__(self) -> None:
        self.n = 0
        self.shift: Tensor | None = None
        self.s1: Tensor | float = 0.0
        self.s2: Tensor | float = 0.0

    def add(self, rows: Tensor) -> None:
        x = rows.double()
        if self.shift is None:
            self.shift = x.mean(0)
        d = x - self.shift
        self.n += len(x)
        self.s1 = self.s1 + d.sum(0)
        self.s2 = self.s2 + d.T @ d

    def statistics(self) -> dict[str, Tensor]:
        _at_least("FID statistics", 2, self.n)
        mean = self.s1 / self.n
        return {"mu": self.shift + mean, "sigma": (self.s2 - self.n * torch.outer(mean, mean)) / (self.n - 1),
                "n": torch.tensor(self.n)}


class KID(FidelityMetric):
    """Kernel Inception Distance: mean and std over random subsets (size adapts to small N)."""

    FLAG = "kid"
    KEYS = {"kid": "kernel_inception_distance_mean", "kid_std": "kernel_inception_distance_std"}
    PREFIX = "kid"
    columns = (Column(key="kid", label="KID×10³", format="{:.2f}", scale=1e3, better="lower"),)

    def subset_size(self, n_samples: int, n_reference: int) -> int:
        """min(configured size, n_samples, n_reference): see :class:`KidConfig`."""
        return min(self.cfg.subset_size, n_samples, n_reference)

    def _score(self, samples, reference, n_samples, n_reference):
        _at_least("KID", 2, n_samples, n_reference)
        return kid_featuresdict_to_metric(samples, reference, self.layer, kid_subsets=self.cfg.subsets,
                                          kid_subset_size=self.subset_size(n_samples, n_reference),
                                          rng_seed=self.cfg.seed, verbose=False)


class InceptionScore(FidelityMetric):
    """Inception Score of the samples (the reference is not used)."""

    FLAG = "isc"
    KEYS = {"is": "inception_score_mean", "is_std": "inception_score_std"}
    PREFIX = "is"
    columns = (Column(key="is", label="IS", format="{:.2f}", better="higher"),)
    NEEDS_REFERENCE = False

    def _score(self, samples, reference, n_samples, n_reference):
        _at_least("Inception Score", 2, n_samples)
        return isc_featuresdict_to_metric(samples, self.layer, isc_splits=min(self.cfg.splits, n_samples),
                                          samples_shuffle=True, rng_seed=self.cfg.seed, verbose=False)


class PrecisionRecall(FidelityMetric):
    """Improved precision and recall of the samples against the reference."""

    FLAG = "prc"
    KEYS = {"precision": "precision", "recall": "recall"}
    PREFIX = "prc"
    columns = (Column(key="precision", label="precision", format="{:.3f}", better="higher"),
               Column(key="recall", label="recall", format="{:.3f}", better="higher"))

    def _score(self, samples, reference, n_samples, n_reference):
        _at_least("precision/recall", self.cfg.neighborhood + 1, n_samples, n_reference)
        return prc_featuresdict_to_metric(samples, reference, self.layer, prc_neighborhood=self.cfg.neighborhood,
                                          save_cpu_ram=True, verbose=False)


def _count(reference: dict[str, Any], layer: str) -> int | None:
    """Images behind a reference: the rows of its features, None for statistics."""
    return None if "mu" in reference else len(reference[layer])


def _at_least(metric: str, minimum: int, *counts: int) -> None:
    if min(counts) < minimum:
        raise ValueError(f"{metric} needs at least {minimum} images in each set, got {list(counts)}")
