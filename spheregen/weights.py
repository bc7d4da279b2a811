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


def require_hub_file(names: str | Sequence[str], url: str, needed_for: str, alternative: str) -> Path:
    """The path of the first of ``names`` (one file under the names its publishers use)
    in the hub cache, or a WeightsError saying what needs it, where it goes, where it
    comes from (``url``, saved as the first name) and the config ``alternative``."""
    names = [names] if isinstance(names, str) else list(names)
    path = find_hub_file(names)
    if path is None:
        directory = hub_checkpoints_dir()
        also = "".join(f" (or the identical '{n}')" for n in names[1:])
        raise WeightsError(
            f"{needed_for} needs the weights file '{names[0]}'{also}, which is not in {directory} (the torch hub "
            f"cache: $TORCH_HOME/hub/checkpoints, default ~/.cache/torch/hub/checkpoints). With a network, "
            f"download it there: curl -L -o {directory / names[0]} {url} . Or {alternative}; nothing is "
            f"downloaded at run time"
        )
    return path
