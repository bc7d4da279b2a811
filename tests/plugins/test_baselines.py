"""Baselines: dit denoiser, flow matching, MeanFlow and their samplers (tiny, CPU)."""

import math

import pytest
import torch
from torch import nn

from spheregen.config import ConfigError, make_component
from spheregen.api import BuildContext, DataSpec, Denoiser, Method, Sampler, flow_time_grid, shift_noise_level
from spheregen.plugins import registries
from spheregen.workspace import build_component
from spheregen_plugins.baselines.common import resolve_time_shift
from spheregen_plugins.baselines.dit import DiT, PRESETS
from spheregen_plugins.baselines.flow_matching import FlowMatching

TINY_DIT = dict(width=32, depth=2, heads=2, patch_size=2)


def make_ctx(size=8, channels=1, num_classes=3):
    return BuildContext.create(build_component, data=DataSpec(image_size=size, channels=channels,
                                                              num_classes=num_classes))


def build(kind, name, ctx=None, **options):
    comp = make_component(kind, name, **options)
    return registries()[kind].build(comp.name, comp.config, ctx or make_ctx())


def fm(ctx=None, denoiser=None, **options):
    dit = {"name": "dit", **TINY_DIT, **(denoiser or {})}
    return build("method", "flow-matching", ctx, denoiser=dit, **options)


def mf(ctx=None, denoiser=None, **options):
    dit = {"name": "dit", **TINY_DIT, "time_inputs": 2, **(denoiser or {})}
    return build("method", "meanflow", ctx, denoiser=dit, **options)


