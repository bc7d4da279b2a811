"""FLOPs counting at paper scale on the meta device: speed, and the SPEC A10 check.

The official ImageNet-L Sphere Encoder encoder (SPEC A10: 623.9 / 727.0 GFLOPs per pass
excluding / including attention) is a 24-block, width-1024 ViT over 1,024 tokens. A
plain stack of such blocks counted here must reproduce the attention share exactly
(24 · 4 · N² · D = 103.1 G) and the rest within the patch-embedding/head remainder.

    python benchmarks/bench_flops.py
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from spheregen.flops import count_flops, count_params


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(x)


def main() -> None:
    depth, dim, tokens = 24, 1024, 1024
    start = time.perf_counter()
    with torch.device("meta"):
        encoder = nn.Sequential(*(Block(dim, 16) for _ in range(depth))).eval()
        x = torch.randn(1, tokens, dim)
    built = time.perf_counter() - start
    start = time.perf_counter()
    count = count_flops(lambda: encoder(x))
    counted = time.perf_counter() - start
    params = count_params(encoder)
    spec_excl, spec_incl = 623.9e9, 727.0e9
    print(f"meta ViT-L stack: {params.total / 1e6:.0f}M params, built in {built:.2f}s, counted in {counted:.2f}s")
    print(f"true  {count.gflops('true'):7.1f} G   paper {count.gflops('paper'):7.1f} G   attention {count.attention / 1e9:6.1f} G")
    print(f"attention / SPEC A10 attention share: {count.attention / (spec_incl - spec_excl):.4f}")
    print(f"paper / SPEC A10 excluding-attention: {count.paper / spec_excl:.4f} (rest: patch embedding, head)")


if __name__ == "__main__":
    main()
