"""A fair comparison: guidance chosen per step count on a seed that is not scored, and
several sampling seeds summarised as mean ± std (spheregen.selection, report)."""

from __future__ import annotations

import json
import math

import polars as pl
import pytest

from spheregen.cli import main
from spheregen.errors import ConfigError
from spheregen.experiment import experiment_from_dict
from spheregen.samples import read_meta
from spheregen.selection import best_scales

METRICS = ('metrics = [{ name = "fid", features = "domain-classifier", batch_size = 16, '
           'classifier = { width = 8, epochs = 1, batch_size = 64 } }]')


def _exp(**eval_options):
    return experiment_from_dict({"name": "x", "data": {"source": "digits"}, "eval": eval_options,
                                 "methods": [{"name": "a", "method": "toy-ae"},
                                             {"name": "b", "method": "toy-ae", "guidance": [1.0, 3.0]}]})


def test_best_scale_per_step_count_lower_or_higher_ties_to_the_smaller_nan_never_wins():
    rows = [{"steps": 1, "guidance": 1.0, "fid": 5.0}, {"steps": 1, "guidance": 2.0, "fid": 3.0},
            {"steps": 2, "guidance": 1.0, "fid": 4.0}, {"steps": 2, "guidance": 2.0, "fid": 4.0},
            {"steps": 4, "guidance": 1.0, "fid": math.nan}, {"steps": 4, "guidance": 2.0, "fid": 9.0}]
    assert best_scales(rows, "fid", "lower") == {1: 2.0, 2: 1.0, 4: 2.0}
    assert best_scales(rows, "fid", "higher") == {1: 1.0, 2: 1.0, 4: 2.0}


def test_guidance_and_seed_options(toy_registries):
    exp = _exp(guidance=[1.5, 2.0], seeds=[0, 1])
    a, b = exp.methods
    assert exp.guidances_for(a) == (1.5, 2.0)  # eval.guidance for a method without its own
    assert exp.guidances_for(b) == (1.0, 3.0)
    assert exp.eval.scored_seeds == (0, 1)
    assert _exp().guidances_for(a) == (1.0,) and _exp().eval.scored_seeds == (2,)
    with pytest.raises(ConfigError, match="guidance_seed.*also a scored seed"):
        _exp(seeds=[0, 1000])
    with pytest.raises(ConfigError, match="each listed once"):
        _exp(guidance=[2.0, 2.0])
    with pytest.raises(ConfigError, match="distinct seeds"):
        _exp(seeds=[])
    with pytest.raises(ConfigError, match="not a finite number"):
        _exp(guidance=[1.0, float("inf")])


@pytest.fixture
def listed(toy_registries, tiny_experiment, tmp_path):
    """A run whose method 'b' chooses its scale from [1.0, 3.0] on seed 1000 (10
    samples), and every set is scored with seeds 0 and 1."""
    exp = tiny_experiment(f"seeds = [0, 1]\nguidance_samples = 20\n{METRICS}",
                          '[[methods]]\nname = "a"\nmethod = "toy-ae"\nguidance = 1.5\n'
                          '[[methods]]\nname = "b"\nmethod = "toy-ae"\nguidance = [1.0, 3.0]\n')
    dirs = ["--runs-dir", str(tmp_path / "runs"), "--reports-dir", str(tmp_path / "rep")]
    assert main(["run", str(exp), *dirs]) == 0
    return exp, dirs, tmp_path


