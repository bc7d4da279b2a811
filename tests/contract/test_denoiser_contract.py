"""Every registered denoiser, built as a latent method builds it (``ctx.data`` describes
the latent grid): output shape, the null class, gradients, and each capability it
declares (spheregen.interfaces) doing what the capability says."""

from __future__ import annotations

import pytest
import torch

from spheregen.api import (
    BuildContext,
    DataSpec,
    ExplicitAttentionDenoiser,
    NullMaskDenoiser,
    TwoTimeDenoiser,
    call_denoiser,
    has,
)
from spheregen.plugins import registries
from spheregen.workspace import build_component

GRID = DataSpec(image_size=8, channels=4, num_classes=10)  # a 4-channel 8×8 latent grid


def tiny_config(entry):
    cls = entry.config_cls
    return cls.tiny() if hasattr(cls, "tiny") else cls()


def denoisers():
    return [pytest.param(e, id=e.name) for e in registries().denoiser]


def build(entry):
    """The denoiser with small random weights, so outputs depend on every input (a
    zero-init head would make every check trivially pass)."""
    torch.manual_seed(0)
    net = entry.factory(tiny_config(entry), BuildContext.create(build_component, data=GRID))
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 0.1)
    return net


def inputs(b=4):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, GRID.channels, GRID.image_size, GRID.image_size, generator=g)
    return x, torch.rand(b, generator=g), torch.arange(b) % GRID.num_classes


def times(net, level):
    """The positional time inputs after ``labels``: the second time of a TwoTimeDenoiser."""
    return (level.flip(0),) if has(net, TwoTimeDenoiser) else ()


@pytest.mark.parametrize("entry", denoisers())
def test_shape_null_class_and_gradients(entry):
    net = build(entry)
    x, level, labels = inputs()
    out = net(x, level, labels, *times(net, level))
    null = net(x, level, None, *times(net, level))
    assert out.shape == x.shape == null.shape
    assert torch.isfinite(out).all() and torch.isfinite(null).all()
    assert not torch.allclose(out, null), "labels must change the output (None is the null class)"
    (out * torch.randn_like(out)).sum().backward()
    grads = [p.grad for p in net.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("entry", denoisers())
def test_samples_do_not_interact(entry):
    """The contract lets callers split a batch (classifier-free guidance and label
    dropout for a denoiser without a null-class mask): per-sample results must not
    depend on the rest of the batch."""
    net = build(entry)
    x, level, labels = inputs()
    with torch.no_grad():
        whole = net(x, level, labels, *times(net, level))
        part = net(x[:2], level[:2], labels[:2], *times(net, level[:2]))
    torch.testing.assert_close(whole[:2], part, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("entry", denoisers())
def test_declared_capabilities_hold(entry):
    net = build(entry)
    x, level, labels = inputs()
    drop = torch.tensor([True, False, True, False])
    with torch.no_grad():
        if has(net, NullMaskDenoiser):
            mixed = net(x, level, labels, *times(net, level), drop=drop)
            torch.testing.assert_close(mixed[drop], net(x, level, None, *times(net, level))[drop])
            torch.testing.assert_close(mixed[~drop], net(x, level, labels, *times(net, level))[~drop])
        if has(net, ExplicitAttentionDenoiser):
            torch.testing.assert_close(net(x, level, labels, *times(net, level), attention="explicit"),
                                       net(x, level, labels, *times(net, level)), rtol=1e-4, atol=1e-5)


class OnlyForward(torch.nn.Module):
    """A denoiser seen through the minimal protocol alone: forward(x, noise_level, labels)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, noise_level, labels):
        return self.net(x, noise_level, labels)


def test_split_batch_equals_the_null_mask():
    """call_denoiser on a denoiser without ``drop`` gives what the mask gives, gradients
    included."""
    net = build(registries().denoiser.get("dit"))
    x, level, labels = inputs()
    drop = torch.tensor([False, True, True, False])
    masked = call_denoiser(net, x, level, labels, drop)
    split = call_denoiser(OnlyForward(net), x, level, labels, drop)
    torch.testing.assert_close(split, masked, rtol=1e-5, atol=1e-6)
    g_masked = torch.autograd.grad(masked.square().sum(), net.final.linear.weight)[0]
    g_split = torch.autograd.grad(split.square().sum(), net.final.linear.weight)[0]
    torch.testing.assert_close(g_split, g_masked, rtol=1e-4, atol=1e-6)
    for all_or_none in (torch.ones(4, dtype=torch.bool), torch.zeros(4, dtype=torch.bool)):
        torch.testing.assert_close(call_denoiser(OnlyForward(net), x, level, labels, all_or_none),
                                   call_denoiser(net, x, level, labels, all_or_none), rtol=1e-5, atol=1e-6)
