"""``haar``: a one-level orthonormal Haar wavelet tokenizer (frozen, exactly invertible)."""

from __future__ import annotations

import attrs
import torch
from torch import Tensor

from spheregen.api import BuildContext


@attrs.frozen(kw_only=True)
class HaarConfig:
    """Orthonormal 2×2 Haar transform: C×H×W -> 4C×H/2×W/2, exactly invertible."""


class HaarTokenizer:
    """One-level orthonormal Haar wavelet tokenizer (frozen, lossless).

    Images B×C×H×W in [-1, 1] <-> latents B×4C×H/2×W/2: the average, horizontal,
    vertical and diagonal detail of each 2×2 block, each scaled by 1/2 (orthonormal)."""

    trainable = False  # frozen: latent methods train only their denoiser
    # the LosslessTokenizer capability: decode(encode(x)) == x (up to float rounding, which
    # the uint8 samples remove), so evaluation reports no rFID/PSNR row for it
    lossless = True

    def __init__(self, cfg: HaarConfig, ctx: BuildContext):
        size, c = ctx.data.image_size, ctx.data.channels
        if size % 2:
            raise ValueError(f"haar tokenizer needs an even image_size, got {size}")
        self.latent_shape = (4 * c, size // 2, size // 2)

    def encode(self, images: Tensor) -> Tensor:
        a, b = images[..., 0::2, 0::2], images[..., 0::2, 1::2]
        c, d = images[..., 1::2, 0::2], images[..., 1::2, 1::2]
        return torch.cat([a + b + c + d, a - b + c - d, a + b - c - d, a - b - c + d], dim=1) / 2

    def decode(self, latents: Tensor) -> Tensor:
        s, h, v, d = latents.chunk(4, dim=1)
        out = torch.empty((*s.shape[:-2], s.shape[-2] * 2, s.shape[-1] * 2), dtype=s.dtype, device=s.device)
        out[..., 0::2, 0::2] = (s + h + v + d) / 2
        out[..., 0::2, 1::2] = (s - h + v - d) / 2
        out[..., 1::2, 0::2] = (s + h - v - d) / 2
        out[..., 1::2, 1::2] = (s - h - v + d) / 2
        return out
