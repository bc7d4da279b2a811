"""Fixed-grid samplers for the flow baselines, with exact NFE.

* ``euler`` / ``heun``: integrate a method's ``velocity(x, t, labels, drop)`` (flow-
  matching convention, noise at t = 0, data at t = 1) on a uniform grid of ``steps``
  intervals, mapped through the method's time shift (``method.time_shift``, or the
  sampler's ``time_shift`` when set). Heun skips its corrector on the last interval
  (no evaluation at the data end), so NFE = 2·steps − 1.
* ``meanflow``: ``steps`` jumps z ← z − (t − r)·u(z, r, t) of a method's
  ``average_velocity(z, r, t, labels, drop)`` on the uniform grid 1 → 0 (noise at 1);
  one step is z = ε − u(ε, 0, 1).

What a sampler calls on a method: ``latent_shape``, ``parameters()`` (for the device),
``velocity`` or ``average_velocity``, ``decode``, and ``time_shift`` (Euler/Heun).
Classifier-free guidance (``guidance > 1``) runs conditional and null-class inputs as one
batch of 2B and mixes every channel: out = out_u + w·(out_c − out_u); each such pass
counts twice in ``nfe``. Noise is drawn with ``torch.randn(..., generator=generator)`` on
the method's device, so a generator must live on that device. Output: decoded images
clamped to [-1, 1].
"""

from __future__ import annotations

from typing import Any, Callable

import attrs
import torch
from torch import Tensor

from spheregen.interfaces import BuildContext, check_steps

from .common import positive, shift_noise_level


@attrs.frozen(kw_only=True)
class FlowSamplerConfig:
    """Fixed uniform time grid; ``time_shift`` overrides the method's own shift
    (unset: use the shift the method was trained with)."""

    time_shift: float | None = attrs.field(default=None, validator=positive)


@attrs.frozen(kw_only=True)
class MeanFlowSamplerConfig:
    """Uniform grid from t = 1 (noise) to 0 in ``steps`` average-velocity jumps."""


def flow_time_grid(steps: int, shift: float = 1.0) -> Tensor:
    """steps + 1 times from 0 (noise) to 1 (data): a uniform grid on the noise level,
    shifted by :func:`shift_noise_level`, mapped to t = 1 − level (float64)."""
    level = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return 1 - shift_noise_level(level, shift)



def _passes(guidance: float) -> int:
    return 2 if guidance > 1 else 1


def _method_fn(method: Any, name: str, sampler: str) -> Callable[..., Tensor]:
    fn = getattr(method, name, None)
    if fn is None:
        raise TypeError(f"sampler '{sampler}' needs a method with {name}(); {type(method).__name__} has none")
    return fn


def _device(method: Any) -> torch.device:
    return next(method.parameters()).device


def guided(fn: Callable[..., Tensor], x: Tensor, times: tuple[Tensor, ...], labels: Tensor, guidance: float) -> Tensor:
    """fn(x, *times, labels, drop=...) with CFG: one 2B call (conditional, then null)."""
    if guidance <= 1:
        return fn(x, *times, labels)
    b = x.shape[0]
    drop = torch.cat([torch.zeros(b, dtype=torch.bool), torch.ones(b, dtype=torch.bool)]).to(x.device)
    out = fn(torch.cat([x, x]), *(torch.cat([t, t]) for t in times), torch.cat([labels, labels]), drop=drop)
    cond, uncond = out.chunk(2)
    return uncond + guidance * (cond - uncond)


class _FlowSampler:
    name = ""

    def __init__(self, cfg: FlowSamplerConfig):
        self.cfg = cfg

    def _start(self, method: Any, labels: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        device = _device(method)
        x = torch.randn((labels.shape[0], *method.latent_shape), generator=generator, device=device)
        return x, labels.to(device)

    def _grid(self, method: Any, steps: int) -> list[float]:
        shift = self.cfg.time_shift if self.cfg.time_shift is not None else getattr(method, "time_shift", 1.0)
        return flow_time_grid(steps, shift).tolist()


class EulerSampler(_FlowSampler):
    """x ← x + Δt·v(x, t) on the grid: NFE = steps (×2 with CFG)."""

    name = "euler"

    @torch.no_grad()
    def sample(self, method: Any, labels: Tensor, steps: int, guidance: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
        check_steps(steps)
        velocity = _method_fn(method, "velocity", self.name)
        x, labels = self._start(method, labels, generator)
        grid = self._grid(method, steps)
        for t0, t1 in zip(grid[:-1], grid[1:]):
            t = torch.full((x.shape[0],), t0, device=x.device)
            x = x + (t1 - t0) * guided(velocity, x, (t,), labels, guidance)
        return method.decode(x).clamp(-1, 1)

    def nfe(self, steps: int, guidance: float = 1.0) -> int:
        check_steps(steps)
        return steps * _passes(guidance)


class HeunSampler(_FlowSampler):
    """Heun's 2nd-order method; the last interval is a plain Euler step, so NFE =
    2·steps − 1 (×2 with CFG)."""

    name = "heun"

    @torch.no_grad()
    def sample(self, method: Any, labels: Tensor, steps: int, guidance: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
        check_steps(steps)
        velocity = _method_fn(method, "velocity", self.name)
        x, labels = self._start(method, labels, generator)
        grid = self._grid(method, steps)
        b = x.shape[0]
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
        return (2 * steps - 1) * _passes(guidance)


class MeanFlowSampler:
    """z ← z − (t − r)·u(z, r, t) over a uniform grid 1 → 0: NFE = steps (×2 with CFG)."""

    name = "meanflow"

    def __init__(self, cfg: MeanFlowSamplerConfig):
        self.cfg = cfg

    @torch.no_grad()
    def sample(self, method: Any, labels: Tensor, steps: int, guidance: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
        check_steps(steps)
        u = _method_fn(method, "average_velocity", self.name)
        device = _device(method)
        labels = labels.to(device)
        b = labels.shape[0]
        z = torch.randn((b, *method.latent_shape), generator=generator, device=device)
        grid = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).tolist()
        for t0, t1 in zip(grid[:-1], grid[1:]):
            t = torch.full((b,), t0, device=device)
            r = torch.full((b,), t1, device=device)
            z = z - (t0 - t1) * guided(u, z, (r, t), labels, guidance)
        return method.decode(z).clamp(-1, 1)

    def nfe(self, steps: int, guidance: float = 1.0) -> int:
        check_steps(steps)
        return steps * _passes(guidance)


def build_euler(cfg: FlowSamplerConfig, ctx: BuildContext) -> EulerSampler:
    """Euler on a fixed (optionally shifted) uniform grid; NFE = steps (×2 with CFG)."""
    return EulerSampler(cfg)


def build_heun(cfg: FlowSamplerConfig, ctx: BuildContext) -> HeunSampler:
    """Heun on a fixed (optionally shifted) uniform grid; NFE = 2·steps − 1 (×2 with CFG)."""
    return HeunSampler(cfg)


def build_meanflow_sampler(cfg: MeanFlowSamplerConfig, ctx: BuildContext) -> MeanFlowSampler:
    """MeanFlow average-velocity jumps (1 step = 1 NFE; ×2 with CFG)."""
    return MeanFlowSampler(cfg)
