"""The latent-sphere math of the Sphere Latent Encoder: projection scopes, noise radii,
noise levels and the two losses. Pure functions on tensors; the method and the sampler
compose them with the toolkit's ``spherify`` and ``decay``. Latents are B×D×h×w.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from spheregen import api

Scope = Literal["global", "token"]
NoiseDist = Literal["logit-normal", "lognormal", "uniform", "stratified"]
Level = Literal["angle", "ratio", "none"]
Distance = Literal["l1", "smooth-l1"]


def spherify(z: Tensor, scope: Scope = "global") -> Tensor:
    """Project B×D×h×w latents to the sphere of radius √L (L = D·h·w).

    ``global``: z / sqrt(mean(z²) + eps) over all of D, h, w (the Sphere Encoder's f, one
    sphere for the whole latent). ``token``: the same over D at each grid position, so
    every token lies on a sphere of radius √D (a product of spheres; total norm √L)."""
    return api.spherify(z, (1, 2, 3) if scope == "global" else (1,))


def corrupt(v: Tensor, sigma: Tensor, noise: Tensor, scope: Scope = "global") -> Tensor:
    """f(v + σ·e) per sample (σ: B); the same ``noise`` e is passed for v_noisy and
    v_NOISY, so both move along one direction and differ only in how far."""
    return spherify(v + sigma.view(-1, 1, 1, 1).to(v.dtype) * noise, scope)


def sigma_max_of(max_noise: float, unit: Literal["angle", "sigma"]) -> float:
    """σmax from the config: an angle in degrees (σmax = tan θmax: e ~ N(0, I_L) is
    nearly orthogonal to v with norm ≈ √L, so angle(v, f(v + σe)) ≈ atan σ for any L),
    or σmax given directly."""
    return math.tan(math.radians(max_noise)) if unit == "angle" else float(max_noise)


def sample_radii(n: int, dist: NoiseDist, mean: float, std: float, sigma_max: float, device: torch.device,
                 generator: torch.Generator | None = None) -> Tensor:
    """n noise radii r in [0, 1]; the training noise is σ = r·σmax.

    * ``uniform``: r ~ U(0, 1) (the Sphere Encoder paper).
    * ``stratified``: the official Sphere Encoder code: n − 2 strata (i + u)/(n − 2)
      plus one r = 0 and one r = 1, shuffled (n ≥ 3).
    * ``logit-normal``: r = sigmoid(mean + std·N(0, 1)). This is how spheregen reads the
      paper's "LogNorm(μ, s)": the same (−0.4, 1.0) pair is MeanFlow's logit-normal
      time sampler, and a positive μ moves mass to high noise ("better coverage of
      noisy spherical latents"), which is what the paper reports as best.
    * ``lognormal``: the literal reading, σ = exp(mean + std·N(0, 1)), clipped to
      σmax (r = σ/σmax). With μ = ±0.4 its median angle is ~34-56°, far below θmax.
    """
    if dist == "uniform":
        return torch.rand(n, device=device, generator=generator)
    if dist == "logit-normal":
        return torch.sigmoid(mean + std * torch.randn(n, device=device, generator=generator))
    if dist == "lognormal":
        sigma = torch.exp(mean + std * torch.randn(n, device=device, generator=generator))
        return (sigma / sigma_max).clamp(max=1.0)
    if dist == "stratified":
        return api.stratified_unit_radii(n, device, generator)
    raise ValueError(f"unknown noise_dist {dist!r}")


def noise_level(sigma: Tensor, kind: Level, sigma_max: float) -> Tensor:
    """What the denoiser receives for noise σ, in [0, 1] (1 = most noise):
    ``angle``: atan(σ)/(π/2), the angle between v and f(v + σe) as a fraction of 90°;
    ``ratio``: σ/σmax (the Sphere Encoder's r); ``none``: 0 (no noise conditioning)."""
    if kind == "angle":
        return torch.atan(sigma) / (math.pi / 2)
    if kind == "ratio":
        return (sigma / sigma_max).clamp(0.0, 1.0)
    if kind == "none":
        return torch.zeros_like(sigma)
    raise ValueError(f"unknown noise level kind {kind!r}")


def distance(pred: Tensor, target: Tensor, kind: Distance = "l1") -> Tensor:
    """Mean over every element and the batch: |pred − target| or smooth-L1 (β = 1)."""
    if kind == "l1":
        return F.l1_loss(pred, target)
    return F.smooth_l1_loss(pred, target, beta=1.0)


def cosine_loss(pred: Tensor, target: Tensor, scope: Scope = "global") -> Tensor:
    """mean(1 − cos(pred, target)): per sample over the flattened latent (``global``)
    or per token over D (``token``), then averaged."""
    if scope == "global":
        cos = F.cosine_similarity(pred.flatten(1), target.flatten(1), dim=1, eps=1e-6)
    else:
        cos = F.cosine_similarity(pred, target, dim=1, eps=1e-6)
    return (1.0 - cos).mean()
