"""The ``sphere-latent`` method and sampler: sphere math, losses, sampling cost."""

from __future__ import annotations

import math
from pathlib import Path

import attrs
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from spheregen.config import make_component
from spheregen.experiment import load_experiment
from spheregen.api import BuildContext, DataSpec, build_latent_denoiser, decay
from spheregen.workspace import build_component
from spheregen_plugins.sphere_latent import sphere
from spheregen_plugins.sphere_latent.method import SphereLatentConfig, build_sphere_latent
from spheregen_plugins.sphere_latent.sampler import SphereLatentSamplerConfig, build_sphere_latent_sampler

SPEC = DataSpec(image_size=16, channels=3, num_classes=10)
ROOT = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.usefixtures("single_thread")


def context(spec=SPEC, train_data=None):
    return BuildContext.create(build_component, data=spec, train_data=train_data)


def tiny_method(**overrides):
    """A sphere-latent on the parameter-free ``patch`` tokenizer (4×4 → 48×4×4 latents)."""
    cfg = SphereLatentConfig(
        tokenizer=make_component("tokenizer", "patch", patch_size=4),
        denoiser=make_component("denoiser", "dit", width=32, depth=1, heads=2, patch_size=1),
        **overrides,
    )
    torch.manual_seed(0)
    return build_sphere_latent(cfg, context())


def images_labels(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 16, 16, generator=g) * 2 - 1, torch.arange(n) % 10


# ------------------------------------------------------------------ sphere math


def test_spherified_latent_has_radius_sqrt_L():
    z = torch.randn(4, 8, 3, 3) * 5 + 2
    L = 8 * 3 * 3
    v = sphere.spherify(z, "global")
    assert torch.allclose(v.flatten(1).norm(dim=1), torch.full((4,), math.sqrt(L)), rtol=1e-5)
    t = sphere.spherify(z, "token")
    assert torch.allclose(t.norm(dim=1), torch.full((4, 3, 3), math.sqrt(8)), rtol=1e-5)
    assert torch.allclose(t.flatten(1).norm(dim=1), torch.full((4,), math.sqrt(L)), rtol=1e-5)
    assert torch.allclose(sphere.spherify(v), v, atol=1e-5)


@pytest.mark.parametrize("scope", ["global", "token"])
def test_noisy_and_NOISY_share_one_noise_direction(scope):
    method = tiny_method(sphere=scope)
    z = torch.randn(4, *method.latent_shape, dtype=torch.float64)
    sigma, sigma_sub = method.sample_sigmas(4, z.device)
    sigma, sigma_sub = sigma.double().clamp_min(0.1), sigma_sub.double().clamp_min(0.05)
    noise = torch.randn_like(z)
    v, v_big, v_small = method.corrupt_pair(z, sigma, sigma_sub, noise)
    # f(v + σe) = c·(v + σe) on each sphere (the whole latent, or each token): what is
    # not along v is along e, for both noise levels.
    dims = (1, 2, 3) if scope == "global" else (1,)

    def off_v(a):
        out = a - (a * v).sum(dims, keepdim=True) / (v * v).sum(dims, keepdim=True) * v
        return out.flatten(1) if scope == "global" else out

    cos = torch.nn.functional.cosine_similarity(off_v(v_big), off_v(v_small), dim=1)
    assert torch.allclose(cos, torch.ones_like(cos), atol=1e-6)
    cos_e = torch.nn.functional.cosine_similarity(off_v(v_big), off_v(noise), dim=1)
    assert torch.allclose(cos_e, torch.ones_like(cos_e), atol=1e-6)
    assert not torch.allclose(v_big, v_small)


def test_noise_angle_matches_tan_parametrisation():
    v = sphere.spherify(torch.randn(64, 32, 8, 8))
    sigma = torch.full((64,), math.tan(math.radians(80.0)))
    noisy = sphere.corrupt(v, sigma, torch.randn_like(v))
    angle = torch.rad2deg(torch.arccos(torch.nn.functional.cosine_similarity(v.flatten(1), noisy.flatten(1))))
    assert abs(angle.mean().item() - 80.0) < 0.5
    assert torch.allclose(sphere.noise_level(sigma, "angle", 1.0), torch.full((64,), 80 / 90))


