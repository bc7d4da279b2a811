"""Final weights on disk: ``final/weights.safetensors`` with ``final/config.json`` beside.

The weights file holds ``model.<name>`` (the whole method's state dict) and, when the run
kept an EMA, ``ema.<name>`` (its trained parameters' averages). ``config.json`` holds what
is needed to rebuild and check the method without the experiment's data: the method
entry (method, tokenizer, denoiser, sampler, guidance, training), the data spec
(image size, channels, classes), the run identity, the step, and the versions. Safetensors
loads without unpickling anything, so a weights file from elsewhere cannot run code.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from spheregen.errors import CheckpointError
from spheregen.paths import ensure_free_space, replace_dir

WEIGHTS = "weights.safetensors"
CONFIG = "config.json"


def write_final(folder: Path, model: dict[str, torch.Tensor], ema: dict[str, torch.Tensor] | None,
                meta: dict[str, Any]) -> Path:
    """Write the final folder atomically (a temporary folder moved into place): the
    model's state, the EMA's, and ``meta`` as config.json. Returns the weights path."""
    # clones: safetensors refuses tensors that share storage (tied weights)
    tensors = {f"model.{k}": v.detach().cpu().contiguous().clone() for k, v in model.items()}
    tensors.update({f"ema.{k}": v.detach().cpu().contiguous().clone() for k, v in (ema or {}).items()})
    ensure_free_space(folder.parent, sum(t.numel() * t.element_size() for t in tensors.values()), "the final weights")
    tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_file(tensors, str(tmp / WEIGHTS))
        meta = {**meta, "ema": ema is not None, "spheregen": importlib.metadata.version("spheregen")}
        (tmp / CONFIG).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
        replace_dir(tmp, folder)
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"could not write the final weights in {folder} ({type(exc).__name__}: {exc}); "
                              "the last checkpoint is intact: free disk space and re-run with --resume") from exc
    return folder / WEIGHTS


def read_final_config(folder: Path) -> dict[str, Any]:
    """config.json of a final folder alone (the weights are not read)."""
    config = folder / CONFIG
    if not config.is_file():
        raise CheckpointError(f"{config} does not exist: train the method first (spheregen train EXPERIMENT.toml)")
    try:
        return json.loads(config.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{config} is corrupt ({type(exc).__name__}: {exc}); retrain with --fresh") from exc


def read_final(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None, dict[str, Any]]:
    """(model state, EMA state or None, config.json) of a final folder, each file checked."""
    weights, config = folder / WEIGHTS, folder / CONFIG
    for f in (weights, config):
        if not f.is_file():
            raise CheckpointError(f"{f} does not exist: train the method first (spheregen train EXPERIMENT.toml)")
    try:
        tensors = load_file(str(weights))
        meta = json.loads(config.read_text())
    except Exception as exc:
        raise CheckpointError(f"{folder} holds corrupt final weights ({type(exc).__name__}: {exc}); "
                              "retrain with --fresh") from exc
    model = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    ema = {k[len("ema."):]: v for k, v in tensors.items() if k.startswith("ema.")}
    return model, (ema if meta.get("ema") else None), meta