def test_scale_is_chosen_on_its_own_seed_and_the_scored_seeds_use_it_and_the_report_says_so(listed):
    exp, dirs, tmp = listed
    samples = tmp / "runs" / "tiny" / "samples"
    record = json.loads((samples / "b" / "guidance.json").read_text())
    assert {(r["steps"], r["guidance"]) for r in record["rows"]} == {(1, 1.0), (1, 3.0), (2, 1.0), (2, 3.0)}
    for r in record["rows"]:  # the selection sets: their own seed and count
        meta = read_meta(samples / "b" / "guidance" / f"steps-{r['steps']}_w-{r['guidance']:g}.npz")
        assert (meta["seed"], meta["num_samples"], meta["guidance"]) == (1000, 20, r["guidance"])
    best = {k: min((r for r in record["rows"] if r["steps"] == k), key=lambda r: (r["fid"], r["guidance"]))
            for k in (1, 2)}
    assert record["chosen"] == {str(k): r["guidance"] for k, r in best.items()}

    results = pl.read_parquet(tmp / "rep" / "tiny" / "results.parquet")
    assert sorted(results.select("method", "steps", "seed").rows()) == [
        (m, k, s) for m in ("a", "b") for k in (1, 2) for s in (0, 1)]
    for r in results.filter(pl.col("method") == "b").iter_rows(named=True):
        assert r["guidance"] == record["chosen"][str(r["steps"])] and r["guidance_seed"] == 1000
        assert r["fid"] != best[r["steps"]]["fid"]  # scored on other samples than the choice was made on
    assert set(results.filter(pl.col("method") == "a")["guidance"]) == {1.5}
    meta = read_meta(samples / "a" / "steps-2_seed-1.npz")
    assert (meta["seed"], meta["num_samples"]) == (1, 40)
    assert read_meta(samples / "a" / "steps-2.npz")["seed"] == 0

    guidance = pl.read_parquet(tmp / "rep" / "tiny" / "guidance.parquet")
    assert len(guidance) == 4 and guidance["chosen"].sum() == 2

    # the report: mean ± std over the seeds, the best-guidance table and plot
    report = tmp / "rep" / "tiny"
    md = (report / "results.md").read_text()
    results = pl.read_parquet(report / "results.parquet")
    fids = results.filter((pl.col("method") == "a") & (pl.col("steps") == 1))["fid"]
    assert f"{fids.mean():.2f} ± {fids.std():.2f}" in md
    assert "over 2 sampling seeds" in md
    assert "### Guidance" in md and "chosen w" in md and "with seed 1000 (20 samples" in md
    assert (report / "fid_vs_guidance.png").is_file() and (report / "fid_vs_guidance.pdf").is_file()
    assert "fid_vs_guidance.png" in md


def test_unchanged_choice_and_sets_are_reused_and_a_new_list_is_rechosen(listed, capsys):
    exp, dirs, tmp = listed
    record = tmp / "runs" / "tiny" / "samples" / "b" / "guidance.json"
    before = record.stat().st_mtime_ns
    capsys.readouterr()
    assert main(["run", str(exp), *dirs]) == 0
    out = capsys.readouterr().out
    assert "b: samples up to date" in out and "b: results up to date" in out
    assert record.stat().st_mtime_ns == before
    assert main(["run", str(exp), *dirs, "--set", "methods.b.guidance=[1.0, 2.0]"]) == 0
    rows = json.loads(record.read_text())["rows"]
    assert {r["guidance"] for r in rows} == {1.0, 2.0}
    assert "a: samples up to date" in capsys.readouterr().out


def test_export_and_load_follow_the_choice(listed, capsys):
    import spheregen

    exp, dirs, tmp = listed
    out = tmp / "exported"
    assert main(["export", str(exp), *dirs, "--format", "npz", "--out", str(out), "--method", "b"]) == 0
    assert sorted(p.name for p in (out / "b").iterdir()) == [f"steps-{k}{s}.npz" for k in (1, 2) for s in ("", "_seed-1")]
    g = spheregen.load(tmp / "runs" / "tiny", method="b")
    chosen = json.loads((tmp / "runs" / "tiny" / "samples" / "b" / "guidance.json").read_text())["chosen"]
    assert g.guidance(2) == chosen["2"]
    with pytest.raises(spheregen.SpheregenError, match="pass guidance="):
        g.guidance(8)
