"""The torch-fidelity metrics, the offline domain-classifier feature space, and the
Inception weights check. Data: sklearn's 8×8 digits upsampled to 16×16 (1,797 labelled
images shipped with scikit-learn), so nothing is downloaded."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from metric_data import CLASSIFIER, make_ctx
from spheregen.errors import ConfigError, WeightsError
from spheregen.interfaces import Metric
from spheregen_plugins.metrics import domain_classifier, inception
from spheregen_plugins.metrics.config import (
    FidConfig,
    InceptionScoreConfig,
    KidConfig,
    PrecisionRecallConfig,
)
from spheregen_plugins.metrics.fidelity import FID, KID, InceptionScore, PrecisionRecall

DC = {"features": "domain-classifier", "classifier": CLASSIFIER, "batch_size": 256}


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def fid(ctx):
    return FID(FidConfig(**DC), ctx)


def noisy(images: torch.Tensor, sigma: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (images.float() + sigma * torch.randn(images.shape, generator=g)).round().clamp(0, 255).to(torch.uint8)




# ---------------------------------------------------------------- registry and config


def test_registered_through_the_entry_point_with_inception_default(monkeypatch):
    from spheregen.plugins import build_registries

    monkeypatch.setenv("SPHEREGEN_PLUGINS", "metrics")
    regs = build_registries()["metric"]
    for name in ("fid", "kid", "inception-score", "precision-recall"):
        entry = regs.get(name)
        assert entry.config_cls().features == "inception"


def test_unknown_feature_space_is_a_config_error():
    from spheregen.config import structure

    with pytest.raises(ConfigError, match="domain-classifier"):
        structure(FidConfig, {"features": "clip"}, "eval.metrics[0]", "x.toml")
    cfg = structure(KidConfig, {"features": "domain-classifier", "classifier": {"epochs": 2}}, "", "x.toml")
    assert cfg.classifier.epochs == 2 and cfg.subset_size == 1000


# ---------------------------------------------------------------- domain classifier


def test_domain_classifier_trains_reports_and_is_cached(ctx, fid, monkeypatch):
    assert isinstance(fid, Metric) and fid.features == "domain-classifier"
    assert fid.keys == ("fid", "fid_features_accuracy")
    accuracy = fid.space.accuracy
    assert accuracy > 0.9
    assert fid.feature_info == f"domain-classifier (test acc {100 * accuracy:.1f}%)"

    def no_training(*args, **kwargs):
        raise AssertionError("retrained although cached")

    monkeypatch.setattr(domain_classifier, "train_classifier", no_training)
    again = domain_classifier.ensure_classifier(CLASSIFIER, ctx)
    assert not again.trained_now and again.path == fid.space.weights_path and again.test_accuracy == accuracy
    assert again.path.parent.name == f"sklearn-digits-16px-{again.key}"
    kid = KID(KidConfig(**DC), ctx)  # another metric shares the trained classifier
    assert kid.space.weights_path == fid.space.weights_path


def test_unlabelled_data_is_refused(digits, tmp_path):
    with pytest.raises(ConfigError, match="unlabelled"):
        FID(FidConfig(**DC), make_ctx(digits, tmp_path, num_classes=0))


def test_matches_torch_fidelity_calculate_metrics_in_a_fresh_process(fid, ctx, digits, tmp_path):
    """Our batch-wise extraction + torch-fidelity's scoring functions give the numbers of
    torch_fidelity.calculate_metrics itself, with the extractor loaded from its file."""
    samples, reference = digits[2][:60], digits[0][:150]
    torch.save((samples, reference), tmp_path / "sets.pt")
    in_process = {**InceptionScore(InceptionScoreConfig(**DC), ctx).compute(samples), **fid.compute(samples, reference)}
    script = textwrap.dedent(
        f"""
        import torch, torch_fidelity
        from torch.utils.data import Dataset
        from spheregen_plugins.metrics import domain_classifier as dc
        class Images(Dataset):
            def __init__(self, x): self.x = x
            def __len__(self): return len(self.x)
            def __getitem__(self, i): return self.x[i].expand(3, -1, -1)
        torch.set_num_threads(1)
        dc.register_with_torch_fidelity()
        x, ref = torch.load({str(tmp_path / "sets.pt")!r})
        r = torch_fidelity.calculate_metrics(
            input1=Images(x), input2=Images(ref), isc=True, fid=True, isc_splits=10, feature_extractor=dc.EXTRACTOR,
            feature_extractor_weights_path={str(fid.space.weights_path)!r}, batch_size={DC.get("batch_size", 64)},
            cuda=False, verbose=False, save_cpu_ram=True, cache=False)
        print(repr(r["inception_score_mean"]), repr(r["frechet_inception_distance"]))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    is_mean, fid_value = map(float, out.stdout.strip().splitlines()[-1].split())
    assert is_mean == pytest.approx(in_process["is"], rel=1e-6)
    assert fid_value == pytest.approx(in_process["fid"], rel=1e-6)
    assert in_process["is"] > 3  # a 10-class classifier on real digits is confident and diverse


