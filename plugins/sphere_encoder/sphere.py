"""Sphere math of the Sphere Encoder (SPEC A2-A4, E).

Latents are B×(any shape); the sphere is over all non-batch dims at once, radius √L.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

SPHERE_EPS = 1e-6
MAX_HARD_ANGLE = 89.0
HARD_EXTRA_ANGLE = 5.0


def spherify(z: Tensor) -> Tensor:
    """f(z) = z / sqrt(mean(z²) + 1e-6) over all non-batch dims, so ‖f(z)‖ ≈ √L.

    The eps also keeps f finite on the all-zero latent the zero-init encoder emits.
    The mean is taken in fp32 (L reaches 131072, too many terms for a bf16 sum)."""
    dims = tuple(range(1, z.ndim))
    scale = torch.rsqrt(z.float().pow(2).mean(dim=dims, keepdim=True) + SPHERE_EPS)
    return z * scale.to(z.dtype)


def sigma_max(angle_deg: float) -> float:
    """σmax = tan θmax: e ~ N(0, I_L) is nearly orthogonal to v and of norm ≈ √L, so
    angle(v, v + σe) ≈ arctan σ whatever L."""
    return math.tan(math.radians(angle_deg))


def hard_angle(angle_deg: float) -> float:
    return min(angle_deg + HARD_EXTRA_ANGLE, MAX_HARD_ANGLE)


def stratified_unit_radii(batch: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None) -> Tensor:
    """B radii in [0, 1]: one per stratum of M = B-2 strata, ``(i + max(u, 1e-3)) / M``,
    plus exactly one 0 (a clean sample) and one 1 (a max-noise sample), shuffled."""
    if batch < 3:
        raise ValueError(f"stratified noise radii need a batch of at least 3 (M = B - 2 strata), got {batch}")
    m = batch - 2
    u = torch.rand(m, device=device, generator=generator).clamp_min(1e-3)
    strata = (torch.arange(m, device=device, dtype=u.dtype) + u) / m
    r = torch.cat([strata, torch.zeros(1, device=device), torch.ones(1, device=device)])
    return r[torch.randperm(batch, device=device, generator=generator)]


def mix_hard_cases(
    r: Tensor,
    prob: float,
    angle_deg: float,
    fix: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """With probability ``prob`` replace r by a radius in [1, tan θhard / tan θmax],
    θhard = min(θmax + 5, 89), so those samples get more than θmax of noise.

    ``fix=True`` draws the mask and the value independently (the radii span the whole
    range). ``fix=False`` is the official code: one uniform u gives both the mask
    (u <= prob) and the value 1 + u·(ratio - 1), so the radii only reach
    1 + prob·(ratio - 1)."""
    if prob <= 0:
        return r
    ratio = sigma_max(hard_angle(angle_deg)) / sigma_max(angle_deg)
    u = torch.rand(r.shape, device=r.device, generator=generator, dtype=r.dtype)
    value_u = torch.rand(r.shape, device=r.device, generator=generator, dtype=r.dtype) if fix else u
    return torch.where(u <= prob, 1.0 + value_u * (ratio - 1.0), r)


def perturb(v: Tensor, sigma: Tensor, noise: Tensor) -> Tensor:
    """f(v + σ·e) per sample (σ of shape B); σ == 0 keeps v exactly."""
    s = sigma.view(-1, *([1] * (v.ndim - 1))).to(v.dtype)
    noisy = spherify(v + s * noise)
    return torch.where(s == 0, v, noisy)


def angle_deg(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample angle between flattened a and b, in degrees."""
    cos = torch.nn.functional.cosine_similarity(a.flatten(1).double(), b.flatten(1).double(), dim=1)
    return torch.rad2deg(torch.arccos(cos.clamp(-1.0, 1.0)))
