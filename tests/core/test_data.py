from pathlib import Path

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


def test_to_float_is_the_true_quotient_of_every_value():
    """x / 127.5 - 1 as IEEE division (what the CPU computed before the conversion moved to
    the device; tests/gpu checks CUDA gives the same bits)."""
    values = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    expected = torch.tensor([np.float32(v) / np.float32(127.5) - np.float32(1) for v in range(256)],
                            dtype=torch.float32).view(1, 1, 16, 16)
    assert torch.equal(to_float(values), expected)


def test_embedded_datasets_and_holdout(tmp_path):
    cfg = DataConfig(source=make_component("dataset", "mnist-5k"), fit="pad")
    data = Data(cfg, build_component("dataset", cfg.source, None), tmp_path)
    assert data.train.images.shape == (4500, 3, 32, 32) and len(data.test) == 500
    assert data.spec.num_classes == 10
    assert set(data.test.labels.tolist()) == set(range(10))
    again = Data(cfg, build_component("dataset", cfg.source, None), tmp_path)
    assert torch.equal(again.test.images, data.test.images)  # read from the cache, same split


def test_streamed_examples_equal_the_materialised_split(tmp_path):
    cfg = DataConfig(source=make_component("dataset", "digits"), image_size=8, channels=1)
    data = Data(cfg, build_component("dataset", cfg.source, None), tmp_path)
    for split, held in (("train", data.train), ("test", data.test)):
        streamed = data.examples(split)
        assert len(streamed) == len(held) and torch.equal(streamed.labels, held.labels)
        for i in (0, 7, len(held) - 1):
            image, label = streamed[i]
            assert torch.equal(image, held.images[i]) and label == int(held.labels[i])


def test_max_examples_is_a_seeded_class_balanced_subset(tmp_path):
    import polars as pl

    from spheregen.data import balanced_subset

    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 5)
    chosen = balanced_subset(labels, 21)
    assert len(chosen) == 21 and torch.equal(chosen, chosen.sort().values)
    assert torch.bincount(labels[chosen]).tolist() == [8, 8, 5]  # class 2 runs out; the others share its turns
    assert torch.equal(chosen, balanced_subset(labels, 21)) and not torch.equal(chosen, balanced_subset(labels, 21, 1))
    buf = __import__("io").BytesIO()
    Image.new("L", (8, 8)).save(buf, format="PNG")
    rows = [{"image": {"bytes": buf.getvalue(), "path": None}, "label": i // 10} for i in range(40)]
    pl.DataFrame(rows).write_parquet(tmp_path / "sorted.parquet")  # sorted by class: first N would be one class
    cfg = DataConfig(source=make_component("dataset", "parquet", path=str(tmp_path / "sorted.parquet")),
                     image_size=8, channels=1, max_examples=12, test_fraction=0.25)
    data = Data(cfg, build_component("dataset", cfg.source, None))
    both = torch.cat([data.examples("train").labels, data.examples("test").labels])
    assert torch.bincount(both).tolist() == [3, 3, 3, 3]


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


def test_weights_lookup_offline_never_downloads(empty_hub, tmp_path):
    """Offline (the test suite sets HF_HUB_OFFLINE=1), a missing file is a WeightsError
    naming it (and its other published names), its folder, its URL and the alternative;
    the session guard (tests/conftest.py) refuses the downloaders behind
    torchvision/lpips/torch-fidelity and timm in every test."""
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
    with pytest.raises(pytest.fail.Exception, match="tried to download"):
        torch.hub.load_state_dict_from_url("https://example.invalid/other.pth", model_dir=str(tmp_path / "m"))
    with pytest.raises(pytest.fail.Exception, match="tried to download"):
        timm.models._hub.download_cached_file("https://example.invalid/other.pth")


def test_adm_center_crop_matches_the_reference_recipe():
    """ADM's center_crop_arr, written out independently: halve (BOX) while the short
    side is >= 2·size, bicubic to the size, centre crop."""
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (375, 1100, 3), dtype=np.uint8))
    ref = img
    while min(*ref.size) >= 2 * 64:
        ref = ref.resize(tuple(x // 2 for x in ref.size), resample=Image.BOX)
    scale = 64 / min(*ref.size)
    ref = ref.resize(tuple(round(x * scale) for x in ref.size), resample=Image.BICUBIC)
    arr = np.array(ref)
    y, x = (arr.shape[0] - 64) // 2, (arr.shape[1] - 64) // 2
    want = torch.from_numpy(arr[y:y + 64, x:x + 64].transpose(2, 0, 1).copy())
    assert torch.equal(prepare_image(img, 64, 3, "adm-center-crop"), want)


def test_weights_are_downloaded_on_first_use_when_online(empty_hub, monkeypatch):
    """Online, torch hub's downloader fetches a missing file into the hub cache (the
    downloader is replaced: tests never reach the network); a failed download is the
    same WeightsError, naming the URL, not a library traceback."""
    import torch

    from spheregen.errors import WeightsError
    from spheregen.weights import require_hub_file

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("SPHEREGEN_OFFLINE", raising=False)
    fetched = []

    def fake_download(url, dst, progress=True):
        fetched.append(url)
        Path(dst).write_bytes(b"weights")

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    path = require_hub_file(["w.pth", "alias.pth"], "https://example.invalid/w.pth", "the thing", "set x = 0")
    assert path == empty_hub / "w.pth" and path.read_bytes() == b"weights" and fetched == ["https://example.invalid/w.pth"]
    assert require_hub_file("w.pth", "u", "t", "a") == path and len(fetched) == 1  # cached now

    def no_network(url, dst, progress=True):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(WeightsError, match=r"downloading it from https://example.invalid/v.pth failed .*ConnectionError"):
        require_hub_file("v.pth", "https://example.invalid/v.pth", "the thing", "set x = 0")
    monkeypatch.setenv("SPHEREGEN_OFFLINE", "1")
    with pytest.raises(WeightsError, match="offline"):
        require_hub_file("z.pth", "https://example.invalid/z.pth", "the thing", "set x = 0")


def test_the_session_download_guard_reaches_the_test_online(empty_hub, monkeypatch):
    """Online, require_hub_file calls torch hub's downloader; the session guard's refusal
    is not converted into a WeightsError on the way, so a test that would download fails."""
    from spheregen.weights import require_hub_file

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("SPHEREGEN_OFFLINE", raising=False)
    with pytest.raises(pytest.fail.Exception, match="tried to download"):
        require_hub_file("g.pth", "https://example.invalid/g.pth", "the thing", "set x = 0")
