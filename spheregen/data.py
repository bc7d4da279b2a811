"""Data: raw examples from a DataSource -> uint8 tensors shaped for the models.

Preprocessing is the core's job so every method sees identical pixels:
``prepare_image`` fixes channels (explicitly: grayscale replicated or RGB to luminance,
alpha dropped) and size (``resize-crop`` or ``pad``); ``load_split`` materialises a split
as uint8 N×C×H×W plus int64 labels, cached on disk by the data's identity so a second
stage (evaluation, report) reads the same array instead of re-decoding; training reads
``Examples`` (one example at a time from the source, through a DataLoader) instead, so
its memory does not grow with the dataset.
"""

from __future__ import annotations

import sys
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
from spheregen.paths import atomic_write, ensure_free_space


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


def _adm_center_crop(img: Image.Image, size: int) -> Image.Image:
    """ADM's ``center_crop_arr`` (guided-diffusion, used by DiT, SiT, RAE and both sphere
    papers at 256 px): halve with a box filter while the shorter side is >= 2·size, then
    bicubic-resize the shorter side to ``size`` and crop the centre."""
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = size / min(img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)
    left, top = (img.size[0] - size) // 2, (img.size[1] - size) // 2
    return img.crop((left, top, left + size, top + size))


def _fit(img: Image.Image, size: int, fit: str) -> Image.Image:
    if fit == "adm-center-crop":
        return _adm_center_crop(img, size)
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
    """uint8 B×C×H×W -> float in [-1, 1], the same bits on every device: the divisor is
    a 0-dim tensor on the images' device, because CUDA divides by a Python number as a
    multiplication by its reciprocal (1 ulp off the CPU's quotient for 111 of the 256
    values), and a batch converted on the GPU must equal one converted on the CPU."""
    return images.float().div(torch.full((), 127.5, device=images.device)).sub(1.0)


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


class Examples(torch.utils.data.Dataset):
    """A split read from the dataset's own storage (an Arrow memory-map, files, an
    in-package array), example by example, preprocessed on access: ``self[i]`` is
    (uint8 C×H×W, int label) of row ``indices[i]`` of ``rows``. Memory does not grow with
    the dataset; a ``DataLoader`` runs the decoding in its worker processes. ``labels``
    (int64 N) are read once, from the label column alone where the source can."""

    def __init__(self, rows: Any, indices: Tensor, cfg: DataConfig, labels: Tensor):
        self.rows, self.indices, self.cfg, self.labels = rows, indices, cfg, labels

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        image, label = self.rows[int(self.indices[i])]
        return prepare_image(image, self.cfg.image_size, self.cfg.channels, self.cfg.fit), int(label)

    def __getitems__(self, positions: list[int]) -> list[tuple[Tensor, int]]:
        """A batch at once (the DataLoader's batched fetch): rows offering ``rows(list)``
        read it in one go."""
        if not hasattr(self.rows, "rows"):
            return [self[i] for i in positions]
        raw = self.rows.rows([int(self.indices[i]) for i in positions])
        return [(prepare_image(image, self.cfg.image_size, self.cfg.channels, self.cfg.fit), int(label))
                for image, label in raw]

    def subset(self, keep: Tensor) -> "Examples":
        """The examples at positions ``keep`` of this one."""
        return Examples(self.rows, self.indices[keep], self.cfg, self.labels[keep])

    def materialise(self, desc: str) -> Split:
        """Every example decoded into memory (small sets, metrics' references)."""
        images = torch.empty((len(self), self.cfg.channels, self.cfg.image_size, self.cfg.image_size),
                             dtype=torch.uint8)
        for i in tqdm(range(len(self)), desc=f"preparing {desc}", disable=len(self) < 2000, leave=False):
            images[i] = self[i][0]
        return Split(images, self.labels.clone())


def collate(batch: list[tuple[Tensor, int]]) -> tuple[Tensor, Tensor]:
    """[(uint8 C×H×W, label)] -> (uint8 B×C×H×W, int64 B)."""
    return torch.stack([b[0] for b in batch]), torch.tensor([b[1] for b in batch], dtype=torch.int64)


def row_labels(rows: Any) -> Tensor:
    """int64 labels of every row: from the label column alone when the rows offer
    ``labels()``, else row by row (decoding each image once)."""
    if hasattr(rows, "labels"):
        return torch.as_tensor(np.asarray(rows.labels()), dtype=torch.int64)
    return torch.tensor([int(rows[i][1]) for i in range(len(rows))], dtype=torch.int64)


def balanced_subset(labels: Tensor, n: int, seed: int = 0) -> Tensor:
    """Sorted positions of a seeded, class-balanced subset of ``n`` of ``labels``: classes
    take turns, each in a seeded random order, until ``n`` are chosen (a class that runs
    out leaves its turns to the others)."""
    if n >= len(labels):
        return torch.arange(len(labels))
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(labels), generator=g)
    by_class = [perm[labels[perm] == c] for c in labels.unique().tolist()]
    rank = torch.cat([torch.arange(len(idx)) for idx in by_class])  # turn at which each is taken
    order = torch.cat(by_class)
    chosen = order[torch.sort(rank, stable=True).indices[:n]]
    return chosen.sort().values


