"""The ``sphere`` sampler: the official few-step loop (SPEC A9, ``G.generate``).

1. x = D(f(e0)) (1 step).
2. T-1 times: z = E(x) (latent CFG before f); z = f(f(z) + r·tanθmax·e); x = D(z)
   (pixel CFG, clamped). e is a draw different from e0, reused at every step when
   ``cache_noise``; r = 1, or 1 - t/T with the linear scheduler.

The sampler only calls what ``requires`` declares (SphereAutoencoderMethod); it never
changes train/eval mode. Guidance is the toolkit's :func:`~spheregen.api.guided` (a
conditional and a ``labels=None`` pass per guided side), noise the toolkit's
(:func:`~spheregen.api.noise`). The loop runs under ``torch.inference_mode``; the
returned images are ordinary tensors.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from spheregen.api import SphereAutoencoderMethod, cfg_passes, check_steps, decay, guided, noise, reference_parameter
from spheregen_plugins.sphere_encoder.config import SphereSamplerConfig


class SphereSampler:
    """Multi-step encode/re-noise/decode on the sphere (the Sphere Encoder's own loop)."""

    requires = (SphereAutoencoderMethod,)

    def __init__(self, cfg: SphereSamplerConfig):
        self.cfg = cfg

    def guidance_weights(self, guidance: float) -> tuple[float, float]:
        """(latent w, pixel w); 1 means that side is unguided. combo uses √w on each."""
        if guidance <= 1.0:
            return 1.0, 1.0
        pos = self.cfg.cfg_position
        if pos == "enc":
            return guidance, 1.0
        if pos == "dec":
            return 1.0, guidance
        root = math.sqrt(guidance)
        return root, root

    def nfe(self, steps: int, guidance: float = 1.0) -> int:
        """Network passes per image: T decoder + T-1 encoder, each side doubled when guided."""
        check_steps(steps)
        w_enc, w_dec = self.guidance_weights(guidance)
        return steps * cfg_passes(w_dec) + (steps - 1) * cfg_passes(w_enc)

    @staticmethod
    def _decode(method: Any, z: Tensor, labels: Tensor, w: float) -> Tensor:
        """D(z) guided by w; a guided image is clamped back to [-1, 1]."""
        x = guided(method.decode, z, (), labels, w)
        return x.clamp(-1.0, 1.0) if w > 1.0 else x

    @torch.no_grad()
    def sample(
        self,
        method: Any,
        labels: Tensor,
        steps: int,
        guidance: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """labels int64 B -> images B×C×H×W in [-1, 1], in ``nfe(steps, guidance)``
        network passes per image."""
        check_steps(steps)
        if guidance > 1.0 and not method.conditional:
            raise ValueError(
                f"guidance {guidance} needs a class-conditional model; this Sphere Encoder is "
                "unconditional (set guidance = 1.0)"
            )
        ref = reference_parameter(method)
        shape = (labels.shape[0], *method.latent_shape)
        labels = labels.to(ref.device)
        w_enc, w_dec = self.guidance_weights(guidance)

        # Inference mode (no version counters or view tracking: ~3% less CPU time at the
        # tiny size); the output is made outside it, so callers get an ordinary tensor.
        with torch.inference_mode():
            x = self._decode(method, method.spherify(noise(shape, generator, ref)), labels, w_dec)
            refine = noise(shape, generator, ref) if steps > 1 else None
            for t in range(1, steps):
                if not self.cfg.cache_noise and t > 1:
                    refine = noise(shape, generator, ref)
                r = decay(t, steps, self.cfg.scheduler)
                z = method.spherify(guided(method.encode_raw, x, (), labels, w_enc))
                z = method.spherify(z + r * method.sigma_max * refine)
                x = self._decode(method, z, labels, w_dec)
        return x.clamp(-1.0, 1.0).float()


def build_sampler(cfg: SphereSamplerConfig, ctx: Any) -> SphereSampler:
    """Sphere Encoder multi-step loop: decode f(noise), then encode, re-noise on the sphere, decode."""
    return SphereSampler(cfg)
