"""The ``rae`` tokenizer: fitting (through the core's fit stage), loading, normalisation,
offline weights errors."""

from __future__ import annotations

import attrs
import pytest
import torch

from spheregen.errors import WeightsError
from spheregen.fit import on_demand
from spheregen.interfaces import BuildContext, DataSpec, FittableComponent, has
from spheregen_plugins.tokenizers import rae
from spheregen_plugins.tokenizers.rae import RAEConfig, build_rae

SPEC = DataSpec(image_size=16, channels=3, num_classes=10)


pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_data(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, SPEC.channels, SPEC.image_size, SPEC.image_size), generator=g,
                           dtype=torch.uint8)
    return images, torch.arange(n) % SPEC.num_classes


def context(cache_dir, data=tiny_data, spec=SPEC):
    return BuildContext(data=spec, build=None, train_data=data, cache_dir=None if cache_dir is None else str(cache_dir))


def test_trains_caches_and_round_trips(tmp_path, monkeypatch):
    cfg = RAEConfig.tiny()
    tok = build_rae(cfg, context(tmp_path))
    assert has(tok, FittableComponent) and [p.name for p in tok.fit_spec().phases()] == \
        ["encoder-mae", "statistics", "decoder"]
    assert tok.trainable is False and tok.latent_shape == (8, 4, 4)
    assert tok.info["loaded"] is False and (tmp_path / tok.info["cache"]).is_file()
    assert set(tok.info["phases"]) == {"encoder-mae", "statistics", "decoder"} and tok.info["psnr"] > 0
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    z = tok.encode(x)
    assert z.shape == (3, 8, 4, 4) and not z.requires_grad
    y = tok.decode(z)
    assert y.shape == x.shape and y.min() >= -1 and y.max() <= 1
    assert set(tok.reconstruction_report(x)) == {"psnr"}

    def no_training(*_a, **_k):
        raise AssertionError("an unchanged config on the same data must not be retrained")

    monkeypatch.setattr(rae, "DecoderObjective", no_training)
    again = build_rae(cfg, context(tmp_path))
    assert again.info["loaded"] is True
    assert torch.equal(again.encode(x), z) and torch.equal(again.decode(z), y)


def test_cache_is_keyed_by_config_and_data(tmp_path):
    a = build_rae(RAEConfig.tiny(), context(tmp_path))
    b = build_rae(attrs.evolve(RAEConfig.tiny(), seed=1), context(tmp_path))
    c = build_rae(RAEConfig.tiny(), context(tmp_path, data=lambda: tiny_data(seed=1)))
    assert len({a.info["cache"], b.info["cache"], c.info["cache"]}) == 3


def test_a_cache_hit_under_a_data_key_never_loads_the_training_split(tmp_path):
    def keyed(data):
        return BuildContext(data=SPEC, build=None, train_data=data, cache_dir=str(tmp_path), data_key="digits-k")

    def refuse():
        raise AssertionError("the training split was loaded for a cached tokenizer")

    assert build_rae(RAEConfig.tiny(), keyed(tiny_data)).info["loaded"] is False
    assert build_rae(RAEConfig.tiny(), keyed(refuse)).info["loaded"] is True


def test_latents_are_normalised_with_dataset_statistics():
    images, _ = tiny_data()
    tok = build_rae(RAEConfig.tiny(), context(None))
    z = tok.encode(images.float() / 127.5 - 1)
    assert torch.allclose(z.mean(0), torch.zeros(tok.latent_shape), atol=1e-4)
    assert torch.allclose(z.var(0, unbiased=False), torch.ones(tok.latent_shape), atol=1e-2)


def test_supervised_objective_trains_and_needs_labels():
    cfg = attrs.evolve(RAEConfig.tiny(), objective="supervised")
    assert build_rae(cfg, context(None)).latent_shape == (8, 4, 4)
    unlabelled = attrs.evolve(SPEC, num_classes=0)
    with pytest.raises(ValueError, match="mae"):
        build_rae(cfg, context(None, spec=unlabelled))


def test_without_data_or_cache_it_says_so():
    ctx = BuildContext(data=SPEC, build=None)
    with pytest.raises(WeightsError, match="train_data"):
        build_rae(RAEConfig.tiny(), ctx)


