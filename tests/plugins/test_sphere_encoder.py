"""The pixel-space Sphere Encoder plugin against SPEC A2-A9 and E (fast, CPU)."""

from __future__ import annotations

import math

import pytest
import torch

from spheregen.config import make_component
from spheregen.errors import WeightsError
from spheregen.interfaces import BuildContext, DataSpec
from spheregen.plugins import registries
from spheregen_plugins.sphere_encoder import editing, sphere
from spheregen_plugins.sphere_encoder import method as method_module
from spheregen_plugins.sphere_encoder.config import SphereEncoderConfig, SphereSamplerConfig
from spheregen_plugins.sphere_encoder.method import SphereEncoder, build_method
from spheregen_plugins.sphere_encoder.networks import count_parameters
from spheregen_plugins.sphere_encoder.sampler import SphereSampler, build_sampler

TINY32 = DataSpec(image_size=32, channels=3, num_classes=10)
TINY16 = DataSpec(image_size=16, channels=3, num_classes=10)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(data=TINY16, **overrides) -> SphereEncoder:
    cfg = SphereEncoderConfig.tiny()
    fields = {a.name: getattr(cfg, a.name) for a in cfg.__attrs_attrs__}
    return SphereEncoder(SphereEncoderConfig(**{**fields, **overrides}), data)


def randomize_zero_params(model: torch.nn.Module, std: float = 0.02) -> None:
    """Zero-init heads, AdaLN and mixer α make some gradients vanish at init; give them values."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and p.abs().sum() == 0:
                p.normal_(std=std)


def images(b: int, size: int, seed: int = 0) -> torch.Tensor:
    """Smooth synthetic images in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    freq = torch.rand(b, 3, 1, 1, generator=g) * 3 + 1
    phase = torch.rand(b, 3, 1, 1, generator=g) * 6
    return torch.sin(freq * xx + phase) * torch.cos(freq * yy - phase) * 0.8


# ---------------------------------------------------------------- architecture


@pytest.mark.parametrize(
    "name, cfg, data, expected",
    [
        ("AF-L", dict(size="large", conditional=False), DataSpec(image_size=256, channels=3, num_classes=0), 642.1e6),
        ("OF-L", dict(size="large"), DataSpec(image_size=256, channels=3, num_classes=102), 948.8e6),
        ("IN-L", dict(size="large", compression_ratio=3.0), DataSpec(image_size=256, channels=3, num_classes=1000), 950.4e6),
        ("IN-XL", dict(size="xlarge", compression_ratio=3.0), DataSpec(image_size=256, channels=3, num_classes=1000), 1388.9e6),
    ],
)
def test_parameter_counts_match_official(name, cfg, data, expected):
    with torch.device("meta"):
        model = SphereEncoder(SphereEncoderConfig(**cfg), data)
    assert abs(count_parameters(model) - expected) / expected < 0.005, (name, count_parameters(model))


def test_paper_latent_shapes():
    with torch.device("meta"):
        af = SphereEncoder(SphereEncoderConfig(size="large", conditional=False), DataSpec(image_size=256, channels=3, num_classes=0))
        inl = SphereEncoder(SphereEncoderConfig(size="large", compression_ratio=3.0), DataSpec(image_size=256, channels=3, num_classes=1000))
        cifar = SphereEncoder(SphereEncoderConfig(size="base", head="conv"), DataSpec(image_size=32, channels=3, num_classes=10))
    assert af.patch == 8 and af.latent_shape == (128, 32, 32) and af.latent_dim == 131072
    assert inl.latent_shape == (64, 32, 32) and inl.latent_dim == 65536
    assert cifar.patch == 2 and cifar.latent_shape == (8, 16, 16) and cifar.latent_dim == 2048
    assert not af.conditional and af.encoder.label_embed is None and af.decoder.blocks[0].adaLN is None


def test_tiny_config_matches_spec_d():
    model = tiny(TINY32)
    assert model.latent_shape == (32, 8, 8) and model.latent_dim == 2048
    assert abs(count_parameters(model) - 2.68e6) / 2.68e6 < 0.01
    assert model.decoder.blocks[0].mlp.w3.in_features == 341
    assert not model.encoder.pos_embed.requires_grad


