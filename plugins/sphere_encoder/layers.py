"""Building blocks of the Sphere Encoder's ViTs (SPEC A5).

Tokens are B×N×W in row-major grid order (token index = row·grid + col). Conditioning
``c`` is the class embedding B×1×W, or None for an unconditional model (then blocks have
no modulation and unit gates, and heads are plain Linears).

Speed. At the tiny / CIFAR sizes (64 tokens, width 128) a pass over an activation costs
about as much as a matmul that produces it, so the forward passes keep the official math
but touch each activation as few times as possible (benchmarks/bench_sphere_encoder.py
measures the effect); results agree with the plain formulas to fp32 rounding:

* RMSNorm + AdaLN modulation is one reduction and two passes, ``(x·r)·(w·(1+scale)) +
  shift`` (:func:`rms_modulate`), not six;
* RoPE rotates q and k together as one complex multiply; the q/k biases are rotated on
  the small table and added in the same op, and the v bias is moved behind attention
  into the output projection's bias (softmax rows sum to 1);
* matmuls are a plain ``mm`` plus an in-place bias (:func:`linear`); on CPU the SwiGLU
  hidden layer is computed feature-major (hidden×tokens, :class:`_SwiGLUT`), because
  BLAS runs products whose output rows are the odd hidden width (341 at width 128) at
  ~60% of the rate of the feature-major ones, with its rows padded so that their stride
  is not a power of two (:data:`ROW_PAD`); token mixing is a batched matmul on B×N×D
  (no transposes), gated residuals are ``addcmul``;
* without autograd (sampling) activations are applied in place;
* with autograd (training) the norm + modulation, the gated residuals and the qkv
  projection with RoPE are autograd Functions with hand-written backward passes
  (:class:`_RmsModulate`, :class:`_GatedResidual`, :class:`_QkvRope`, :class:`_SwiGLUT`): autograd's own
  chain for them (vector_norm, mul, addcmul, slices) makes about twice as many full
  passes over the activations as the gradients need, and zero-fills full-size buffers.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from timm.layers import RmsNorm
from torch import Tensor, nn

NORM_EPS = 1e-6
ROPE_THETA = 10000.0


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
    """x: B×H×N×hd; rotates each interleaved pair (x0, x1) -> (x0 c - x1 s, x1 c + x0 s).

    The reference formula; :class:`Attention` uses it for dtypes without a complex
    counterpart (bf16, fp16) and the complex form otherwise."""
    pairs = x.unflatten(-1, (-1, 2))
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


def _no_graph() -> bool:
    """True when autograd records nothing (no_grad / inference_mode): activations may
    then be overwritten in place."""
    return not torch.is_grad_enabled()


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)`` over the last dim, as one 2-D ``mm`` and then the
    bias added in place. On CPU, ``addmm`` (what F.linear runs) first copies the
    broadcast bias into the output and then accumulates into it, which costs 10-70%
    more at these shapes than the plain ``mm`` and an ``add_``. x may be a strided
    view whose rows are contiguous."""
    rows = x.reshape(-1, x.shape[-1])
    out = torch.mm(rows, weight.t())
    if bias is not None:
        out = out.add_(bias)
    return out.view(*x.shape[:-1], weight.shape[0])


def rms_inv(x: Tensor, eps: float) -> Tensor:
    """1 / sqrt(mean(x²) + eps) over the last dim (keepdim), with mean(x²) = ‖x‖²/D from
    a single vector_norm pass (no x² temporary)."""
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return torch.rsqrt(norm.square() / x.shape[-1] + eps)


