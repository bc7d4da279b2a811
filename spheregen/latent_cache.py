"""A frozen tokenizer's latents of the training split, encoded once.

Methods on a frozen, lossy tokenizer (those with ``latent_loss``) train on latents; with
the tokenizer frozen, encoding every batch again each step is wasted work. Two caches:

* :class:`MemoryLatents`: the whole split on the training device (small sets);
* :class:`DiskLatents`: ``.npy`` files under ``runs/.cache/latents/<identity>/``, memory-
  mapped, so a set larger than any device (ImageNet's 768×16×16 DINOv2 latents are
  ~1 TB, 2 TB with flips) is read batch by batch. Extraction is sharded over the
  accelerate processes at batch boundaries, resumable (each process records the
  batches it has flushed), and reused by every run and method whose tokenizer, data and
  flip setting give the same identity.

Both hold orientation 0 (as stored) and, with ``data.flip``, 1 (mirrored), and both
return for micro-batch k exactly the encoding of the images the uncached path draws.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from spheregen import distributed
from spheregen.data import Examples, collate, to_float
from spheregen.interfaces import LatentMethod, LosslessTokenizer, has
from spheregen.paths import DirLock, atomic_write_text, ensure_free_space

BATCH = 256  # encoding batch: both caches encode the same batches, so they hold the same floats


def flip_mask(n: int, seed: int, k: int) -> torch.Tensor:
    """Which of micro-batch k's n images are mirrored (a pure function of seed and k)."""
    g = torch.Generator().manual_seed(seed * 7919 + k)
    return torch.rand(n, generator=g) < 0.5


def plan(method: Any, cfg: Any, n: int, flip: bool) -> tuple[str, str]:
    """("memory" | "disk" | "off", why) for a method and train config on n examples.
    ``cache_latents = "auto"`` keeps the latents on the device up to
    ``cache_latents_max_gb`` and on disk beyond."""
    if cfg.cache_latents == "off":
        return "off", "train.cache_latents = off"
    if not has(method, LatentMethod) or getattr(method.tokenizer, "trainable", True):
        return "off", "the method has no frozen tokenizer with latent_loss (spheregen.interfaces.LatentMethod)"
    tokenizer = method.tokenizer
    if has(tokenizer, LosslessTokenizer):
        return "off", ("the tokenizer is lossless (LosslessTokenizer): its latents are computed as each batch "
                       "is drawn")
    size = math.prod(tokenizer.latent_shape) * 4 * n * (2 if flip else 1) / 2**30
    if cfg.cache_latents == "disk" or (cfg.cache_latents == "auto" and size > cfg.cache_latents_max_gb):
        return "disk", f"{size:.2f} GB on disk (> train.cache_latents_max_gb = {cfg.cache_latents_max_gb})" \
            if cfg.cache_latents == "auto" else f"{size:.2f} GB on disk"
    return "memory", f"{size * 1024:.1f} MB on the device"


def _loader(examples: Examples, workers: int, batches: list[int] | None = None) -> DataLoader:
    """Batches of :data:`BATCH` examples in order (only ``batches``, when given)."""
    rng = torch.Generator()  # the loader's own: it leaves the global RNG as it was
    if batches is None:
        return DataLoader(examples, batch_size=BATCH, num_workers=workers, collate_fn=collate, generator=rng)
    sampler = [list(range(b * BATCH, min(len(examples), (b + 1) * BATCH))) for b in batches]
    return DataLoader(examples, batch_sampler=sampler, num_workers=workers, collate_fn=collate, generator=rng)


@torch.no_grad()
def _encode(method: Any, images: torch.Tensor, flip: bool, device: torch.device) -> list[torch.Tensor]:
    x = to_float(images.to(device, non_blocking=True))
    return [method.encode(x)] + ([method.encode(x.flip(-1))] if flip else [])


class MemoryLatents:
    """``latents[o]``: N×latent_shape on the training device for orientation o."""

    def __init__(self, latents: list[torch.Tensor]):
        self.latents = latents

    @classmethod
    def encode(cls, method: Any, examples: Examples, flip: bool, device: torch.device, progress: bool = True,
               workers: int = 0) -> "MemoryLatents":
        parts: list[list[torch.Tensor]] = [[] for _ in range(2 if flip else 1)]
        for images, _ in tqdm(_loader(examples, workers), desc="encode latents", leave=False, disable=not progress):
            for o, z in enumerate(_encode(method, images, flip, device)):
                parts[o].append(z)
        return cls([torch.cat(p) for p in parts])

    def batch(self, idx: torch.Tensor, flip: bool, seed: int, k: int, device: torch.device) -> torch.Tensor:
        """The latents of micro-batch k, mirrored where the uncached path would mirror
        (already on the training ``device``)."""
        z = self.latents[0][idx.to(self.latents[0].device)]
        if flip:
            mask = flip_mask(len(idx), seed, k).to(z.device)
            z[mask] = self.latents[1][idx.to(z.device)[mask]]
        return z


