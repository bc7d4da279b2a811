"""``sphere-latent``: the Sphere Latent Encoder (Do, Nguyen, Li, arXiv 2605.15592).

A frozen tokenizer (default ``rae``) maps images to latents z (B×D×h×w); a denoiser G
(default the ``dit`` transformer, SiT-style) is trained on the sphere of the latent space
and predicts the clean latent. The tokenizer decoder runs once, after the last step.

Training, per sample (all draws independent per sample)::

    z = tokenizer.encode(x)                     # frozen, no grad
    v = f(z)                                    # onto the sphere of radius √L
    r ~ noise_dist, σ = r·σmax,  s ~ U(0, sub_noise_max),  σ_sub = s·σ
    e ~ N(0, I)                                 # ONE draw for both noise levels
    v_NOISY = f(v + σ·e),  v_noisy = f(v + σ_sub·e)
    ẑ_N, ẑ_n = G([v_NOISY, v_noisy], [level(σ), level(σ_sub)], [y, y])   # one 2B pass
    L_recon = recon_l1·‖ẑ_n − target‖₁ + recon_cos·(1 − cos(ẑ_n, target))
    L_cons  = cons_l1 ·‖ẑ_N − sg(ẑ_n)‖₁ + cons_cos ·(1 − cos(ẑ_N, sg(ẑ_n)))

The paper leaves these open (SPEC B); spheregen's choices, each a config key where it
is a real choice:

* **Sphere** (``sphere = "global"``): one sphere over the whole D×h×w latent with the
  Sphere Encoder's f, radius √L. It keeps the angle ↔ σ relation (angle ≈ atan σ) exact
  in the dimension of the whole latent, and is what "project onto the hypersphere"
  means in the Sphere Encoder. ``"token"`` (a sphere per token, radius √D) is offered
  because RAE/DINOv2 tokens are LayerNormed per token, so their norms are already
  nearly equal and a per-token sphere loses less information.
* **Target** (``target = "raw"``): G predicts the (normalised) tokenizer latent z, the
  paper's equations literally; the last prediction is decoded as is, so the decoder
  sees latents of the scale it was trained on. Between steps the prediction is
  projected before noise is added. ``"sphere"`` predicts f(z) instead.
* **Noise parametrisation** (``max_noise = 85``, ``max_noise_unit = "angle"``): σmax =
  tan θmax as the Sphere Encoder (85° its default at 256 px), so the knob is
  independent of the latent dimension; ``max_noise_unit = "sigma"`` gives σmax directly.
  Small latents want a larger θmax: the clean signal left at θ is √L/tan θ noise
  standard deviations, so at L = 2048 (MNIST) 85° leaves 4 and sampling from pure
  noise starts out of distribution; 88° measured clearly better there (README).
* **Noise distribution** (``noise_dist = "logit-normal"``, mean +0.4, std 1.0): the
  paper's best ablation "LogNorm(+0.4, 1.0)", read as r = sigmoid(N(μ, s)) on the noise
  radius r = σ/σmax (see :func:`sphere.sample_radii` for why, and the literal
  ``"lognormal"`` σ = exp(N(μ, s)) reading, also offered); ``uniform`` is r ~ U(0, 1),
  ``stratified`` the official Sphere Encoder's draw. σ_sub = s·σ, s ~ U(0, 0.5).
* **Noise level given to G** (``noise_level = "angle"``): atan(σ)/(π/2) ∈ [0, 1], the
  geometric angle of the corruption as a fraction of 90°, 1 = pure noise (the spheregen
  denoiser convention); ``"ratio"`` gives r = σ/σmax, ``"none"`` a constant 0 (G must
  infer the noise, like the Sphere Encoder's decoder).
* **Losses**: true L1 (mean over elements; ``distance = "smooth-l1"`` gives the Sphere
  Encoder's Huber) and 1 − cosine over the flattened latent per sample
  (``cosine_scope``), unit weights as in the paper's equations. The consistency target
  is ``sg(G(v_noisy))``, detached before the loss, so no gradient flows into it.
* **Conditioning**: label dropout ``label_dropout = 0.1`` maps a sample to the
  denoiser's null class (its ``drop`` mask, or a split batch for a denoiser with only
  ``forward(x, noise_level, labels)``: :func:`spheregen.api.call_denoiser`); the v_noisy and v_NOISY copies of a sample share the drop, so
  the consistency pairs are always under the same condition. ``conditional = false``
  trains and samples with the null class only (the paper's unconditional Animal Faces
  model, on a dataset that has labels).

Sampling is the ``sphere-latent`` sampler (plugins/sphere_latent/sampler.py).
"""