class _RmsModulate(torch.autograd.Function):
    """y = x̂·s + shift, x̂ = x·r, r = 1/sqrt(mean(x²) + eps) over the last dim.

    x: B×N×D; s is D (a norm weight) or B×1×D (AdaLN), shift B×1×D; either may be None
    (then s = 1, shift = 0). The backward is the closed form dx = r·(ĝ - x̂·mean(ĝ·x̂)),
    ĝ = dy·s, with mean(ĝ·x̂) = (dy·x̂)·s / D taken from the product that s's gradient
    needs anyway, as a matrix-vector product: five passes over x, where autograd's chain
    of vector_norm, mul and addcmul makes about ten, with full-size masked fills."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, s: Tensor | None, shift: Tensor | None, eps: float) -> Tensor:
        r = rms_inv(x, eps)
        xh = x * r
        ctx.save_for_backward(xh, r, s)
        ctx.shift_shape = None if shift is None else shift.shape
        if s is None:
            return xh if shift is None else xh + shift
        return xh * s if shift is None else torch.addcmul(shift, xh, s)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        xh, r, s = ctx.saved_tensors
        need_x, need_s, need_shift, _ = ctx.needs_input_grad
        grad_shift = grad.sum_to_size(ctx.shift_shape) if need_shift else None
        prod = grad * xh
        grad_s = prod.sum_to_size(s.shape) if need_s else None
        if not need_x:
            return None, grad_s, grad_shift, None
        if s is None:
            dot = prod.mean(-1, keepdim=True)
            return torch.addcmul(grad, xh, dot, value=-1).mul_(r), grad_s, grad_shift, None
        # Σ_d prod·s per token: B×N×D @ D×1 (or B×D×1 per sample)
        column = s.unsqueeze(-1) if s.dim() == 1 else s.transpose(-1, -2)
        dot = torch.matmul(prod, column).div_(xh.shape[-1])
        grad_x = (grad * s).addcmul_(xh, dot, value=-1).mul_(r)
        return grad_x, grad_s, grad_shift, None


class _GatedResidual(torch.autograd.Function):
    """x + g·t: a residual branch t (B×N×D) gated by g (B×1×D, or a 0-dim α).

    Same forward as ``addcmul``; autograd's addcmul backward scales by its ``value``
    (a full pass of 1·t), this one does not, and reduces α's gradient as one dot."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, g: Tensor, t: Tensor) -> Tensor:
        ctx.save_for_backward(g, t)
        return torch.addcmul(x, g, t)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        g, t = ctx.saved_tensors
        need_x, need_g, need_t = ctx.needs_input_grad
        grad_g = None
        if need_g and g.dim() == 0:
            grad_g = torch.dot(grad.reshape(-1), t.reshape(-1).to(grad.dtype))
        elif need_g:
            grad_g = (grad * t).sum_to_size(g.shape)
        grad_t = grad * g if need_t else None
        return grad if need_x else None, grad_g, grad_t


def gated_residual(x: Tensor, g: Tensor, t: Tensor) -> Tensor:
    """x + g·t with g broadcast over tokens (B×1×D) or a 0-dim scalar."""
    if _no_graph():
        return torch.addcmul(x, g, t)
    return _GatedResidual.apply(x, g, t)


def rms_norm(x: Tensor, norm: RmsNorm, affine: bool = True) -> Tensor:
    """``norm(x)`` (timm RmsNorm: x·r·w) in one reduction and one or two passes;
    ``affine=False`` leaves out w (a caller that folds it into the next weight)."""
    weight = norm.weight if affine else None
    if not _no_graph():
        return _RmsModulate.apply(x, weight, None, norm.eps)
    y = x * rms_inv(x, norm.eps)
    return y if weight is None else y.mul_(weight)


def rms_modulate(x: Tensor, norm: RmsNorm, shift: Tensor, scale: Tensor) -> Tensor:
    """``modulate(norm(x), shift, scale)`` as (x·r)·s + shift with the small per-sample
    s = w·(1 + scale): one reduction and two passes over x."""
    s = 1 + scale if norm.weight is None else norm.weight * (1 + scale)
    if _no_graph():
        return torch.addcmul(shift, x * rms_inv(x, norm.eps), s)
    return _RmsModulate.apply(x, s, shift, norm.eps)


# Feature-major activations are hidden×R with R = batch·tokens, a power of two in
# training (4,096 or 8,192 rows at the tiny size). Read transposed by BLAS (the w3 product
# and the input gradient), a row stride of a power of two maps every element of a column
# to the same cache sets: at 1 thread those two products ran 1.3-1.6× slower than with
# the rows padded by 16 floats (64 bytes; 16/R more memory, nothing else)
# (benchmarks/README.md, bench_vs_official.py).
ROW_PAD = 16


