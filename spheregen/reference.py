"""The real images a sample set is scored against, and what the metrics reduce them to.

A :class:`ReferenceSet` is one split of the experiment's data (``eval.reference``; the
test split for reconstruction scores), streamed from the dataset's own storage, never
held whole in memory:

* :meth:`ReferenceSet.subset_images`: a seeded, class-balanced subset of at most
  ``eval.reference_subset`` images (the whole split when it is smaller), decoded once.
  KID, precision/recall, CMMD and every metric without the
  :class:`ReferenceStatisticsMetric` capability receive it as their uint8 reference,
  so their cached reference features are bounded by the cap, and unchanged for
  references under it;
* :meth:`ReferenceSet.batches`: the whole split in order, batch by batch, which a
  :class:`ReferenceStatisticsMetric` (FID) reduces to its statistics (feature mean and
  covariance), computed once per data identity and feature space and cached by it;
* :attr:`ReferenceSet.stats`: the arrays of ``[eval] reference_stats`` (``mu``,
  ``sigma`` and, in files ``spheregen reference-stats`` writes, ``features``), which
  such a metric scores against instead, after checking they are in its feature space.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from spheregen import distributed
from spheregen.data import balanced_subset, collate
from spheregen.errors import ConfigError
from spheregen.paths import atomic_write


@runtime_checkable
class ReferenceStatisticsMetric(Protocol):
    """scored against reference statistics: statistics_features, reference_statistics(reference)

    ``reference_statistics(reference)``: a :class:`ReferenceSet` -> what ``score`` takes
    as its reference (FID: float64 ``mu`` D and ``sigma`` D×D), from the whole set
    streamed by ``reference.batches(batch_size)`` and cached by ``reference.key``, or
    from ``reference.stats`` (``[eval] reference_stats``) once its ``features`` and
    dimension are checked against the metric's (a ConfigError otherwise).
    ``statistics_features`` names the feature space that ``spheregen reference-stats``
    records in the files it writes. Evaluation calls it instead of
    ``reference_features`` for a ShardableMetric that has it."""

    statistics_features: str

    def reference_statistics(self, reference: Any) -> dict[str, Any]: ...


class ReferenceSet:
    """One split of real images: ``labels`` (int64 N), ``key`` (the data identity and
    split, what caches are named by), ``cap`` (``eval.reference_subset``), ``stats``
    (the checked arrays of a statistics file, or None) and the images, read in batches
    through a ``DataLoader`` (``workers`` decoding processes) or sliced from a tensor."""

    def __init__(self, key: str, source: Any, labels: Tensor, cap: int, stats: dict[str, Any] | None = None,
                 workers: int = 0, name: str = "reference"):
        self.key, self.source, self.labels, self.cap, self.stats = key, source, labels, cap, stats
        self.workers, self.name = workers, name
        self._subset: Tensor | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self) -> Tensor:
        """Sorted positions of the seeded, class-balanced subset of at most ``cap``
        images (every position when the split is not larger)."""
        return balanced_subset(self.labels, self.cap)

    def subset_images(self) -> Tensor:
        """uint8 N×C×H×W images of :meth:`subset`, decoded once (on the first call)."""
        if self._subset is None:
            positions = self.subset()
            parts = list(self.batches(256, positions, desc=f"reading the {self.name} ({len(positions)} images)"))
            self._subset = torch.cat(parts)
        return self._subset

    def batches(self, batch_size: int, positions: Tensor | None = None, desc: str = "") -> Iterator[Tensor]:
        """uint8 B×C×H×W batches of the images at ``positions`` (default: all), in order;
        ``desc``: a progress bar on the main process."""
        positions = torch.arange(len(self)) if positions is None else positions
        n_batches = -(-len(positions) // batch_size)
        with tqdm(total=n_batches, desc=desc, leave=False, disable=not desc or not distributed.is_main()) as bar:
            if isinstance(self.source, Tensor):
                for i in range(0, len(positions), batch_size):
                    yield self.source[positions[i:i + batch_size]]
                    bar.update()
                return
            loader = torch.utils.data.DataLoader(torch.utils.data.Subset(self.source, positions.tolist()),
                                                 batch_size=batch_size, shuffle=False, num_workers=self.workers,
                                                 collate_fn=collate)
            for images, _ in loader:
                yield images
                bar.update()

    def read(self, start: int, stop: int) -> Tensor:
        """uint8 images ``start`` to ``stop`` of the split, decoded here."""
        if isinstance(self.source, Tensor):
            return self.source[start:stop]
        return collate(self.source.__getitems__(list(range(start, min(stop, len(self))))))[0]


def split_reference(ws: Any, split: str, stats: Path | None = None) -> ReferenceSet:
    """The ``split`` (``"train"`` / ``"test"``) of the workspace's data as a reference,
    streamed from the dataset (``train.num_workers`` decoding processes); ``stats``: a
    statistics file to read (:func:`read_stats`)."""
    examples = ws.data.examples(split)
    return ReferenceSet(f"{ws.data.key}-{split}", examples, examples.labels, ws.exp.eval.reference_subset,
                        read_stats(stats, ws.exp.source) if stats is not None else None,
                        workers=ws.exp.train.num_workers, name=f"{split} split")


def read_stats(path: Path, source: str = "<python>") -> dict[str, Any]:
    """``mu`` (float64 D), ``sigma`` (D×D), ``features`` (the recorded feature space, or
    None in files that record none, such as ADM's and the Sphere Encoder's Inception
    statistics) and ``path`` of a statistics file; a missing or malformed one is a
    ConfigError naming ``source``'s key."""
    where = f"{source}: eval.reference_stats = {str(path)!r}"
    if not path.is_file():
        raise ConfigError(f"{where}: no such file (a relative path is read from the experiment file's folder); "
                          f"write one with `spheregen reference-stats {source} --out FILE.npz`, or give an ADM / "
                          "Sphere Encoder fid_stats_*.npz")
    try:
        with np.load(path) as z:
            mu, sigma = np.asarray(z["mu"], np.float64), np.asarray(z["sigma"], np.float64)
            features = str(z["features"]) if "features" in z.files else None
    except Exception as exc:
        raise ConfigError(f"{where}: not an .npz with arrays 'mu' and 'sigma' ({type(exc).__name__}: {exc})") from exc
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)) or not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ConfigError(f"{where}: 'mu' must be a finite vector of D numbers and 'sigma' a D×D matrix, got "
                          f"shapes {mu.shape} and {sigma.shape}")
    return {"mu": mu, "sigma": sigma, "features": features, "path": str(path)}


def write_stats(path: Path, stats: dict[str, Any], features: str, provenance: dict[str, Any]) -> Path:
    """``stats`` (``mu``, ``sigma``) as an .npz in the ADM / Sphere Encoder layout, with
    ``features`` (the feature space they are in) and ``provenance`` (JSON) beside them."""
    path = path if path.suffix == ".npz" else path.with_suffix(".npz")

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append '.npz' to a name
            np.savez(f, mu=np.asarray(stats["mu"], np.float64), sigma=np.asarray(stats["sigma"], np.float64),
                     features=np.array(features), provenance=np.array(json.dumps(provenance, sort_keys=True)))

    atomic_write(path, write)
    return path
