"""``sphere-latent`` sampler: few-step generation on the latent sphere, one decode.

For T = ``steps`` ≥ 1::

    v = f(e0),  e0 ~ N(0, I)                  # start: pure noise on the sphere
    σ = σmax                                  # fed to G as the most noise it was trained on
    for t = 0 .. T−1:
        ẑ = G(v, level(σ), y)                 # CFG: ẑ_u + w·(ẑ_c − ẑ_u), one 2B pass
        if t < T−1:
            σ = r_{t+1}·σmax·noise_scale       # decayed noise, r from ``schedule``
            v = f(f(ẑ) + σ·e)                 # re-project, add noise, project
    x = tokenizer.decode(ẑ)                   # exactly once

* ``schedule``: ``linear`` r_t = 1 − t/T (the official Sphere Encoder sampling
  scheduler; the paper's "decayed noise"), ``cosine`` r_t = cos(π/2·t/T), ``none``
  r_t = 1 (the Sphere Encoder's default).
* ``cache_noise``: false (default) draws a fresh refinement direction e each step;
  true reuses one for all steps (the Sphere Encoder's eval default). e is always a
  different draw from e0. Measured on MNIST (README): at 4 steps, fresh noise lifts the
  class accuracy of samples from 0.61 to 0.76 (CFG 2), probably because re-adding one
  direction at every step accumulates its bias instead of averaging it out.
* The first step is conditioned on σmax rather than on 90° (σ = ∞): f(e0) is pure
  noise, and σmax is the largest noise the denoiser saw in training; a level it never
  saw would be extrapolation.

Cost: ``nfe(T, w)`` = T denoiser passes, ×2 when w > 1 (CFG). The single tokenizer
decode is not a denoiser evaluation and is not counted in NFE, but it is counted in the
FLOPs per image (decode + T·denoiser, ×2 under CFG for the denoiser part).
Noise follows the toolkit's convention (:func:`spheregen.api.noise`: drawn on the
generator's device, moved to the denoiser's device and dtype).
"""

from __future__ import annotations

from typing import Any

import attrs
import torch
from torch import Tensor

from spheregen.api import (
    BuildContext,
    Schedule,
    SphereDenoiserMethod,
    cfg_passes,
    check_steps,
    decay,
    noise,
    non_negative,
    reference_parameter,
)


@attrs.frozen(kw_only=True)
class SphereLatentSamplerConfig:
    """Few-step latent sphere loop: ``schedule`` of the re-added noise (linear 1 − t/T,
    cosine, none), ``cache_noise`` (one refinement direction), ``noise_scale`` × σmax."""

    schedule: Schedule = "linear"
    cache_noise: bool = False
    noise_scale: float = attrs.field(default=1.0, validator=non_negative)


class SphereLatentSampler:
    """Samples a :class:`~spheregen_plugins.sphere_latent.method.SphereLatent`."""

    requires = (SphereDenoiserMethod,)

    def __init__(self, cfg: SphereLatentSamplerConfig):
        self.cfg = cfg

    def nfe(self, steps: int, guidance: float = 1.0) -> int:
        check_steps(steps)
        return steps * cfg_passes(guidance)

    @torch.no_grad()
    def sample(self, method: Any, labels: Tensor, steps: int, guidance: float = 1.0,
               generator: torch.Generator | None = None) -> Tensor:
        """labels: B int64 -> B×C×H×W float images in [-1, 1]."""
        check_steps(steps)
        ref = reference_parameter(method.denoiser)
        shape = (len(labels), *method.latent_shape)
        labels = labels.to(ref.device) if method.num_classes > 0 else None
        v = method.spherify(noise(shape, generator, ref))
        sigma = method.sigma_max
        cached = None
        for t in range(steps):
            z_hat = method.denoise(v, sigma, labels, guidance)
            if t == steps - 1:
                break
            sigma = decay(t + 1, steps, self.cfg.schedule) * method.sigma_max * self.cfg.noise_scale
            if self.cfg.cache_noise:
                cached = cached if cached is not None else noise(shape, generator, ref)
                e = cached
            else:
                e = noise(shape, generator, ref)
            v = method.spherify(method.spherify(z_hat) + sigma * e)
        return method.decode(z_hat).clamp(-1.0, 1.0)


def build_sphere_latent_sampler(cfg: SphereLatentSamplerConfig, ctx: BuildContext) -> SphereLatentSampler:
    """Sphere Latent Encoder sampling: T denoiser steps on the latent sphere, one decode."""
    return SphereLatentSampler(cfg)