def identity(method: Any, tokenizer_config: Any, data_key: str, flip: bool) -> str:
    """The latents' identity: the tokenizer's config and weights (sha256 of its state
    dict), the data and the flip setting."""
    from spheregen.config import config_hash

    h = hashlib.sha256()
    for name, t in sorted(method.tokenizer.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return config_hash({"tokenizer": tokenizer_config, "class": type(method.tokenizer).__qualname__,
                        "weights": h.hexdigest(), "shape": list(method.tokenizer.latent_shape),
                        "data": data_key, "flip": flip})


class DiskLatents:
    """Memory-mapped ``latents-<o>.npy`` (float32 N×latent_shape) in ``folder``;
    ``meta.json`` appears when every process has flushed every batch."""

    def __init__(self, folder: Path, orientations: int):
        self.folder = folder
        self.arrays = [np.load(folder / f"latents-{o}.npy", mmap_mode="r") for o in range(orientations)]

    def __getstate__(self) -> dict[str, Any]:
        # a loader worker started by spawn maps the files again: pickling a memmap
        # would copy the whole array into the message
        return {"folder": self.folder, "orientations": len(self.arrays)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["folder"], state["orientations"])

    @classmethod
    def open(cls, method: Any, examples: Examples, flip: bool, device: torch.device, folder: Path,
             progress: bool = True, workers: int = 0) -> "DiskLatents":
        """Extract (or finish extracting) into ``folder``, then map it."""
        orientations = 2 if flip else 1
        if not (folder / "meta.json").is_file():
            cls._extract(method, examples, flip, device, folder, progress, workers)
        distributed.barrier()
        return cls(folder, orientations)

    @classmethod
    def _extract(cls, method: Any, examples: Examples, flip: bool, device: torch.device, folder: Path,
                 progress: bool, workers: int) -> None:
        st = distributed.state()
        shape = (len(examples), *method.tokenizer.latent_shape)
        orientations = 2 if flip else 1
        lock = None
        if st.is_main_process:
            lock = DirLock(folder, "latent cache").acquire()  # one extraction of these latents at a time
            cls._allocate(folder, shape, orientations)
        distributed.barrier()
        try:
            cls._extract_shard(method, examples, flip, device, folder, progress, workers, orientations)
            distributed.barrier()
            if st.is_main_process:
                atomic_write_text(folder / "meta.json", json.dumps({"shape": list(shape), "orientations": orientations,
                                                                    "batch": BATCH}) + "\n")
        finally:
            if lock is not None:
                lock.release()

    @staticmethod
    def _allocate(folder: Path, shape: tuple[int, ...], orientations: int) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        for o in range(orientations):
            path = folder / f"latents-{o}.npy"
            if path.is_file() and np.load(path, mmap_mode="r").shape == shape:
                continue  # a previous, interrupted extraction: resume into it
            ensure_free_space(folder, 4 * math.prod(shape), f"the latent cache {path.name}")
            np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape).flush()
            for p in folder.glob("progress-*.json"):  # nothing of the old progress holds for a new file
                p.unlink()

    @staticmethod
    def _extract_shard(method: Any, examples: Examples, flip: bool, device: torch.device, folder: Path,
                       progress: bool, workers: int, orientations: int) -> None:
        """This process's batches (b ≡ rank mod processes), skipping those recorded done;
        the record is updated only after the arrays are flushed."""
        st = distributed.state()
        record = folder / f"progress-{st.process_index}-of-{st.num_processes}.json"
        done = set(json.loads(record.read_text())["done"]) if record.is_file() else set()
        n_batches = -(-len(examples) // BATCH)
        todo = [b for b in range(st.process_index, n_batches, st.num_processes) if b not in done]
        if not todo:
            return
        arrays = [np.load(folder / f"latents-{o}.npy", mmap_mode="r+") for o in range(orientations)]
        bar = tqdm(total=len(todo), desc="extract latents to disk", leave=False, disable=not progress)
        for b, (images, _) in zip(todo, _loader(examples, workers, todo)):
            for o, z in enumerate(_encode(method, images, flip, device)):
                arrays[o][b * BATCH:b * BATCH + len(z)] = z.float().cpu().numpy()
            for a in arrays:
                a.flush()
            done.add(b)
            atomic_write_text(record, json.dumps({"done": sorted(done)}))
            bar.update()
        bar.close()

    def batch(self, idx: torch.Tensor, flip: bool, seed: int, k: int, device: torch.device) -> torch.Tensor:
        """The latents of micro-batch k, read from the maps, mirrored where the uncached
        path would mirror, on ``device``."""
        rows = idx.numpy()
        z = torch.from_numpy(np.ascontiguousarray(self.arrays[0][rows]))
        if flip:
            mask = flip_mask(len(idx), seed, k)
            if mask.any():
                z[mask] = torch.from_numpy(np.ascontiguousarray(self.arrays[1][rows[mask.numpy()]]))
        return z.to(device, non_blocking=True)
