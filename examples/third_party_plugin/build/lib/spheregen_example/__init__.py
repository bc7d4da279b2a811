"""A third-party spheregen plugin: a one-level Haar wavelet tokenizer.

After ``pip install ./examples/third_party_plugin`` an experiment can name it::

    [[methods]]
    name = "fm-haar"
    method = { name = "flow-matching", tokenizer = "haar" }
"""

from __future__ import annotations

import attrs
import torch

import spheregen


@attrs.frozen(kw_only=True)
class HaarConfig:
    """Orthonormal 2×2 Haar transform: C×H×W -> 4C×H/2×W/2, exactly invertible."""


class HaarTokenizer:
    trainable = False

    def __init__(self, cfg: HaarConfig, ctx):
        size, c = ctx.data.image_size, ctx.data.channels
        if size % 2:
            raise ValueError(f"haar tokenizer needs an even image_size, got {size}")
        self.latent_shape = (4 * c, size // 2, size // 2)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        a, b = images[..., 0::2, 0::2], images[..., 0::2, 1::2]
        c, d = images[..., 1::2, 0::2], images[..., 1::2, 1::2]
        return torch.cat([a + b + c + d, a - b + c - d, a + b - c - d, a - b - c + d], dim=1) / 2

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        s, h, v, d = latents.chunk(4, dim=1)
        out = torch.empty((*s.shape[:-2], s.shape[-2] * 2, s.shape[-1] * 2), dtype=s.dtype, device=s.device)
        out[..., 0::2, 0::2] = (s + h + v + d) / 2
        out[..., 0::2, 1::2] = (s - h + v - d) / 2
        out[..., 1::2, 0::2] = (s + h - v - d) / 2
        out[..., 1::2, 1::2] = (s - h - v + d) / 2
        return out


@spheregen.hookimpl
def spheregen_register_tokenizers(register):
    register("haar", HaarTokenizer, HaarConfig)
