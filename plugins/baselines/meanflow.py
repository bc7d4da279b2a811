"""``meanflow``: the 1-NFE baseline (MeanFlow, Geng et al. 2025) on tokenizer latents.

Convention (the paper's, opposite to ``flow-matching``): noise at t = 1, data at t = 0,

    z_t = (1 − t)·x + t·ε,   v = ε − x,

and the network u(z, r, t) predicts the average velocity over [r, t], so a step from t
to r < t is z_r = z_t − (t − r)·u(z_t, r, t). Training uses the MeanFlow identity

    (u, du/dt) = jvp(u, (z_t, r, t), (v, 0, 1)),  target = sg(v − (t − r)·du/dt),
    loss = mean_b  ‖Δ_b‖² / sg((‖Δ_b‖² + c)^p),   Δ = u − target,

with ‖Δ_b‖² summed over the latent of sample b (the paper's adaptive weight; p = 0 gives
the plain squared error). The JVP runs the denoiser with explicit softmax attention:
forward-mode AD has no rule for the fused SDPA kernels.

Times: t and r are two draws (logit-normal(−0.4, 1) by default), ordered so r ≤ t;
then all but a ``r_neq_t_fraction`` of the samples get r = t (plain flow matching in
this convention). The denoiser sees noise level t and, as its second time input, the
interval t − r, so it needs the TwoTimeDenoiser capability (``dit`` with
``time_inputs = 2``, the default here): a denoiser without it is refused when the method
is built. A null-class mask is optional (:func:`spheregen.api.call_denoiser`); explicit
attention is asked for in the JVP when the denoiser offers it (ExplicitAttentionDenoiser).

Guidance: CFG-free training with label dropout (the unconditional u is trained on the
null class); the ``meanflow`` sampler can apply plain CFG to u at sampling time at
2× the NFE. The paper's guided training target is not implemented.

``velocity`` exposes the instantaneous velocity in the flow-matching convention
(−u(z, τ, τ) at τ = 1 − t), so the Euler and Heun samplers also run on a MeanFlow model.
"""

from __future__ import annotations

import attrs
import torch
from torch import Tensor

from spheregen.api import (
    BuildContext,
    Component,
    ConfigError,
    ExplicitAttentionDenoiser,
    TokenizerDenoiserMethod,
    TwoTimeDenoiser,
    build_latent_denoiser,
    call_denoiser,
    component_field,
    fraction,
    has,
    make_component,
    non_negative,
    positive,
    require,
    to_floats,
)

from .common import TimeSampling, sample_unit_time


@attrs.frozen(kw_only=True)
class MeanFlowConfig:
    """MeanFlow (noise at t = 1): average-velocity network u(z, r, t) trained with the
    JVP target; ``r_neq_t_fraction`` of the samples have r < t, the rest r = t;
    adaptive weight 1/(‖Δ‖² + ``adaptive_c``)^``adaptive_p``. The denoiser needs two
    time inputs (dit: ``time_inputs = 2``)."""

    tokenizer: Component = component_field("tokenizer", "patch")
    denoiser: Component = attrs.field(
        factory=lambda: make_component("denoiser", "dit", time_inputs=2), metadata={"kind": "denoiser"}
    )
    label_dropout: float = attrs.field(default=0.1, validator=fraction)
    time_sampling: TimeSampling = "logit-normal"
    logit_normal_mean: float = -0.4
    logit_normal_std: float = attrs.field(default=1.0, validator=positive)
    r_neq_t_fraction: float = attrs.field(default=0.25, validator=fraction)
    adaptive_p: float = attrs.field(default=1.0, validator=non_negative)
    adaptive_c: float = attrs.field(default=1e-3, validator=positive)

    @classmethod
    def tiny(cls) -> "MeanFlowConfig":
        """A tiny denoiser, for tests."""
        return cls(denoiser=make_component("denoiser", "dit", width=32, depth=1, heads=2, time_inputs=2))