# ---------------------------------------------------------------- metric behaviour


def test_fid_is_zero_on_itself_and_grows_with_noise(fid, digits):
    real = digits[2]
    self_fid = fid.compute(real, real)["fid"]
    mild, strong = (fid.compute(noisy(real, s), real)["fid"] for s in (25, 75))
    assert abs(self_fid) < 1e-6 * strong
    assert 0 < mild < strong


def test_scores_are_deterministic_and_reference_features_cached(fid, digits, monkeypatch):
    samples, reference = noisy(digits[2][:100], 30), digits[0][:400]
    first = fid.compute(samples, reference)
    seen = []
    forward = domain_classifier.DomainClassifierExtractor.forward

    def counting(self, x):
        seen.append(len(x))
        return forward(self, x)

    monkeypatch.setattr(domain_classifier.DomainClassifierExtractor, "forward", counting)
    assert fid.compute(samples, reference) == first
    assert sum(seen) == len(samples)  # the reference's features came from the cache
    cached = [p.name for p in (Path(fid.ctx.cache_dir) / "features").iterdir()]
    assert any(name.startswith("spheregen-ref-sklearn-digits-16px-") for name in cached)


def test_reference_statistics_are_computed_once_per_reference(fid, digits, monkeypatch):
    from spheregen_plugins.metrics import fidelity

    reference, other = digits[0][:300], digits[0][300:600]
    expected = [fid.compute(noisy(digits[2][:80], s), reference)["fid"] for s in (10, 40)]
    sizes = []
    stats = fidelity.fid_featuresdict_to_statistics
    monkeypatch.setattr(fidelity, "fid_featuresdict_to_statistics",
                        lambda f, layer: sizes.append(len(f[layer])) or stats(f, layer))
    fid.reference_features(other)
    fresh = fidelity.FID(fid.cfg, fid.ctx)  # an empty memo
    got = [fresh.compute(noisy(digits[2][:80], s), reference)["fid"] for s in (10, 40)]
    assert got == expected and sizes == [300, 80, 80]  # the reference's mean/covariance once
    assert fresh.compute(noisy(digits[2][:80], 10), other)["fid"] != got[0] and sizes[3:] == [300, 80]


