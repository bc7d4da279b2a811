"""The Sphere Encoder's hand-written backward passes (plugins/sphere_encoder/layers.py)
against autograd: gradcheck in float64, and the training forward equal to the
no-grad (sampling) forward."""

from __future__ import annotations

import copy

import pytest
import torch

from spheregen_plugins.sphere_encoder.layers import (
    ROW_PAD,
    Block,
    MixerBlock,
    SwiGLU,
    _GatedResidual,
    _QkvRope,
    _RmsModulate,
    _SwiGLUT,
    axial_rope_2d,
    rope_cis,
    rope_tables,
)

B, N, D = 3, 4, 8


def _rand(*shape: int) -> torch.Tensor:
    return torch.randn(shape, dtype=torch.float64, requires_grad=True)


@pytest.mark.parametrize("s_shape, with_shift", [((D,), False), ((B, 1, D), True), (None, False), (None, True)])
def test_rms_modulate_gradcheck(s_shape, with_shift):
    x = _rand(B, N, D)
    s = None if s_shape is None else _rand(*s_shape)
    shift = _rand(B, 1, D) if with_shift else None
    assert torch.autograd.gradcheck(lambda x, s, shift: _RmsModulate.apply(x, s, shift, 1e-6), (x, s, shift))


@pytest.mark.parametrize("g_shape", [(B, 1, D), ()])
def test_gated_residual_gradcheck(g_shape):
    assert torch.autograd.gradcheck(_GatedResidual.apply, (_rand(B, N, D), _rand(*g_shape), _rand(B, N, D)))


def test_qkv_rope_gradcheck():
    heads, hd, grid = 2, 4, 2  # N = grid² = 4 tokens, width 8
    cos, sin = axial_rope_2d(hd, grid)
    cis = rope_cis(cos, sin, heads, torch.float64)

    def f(x, weight, bias_qk):
        return _QkvRope.apply(x, weight, bias_qk, cis, heads)

    assert torch.autograd.gradcheck(f, (_rand(B, grid * grid, heads * hd), _rand(3 * heads * hd, heads * hd),
                                        _rand(2 * heads * hd)))


def test_swiglu_feature_major_gradcheck():
    hidden = 5
    args = (_rand(B, N, D), _rand(2 * hidden, D), _rand(2 * hidden), _rand(D, hidden), _rand(D))
    assert torch.autograd.gradcheck(_SwiGLUT.apply, args)


def test_qkv_rope_backward_takes_gradients_of_any_layout():
    """q/k gradients that cannot be viewed as complex pairs (last dim not unit-stride, as
    an SDPA math backend sends k's back; or an odd offset and odd strides, as a slice
    of a wider buffer) give the same input gradient as contiguous ones."""
    heads, hd, grid = 2, 4, 2
    cis = rope_cis(*axial_rope_2d(hd, grid), heads, torch.float64)
    x, weight, bias_qk = _rand(B, grid * grid, heads * hd), _rand(3 * heads * hd, heads * hd), _rand(2 * heads * hd)
    q, k, v = _QkvRope.apply(x, weight, bias_qk, cis, heads)
    gq, gk = torch.randn_like(q), torch.randn_like(k)
    gq_t = gq.transpose(-1, -2).contiguous().transpose(-1, -2)  # last dim strided
    gk_odd = torch.cat([torch.zeros_like(gk[..., :1]), gk], dim=-1)[..., 1:]  # offset 1, row stride hd + 1
    assert gq_t.stride(-1) != 1 and gk_odd.storage_offset() == 1 and gk_odd.stride(-2) % 2
    assert torch.equal(gq_t, gq) and torch.equal(gk_odd, gk)
    awkward = torch.autograd.grad((q, k), x, (gq_t, gk_odd), retain_graph=True)[0]
    plain = torch.autograd.grad((q, k), x, (gq, gk))[0]
    assert torch.allclose(awkward, plain, atol=1e-12)


