import pytest
import torch

from spheregen.config import ConfigError, make_component
from spheregen.interfaces import BuildContext, DataSpec, Tokenizer
from spheregen.plugins import registries


def build_patch(patch_size: int, size: int = 8, channels: int = 3):
    comp = make_component("tokenizer", "patch", patch_size=patch_size)
    ctx = BuildContext(data=DataSpec(image_size=size, channels=channels, num_classes=0), build=None)
    return registries()["tokenizer"].build(comp.name, comp.config, ctx)


@pytest.mark.parametrize("p", [1, 2, 4])
def test_round_trip_is_exact(p):
    tok = build_patch(p)
    assert isinstance(tok, Tokenizer) and tok.trainable is False
    images = torch.rand(2, 3, 8, 8) * 2 - 1
    latents = tok.encode(images)
    assert latents.shape == (2, *tok.latent_shape) == (2, 3 * p * p, 8 // p, 8 // p)
    assert torch.equal(tok.decode(latents), images)


def test_patch_one_is_identity():
    images = torch.rand(2, 1, 8, 8)
    assert torch.equal(build_patch(1, channels=1).encode(images), images)


def test_a_token_holds_its_patch():
    tok = build_patch(2, size=4, channels=1)
    image = torch.arange(16.0).view(1, 1, 4, 4)
    assert tok.encode(image)[0, :, 0, 1].tolist() == [2.0, 3.0, 6.0, 7.0]


def test_indivisible_size_is_a_clear_error():
    with pytest.raises(ValueError, match="not divisible by patch_size 3"):
        build_patch(3, size=8)
    tok = build_patch(2)
    with pytest.raises(ValueError, match="cannot encode"):
        tok.encode(torch.zeros(1, 3, 7, 7))


def test_config_rejects_zero_patch():
    with pytest.raises(ConfigError, match="patch_size"):
        make_component("tokenizer", "patch", patch_size=0)
