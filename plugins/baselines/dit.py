"""``dit``: a DiT/SiT-style transformer denoiser on a grid of latent tokens.

Input B×D×h×w (D-channel tokens on an h×w grid, what a tokenizer's ``latent_shape``
describes); a p×p patch embedding over the grid (p = 1 or 2 in practice), a fixed 2-D
sin-cos position embedding, pre-norm blocks with AdaLN-Zero modulation, and a zero-init
final layer, so an untrained model outputs exactly 0.

Conditioning ``c = T(noise_level) [+ T2(noise_level2)] + Y(label)``:

* ``noise_level`` is a float in [0, 1] per sample, 0 = clean, 1 = pure noise. It is
  embedded as sinusoids of ``time_scale · noise_level`` (frequencies 1 down to 1e-4,
  256 features) followed by an MLP. ``time_scale = 1`` (default) is SiT's convention
  (t in [0, 1] fed as is); 1000 is DiT's (integer timesteps 0..999). Keep 1 for
  MeanFlow: its JVP target contains ∂u/∂t, and the fast features of a large scale
  make that derivative, and training, unstable (measured on tiny runs).
* ``noise_level2`` is a second time input with its own embedder, added to ``c``; it
  exists only with ``time_inputs = 2``. MeanFlow passes the interval length ``t - r``
  there (the (t, t - r) conditioning of Geng et al.).
* ``labels`` index a table of ``num_classes + 1`` rows; the last row is the null class.
  ``labels=None`` means all-null; ``drop`` (bool B) maps chosen samples to the null
  class, which is how a method applies label dropout or builds a CFG batch.

Attention is ``F.scaled_dot_product_attention`` by default; ``attention="explicit"``
computes softmax(QKᵀ/√d)V with plain matmuls, which forward-mode AD (``torch.func.jvp``,
needed by MeanFlow) can differentiate, unlike the fused kernels.

Capabilities (spheregen.interfaces): NullMaskDenoiser (``drop``),
ExplicitAttentionDenoiser (``attention``), CheckpointableBlocks (its blocks, for
``train.activation_checkpointing``), and TwoTimeDenoiser when ``time_inputs = 2``.

Built by :func:`build_dit` from ``ctx.data``, which for a denoiser describes the tensors
it sees: channels = D and image_size = h (= w). A latent method therefore builds its
denoiser for a :class:`~spheregen.api.DataSpec` made from its tokenizer's
``latent_shape`` (:func:`spheregen.api.build_latent_denoiser`).
"""

from __future__ import annotations

import math
from typing import Literal

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spheregen.api import BuildContext, at_least_one, sincos_pos_embed_2d

Attention = Literal["sdpa", "explicit"]

# name -> (width, depth, heads), the DiT paper's sizes.
PRESETS: dict[str, tuple[int, int, int]] = {
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "XL": (1152, 28, 16),
}


@attrs.frozen(kw_only=True)
class DiTConfig:
    """DiT/SiT-style transformer. ``size`` picks a preset (S 384/12/6, B 768/12/12,
    L 1024/24/16, XL 1152/28/16 as width/depth/heads); ``width``, ``depth``, ``heads``
    given explicitly override the preset's value. ``patch_size`` patchifies the latent
    grid; ``time_inputs = 2`` adds the second time embedder (MeanFlow); ``time_scale``
    multiplies noise levels before the sinusoidal embedding (1: SiT, 1000: DiT)."""

    size: Literal["S", "B", "L", "XL"] = "S"
    width: int | None = attrs.field(default=None, validator=at_least_one)
    depth: int | None = attrs.field(default=None, validator=at_least_one)
    heads: int | None = attrs.field(default=None, validator=at_least_one)
    patch_size: int = attrs.field(default=2, validator=attrs.validators.ge(1))
    mlp_ratio: float = attrs.field(default=4.0, validator=attrs.validators.gt(0.0))
    time_inputs: Literal[1, 2] = 1
    time_scale: float = attrs.field(default=1.0, validator=attrs.validators.gt(0.0))

    def __attrs_post_init__(self) -> None:
        width, _, heads = self.dims()
        if width % heads or width % 4:
            raise ValueError(f"width {width} must be divisible by heads ({heads}) and by 4 (2-D sin-cos positions)")

    @classmethod
    def tiny(cls) -> "DiTConfig":
        """A few-thousand-parameter model for tests."""
        return cls(width=32, depth=1, heads=2)

    def dims(self) -> tuple[int, int, int]:
        """(width, depth, heads) after applying the overrides to the preset."""
        w, d, h = PRESETS[self.size]
        return (self.width or w, self.depth or d, self.heads or h)


