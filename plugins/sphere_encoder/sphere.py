"""Sphere math of the Sphere Encoder (SPEC A2-A4, E), on top of the toolkit's f
(``spherify``) and stratified radii.

Latents are B×(any shape); the sphere is over all non-batch dims at once, radius √L.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from spheregen.api import spherify, stratified_unit_radii

__all__ = ["spherify", "stratified_unit_radii", "sigma_max", "hard_angle", "mix_hard_cases", "perturb", "angle_deg",
           "gaussian_like"]

MAX_HARD_ANGLE = 89.0
HARD_EXTRA_ANGLE = 5.0


def sigma_max(angle_deg: float) -> float:
    """σmax = tan θmax: e ~ N(0, I_L) is nearly orthogonal to v and of norm ≈ √L, so
    angle(v, v + σe) ≈ arctan σ whatever L."""
    return math.tan(math.radians(angle_deg))


def hard_angle(angle_deg: float) -> float:
    return min(angle_deg + HARD_EXTRA_ANGLE, MAX_HARD_ANGLE)


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


def gaussian_like(v: Tensor) -> Tensor:
    """N(0, I) with v's shape, dtype and device, and v's strides when v is dense (else
    dense strides in v's dim order), drawn in memory order.

    The encoder's B×C×H×W latents are token-major in memory (strides B: N·C, C: 1), and
    ``torch.randn_like`` keeps those strides; on a CPU a tensor that is dense but not
    contiguous takes torch's scalar normal_ path, 6.7 ms against 0.9 for the vectorised
    one at 64×32×8×8, single-threaded, every training step. Here the draw is a
    contiguous tensor of the memory-order shape, permuted back: the same numbers in
    memory as ``randn`` of that shape (for a contiguous v, exactly ``randn_like(v)``)."""
    order = sorted(range(v.ndim), key=lambda d: (-v.stride(d), d))  # outermost dim first
    e = torch.randn([v.shape[d] for d in order], dtype=v.dtype, device=v.device)
    return e.permute([order.index(d) for d in range(v.ndim)])


def perturb(v: Tensor, sigma: Tensor, noise: Tensor) -> Tensor:
    """f(v + σ·e) per sample (σ of shape B); σ == 0 keeps v exactly."""
    s = sigma.view(-1, *([1] * (v.ndim - 1))).to(v.dtype)
    noisy = spherify(v + s * noise)
    return torch.where(s == 0, v, noisy)


def angle_deg(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample angle between flattened a and b, in degrees."""
    cos = torch.nn.functional.cosine_similarity(a.flatten(1).double(), b.flatten(1).double(), dim=1)
    return torch.rad2deg(torch.arccos(cos.clamp(-1.0, 1.0)))