def _padded(like: Tensor, rows: int, cols: int) -> Tensor:
    """An uninitialised rows×cols view of a rows×(cols + ROW_PAD) buffer: its row stride
    is not a power of two when cols is one (the batch·token counts that are)."""
    return like.new_empty(rows, cols + ROW_PAD)[:, :cols]


def _swiglu_hidden_t(rows: Tensor, w12: Tensor, b12: Tensor, hidden: int) -> tuple[Tensor, Tensor]:
    """aᵀ, bᵀ (hidden×R each, rows padded) of [a, b] = rows·w12ᵀ + b12 (rows: R×D)."""
    both = torch.mm(w12, rows.t(), out=_padded(rows, w12.shape[0], rows.shape[0])).add_(b12.unsqueeze(1))
    return both[:hidden], both[hidden:]


class _SwiGLUT(torch.autograd.Function):
    """y = w3(silu(a)·b) + b3 with the hidden activations feature-major (hidden×R).

    On CPU BLAS a matmul whose output has R rows of hidden = int(8W/3) columns (341
    at width 128, not a multiple of the vector width) runs at about 60% of the rate
    of the same product written as w12·rowsᵀ, whose output rows are R long; the
    feature-major hidden also makes each half a block of unit-stride rows without a
    second matmul,
    and the backward's hidden gradient w3ᵀ·dyᵀ is the fast shape too
    (benchmarks/bench_vs_official.py). The backward writes d[a; b] into one buffer
    so that the input and w12 gradients are one matmul each.

    x: B×N×D; w12: 2H×D, b12: 2H; w3: D×H, b3: D -> B×N×D."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, w12: Tensor, b12: Tensor, w3: Tensor, b3: Tensor) -> Tensor:
        rows = x.reshape(-1, x.shape[-1])
        at, bt = _swiglu_hidden_t(rows, w12, b12, w3.shape[1])
        st = torch.ops.aten.silu.out(at, out=_padded(at, *at.shape))
        ht = torch.mul(st, bt, out=_padded(at, *at.shape))
        ctx.save_for_backward(rows, w12, w3, at, bt, st, ht)
        ctx.x_shape = x.shape
        return torch.mm(ht.t(), w3.t()).add_(b3).view(x.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        rows, w12, w3, at, bt, st, ht = ctx.saved_tensors
        need_x, need_w12, need_b12, need_w3, need_b3 = ctx.needs_input_grad
        gy = grad.reshape(-1, grad.shape[-1])
        # (h·dy)ᵀ rather than dyᵀ·hᵀ: the same product ~8% faster with h feature-major
        grad_w3 = torch.mm(ht, gy).t() if need_w3 else None
        grad_b3 = gy.sum(0) if need_b3 else None
        if not (need_x or need_w12 or need_b12):
            return None, None, None, grad_w3, grad_b3
        hidden = w3.shape[1]
        ght = torch.mm(w3.t(), gy.t(), out=_padded(gy, hidden, gy.shape[0]))  # H×R
        g12 = _padded(ght, 2 * hidden, ght.shape[1])
        torch.ops.aten.silu_backward.grad_input(ght * bt, at, grad_input=g12[:hidden])
        torch.mul(ght, st, out=g12[hidden:])
        grad_x = torch.mm(g12.t(), w12).view(ctx.x_shape) if need_x else None
        grad_w12 = torch.mm(g12, rows) if need_w12 else None
        grad_b12 = g12.sum(1) if need_b12 else None
        return grad_x, grad_w12, grad_b12, grad_w3, grad_b3


class SwiGLU(nn.Module):
    """w3(silu(a)·b) with [a, b] = w12(x): one fused input projection (timm's SwiGLU
    splits it in two Linears, whose Xavier init would differ from the official one)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        hidden = self.w3.in_features
        w, bias = self.w12.weight, self.w12.bias
        if _feature_major_ok(x):
            if not _no_graph():
                return _SwiGLUT.apply(x, w, bias, self.w3.weight, self.w3.bias)
            at, bt = _swiglu_hidden_t(x.reshape(-1, x.shape[-1]), w, bias, hidden)
            ht = F.silu(at, inplace=True).mul_(bt)
            return torch.mm(ht.t(), self.w3.weight.t()).add_(self.w3.bias).view(x.shape)
        # a and b as two matmuls on the halves of w12 (the same FLOPs): contiguous
        # outputs make SiLU and the product ~2× faster than on the strided halves of
        # one output.
        a, b = linear(x, w[:hidden], bias[:hidden]), linear(x, w[hidden:], bias[hidden:])
        h = F.silu(a, inplace=True).mul_(b) if _no_graph() else F.silu(a) * b
        return linear(h, self.w3.weight, self.w3.bias)


