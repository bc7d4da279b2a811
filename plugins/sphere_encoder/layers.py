"""Building blocks of the Sphere Encoder's ViTs (SPEC A5).

Tokens are B×N×W in row-major grid order (token index = row·grid + col). Conditioning
``c`` is the class embedding B×1×W, or None for an unconditional model (then blocks have
no modulation and unit gates, and heads are plain Linears).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import RmsNorm
from torch import Tensor, nn

NORM_EPS = 1e-6
ROPE_THETA = 10000.0


def _sincos_1d(dim: int, pos: Tensor) -> Tensor:
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    out = pos.double().flatten()[:, None] * omega[None]
    return torch.cat([out.sin(), out.cos()], dim=1)


def sincos_pos_embed_2d(dim: int, grid: int) -> Tensor:
    """MAE-style fixed 2-D sin-cos embedding, N×dim: the first half encodes the
    column, the second half the row (MAE's meshgrid(w, h) order)."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos position embedding needs width % 4 == 0, got {dim}")
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    return torch.cat([_sincos_1d(dim // 2, cols), _sincos_1d(dim // 2, rows)], dim=1).float()


def axial_rope_2d(head_dim: int, grid: int, theta: float = ROPE_THETA) -> tuple[Tensor, Tensor]:
    """cos, sin tables (N×head_dim) of 2-D axial RoPE: the first half of the head dim
    rotates with the row, the second with the column; each half uses frequencies
    1/θ^(2i/(hd/2)), each repeated for one interleaved pair of channels."""
    if head_dim % 4:
        raise ValueError(f"2-D axial RoPE needs head_dim % 4 == 0, got {head_dim}")
    half = head_dim // 2
    freqs = 1.0 / theta ** (torch.arange(0, half, 2, dtype=torch.float64) / half)
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    ang_r = rows.flatten().double()[:, None] * freqs[None]
    ang_c = cols.flatten().double()[:, None] * freqs[None]
    angles = torch.cat([ang_r, ang_c], dim=1).repeat_interleave(2, dim=1)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: B×H×N×hd; rotates each interleaved pair (x0, x1) -> (x0 c - x1 s, x1 c + x0 s)."""
    pairs = x.unflatten(-1, (-1, 2))
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


class SwiGLU(nn.Module):
    """w3(silu(a)·b) with [a, b] = w12(x): one fused input projection (timm's SwiGLU
    splits it in two Linears, whose Xavier init would differ from the official one)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


class Attention(nn.Module):
    """Non-causal multi-head self-attention with qkv bias and 2-D RoPE on q and k.
    The product stays in ``F.scaled_dot_product_attention`` so FLOP counters can
    report attention separately."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
        b, n, w = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, w))


class Block(nn.Module):
    """Pre-norm ViT block with AdaLN-Zero: x += g1·Attn(mod(norm x)); x += g2·MLP(mod(norm x))."""

    def __init__(self, dim: int, heads: int, conditional: bool):
        super().__init__()
        self.norm1 = RmsNorm(dim, eps=NORM_EPS)
        self.attn = Attention(dim, heads)
        self.norm2 = RmsNorm(dim, eps=NORM_EPS)
        self.mlp = SwiGLU(dim, int(dim * 8 / 3))
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim)) if conditional else None

    def forward(self, x: Tensor, c: Tensor | None, rope: tuple[Tensor, Tensor]) -> Tensor:
        if self.adaLN is None:
            x = x + self.attn(self.norm1(x), rope)
            return x + self.mlp(self.norm2(x))
        sh1, sc1, g1, sh2, sc2, g2 = self.adaLN(c).chunk(6, dim=-1)
        x = x + g1 * self.attn(modulate(self.norm1(x), sh1, sc1), rope)
        return x + g2 * self.mlp(modulate(self.norm2(x), sh2, sc2))


class ModulatedLinear(nn.Module):
    """Output head: RMSNorm + AdaLN shift/scale (no gate) + Linear when conditional,
    a plain Linear otherwise (the official unconditional head has no final norm)."""

    def __init__(self, dim: int, out: int, conditional: bool):
        super().__init__()
        self.norm = RmsNorm(dim, eps=NORM_EPS) if conditional else None
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim)) if conditional else None
        self.linear = nn.Linear(dim, out)

    def forward(self, x: Tensor, c: Tensor | None) -> Tensor:
        if self.adaLN is not None:
            shift, scale = self.adaLN(c).chunk(2, dim=-1)
            x = modulate(self.norm(x), shift, scale)
        return self.linear(x)


class LabelEmbedder(nn.Module):
    """Class table with num_classes + 1 rows; row num_classes is the null class. In
    training each label is replaced by the null class with probability ``dropout``,
    drawn anew at every call (so E, D and the lat-con E pass drop independently)."""

    def __init__(self, num_classes: int, dim: int, dropout: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout = dropout
        self.table = nn.Embedding(num_classes + 1, dim)

    def forward(self, labels: Tensor | None, batch: int) -> Tensor:
        device = self.table.weight.device
        if labels is None:
            labels = torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
        else:
            labels = labels.to(device=device, dtype=torch.long)
            if labels.shape != (batch,):
                raise ValueError(f"labels must have shape ({batch},), got {tuple(labels.shape)}")
            if self.training and self.dropout > 0:
                drop = torch.rand(batch, device=device) < self.dropout
                labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.table(labels)


class MixerBlock(nn.Module):
    """x += α1·TokenMix(norm x); x += α2·ChanMix(norm x); α are scalars starting at 0,
    so a fresh mixer is the identity (followed by the mixer's final norm)."""

    def __init__(self, tokens: int, dim: int):
        super().__init__()
        self.norm1 = RmsNorm(dim, eps=NORM_EPS)
        self.token_mix = nn.Sequential(nn.Linear(tokens, tokens), nn.SiLU(), nn.Linear(tokens, tokens))
        self.norm2 = RmsNorm(dim, eps=NORM_EPS)
        self.channel_mix = nn.Sequential(nn.Linear(dim, 2 * dim), nn.SiLU(), nn.Linear(2 * dim, dim))
        self.alpha1 = nn.Parameter(torch.zeros(()))
        self.alpha2 = nn.Parameter(torch.zeros(()))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.alpha1 * self.token_mix(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.alpha2 * self.channel_mix(self.norm2(x))


class Mixer(nn.Module):
    """MLP-Mixer blocks then a per-token RMSNorm (affine optional)."""

    def __init__(self, tokens: int, dim: int, depth: int, affine: bool):
        super().__init__()
        self.blocks = nn.ModuleList(MixerBlock(tokens, dim) for _ in range(depth))
        self.norm = RmsNorm(dim, eps=NORM_EPS, affine=affine)

    def forward(self, x: Tensor) -> Tensor:
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)
