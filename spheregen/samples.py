"""Sample files: drawing a method's samples in seeded batches over the processes, and
the uncompressed ``.npz`` files that carry them with their identity.

``runs/<exp>/samples/<method>/steps-<T>.npz`` is one sample set, in one of two layouts:

* self-contained (one process drew it; also ``spheregen export --format npz``):
  ``images`` (uint8 N×C×H×W), ``labels`` (int64 N) and ``meta``, a JSON
  :func:`sample_identity` (the training run's hash, sampler, steps, guidance, seed, ...);
* an index (several processes drew it): ``labels`` (all N), ``meta`` and ``shards``, a
  JSON list of ``[file, count]``; each process wrote its own contiguous block of batches
  to ``steps-<T>.shards/part-<r>-of-<P>.npz`` (self-contained, same ``meta``) and the
  sample set is those shards in order. No image passes through another process.

Files are written uncompressed, image batch by image batch (memory does not grow with
the number of samples), and read memory-mapped (:class:`SampleSet`), so a reader takes
only the rows it needs: each process its share of the feature batches, a report its grid
rows. Every reader that knows what it expects checks the identity, so a number is never
computed from samples of another config; a shard whose identity or labels differ from
its index is refused.
"""

from __future__ import annotations

import json
import shutil
import struct
import zipfile
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from spheregen.data import to_uint8
from spheregen.errors import SpheregenError, StaleError
from spheregen.paths import atomic_write, ensure_free_space
from spheregen.precision import sampling

SHARDS_SUFFIX = ".shards"


def batch_seed(seed: int, index: int) -> int:
    """The seed of sample batch ``index``: batches draw independent streams, so any
    process can draw any batch and the result does not depend on the process count."""
    return seed * 1_000_003 + index


def shard_dir(path: Path) -> Path:
    """The folder of the shards of the sample set indexed by ``path``."""
    return path.with_name(path.stem + SHARDS_SUFFIX)