# ------------------------------------------------------------------ embeddings


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """B floats -> B×dim: [cos(t·f_i), sin(t·f_i)] with f_i = max_period^(-i/(dim/2))."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=t.dtype) / half)
    args = t[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimeEmbedder(nn.Module):
    """noise level in [0, 1] -> width, via sinusoids of ``scale · level`` and an MLP."""

    def __init__(self, width: int, scale: float, freq_dim: int = 256):
        super().__init__()
        self.scale = scale
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, level: Tensor) -> Tensor:
        return self.mlp(timestep_embedding(level * self.scale, self.freq_dim))


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


# ------------------------------------------------------------------ blocks


class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor, attention: Attention = "sdpa") -> Tensor:
        b, n, w = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        if attention == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v)
        elif attention == "explicit":
            weights = torch.softmax((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5, dim=-1)
            out = weights @ v
        else:
            raise ValueError(f"attention must be 'sdpa' or 'explicit', got {attention!r}")
        return self.proj(out.transpose(1, 2).reshape(b, n, w))


class DiTBlock(nn.Module):
    """x += g1·Attn(mod(LN x)); x += g2·MLP(mod(LN x)); shifts, scales and gates come
    from the conditioning through a zero-init linear (AdaLN-Zero: identity at init)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(width, heads)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(self, x: Tensor, c: Tensor, attention: Attention) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c).chunk(6, dim=-1)
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1), attention)
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    def __init__(self, width: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.linear = nn.Linear(width, out_dim)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.ada(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


# ------------------------------------------------------------------ model


class DiT(nn.Module):
    """Transformer denoiser on B×D×h×w latents (h = w); output has the input's shape."""

    def __init__(
        self,
        *,
        channels: int,
        grid: int,
        num_classes: int,
        width: int,
        depth: int,
        heads: int,
        patch_size: int = 2,
        mlp_ratio: float = 4.0,
        time_inputs: int = 1,
        time_scale: float = 1.0,
    ):
        super().__init__()
        if grid % patch_size:
            raise ValueError(
                f"dit: latent grid {grid}×{grid} is not divisible by patch_size {patch_size}; "
                "use patch_size 1 or a size that divides the grid"
            )
        self.channels, self.grid, self.patch_size = channels, grid, patch_size
        self.num_classes = num_classes
        self.time_inputs = time_inputs
        self.embed = nn.Conv2d(channels, width, patch_size, stride=patch_size)
        self.register_buffer("pos", sincos_pos_embed_2d(width, grid // patch_size)[None], persistent=False)
        self.time = TimeEmbedder(width, time_scale)
        self.time2 = TimeEmbedder(width, time_scale) if time_inputs == 2 else None
        self.label = nn.Embedding(num_classes + 1, width)
        self.blocks = nn.ModuleList(DiTBlock(width, heads, mlp_ratio) for _ in range(depth))
        self.final = FinalLayer(width, patch_size**2 * channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """DiT init: Xavier linears with zero bias, N(0, 0.02) label table and time
        MLPs, and zero AdaLN and output layers, so every block starts as the identity
        and the model outputs 0."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.embed.weight.view(self.embed.weight.shape[0], -1))
        nn.init.zeros_(self.embed.bias)
        nn.init.normal_(self.label.weight, std=0.02)
        for emb in (self.time, self.time2):
            if emb is not None:
                nn.init.normal_(emb.mlp[0].weight, std=0.02)
                nn.init.normal_(emb.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.ada[-1].weight)
            nn.init.zeros_(block.ada[-1].bias)
        for layer in (self.final.ada[-1], self.final.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def checkpoint_blocks(self) -> list[nn.Module]:
        """The transformer blocks, whose activations ``train.activation_checkpointing``
        recomputes in the backward pass."""
        return list(self.blocks)

    def label_index(self, labels: Tensor | None, batch: int, drop: Tensor | None, device: torch.device) -> Tensor:
        """Row of the label table per sample: the label, or ``num_classes`` (null) where
        ``labels`` is None, ``drop`` is True, or the data has no classes."""
        null = torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
        if labels is None or self.num_classes == 0:
            return null
        labels = labels.to(device=device, dtype=torch.long)
        return labels if drop is None else torch.where(drop.to(device), null, labels)

    def forward(
        self,
        x: Tensor,
        noise_level: Tensor,
        labels: Tensor | None,
        noise_level2: Tensor | None = None,
        *,
        drop: Tensor | None = None,
        attention: Attention = "sdpa",
    ) -> Tensor:
        """x: B×D×h×w, noise_level: B or scalar in [0, 1] (1 = pure noise), labels: B
        int64 or None, noise_level2: B or scalar (only with ``time_inputs = 2``), drop:
        B bool (True -> null class) -> B×D×h×w."""
        b = x.shape[0]
        level = torch.as_tensor(noise_level, dtype=x.dtype, device=x.device).expand(b)
        c = self.time(level) + self.label(self.label_index(labels, b, drop, x.device))
        if self.time2 is not None:
            if noise_level2 is None:
                raise ValueError("this dit has time_inputs = 2: pass noise_level2")
            c = c + self.time2(torch.as_tensor(noise_level2, dtype=x.dtype, device=x.device).expand(b))
        elif noise_level2 is not None:
            raise ValueError("noise_level2 given to a dit with time_inputs = 1; set time_inputs = 2 in its config")
        tokens = self.embed(x).flatten(2).transpose(1, 2) + self.pos
        for block in self.blocks:
            tokens = block(tokens, c, attention)
        return self.unpatchify(self.final(tokens, c))

    def unpatchify(self, tokens: Tensor) -> Tensor:
        """B×N×(p²·D) -> B×D×h×w (inverse of the p×p patch embedding's layout)."""
        b, p, g = tokens.shape[0], self.patch_size, self.grid // self.patch_size
        x = tokens.reshape(b, g, g, p, p, self.channels)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(b, self.channels, g * p, g * p)


def build_dit(cfg: DiTConfig, ctx: BuildContext) -> DiT:
    """DiT/SiT-style AdaLN-Zero transformer on the token grid described by ctx.data."""
    width, depth, heads = cfg.dims()
    return DiT(
        channels=ctx.data.channels,
        grid=ctx.data.image_size,
        num_classes=ctx.data.num_classes,
        width=width,
        depth=depth,
        heads=heads,
        patch_size=cfg.patch_size,
        mlp_ratio=cfg.mlp_ratio,
        time_inputs=cfg.time_inputs,
        time_scale=cfg.time_scale,
    )