@pytest.mark.parametrize("dist", ["logit-normal", "lognormal", "uniform", "stratified"])
def test_noise_radii_are_in_unit_interval(dist):
    r = sphere.sample_radii(1000, dist, 0.4, 1.0, math.tan(math.radians(85)), torch.device("cpu"))
    assert r.shape == (1000,) and r.min() >= 0 and r.max() <= 1
    if dist == "stratified":
        assert (r == 0).sum() == 1 and (r == 1).sum() == 1
    if dist == "logit-normal":  # +0.4 puts more than half the mass above r = 0.5
        assert (r > 0.5).float().mean() > 0.55


def test_sub_noise_is_a_fraction_of_the_noise():
    method = tiny_method()
    sigma, sigma_sub = method.sample_sigmas(1000, torch.device("cpu"))
    assert (sigma_sub <= 0.5 * sigma + 1e-6).all() and (sigma <= method.sigma_max + 1e-6).all()
    assert (sigma_sub / sigma.clamp_min(1e-9)).max() > 0.45


def test_decay_schedules():
    assert [decay(t, 4, "linear") for t in (1, 2, 3)] == [0.75, 0.5, 0.25]
    assert decay(2, 4, "none") == 1.0
    assert decay(2, 4, "cosine") == pytest.approx(math.cos(math.pi / 4))


# ------------------------------------------------------------------ losses


def test_consistency_target_gets_no_gradient():
    method = tiny_method(recon_l1=0.0, recon_cos=0.0)
    target = torch.randn(4, *method.latent_shape)
    pred_big = torch.randn(4, *method.latent_shape, requires_grad=True)
    pred_small = torch.randn(4, *method.latent_shape, requires_grad=True)
    loss, _ = method.combine(pred_big, pred_small, target)
    loss.backward()
    assert pred_small.grad is None or pred_small.grad.abs().max() == 0
    assert pred_big.grad.abs().max() > 0


def test_gradient_of_noisy_branch_comes_only_from_recon():
    method = tiny_method()
    target = torch.randn(4, *method.latent_shape)
    pred_big = torch.randn(4, *method.latent_shape, requires_grad=True)
    pred_small = torch.randn(4, *method.latent_shape, requires_grad=True)
    full, logs = method.combine(pred_big, pred_small, target)
    (g_full,) = torch.autograd.grad(full, pred_small)
    recon = sphere.distance(pred_small, target) + sphere.cosine_loss(pred_small, target)
    (g_recon,) = torch.autograd.grad(recon, pred_small)
    assert torch.allclose(g_full, g_recon)
    assert set(logs) == {"loss", "recon_l1", "recon_cos", "cons_l1", "cons_cos"}


