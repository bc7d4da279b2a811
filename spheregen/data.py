"""Data: raw examples from a DataSource -> uint8 tensors shaped for the models.

Preprocessing is the core's job so every method sees identical pixels:
``prepare_image`` fixes channels (explicitly: grayscale replicated or RGB to luminance,
alpha dropped) and size (``resize-crop`` or ``pad``); ``load_split`` materialises a split
as uint8 N×C×H×W plus int64 labels, cached on disk by the data config's hash so a
second stage (evaluation, report) reads the same array instead of re-decoding.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from spheregen.config import config_hash
from spheregen.errors import DataError
from spheregen.experiment import DataConfig
from spheregen.interfaces import DataSource, DataSpec


def to_pil(image: Any) -> Image.Image:
    """A PIL image from a PIL image or a uint8 numpy array (H×W, H×W×1, H×W×3, H×W×4)."""
    if isinstance(image, Image.Image):
        return image
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise DataError(f"images must be uint8 arrays or PIL images, got an array of dtype {arr.dtype}")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4)):
        return Image.fromarray(arr)
    raise DataError(f"image array of shape {arr.shape} is neither H×W, H×W×3 nor H×W×4")


def _fix_channels(img: Image.Image, channels: int) -> Image.Image:
    # Alpha is dropped (composited on black) rather than kept as a 4th channel: every
    # model here is 1- or 3-channel, and black matches the zero-padding of 'pad'.
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        base = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        img = Image.alpha_composite(base, rgba)
    return img.convert("RGB" if channels == 3 else "L")


def _fit(img: Image.Image, size: int, fit: str) -> Image.Image:
    w, h = img.size
    if fit == "pad":
        if w > size or h > size:
            raise DataError(
                f"an image of {w}×{h} is larger than image_size {size}; fit = 'pad' only pads. "
                "Set data.fit = \"resize-crop\" or a larger data.image_size"
            )
        canvas = Image.new(img.mode, (size, size))
        canvas.paste(img, ((size - w) // 2, (size - h) // 2))
        return canvas
    # The official Sphere Encoder resizes with bicubic, or nearest at <= 64 px.
    resample = Image.NEAREST if size <= 64 else Image.BICUBIC
    scale = size / min(w, h)
    if scale != 1.0:
        img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), resample)
        w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


def prepare_image(image: Any, size: int, channels: int, fit: str) -> Tensor:
    """Any image -> uint8 C×size×size."""
    img = _fit(_fix_channels(to_pil(image), channels), size, fit)
    arr = np.array(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[None]
    else:
        arr = arr.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(arr))


def to_float(images: Tensor) -> Tensor:
    """uint8 B×C×H×W -> float in [-1, 1]."""
    return images.float().div(127.5).sub(1.0)


def to_uint8(images: Tensor) -> Tensor:
    """float B×C×H×W in [-1, 1] -> uint8 by floor(clamp(x/2+.5)·255) as the official
    eval, plus a 1e-3 guard so an exact k/255 that float error puts a hair below k maps
    back to k (real images survive the round trip unchanged)."""
    x = images.detach().float().mul(0.5).add(0.5).clamp(0.0, 1.0)
    return x.mul(255.0).add(1e-3).floor().clamp(max=255).to(torch.uint8).cpu()


class Split:
    """A preprocessed split held in memory: uint8 images N×C×H×W and int64 labels N."""

    def __init__(self, images: Tensor, labels: Tensor):
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return len(self.images)


def _materialise(rows: Any, cfg: DataConfig, desc: str) -> Split:
    n = len(rows)
    if cfg.max_examples is not None:
        n = min(n, cfg.max_examples)
    if n == 0:
        raise DataError(f"{desc} is empty: the dataset split has no examples")
    images = torch.empty((n, cfg.channels, cfg.image_size, cfg.image_size), dtype=torch.uint8)
    labels = torch.empty(n, dtype=torch.int64)
    for i in tqdm(range(n), desc=f"preparing {desc}", disable=n < 2000, leave=False):
        image, label = rows[i]
        images[i] = prepare_image(image, cfg.image_size, cfg.channels, cfg.fit)
        labels[i] = int(label)
    return Split(images, labels)


class Data:
    """The experiment's data: train and test splits and the model-facing DataSpec.

    Without a ``test_split`` a seeded ``test_fraction`` of train is held out (seed 0,
    independent of the experiment seed, so every experiment on the same data scores
    against the same held-out images)."""

    def __init__(self, cfg: DataConfig, source: DataSource, cache_dir: str | Path | None = None):
        self.cfg = cfg
        self.source = source
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self._splits: dict[str, Split] | None = None

    @property
    def key(self) -> str:
        # num_classes is a declaration checked against the source, not a preprocessing
        # option: declaring it must not invalidate caches keyed by the data
        return f"{self.source.key}-{config_hash(self.cfg)}"

    @property
    def spec(self) -> DataSpec:
        declared, found = self.cfg.num_classes, self.source.num_classes
        if declared is not None and declared != found:
            raise DataError(f"data.num_classes = {declared}, but {self.source.key} has {found} classes; "
                            f"set data.num_classes = {found} or remove the key")
        return DataSpec(image_size=self.cfg.image_size, channels=self.cfg.channels, num_classes=found)

    def splits(self) -> dict[str, Split]:
        if self._splits is None:
            self._splits = self._load_cached() or self._load()
        return self._splits

    @property
    def train(self) -> Split:
        return self.splits()["train"]

    @property
    def test(self) -> Split:
        return self.splits()["test"]

    def _cache_file(self) -> Path | None:
        return self.cache_dir / f"data-{self.key}.pt" if self.cache_dir else None

    def _load_cached(self) -> dict[str, Split] | None:
        path = self._cache_file()
        if path is None or not path.is_file():
            return None
        blob = torch.load(path, map_location="cpu", weights_only=True)
        return {k: Split(blob[f"{k}_images"], blob[f"{k}_labels"]) for k in ("train", "test")}

    def _load(self) -> dict[str, Split]:
        available = self.source.splits()
        for name in (self.cfg.train_split, self.cfg.test_split):
            if name is not None and name not in available:
                raise DataError(
                    f"dataset {self.source.key} has no split {name!r}; available splits: {list(available)}. "
                    "Set data.train_split / data.test_split"
                )
        train = _materialise(self.source.split(self.cfg.train_split), self.cfg, f"{self.source.key}:{self.cfg.train_split}")
        if self.cfg.test_split is not None:
            test = _materialise(self.source.split(self.cfg.test_split), self.cfg, f"{self.source.key}:{self.cfg.test_split}")
        else:
            train, test = self._hold_out(train)
        self._check_labels(train, test)
        splits = {"train": train, "test": test}
        self._save(splits)
        return splits

    def _hold_out(self, split: Split) -> tuple[Split, Split]:
        n_test = int(round(len(split) * self.cfg.test_fraction))
        if n_test == 0 or n_test >= len(split):
            raise DataError(
                f"dataset {self.source.key}: holding out data.test_fraction = {self.cfg.test_fraction} of "
                f"{len(split)} examples leaves an empty split; set data.test_split or change test_fraction"
            )
        perm = torch.randperm(len(split), generator=torch.Generator().manual_seed(0))
        te, tr = perm[:n_test].sort().values, perm[n_test:].sort().values
        return Split(split.images[tr], split.labels[tr]), Split(split.images[te], split.labels[te])

    def _check_labels(self, *splits: Split) -> None:
        k = self.source.num_classes
        for s in splits:
            lo, hi = int(s.labels.min()), int(s.labels.max())
            if k > 0 and (lo < 0 or hi >= k):
                raise DataError(
                    f"dataset {self.source.key}: labels span [{lo}, {hi}] but the source declares {k} classes; "
                    "labels must be in [0, num_classes)"
                )

    def _save(self, splits: dict[str, Split]) -> None:
        path = self._cache_file()
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        blob = {f"{k}_{f}": getattr(s, f) for k, s in splits.items() for f in ("images", "labels")}
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(blob, tmp)
        os.replace(tmp, path)


def balanced_labels(n: int, num_classes: int) -> Tensor:
    """Class-balanced labels ``i % num_classes`` (all zeros when unconditional)."""
    if num_classes <= 0:
        return torch.zeros(n, dtype=torch.int64)
    return torch.arange(n, dtype=torch.int64) % num_classes
