"""Sample files: drawing a method's samples in seeded batches over the processes, and
the ``.npz`` files that carry them with their identity.

``runs/<exp>/samples/<method>/steps-<T>.npz`` holds ``images`` (uint8 N×C×H×W),
``labels`` (int64 N) and ``meta``: a JSON :func:`sample_identity` (the training run's
hash, sampler, steps, guidance, seed, ...). Every reader that knows what it expects
checks it, so a number is never computed from samples of another config.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from spheregen import distributed
from spheregen.data import to_uint8
from spheregen.errors import SpheregenError, StaleError
from spheregen.paths import atomic_write, ensure_free_space


def batch_seed(seed: int, index: int) -> int:
    """The seed of sample batch ``index``: batches draw independent streams, so any
    process can draw any batch and the result does not depend on the process count."""
    return seed * 1_000_003 + index


def generate(sampler: Any, method: Any, labels: torch.Tensor, steps: int, guidance: float, seed: int,
             batch: int, device: torch.device, desc: str = "") -> torch.Tensor | None:
    """uint8 N×C×H×W samples for ``labels`` (N) on the CPU, in batches of ``batch``
    seeded by :func:`batch_seed`, spread over the accelerate processes and gathered on
    the main process (the others return None)."""
    n_batches = -(-len(labels) // batch)
    bar = tqdm(total=n_batches, desc=desc, leave=False, disable=not desc or not distributed.is_main())

    def one(i: int) -> torch.Tensor:
        gen = torch.Generator(device=device).manual_seed(batch_seed(seed, i))
        y = labels[i * batch:(i + 1) * batch].to(device)
        with torch.no_grad():
            out = to_uint8(sampler.sample(method, y, steps, guidance, gen)).cpu()
        bar.update()
        return out

    try:
        parts = distributed.map_batches(n_batches, one)
        return torch.cat(parts) if parts is not None else None
    finally:
        bar.close()


def save_samples(path: Path, images: torch.Tensor, labels: torch.Tensor, meta: dict[str, Any]) -> None:
    """uint8 N×C×H×W ``images``, int64 N ``labels`` and ``meta`` (the sample set's
    identity, :func:`sample_identity`, stored as JSON) in one .npz, written atomically
    after checking the free space."""
    ensure_free_space(path.parent, images.numel() + labels.numel() * 8, f"the sample file {path.name}")

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append '.npz' to a name
            np.savez_compressed(f, images=images.numpy(), labels=labels.numpy(),
                                meta=np.array(json.dumps(meta, sort_keys=True)))

    atomic_write(path, write)


def sample_identity(train_hash: str, sampler: str, sampler_config: str | None, steps: int, guidance: float,
                    ev: Any) -> dict[str, Any]:
    """Everything a sample set depends on: the trained weights (run identity), the
    sampler and its options, steps, guidance and the eval settings that change which
    images are drawn (seed, count, batch split, EMA)."""
    return {"train_hash": train_hash, "sampler": sampler, "sampler_config": sampler_config, "steps": steps,
            "guidance": guidance, "seed": ev.seed, "num_samples": ev.num_samples, "batch_size": ev.batch_size,
            "use_ema": ev.use_ema}


def load_samples(path: Path, expected: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 N×C×H×W images and int64 N labels of a sample file. With ``expected`` (a
    :func:`sample_identity`), a file drawn under another identity is refused with what
    differs and the command that re-draws it."""
    images, labels, meta = _read_npz(path)
    if expected is not None:
        differs = {k: (meta.get(k), v) for k, v in expected.items() if meta.get(k) != v}
        if differs:
            what = "; ".join(f"{k}: file {a!r}, config {b!r}" for k, (a, b) in differs.items())
            raise StaleError(f"{path} was sampled under another config ({what}): re-run `spheregen sample` "
                             "for this method (or `spheregen run`, which re-samples)")
    return images, labels


def read_meta(path: Path) -> dict[str, Any]:
    """The identity stored in a sample file ({} when it has none)."""
    return _read_npz(path)[2]


