"""Network pieces more than one plugin needs."""

from __future__ import annotations

import torch
from torch import Tensor


def sincos_pos_embed_2d(width: int, grid: int, columns_first: bool = False) -> Tensor:
    """N×width fixed MAE-style 2-D sin-cos position embedding (N = grid², row-major
    tokens): half the channels encode the row, half the column, each as [sin, cos] over
    width/4 frequencies 1/10000^(i/(width/4)). ``columns_first`` puts the column half
    first (MAE's own order, which the Sphere Encoder's checkpoints use)."""
    if width % 4:
        raise ValueError(f"2-D sin-cos position embedding needs width divisible by 4, got {width}")
    quarter = width // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    coords = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")

    def embed(pos: Tensor) -> Tensor:
        args = pos.reshape(-1, 1) * omega[None]
        return torch.cat([torch.sin(args), torch.cos(args)], dim=1)

    halves = (cols, rows) if columns_first else (rows, cols)
    return torch.cat([embed(h) for h in halves], dim=1).float()