class MeanFlow(TokenizerDenoiserMethod):
    """MeanFlow method: ``loss`` for training, ``average_velocity`` for the ``meanflow``
    sampler, ``velocity`` (flow-matching convention) for Euler/Heun."""

    default_sampler = "meanflow"

    def __init__(self, cfg: MeanFlowConfig, tokenizer, denoiser):
        require(denoiser, TwoTimeDenoiser, "meanflow (it conditions its denoiser on t and t - r)",
                'Name a denoiser with two time inputs, e.g. denoiser = { name = "dit", time_inputs = 2, ... }')
        super().__init__(tokenizer, denoiser, cfg.label_dropout, "meanflow")
        self.cfg = cfg
        self.explicit_attention = has(denoiser, ExplicitAttentionDenoiser)

    def checkpoint_blocks(self) -> list[torch.nn.Module]:
        """Refused: the loss runs the denoiser inside a forward-mode JVP, whose tangents
        torch.utils.checkpoint does not replay when it recomputes a block (it then finds
        other tensors saved than in the forward pass and fails in the backward)."""
        raise ConfigError("meanflow's loss differentiates its denoiser in forward mode (torch.func.jvp), which "
                          "activation checkpointing cannot recompute; set train.activation_checkpointing = false")

    def average_velocity(
        self,
        z: Tensor,
        r: Tensor | float,
        t: Tensor | float,
        labels: Tensor | None,
        drop: Tensor | None = None,
        attention: str = "sdpa",
    ) -> Tensor:
        """u(z, r, t): the mean of dz/dτ over [r, t] (noise at 1), B×latent_shape.
        r, t: B or scalars; labels None = null class; drop: B bool -> null class;
        ``attention`` reaches a denoiser with the ExplicitAttentionDenoiser capability."""
        b = z.shape[0]
        t = torch.as_tensor(t, dtype=z.dtype, device=z.device).expand(b)
        r = torch.as_tensor(r, dtype=z.dtype, device=z.device).expand(b)
        options = {"attention": attention} if self.explicit_attention else {}
        return call_denoiser(self.denoiser, z, t, labels, drop, t - r, **options)

    def velocity(self, x_t: Tensor, t: Tensor | float, labels: Tensor | None, drop: Tensor | None = None) -> Tensor:
        """Instantaneous velocity in the flow-matching convention (data at t = 1)."""
        tau = 1 - torch.as_tensor(t, dtype=x_t.dtype, device=x_t.device).expand(x_t.shape[0])
        return -self.average_velocity(x_t, tau, tau, labels, drop)

    def u_and_dudt(
        self, z: Tensor, r: Tensor, t: Tensor, v: Tensor, labels: Tensor | None, drop: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """u(z, r, t) and its total derivative d/dt along dz/dt = v, dr/dt = 0: one
        forward-mode JVP with tangents (v, 0, 1), through explicit attention."""

        def u_fn(z_: Tensor, r_: Tensor, t_: Tensor) -> Tensor:
            return self.average_velocity(z_, r_, t_, labels, drop, attention="explicit")

        return torch.func.jvp(u_fn, (z, r, t), (v, torch.zeros_like(r), torch.ones_like(t)))

    def sample_times(self, batch: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """(r, t), B each, r <= t, r = t outside a ``r_neq_t_fraction`` of the batch."""
        cfg = self.cfg
        a, b = (sample_unit_time(batch, cfg.time_sampling, cfg.logit_normal_mean, cfg.logit_normal_std, device) for _ in range(2))
        t, r = torch.maximum(a, b), torch.minimum(a, b)
        keep = torch.rand(batch, device=device) < cfg.r_neq_t_fraction
        return torch.where(keep, r, t), t

    def latent_loss(self, latents: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, float]]:
        b = latents.shape[0]
        noise = torch.randn_like(latents)
        r, t = self.sample_times(b, latents.device)
        return self.loss_on(latents, noise, r, t, labels, self.label_drop_mask(b, latents.device))

    def loss_on(
        self, x: Tensor, noise: Tensor, r: Tensor, t: Tensor, labels: Tensor | None, drop: Tensor | None
    ) -> tuple[Tensor, dict[str, float]]:
        """The loss on one explicit draw (data x, noise, times r <= t, drop mask)."""
        shape = (-1, *([1] * (x.dim() - 1)))
        z = (1 - t.view(shape)) * x + t.view(shape) * noise
        v = noise - x

        u, dudt = self.u_and_dudt(z, r, t, v, labels, drop)
        target = (v - (t - r).view(shape) * dudt).detach()
        sq = ((u - target) ** 2).flatten(1).sum(dim=1)
        weight = 1.0 / (sq.detach() + self.cfg.adaptive_c) ** self.cfg.adaptive_p
        loss = (weight * sq).mean()
        return loss, to_floats({"loss": loss, "mse": sq.mean() / x[0].numel()})


def build_meanflow(cfg: MeanFlowConfig, ctx: BuildContext) -> MeanFlow:
    """MeanFlow (average-velocity, JVP target) on frozen-tokenizer latents; 1-NFE sampling."""
    tokenizer = ctx.build("tokenizer", cfg.tokenizer)
    denoiser = build_latent_denoiser(ctx, cfg.denoiser, tuple(tokenizer.latent_shape))
    return MeanFlow(cfg, tokenizer, denoiser)
