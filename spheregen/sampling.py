"""What samplers share: where noise is drawn, and time grids and noise schedules.

Noise convention: every draw is made on the generator's device (the method's device
when there is none) and then moved to the method's device and dtype, so a CPU
generator gives the same samples on every device and evaluation's generator (made on
the method's device) costs no copy.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor

Schedule = Literal["linear", "none", "cosine"]


def reference_parameter(module: Any) -> Tensor:
    """The first parameter of ``module`` (an ``nn.Module``): its device and dtype are
    the ones noise is moved to."""
    return next(module.parameters())


def noise(shape: tuple[int, ...], generator: torch.Generator | None, like: Tensor) -> Tensor:
    """N(0, I) of ``shape`` by the module's convention, on ``like``'s device and dtype."""
    where = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=where).to(like.device, like.dtype)


def shift_noise_level(level: Tensor, shift: float) -> Tensor:
    """RAE's dimension-dependent shift on a noise level n (1 = pure noise):
    n' = s·n / (1 + (s − 1)·n). Monotone, fixes 0 and 1, s = 1 is the identity, and
    s > 1 moves time toward noise (high-dimensional latents need more of it)."""
    return shift * level / (1 + (shift - 1) * level)


def noise_level_grid(steps: int, shift: float = 1.0) -> Tensor:
    """steps + 1 noise levels from 1 (noise) to 0 (data), float64: a uniform grid,
    shifted by :func:`shift_noise_level`."""
    return shift_noise_level(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift)


def flow_time_grid(steps: int, shift: float = 1.0) -> Tensor:
    """The same grid as flow-matching times t = 1 − level, from 0 (noise) to 1 (data)."""
    return 1 - noise_level_grid(steps, shift)


def decay(step: int, steps: int, schedule: Schedule) -> float:
    """Radius r_t of the noise a few-step refinement loop re-adds after step t (1 ≤ t < T).

    ``linear``: 1 − t/T (the official Sphere Encoder sampling scheduler);
    ``cosine``: cos(π/2 · t/T) (slower decay early, faster late);
    ``none``: 1 (the Sphere Encoder's default: full noise every step)."""
    if schedule == "linear":
        return 1.0 - step / steps
    if schedule == "cosine":
        return math.cos(math.pi / 2 * step / steps)
    if schedule == "none":
        return 1.0
    raise ValueError(f"unknown schedule {schedule!r}")