def test_init_gives_zero_latent_and_mid_gray():
    model = tiny().eval()
    x = images(3, 16)
    z = model.encode_raw(x, torch.tensor([0, 1, 2]))
    assert torch.count_nonzero(z) == 0
    assert torch.isfinite(model.spherify(z)).all()
    out = model.decode(torch.randn(3, *model.latent_shape), None)
    assert torch.count_nonzero(out) == 0


def test_shapes_are_rejected_with_clear_errors():
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        tiny(DataSpec(image_size=18, channels=3, num_classes=10))
    with pytest.raises(ValueError, match="no patch size for image_size 28"):
        SphereEncoder(SphereEncoderConfig(size="tiny"), DataSpec(image_size=28, channels=3, num_classes=10))
    model = tiny()
    with pytest.raises(ValueError, match="at least 3"):
        model.loss(images(2, 16), torch.tensor([0, 1]))


def test_one_channel_data_uses_true_channel_count():
    model = tiny(DataSpec(image_size=16, channels=1, num_classes=10))
    assert model.latent_shape == (10, 4, 4)  # int(1·4²/1.5)
    loss, _ = model.loss(torch.rand(4, 1, 16, 16) * 2 - 1, torch.arange(4))
    assert torch.isfinite(loss)


# ---------------------------------------------------------------- sphere math


def test_spherified_latents_have_norm_sqrt_l():
    z = torch.randn(5, 32, 8, 8) * torch.tensor([0.1, 1, 3, 100, 1e4]).view(5, 1, 1, 1)
    v = sphere.spherify(z)
    assert torch.allclose(v.flatten(1).norm(dim=1), torch.full((5,), math.sqrt(2048)), rtol=1e-4)


@pytest.mark.parametrize("angle, dim", [(80.0, 2048), (85.0, 65536)])
def test_noise_angle_is_measured_angle(angle, dim):
    g = torch.Generator().manual_seed(0)
    v = sphere.spherify(torch.randn(64, dim, generator=g))
    e = torch.randn(64, dim, generator=g)
    noisy = sphere.spherify(v + sphere.sigma_max(angle) * e)
    measured = sphere.angle_deg(noisy, v)
    assert abs(measured.mean().item() - angle) < 2.0
    assert measured.std().item() < 2.0


def test_stratified_radii():
    for b in (3, 16, 64):
        r = sphere.stratified_unit_radii(b)
        assert (r == 0).sum() == 1 and (r == 1).sum() == 1
        strata = torch.sort(r[(r > 0) & (r < 1)]).values
        m = b - 2
        bins = torch.floor(strata * m).clamp(max=m - 1)
        assert torch.equal(bins, torch.arange(m, dtype=bins.dtype)), "one radius per stratum"
    with pytest.raises(ValueError, match="at least 3"):
        sphere.stratified_unit_radii(2)


def test_hard_cases_fixed_reach_theta_plus_5_official_stays_low():
    torch.manual_seed(0)
    theta = 80.0
    r = torch.ones(20000)
    fixed = sphere.mix_hard_cases(r, 0.1, theta, fix=True)
    official = sphere.mix_hard_cases(r, 0.1, theta, fix=False)

    def angles(rr):
        return torch.rad2deg(torch.atan(rr.double() * math.tan(math.radians(theta))))

    assert abs(angles(fixed).max().item() - 85.0) < 0.1
    assert 0.07 < (fixed > 1).float().mean().item() < 0.13
    assert angles(official).max().item() <= 80.91
    assert 80.5 < angles(official).max().item()
    assert torch.equal(sphere.mix_hard_cases(r, 0.0, theta), r)
    assert sphere.hard_angle(87.0) == 89.0


def test_noisy_latents_share_noise_direction_and_keep_clean_sample():
    torch.manual_seed(0)
    model = tiny(hard_case_prob=0.0)
    v = sphere.spherify(torch.randn(16, *model.latent_shape))
    v_big, v_small = model.noisy_latents(v)
    clean = [i for i in range(16) if torch.equal(v_big[i], v[i])]
    assert len(clean) == 1 and torch.equal(v_small[clean[0]], v[clean[0]])
    vf, bf, sf = v.flatten(1), v_big.flatten(1), v_small.flatten(1)
    unit = vf / vf.norm(dim=1, keepdim=True)
    res_big = bf - (bf * unit).sum(1, keepdim=True) * unit
    res_small = sf - (sf * unit).sum(1, keepdim=True) * unit
    moved = (res_big.norm(dim=1) > 1e-3) & (res_small.norm(dim=1) > 1e-3)
    assert moved.sum() >= 12
    cos = torch.nn.functional.cosine_similarity(res_big[moved], res_small[moved], dim=1)
    assert (cos > 0.9999).all(), "v_NOISY and v_noisy must use the same noise draw e"
    # σ_sub <= σ/2: the small-noise latent is never farther from v than the big one
    assert (sphere.angle_deg(v_small, v) <= sphere.angle_deg(v_big, v) + 1e-6).all()