def test_the_factory_only_loads_where_fitting_on_demand_is_off(tmp_path):
    """As under the CLI's sample / evaluate: missing fitted weights are an error naming
    `spheregen fit`; once fitted, the same build loads them."""
    with on_demand(False):
        with pytest.raises(WeightsError, match="spheregen fit EXPERIMENT.toml"):
            build_rae(RAEConfig.tiny(), context(tmp_path))
    fitted = build_rae(RAEConfig.tiny(), context(tmp_path))
    with on_demand(False):
        loaded = build_rae(RAEConfig.tiny(), context(tmp_path))
    assert loaded.info["loaded"] is True and loaded.info["cache"] == fitted.info["cache"]


def test_dinov2_missing_weights_is_a_weights_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(WeightsError) as err:
        build_rae(RAEConfig(encoder="dinov2"), context(tmp_path))
    msg = str(err.value)
    assert "dinov2_vitb14_reg4_pretrain.pth" in msg and "model.safetensors" in msg
    assert str(tmp_path / "torch") in msg and 'encoder = "trained"' in msg
    with pytest.raises(WeightsError, match="does not exist"):
        build_rae(RAEConfig(encoder="dinov2", dinov2_weights=str(tmp_path / "nope.pth")), context(tmp_path))


def test_dinov2_loads_a_local_weights_file(tmp_path):
    import timm

    # A randomly initialised DINOv2-S stands in for the real weights file.
    reference = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, num_classes=0)
    path = tmp_path / "dinov2_small.pth"
    torch.save(reference.state_dict(), path)
    cfg = attrs.evolve(RAEConfig.tiny(), encoder="dinov2", dinov2_model="vit_small_patch14_reg4_dinov2",
                       dinov2_weights=str(path), dinov2_image_size=28, decoder_steps=1)
    tok = build_rae(cfg, context(tmp_path, data=lambda: tiny_data(n=8)))
    assert tok.latent_shape == (384, 2, 2)
    got = tok.encoder.model.blocks[0].attn.qkv.weight
    assert torch.equal(got, reference.blocks[0].attn.qkv.weight)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert tok.decode(tok.encode(x)).shape == x.shape
    # the fitted weights hold only what spheregen trained, not the DINOv2 weights
    from safetensors.torch import load_file

    assert not any(k.startswith("encoder.") for k in load_file(tok.info["cache"]))
    assert [p.name for p in tok.fit_spec().phases()] == ["statistics", "decoder"]
    assert build_rae(cfg, context(tmp_path, data=lambda: tiny_data(n=8))).info["loaded"] is True


def test_lpips_without_vgg_weights_is_a_weights_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(WeightsError, match="vgg16-397923af.pth.*lpips_weight = 0"):
        build_rae(attrs.evolve(RAEConfig.tiny(), lpips_weight=0.1), context(tmp_path))


@pytest.mark.parametrize("objective", ["mae", "supervised"])
def test_encoder_pretraining_trains_then_freezes_the_encoder(objective):
    cfg = attrs.evolve(RAEConfig.tiny(), objective=objective)
    torch.manual_seed(0)
    untrained = rae._new_tokenizer(cfg, context(None))
    tok = build_rae(cfg, context(None))
    assert any(not torch.equal(a, b) for a, b in zip(untrained.encoder.parameters(), tok.encoder.parameters()))
    assert not any(p.requires_grad for p in tok.encoder.parameters())
    assert f"encoder-{objective}" in tok.info["phases"]


def test_same_config_same_tokenizer_and_caller_rng_untouched():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = build_rae(RAEConfig.tiny(), context(None))
    assert torch.equal(torch.rand(3), expected)
    torch.manual_seed(7)
    b = build_rae(RAEConfig.tiny(), context(None))
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.equal(a.decode(a.encode(x)), b.decode(b.encode(x)))


def test_masked_decoding_runs_under_bf16_autocast():
    """The MAE fit phase under `mixed_precision = "bf16"`: the embedded visible tokens
    are bf16 while the mask token is an fp32 parameter (a CUDA run failed on this)."""
    dec = rae.TokenDecoder(latent_dim=8, grid=4, patch=2, channels=1, width=16, depth=1, heads=2)
    tokens, keep = torch.randn(2, 6, 8), torch.stack([torch.randperm(16)[:6] for _ in range(2)])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = dec(tokens, keep)
    assert out.shape == (2, 16, 4) and out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert dec.mask_token.grad is not None and dec.mask_token.grad.abs().sum() > 0
