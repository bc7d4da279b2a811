"""What the flow baselines share: time sampling, the RAE time shift and its config
validator. Building the frozen tokenizer and the latent-sized denoiser is the core
toolkit's (:class:`spheregen.api.TokenizerDenoiserMethod`, ``build_latent_denoiser``).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import attrs
import torch
from torch import Tensor

TimeSampling = Literal["uniform", "logit-normal"]


def shift_spec(_inst: Any, attribute: attrs.Attribute, value: float | str) -> None:
    if value != "auto" and (isinstance(value, str) or value <= 0):
        raise ValueError(f"'{attribute.name}' must be a number > 0 or \"auto\", got {value!r}")


def sample_unit_time(
    n: int, kind: TimeSampling, mean: float, std: float, device: torch.device, generator: torch.Generator | None = None
) -> Tensor:
    """n values in (0, 1): uniform, or sigmoid(N(mean, std)) (logit-normal)."""
    if kind == "uniform":
        return torch.rand(n, device=device, generator=generator)
    if kind == "logit-normal":
        return torch.sigmoid(mean + std * torch.randn(n, device=device, generator=generator))
    raise ValueError(f"time sampling must be 'uniform' or 'logit-normal', got {kind!r}")


def resolve_time_shift(spec: float | str, latent_shape: tuple[int, ...]) -> float:
    """``"auto"`` -> sqrt(latent_dim / 4096) (RAE), a number -> itself."""
    if spec == "auto":
        return math.sqrt(math.prod(latent_shape) / 4096)
    return float(spec)
