"""Where every stage reads and writes, and atomic writes.

runs/<experiment>/<method>/   checkpoints/step-XXXXXXX/, final/{weights.safetensors,config.json},
                               train_log.jsonl, run.json
runs/<experiment>/samples/<method>/steps-<T>.npz    (+ steps-<T>.shards/ under several processes)
runs/.cache/                   preprocessed data, trained feature extractors, tokenizers
reports/<experiment>/          results.parquet, results.md, config.resolved.json, *.png

Safety rules every stage follows: a path spheregen writes or deletes lies inside the
runs or reports root (:func:`inside`); a folder is deleted only when it carries the
marker spheregen writes into the folders it creates (:func:`remove_owned`); one process
writes a run folder at a time (:class:`DirLock`); a large write checks the free space
first (:func:`ensure_free_space`) and leaves no temporary file when it fails.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable

import attrs

from spheregen.errors import SpheregenError

MARKER = ".spheregen-run"
LOCK = ".spheregen-lock"


@attrs.frozen
class Paths:
    """Every folder and file of one experiment. ``experiment`` and the method names are
    validated single path components (spheregen.experiment), and each path handed out
    is checked to lie inside its root all the same."""

    runs_root: Path = attrs.field(converter=lambda p: Path(p).absolute())
    reports_root: Path = attrs.field(converter=lambda p: Path(p).absolute())
    experiment: str

    @property
    def cache(self) -> Path:
        return self.runs_root / ".cache"

    @property
    def experiment_runs(self) -> Path:
        return self.runs_root / self.experiment

    def run(self, method: str) -> Path:
        return inside(self.experiment_runs / method, self.runs_root)

    def checkpoints(self, method: str) -> Path:
        return self.run(method) / "checkpoints"

    def final(self, method: str) -> Path:
        return self.run(method) / "final" / "weights.safetensors"

    def sample_dir(self, method: str) -> Path:
        return inside(self.experiment_runs / "samples" / method, self.runs_root)

    def samples(self, method: str, steps: int, seed: int | None = None) -> Path:
        """A scored sample set: ``steps-<T>.npz`` for the first of ``eval.seeds`` (None),
        ``steps-<T>_seed-<s>.npz`` for the others."""
        name = f"steps-{steps}" if seed is None else f"steps-{steps}_seed-{seed}"
        return self.sample_dir(method) / f"{name}.npz"

    def guidance_samples(self, method: str, steps: int, guidance: float) -> Path:
        """A sample set drawn to choose the guidance scale (spheregen.selection)."""
        return self.sample_dir(method) / "guidance" / f"steps-{steps}_w-{guidance:g}.npz"

    @property
    def report(self) -> Path:
        return inside(self.reports_root / self.experiment, self.reports_root)


def inside(path: Path, root: Path) -> Path:
    """``path`` (absolute, '..' resolved) when it lies strictly inside ``root``, else a
    SpheregenError: the last line of defence against writes outside the project."""
    p, r = Path(os.path.abspath(path)), Path(os.path.abspath(root))
    if p == r or r not in p.parents:
        raise SpheregenError(f"refusing to touch {p}: it is not inside {r}")
    return p


def mark_owned(folder: Path) -> None:
    """Create ``folder`` (and parents) and mark it as made by spheregen, so that
    ``--fresh`` may later delete it."""
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / MARKER
    if not marker.exists():
        marker.write_text(json.dumps({"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "pid": os.getpid()}) + "\n")


def check_owned(folder: Path) -> None:
    """Refuse to work in an existing ``folder`` that spheregen did not create: it holds
    someone's files (anything but the marker and the lock), which a later --fresh
    would otherwise be allowed to delete."""
    if not folder.is_dir() or (folder / MARKER).is_file():
        return
    foreign = sorted(p.name for p in folder.iterdir() if p.name != LOCK)
    if foreign:
        raise SpheregenError(
            f"{folder} already exists and was not created by spheregen (no {MARKER} marker; it holds "
            f"{', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); move it away, or choose another "
            "experiment / method name or --runs-dir"
        )


def remove_owned(folder: Path, root: Path, keep: tuple[Path, ...] = ()) -> None:
    """Delete ``folder`` only when it lies inside ``root`` and carries spheregen's
    marker: a folder spheregen did not create (a user's data, a thesis) is never
    removed. Files in ``keep`` (a lock this process holds) stay, and so does the folder."""
    folder = inside(folder, root)
    if not folder.exists():
        return
    if not (folder / MARKER).is_file():
        if all(child in keep or child.name == LOCK for child in folder.iterdir()):
            return  # nothing but a lock (this process's, before its first run marked the folder)
        raise SpheregenError(
            f"{folder} was not created by spheregen (no {MARKER} marker), so --fresh will not delete it; "
            "move or delete it yourself, or choose another experiment / method name"
        )
    if not keep:
        shutil.rmtree(folder)
        return
    for child in folder.iterdir():
        if child in keep:
            continue
        shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()


def free_bytes(folder: Path) -> int:
    """Free bytes on the file system that holds ``folder`` (or its nearest existing parent)."""
    p = Path(os.path.abspath(folder))
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


def ensure_free_space(folder: Path, need: int, what: str) -> None:
    """Refuse a write of about ``need`` bytes into ``folder`` (with a 5% and 16 MB
    margin) before it starts, rather than leave half a file on a full disk."""
    free = free_bytes(folder)
    if free < need * 1.05 + (16 << 20):
        raise SpheregenError(
            f"not enough disk space for {what} in {folder}: it needs about {need / 2**20:,.0f} MB, "
            f"{free / 2**20:,.0f} MB are free; free some space or point --runs-dir / --reports-dir elsewhere"
        )


def check_writable(folder: Path, what: str) -> None:
    """Create ``folder`` and write a probe file in it, so an unwritable or misdirected
    output folder is found before hours of work, not after."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-probe{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise SpheregenError(f"{what} {folder} is not writable ({exc.strerror or exc}); "
                             "fix its permissions or choose another folder (--runs-dir / --reports-dir)") from exc


