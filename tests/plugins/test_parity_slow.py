"""Parity with the official Sphere Encoder (slow tier: ~30 minutes on 2 CPU cores).

Trains experiments/parity_official_tiny.toml (the reference README's exact recipe) and
scores spheregen's samples and the official reference samples with the same FID code and
features: spheregen's FID must be at most 1.15× the reference's at 1 and 4 steps."""

import json
from pathlib import Path

import polars as pl
import pytest

from spheregen.cli import main

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = ROOT.parent / "shared" / "reference" / "official_se_tiny_mnist_25min.npz"


@pytest.mark.slow
@pytest.mark.skipif(not REFERENCE.is_file(), reason=f"reference samples not found at {REFERENCE}")
def test_fid_within_15_percent_of_official(tmp_path, capsys):
    exp = str(ROOT / "experiments" / "parity_official_tiny.toml")
    dirs = ["--runs-dir", str(tmp_path / "runs"), "--reports-dir", str(tmp_path / "reports")]
    assert main(["run", exp, *dirs]) == 0
    capsys.readouterr()
    assert main(["score", exp, str(REFERENCE), "--key", "steps1", "--key", "steps4", *dirs]) == 0
    official = json.loads(capsys.readouterr().out)
    ours = pl.read_parquet(tmp_path / "reports" / "parity-official-tiny" / "results.parquet")
    for steps in (1, 4):
        fid = ours.filter(pl.col("steps") == steps)["fid"][0]
        ref = official[f"steps{steps}"]["fid"]
        print(f"steps {steps}: spheregen FID {fid:.2f}, official FID {ref:.2f}, ratio {fid / ref:.3f}")
        assert fid <= 1.15 * ref, (steps, fid, ref)