def test_loss_decreases_on_a_small_batch():
    method = tiny_method()
    images, labels = images_labels(16)
    opt = torch.optim.AdamW([p for g in method.param_groups() for p in g["params"]], lr=3e-3)
    losses = []
    for _ in range(30):
        torch.manual_seed(1)  # the same noise draw every step: only the weights change
        loss, _ = method.loss(images, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses


def test_only_the_denoiser_is_trained():
    method = tiny_method()
    params = {id(p) for g in method.param_groups() for p in g["params"]}
    assert params == {id(p) for p in method.denoiser.parameters()}
    assert method.default_sampler == "sphere-latent"


# ------------------------------------------------------------------ sampling


def test_decoder_runs_once_per_sample_call():
    method = tiny_method().eval()
    sampler = build_sphere_latent_sampler(SphereLatentSamplerConfig(), context())
    calls = []
    decode = method.tokenizer.decode
    method.tokenizer.decode = lambda z: calls.append(z.shape) or decode(z)
    _, labels = images_labels(3)
    for steps in (1, 2, 5):
        out = sampler.sample(method, labels, steps, guidance=2.0, generator=torch.Generator().manual_seed(0))
        assert out.shape == (3, 3, 16, 16) and out.min() >= -1 and out.max() <= 1
    assert len(calls) == 3


@pytest.mark.parametrize("schedule", ["linear", "cosine", "none"])
@pytest.mark.parametrize("cache_noise", [True, False])
def test_sampling_is_deterministic(schedule, cache_noise):
    method = tiny_method().eval()
    sampler = build_sphere_latent_sampler(SphereLatentSamplerConfig(schedule=schedule, cache_noise=cache_noise),
                                          context())
    _, labels = images_labels(2)
    a = sampler.sample(method, labels, 3, 1.5, torch.Generator().manual_seed(4))
    b = sampler.sample(method, labels, 3, 1.5, torch.Generator().manual_seed(4))
    assert torch.equal(a, b)


def test_nfe_counts_denoiser_passes():
    sampler = build_sphere_latent_sampler(SphereLatentSamplerConfig(), context())
    assert [sampler.nfe(t, 1.0) for t in (1, 2, 4, 7)] == [1, 2, 4, 7]
    assert [sampler.nfe(t, 1.5) for t in (1, 2, 4)] == [2, 4, 8]
    with pytest.raises(ValueError):
        sampler.nfe(0)


def test_guidance_needs_classes():
    method = build_sphere_latent(
        SphereLatentConfig(tokenizer=make_component("tokenizer", "patch", patch_size=4),
                           denoiser=make_component("denoiser", "dit", width=32, depth=1, heads=2, patch_size=1)),
        context(attrs.evolve(SPEC, num_classes=0)),
    )
    sampler = build_sphere_latent_sampler(SphereLatentSamplerConfig(), context())
    assert sampler.sample(method, torch.zeros(2, dtype=torch.long), 2).shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match="guidance"):
        sampler.sample(method, torch.zeros(2, dtype=torch.long), 2, guidance=2.0)


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("guidance", [1.0, 2.0])
def test_gflops_are_one_decode_plus_T_denoiser_passes(guidance):
    cfg = attrs.evolve(SphereLatentConfig.tiny(),
                       denoiser=make_component("denoiser", "dit", width=32, depth=2, heads=2, patch_size=1))
    ctx = context(train_data=lambda: (torch.randint(0, 256, (16, 3, 16, 16), dtype=torch.uint8), torch.arange(16) % 10))
    method = build_sphere_latent(cfg, ctx).eval()
    sampler = build_sphere_latent_sampler(SphereLatentSamplerConfig(), ctx)
    labels = torch.tensor([3])
    z = torch.randn(1, *method.latent_shape)
    with torch.no_grad():
        decode = _flops(lambda: method.decode(z))
        denoise = _flops(lambda: method.denoise(method.spherify(z), method.sigma_max, labels, 1.0))
        assert decode > 0 and denoise > 0
        for steps in (1, 2, 4):
            total = _flops(lambda: sampler.sample(method, labels, steps, guidance, torch.Generator().manual_seed(0)))
            assert total == decode + sampler.nfe(steps, guidance) * denoise


# ------------------------------------------------------------------ paper-scale sizes


@pytest.mark.parametrize("size, expected", [("B", 130e6), ("XL", 675e6)])
def test_paper_scale_denoisers_on_meta(size, expected):
    """'Ours' (130M, AF/OF) and 'Ours-XL/1' (675M, ImageNet): a DiT of that size with
    patch 1 on the RAE's 16×16 grid of 768-d tokens."""
    ctx = context(DataSpec(image_size=256, channels=3, num_classes=1000))
    with torch.device("meta"):
        den = build_latent_denoiser(ctx, make_component("denoiser", "dit", size=size, patch_size=1), (768, 16, 16))
    n = sum(p.numel() for p in den.parameters())
    assert abs(n - expected) / expected < 0.05, f"{size}/1: {n / 1e6:.1f}M params"


# ------------------------------------------------------------------ experiment files


@pytest.mark.parametrize("name", ["animal_faces", "oxford_flowers", "imagenet"])
def test_paper_experiment_files_validate(name):
    exp = load_experiment(ROOT / "experiments" / "paper" / f"sphere_latent_{name}.toml")
    methods = [m for m in exp.methods if m.method.name == "sphere-latent"]
    assert methods
    for m in methods:
        assert m.method.config.tokenizer.name == "rae" and m.method.config.tokenizer.config.encoder == "dinov2"
        assert m.method.config.denoiser.config.patch_size == 1


def test_unconditional_model_ignores_labels():
    method = tiny_method(conditional=False)
    images, labels = images_labels(4)
    torch.manual_seed(3)
    a, _ = method.loss(images, labels)
    torch.manual_seed(3)
    b, _ = method.loss(images, (labels + 1) % 10)
    assert torch.equal(a, b) and method.num_classes == 0
