"""train -> sample -> evaluate -> report through the CLI, on the toy plugin."""

import json

import numpy as np
import polars as pl

from spheregen.cli import main


def test_run_writes_report(toy_registries, tiny_experiment, tmp_path, capsys):
    exp = tiny_experiment()
    dirs = ["--runs-dir", str(tmp_path / "runs"), "--reports-dir", str(tmp_path / "reports")]
    assert main(["run", str(exp), *dirs]) == 0
    report = tmp_path / "reports" / "tiny"
    df = pl.read_parquet(report / "results.parquet")
    assert df["steps"].to_list() == [1, 2] and df["method"].unique().to_list() == ["toy"]
    for col in ("nfe", "gflops_per_image", "gflops_paper", "images_per_s", "params", "config_hash"):
        assert df[col].null_count() == 0, col
    assert (df["gflops_per_image"][1] > df["gflops_per_image"][0])
    assert (report / "results.md").read_text().count("| toy | toy-loop |") == 2
    for col in ("latency_b1_s", "peak_memory_mb", "plugin_versions", "spheregen_version"):
        assert df[col].null_count() == 0, col
    versions = json.loads(df["plugin_versions"][0])
    assert versions["dataset:digits"].startswith("spheregen==") and versions["method:toy-ae"] == "in-process==-"
    # the toy method is its own autoencoder: one reconstruction row on the 10% held-out digits
    tok = pl.read_parquet(report / "tokenizers.parquet")
    assert tok["tokenizer"].to_list() == ["toy (own autoencoder)"] and tok["methods"].to_list() == ["toy"]
    assert tok["num_images"][0] > 100 and 0 < tok["psnr"][0] < 60
    assert "Tokenizers: reconstruction" in (report / "results.md").read_text()
    assert (report / "grid_toy_steps1.png").is_file() and (report / "grid_toy_steps2.png").is_file()
    resolved = json.loads((report / "config.resolved.json").read_text())
    assert resolved["experiment"]["methods"][0]["method"]["name"] == "toy-ae"
    with np.load(tmp_path / "runs" / "tiny" / "samples" / "toy" / "steps-1.npz") as z:
        assert z["images"].dtype == np.uint8 and z["images"].shape == (40, 1, 8, 8)
        assert np.bincount(z["labels"]).tolist() == [4] * 10
    # a second run skips training, and report alone rebuilds from the files
    capsys.readouterr()
    assert main(["run", str(exp), *dirs]) == 0
    assert "already trained" in capsys.readouterr().out
    (report / "results.md").unlink()
    assert main(["report", str(exp), *dirs]) == 0 and (report / "results.md").is_file()


def test_same_seed_same_samples(toy_registries, tiny_experiment, tmp_path):
    exp = tiny_experiment()
    for d in ("a", "b"):
        assert main(["train", str(exp), "--runs-dir", str(tmp_path / d)]) == 0
        assert main(["sample", str(exp), "--runs-dir", str(tmp_path / d)]) == 0
    for steps in (1, 2):
        with np.load(tmp_path / "a" / "tiny" / "samples" / "toy" / f"steps-{steps}.npz") as a, \
                np.load(tmp_path / "b" / "tiny" / "samples" / "toy" / f"steps-{steps}.npz") as b:
            assert np.array_equal(a["images"], b["images"])


