"""Local pretrained-weights files: spheregen never downloads.

Libraries that would download (torchvision, torch-fidelity, lpips) are only called once
the file is known to be in the torch hub cache, ``torch.hub.get_dir()/checkpoints``
(``$TORCH_HOME/hub/checkpoints``, default ``~/.cache/torch/hub/checkpoints``), where
their own download would have put it; a missing file is a :class:`WeightsError` that
names the file, the folder, where to get it and the offline alternative.
"""

from __future__ import annotations

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


def require_hub_file(name: str, url: str, needed_for: str, alternative: str) -> Path:
    """The path of ``name`` in the hub cache, or a WeightsError saying what needs it,
    where it goes, where it comes from (``url``) and the config ``alternative``."""
    path = find_hub_file([name])
    if path is None:
        directory = hub_checkpoints_dir()
        raise WeightsError(
            f"{needed_for} needs the weights file '{name}', which is not in {directory} (the torch hub cache: "
            f"$TORCH_HOME/hub/checkpoints). With a network, download it there: curl -L -o {directory / name} "
            f"{url} . Or {alternative}; nothing is downloaded at run time"
        )
    return path
