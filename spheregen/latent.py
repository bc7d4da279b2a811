"""Latent methods: a frozen tokenizer plus a denoiser trained on its latents.

A denoiser factory reads ``ctx.data`` as the description of the tensors it will see.
For a latent method those are the tokenizer's (D, h, h) latents, not the images, so the
method builds its denoiser with ``ctx.build("denoiser", component, data=spec)`` where
``spec`` has ``channels = D`` and ``image_size = h`` (:func:`build_latent_denoiser`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from spheregen.interfaces import BuildContext, CheckpointableBlocks, DataSpec, require


def latent_data_spec(latent_shape: tuple[int, ...], num_classes: int) -> DataSpec:
    """The DataSpec a denoiser on (D, h, h) latents is built with."""
    if len(latent_shape) != 3 or latent_shape[1] != latent_shape[2]:
        raise ValueError(f"latent denoisers need a square (D, h, h) latent grid, got latent_shape {latent_shape}")
    return DataSpec(image_size=latent_shape[1], channels=latent_shape[0], num_classes=num_classes)


def build_latent_denoiser(ctx: BuildContext, component: Any, latent_shape: tuple[int, ...]) -> nn.Module:
    """Build ``component`` (a denoiser) for the latent grid ``latent_shape``."""
    return ctx.build("denoiser", component, data=latent_data_spec(latent_shape, ctx.data.num_classes))


class TokenizerDenoiserMethod(nn.Module):
    """A frozen tokenizer plus a trained denoiser on its latents; implements
    :class:`~spheregen.interfaces.LatentMethod`,
    :class:`~spheregen.interfaces.ReconstructingMethod` and
    :class:`~spheregen.interfaces.CheckpointableBlocks` (its denoiser's). A subclass defines
    ``latent_loss`` and ``default_sampler``.

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

    def train(self, mode: bool = True) -> "TokenizerDenoiserMethod":
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

    def checkpoint_blocks(self) -> list[nn.Module]:
        """The denoiser's blocks (``train.activation_checkpointing``; the frozen tokenizer
        keeps no activations), or a ConfigError when the denoiser lists none."""
        require(self.denoiser, CheckpointableBlocks, f"activation checkpointing of {type(self).__name__}'s denoiser",
                "Use a denoiser that lists its blocks (dit does), or set train.activation_checkpointing = false")
        return self.denoiser.checkpoint_blocks()

    def label_drop_mask(self, batch: int, device: torch.device) -> Tensor:
        """B bool, True with probability ``label_dropout`` (those samples train the null class)."""
        return torch.rand(batch, device=device) < self.label_dropout

    def loss(self, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, float]]:
        return self.latent_loss(self.encode(images), labels)  # type: ignore[attr-defined]  # the subclass's
