"""Pixel-space Sphere Encoder (Yue et al., arXiv 2602.15030), after the official code.

Registers the ``sphere-encoder`` method and its ``sphere`` sampler. Modules:
``sphere`` (f, noise radii, hard cases), ``layers`` / ``networks`` (the ViTs),
``losses``, ``method`` (the trainable method), ``sampler`` (the few-step loop),
``editing`` (reconstruction, interpolation, class manipulation).
"""

import spheregen
from spheregen_plugins.sphere_encoder.config import SphereEncoderConfig, SphereSamplerConfig
from spheregen_plugins.sphere_encoder.method import SphereEncoder, build_method
from spheregen_plugins.sphere_encoder.sampler import SphereSampler, build_sampler

__all__ = [
    "SphereEncoder",
    "SphereEncoderConfig",
    "SphereSampler",
    "SphereSamplerConfig",
    "build_method",
    "build_sampler",
]


@spheregen.hookimpl
def spheregen_register_methods(register):
    register("sphere-encoder", build_method, SphereEncoderConfig)


@spheregen.hookimpl
def spheregen_register_samplers(register):
    register("sphere", build_sampler, SphereSamplerConfig)