class Data:
    """The experiment's data: train and test splits and the model-facing DataSpec.

    :meth:`examples` streams a split from the source (training reads it through a
    ``DataLoader``); :attr:`train` / :attr:`test` hold a split in memory, for what needs
    the whole set at once (metrics' references, tokenizers fitted at build time), cached
    on disk by :attr:`key`. Both give the same pixels.

    Without a ``test_split`` a seeded ``test_fraction`` of train is held out (seed 0,
    independent of the experiment seed, so every experiment on the same data scores
    against the same held-out images). ``max_examples`` keeps a seeded, class-balanced
    subset of each split read."""

    def __init__(self, cfg: DataConfig, source: DataSource, cache_dir: str | Path | None = None):
        self.cfg = cfg
        self.source = source
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self._splits: dict[str, Split] | None = None
        self._examples: dict[str, Examples] | None = None

    @property
    def key(self) -> str:
        """The preprocessed data's identity: the source's name, the preprocessing config
        and, for sources that have one, the content ``fingerprint`` (local files' paths,
        sizes and mtimes; a hub dataset's fingerprint), so replacing images in place or
        two projects' same-named folders never share a cache."""
        # num_classes is a declaration checked against the source, not a preprocessing
        # option: declaring it must not invalidate caches keyed by the data
        fingerprint = getattr(self.source, "fingerprint", None)
        identity = self.cfg if fingerprint is None else {"config": self.cfg, "fingerprint": fingerprint}
        return f"{self.source.key}-{config_hash(identity)}"

    @property
    def spec(self) -> DataSpec:
        declared, found = self.cfg.num_classes, self.source.num_classes
        if declared is not None and declared != found:
            raise DataError(f"data.num_classes = {declared}, but {self.source.key} has {found} classes; "
                            f"set data.num_classes = {found} or remove the key")
        return DataSpec(image_size=self.cfg.image_size, channels=self.cfg.channels, num_classes=found)

    def examples(self, split: str) -> Examples:
        """``"train"`` or ``"test"``, streamed from the source (no image decoded yet)."""
        if self._examples is None:
            self._examples = self._open()
        return self._examples[split]

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
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            return {k: Split(blob[f"{k}_images"], blob[f"{k}_labels"]) for k in ("train", "test")}
        except Exception as exc:  # truncated, corrupt, or another format: rebuilt from the source
            print(f"spheregen: warning: the data cache {path} is unreadable ({type(exc).__name__}: {exc}); "
                  "rebuilding it from the dataset", file=sys.stderr)
            return None

    def _load(self) -> dict[str, Split]:
        splits = {k: self.examples(k).materialise(f"{self.source.key}:{k}") for k in ("train", "test")}
        self._save(splits)
        return splits

    def _open(self) -> dict[str, Examples]:
        available = self.source.splits()
        for name in (self.cfg.train_split, self.cfg.test_split):
            if name is not None and name not in available:
                raise DataError(
                    f"dataset {self.source.key} has no split {name!r}; available splits: {list(available)}. "
                    "Set data.train_split / data.test_split"
                )
        train = self._split(self.cfg.train_split)
        if self.cfg.test_split is not None:
            test = self._split(self.cfg.test_split)
        else:
            train, test = self._hold_out(train)
        self._check_labels(train, test)
        return {"train": train, "test": test}

    def _split(self, name: str) -> Examples:
        rows = self.source.split(name)
        if len(rows) == 0:
            raise DataError(f"{self.source.key}:{name} is empty: the dataset split has no examples")
        labels = row_labels(rows)
        examples = Examples(rows, torch.arange(len(rows)), self.cfg, labels)
        if self.cfg.max_examples is not None and self.cfg.max_examples < len(rows):
            examples = examples.subset(balanced_subset(labels, self.cfg.max_examples))
        return examples

    def _hold_out(self, split: Examples) -> tuple[Examples, Examples]:
        n_test = int(round(len(split) * self.cfg.test_fraction))
        if n_test == 0 or n_test >= len(split):
            raise DataError(
                f"dataset {self.source.key}: holding out data.test_fraction = {self.cfg.test_fraction} of "
                f"{len(split)} examples leaves an empty split; set data.test_split or change test_fraction"
            )
        perm = torch.randperm(len(split), generator=torch.Generator().manual_seed(0))
        te, tr = perm[:n_test].sort().values, perm[n_test:].sort().values
        return split.subset(tr), split.subset(te)

    def _check_labels(self, *splits: Examples) -> None:
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
        blob = {f"{k}_{f}": getattr(s, f) for k, s in splits.items() for f in ("images", "labels")}
        ensure_free_space(path.parent, sum(t.numel() * t.element_size() for t in blob.values()),
                          f"the data cache {path.name}")
        atomic_write(path, lambda p: torch.save(blob, p))


def balanced_labels(n: int, num_classes: int) -> Tensor:
    """Class-balanced labels ``i % num_classes`` (all zeros when unconditional)."""
    if num_classes <= 0:
        return torch.zeros(n, dtype=torch.int64)
    return torch.arange(n, dtype=torch.int64) % num_classes
