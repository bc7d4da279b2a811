"""The Sphere Encoder's two ViTs (SPEC A5).

Encoder: B×C×H×W image -> raw latent B×d×h×w (h = H/P), to be spherified outside.
Decoder: B×d×h×w latent on the sphere -> B×C×H×W image in (-1, 1).
Both are class-conditional through AdaLN-Zero when ``num_classes > 0``.

For speed the encoder's patch convolutions run as matmuls on token-major patch rows and
the conv head's transposed convolution as a matmul plus ``F.fold`` (same weights, same
FLOPs, fp32-rounding-level differences); see layers.py for the blocks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spheregen.api import sincos_pos_embed_2d
from spheregen_plugins.sphere_encoder.layers import (
    Block,
    LabelEmbedder,
    Mixer,
    ModulatedLinear,
    axial_rope_2d,
    linear,
    rope_tables,
)

CONV_HEAD_CHANNELS = 32


class _ViT(nn.Module):
    """What encoder and decoder share: frozen sin-cos positions, RoPE tables, the label
    embedder, the blocks and a modulated head."""

    def __init__(self, *, grid: int, width: int, depth: int, heads: int, head_out: int,
                 num_classes: int, label_dropout: float):
        super().__init__()
        self.grid, self.width, self.heads = grid, width, heads
        self.conditional = num_classes > 0
        # A frozen Parameter (not a buffer), as the official code: it is in the
        # checkpoint and in the parameter counts the papers report.
        self.pos_embed = nn.Parameter(sincos_pos_embed_2d(width, grid, columns_first=True)[None], requires_grad=False)
        cos, sin = axial_rope_2d(width // heads, grid)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.label_embed = LabelEmbedder(num_classes, width, label_dropout) if self.conditional else None
        self.blocks = nn.ModuleList(Block(width, heads, self.conditional) for _ in range(depth))
        self.head = ModulatedLinear(width, head_out, self.conditional)

    def condition(self, labels: Tensor | None, batch: int, drop: Tensor | None = None) -> Tensor | None:
        """B×1×W class embedding (None when unconditional); ``drop``: LabelEmbedder.forward's."""
        if self.label_embed is None:
            return None
        return self.label_embed(labels, batch, drop).unsqueeze(1)

    def checkpoint_blocks(self) -> list[nn.Module]:
        """The transformer blocks (``train.activation_checkpointing``)."""
        return list(self.blocks)

    def run_blocks(self, tokens: Tensor, c: Tensor | None) -> Tensor:
        rope = rope_tables(self.rope_cos, self.rope_sin, self.heads, tokens)
        for blk in self.blocks:
            tokens = blk(tokens, c, rope)
        return self.head(tokens, c)

    def init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        if self.label_embed is not None:
            nn.init.normal_(self.label_embed.table.weight, std=0.02)
        for m in self.modules():
            if isinstance(m, (Block, ModulatedLinear)) and m.adaLN is not None:
                nn.init.zeros_(m.adaLN[-1].weight)
                nn.init.zeros_(m.adaLN[-1].bias)
        # Zero heads: at init the encoder emits the all-zero latent and the decoder
        # mid-gray (tanh 0).
        nn.init.zeros_(self.head.linear.weight)
        nn.init.zeros_(self.head.linear.bias)


