"""What the latent baselines share: building a frozen tokenizer and a denoiser sized to
its latents, time sampling and the RAE time shift, label dropout.

Denoiser sizing: a denoiser factory reads ``ctx.data`` as the description of the
tensors it will see. For a latent method that is the token grid, not the image, so the
method builds its denoiser with a copy of ``ctx`` whose :class:`DataSpec` has
``channels = D`` and ``image_size = h`` from the tokenizer's ``latent_shape`` (D, h, h).
``ctx.build`` passes the core's own ``ctx`` to nested factories, so the denoiser is built
through the registry with that copy (:func:`build_latent_denoiser`).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import attrs
import torch
from torch import Tensor, nn

from spheregen.config import Component
from spheregen.interfaces import BuildContext, DataSpec
from spheregen.plugins import registries

TimeSampling = Literal["uniform", "logit-normal"]


# ------------------------------------------------------------------ config validators


def unit_fraction(_inst: Any, attribute: attrs.Attribute, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"'{attribute.name}' must be in [0, 1], got {value}")


def positive(_inst: Any, attribute: attrs.Attribute, value: float | None) -> None:
    if value is not None and value <= 0:
        raise ValueError(f"'{attribute.name}' must be > 0, got {value}")


def shift_spec(_inst: Any, attribute: attrs.Attribute, value: float | str) -> None:
    if value != "auto" and (isinstance(value, str) or value <= 0):
        raise ValueError(f"'{attribute.name}' must be a number > 0 or \"auto\", got {value!r}")


# ------------------------------------------------------------------ time


def sample_unit_time(
    n: int, kind: TimeSampling, mean: float, std: float, device: torch.device, generator: torch.Generator | None = None
) -> Tensor:
    """n values in (0, 1): uniform, or sigmoid(N(mean, std)) (logit-normal)."""
    if kind == "uniform":
        return torch.rand(n, device=device, generator=generator)
    if kind == "logit-normal":
        return torch.sigmoid(mean + std * torch.randn(n, device=device, generator=generator))
    raise ValueError(f"time sampling must be 'uniform' or 'logit-normal', got {kind!r}")


def shift_noise_level(level: Tensor, shift: float) -> Tensor:
    """RAE's dimension-dependent shift on a noise level n (1 = pure noise):
    n' = s·n / (1 + (s − 1)·n). Monotone, fixes 0 and 1, s = 1 is the identity, and
    s > 1 moves time toward noise (high-dimensional latents need more of it)."""
    return shift * level / (1 + (shift - 1) * level)


def resolve_time_shift(spec: float | str, latent_shape: tuple[int, ...]) -> float:
    """``"auto"`` -> sqrt(latent_dim / 4096) (RAE), a number -> itself."""
    if spec == "auto":
        return math.sqrt(math.prod(latent_shape) / 4096)
    return float(spec)


# ------------------------------------------------------------------ building


def latent_data_spec(latent_shape: tuple[int, ...], num_classes: int) -> DataSpec:
    """The DataSpec a denoiser on (D, h, h) latents is built with."""
    if len(latent_shape) != 3 or latent_shape[1] != latent_shape[2]:
        raise ValueError(f"latent denoisers need a square (D, h, h) latent grid, got latent_shape {latent_shape}")
    return DataSpec(image_size=latent_shape[1], channels=latent_shape[0], num_classes=num_classes)


def build_latent_denoiser(ctx: BuildContext, component: Component, latent_shape: tuple[int, ...]) -> nn.Module:
    """Build ``component`` (a denoiser) for the latent grid ``latent_shape``."""
    sub = attrs.evolve(ctx, data=latent_data_spec(latent_shape, ctx.data.num_classes))
    return registries()["denoiser"].build(component.name, component.config, sub)


# ------------------------------------------------------------------ base method


class LatentMethod(nn.Module):
    """A frozen tokenizer plus a trained denoiser on its latents.

    The tokenizer is frozen (no gradients, kept in eval mode); ``encode`` runs without
    autograd, so a runner may equally feed cached latents to ``latent_loss``.
    """

    default_sampler: str
    time_shift: float = 1.0

    def __init__(self, tokenizer: Any, denoiser: nn.Module, label_dropout: float, method: str):
        super().__init__()
        if getattr(tokenizer, "trainable", False):
            raise ValueError(f"{method} trains only its denoiser: it needs a frozen tokenizer (trainable = False)")
        self.tokenizer = tokenizer
        self.denoiser = denoiser
        self.label_dropout = label_dropout
        if isinstance(tokenizer, nn.Module):
            tokenizer.requires_grad_(False)
            tokenizer.eval()

    def train(self, mode: bool = True) -> "LatentMethod":
        super().train(mode)
        if isinstance(self.tokenizer, nn.Module):
            self.tokenizer.eval()
        return self

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(self.tokenizer.latent_shape)

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """B×C×H×W in [-1, 1] -> B×latent_shape."""
        return self.tokenizer.encode(images)

    def decode(self, latents: Tensor) -> Tensor:
        """B×latent_shape -> B×C×H×W (not clamped)."""
        return self.tokenizer.decode(latents)

    @torch.no_grad()
    def reconstruct(self, images: Tensor, labels: Tensor | None = None) -> Tensor:
        """The tokenizer's round trip decode(encode(x)), B×C×H×W in [-1, 1] (rFID/PSNR)."""
        return self.decode(self.encode(images)).clamp(-1, 1)

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": [p for p in self.denoiser.parameters() if p.requires_grad], "lr_scale": 1.0}]

    def label_drop_mask(self, batch: int, device: torch.device) -> Tensor:
        """B bool, True with probability ``label_dropout`` (those samples train the null class)."""
        return torch.rand(batch, device=device) < self.label_dropout

    def loss(self, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, float]]:
        return self.latent_loss(self.encode(images), labels)

    def latent_loss(self, latents: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, float]]:
        raise NotImplementedError
