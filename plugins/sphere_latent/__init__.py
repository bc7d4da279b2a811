"""Sphere Latent Encoder (Do, Nguyen, Li, arXiv 2605.15592): a denoiser trained on the
sphere of a frozen tokenizer's latent space, sampled in a few steps with one decode.

Registers the ``sphere-latent`` method and the ``sphere-latent`` sampler. Modules:
``sphere`` (projection, noise radii and levels, decay schedules, losses), ``method``
(the trainable method; its docstring lists every design choice the paper leaves open),
``sampler`` (the few-step loop). README.md explains the choices with reasons.
"""

import spheregen
from spheregen_plugins.sphere_latent.method import SphereLatent, SphereLatentConfig, build_sphere_latent
from spheregen_plugins.sphere_latent.sampler import (
    SphereLatentSampler,
    SphereLatentSamplerConfig,
    build_sphere_latent_sampler,
)

__all__ = [
    "SphereLatent",
    "SphereLatentConfig",
    "SphereLatentSampler",
    "SphereLatentSamplerConfig",
    "build_sphere_latent",
    "build_sphere_latent_sampler",
]


@spheregen.hookimpl
def spheregen_register_methods(register):
    register("sphere-latent", build_sphere_latent, SphereLatentConfig)


@spheregen.hookimpl
def spheregen_register_samplers(register):
    register("sphere-latent", build_sphere_latent_sampler, SphereLatentSamplerConfig)