def test_gaussian_like_draws_in_memory_order():
    # the encoder's latents: B×C×H×W, token-major in memory (what noisy_latents gets)
    v = torch.empty(4, 6, 3, 3).permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    torch.manual_seed(0)
    e = sphere.gaussian_like(v)
    assert e.shape == v.shape and e.stride() == v.stride() and e.dtype == v.dtype
    torch.manual_seed(0)
    assert torch.equal(e.permute(0, 2, 3, 1), torch.randn(4, 3, 3, 6)), "randn of the memory-order shape"
    c = torch.empty(4, 5, 6, dtype=torch.float64)
    torch.manual_seed(1)
    expected = torch.randn_like(c)
    torch.manual_seed(1)
    assert torch.equal(sphere.gaussian_like(c), expected), "a contiguous tensor: exactly randn_like"
    z = tiny().encode_raw(torch.rand(2, 3, 16, 16) * 2 - 1, torch.tensor([0, 1]))
    assert not z.is_contiguous(), "the case this exists for: the encoder's latents are permuted in memory"


# ---------------------------------------------------------------- losses


def test_pixel_consistency_target_is_stop_gradient(monkeypatch):
    calls = []
    real = method_module.distance

    def spy(pred, target):
        calls.append((pred.requires_grad, target.requires_grad))
        return real(pred, target)

    monkeypatch.setattr(method_module, "distance", spy)
    model = tiny()
    model.loss(images(4, 16), torch.arange(4))
    assert calls == [(True, False), (True, False)]  # recon vs x; con vs sg(D(v_noisy))


def test_latent_consistency_gradient_reaches_encoder_and_decoder(monkeypatch):
    torch.manual_seed(0)
    captured = {}
    real = method_module.latent_consistency

    def spy(z_pred, z_target):
        captured["z_target_grad"] = z_target.requires_grad
        captured["loss"] = real(z_pred, z_target)
        return captured["loss"]

    monkeypatch.setattr(method_module, "latent_consistency", spy)
    model = tiny()
    randomize_zero_params(model)
    model.loss(images(4, 16), torch.arange(4))
    assert captured["z_target_grad"] is False
    enc = [p for p in model.encoder.blocks.parameters()]
    dec = [p for p in model.decoder.blocks.parameters()]
    grads = torch.autograd.grad(captured["loss"], enc + dec, allow_unused=True)
    enc_g, dec_g = grads[: len(enc)], grads[len(enc):]
    assert any(g is not None and g.abs().sum() > 0 for g in enc_g)
    assert any(g is not None and g.abs().sum() > 0 for g in dec_g)


def test_lat_con_weight_zero_and_no_pixel_consistency():
    model = tiny(lat_con_weight=0.0, pixel_consistency=False)
    loss, logs = model.loss(images(4, 16), torch.arange(4))
    assert set(logs) == {"loss", "recon_dist"} and torch.isfinite(loss)


def test_perceptual_without_vgg_weights_is_a_weights_error(empty_hub, no_network):
    with pytest.raises(WeightsError) as err:
        tiny(perc_weight=1.0)
    msg = str(err.value)
    assert "vgg16-397923af.pth" in msg and str(empty_hub) in msg and "perc_weight = 0" in msg
    with pytest.raises(WeightsError):
        tiny(con_perc_weight=0.5)


def test_param_groups_scale_encoder():
    model = tiny()
    groups = model.param_groups()
    enc = next(g for g in groups if g["lr_scale"] == 0.1)
    rest = next(g for g in groups if g["lr_scale"] == 1.0)
    enc_ids = {id(p) for p in model.encoder.parameters() if p.requires_grad}
    assert {id(p) for p in enc["params"]} == enc_ids
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for p in rest["params"]} == trainable - enc_ids


