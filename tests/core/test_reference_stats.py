"""The reference reduced to what the metrics need: FID against statistics exported by
`spheregen reference-stats` equals FID against the split, in the offline
domain-classifier feature space on the toy digits; a statistics file of another feature
space or dimension is refused (exit 2); KID's reference is a capped, class-balanced
subset that is the whole split below the cap."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from spheregen.cli import main

CLASSIFIER = "classifier = { width = 8, epochs = 1, batch_size = 512 }"
FID = f'{{ name = "fid", features = "domain-classifier", batch_size = 64, {CLASSIFIER} }}'
KID = f'{{ name = "kid", features = "domain-classifier", batch_size = 64, subsets = 5, {CLASSIFIER} }}'


@pytest.fixture
def scored(toy_registries, tiny_experiment, tmp_path, capsys):
    """(experiment file, score(*--set) -> the scores of a fixed noisy sample set)."""
    exp = tiny_experiment(f"metrics = [{FID}, {KID}]")
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (60, 8, 8, 1), generator=g, dtype=torch.uint8).numpy()
    np.savez(tmp_path / "samples.npz", arr_0=images)
    runs = ["--runs-dir", str(tmp_path / "runs"), "--reports-dir", str(tmp_path / "reports")]

    def run(*args: str) -> int:
        capsys.readouterr()
        return main([*args[:1], str(exp), *args[1:], *runs])

    def score(*overrides: str) -> dict[str, float]:
        sets = [x for o in overrides for x in ("--set", o)]
        assert run("score", str(tmp_path / "samples.npz"), "--key", "arr_0", *sets) == 0, capsys.readouterr().err
        return json.loads(capsys.readouterr().out)["arr_0"]

    assert run("fit", "--set", "train.checkpoint_every=0") == 0  # the domain classifier, in 4 steps
    return exp, run, score


def test_fid_against_exported_statistics_equals_fid_against_the_split(scored, tmp_path, capsys):
    exp, run, score = scored
    assert run("reference-stats", "--out", str(tmp_path / "stats.npz")) == 0
    with np.load(tmp_path / "stats.npz") as z:
        mu, sigma, features = z["mu"], z["sigma"], str(z["features"])
        provenance = json.loads(str(z["provenance"]))
    dim = len(mu)
    assert mu.dtype == sigma.dtype == np.float64 and sigma.shape == (dim, dim) and dim == 32  # 4 × width
    assert features.startswith("domain-classifier:") and provenance["split"] == "train"
    split = score()
    # below the cap, the numbers are those of the metrics on the whole split in memory (as before)
    from spheregen.experiment import load_experiment
    from spheregen.samples import read_external_samples
    from spheregen.workspace import Workspace

    ws = Workspace(load_experiment(exp), tmp_path / "runs", tmp_path / "reports")
    images, reference = read_external_samples(tmp_path / "samples.npz", "arr_0"), ws.data.train.images
    for _, metric in ws.build_metrics():
        assert metric.compute(images, reference) == {k: v for k, v in split.items() if k in metric.keys}
    # a relative path is read from the experiment file's folder
    from_file = score('eval.reference_stats="stats.npz"')
    assert from_file["fid"] == pytest.approx(split["fid"], rel=1e-6) and split["fid"] > 0
    assert from_file["kid"] == split["kid"]  # KID keeps the split
    # above the cap, the statistics are streamed over the whole split; KID takes a subset
    capped = score("eval.reference_subset=300")
    assert capped["fid"] == pytest.approx(split["fid"], rel=1e-6) and capped["kid"] != split["kid"]

    def refused(arrays: dict[str, np.ndarray], *sets: str) -> str:
        np.savez(tmp_path / "bad.npz", **arrays)
        sets = [x for o in ('eval.reference_stats="bad.npz"', *sets) for x in ("--set", o)]
        assert run("score", str(tmp_path / "samples.npz"), "--key", "arr_0", *sets) == 2
        return capsys.readouterr().err

    err = refused({"mu": mu, "sigma": sigma, "features": np.array("inception:inception-v3-compat:2048:tf20151205")})
    assert "bad.npz" in err and "feature space inception:" in err and features in err
    assert "recorded in no 'features' array" in refused({"mu": mu, "sigma": sigma})  # an ADM file: Inception
    err = refused({"mu": mu[:8], "sigma": sigma[:8, :8], "features": np.array(features)})
    assert "8-dimensional" in err and "32 dimensions" in err
    assert "'mu' and 'sigma'" in refused({"arr_0": mu})
    assert "none of eval.metrics" in refused({"mu": mu, "sigma": sigma}, f"eval.metrics=[{KID}]")


def test_reference_subset_is_class_balanced_and_whole_below_the_cap():
    from spheregen.reference import ReferenceSet

    labels = torch.arange(1000) % 10
    labels[:300] = 0  # class 0 over-represented
    images = torch.arange(1000, dtype=torch.int32).to(torch.uint8).view(-1, 1, 1, 1).expand(-1, 1, 2, 2)
    small = ReferenceSet("k", images, labels, cap=200)
    chosen = small.subset()
    assert len(chosen) == 200 and torch.equal(chosen, chosen.sort().values)
    assert torch.bincount(labels[chosen]).tolist() == [20] * 10
    assert torch.equal(small.subset_images(), images[chosen])
    whole = ReferenceSet("k", images, labels, cap=1000)
    assert torch.equal(whole.subset(), torch.arange(1000)) and torch.equal(whole.subset_images(), images)
    assert [len(b) for b in whole.batches(300)] == [300, 300, 300, 100]
