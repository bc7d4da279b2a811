"""Pretrained-weights files, through the libraries' own caches and downloaders.

Weights live where torch hub keeps them, ``torch.hub.get_dir()/checkpoints``
(``$TORCH_HOME/hub/checkpoints``, default ``~/.cache/torch/hub/checkpoints``), where
torchvision, torch-fidelity and lpips look. A missing file is downloaded there on first
use with torch hub's own downloader, as those libraries' users expect, unless spheregen
is offline: ``SPHEREGEN_OFFLINE=1`` (``--offline``) or ``HF_HUB_OFFLINE=1``. Offline, or
when the download fails, the answer is a :class:`WeightsError` that names the file, the
folder, the URL and the offline alternative a config can name.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch

from spheregen.errors import WeightsError


def hub_checkpoints_dir() -> Path:
    """Where torch hub keeps downloaded weights (honours TORCH_HOME and set_dir)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def find_hub_file(names: Sequence[str]) -> Path | None:
    """The first of ``names`` present in :func:`hub_checkpoints_dir`, or None."""
    directory = hub_checkpoints_dir()
    return next((directory / n for n in names if (directory / n).is_file()), None)


def offline() -> bool:
    """Whether spheregen may download: not when SPHEREGEN_OFFLINE or HF_HUB_OFFLINE is set
    (to anything but 0 / false / empty)."""
    return any(os.environ.get(v, "").strip().lower() not in ("", "0", "false", "no")
               for v in ("SPHEREGEN_OFFLINE", "HF_HUB_OFFLINE"))


def require_hub_file(names: str | Sequence[str], url: str, needed_for: str, alternative: str) -> Path:
    """The path of the first of ``names`` (one file under the names its publishers use)
    in the hub cache; when absent and online, downloaded there from ``url`` (saved as the
    first name) by torch hub. Otherwise a WeightsError saying what needs it, where it
    goes, where it comes from and the config ``alternative``."""
    names = [names] if isinstance(names, str) else list(names)
    path = find_hub_file(names)
    if path is not None:
        return path
    directory = hub_checkpoints_dir()
    why = "spheregen is offline (SPHEREGEN_OFFLINE / HF_HUB_OFFLINE / --offline), so nothing is downloaded"
    if not offline():
        target = directory / names[0]
        try:
            directory.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(url, str(target), progress=True)
            return target
        except (OSError, RuntimeError, ValueError) as exc:  # no network, a proxy, a 404, a bad hash: one message
            why = f"downloading it from {url} failed ({type(exc).__name__}: {str(exc)[:200]})"
    also = "".join(f" (or the identical '{n}')" for n in names[1:])
    raise WeightsError(
        f"{needed_for} needs the weights file '{names[0]}'{also}, which is not in {directory} (the torch hub "
        f"cache: $TORCH_HOME/hub/checkpoints, default ~/.cache/torch/hub/checkpoints), and {why}. Put it there "
        f"(curl -L -o {directory / names[0]} {url}), or {alternative}"
    )
