"""spheregen.load: a trained method from its final folder alone, sampling exactly as
evaluation does."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from spheregen.cli import main
from spheregen.errors import SpheregenError
from spheregen.generate import load
from spheregen.samples import load_samples


@pytest.fixture
def run(toy_registries, tiny_experiment, tmp_path, capsys):
    exp = tiny_experiment("", '[[methods]]\nname = "toy"\nmethod = "toy-ae"\nguidance = 1.5\n'
                              '[methods.train]\nema_decay = 0.5\n')
    assert main(["run", str(exp), "--runs-dir", str(tmp_path / "runs"), "--reports-dir", str(tmp_path / "rep")]) == 0
    return tmp_path / "runs"


def test_load_samples_like_evaluation_without_the_dataset(run, monkeypatch):
    import spheregen.data

    def no_data(*args, **kwargs):
        raise AssertionError("the dataset was opened")

    monkeypatch.setattr(spheregen.data.Data, "__init__", no_data)
    g = load(run / "tiny", method="toy")
    assert g.config["step"] == 6 and g.spec.image_size == 8 and g.entry.guidance == 1.5
    out = g.sample([i % 10 for i in range(40)], steps=2, seed=2, batch=20)
    assert out.shape == (40, 1, 8, 8) and out.dtype == torch.uint8
    stored, labels = load_samples(run / "tiny" / "samples" / "toy" / "steps-2.npz")
    assert torch.equal(out, stored) and labels.tolist() == [i % 10 for i in range(40)]
    for where in (run / "tiny" / "toy", run / "tiny" / "toy" / "final"):
        assert torch.equal(load(where).sample([3], steps=1), g.sample([3], steps=1))
    assert g.reconstruct(stored[:4]).shape == (4, 1, 8, 8)


def test_load_names_what_is_missing(run):
    with pytest.raises(SpheregenError, match=r"name the method.*\['toy'\]"):
        load(run / "tiny")
    with pytest.raises(SpheregenError, match="no trained method 'nope'"):
        load(run / "tiny", method="nope")
    g = load(run / "tiny", method="toy")
    with pytest.raises(SpheregenError, match=r"labels must be .* \[0, 10\)"):
        g.sample([10], steps=1)


@pytest.mark.parametrize("fmt", ["adm", "png", "npz"])
def test_export_writes_other_evaluators_layouts(run, tmp_path, fmt, capsys):
    import numpy as np
    from PIL import Image

    exp = tmp_path / "tiny.toml"
    out = tmp_path / "out"
    args = ["export", str(exp), "--format", fmt, "--out", str(out), "--runs-dir", str(run)]
    assert main(args) == 0
    stored, labels = load_samples(run / "tiny" / "samples" / "toy" / "steps-2.npz")
    if fmt == "adm":
        with np.load(out / "toy" / "steps-2.npz") as z:
            assert z["arr_0"].shape == (40, 8, 8, 1) and z["arr_0"].dtype == np.uint8
            assert np.array_equal(z["arr_0"], stored.permute(0, 2, 3, 1).numpy())
            assert z["arr_1"].tolist() == labels.tolist()
    elif fmt == "png":
        files = sorted((out / "toy" / "steps-2").glob("*.png"))
        assert len(files) == 40
        assert np.array_equal(np.asarray(Image.open(files[5])), stored[5, 0].numpy())
    else:
        assert torch.equal(load_samples(out / "toy" / "steps-1.npz")[0],
                           load_samples(run / "tiny" / "samples" / "toy" / "steps-1.npz")[0])


def test_run_skips_sampling_and_scoring_whose_inputs_did_not_change(run, tmp_path, capsys):
    exp = tmp_path / "tiny.toml"
    dirs = ["--runs-dir", str(run), "--reports-dir", str(tmp_path / "rep")]
    samples = run / "tiny" / "samples" / "toy" / "steps-1.npz"
    results = tmp_path / "rep" / "tiny" / "results.parquet"
    before = samples.stat().st_mtime_ns, results.stat().st_mtime_ns
    capsys.readouterr()
    assert main(["run", str(exp), *dirs]) == 0
    out = capsys.readouterr().out
    assert "samples up to date" in out and "results up to date" in out
    assert (samples.stat().st_mtime_ns, results.stat().st_mtime_ns) == before
    # --resume continues the training (here: nothing left, the same weights) and, as with
    # --jobs, keeps what is current
    assert main(["run", str(exp), *dirs, "--resume"]) == 0
    out = capsys.readouterr().out
    assert "already trained" not in out and "samples up to date" in out and "results up to date" in out
    assert (samples.stat().st_mtime_ns, results.stat().st_mtime_ns) == before
    # weights trained anew under the same config (the run folder gone, as after an interrupted
    # --fresh) are sampled and scored anew, though the sample files carry the same identity
    shutil.rmtree(run / "tiny" / "toy")
    assert main(["run", str(exp), *dirs]) == 0
    out = capsys.readouterr().out
    assert "up to date" not in out
    assert samples.stat().st_mtime_ns != before[0] and results.stat().st_mtime_ns != before[1]
    before = samples.stat().st_mtime_ns, results.stat().st_mtime_ns
    # a new draw of the same identity (deleted samples, weights retrained elsewhere) is re-scored
    samples.unlink()
    assert main(["run", str(exp), *dirs]) == 0
    out = capsys.readouterr().out
    assert "samples up to date" not in out and "results up to date" not in out
    assert results.stat().st_mtime_ns != before[1]
    # a new guidance re-samples and re-scores that method only; the weights are reused
    drawn = samples.stat().st_mtime_ns
    assert main(["run", str(exp), *dirs, "--set", "methods.toy.guidance=2.0"]) == 0
    out = capsys.readouterr().out
    assert "already trained" in out and "up to date" not in out
    assert samples.stat().st_mtime_ns != drawn


def test_run_reports_where_its_time_went(run, tmp_path, capsys):
    import json

    assert main(["run", str(tmp_path / "tiny.toml"), "--runs-dir", str(run), "--reports-dir", str(tmp_path / "rep"),
                 "--fresh"]) == 0
    out = capsys.readouterr().out
    assert "time by stage" in out and "train toy" in out and "total" in out
    timing = json.loads((tmp_path / "rep" / "tiny" / "timing.json").read_text())
    assert {"fit", "train toy", "sample toy", "evaluate", "report"} <= set(timing["stages_s"])
    assert timing["total_s"] >= sum(v for k, v in timing["stages_s"].items() if not k.startswith(" "))


def test_the_notebook_example_runs_on_a_trained_run(run, tmp_path, monkeypatch):
    import importlib.util

    import spheregen

    assert spheregen.load is load
    spec = importlib.util.spec_from_file_location("notebook", Path(__file__).parents[2] / "examples" / "notebook.py")
    notebook = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(notebook)
    monkeypatch.chdir(tmp_path)
    notebook.main(str(run / "tiny"), "toy")
    assert sorted(p.name for p in tmp_path.glob("toy_steps*.png")) == ["toy_steps1.png", "toy_steps2.png",
                                                                      "toy_steps4.png"]
