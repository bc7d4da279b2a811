"""Training-log values from device tensors."""

from __future__ import annotations

import torch
from torch import Tensor


def to_floats(named: dict[str, Tensor]) -> dict[str, float]:
    """{name: 0-dim tensor} -> {name: float} in one device-to-host copy: one
    ``.item()`` per term would wait for the GPU once per term and step."""
    if not named:
        return {}
    values = torch.stack([t.detach().float().reshape(()) for t in named.values()]).tolist()
    return dict(zip(named, values))
