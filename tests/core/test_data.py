import numpy as np
import pytest
import torch
from PIL import Image

from spheregen.config import config_hash, make_component, to_dict
from spheregen.data import Data, balanced_labels, prepare_image, to_float, to_uint8
from spheregen.errors import DataError
from spheregen.experiment import DataConfig
from spheregen.workspace import build_component


def test_prepare_channels_and_pad():
    gray = np.full((28, 28), 200, np.uint8)
    x = prepare_image(gray, 32, 3, "pad")
    assert x.shape == (3, 32, 32) and x.dtype == torch.uint8
    assert x[:, 2:30, 2:30].eq(200).all() and x[:, :2].eq(0).all()
    rgba = np.zeros((10, 10, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[..., 3] = 0  # fully transparent red -> black
    assert prepare_image(rgba, 10, 3, "pad").eq(0).all()
    rgb = np.zeros((12, 16, 3), np.uint8)
    assert prepare_image(rgb, 8, 1, "resize-crop").shape == (1, 8, 8)


def test_pad_refuses_larger_images():
    with pytest.raises(DataError, match="resize-crop"):
        prepare_image(np.zeros((40, 40), np.uint8), 32, 3, "pad")


def test_mixed_sizes_and_modes_become_one_shape():
    imgs = [Image.new("L", (20, 30)), Image.new("RGB", (64, 48)), Image.new("RGBA", (33, 33)), Image.new("P", (9, 9))]
    out = torch.stack([prepare_image(i, 16, 3, "resize-crop") for i in imgs])
    assert out.shape == (4, 3, 16, 16)


def test_uint8_roundtrip():
    x = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    assert torch.equal(to_uint8(to_float(x)), x)


def test_embedded_datasets_and_holdout(tmp_path):
    cfg = DataConfig(source=make_component("dataset", "mnist-5k"), fit="pad")
    data = Data(cfg, build_component("dataset", cfg.source, None), tmp_path)
    assert data.train.images.shape == (4500, 3, 32, 32) and len(data.test) == 500
    assert data.spec.num_classes == 10
    assert set(data.test.labels.tolist()) == set(range(10))
    again = Data(cfg, build_component("dataset", cfg.source, None), tmp_path)
    assert torch.equal(again.test.images, data.test.images)  # read from the cache, same split


def test_imagefolder_and_missing_path(tmp_path):
    for c in ("cat", "dog"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (10, 12), (i * 40, 0, 0)).save(tmp_path / "imgs" / c / f"{i}.png")
    src = build_component("dataset", make_component("dataset", "imagefolder", path=str(tmp_path / "imgs")), None)
    assert src.num_classes == 2 and len(src.split("train")) == 6
    with pytest.raises(DataError, match="does not exist"):
        build_component("dataset", make_component("dataset", "imagefolder", path=str(tmp_path / "nope")), None)


def test_missing_column(tmp_path):
    import polars as pl

    pl.DataFrame({"pic": [b""], "label": [0]}).write_parquet(tmp_path / "d.parquet")
    with pytest.raises(DataError, match="no column 'image'"):
        build_component("dataset", make_component("dataset", "parquet", path=str(tmp_path / "d.parquet")), None)


def test_balanced_labels():
    assert balanced_labels(7, 3).tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert balanced_labels(3, 0).tolist() == [0, 0, 0]


def test_declared_num_classes_is_checked_and_keeps_the_data_key():
    source = build_component("dataset", "digits", None)
    plain = Data(DataConfig(source=make_component("dataset", "digits"), image_size=8, channels=1), source)
    declared = Data(DataConfig(source=make_component("dataset", "digits"), image_size=8, channels=1,
                               num_classes=10), source)
    assert declared.key == plain.key and declared.spec == plain.spec
    # nor the identity of runs trained on it (run_hash hashes the whole data config)
    assert config_hash(declared.cfg) == config_hash(plain.cfg)
    assert to_dict(declared.cfg)["num_classes"] == 10  # the resolved config still shows it
    wrong = Data(DataConfig(source=make_component("dataset", "digits"), image_size=8, channels=1, num_classes=3), source)
    with pytest.raises(DataError, match="data.num_classes = 3.*10 classes"):
        _ = wrong.spec


def test_weights_lookup_never_downloads(empty_hub, tmp_path):
    """A missing file is a WeightsError naming it (and its other published names), its
    folder, its URL and the alternative; the session guard (tests/conftest.py) refuses
    the downloaders behind torchvision/lpips/torch-fidelity and timm in every test."""
    import timm.models._hub
    import torch

    from spheregen.errors import WeightsError
    from spheregen.weights import require_hub_file

    with pytest.raises(WeightsError) as err:
        require_hub_file(["w.pth", "w-alias.pth"], "https://example.invalid/w.pth", "the thing", "set thing = 0")
    msg = str(err.value)
    assert all(s in msg for s in ("'w.pth' (or the identical 'w-alias.pth')", str(empty_hub), "example.invalid",
                                  "thing = 0"))
    empty_hub.mkdir(parents=True)
    (empty_hub / "w-alias.pth").write_bytes(b"x")
    assert require_hub_file(["w.pth", "w-alias.pth"], "u", "t", "a") == empty_hub / "w-alias.pth"
    (empty_hub / "w.pth").write_bytes(b"x")
    assert require_hub_file("w.pth", "u", "t", "a") == empty_hub / "w.pth"
    with pytest.raises(AssertionError, match="tried to download"):
        torch.hub.load_state_dict_from_url("https://example.invalid/other.pth", model_dir=str(tmp_path / "m"))
    with pytest.raises(AssertionError, match="tried to download"):
        timm.models._hub.download_cached_file("https://example.invalid/other.pth")
