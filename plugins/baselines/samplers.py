"""Fixed-grid samplers for the flow baselines, with exact NFE.

* ``euler`` / ``heun``: integrate a method's ``velocity(x, t, labels, drop)`` (flow-
  matching convention, noise at t = 0, data at t = 1) on a uniform grid of ``steps``
  intervals, mapped through the method's time shift (``method.time_shift``, or the
  sampler's ``time_shift`` when set). Heun skips its corrector on the last interval
  (no evaluation at the data end), so NFE = 2·steps − 1.
* ``meanflow``: ``steps`` jumps z ← z − (t − r)·u(z, r, t) of a method's
  ``average_velocity(z, r, t, labels, drop)`` on the uniform grid 1 → 0 (noise at 1);
  one step is z = ε − u(ε, 0, 1).

What a sampler calls on a method is declared in ``requires`` (VelocityMethod,
AverageVelocityMethod), plus ``parameters()`` for the device and dtype and the optional
``time_shift`` (Euler/Heun). Classifier-free guidance (``guidance > 1``) is the toolkit's
:func:`~spheregen.api.guided` (one 2B batch through the method's ``drop`` mask), mixing
every channel: out = out_u + w·(out_c − out_u); each such pass counts twice in ``nfe``.
Noise follows the toolkit's convention (:func:`spheregen.api.noise`). Output: decoded
images clamped to [-1, 1].
"""

from __future__ import annotations

from typing import Any

import attrs
import torch
from torch import Tensor

from spheregen.api import (
    AverageVelocityMethod,
    BuildContext,
    VelocityMethod,
    cfg_passes,
    check_steps,
    flow_time_grid,
    guided,
    noise,
    noise_level_grid,
    positive,
    reference_parameter,
)


@attrs.frozen(kw_only=True)
class FlowSamplerConfig:
    """Fixed uniform time grid; ``time_shift`` overrides the method's own shift
    (unset: use the shift the method was trained with)."""

    time_shift: float | None = attrs.field(default=None, validator=positive)


@attrs.frozen(kw_only=True)
class MeanFlowSamplerConfig:
    """Uniform grid from t = 1 (noise) to 0 in ``steps`` average-velocity jumps."""


def _start(method: Any, labels: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """Pure noise B×latent_shape and the labels, on the method's device."""
    ref = reference_parameter(method)
    return noise((labels.shape[0], *method.latent_shape), generator, ref), labels.to(ref.device)


class _FlowSampler:
    name = ""
    requires = (VelocityMethod,)

    def __init__(self, cfg: FlowSamplerConfig):
        self.cfg = cfg

    def _begin(self, method: Any, labels: Tensor, steps: int,
               generator: torch.Generator | None) -> tuple[Tensor, Tensor, list[float]]:
        """(noise, labels, time grid) after checking ``steps``."""
        check_steps(steps)
        shift = self.cfg.time_shift if self.cfg.time_shift is not None else getattr(method, "time_shift", 1.0)
        return *_start(method, labels, generator), flow_time_grid(steps, shift).tolist()


class EulerSampler(_FlowSampler):
    """x ← x + Δt·v(x, t) on the grid: NFE = steps (×2 with CFG)."""

    name = "euler"

    @torch.no_grad()
    def sample(self, method: Any, labels: Tensor, steps: int, guidance: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
        x, labels, grid = self._begin(method, labels, steps, generator)
        for t0, t1 in zip(grid[:-1], grid[1:]):
            t = torch.full((x.shape[0],), t0, device=x.device)
            x = x + (t1 - t0) * guided(method.velocity, x, (t,), labels, guidance)
        return method.decode(x).clamp(-1, 1)

    def nfe(self, steps: int, guidance: float = 1.0) -> int:
        check_steps(steps)
        return steps * cfg_passes(guidance)


class HeunSampler(_FlowSampler):
    """Heun's 2nd-order method; the last interval is a plain Euler step, so NFE =
    2·steps − 1 (×2 with CFG)."""

    name = "heun"

    @torch.no_grad()
    def sample(self, method: Any, labels: Tensor, steps: int, guidance: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
        x, labels, grid = self._begin(method, labels, steps, generator)
        b, velocity = x.shape[0], method.velocity
        for k, (t0, t1) in enumerate(zip(grid[:-1], grid[1:])):
            d0 = guided(velocity, x, (torch.full((b,), t0, device=x.device),), labels, guidance)
            x_euler = x + (t1 - t0) * d0
            if k == steps - 1:
                x = x_euler
                break
            d1 = guided(velocity, x_euler, (torch.full((b,), t1, device=x.device),), labels, guidance)
            x = x + (t1 - t0) * 0.5 * (d0 + d1)
        return method.decode(x).clamp(-1, 1)

    def nfe(self, steps: int, guidance: float = 1.0) -> int:
        check_steps(steps)
        return (2 * steps - 1) * cfg_passes(guidance)


class MeanFlowSampler:
    """z ← z − (t − r)·u(z, r, t) over a uniform grid 1 → 0: NFE = steps (×2 with CFG)."""

    name = "meanflow"
    requires = (AverageVelocityMethod,)

    def __init__(self, cfg: MeanFlowSamplerConfig):
        self.cfg = cfg

    @torch.no_grad()
    def sample(self, method: Any, labels: Tensor, steps: int, guidance: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
        check_steps(steps)
        z, labels = _start(method, labels, generator)
        b, device = z.shape[0], z.device
        grid = noise_level_grid(steps).tolist()
        for t0, t1 in zip(grid[:-1], grid[1:]):
            t = torch.full((b,), t0, device=device)
            r = torch.full((b,), t1, device=device)
            z = z - (t0 - t1) * guided(method.average_velocity, z, (r, t), labels, guidance)
        return method.decode(z).clamp(-1, 1)

    def nfe(self, steps: int, guidance: float = 1.0) -> int:
        check_steps(steps)
        return steps * cfg_passes(guidance)


def build_euler(cfg: FlowSamplerConfig, ctx: BuildContext) -> EulerSampler:
    """Euler on a fixed (optionally shifted) uniform grid; NFE = steps (×2 with CFG)."""
    return EulerSampler(cfg)


def build_heun(cfg: FlowSamplerConfig, ctx: BuildContext) -> HeunSampler:
    """Heun on a fixed (optionally shifted) uniform grid; NFE = 2·steps − 1 (×2 with CFG)."""
    return HeunSampler(cfg)


def build_meanflow_sampler(cfg: MeanFlowSamplerConfig, ctx: BuildContext) -> MeanFlowSampler:
    """MeanFlow average-velocity jumps (1 step = 1 NFE; ×2 with CFG)."""
    return MeanFlowSampler(cfg)
