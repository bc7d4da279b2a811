"""``midpoint``: the explicit midpoint rule (2nd-order Runge–Kutta) on a flow-matching
method's velocity ODE.

What it calls on a method is declared in ``requires``: the toolkit's ``VelocityMethod``
capability (``latent_shape``, ``velocity(x, t, labels, drop)``, ``decode``; flow time
with noise at t = 0 and data at t = 1), plus the optional ``time_shift`` and, as every
sampler, ``parameters()`` for the device. So ``spheregen`` refuses a method without a
velocity (``sphere-latent``, ``sphere-encoder``) when the experiment is loaded, before
anything trains, and ``spheregen list`` shows which methods it fits.
"""

from __future__ import annotations

from typing import Any

import attrs
import torch
from torch import Tensor

from spheregen.api import (
    BuildContext,
    VelocityMethod,
    cfg_passes,
    check_steps,
    flow_time_grid,
    guided,
    noise,
    positive,
    reference_parameter,
)


@attrs.frozen(kw_only=True)
class MidpointConfig:
    """Explicit midpoint steps on a uniform flow-time grid, mapped through the method's
    time shift (``time_shift`` overrides it); NFE = 2·steps (×2 with guidance)."""

    time_shift: float | None = attrs.field(default=None, validator=positive)


class MidpointSampler:
    """Explicit midpoint (RK2) on a flow velocity; NFE = 2·steps (×2 with guidance).

    x ← x + Δt·v(x + Δt/2·v(x, t), t + Δt/2) on each interval of the time grid."""

    requires = (VelocityMethod,)

    def __init__(self, cfg: MidpointConfig, ctx: BuildContext):
        self.cfg = cfg

    @torch.no_grad()
    def sample(self, method: Any, labels: Tensor, steps: int, guidance: float = 1.0,
               generator: torch.Generator | None = None) -> Tensor:
        """B = len(labels) images B×C×H×W in [-1, 1] from ``2·steps`` velocity evaluations
        (each a conditional and a null-class pass under guidance > 1)."""
        check_steps(steps)
        ref = reference_parameter(method)
        # the toolkit's noise convention: drawn on the generator's device, then moved
        x = noise((labels.shape[0], *method.latent_shape), generator, ref)
        labels = labels.to(ref.device)
        shift = self.cfg.time_shift if self.cfg.time_shift is not None else getattr(method, "time_shift", 1.0)
        grid = flow_time_grid(steps, shift).tolist()

        def velocity(x: Tensor, t: float) -> Tensor:
            times = (torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device),)
            return guided(method.velocity, x, times, labels, guidance)  # one CFG pass

        for t0, t1 in zip(grid[:-1], grid[1:]):
            dt = t1 - t0
            x_mid = x + 0.5 * dt * velocity(x, t0)
            x = x + dt * velocity(x_mid, t0 + 0.5 * dt)
        return method.decode(x).clamp(-1, 1)

    def nfe(self, steps: int, guidance: float = 1.0) -> int:
        """Network passes per image: two velocity evaluations per step, each counted twice
        under classifier-free guidance."""
        return 2 * check_steps(steps) * cfg_passes(guidance)
