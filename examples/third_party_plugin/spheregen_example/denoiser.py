"""``film-conv``: a small residual conv net that implements only the minimal documented
``Denoiser`` protocol, ``forward(x, noise_level, labels)``.

No ``drop`` mask, no second time input, no attention options: the methods that use it
(``flow-matching``, ``sphere-latent``) get label dropout and classifier-free guidance
from the toolkit's ``call_denoiser`` / ``guided``, which split a batch into its
conditional rows and its null-class rows (``labels=None``). That is exact because the
net treats samples independently (GroupNorm normalises each sample on its own; nothing
uses batch statistics).
"""

from __future__ import annotations

import math

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spheregen.api import BuildContext, at_least_one


@attrs.frozen(kw_only=True)
class FilmConvConfig:
    """Residual 3×3 conv blocks at the input's resolution, each modulated (FiLM scale and
    shift) by an embedding of the noise level plus a class embedding whose extra row is
    the null class. ``width`` channels, ``depth`` blocks, ``frequencies`` sin/cos pairs
    for the noise level."""

    width: int = attrs.field(default=64, validator=at_least_one)
    depth: int = attrs.field(default=2, validator=at_least_one)
    frequencies: int = attrs.field(default=16, validator=at_least_one)

    @classmethod
    def tiny(cls) -> "FilmConvConfig":
        """A second-scale net for the contract tests."""
        return cls(width=16, depth=1, frequencies=4)


class FilmBlock(nn.Module):
    """h + conv(silu(conv(silu(FiLM(GroupNorm(h)))))), FiLM from the condition vector."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.GroupNorm(math.gcd(8, width), width)
        self.film = nn.Linear(width, 2 * width)
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)

    def forward(self, h: Tensor, cond: Tensor) -> Tensor:
        scale, shift = self.film(F.silu(cond))[:, :, None, None].chunk(2, dim=1)
        y = self.conv1(F.silu(self.norm(h) * (1 + scale) + shift))
        return h + self.conv2(F.silu(y))


class FilmConvDenoiser(nn.Module):
    """Residual FiLM conv net with only the minimal forward(x, noise_level, labels).

    x: B×D×h×w, noise_level: B in [0, 1] (1 = pure noise), labels: B int64 or None (the
    null class) -> B×D×h×w. ``ctx.data`` describes the grid it runs on: the images, or a
    tokenizer's latents inside a latent method (channels = D, image_size = h)."""

    def __init__(self, cfg: FilmConvConfig, ctx: BuildContext):
        super().__init__()
        channels, width = ctx.data.channels, cfg.width
        self.null_class = ctx.data.num_classes  # the embedding's last row
        self.register_buffer("freqs", torch.exp(torch.linspace(0.0, math.log(1000.0), cfg.frequencies)),
                             persistent=False)
        self.time = nn.Sequential(nn.Linear(2 * cfg.frequencies, width), nn.SiLU(), nn.Linear(width, width))
        self.label = nn.Embedding(ctx.data.num_classes + 1, width)
        self.inp = nn.Conv2d(channels, width, 3, padding=1)
        self.blocks = nn.ModuleList(FilmBlock(width) for _ in range(cfg.depth))
        self.out = nn.Sequential(nn.GroupNorm(math.gcd(8, width), width), nn.SiLU(),
                                 nn.Conv2d(width, channels, 3, padding=1))

    def forward(self, x: Tensor, noise_level: Tensor, labels: Tensor | None) -> Tensor:
        level = torch.as_tensor(noise_level, dtype=x.dtype, device=x.device).expand(x.shape[0])
        angles = level[:, None] * self.freqs.to(x.dtype)
        rows = torch.full((x.shape[0],), self.null_class, device=x.device) if labels is None else labels
        cond = self.time(torch.cat([angles.sin(), angles.cos()], dim=1)) + self.label(rows)
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, cond)
        return self.out(h)
