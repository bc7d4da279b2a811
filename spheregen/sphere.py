"""Sphere math shared by the sphere-based methods: the projection f and the
stratified noise radii of the official Sphere Encoder code."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

SPHERE_EPS = 1e-6


def spherify(z: Tensor, dims: Sequence[int] | None = None) -> Tensor:
    """f(z) = z / sqrt(mean(z²) + 1e-6) over ``dims`` (default: all non-batch dims), so
    each slice lies on the sphere of radius √(its size). z: B×...

    The eps keeps f finite on an all-zero latent (a zero-init encoder's). The mean is
    taken in at least fp32: a latent has up to ~2·10⁵ dims, too many terms for a bf16 sum."""
    dims = tuple(range(1, z.ndim)) if dims is None else tuple(dims)
    acc = torch.promote_types(z.dtype, torch.float32)
    scale = torch.rsqrt(z.to(acc).pow(2).mean(dim=dims, keepdim=True) + SPHERE_EPS)
    return z * scale.to(z.dtype)


def stratified_unit_radii(n: int, device: torch.device | str = "cpu",
                          generator: torch.Generator | None = None) -> Tensor:
    """n radii in [0, 1]: one per stratum of m = n − 2 strata, ``(i + max(u, 1e-3)) / m``,
    plus exactly one 0 (a clean sample) and one 1 (a maximum-noise sample), shuffled."""
    if n < 3:
        raise ValueError(f"stratified noise radii need a batch of at least 3 (one 0, one 1 and n - 2 strata), got {n}")
    m = n - 2
    u = torch.rand(m, device=device, generator=generator).clamp_min(1e-3)
    strata = (torch.arange(m, device=device, dtype=u.dtype) + u) / m
    r = torch.cat([strata, torch.zeros(1, device=device), torch.ones(1, device=device)])
    return r[torch.randperm(n, device=device, generator=generator)]
