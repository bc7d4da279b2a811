"""``flow-matching``: the multi-step baseline (SiT / rectified flow) on tokenizer latents.

Convention (SiT): noise at t = 0, data at t = 1,

    x_t = t·x1 + (1 − t)·x0,   x1 = latent of the image, x0 ~ N(0, I),
    loss = mean ‖v(x_t, t, y) − (x1 − x0)‖²,

so sampling integrates dx/dt = v from t = 0 to t = 1. The denoiser is given the noise
level ``1 − t`` (1 = pure noise), the convention every spheregen denoiser shares.

Time sampling is written on the noise level n = 1 − t, the coordinate in which the
papers state their recipes (SD3/RAE/MeanFlow put noise at 1): n ~ U(0, 1) or
sigmoid(N(mean, std)), then RAE's shift n' = s·n/(1 + (s − 1)·n), then t = 1 − n'.
So ``logit_normal_mean`` values from those papers apply unchanged, and a positive mean
means more noise. ``time_shift = "auto"`` is s = sqrt(latent_dim / 4096); the samplers
use the same shift on their grid.

Label dropout maps a random ``label_dropout`` fraction of the batch to the null class
(the denoiser's ``drop`` mask, or a split batch for a denoiser without one:
:func:`spheregen.api.call_denoiser`), which trains the unconditional velocity CFG needs.
Any denoiser with the minimal ``forward(x, noise_level, labels)`` fits.
"""

from __future__ import annotations

from typing import Literal

import attrs
import torch
from torch import Tensor

from spheregen.api import (
    BuildContext,
    Component,
    TokenizerDenoiserMethod,
    build_latent_denoiser,
    call_denoiser,
    component_field,
    fraction,
    make_component,
    positive,
    shift_noise_level,
)

from .common import TimeSampling, resolve_time_shift, sample_unit_time, shift_spec


@attrs.frozen(kw_only=True)
class FlowMatchingConfig:
    """Flow matching (SiT convention, data at t = 1) with a frozen tokenizer and a
    denoiser on its latents; noise-level sampling ``uniform`` or ``logit-normal``
    (``logit_normal_mean``/``_std`` on the noise level), optional RAE ``time_shift``
    (a number, or ``"auto"`` = sqrt(latent_dim/4096))."""

    tokenizer: Component = component_field("tokenizer", "patch")
    denoiser: Component = component_field("denoiser", "dit")
    label_dropout: float = attrs.field(default=0.1, validator=fraction)
    time_sampling: TimeSampling = "uniform"
    logit_normal_mean: float = 0.0
    logit_normal_std: float = attrs.field(default=1.0, validator=positive)
    time_shift: float | Literal["auto"] = attrs.field(default=1.0, validator=shift_spec)

    @classmethod
    def tiny(cls) -> "FlowMatchingConfig":
        """A tiny denoiser, for tests."""
        return cls(denoiser=make_component("denoiser", "dit", width=32, depth=1, heads=2))


class FlowMatching(TokenizerDenoiserMethod):
    """Flow-matching method: ``loss`` for training, ``velocity`` for the samplers."""

    default_sampler = "euler"

    def __init__(self, cfg: FlowMatchingConfig, tokenizer, denoiser):
        super().__init__(tokenizer, denoiser, cfg.label_dropout, "flow-matching")
        self.cfg = cfg
        self.time_shift = resolve_time_shift(cfg.time_shift, self.latent_shape)

    def velocity(self, x_t: Tensor, t: Tensor | float, labels: Tensor | None, drop: Tensor | None = None) -> Tensor:
        """dx/dt at time t (B or scalar, data at 1); labels None = null class; ``drop``
        (B bool) sends chosen samples to the null class."""
        t = torch.as_tensor(t, dtype=x_t.dtype, device=x_t.device).expand(x_t.shape[0])
        return call_denoiser(self.denoiser, x_t, 1 - t, labels, drop)

    def sample_time(self, batch: int, device: torch.device) -> Tensor:
        """B times t in (0, 1), data at 1 (see the module docstring)."""
        level = sample_unit_time(batch, self.cfg.time_sampling, self.cfg.logit_normal_mean, self.cfg.logit_normal_std, device)
        return 1 - shift_noise_level(level, self.time_shift)

    def latent_loss(self, latents: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, float]]:
        b = latents.shape[0]
        noise = torch.randn_like(latents)
        t = self.sample_time(b, latents.device)
        return self.loss_on(latents, noise, t, labels, self.label_drop_mask(b, latents.device))

    def loss_on(
        self, x1: Tensor, x0: Tensor, t: Tensor, labels: Tensor | None, drop: Tensor | None
    ) -> tuple[Tensor, dict[str, float]]:
        """The loss on one explicit draw (data x1, noise x0, times t, drop mask)."""
        tt = t.view(-1, *([1] * (x1.dim() - 1)))
        x_t = tt * x1 + (1 - tt) * x0
        loss = torch.mean((self.velocity(x_t, t, labels, drop) - (x1 - x0)) ** 2)
        return loss, {"loss": loss.item()}


def build_flow_matching(cfg: FlowMatchingConfig, ctx: BuildContext) -> FlowMatching:
    """Flow matching (SiT/rectified flow) on frozen-tokenizer latents; Euler/Heun sampling."""
    tokenizer = ctx.build("tokenizer", cfg.tokenizer)
    denoiser = build_latent_denoiser(ctx, cfg.denoiser, tuple(tokenizer.latent_shape))
    return FlowMatching(cfg, tokenizer, denoiser)