class Encoder(_ViT):
    """Conv P×P/P (no bias) -> 1×1 conv -> +pos -> blocks -> head to d -> mixer(d)."""

    def __init__(self, *, image_size: int, channels: int, patch: int, latent_dim: int, width: int,
                 depth: int, heads: int, mixer_depth: int, mixer_affine: bool, num_classes: int,
                 label_dropout: float):
        grid = image_size // patch
        super().__init__(grid=grid, width=width, depth=depth, heads=heads, head_out=latent_dim,
                         num_classes=num_classes, label_dropout=label_dropout)
        self.latent_dim = latent_dim
        self.patch_embed = nn.Conv2d(channels, width, patch, stride=patch, bias=False)
        self.patch_proj = nn.Conv2d(width, width, 1)
        self.mixer = Mixer(grid * grid, latent_dim, mixer_depth, mixer_affine) if mixer_depth else nn.Identity()
        self.init_weights()

    def init_weights(self) -> None:
        super().init_weights()
        for conv in (self.patch_embed, self.patch_proj):
            nn.init.xavier_uniform_(conv.weight.view(conv.weight.shape[0], -1))
        nn.init.zeros_(self.patch_proj.bias)

    def embed_patches(self, x: Tensor) -> Tensor:
        """patch_proj(patch_embed(x)) as tokens B×N×W: both convs are matmuls over
        non-overlapping patches (P×P/P, then 1×1), run as two ``mm`` on the B·N patch
        rows, token-major from the start (same FLOPs; ~25% faster than the convs and
        the transpose on CPU)."""
        b, c, size = x.shape[0], x.shape[1], x.shape[-1]
        g, p = self.grid, size // self.grid
        patches = x.reshape(b, c, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(b * g * g, c * p * p)
        tokens = linear(patches, self.patch_embed.weight.view(self.width, -1))
        tokens = linear(tokens, self.patch_proj.weight.view(self.width, self.width), self.patch_proj.bias)
        return tokens.view(b, g * g, self.width)

    def forward(self, x: Tensor, labels: Tensor | None = None, drop: Tensor | None = None) -> Tensor:
        b = x.shape[0]
        tokens = self.embed_patches(x) + self.pos_embed
        tokens = self.mixer(self.run_blocks(tokens, self.condition(labels, b, drop)))
        return tokens.transpose(1, 2).reshape(b, self.latent_dim, self.grid, self.grid)


class Decoder(_ViT):
    """Linear(d -> W) -> mixer(W) -> +pos -> blocks -> head -> pixels -> tanh.

    ``head='linear'``: P²·C values per token, unpatchify, Conv3×3 (reflect).
    ``head='conv'``: 32 channels per token, Conv3×3 (reflect), SiLU,
    ConvTranspose(k = P+2, stride P, pad 1)."""

    def __init__(self, *, image_size: int, channels: int, patch: int, latent_dim: int, width: int,
                 depth: int, heads: int, mixer_depth: int, mixer_affine: bool, num_classes: int,
                 label_dropout: float, head: str):
        grid = image_size // patch
        head_out = patch * patch * channels if head == "linear" else CONV_HEAD_CHANNELS
        super().__init__(grid=grid, width=width, depth=depth, heads=heads, head_out=head_out,
                         num_classes=num_classes, label_dropout=label_dropout)
        self.patch, self.channels, self.head_kind = patch, channels, head
        self.embed = nn.Linear(latent_dim, width)
        self.mixer = Mixer(grid * grid, width, mixer_depth, mixer_affine) if mixer_depth else nn.Identity()
        if head == "linear":
            self.pixel = nn.Conv2d(channels, channels, 3, padding=1, padding_mode="reflect")
        elif head == "conv":
            self.pixel = nn.Sequential(
                nn.Conv2d(CONV_HEAD_CHANNELS, CONV_HEAD_CHANNELS, 3, padding=1, padding_mode="reflect"),
                nn.SiLU(),
                nn.ConvTranspose2d(CONV_HEAD_CHANNELS, channels, patch + 2, stride=patch, padding=1),
            )
        else:
            raise ValueError(f"decoder head must be 'linear' or 'conv', got {head!r}")
        self.init_weights()

    def init_weights(self) -> None:
        super().init_weights()
        nn.init.normal_(self.embed.weight, std=1.0)
        for m in self.pixel.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.xavier_uniform_(m.weight, gain=0.01)
                nn.init.zeros_(m.bias)

    def forward(self, z: Tensor, labels: Tensor | None = None, drop: Tensor | None = None) -> Tensor:
        b = z.shape[0]
        tokens = self.mixer(linear(z.flatten(2).transpose(1, 2), self.embed.weight, self.embed.bias)) + self.pos_embed
        tokens = self.run_blocks(tokens, self.condition(labels, b, drop))
        g, p = self.grid, self.patch
        if self.head_kind == "linear":
            img = tokens.view(b, g, g, p, p, self.channels).permute(0, 5, 1, 3, 2, 4)
            img = img.reshape(b, self.channels, g * p, g * p)
            return torch.tanh(self.pixel(img))
        img = tokens.transpose(1, 2).reshape(b, CONV_HEAD_CHANNELS, g, g)
        conv, act, up = self.pixel
        return torch.tanh(conv_transpose_fold(act(conv(img)), up))


def conv_transpose_fold(x: Tensor, conv: nn.ConvTranspose2d) -> Tensor:
    """``conv(x)`` for a plain ConvTranspose2d (groups 1, dilation 1, no output padding)
    as a batched matmul to per-pixel k×k output patches and their overlap-add
    (``F.fold``, col2im): the same FLOPs, about 3× faster than the CPU transposed
    convolution at the conv head's size (32 -> 3 channels, k = P+2, stride P)."""
    plain = conv.groups == 1 and conv.dilation == (1, 1) and conv.output_padding == (0, 0)
    if not plain or conv.padding_mode != "zeros":
        return conv(x)
    b, cin, h, w = x.shape
    cout, (kh, kw), (sh, sw), (ph, pw) = conv.out_channels, conv.kernel_size, conv.stride, conv.padding
    out_size = ((h - 1) * sh - 2 * ph + kh, (w - 1) * sw - 2 * pw + kw)
    # cols[b, (o, i, j), l] = Σ_c weight[c, o, i, j] · x[b, c, l]
    weight = conv.weight.reshape(cin, cout * kh * kw).t()
    cols = torch.bmm(weight.expand(b, -1, -1), x.reshape(b, cin, h * w))
    out = F.fold(cols, out_size, (kh, kw), stride=(sh, sw), padding=(ph, pw))
    return out if conv.bias is None else out + conv.bias.to(out.dtype).view(1, cout, 1, 1)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())