def _complex_ok(x: Tensor) -> bool:
    """The complex RoPE needs a complex dtype for x's (and, under autocast, for the
    matmul's) dtype: fp32 / fp64 without autocast."""
    if x.dtype not in (torch.float32, torch.float64):
        return False
    device = x.device.type
    return not (torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device))


def _feature_major_ok(x: Tensor) -> bool:
    """The feature-major SwiGLU is for CPU BLAS in fp32/fp64 without autocast; other
    devices and dtypes keep the row-major form (GPU GEMMs have no such odd-width
    penalty, and autocast would need the Function to cast its inputs)."""
    return x.device.type == "cpu" and _complex_ok(x)


class Rope(NamedTuple):
    """A network's RoPE tables, made once per forward and shared by its blocks: cos and
    sin (N×hd, :func:`axial_rope_2d`) and, where the complex q/k op runs (fp32 / fp64
    without autocast), their complex form ``cis`` (:func:`rope_cis`), else None. One
    table per forward rather than one per block: autograd keeps it for the backward
    once, not once per block (N·W complex numbers, 2 MB at 256 tokens and width 1024)."""

    cos: Tensor
    sin: Tensor
    cis: Tensor | None = None


def rope_tables(cos: Tensor, sin: Tensor, heads: int, x: Tensor) -> Rope:
    """:class:`Rope` for the tokens ``x`` (B×N×W) of a network with ``heads`` heads."""
    return Rope(cos, sin, rope_cis(cos, sin, heads, x.dtype) if _complex_ok(x) else None)


def rope_cis(cos: Tensor, sin: Tensor, heads: int, dtype: torch.dtype) -> Tensor:
    """The RoPE rotations as complex numbers, N×2×H×hd/2 (q and k, every head), from the
    N×hd tables: (x0 + i x1)(c + i s) = (x0 c - x1 s) + i(x1 c + x0 s) rotates each pair.
    Materialised over q/k and heads (8,192 numbers at the tiny size) rather than
    broadcast: a broadcast table makes the complex ops' inner loop hd/2 long, which ran
    them ~20% (forward) to 2× (backward) slower at 64 tokens."""
    n, half = cos.shape[0], cos.shape[1] // 2
    cis = torch.complex(cos[:, 0::2].to(dtype), sin[:, 0::2].to(dtype)).view(n, 1, 1, half)
    return cis.expand(n, 2, heads, half).contiguous()


