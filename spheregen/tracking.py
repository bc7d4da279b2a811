"""Evaluation results to the trackers a method trained with (``[train] log_with``).

After ``spheregen evaluate`` (and the evaluate stage of ``run``), each evaluated method
whose ``train.log_with`` names trackers gets, in its own tracker run (the run name and
folder its training logged to: ``runs/<exp>/<method>/tracking/<method>``), at its last
training step:

- every number of its result rows as a scalar ``eval/<column>@steps=<T>`` (with
  ``,seed=<s>`` when ``eval.seeds`` scored several sets per step count): the metrics,
  NFE, FLOPs and speed; identity and bookkeeping columns are left out;
- a grid of the first :data:`GRID_IMAGES` images of each step count's sample file as
  ``eval/samples@steps=<T>``, on the trackers whose accelerate class logs images
  (tensorboard, wandb, aim, clearml, swanlab); the others get the scalars only.

The trackers are accelerate's own classes, opened on the main process without an
``Accelerator`` (evaluation has none). The report never imports this module, so it
stays free of accelerate.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import polars as pl

from spheregen import distributed
from spheregen.experiment import MethodEntry
from spheregen.runner import check_trackers
from spheregen.samples import open_samples
from spheregen.workspace import Workspace

GRID_IMAGES = 16  # the first images of a sample file in the grid, 8 per row
# result columns that are not measurements of the samples: identity, budget, settings
NOT_LOGGED = {"steps", "seed", "n_seeds", "num_samples", "params", "trainable_params", "train_steps", "images_seen",
              "throughput_batch", "torch_threads", "guidance_seed"}
# how each tracker's log_images takes one H×W×C uint8 grid: (value, keyword arguments)
IMAGE_VALUE: dict[str, Callable[[np.ndarray], tuple[Any, dict[str, Any]]]] = {
    "tensorboard": lambda g: (g[None], {"dataformats": "NHWC"}),
    "aim": lambda g: (g, {}),
    "wandb": lambda g: ([g], {}),
    "clearml": lambda g: ([g], {}),
    "swanlab": lambda g: ([g], {}),
}


def log_evaluation(ws: Workspace, names: list[str]) -> list[str]:
    """Log the result rows and sample grids of the methods ``names`` (just evaluated) to
    their training's trackers; returns the methods logged (on the main process)."""
    entries = [e for e in (ws.exp.method(n) for n in names) if e.train.log_with]
    if not entries or not distributed.is_main():
        return []
    frame = pl.read_parquet(ws.paths.report / "results.parquet")
    for entry in entries:
        log_entry(ws, entry, frame.filter(pl.col("method") == entry.name))
    return [e.name for e in entries]


def log_entry(ws: Workspace, entry: MethodEntry, rows: pl.DataFrame) -> None:
    """One method's scalars and grids, at its last training step."""
    check_trackers(entry.train.log_with)
    scalars = eval_scalars(rows)
    grids = {f"eval/samples@steps={t}": sample_grid(ws, entry, t) for t in sorted(set(rows["steps"].to_list()))}
    step = entry.train.steps
    for name in entry.train.log_with:
        tracker = open_tracker(name, entry.name, str(ws.paths.run(entry.name) / "tracking"))
        try:
            tracker.log(scalars, step=step)
            if name in IMAGE_VALUE:
                for tag, grid in grids.items():
                    value, kwargs = IMAGE_VALUE[name](grid)
                    tracker.log_images({tag: value}, step=step, **kwargs)
        finally:
            tracker.finish()


def eval_scalars(rows: pl.DataFrame) -> dict[str, float]:
    """{``eval/<column>@steps=<T>[,seed=<s>]``: value} of every finite number of the rows."""
    several = "seed" in rows.columns and rows.group_by("steps").len()["len"].max() > 1
    out = {}
    for r in rows.iter_rows(named=True):
        where = f"steps={r['steps']}" + (f",seed={r['seed']}" if several else "")
        for key, value in r.items():
            if key in NOT_LOGGED or key.startswith("train_") or isinstance(value, bool):
                continue
            if isinstance(value, (int, float)) and np.isfinite(value):
                out[f"eval/{key}@{where}"] = float(value)
    return out


def sample_grid(ws: Workspace, entry: MethodEntry, steps: int) -> np.ndarray:
    """H×W×3 uint8: the first :data:`GRID_IMAGES` images of the step count's (first
    seed's) sample file, 8 per row."""
    from torchvision.utils import make_grid

    images = open_samples(ws.paths.samples(entry.name, steps)).read(0, GRID_IMAGES)
    grid = make_grid(images, nrow=8, padding=1, pad_value=0)  # 1 channel is repeated to 3
    return grid.permute(1, 2, 0).contiguous().numpy().astype(np.uint8)


def open_tracker(name: str, run_name: str, logging_dir: str) -> Any:
    """accelerate's tracker ``name`` for ``run_name``, started, as ``Accelerator.init_trackers``
    makes it (the trackers that keep files write them under ``logging_dir``)."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    cls = LOGGER_TYPE_TO_CLASS[name]
    tracker = cls(run_name, logging_dir) if cls.requires_logging_directory else cls(run_name)
    tracker.start()
    return tracker