class DirLock:
    """One writer per folder: an exclusive OS lock (``flock``) on ``folder/.spheregen-lock``,
    released by the kernel on any exit, SIGKILL included, so a lock file left by a dead
    process is stale by construction and simply taken over. The file records the
    holder's pid and host for the message a second writer gets."""

    def __init__(self, folder: Path, what: str):
        self.folder, self.what = folder, what
        self.path = folder / LOCK
        self._fd: int | None = None

    def acquire(self, wait: bool = False) -> "DirLock":
        """Take the lock; held by another process: a SpheregenError, or with ``wait``
        block until it is released (saying so on stderr)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.path
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise
            if wait:
                print(f"spheregen: waiting for {self.what} {self.folder}, in use by another spheregen process "
                      f"({_holder(path)})", file=sys.stderr)
                fcntl.flock(fd, fcntl.LOCK_EX)
            else:
                os.close(fd)
                raise SpheregenError(
                    f"{self.what} {self.folder} is in use by another spheregen process ({_holder(path)}); "
                    "wait for it to finish or stop it first: two writers would mix their results"
                ) from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "DirLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text())
        return f"pid {info['pid']} on {info['host']} since {info['since']}"
    except (OSError, ValueError, KeyError):
        return "holder unknown"


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    """Write through ``write(tmp_path)`` then rename over ``path``: a reader never sees a
    half-written file, and a crash leaves the previous version in place. A full disk
    (or any OS error) becomes a SpheregenError naming the file; no temp file remains."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:  # torch.save reports a full disk as a RuntimeError
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else f"{type(exc).__name__}: {exc}"
        raise SpheregenError(f"could not write {path} ({why}); the previous version, if any, is unchanged: "
                             "free disk space or fix the folder's permissions and re-run") from exc
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a fully written directory into place (the old one, if any, is removed only
    after the new one is complete)."""
    if final.exists():
        old = final.with_name(f".{final.name}.old{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
