"""The ``sphere`` sampler: the official few-step loop (SPEC A9, ``G.generate``).

1. x = D(f(e0)) (1 step).
2. T-1 times: z = E(x) (latent CFG before f); z = f(f(z) + r·tanθmax·e); x = D(z)
   (pixel CFG, clamped). e is a draw different from e0, reused at every step when
   ``cache_noise``; r = 1, or 1 - t/T with the linear scheduler.

The sampler only calls the method's ``encode_raw``, ``decode`` and ``spherify`` and reads
``latent_shape``, ``sigma_max`` and ``conditional``; it never changes train/eval mode.
The loop runs under ``torch.inference_mode``; the returned images are ordinary tensors.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from spheregen.interfaces import check_steps
from spheregen_plugins.sphere_encoder.config import SphereSamplerConfig


def lerp(a: Tensor, b: Tensor, w: float) -> Tensor:
    """a + w(b - a): the guided value for unconditional a and conditional b."""
    return a + w * (b - a)


class SphereSampler:
    """Multi-step encode/re-noise/decode on the sphere (the Sphere Encoder's own loop)."""

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
        return steps * (2 if w_dec != 1.0 else 1) + (steps - 1) * (2 if w_enc != 1.0 else 1)

    def _encode(self, method: Any, x: Tensor, labels: Tensor, w: float) -> Tensor:
        z = method.encode_raw(x, labels)
        if w != 1.0:
            z = lerp(method.encode_raw(x, None), z, w)
        return z

    def _decode(self, method: Any, z: Tensor, labels: Tensor, w: float) -> Tensor:
        x = method.decode(z, labels)
        if w != 1.0:
            x = lerp(method.decode(z, None), x, w).clamp(-1.0, 1.0)
        return x

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
        ref = next(method.parameters())
        shape = (labels.shape[0], *method.latent_shape)
        labels = labels.to(ref.device)
        w_enc, w_dec = self.guidance_weights(guidance)

        def noise() -> Tensor:
            # Drawn where the generator lives, so a CPU generator gives the same samples
            # on every device.
            where = generator.device if generator is not None else ref.device
            return torch.randn(shape, generator=generator, device=where).to(ref.device, ref.dtype)

        # Inference mode (no version counters or view tracking: ~3% less CPU time at the
        # tiny size); the output is made outside it, so callers get an ordinary tensor.
        with torch.inference_mode():
            x = self._decode(method, method.spherify(noise()), labels, w_dec)
            refine = noise() if steps > 1 else None
            for t in range(1, steps):
                if not self.cfg.cache_noise and t > 1:
                    refine = noise()
                r = 1.0 if self.cfg.scheduler == "none" else 1.0 - t / steps
                z = method.spherify(self._encode(method, x, labels, w_enc))
                z = method.spherify(z + r * method.sigma_max * refine)
                x = self._decode(method, z, labels, w_dec)
        return x.clamp(-1.0, 1.0).float()


def build_sampler(cfg: SphereSamplerConfig, ctx: Any) -> SphereSampler:
    """Sphere Encoder multi-step loop: decode f(noise), then encode, re-noise on the sphere, decode."""
    return SphereSampler(cfg)