def test_label_dropout_is_independent_per_call():
    model = tiny(label_dropout=0.5).train()
    emb = model.encoder.label_embed
    labels = torch.zeros(2000, dtype=torch.long)
    torch.manual_seed(0)
    a = (emb(labels, 2000) == emb.table.weight[10]).all(dim=1)
    b = (emb(labels, 2000) == emb.table.weight[10]).all(dim=1)
    assert 0.45 < a.float().mean() < 0.55 and not torch.equal(a, b)
    model.eval()
    assert not (emb(labels, 2000) == emb.table.weight[10]).all(dim=1).any()


def test_tiny_loss_decreases():
    torch.manual_seed(0)
    model = tiny()
    x, y = images(8, 16), torch.arange(8)
    opt = torch.optim.AdamW(
        [{"params": g["params"], "lr": 1e-3 * g["lr_scale"]} for g in model.param_groups()],
        betas=(0.9, 0.95), weight_decay=0.0,
    )
    logs = []
    for _ in range(30):
        loss, log = model.loss(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        logs.append(log)
    assert logs[-1]["loss"] < 0.5 * logs[0]["loss"]
    first = sum(entry["recon_dist"] for entry in logs[:5]) / 5
    last = sum(entry["recon_dist"] for entry in logs[-5:]) / 5
    assert last < 0.9 * first


# ---------------------------------------------------------------- sampler


def counting(model):
    counts = {"enc": 0, "dec": 0}
    enc, dec = model.encode_raw, model.decode

    def encode_raw(x, labels=None):
        counts["enc"] += 1
        return enc(x, labels)

    def decode(z, labels=None):
        counts["dec"] += 1
        return dec(z, labels)

    model.encode_raw, model.decode = encode_raw, decode
    return counts


@pytest.mark.parametrize(
    "position, guidance, enc_mult, dec_mult",
    [("combo", 1.0, 1, 1), ("combo", 1.5, 2, 2), ("enc", 1.5, 2, 1), ("dec", 1.5, 1, 2)],
)
def test_sampler_calls_decoder_t_times_encoder_t_minus_1(position, guidance, enc_mult, dec_mult):
    model = tiny().eval()
    counts = counting(model)
    sampler = SphereSampler(SphereSamplerConfig(cfg_position=position))
    steps = 3
    out = sampler.sample(model, torch.arange(4), steps, guidance, torch.Generator().manual_seed(0))
    assert out.shape == (4, 3, 16, 16) and out.abs().max() <= 1
    assert counts == {"enc": (steps - 1) * enc_mult, "dec": steps * dec_mult}
    assert sampler.nfe(steps, guidance) == counts["enc"] + counts["dec"]


class FakeMethod(torch.nn.Module):
    """Decoder gives 0.25 under a label and 0 under the null class; encoder likewise."""

    latent_shape = (2, 2, 2)
    sigma_max = 1.0
    conditional = True

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(()))
        self.latents = []

    spherify = staticmethod(sphere.spherify)

    def encode_raw(self, x, labels=None):
        return torch.full((x.shape[0], *self.latent_shape), 0.0 if labels is None else 0.25)

    def decode(self, z, labels=None):
        self.latents.append(z)
        return torch.full((z.shape[0], 3, 4, 4), 0.0 if labels is None else 0.25)


@pytest.mark.parametrize("position, expected", [("combo", 0.5), ("dec", 1.0), ("enc", 0.25)])
def test_cfg_combo_uses_sqrt_w(position, expected):
    fake = FakeMethod()
    sampler = SphereSampler(SphereSamplerConfig(cfg_position=position))
    out = sampler.sample(fake, torch.zeros(2, dtype=torch.long), 1, 4.0)
    assert torch.allclose(out, torch.full_like(out, expected))
    assert sampler.guidance_weights(4.0) == {"combo": (2.0, 2.0), "dec": (1.0, 4.0), "enc": (4.0, 1.0)}[position]
    assert sampler.guidance_weights(1.0) == (1.0, 1.0)


def test_latent_cfg_acts_before_spherify():
    fake = FakeMethod()
    fake.sigma_max = 0.0  # no refinement noise: z = f(f(lerp(E(x, ∅), E(x, y), w)))
    SphereSampler(SphereSamplerConfig(cfg_position="enc")).sample(fake, torch.zeros(2, dtype=torch.long), 2, 4.0)
    # lerp(0, 0.25, 4) = 1.0 everywhere -> f gives all ones
    assert torch.allclose(fake.latents[1], torch.ones_like(fake.latents[1]), atol=1e-5)


