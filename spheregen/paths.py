"""Where every stage reads and writes, and atomic writes.

runs/<experiment>/<method>/   checkpoints/step-XXXXXXX/, final/weights.pt, train_log.jsonl
runs/<experiment>/samples/<method>/steps-<T>.npz
runs/.cache/                   preprocessed data, trained feature extractors, tokenizers
reports/<experiment>/          results.parquet, results.md, config.resolved.json, *.png
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import attrs


@attrs.frozen
class Paths:
    runs_root: Path
    reports_root: Path
    experiment: str

    @property
    def cache(self) -> Path:
        return self.runs_root / ".cache"

    @property
    def experiment_runs(self) -> Path:
        return self.runs_root / self.experiment

    def run(self, method: str) -> Path:
        return self.experiment_runs / method

    def checkpoints(self, method: str) -> Path:
        return self.run(method) / "checkpoints"

    def final(self, method: str) -> Path:
        return self.run(method) / "final" / "weights.pt"

    def samples(self, method: str, steps: int) -> Path:
        return self.experiment_runs / "samples" / method / f"steps-{steps}.npz"

    @property
    def report(self) -> Path:
        return self.reports_root / self.experiment


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    """Write through ``write(tmp_path)`` then rename over ``path``: a reader never sees a
    half-written file, and a crash leaves the previous version in place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    try:
        write(tmp)
        os.replace(tmp, path)
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