def _qkv_rope(x: Tensor, weight: Tensor, bias_qk: Tensor, cis: Tensor, heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v (B×N×H×hd each) of the qkv projection x·Wᵀ (x: B×N×W, W: 3W×W) with the q/k
    biases (2W) added and RoPE applied (cis: N×2×H×hd/2 complex, :func:`rope_cis`); v has
    no bias.

    rope(q + b_q) = rope(q) + rope(b_q): the rotated biases (N×2×H×hd/2) are added by
    the op that rotates q and k."""
    b, n, w = x.shape
    hd = w // heads
    qkv = linear(x, weight).view(b, n, 3, heads, hd)
    bias_rot = torch.view_as_complex(bias_qk.view(2, heads, hd // 2, 2)) * cis
    qk = torch.view_as_complex(qkv[:, :, :2].unflatten(-1, (-1, 2)))
    q, k = torch.view_as_real(torch.addcmul(bias_rot, qk, cis)).flatten(-2).unbind(2)
    return q, k, qkv[:, :, 2]


class _QkvRope(torch.autograd.Function):
    """:func:`_qkv_rope` with a backward that writes the three gradients into one
    B·N×3W buffer (the q/k ones rotated back by conj(cis) in place of a copy), so the
    input and weight gradients are one matmul each. Autograd's own backward of the
    slices and views zero-fills a full-size gradient per slice and adds them up."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias_qk: Tensor, cis: Tensor,
                heads: int) -> tuple[Tensor, Tensor, Tensor]:
        ctx.save_for_backward(x, weight, cis)
        ctx.heads = heads
        return _qkv_rope(x, weight, bias_qk, cis, heads)

    @staticmethod
    def backward(ctx: Any, grad_q: Tensor | None, grad_k: Tensor | None,
                 grad_v: Tensor | None) -> tuple[Tensor | None, ...]:
        x, weight, cis = ctx.saved_tensors
        b, n, w = x.shape
        hd = w // ctx.heads
        unused = any(g is None for g in (grad_q, grad_k, grad_v))
        grads = (x.new_zeros if unused else x.new_empty)(b, n, 3, ctx.heads, hd)
        back = cis[:, 0].conj_physical()  # N×H×hd/2 (rope_cis's q half; conj rotates back)
        for i, g in enumerate((grad_q, grad_k)):
            if g is not None:
                if g.stride(-1) != 1 or g.storage_offset() % 2 or any(st % 2 for st in g.stride()[:-1]):
                    g = g.contiguous()  # view_as_complex needs whole pairs (an SDPA math backend's grads)
                out = torch.view_as_complex(grads[:, :, i].unflatten(-1, (-1, 2)))
                torch.mul(torch.view_as_complex(g.unflatten(-1, (-1, 2))), back, out=out)
        if grad_v is not None:
            grads[:, :, 2].copy_(grad_v)
        rows = grads.view(b * n, 3 * w)
        need_x, need_w, need_b, _, _ = ctx.needs_input_grad
        grad_x = torch.mm(rows, weight).view(b, n, w) if need_x else None
        grad_w = torch.mm(rows.t(), x.reshape(b * n, w)) if need_w else None
        grad_b = rows[:, : 2 * w].sum(0) if need_b else None
        return grad_x, grad_w, grad_b, None, None


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

    def forward(self, x: Tensor, rope: Rope) -> Tensor:
        b, n, w = x.shape
        h, hd = self.heads, w // self.heads
        if not _complex_ok(x):
            q, k, v = self.qkv(x).view(b, n, 3, h, hd).permute(2, 0, 3, 1, 4)
            q, k = apply_rope(q, rope.cos, rope.sin), apply_rope(k, rope.cos, rope.sin)
            out = F.scaled_dot_product_attention(q, k, v)
            return self.proj(out.transpose(1, 2).reshape(b, n, w))
        cis = rope.cis
        if cis is None or cis.dtype != x.dtype.to_complex():  # a table made for other tokens
            cis = rope_cis(rope.cos, rope.sin, h, x.dtype)
        weight, bias_qk = self.qkv.weight, self.qkv.bias[: 2 * w]  # the v bias is folded in below
        if _no_graph():
            q, k, v = _qkv_rope(x, weight, bias_qk, cis, h)
        else:
            q, k, v = _QkvRope.apply(x, weight, bias_qk, cis, h)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)
        # softmax rows sum to 1, so attention to v + b_v is attention to v, plus b_v;
        # proj(o + b_v) = proj(o) + W_proj·b_v.
        proj_bias = torch.addmv(self.proj.bias, self.proj.weight, self.qkv.bias[2 * w:])
        return linear(out.transpose(1, 2).reshape(b, n, w), self.proj.weight, proj_bias)


