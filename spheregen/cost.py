"""What training a method cost, as columns of its result rows.

The trainer keeps the time in every checkpoint (``step.json``) and in
``final/config.json`` (``train_cost``): wall seconds in the training loop and
device-seconds (wall × processes), summed over resumes and extensions, with the last
launch's process count and device type. Steps a preemption lost after the last
checkpoint are not counted: they made no weight. Training FLOPs are counted here, once
per run (cached in the run folder as ``train_flops.json``): one training step's forward
and backward per image (:func:`spheregen.flops.count_training_flops`; the optimizer
update, the EMA and encoding the latents of a frozen tokenizer once are not counted), on
the method's architecture materialised on the CPU with placeholder weights, since FLOPs
depend on shapes only, and the trained weights, a fitted tokenizer and the data are not
needed. Total = per image × images seen (steps × the global batch).
"""

from __future__ import annotations

import itertools
import json
import sys
from typing import Any

import torch

from spheregen import distributed
from spheregen.artifacts import read_final_config
from spheregen.config import config_hash
from spheregen.errors import StaleError
from spheregen.experiment import MethodEntry
from spheregen.flops import count_training_flops
from spheregen.paths import atomic_write_json
from spheregen.runner import run_differences, run_hash
from spheregen.workspace import Workspace

CACHE = "train_flops.json"
COUNT_BATCH = 4  # images of the counted step: FLOPs per image do not depend on it (the Sphere Encoder needs >= 3)


def training_cost(ws: Workspace, entry: MethodEntry) -> dict[str, Any]:
    """The training cost of ``entry``'s final weights: ``train_wall_s``,
    ``train_device_hours``, ``train_processes``, ``train_device`` (None for weights
    trained before spheregen recorded them), ``train_gflops_per_image``,
    ``train_gflops_total`` (on the main process; None elsewhere, whose rows are not
    written), and ``extended_from``: the budgets the run was extended from ("4", "4,6";
    None for a run trained in one go, spheregen.extension), which the cost includes."""
    folder = ws.paths.final(entry.name).parent
    config = read_final_config(folder)
    if config.get("config_hash") != run_hash(ws, entry):
        raise StaleError(f"{folder / 'config.json'} belongs to another run ({run_differences(config, ws, entry)}): "
                         f"re-run `spheregen train {ws.exp.source} --method {entry.name}`")
    record = config.get("train_cost") or {}
    per_image = per_image_flops(ws, entry) if distributed.is_main() else None
    images = int(config["step"]) * entry.train.batch_size  # batch_size is global
    device_s = record.get("train_device_s")
    return {
        "train_wall_s": record.get("train_wall_s"),
        "train_device_hours": None if device_s is None else device_s / 3600,
        "train_processes": record.get("processes"),
        "train_device": record.get("device"),
        "train_gflops_per_image": None if per_image is None else per_image / 1e9,
        "train_gflops_total": None if per_image is None else per_image * images / 1e9,
        "extended_from": ",".join(str(s) for s in config.get("extended_from", ())) or None,
    }


def per_image_flops(ws: Workspace, entry: MethodEntry) -> int | None:
    """FLOPs of one training step per image, from the run folder's cache or counted
    (and cached); None, with a warning, when the method cannot be run on placeholder
    weights (the other columns are still written)."""
    spec = ws.declared_spec()
    shape = (spec.channels, spec.image_size, spec.image_size)
    key = config_hash({"method": entry.method, "shape": list(shape), "classes": spec.num_classes,
                       "batch": COUNT_BATCH})
    path = ws.paths.run(entry.name) / CACHE
    if path.is_file():
        try:
            cached = json.loads(path.read_text())
            if cached.get("key") == key:
                return int(cached["flops_per_image"])
        except (OSError, ValueError, KeyError):
            pass  # counted again and rewritten
    try:
        flops = _count(ws, entry, shape, spec.num_classes)
    except Exception as exc:  # noqa: BLE001 - a missing measurement, said, not a failed evaluation
        print(f"spheregen: warning: {entry.name}: training FLOPs not counted ({type(exc).__name__}: {exc}); "
              "train_gflops_* are left empty", file=sys.stderr)
        return None
    atomic_write_json(path, {"key": key, "flops_per_image": flops, "batch": COUNT_BATCH})
    return flops


def _count(ws: Workspace, entry: MethodEntry, shape: tuple[int, int, int], classes: int) -> int:
    """One counted training step of the architecture (built on ``meta``, moved to the
    CPU with seeded placeholder values), leaving every random stream as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        method = ws.build_architecture(entry)[0].to_empty(device="cpu")
        with torch.no_grad():
            for t in itertools.chain(method.parameters(), method.buffers()):
                if t.is_floating_point():
                    t.normal_(0, 0.02)
                else:
                    t.zero_()
        return count_training_flops(method, shape, classes, batch=COUNT_BATCH).total