def test_swiglu_feature_major_equals_the_plain_formula():
    """The CPU path (hidden feature-major, hand-written backward) against
    w3(silu(a)·b) written with F.linear, in float64, forward and gradients."""
    torch.manual_seed(0)
    net = SwiGLU(D, 7).double()
    x = _rand(B, N, D)
    f = torch.nn.functional

    def plain(x):
        a, b = f.linear(x, net.w12.weight, net.w12.bias).chunk(2, dim=-1)
        return f.linear(f.silu(a) * b, net.w3.weight, net.w3.bias)

    got, want = net(x), plain(x)
    assert type(got.grad_fn).__name__ == "_SwiGLUTBackward"  # the CPU path was the one tested
    assert torch.allclose(got, want, atol=1e-12)
    grad = torch.randn_like(got)
    params = [x, *net.parameters()]
    for g_got, g_want in zip(torch.autograd.grad(got, params, grad), torch.autograd.grad(want, params, grad)):
        assert torch.allclose(g_got, g_want, atol=1e-12)
    with torch.no_grad():
        assert torch.allclose(net(x), want, atol=1e-12)
    # only the output layer trains (x and w12 frozen): its gradients alone, still exact
    net.w12.requires_grad_(False)
    frozen_in = x.detach()
    got, want = net(frozen_in), plain(frozen_in)
    out_params = [net.w3.weight, net.w3.bias]
    for g_got, g_want in zip(torch.autograd.grad(got, out_params, grad), torch.autograd.grad(want, out_params, grad)):
        assert torch.allclose(g_got, g_want, atol=1e-12)


def test_feature_major_activations_have_padded_rows():
    """The saved hidden activations (hidden×R) of a power-of-two R keep a padded row
    stride, which the products reading them transposed need (layers.ROW_PAD), and the
    input gradient through them is still exact."""
    torch.manual_seed(0)
    net = SwiGLU(D, 7).double()
    x = _rand(2, 32, D)  # R = 64 rows
    y = net(x)
    saved = y.grad_fn.saved_tensors[3:]  # aᵀ, bᵀ, silu(a)ᵀ, hᵀ
    stride = 64 + ROW_PAD
    assert [t.stride(0) for t in saved] == [stride] * 4 and stride & (stride - 1)  # not a power of two
    with torch.no_grad():
        assert torch.allclose(net(x), y, atol=1e-12)
    assert torch.autograd.gradcheck(net, (x,))


@pytest.mark.parametrize("module", ["block", "mixer"])
def test_training_forward_equals_sampling_forward(module):
    torch.manual_seed(0)
    width, grid = 16, 4
    if module == "block":
        net = Block(width, 2, conditional=True).double()
        for p in net.parameters():  # AdaLN is zero-initialised: give every branch a value
            torch.nn.init.normal_(p, std=0.2)
        cos, sin = (t.double() for t in axial_rope_2d(8, grid))
        rope = rope_tables(cos, sin, 2, torch.empty(B, grid * grid, width, dtype=torch.float64))  # as the ViTs
        assert rope.cis is not None
        # a table made for tokens of another dtype (complex128 here) is not used by fp32
        # attention, which would turn q and k into fp64: it makes its own
        attn, attn_in = copy.deepcopy(net.attn).float(), torch.randn(B, grid * grid, width)
        own = attn(attn_in, rope_tables(cos.float(), sin.float(), 2, attn_in))
        assert own.dtype == torch.float32 and torch.equal(attn(attn_in, rope), own)
        c = torch.randn(B, 1, width, dtype=torch.float64)
        call = lambda x: net(x, c, rope)  # noqa: E731
    else:
        net = MixerBlock(grid * grid, width).double()
        with torch.no_grad():
            net.alpha1.fill_(0.7), net.alpha2.fill_(-0.4)
        call = net
    x = torch.randn(B, grid * grid, width, dtype=torch.float64)
    with torch.no_grad():
        expected = call(x.clone())
    got = call(x.clone().requires_grad_())
    assert torch.allclose(got, expected, atol=1e-12)
    got.square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters() if p.requires_grad)
