"""CMMD: the MMD estimator against a direct numpy implementation of the reference
code's formula, the CLIP weights lookup (missing file, local file, never a download),
and the metric in the domain-classifier space on sklearn's digits (16×16, offline)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from spheregen.errors import ConfigError, WeightsError
from spheregen.interfaces import Metric
from spheregen_plugins.metrics import cmmd
from spheregen_plugins.metrics.cmmd import CMMD, mmd2
from metric_data import CLASSIFIER
from spheregen_plugins.metrics.config import CLIP_MODELS, CmmdConfig

DC = {"embedding": "domain-classifier", "classifier": CLASSIFIER, "batch_size": 50}


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def metric(ctx):
    return CMMD(CmmdConfig(**DC), ctx)






def numpy_mmd(x: np.ndarray, y: np.ndarray, sigma: float) -> float:
    """google-research/cmmd distance.py, transcribed to numpy float64."""
    gamma = 1 / (2 * sigma**2)
    xx, yy, xy = x @ x.T, y @ y.T, x @ y.T
    xs, ys = np.diag(xx), np.diag(yy)
    k_xx = np.mean(np.exp(-gamma * (-2 * xx + xs[:, None] + xs[None, :])))
    k_yy = np.mean(np.exp(-gamma * (-2 * yy + ys[:, None] + ys[None, :])))
    k_xy = np.mean(np.exp(-gamma * (-2 * xy + xs[:, None] + ys[None, :])))
    return k_xx + k_yy - 2 * k_xy


def unit(n: int, d: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64) + shift, dim=1)


# ---------------------------------------------------------------- the estimator


@pytest.mark.parametrize("sigma", [10.0, 0.7])
def test_mmd_matches_the_reference_formula(sigma):
    x, y = unit(37, 16, 0), unit(23, 16, 1, shift=0.3)
    expected = numpy_mmd(x.numpy(), y.numpy(), sigma)
    assert mmd2(x, y, sigma) == pytest.approx(expected, rel=1e-10, abs=1e-15)
    raw_x, raw_y = 3 * torch.randn(11, 5, dtype=torch.float64), torch.randn(9, 5, dtype=torch.float64)
    assert mmd2(raw_x, raw_y, sigma) == pytest.approx(numpy_mmd(raw_x.numpy(), raw_y.numpy(), sigma), rel=1e-10)


def test_identical_sets_give_zero_and_shifted_sets_a_positive_value():
    x = unit(50, 32, 0)
    assert abs(mmd2(x, x.clone(), 10.0)) < 1e-9
    assert abs(mmd2(x, x[torch.randperm(50)], 10.0)) < 1e-9
    near, far = mmd2(x, unit(50, 32, 1, shift=0.1), 10.0), mmd2(x, unit(50, 32, 1, shift=1.0), 10.0)
    assert 0 < near < far


def test_chunked_equals_unchunked():
    x, y = unit(101, 24, 0), unit(67, 24, 1, shift=0.2)
    whole = mmd2(x, y, 10.0, chunk=1000)
    for chunk in (1, 7, 50, 101):
        assert mmd2(x, y, 10.0, chunk=chunk) == pytest.approx(whole, rel=1e-11, abs=1e-16)
    xf, yf = x.float(), y.float()  # float32 input is computed in float64 all the same
    assert mmd2(xf, yf, 10.0, chunk=16) == pytest.approx(mmd2(xf.double(), yf.double(), 10.0), rel=1e-11)


# ---------------------------------------------------------------- registry and config


def test_registered_with_clip_default(monkeypatch):
    from spheregen.plugins import build_registries

    monkeypatch.setenv("SPHEREGEN_PLUGINS", "metrics")
    cfg = build_registries()["metric"].get("cmmd").config_cls()
    assert (cfg.embedding, cfg.clip_model, cfg.sigma, cfg.scale) == ("clip", "clip-vit-l-14-336px", 10.0, 1000.0)


def test_clip_models_are_torch_fidelitys_and_bad_values_are_config_errors():
    from torch_fidelity.feature_extractor_clip import MODEL_METADATA

    from spheregen.config import structure

    assert CLIP_MODELS == tuple(MODEL_METADATA)
    with pytest.raises(ConfigError, match="domain-classifier"):
        structure(CmmdConfig, {"embedding": "inception"}, "eval.metrics[0]", "x.toml")
    with pytest.raises(ConfigError, match="clip-vit-b-16"):
        structure(CmmdConfig, {"clip_model": "vit-h"}, "eval.metrics[0]", "x.toml")


# ---------------------------------------------------------------- CLIP weights


def test_missing_clip_weights_raise_without_network(ctx, empty_hub, no_network):
    with pytest.raises(WeightsError) as err:
        CMMD(CmmdConfig(), ctx)
    message = str(err.value)
    assert "clip-vit-l-14-336px-3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02.pt" in message
    assert "ViT-L-14-336px.pt" in message and str(empty_hub) in message
    assert "https://openaipublic.azureedge.net/clip/models/" in message
    assert 'embedding = "domain-classifier"' in message


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning", "ignore::torch.jit.TracerWarning")
def test_local_clip_weights_are_used_not_downloaded(ctx, digits, empty_hub, no_network):
    from torch_fidelity.feature_extractor_clip import VisionTransformer

    class TinyClip(nn.Module):
        # the layout of an OpenAI CLIP TorchScript file at toy size: a 16 px ViT with
        # one block, 8-dim embeddings; the test is about finding and loading the file
        def __init__(self):
            super().__init__()
            self.visual = VisionTransformer(
                input_resolution=16, patch_size=8, width=64, layers=1, heads=1, output_dim=8
            )
            self.text_projection = nn.Parameter(torch.randn(4, 8))

        def forward(self, x):
            return self.visual(x)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        scripted = torch.jit.trace(TinyClip().eval(), torch.randn(1, 3, 16, 16))
    target = empty_hub / cmmd.clip_weight_files("clip-vit-b-32")[1]
    target.parent.mkdir(parents=True)
    scripted.save(str(target))

    metric = CMMD(CmmdConfig(clip_model="clip-vit-b-32", batch_size=8), ctx)
    assert isinstance(metric, Metric) and metric.features == "clip" and metric.keys == ("cmmd",)
    assert metric.space.weights_path == target and metric.feature_info.startswith("clip (clip-vit-b-32, ")
    assert metric.feature_key.startswith("clip-vit-b-32:clip:40d365715913c9da")
    real = digits[2]
    assert metric.extract(real[:10])["embeddings"].shape == (10, 8)
    score = metric.compute(real[:20], real[20:40])["cmmd"]
    assert math.isfinite(score) and score >= 0


# ---------------------------------------------------------------- domain-classifier space


def noise(like: torch.Tensor, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, like.shape, generator=g, dtype=torch.uint8)


def test_domain_classifier_space_ranks_real_above_noise(metric, digits):
    assert metric.features == "domain-classifier" and metric.keys == ("cmmd", "cmmd_features_accuracy")
    assert metric.feature_info.startswith("domain-classifier (test acc ")
    assert metric.feature_key.startswith("spheregen-domain-classifier:features:")
    real, reference = digits[2], digits[0][:400]
    good = metric.compute(real, reference)
    bad = metric.compute(noise(real), reference)
    assert good["cmmd_features_accuracy"] > 0.8
    assert 0 <= good["cmmd"] < bad["cmmd"] and bad["cmmd"] > 5 * good["cmmd"]
    assert metric.compute(real, real)["cmmd"] == pytest.approx(0.0, abs=1e-9)


def test_extract_on_batch_aligned_halves_equals_whole(metric, digits):
    images = digits[0][:230]  # batch_size 50: halves at 100, last batch partial
    whole = metric.extract(images)["embeddings"]
    halves = torch.cat([metric.extract(images[:100])["embeddings"], metric.extract(images[100:])["embeddings"]])
    assert whole.dtype == torch.float32 and whole.shape == (230, metric.dim)
    assert torch.equal(whole, halves)
    assert metric.extract(images[:0])["embeddings"].shape == (0, metric.dim)


def test_compute_is_score_of_extract_with_cached_reference(metric, digits, monkeypatch):
    samples, reference = noise(digits[2][:60], 1), digits[0][:300].clone()
    expected = metric.score(metric.extract(samples), metric.extract(reference))
    assert metric.compute(samples, reference) == expected
    calls = []
    original = metric.extract
    monkeypatch.setattr(metric, "extract", lambda images: calls.append(len(images)) or original(images))
    assert metric.compute(samples, reference) == expected
    assert calls == [60]  # the reference's features came from memory
    reference[:10] = 0  # in place: a new version, extracted again
    assert metric.compute(samples, reference) != expected and calls == [60, 60, 300]


def test_reference_embeddings_are_cached_on_disk_and_the_extractor_shared(metric, ctx, digits, monkeypatch):
    """A new CMMD (the next `evaluate`) reads the reference's embeddings from
    <cache_dir>/features instead of embedding it again; FID in the same space uses the
    same extractor instance, and the two caches never share a file."""
    from pathlib import Path

    from spheregen_plugins.metrics.config import FidConfig
    from spheregen_plugins.metrics.fidelity import FID, shared_extractor

    reference = digits[0][:150].clone()
    first = metric.reference_features(reference)
    again = CMMD(CmmdConfig(**DC), ctx)
    monkeypatch.setattr(again, "extract", lambda images: pytest.fail("the reference was embedded again"))
    assert torch.equal(again.reference_features(reference)["embeddings"], first["embeddings"])
    fid = FID(FidConfig(features="domain-classifier", classifier=CLASSIFIER, batch_size=50), ctx)
    assert fid.feature_info == metric.feature_info
    assert shared_extractor(fid.space, ctx.device) is metric.extractor is again.extractor
    fid_features = fid.reference_features(reference)
    assert set(fid_features) != {"embeddings"} and torch.equal(
        fid_features[cmmd.domain_classifier.FEATURE_LAYER], first["embeddings"])
    from spheregen_plugins.metrics.fidelity import content_digest

    stem = f"spheregen-ref-{cmmd.domain_classifier.slug(ctx.dataset_key)}-{content_digest(reference)}"
    features = Path(ctx.cache_dir) / "features"
    # FID's file keeps its pre-CMMD-cache name, CMMD's is its own
    assert (features / f"{stem}-{fid.space.cache_tag}-b50.pt").is_file()
    assert len(list(features.glob(f"{stem}-cmmd-{metric.space.cache_tag}-*-b50.pt"))) == 1


def test_a_replaced_weights_file_is_loaded_anew(tmp_path, monkeypatch):
    """The shared extractor is keyed by the file's size and mtime too: a classifier
    retrained at the same path never serves the old weights under a new cache name."""
    import os

    import spheregen_plugins.metrics.fidelity as fidelity
    from spheregen_plugins.metrics.inception import EXTRACTOR

    path = tmp_path / "weights.pt"
    path.write_bytes(b"old")
    space = fidelity.FeatureSpace(name="x", extractor=EXTRACTOR, weights_path=path, cache_tag="t", info="x")
    loads = []
    monkeypatch.setattr(fidelity, "create_feature_extractor",
                        lambda name, layers, **kw: loads.append(kw["feature_extractor_weights_path"]) or nn.Identity())
    a = fidelity.shared_extractor(space, "cpu")
    assert fidelity.shared_extractor(space, "cpu") is a and loads == [str(path)]
    path.write_bytes(b"new")  # same size: a retrained classifier of the same architecture
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert fidelity.shared_extractor(space, "cpu") is not a and loads == [str(path)] * 2


def test_reference_kernel_mean_is_computed_once_per_reference(ctx, digits, monkeypatch):
    fresh = CMMD(CmmdConfig(**DC), ctx)
    reference = digits[0][:200]
    sets = [noise(digits[2][:60], s) for s in (1, 2)]
    expected = [fresh.score(fresh.extract(x), fresh.extract(reference))["cmmd"] for x in sets]
    sizes = []
    kernel = cmmd.self_kernel_mean
    monkeypatch.setattr(cmmd, "self_kernel_mean", lambda x, sigma, *a: sizes.append(len(x)) or kernel(x, sigma, *a))
    got = [fresh.compute(x, reference)["cmmd"] for x in sets]
    assert got == pytest.approx(expected, rel=1e-12) and sizes == [200, 60, 60]  # the reference's once


def test_scale_and_sigma_are_applied(metric, ctx, digits):
    unscaled = CMMD(CmmdConfig(**DC, scale=1.0), ctx)  # the cached classifier, not retrained
    assert unscaled.feature_key == metric.feature_key
    samples, reference = metric.extract(noise(digits[2][:40])), metric.extract(digits[0][:100])
    default = metric.score(samples, reference)["cmmd"]
    assert unscaled.score(samples, reference)["cmmd"] * 1000 == pytest.approx(default, rel=1e-12)
    x = F.normalize(samples["embeddings"].double(), dim=1)
    y = F.normalize(reference["embeddings"].double(), dim=1)
    assert default == pytest.approx(1000 * numpy_mmd(x.numpy(), y.numpy(), 10.0), rel=1e-9)
    narrow = CMMD(CmmdConfig(**DC, sigma=0.5), ctx).score(samples, reference)["cmmd"]
    assert narrow == pytest.approx(1000 * numpy_mmd(x.numpy(), y.numpy(), 0.5), rel=1e-9)


def test_bad_inputs_are_refused(metric, digits):
    real = digits[2]
    with pytest.raises(ValueError, match="uint8"):
        metric.compute(real.float(), real)
    with pytest.raises(ValueError, match="resolution"):
        metric.compute(real, F.pad(real, (8, 8, 8, 8)))
    with pytest.raises(ValueError, match="at least 2"):
        metric.compute(real[:1], real)
    with pytest.raises(ValueError, match="extract"):
        metric.score({"embeddings": torch.zeros(5, 3)}, metric.extract(real[:5]))