class Block(nn.Module):
    """Pre-norm ViT block with AdaLN-Zero: x += g1·Attn(mod(norm x)); x += g2·MLP(mod(norm x))."""

    def __init__(self, dim: int, heads: int, conditional: bool):
        super().__init__()
        self.norm1 = RmsNorm(dim, eps=NORM_EPS)
        self.attn = Attention(dim, heads)
        self.norm2 = RmsNorm(dim, eps=NORM_EPS)
        self.mlp = SwiGLU(dim, int(dim * 8 / 3))
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim)) if conditional else None

    def forward(self, x: Tensor, c: Tensor | None, rope: Rope) -> Tensor:
        if self.adaLN is None:
            x = x + self.attn(rms_norm(x, self.norm1), rope)
            return x + self.mlp(rms_norm(x, self.norm2))
        sh1, sc1, g1, sh2, sc2, g2 = self.adaLN(c).chunk(6, dim=-1)
        x = gated_residual(x, g1, self.attn(rms_modulate(x, self.norm1, sh1, sc1), rope))
        return gated_residual(x, g2, self.mlp(rms_modulate(x, self.norm2, sh2, sc2)))


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
            x = rms_modulate(x, self.norm, shift, scale)
        return linear(x, self.linear.weight, self.linear.bias)


class LabelEmbedder(nn.Module):
    """Class table with num_classes + 1 rows; row num_classes is the null class. In
    training each label is replaced by the null class with probability ``dropout``,
    drawn anew at every call (so E, D and the lat-con E pass drop independently)."""

    def __init__(self, num_classes: int, dim: int, dropout: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout = dropout
        self.table = nn.Embedding(num_classes + 1, dim)

    def draw(self, batch: int, device: torch.device | str) -> Tensor | None:
        """The dropout mask of one training call (B bool, True: the null class), drawn
        from the global RNG as :meth:`forward` draws it; None when nothing is dropped."""
        if not (self.training and self.dropout > 0):
            return None
        return torch.rand(batch, device=device) < self.dropout

    def forward(self, labels: Tensor | None, batch: int, drop: Tensor | None = None) -> Tensor:
        """labels int64 B (None: the null class) -> B×W. ``drop``: a mask from
        :meth:`draw` to apply instead of drawing one (a batch evaluated in shards)."""
        device = self.table.weight.device
        if labels is None:
            labels = torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
        else:
            labels = labels.to(device=device, dtype=torch.long)
            if labels.shape != (batch,):
                raise ValueError(f"labels must have shape ({batch},), got {tuple(labels.shape)}")
            if drop is not None and drop.shape != (batch,):
                raise ValueError(f"drop must have shape ({batch},), got {tuple(drop.shape)}")
            drop = self.draw(batch, device) if drop is None else drop
            if drop is not None:
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
        b, n, _ = x.shape
        # Token mixing Linear(N, N) over tokens, as W @ t per sample on B×N×D (the
        # weight broadcast over the batch), so nothing is transposed.
        lin1, _, lin2 = self.token_mix
        t = torch.baddbmm(lin1.bias.view(n, 1), lin1.weight.expand(b, n, n), rms_norm(x, self.norm1))
        t = F.silu(t, inplace=True) if _no_graph() else F.silu(t)
        t = torch.baddbmm(lin2.bias.view(n, 1), lin2.weight.expand(b, n, n), t)
        x = gated_residual(x, self.alpha1, t)
        # Channel mixing; norm2's affine weight w is folded into the first weight:
        # (x·r·w) Wᵀ = (x·r)(W·w)ᵀ.
        lin1, _, lin2 = self.channel_mix
        w1 = lin1.weight if self.norm2.weight is None else lin1.weight * self.norm2.weight
        t = linear(rms_norm(x, self.norm2, affine=False), w1, lin1.bias)
        t = F.silu(t, inplace=True) if _no_graph() else F.silu(t)
        return gated_residual(x, self.alpha2, linear(t, lin2.weight, lin2.bias))


class Mixer(nn.Module):
    """MLP-Mixer blocks then a per-token RMSNorm (affine optional)."""

    def __init__(self, tokens: int, dim: int, depth: int, affine: bool):
        super().__init__()
        self.blocks = nn.ModuleList(MixerBlock(tokens, dim) for _ in range(depth))
        self.norm = RmsNorm(dim, eps=NORM_EPS, affine=affine)

    def forward(self, x: Tensor) -> Tensor:
        for blk in self.blocks:
            x = blk(x)
        return rms_norm(x, self.norm)
