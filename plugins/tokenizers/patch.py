"""The ``patch`` tokenizer: pixels as tokens.

Space-to-depth with patch ``p``: a B×C×H×W image becomes a B×(C·p²)×(H/p)×(W/p) grid of
tokens, and ``decode`` is its exact inverse (a permutation of values, no arithmetic).
``p = 1`` is the identity, which is how pixel-space baselines use a latent method.
Nothing is trained (``trainable = False``), so a runner may cache its latents.
"""

from __future__ import annotations

import attrs
import torch.nn.functional as F
from torch import Tensor, nn

from spheregen.api import BuildContext, at_least_one


@attrs.frozen(kw_only=True)
class PatchConfig:
    """Pixels as tokens: space-to-depth with ``patch_size`` (1 = identity)."""

    patch_size: int = attrs.field(default=1, validator=at_least_one)


class PatchTokenizer(nn.Module):
    """Space-to-depth tokenizer; an ``nn.Module`` without parameters so that it moves
    with its method and appears in module summaries."""

    trainable = False
    lossless = True  # a reshape: its reconstruction is exact, so no rFID/PSNR is reported

    def __init__(self, *, channels: int, image_size: int, patch_size: int = 1):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(
                f"patch tokenizer: image size {image_size} is not divisible by patch_size "
                f"{patch_size}; pick a patch size that divides it or change data.image_size"
            )
        self.channels = channels
        self.image_size = image_size
        self.patch_size = patch_size
        grid = image_size // patch_size
        self.latent_shape = (channels * patch_size**2, grid, grid)

    def encode(self, images: Tensor) -> Tensor:
        """B×C×H×W -> B×(C·p²)×(H/p)×(W/p); channel index c·p² + i·p + j holds pixel
        (c, i, j) of each p×p patch."""
        _, c, h, w = images.shape
        p = self.patch_size
        if c != self.channels or h % p or w % p:
            raise ValueError(
                f"patch tokenizer (patch_size {p}, {self.channels} channels) cannot encode "
                f"images of shape {tuple(images.shape)}: needs C = {self.channels} and H, W "
                f"divisible by {p}"
            )
        return F.pixel_unshuffle(images, p) if p > 1 else images

    def decode(self, latents: Tensor) -> Tensor:
        """B×(C·p²)×h×w -> B×C×(h·p)×(w·p), the exact inverse of :meth:`encode`."""
        if latents.shape[1] != self.latent_shape[0]:
            raise ValueError(
                f"patch tokenizer expects {self.latent_shape[0]} latent channels, got "
                f"shape {tuple(latents.shape)}"
            )
        p = self.patch_size
        return F.pixel_shuffle(latents, p) if p > 1 else latents

    def extra_repr(self) -> str:
        return f"patch_size={self.patch_size}, latent_shape={self.latent_shape}"


def build_patch(cfg: PatchConfig, ctx: BuildContext) -> PatchTokenizer:
    """Pixels as tokens: space-to-depth with patch p (frozen, exact inverse)."""
    return PatchTokenizer(channels=ctx.data.channels, image_size=ctx.data.image_size, patch_size=cfg.patch_size)