from __future__ import annotations

from typing import Any, Literal

import attrs
import torch
from torch import Tensor

from spheregen.api import BuildContext, Component, TokenizerDenoiserMethod, build_latent_denoiser, call_denoiser
from spheregen.api import component_field, fraction, guided, make_component, non_negative, positive, to_floats

from . import sphere
from .sphere import Distance, Level, NoiseDist, Scope

# RAEConfig.tiny()'s sizes, spelled out: a plugin never imports another plugin's modules.
TINY_RAE = dict(patch=4, latent_dim=8, encoder_width=32, encoder_depth=1, encoder_heads=2, encoder_steps=2,
                decoder_width=32, decoder_depth=1, decoder_heads=2, decoder_steps=2, batch_size=8)


@attrs.frozen(kw_only=True)
class SphereLatentConfig:
    """Sphere Latent Encoder: a denoiser trained on the sphere of a frozen tokenizer's
    latent space with reconstruction + consistency losses (L1 + cosine)."""

    tokenizer: Component = component_field("tokenizer", "rae")
    denoiser: Component = component_field("denoiser", "dit")
    sphere: Scope = "global"
    target: Literal["raw", "sphere"] = "raw"
    max_noise: float = attrs.field(default=85.0, validator=positive)
    max_noise_unit: Literal["angle", "sigma"] = "angle"
    noise_dist: NoiseDist = "logit-normal"
    noise_mean: float = 0.4
    noise_std: float = attrs.field(default=1.0, validator=positive)
    sub_noise_max: float = attrs.field(default=0.5, validator=fraction)
    noise_level: Level = "angle"
    distance: Distance = "l1"
    cosine_scope: Scope = "global"
    recon_l1: float = attrs.field(default=1.0, validator=non_negative)
    recon_cos: float = attrs.field(default=1.0, validator=non_negative)
    cons_l1: float = attrs.field(default=1.0, validator=non_negative)
    cons_cos: float = attrs.field(default=1.0, validator=non_negative)
    label_dropout: float = attrs.field(default=0.1, validator=fraction)
    conditional: bool = True

    def __attrs_post_init__(self) -> None:
        if self.max_noise_unit == "angle" and not self.max_noise < 90.0:
            raise ValueError(f"'max_noise' is an angle in degrees (max_noise_unit = \"angle\"): it must be in "
                             f"(0, 90), got {self.max_noise}")

    @classmethod
    def tiny(cls) -> "SphereLatentConfig":
        """A second-scale configuration for contract tests."""
        return cls(tokenizer=make_component("tokenizer", "rae", **TINY_RAE),
                   denoiser=make_component("denoiser", "dit", width=32, depth=1, heads=2, patch_size=1))