def test_two_metrics_with_one_key_are_refused(toy_registries, tiny_experiment, tmp_path, capsys):
    tiny = '{ name = "fid", features = "domain-classifier", classifier = { width = 8, epochs = 1 } }'
    exp = tiny_experiment(f"metrics = [{tiny}, {tiny.replace('width = 8', 'width = 4')}]")
    assert main(["run", str(exp), "--runs-dir", str(tmp_path / "runs"), "--reports-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "eval.metrics" in err and "both report 'fid'" in err
    assert not (tmp_path / "runs" / "tiny" / "toy").exists()  # refused before any training


def test_reevaluating_one_method_keeps_the_tokenizer_users(toy_registries, tiny_experiment, tmp_path):
    import attrs

    from spheregen.results import write_results
    from spheregen.experiment import load_experiment
    from spheregen.workspace import Workspace

    exp = load_experiment(tiny_experiment())
    exp = attrs.evolve(exp, methods=(exp.methods[0], attrs.evolve(exp.methods[0], name="toy2")))
    ws = Workspace(exp, tmp_path / "runs", tmp_path / "reports")
    tok = {"tokenizer": "t", "config_hash": "abc", "rfid": 1.0, "psnr": 20.0, "num_images": 5, "features": "f"}
    write_results(ws, [{"method": "toy", "steps": 1}, {"method": "toy2", "steps": 1}],
                  [{**tok, "methods": "toy"}, {**tok, "methods": "toy2"}])
    write_results(ws, [{"method": "toy", "steps": 1}], [{**tok, "methods": "toy", "rfid": 2.0}])
    rows = pl.read_parquet(ws.paths.report / "tokenizers.parquet").to_dicts()
    assert len(rows) == 1 and rows[0]["methods"] == "toy, toy2" and rows[0]["rfid"] == 2.0


def test_results_rows_follow_the_experiments_method_order(toy_registries, tiny_experiment, tmp_path):
    """Whichever job of ``run --jobs`` writes first, results.parquet, guidance.parquet and
    tokenizers.parquet list the methods in the experiment's order, each method's rows in
    their own order."""
    import attrs

    from spheregen.results import write_results
    from spheregen.experiment import load_experiment
    from spheregen.workspace import Workspace

    exp = load_experiment(tiny_experiment())
    exp = attrs.evolve(exp, methods=(attrs.evolve(exp.methods[0], name="zeta"), attrs.evolve(exp.methods[0], name="alpha")))
    files = []
    for first, second in (("zeta", "alpha"), ("alpha", "zeta")):
        ws = Workspace(exp, tmp_path / first / "runs", tmp_path / first / "reports")
        for name in (first, second):
            tokenizer = {"tokenizer": "t", "config_hash": f"tok-{name}", "rfid": 1.0, "psnr": 20.0,
                         "num_images": 5, "features": "f", "methods": name}
            write_results(ws, [{"method": name, "steps": s} for s in (4, 1)], [tokenizer],
                          guidance_rows=[{"method": name, "guidance": 2.0}])
        files.append([pl.read_parquet(ws.paths.report / f"{n}.parquet") for n in ("results", "guidance", "tokenizers")])
    assert all(a.equals(b) for a, b in zip(*files))
    assert files[0][0].rows() == [("zeta", 4), ("zeta", 1), ("alpha", 4), ("alpha", 1)]
    assert files[0][1]["method"].to_list() == ["zeta", "alpha"] == files[0][2]["methods"].to_list()


def test_a_rescored_tokenizer_replaces_its_old_row(toy_registries, tiny_experiment, tmp_path):
    """A method's tokenizer scored again under another identity (retrained weights, other
    features) replaces the old row instead of standing beside it; a tokenizer of a method
    that was not re-evaluated keeps its row."""
    import attrs

    from spheregen.results import write_results
    from spheregen.experiment import load_experiment
    from spheregen.workspace import Workspace

    exp = load_experiment(tiny_experiment())
    exp = attrs.evolve(exp, methods=(exp.methods[0], attrs.evolve(exp.methods[0], name="toy2")))
    ws = Workspace(exp, tmp_path / "runs", tmp_path / "reports")
    tok = {"tokenizer": "t", "rfid": 1.0, "psnr": 20.0, "num_images": 5, "features": "f"}
    write_results(ws, [{"method": "toy", "steps": 1}, {"method": "toy2", "steps": 1}],
                  [{**tok, "config_hash": "old", "methods": "toy"}, {**tok, "config_hash": "two", "methods": "toy2"}])
    write_results(ws, [{"method": "toy", "steps": 1}], [{**tok, "config_hash": "new", "methods": "toy", "rfid": 2.0}])
    rows = {r["config_hash"]: r for r in pl.read_parquet(ws.paths.report / "tokenizers.parquet").to_dicts()}
    assert set(rows) == {"new", "two"} and rows["new"]["rfid"] == 2.0
    # a tokenizer shared by both methods: re-scoring one method under a new identity
    # leaves the old row to the other
    write_results(ws, [{"method": "toy", "steps": 1}, {"method": "toy2", "steps": 1}],
                  [{**tok, "config_hash": "shared", "methods": "toy"}, {**tok, "config_hash": "shared", "methods": "toy2"}])
    write_results(ws, [{"method": "toy", "steps": 1}], [{**tok, "config_hash": "mine", "methods": "toy"}])
    rows = {r["config_hash"]: r["methods"] for r in pl.read_parquet(ws.paths.report / "tokenizers.parquet").to_dicts()}
    assert rows == {"shared": "toy2", "mine": "toy"}