def generate(sampler: Any, method: Any, labels: torch.Tensor, steps: int, guidance: float, seed: int,
             batch: int, device: torch.device, path: Path, meta: dict[str, Any], desc: str = "") -> Path:
    """Draw samples for ``labels`` (N) in batches of ``batch`` seeded by
    :func:`batch_seed` and write them as the sample set ``path`` (every process calls
    it). Each process draws its contiguous block of batches (:func:`distributed.block`)
    and streams them into its own file; with one process that file is ``path`` itself,
    with several it is a shard and the main process then writes the index. Shards of an
    earlier draw with another process count are removed once the index is in place."""
    n_batches = -(-len(labels) // batch)
    from spheregen import distributed  # here, not at the top: reading samples (the report) needs no accelerate

    mine = distributed.block(n_batches)
    start, stop = mine.start * batch, min(mine.stop * batch, len(labels))
    st = distributed.state()
    bar = tqdm(total=len(mine), desc=desc, leave=False, disable=not desc or not distributed.is_main())

    def batches() -> Iterator[torch.Tensor]:
        for i in mine:
            gen = torch.Generator(device=device).manual_seed(batch_seed(seed, i))
            y = labels[i * batch:(i + 1) * batch].to(device)
            with torch.no_grad(), sampling(device, meta.get("mixed_precision", "no")):  # as the identity records
                yield to_uint8(sampler.sample(method, y, steps, guidance, gen)).cpu()
            bar.update()

    try:
        if st.num_processes == 1:
            write_sample_file(path, batches(), labels, meta)
            _remove_shards(path, keep=())
            return path
        part = shard_dir(path) / f"part-{st.process_index:05d}-of-{st.num_processes:05d}.npz"
        if stop > start:
            write_sample_file(part, batches(), labels[start:stop], meta)
        parts = distributed.gather((part.name, stop - start))
    finally:
        bar.close()
    if parts is not None:
        shards = [[f"{shard_dir(path).name}/{name}", count] for name, count in parts if count > 0]
        atomic_write(path, lambda tmp: _write_npz(tmp, {"labels": labels.numpy(), "meta": _meta_array(meta),
                                                        "shards": np.array(json.dumps(shards))}))
        _remove_shards(path, keep={Path(name).name for name, _ in shards})
    distributed.barrier()
    return path


def save_samples(path: Path, images: torch.Tensor, labels: torch.Tensor, meta: dict[str, Any]) -> None:
    """uint8 N×C×H×W ``images``, int64 N ``labels`` and ``meta`` (the sample set's
    identity, :func:`sample_identity`) as one self-contained sample file."""
    write_sample_file(path, [images], labels, meta)


def write_sample_file(path: Path, batches: Iterable[torch.Tensor], labels: torch.Tensor,
                      meta: dict[str, Any]) -> None:
    """A self-contained, uncompressed sample file (``images``, ``labels``, ``meta``),
    written atomically from uint8 image ``batches`` (B×C×H×W, len(labels) rows in all)
    as they come: only one batch is in memory. The free space is checked at the first."""

    def chunks() -> Iterator[np.ndarray]:
        for images in batches:
            if images.dtype != torch.uint8 or images.dim() != 4:
                raise SpheregenError(f"samples must be uint8 B×C×H×W, got {images.dtype} {tuple(images.shape)}")
            yield images.contiguous().numpy()

    def write(tmp: Path) -> None:
        _write_npz(tmp, {"images": _Streamed(len(labels), np.uint8, chunks(), f"the sample file {path.name}"),
                         "labels": labels.numpy(), "meta": _meta_array(meta)})

    atomic_write(path, write)


def _remove_shards(path: Path, keep: Any) -> None:
    """Delete the shard files of ``path``'s set not named in ``keep`` (and the folder
    when none is left): shards of an earlier draw with another process count."""
    folder = shard_dir(path)
    if not folder.is_dir():
        return
    for old in folder.glob("part-*-of-*.npz"):
        if old.name not in keep:
            old.unlink()
    if not keep and not any(folder.iterdir()):
        shutil.rmtree(folder)


def sample_identity(train_hash: str, sampler: str, sampler_config: str | None, steps: int, guidance: float,
                    ev: Any, seed: int | None = None, num_samples: int | None = None) -> dict[str, Any]:
    """Everything a sample set depends on: the trained weights (run identity), the
    sampler and its options, steps, guidance and the eval settings that change which
    images are drawn (``seed`` and ``num_samples``, default ``ev``'s; batch split, EMA)."""
    return {"train_hash": train_hash, "sampler": sampler, "sampler_config": sampler_config, "steps": steps,
            "guidance": guidance, "seed": ev.seed if seed is None else seed,
            "num_samples": ev.num_samples if num_samples is None else num_samples, "batch_size": ev.batch_size,
            "use_ema": ev.use_ema, **_precision(ev)}


def _precision(ev: Any) -> dict[str, Any]:
    """``eval.mixed_precision`` when it is set: :func:`generate` samples under the autocast
    the identity records. Absent at "no", so sets drawn before the option stay current."""
    return {"mixed_precision": ev.mixed_precision} if ev.mixed_precision != "no" else {}


# identity keys written only when set (added after sample files existed): a file that
# has one differs from an identity without it
SET_ONLY_KEYS = ("mixed_precision",)


def identity_differences(meta: dict[str, Any], expected: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{key: (the file's value, the expected one)} where a sample set's identity ``meta``
    differs from ``expected`` (a :func:`sample_identity`): on every key of ``expected``,
    and on the :data:`SET_ONLY_KEYS` that either has."""
    keys = [*expected, *(k for k in SET_ONLY_KEYS if k not in expected)]
    return {k: (meta.get(k), expected.get(k)) for k in keys if meta.get(k) != expected.get(k)}


# ---------------------------------------------------------------- reading


class SampleSet:
    """A sample file opened for reading: ``labels`` (int64 N) and ``meta`` in memory, the
    images memory-mapped from the file or its shards and read by row range
    (:meth:`read`), by position (:meth:`take`) or whole (:meth:`images`). Build it with
    :func:`open_samples`, which checks every shard against the index."""

    def __init__(self, path: Path, meta: dict[str, Any], labels: torch.Tensor, parts: list[tuple[Path, int]],
                 shape: tuple[int, ...]):
        self.path, self.meta, self.labels, self.parts, self.shape = path, meta, labels, parts, shape
        self.offsets = np.cumsum([0] + [n for _, n in parts]).tolist()
        self._arrays: dict[Path, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, start: int, stop: int) -> torch.Tensor:
        """uint8 images ``start`` to ``stop`` (a copy, N×C×H×W)."""
        stop = min(stop, len(self))
        out = []
        for (part, _), lo, hi in zip(self.parts, self.offsets[:-1], self.offsets[1:]):
            if lo < stop and start < hi:
                out.append(self._array(part)[max(start, lo) - lo:min(stop, hi) - lo])
        if not out:
            return torch.empty((0, *self.shape), dtype=torch.uint8)
        return torch.from_numpy(np.concatenate(out) if len(out) > 1 else np.array(out[0]))

    def take(self, positions: torch.Tensor) -> torch.Tensor:
        """uint8 images at the (increasing) ``positions``, reading only those rows."""
        pos = positions.numpy()
        out = np.empty((len(pos), *self.shape), dtype=np.uint8)
        for (part, _), lo, hi in zip(self.parts, self.offsets[:-1], self.offsets[1:]):
            here = (pos >= lo) & (pos < hi)
            if here.any():
                out[here] = self._array(part)[pos[here] - lo]
        return torch.from_numpy(out)

    def images(self) -> torch.Tensor:
        """Every image, in memory."""
        return self.read(0, len(self))

    def batches(self, size: int) -> Iterator[torch.Tensor]:
        """The images in order, ``size`` at a time."""
        for i in range(0, len(self), size):
            yield self.read(i, i + size)

    def first_of_classes(self, classes: list[int], per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, labels) of the first ``per_class`` samples of each of ``classes``, in
        file order (what a grid shows), reading only those rows."""
        keep = [torch.nonzero(self.labels == c)[:per_class, 0] for c in classes]
        positions = torch.cat(keep).sort().values if keep else torch.empty(0, dtype=torch.int64)
        return self.take(positions), self.labels[positions]

    def _array(self, part: Path) -> np.ndarray:
        if part not in self._arrays:
            self._arrays[part] = _npz_member(part, "images")
        return self._arrays[part]


def open_samples(path: Path, expected: dict[str, Any] | None = None) -> SampleSet:
    """The sample set at ``path`` (either layout), every shard checked against the
    index. With ``expected`` (a :func:`sample_identity`), a set drawn under another
    identity is refused with what differs and the command that re-draws it."""
    if not path.is_file():
        raise SpheregenError(f"{path} does not exist: run `spheregen sample` for this experiment first")
    samples = _open(path)
    if expected is not None:
        differs = identity_differences(samples.meta, expected)
        if differs:
            what = "; ".join(f"{k}: file {a!r}, config {b!r}" for k, (a, b) in differs.items())
            raise StaleError(f"{path} was sampled under another config ({what}): re-run `spheregen sample` "
                             "for this method (or `spheregen run`, which re-samples)")
    return samples


def load_samples(path: Path, expected: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 N×C×H×W images and int64 N labels of a sample set, whole (see
    :func:`open_samples`; a reader that needs only some rows opens it instead)."""
    samples = open_samples(path, expected)
    return samples.images(), samples.labels


def read_meta(path: Path) -> dict[str, Any]:
    """The identity stored in a sample set ({} when it has none), once every shard is
    found and agrees with the index."""
    return open_samples(path).meta


def _open(path: Path) -> SampleSet:
    redraw = "delete it and re-run `spheregen sample`"
    try:
        with np.load(path) as z:
            labels = z["labels"]
            meta = _parse_meta(z["meta"]) if "meta" in z.files else {}
            shards = json.loads(str(z["shards"])) if "shards" in z.files else None
        if shards is None:
            parts = [(path, len(labels))]
        else:
            parts = [(path.parent / name, int(count)) for name, count in shards]
        shapes = [_check_part(part, count, labels, offset, meta, path if shards is not None else None)
                  for (part, count), offset in zip(parts, np.cumsum([0] + [n for _, n in parts]).tolist())]
    except SpheregenError:
        raise
    except Exception as exc:  # truncated, empty, not a zip, missing arrays: one message
        raise SpheregenError(f"{path} is corrupt or not a spheregen sample file ({type(exc).__name__}: {exc}); "
                             f"{redraw}") from exc
    total = sum(n for _, n in parts)
    if labels.dtype != np.int64 or labels.ndim != 1 or total != len(labels) or len(set(shapes)) > 1:
        raise SpheregenError(f"{path} holds {total} images of shapes {sorted(set(shapes))} for {len(labels)} "
                             f"{labels.dtype} labels, not one uint8 C×H×W image per int64 label; {redraw}")
    return SampleSet(path, meta, torch.from_numpy(np.array(labels)), parts, shapes[0] if shapes else ())


def _check_part(part: Path, count: int, labels: np.ndarray, offset: int, meta: dict[str, Any],
                index: Path | None) -> tuple[int, ...]:
    """C×H×W of one file of a set, after checking its images, and a shard's labels and
    identity against its ``index``."""
    if index is not None and not part.is_file():
        raise SpheregenError(f"the shard {part} of this sample set is missing; re-run `spheregen sample`")
    images = _npz_member(part, "images")
    if images.dtype != np.uint8 or images.ndim != 4 or len(images) != count:
        raise SpheregenError(f"{part} holds {images.dtype} images of shape {images.shape}, not {count} uint8 "
                             "C×H×W images; delete it and re-run `spheregen sample`")
    if index is not None:
        with np.load(part) as z:
            mine, their_meta = z["labels"], _parse_meta(z["meta"])
        if their_meta != meta or not np.array_equal(mine, labels[offset:offset + count]):
            raise SpheregenError(f"the shard {part} belongs to another draw than its index {index} "
                                 "(identity or labels differ; an interrupted `spheregen sample`?): re-run "
                                 "`spheregen sample` for this method")
    return tuple(images.shape[1:])


def _parse_meta(arr: np.ndarray) -> dict[str, Any]:
    try:
        meta = json.loads(str(arr))
    except ValueError:  # written before sample files carried their identity
        return {}
    return meta if isinstance(meta, dict) else {}


def _meta_array(meta: dict[str, Any]) -> np.ndarray:
    return np.array(json.dumps(meta, sort_keys=True))


# ---------------------------------------------------------------- uncompressed .npz, streamed


class _Streamed:
    """An array written chunk by chunk along its first axis: ``rows`` rows in all, the
    other dimensions and a free-space check (``what``) taken from the first chunk."""

    def __init__(self, rows: int, dtype: Any, chunks: Iterable[np.ndarray], what: str):
        self.rows, self.dtype, self.chunks, self.what = rows, np.dtype(dtype), chunks, what


def _write_npz(file: Path, arrays: dict[str, np.ndarray | _Streamed]) -> None:
    """An uncompressed .npz (what ``np.savez`` writes, readable by ``np.load``), whose
    :class:`_Streamed` members never exist whole in memory."""
    with zipfile.ZipFile(file, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, arr in arrays.items():
            with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
                if isinstance(arr, _Streamed):
                    _write_streamed(f, arr, Path(file).parent)
                else:
                    np.lib.format.write_array(f, np.asanyarray(arr), allow_pickle=False)


def _write_streamed(f: Any, arr: _Streamed, folder: Path) -> None:
    written = 0
    for chunk in arr.chunks:
        if written == 0:
            shape = (arr.rows, *chunk.shape[1:])
            ensure_free_space(folder, int(np.prod(shape)) * arr.dtype.itemsize, arr.what)
            np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(arr.dtype),
                                                     "fortran_order": False, "shape": shape})
        elif chunk.shape[1:] != shape[1:]:
            raise SpheregenError(f"{arr.what}: a batch of shape {chunk.shape} among batches of {shape[1:]}")
        f.write(memoryview(np.ascontiguousarray(chunk, dtype=arr.dtype).reshape(-1)))
        written += len(chunk)
    if written == 0:
        raise SpheregenError(f"{arr.what}: no rows to write")
    if written != arr.rows:
        raise SpheregenError(f"{arr.what}: {written} rows were written where {arr.rows} were announced")


def _npz_member(path: Path, name: str) -> np.ndarray:
    """Array ``name`` of the .npz at ``path``: memory-mapped (read-only) where it is
    stored uncompressed, read whole where it is compressed (files written before sample
    files were uncompressed)."""
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(f"{name}.npy")
        if info.compress_type != zipfile.ZIP_STORED:
            with zf.open(info) as f:
                return np.lib.format.read_array(f, allow_pickle=False)
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
        if local[:4] != b"PK\x03\x04":
            raise ValueError(f"no zip member header for {name}.npy")
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        f.seek(info.header_offset + 30 + name_len + extra_len)
        version = np.lib.format.read_magic(f)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in read_header:
            raise ValueError(f"{name}.npy has .npy format version {version}")
        shape, fortran, dtype = read_header[version](f)
        offset = f.tell()
    if dtype.hasobject:
        raise ValueError(f"{name}.npy holds Python objects")
    if int(np.prod(shape)) == 0:
        return np.empty(shape, dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")


# ---------------------------------------------------------------- other layouts


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
EXPORT_BATCH = 1024  # images in memory at a time while exporting


def export_samples(src: Path, out: Path, fmt: str, meta: dict[str, Any] | None = None) -> Path:
    """One sample set in another layout, for other evaluators (written
    :data:`EXPORT_BATCH` images at a time, whatever the set's size):

    * ``adm``: ``out.npz`` with ``arr_0`` (uint8 N×H×W×C, as ADM's evaluator and the
      papers' FID scripts read) and ``arr_1`` (int64 labels);
    * ``png``: folder ``out/`` of ``000000.png``... (clean-fid, torch-fidelity's
      ``fidelity --input1 DIR``), with ``labels.txt`` (one class per line, in order);
    * ``npz``: one self-contained native file (images N×C×H×W, labels, identity), also
      of a set drawn in shards.
    """
    samples = open_samples(src, meta)
    if fmt in ("adm", "npz"):
        path = out.with_suffix(".npz")
        if fmt == "adm":
            hwc = (b.permute(0, 2, 3, 1).contiguous().numpy() for b in samples.batches(EXPORT_BATCH))
            arrays = {"arr_0": _Streamed(len(samples), np.uint8, hwc, f"the ADM export {path.name}"),
                      "arr_1": samples.labels.numpy()}
            atomic_write(path, lambda tmp: _write_npz(tmp, arrays))
        else:
            write_sample_file(path, samples.batches(EXPORT_BATCH), samples.labels, samples.meta)
        return path
    if fmt == "png":
        return _export_png(samples, out)
    raise SpheregenError(f"export format {fmt!r} is not one of {list(EXPORT_FORMATS)}")


def _export_png(samples: SampleSet, out: Path) -> Path:
    from PIL import Image

    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        i = 0
        for images in samples.batches(EXPORT_BATCH):
            for img in images:
                arr = img.permute(1, 2, 0).numpy()
                Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr).save(tmp / f"{i:06d}.png")
                i += 1
        (tmp / "labels.txt").write_text("".join(f"{int(y)}\n" for y in samples.labels))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise SpheregenError(f"could not write the PNG export {out} ({exc.strerror or exc}); free disk space or "
                             "choose another --out") from exc
    return out