class SphereLatent(TokenizerDenoiserMethod):
    """The Sphere Latent Encoder method: ``loss`` for training; ``denoise`` and the
    sphere helpers for the sampler."""

    default_sampler = "sphere-latent"

    def __init__(self, cfg: SphereLatentConfig, tokenizer: Any, denoiser: torch.nn.Module, num_classes: int):
        super().__init__(tokenizer, denoiser, cfg.label_dropout, "sphere-latent")
        self.cfg = cfg
        self.sigma_max = sphere.sigma_max_of(cfg.max_noise, cfg.max_noise_unit)
        # An unconditional model (conditional = false, or data without classes) always
        # gets the null class, in training and in sampling.
        self.num_classes = num_classes if cfg.conditional else 0

    # ---------------------------------------------------------------- sphere helpers

    def spherify(self, z: Tensor) -> Tensor:
        return sphere.spherify(z, self.cfg.sphere)

    def level(self, sigma: Tensor) -> Tensor:
        """The denoiser's noise_level input (B) for noise σ (B)."""
        return sphere.noise_level(sigma, self.cfg.noise_level, self.sigma_max)

    def denoise(self, v: Tensor, sigma: Tensor | float, labels: Tensor | None, guidance: float = 1.0) -> Tensor:
        """G(v) for spherical latents v (B×D×h×w) at noise σ (B or scalar); with
        ``guidance > 1`` one 2B pass gives ẑ_u + w·(ẑ_c − ẑ_u)."""
        level = self.level(torch.as_tensor(sigma, dtype=v.dtype, device=v.device).expand(v.shape[0]))
        if guidance > 1.0 and (labels is None or self.num_classes == 0):
            raise ValueError("classifier-free guidance > 1 needs a class-conditional model and labels; "
                             "set guidance = 1.0 for unconditional data")
        return guided(self.denoiser, v, (level,), labels, guidance)

    # ---------------------------------------------------------------- training

    def sample_sigmas(self, batch: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """(σ, σ_sub), each B: σ = r·σmax with r from ``noise_dist``; σ_sub = s·σ."""
        cfg = self.cfg
        r = sphere.sample_radii(batch, cfg.noise_dist, cfg.noise_mean, cfg.noise_std, self.sigma_max, device)
        s = torch.rand(batch, device=device) * cfg.sub_noise_max
        sigma = r * self.sigma_max
        return sigma, s * sigma

    def corrupt_pair(self, z: Tensor, sigma: Tensor, sigma_sub: Tensor, noise: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(v, v_NOISY, v_noisy) from latents z with ONE shared noise draw."""
        v = self.spherify(z)
        return v, sphere.corrupt(v, sigma, noise, self.cfg.sphere), sphere.corrupt(v, sigma_sub, noise, self.cfg.sphere)

    def latent_loss(self, latents: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, float]]:
        b = latents.shape[0]
        sigma, sigma_sub = self.sample_sigmas(b, latents.device)
        noise = torch.randn_like(latents)
        if self.num_classes == 0:
            return self.loss_on(latents, None, sigma, sigma_sub, noise, None)
        return self.loss_on(latents, labels, sigma, sigma_sub, noise, self.label_drop_mask(b, latents.device))

    def loss_on(self, z: Tensor, labels: Tensor | None, sigma: Tensor, sigma_sub: Tensor, noise: Tensor,
                drop: Tensor | None) -> tuple[Tensor, dict[str, float]]:
        """The loss on one explicit draw (latents, σ, σ_sub, noise, drop mask)."""
        v, v_big, v_small = self.corrupt_pair(z, sigma, sigma_sub, noise)
        both = torch.cat([v_big, v_small])
        levels = torch.cat([self.level(sigma), self.level(sigma_sub)])
        labels2 = torch.cat([labels, labels]) if labels is not None else None
        drop2 = torch.cat([drop, drop]) if drop is not None else None
        pred_big, pred_small = call_denoiser(self.denoiser, both, levels, labels2, drop2).chunk(2)
        target = z if self.cfg.target == "raw" else v
        return self.combine(pred_big, pred_small, target)

    def combine(self, pred_big: Tensor, pred_small: Tensor, target: Tensor) -> tuple[Tensor, dict[str, float]]:
        """L_recon(ẑ_n, target) + L_cons(ẑ_N, sg(ẑ_n)) from the two predictions."""
        cfg = self.cfg
        anchor = pred_small.detach()
        terms = {
            "recon_l1": sphere.distance(pred_small, target, cfg.distance),
            "recon_cos": sphere.cosine_loss(pred_small, target, cfg.cosine_scope),
            "cons_l1": sphere.distance(pred_big, anchor, cfg.distance),
            "cons_cos": sphere.cosine_loss(pred_big, anchor, cfg.cosine_scope),
        }
        loss = sum(getattr(cfg, k) * t for k, t in terms.items())
        return loss, to_floats({**terms, "loss": loss})


def build_sphere_latent(cfg: SphereLatentConfig, ctx: BuildContext) -> SphereLatent:
    """Sphere Latent Encoder: denoiser on the sphere of a frozen tokenizer's latents."""
    tokenizer = ctx.build("tokenizer", cfg.tokenizer)
    denoiser = build_latent_denoiser(ctx, cfg.denoiser, tuple(tokenizer.latent_shape))
    return SphereLatent(cfg, tokenizer, denoiser, ctx.data.num_classes)