def _read_npz(path: Path) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    if not path.is_file():
        raise SpheregenError(f"{path} does not exist: run `spheregen sample` for this experiment first")
    try:
        with np.load(path) as z:
            images, labels = z["images"], z["labels"]
            meta = _parse_meta(z["meta"]) if "meta" in z.files else {}
    except Exception as exc:  # truncated, empty, not a zip, missing arrays: one message
        raise SpheregenError(f"{path} is corrupt or not a spheregen sample file ({type(exc).__name__}: {exc}); "
                             "delete it and re-run `spheregen sample`") from exc
    if images.dtype != np.uint8 or images.ndim != 4 or len(labels) != len(images):
        raise SpheregenError(f"{path} holds {images.dtype} images of shape {images.shape} with {len(labels)} labels, "
                             "not uint8 N×C×H×W with N labels; delete it and re-run `spheregen sample`")
    return torch.from_numpy(images), torch.from_numpy(labels), meta


def _parse_meta(arr: np.ndarray) -> dict[str, Any]:
    try:
        meta = json.loads(str(arr))
    except ValueError:  # written before sample files carried their identity
        return {}
    return meta if isinstance(meta, dict) else {}


def read_external_samples(path: Path, key: str) -> torch.Tensor:
    """uint8 N×C×H×W from array ``key`` of an .npz holding N×H×W×C or N×C×H×W images
    (another implementation's samples, e.g. the official code's reference set)."""
    if not path.is_file():
        raise SpheregenError(f"{path} does not exist")
    try:
        with np.load(path) as z:
            if key not in z.files:
                raise SpheregenError(f"{path} has no array {key!r}; it holds {z.files}")
            arr = z[key]
    except SpheregenError:
        raise
    except Exception as exc:
        raise SpheregenError(f"{path} is corrupt or not an .npz file ({type(exc).__name__}: {exc})") from exc
    if arr.dtype != np.uint8 or arr.ndim != 4:
        raise SpheregenError(f"{path}:{key} must be uint8 N×H×W×C or N×C×H×W, got {arr.dtype} {arr.shape}")
    if arr.shape[-1] in (1, 3) and arr.shape[1] not in (1, 3):
        arr = arr.transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(arr))


EXPORT_FORMATS = ("adm", "png", "npz")


def export_samples(src: Path, out: Path, fmt: str, meta: dict[str, Any] | None = None) -> Path:
    """One sample file in another layout, for other evaluators:

    * ``adm``: ``out.npz`` with ``arr_0`` (uint8 N×H×W×C, as ADM's evaluator and the
      papers' FID scripts read) and ``arr_1`` (int64 labels);
    * ``png``: folder ``out/`` of ``000000.png``... (clean-fid, torch-fidelity's
      ``fidelity --input1 DIR``), with ``labels.txt`` (one class per line, in order);
    * ``npz``: the native file (images N×C×H×W, labels, identity) copied as it is.
    """
    images, labels = load_samples(src, meta)
    if fmt == "adm":
        path = out.with_suffix(".npz")
        hwc = images.permute(0, 2, 3, 1).contiguous().numpy()
        ensure_free_space(path.parent, hwc.nbytes, f"the ADM export {path.name}")

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, arr_0=hwc, arr_1=labels.numpy())

        atomic_write(path, write)
        return path
    if fmt == "png":
        return _export_png(images, labels, out)
    if fmt == "npz":
        path = out.with_suffix(".npz")
        atomic_write(path, lambda tmp: tmp.write_bytes(src.read_bytes()))
        return path
    raise SpheregenError(f"export format {fmt!r} is not one of {list(EXPORT_FORMATS)}")


def _export_png(images: torch.Tensor, labels: torch.Tensor, out: Path) -> Path:
    import shutil

    from PIL import Image

    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for i, img in enumerate(images):
            arr = img.permute(1, 2, 0).numpy()
            Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr).save(tmp / f"{i:06d}.png")
        (tmp / "labels.txt").write_text("".join(f"{int(y)}\n" for y in labels))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise SpheregenError(f"could not write the PNG export {out} ({exc.strerror or exc}); free disk space or "
                             "choose another --out") from exc
    return out