def randomize(module, scale=0.2, seed=0):
    """Non-zero weights everywhere (the zero-init heads would make outputs trivially 0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return module


def data(b=8, size=8, channels=1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(b, channels, size, size, generator=gen) * 2 - 1
    return images, torch.arange(b) % 3


# ---------------------------------------------------------------- dit


def test_dit_shapes_and_zero_init():
    net = build("denoiser", "dit", make_ctx(size=8, channels=4), **TINY_DIT)
    assert isinstance(net, Denoiser)
    x = torch.randn(2, 4, 8, 8)
    out = net(x, torch.rand(2), torch.tensor([0, 2]))
    assert out.shape == x.shape and torch.count_nonzero(out) == 0


@pytest.mark.parametrize("patch", [1, 2])
def test_explicit_attention_matches_sdpa(patch):
    net = randomize(build("denoiser", "dit", make_ctx(size=8, channels=3), **{**TINY_DIT, "patch_size": patch}))
    x, level, labels = torch.randn(2, 3, 8, 8), torch.rand(2), torch.tensor([1, 0])
    fused = net(x, level, labels)
    explicit = net(x, level, labels, attention="explicit")
    assert fused.abs().mean() > 1e-3
    torch.testing.assert_close(explicit, fused, rtol=1e-4, atol=1e-5)


def test_dropped_labels_are_the_null_class():
    net = randomize(build("denoiser", "dit", make_ctx(), **TINY_DIT))
    x, level, labels = torch.randn(3, 1, 8, 8), torch.rand(3), torch.tensor([0, 1, 2])
    drop = torch.tensor([True, False, True])
    mixed = net(x, level, labels, drop=drop)
    null = net(x, level, None)
    cond = net(x, level, labels)
    torch.testing.assert_close(mixed[drop], null[drop])
    torch.testing.assert_close(mixed[~drop], cond[~drop])
    assert not torch.allclose(null, cond)


def test_dit_time_inputs_must_match_the_call():
    one = build("denoiser", "dit", make_ctx(), **TINY_DIT)
    two = build("denoiser", "dit", make_ctx(), **TINY_DIT, time_inputs=2)
    x, level = torch.randn(1, 1, 8, 8), torch.rand(1)
    with pytest.raises(ValueError, match="time_inputs = 1"):
        one(x, level, None, level)
    with pytest.raises(ValueError, match="pass noise_level2"):
        two(x, level, None)


def test_dit_config_errors():
    with pytest.raises(ConfigError, match="divisible by heads"):
        make_component("denoiser", "dit", width=36, heads=5)
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        build("denoiser", "dit", make_ctx(size=7), **TINY_DIT)


@pytest.mark.parametrize("size, millions", [("B", 130), ("XL", 675)])
def test_preset_parameter_counts_on_rae_latents(size, millions):
    """Patch 1 on a 16×16×768 latent (256 tokens), 1000 classes, on the meta device."""
    width, depth, heads = PRESETS[size]
    with torch.device("meta"):
        net = DiT(channels=768, grid=16, num_classes=1000, width=width, depth=depth, heads=heads, patch_size=1)
    count = sum(p.numel() for p in net.parameters()) / 1e6
    assert abs(count - millions) / millions < 0.02, count


# ---------------------------------------------------------------- time shift


def test_time_shift_math():
    n = torch.linspace(0, 1, 11, dtype=torch.float64)
    torch.testing.assert_close(shift_noise_level(n, 1.0), n)
    shifted = shift_noise_level(n, 3.0)
    assert shifted[0] == 0 and shifted[-1] == 1 and torch.all(shifted[1:-1] > n[1:-1])
    assert torch.all(torch.diff(shifted) > 0)
    torch.testing.assert_close(shifted[5], torch.tensor(0.75, dtype=torch.float64))
    torch.testing.assert_close(shift_noise_level(shifted, 1 / 3.0), n)
    assert resolve_time_shift("auto", (768, 16, 16)) == pytest.approx(math.sqrt(48))
    assert resolve_time_shift("auto", (16, 16, 16)) == 1.0
    assert resolve_time_shift(2.5, (1, 8, 8)) == 2.5


def test_time_grid_runs_noise_to_data_with_the_shift():
    torch.testing.assert_close(flow_time_grid(4), torch.tensor([0, 0.25, 0.5, 0.75, 1], dtype=torch.float64))
    grid = flow_time_grid(2, 3.0)
    torch.testing.assert_close(grid, torch.tensor([0, 0.25, 1], dtype=torch.float64))


def test_training_times_follow_the_shift():
    torch.manual_seed(0)
    method = fm(time_shift=3.0)
    t = method.sample_time(4000, torch.device("cpu"))
    # uniform noise level n, t = 1 - 3n/(1+2n): P(t < 0.25) = P(n > 0.5) = 0.5
    assert (t < 0.25).float().mean().item() == pytest.approx(0.5, abs=0.03)
    assert fm(time_shift="auto").time_shift == pytest.approx(math.sqrt(64 / 4096))


# ---------------------------------------------------------------- samplers


class CallCounter:
    """Counts network passes per image: a call on 2B inputs is 2 passes."""

    def __init__(self, net, batch):
        self.passes = 0
        net.register_forward_hook(self.hook)
        self.batch = batch

    def hook(self, _module, args, _out):
        self.passes += args[0].shape[0] // self.batch


@pytest.mark.parametrize("sampler, make", [("euler", fm), ("heun", fm), ("meanflow", mf), ("euler", mf)])
@pytest.mark.parametrize("steps", [1, 2, 3])
@pytest.mark.parametrize("guidance", [1.0, 2.0])
def test_nfe_is_exact(sampler, make, steps, guidance):
    method = make()
    s = build("sampler", sampler)
    assert isinstance(s, Sampler)
    counter = CallCounter(method.denoiser, batch=3)
    images = s.sample(method, torch.tensor([0, 1, 2]), steps, guidance)
    assert counter.passes == s.nfe(steps, guidance)
    assert images.shape == (3, 1, 8, 8)


def test_nfe_formulas():
    euler, heun, meanflow = (build("sampler", n) for n in ("euler", "heun", "meanflow"))
    assert [euler.nfe(t) for t in (1, 4, 8)] == [1, 4, 8]
    assert [heun.nfe(t) for t in (1, 4, 8)] == [1, 7, 15]
    assert heun.nfe(4, guidance=1.5) == 14 and euler.nfe(8, guidance=2.0) == 16
    assert meanflow.nfe(1) == 1 and meanflow.nfe(2, guidance=3.0) == 4
    with pytest.raises(ValueError, match="steps"):
        euler.nfe(0)


@pytest.mark.parametrize("sampler, make", [("euler", fm), ("heun", fm), ("meanflow", mf)])
def test_sampler_output_is_clamped_and_seeded(sampler, make):
    method = randomize(make(), scale=1.0)
    s = build("sampler", sampler)
    labels = torch.tensor([0, 1, 2, 0])
    a = s.sample(method, labels, 2, 1.5, torch.Generator().manual_seed(1))
    b = s.sample(method, labels, 2, 1.5, torch.Generator().manual_seed(1))
    assert a.shape == (4, 1, 8, 8) and a.min() >= -1 and a.max() <= 1
    assert a.abs().max() == 1  # large random weights: clamping happened
    assert torch.equal(a, b)


def test_cfg_mixes_conditional_and_null():
    method = randomize(fm())
    s = build("sampler", "euler")
    labels = torch.tensor([0, 2])
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    x0 = torch.randn((2, 1, 8, 8), generator=gen())
    t = torch.zeros(2)
    v_c = method.velocity(x0, t, labels)
    v_u = method.velocity(x0, t, None)
    expected = (x0 + v_u + 2.5 * (v_c - v_u)).clamp(-1, 1)
    torch.testing.assert_close(s.sample(method, labels, 1, 2.5, gen()), expected)


def test_euler_one_step_matches_formula_and_time_shift_override():
    method = randomize(fm(time_shift=3.0))
    labels = torch.tensor([1])
    x0 = torch.randn((1, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    out = build("sampler", "euler").sample(method, labels, 2, 1.0, torch.Generator().manual_seed(0))
    x1 = x0 + 0.25 * method.velocity(x0, 0.0, labels)
    expected = (x1 + 0.75 * method.velocity(x1, 0.25, labels)).clamp(-1, 1)
    torch.testing.assert_close(out, expected)
    plain = build("sampler", "euler", time_shift=1.0).sample(method, labels, 2, 1.0, torch.Generator().manual_seed(0))
    assert not torch.allclose(plain, out)


# ---------------------------------------------------------------- methods


def test_methods_satisfy_the_contract():
    for method in (fm(), mf()):
        assert isinstance(method, Method)
        groups = method.param_groups()
        params = {id(p) for g in groups for p in g["params"]}
        assert params == {id(p) for p in method.denoiser.parameters()}
        assert all(g["lr_scale"] == 1.0 for g in groups)
        assert method.latent_shape == (1, 8, 8)
    assert fm().default_sampler == "euler" and mf().default_sampler == "meanflow"


def test_denoiser_is_sized_to_the_tokenizer_latents():
    method = fm(ctx=make_ctx(size=8, channels=3), tokenizer={"name": "patch", "patch_size": 2})
    assert method.latent_shape == (12, 4, 4)
    assert method.denoiser.channels == 12 and method.denoiser.grid == 4
    images, labels = data(2, channels=3)
    loss, logs = method.loss(images, labels)
    assert loss.ndim == 0 and math.isfinite(logs["loss"])


def test_meanflow_needs_two_time_inputs():
    with pytest.raises(ConfigError, match="TwoTimeDenoiser.*DiT lacks time_inputs = 2"):
        mf(denoiser={"time_inputs": 1})


class AsFlowVelocity(nn.Module):
    """The flow-matching denoiser a MeanFlow net implies at r = t: FM time t and noise
    level n = 1 - t, velocity toward data = -u(z, n, n)."""

    def __init__(self, meanflow):
        super().__init__()
        self.meanflow = meanflow

    def forward(self, x, level, labels, drop=None):
        return -self.meanflow.average_velocity(x, level, level, labels, drop)


def test_meanflow_at_r_equals_t_is_flow_matching():
    method = randomize(mf(adaptive_p=0.0), scale=0.1)
    x, labels = data(4)
    gen = torch.Generator().manual_seed(5)
    noise = torch.randn(x.shape, generator=gen)
    t = torch.rand(4, generator=gen)
    drop = torch.tensor([False, True, False, False])
    mf_loss, logs = method.loss_on(x, noise, t, t, labels, drop)
    flow = FlowMatching(fm().cfg, method.tokenizer, AsFlowVelocity(method))
    fm_loss, _ = flow.loss_on(x, noise, 1 - t, labels, drop)
    assert fm_loss > 0
    torch.testing.assert_close(mf_loss / x[0].numel(), fm_loss)
    assert logs["mse"] == pytest.approx(fm_loss.item(), rel=1e-5)


def test_meanflow_adaptive_weight():
    method = randomize(mf(adaptive_p=1.0, adaptive_c=0.5), scale=0.1)
    plain = randomize(mf(adaptive_p=0.0), scale=0.1)
    x, labels = data(4)
    noise, t = torch.randn_like(x), torch.full((4,), 0.6)
    r = torch.full((4,), 0.2)
    weighted, _ = method.loss_on(x, noise, r, t, labels, None)
    # same weights (same seed): recover per-sample errors from the unweighted model
    u, dudt = plain.u_and_dudt((0.4 * x + 0.6 * noise), r, t, noise - x, labels, None)
    sq = ((u - (noise - x - 0.4 * dudt)) ** 2).flatten(1).sum(1)
    torch.testing.assert_close(weighted, (sq / (sq + 0.5)).mean())


def test_jvp_matches_finite_difference():
    method = randomize(mf(), scale=0.1).double()
    x, labels = data(3)
    x = x.double()
    gen = torch.Generator().manual_seed(2)
    noise = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    t = torch.tensor([0.9, 0.5, 0.3], dtype=torch.float64)
    r = torch.tensor([0.2, 0.5, 0.1], dtype=torch.float64)
    z, v = (1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * noise, noise - x
    drop = torch.tensor([False, False, True])
    _, dudt = method.u_and_dudt(z, r, t, v, labels, drop)
    h = 1e-6
    plus = method.average_velocity(z + h * v, r, t + h, labels, drop)
    minus = method.average_velocity(z - h * v, r, t - h, labels, drop)
    fd = (plus - minus) / (2 * h)
    assert dudt.abs().max() > 1e-2
    assert ((dudt - fd).norm() / fd.norm()).item() < 1e-3


def test_meanflow_one_step_is_noise_minus_u():
    method = randomize(mf())
    labels = torch.tensor([0, 1])
    eps = torch.randn((2, 1, 8, 8), generator=torch.Generator().manual_seed(4))
    expected = (eps - method.average_velocity(eps, 0.0, 1.0, labels)).clamp(-1, 1)
    out = build("sampler", "meanflow").sample(method, labels, 1, 1.0, torch.Generator().manual_seed(4))
    torch.testing.assert_close(out, expected)


def test_meanflow_times():
    torch.manual_seed(0)
    method = mf(r_neq_t_fraction=0.25)
    r, t = method.sample_times(4000, torch.device("cpu"))
    assert torch.all(r <= t) and torch.all((t > 0) & (t < 1))
    assert (r < t).float().mean().item() == pytest.approx(0.25, abs=0.03)
    # logit-normal(-0.4, 1): the median of one draw is sigmoid(-0.4); t is the max of two
    assert t.median().item() > torch.sigmoid(torch.tensor(-0.4)).item()


@pytest.mark.parametrize("make, key", [(fm, "loss"), (mf, "mse")])
def test_training_decreases_the_loss(make, key):
    torch.manual_seed(0)
    method = make()
    images = torch.zeros(16, 1, 8, 8)
    images[:, :, 2:6, 2:6] = 1.0  # one bright square: easy to learn
    images[8:] = images[8:].flip(-1) * -1
    labels = torch.arange(16) % 3
    opt = torch.optim.Adam(method.param_groups()[0]["params"], lr=3e-3)
    history = []
    for _ in range(30):
        loss, logs = method.loss(images, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(logs[key])
    first, last = sum(history[:5]) / 5, sum(history[-5:]) / 5
    assert last < 0.7 * first, history