def test_refinement_noise_differs_from_e0_and_is_cached():
    def latents(cache):
        fake = FakeMethod()
        fake.sigma_max = 1e6  # the refinement noise dominates: z ≈ f(e)
        sampler = SphereSampler(SphereSamplerConfig(cache_noise=cache))
        sampler.sample(fake, torch.zeros(2, dtype=torch.long), 3, 1.0, torch.Generator().manual_seed(0))
        return fake.latents

    cached, fresh = latents(True), latents(False)
    assert not torch.allclose(cached[1], cached[0], atol=1e-2), "e must be a new draw, not e0"
    assert torch.allclose(cached[2], cached[1], atol=1e-3), "cached noise is reused at every step"
    assert not torch.allclose(fresh[2], fresh[1], atol=1e-2), "uncached noise is redrawn"
    assert torch.equal(cached[1], fresh[1])


def test_sampler_schedule_and_determinism():
    torch.manual_seed(0)
    model = tiny()
    randomize_zero_params(model, std=0.2)
    model.eval()
    labels = torch.arange(3)

    def run(steps=3, **cfg):
        return SphereSampler(SphereSamplerConfig(**cfg)).sample(model, labels, steps, 1.0, torch.Generator().manual_seed(5))

    assert torch.equal(run(), run())
    assert not torch.allclose(run(), run(scheduler="linear"))
    assert torch.equal(run(steps=2), run(steps=2, cache_noise=False))


def test_unconditional_model_refuses_guidance():
    model = tiny(conditional=False).eval()
    sampler = SphereSampler(SphereSamplerConfig())
    out = sampler.sample(model, torch.zeros(2, dtype=torch.long), 2, 1.0, torch.Generator().manual_seed(0))
    assert out.shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match="class-conditional"):
        sampler.sample(model, torch.zeros(2, dtype=torch.long), 2, 1.5)


# ---------------------------------------------------------------- editing


def test_editing_functions():
    torch.manual_seed(0)
    model = tiny()
    randomize_zero_params(model, std=0.2)
    model.eval()
    a, b = images(2, 16, seed=1), images(2, 16, seed=2)
    rec = editing.reconstruct(model, a)
    assert rec.shape == a.shape
    for mode in ("slerp", "lerp"):
        path = editing.interpolate(model, a, b, num=5, mode=mode)
        assert path.shape == (2, 5, 3, 16, 16)
        assert torch.allclose(path[:, 0], rec, atol=1e-5)
        assert torch.allclose(path[:, -1], editing.reconstruct(model, b), atol=1e-5)
    va, vb = model.encode(a), model.encode(b)
    mid = editing.slerp(va, vb, torch.tensor([0.5]))[0]
    assert torch.allclose(mid.flatten(1).norm(dim=1), va.flatten(1).norm(dim=1), rtol=1e-4)
    edits = editing.manipulate_class(model, a, torch.tensor([0, 3, 7]))
    assert edits.shape == (2, 3, 3, 16, 16)
    assert torch.allclose(edits[:, 1], model.decode(model.encode(a), torch.tensor([3, 3])), atol=1e-6)
    with pytest.raises(ValueError):
        editing.manipulate_class(tiny(conditional=False), a, torch.tensor([0]))


# ---------------------------------------------------------------- registration


def test_registered_and_built_through_the_registry():
    regs = registries()
    assert "sphere-encoder" in regs.method and "sphere" in regs.sampler
    comp = make_component("method", "sphere-encoder", size="tiny", patch_size=4, head="conv")
    ctx = BuildContext(data=TINY16, build=lambda kind, c: None)
    model = regs.method.build(comp.name, comp.config, ctx)
    assert isinstance(model, SphereEncoder) and model.default_sampler == "sphere"
    sampler = regs.sampler.build("sphere", make_component("sampler", "sphere").config, ctx)
    assert isinstance(sampler, SphereSampler)
    assert isinstance(build_method(SphereEncoderConfig.tiny(), ctx), SphereEncoder)
    assert isinstance(build_sampler(SphereSamplerConfig(), ctx), SphereSampler)


def test_config_validation():
    with pytest.raises(ValueError):
        SphereEncoderConfig(size="enormous")
    with pytest.raises(ValueError):
        SphereEncoderConfig(noise_angle=90.0)
    with pytest.raises(ValueError):
        SphereEncoderConfig(dist_weight=0.0, perc_weight=0.0)
    with pytest.raises(ValueError):
        SphereEncoderConfig(hard_case_prob=1.5)