def test_fid_statistics_of_a_reference_set_are_streamed_above_the_cap_and_cached(fid, digits, monkeypatch):
    """Above the subset cap, FID's reference is the mean and covariance of the whole set,
    accumulated batch by batch (float64) and cached on disk; below it, the statistics of
    the features ``compute`` uses, so the score is the same as before."""
    import numpy as np

    from spheregen.reference import ReferenceSet
    from spheregen_plugins.metrics import fidelity

    reference, labels = digits[0][:600], digits[1][:600]
    samples = fid.extract(noisy(digits[2][:80], 30))
    whole = fid.score(samples, fid.reference_features(reference))["fid"]
    below = ReferenceSet("digits-600", reference, labels, cap=600)
    assert fid.score(samples, fid.reference_statistics(below))["fid"] == whole
    above = ReferenceSet("digits-600", reference, labels, cap=100)
    stats = fid.reference_statistics(above)  # 3 batches of 256
    exact = fidelity.fid_featuresdict_to_statistics(fid.reference_features(reference), fid.layer)
    np.testing.assert_allclose(stats["mu"], exact["mu"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["sigma"], exact["sigma"], rtol=1e-5, atol=1e-8)
    assert fid.score(samples, stats)["fid"] == pytest.approx(whole, rel=1e-6)
    fresh = FID(fid.cfg, fid.ctx)
    monkeypatch.setattr(fresh, "extract", lambda images: pytest.fail("the reference was extracted again"))
    again = fresh.reference_statistics(above)
    assert np.array_equal(again["mu"], stats["mu"]) and np.array_equal(again["sigma"], stats["sigma"])


def test_reference_changed_in_place_is_rehashed(ctx, digits):
    fid = FID(FidConfig(**DC), ctx)
    reference = digits[0][:200].clone()
    features = fid.reference_features(reference)
    assert fid.reference_features(reference) is features
    reference[0] = 255 - reference[0]
    changed = fid.reference_features(reference)
    assert not torch.equal(changed[fid.layer][0], features[fid.layer][0])
    assert torch.equal(changed[fid.layer][1:], features[fid.layer][1:])


def test_batch_aligned_shards_extract_exactly_the_whole(fid, digits):
    images = digits[0][:400]
    b = fid.cfg.batch_size
    assert len(images) > b
    whole = fid.extract(images)
    halves = [fid.extract(images[:b]), fid.extract(images[b:])]
    for layer, value in whole.items():
        assert torch.equal(torch.cat([h[layer] for h in halves]), value)


def test_grayscale_is_replicated_to_rgb(fid, digits):
    samples, reference = noisy(digits[2][:80], 40), digits[2][80:]
    gray = fid.compute(samples, reference)
    rgb = fid.compute(samples.expand(-1, 3, -1, -1).contiguous(), reference.expand(-1, 3, -1, -1).contiguous())
    assert gray["fid"] == pytest.approx(rgb["fid"], rel=1e-9, abs=1e-12)


def test_kid_adapts_subset_size_to_small_n(ctx, digits):
    kid = KID(KidConfig(**DC, subsets=20), ctx)
    samples, reference = digits[2][:12], digits[0][:30]
    assert kid.subset_size(len(samples), len(reference)) == 12
    close = kid.compute(samples, reference)
    far = kid.compute(noisy(samples, 80), reference)
    assert set(close) == {"kid", "kid_std", "kid_features_accuracy"}
    assert all(math.isfinite(v) for v in close.values())
    assert far["kid"] > close["kid"]
    assert kid.compute(samples, reference) == close


def test_inception_score_and_precision_recall(ctx, digits):
    real, other = digits[2], digits[0][:300]
    isc = InceptionScore(InceptionScoreConfig(**DC), ctx)
    scores = isc.compute(real[:5], None)  # splits adapt to N < 10
    assert set(scores) == {"is", "is_std", "is_features_accuracy"} and scores["is"] >= 1
    prc = PrecisionRecall(PrecisionRecallConfig(**DC), ctx)
    good, bad = prc.compute(real, other), prc.compute(noisy(real, 90), other)
    assert set(good) == {"precision", "recall", "prc_features_accuracy"}
    assert 0.5 < good["precision"] <= 1 and 0.5 < good["recall"] <= 1
    assert bad["precision"] < good["precision"]


def test_bad_inputs_are_refused(fid, digits):
    real = digits[2]
    with pytest.raises(ValueError, match="uint8"):
        fid.compute(real.float(), real)
    with pytest.raises(ValueError, match="resolution"):
        fid.compute(real, F.pad(real, (8, 8, 8, 8)))
    with pytest.raises(ValueError, match="at least 2"):
        fid.compute(real[:1], real)


# ---------------------------------------------------------------- inception


def test_missing_inception_weights_raise_without_network(ctx, empty_hub, no_network):
    with pytest.raises(WeightsError) as err:
        FID(FidConfig(), ctx)
    message = str(err.value)
    assert "weights-inception-2015-12-05-6726825d.pth" in message
    assert "pt_inception-2015-12-05-6726825d.pth" in message
    assert str(empty_hub) in message
    assert "https://" in message and 'features = "domain-classifier"' in message


def test_local_inception_weights_are_used_not_downloaded(ctx, digits, empty_hub, monkeypatch, no_network):
    from torch_fidelity import feature_extractor_inceptionv3 as tf_inception

    # a randomly initialised InceptionV3 with torch-fidelity's exact keys stands in for
    # the real file: the test is about finding and passing the path, not about scores
    with monkeypatch.context() as m:
        m.setattr(tf_inception, "load_state_dict_from_url", lambda *a, **k: {})
        m.setattr(tf_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None)
        state = tf_inception.FeatureExtractorInceptionV3(inception.EXTRACTOR, ["2048"]).state_dict()
    target = empty_hub / inception.WEIGHT_FILES[1]
    target.parent.mkdir(parents=True)
    torch.save(state, target)

    isc = InceptionScore(InceptionScoreConfig(), ctx)
    assert isc.features == "inception" and isc.space.weights_path == target
    assert isc.keys == ("is", "is_std")
    assert set(isc.extract(digits[2][:2])) == {"2048", "logits_unbiased"}  # not 64/192/768/logits
    scores = isc.compute(digits[2][:4])
    assert set(scores) == {"is", "is_std"} and all(math.isfinite(v) for v in scores.values())
