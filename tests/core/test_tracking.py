"""Evaluation results in the trackers of ``[train] log_with`` (spheregen.tracking)."""

from __future__ import annotations

import pytest

from spheregen.cli import main


def test_evaluate_logs_metrics_and_sample_grids_to_the_training_run(toy_registries, tiny_experiment, tmp_path,
                                                                      capsys):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    exp = tiny_experiment('metrics = [{ name = "toy-score" }]')
    exp.write_text(exp.read_text().replace("log_every = 1\n", 'log_every = 1\nlog_with = ["tensorboard"]\n', 1))
    code = main(["run", str(exp), "--runs-dir", str(tmp_path / "runs"), "--reports-dir", str(tmp_path / "reports")])
    assert code == 0, capsys.readouterr().err
    # the run folder and name its training logged to
    events = EventAccumulator(str(tmp_path / "runs" / "tiny" / "toy" / "tracking" / "toy"),
                              size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    scalars, images = events.Tags()["scalars"], events.Tags()["images"]
    assert "train/loss" in scalars
    for steps in (1, 2):
        assert f"eval/toy_score@steps={steps}" in scalars and f"eval/samples@steps={steps}" in images
    (score,) = events.Scalars("eval/toy_score@steps=1")
    assert score.step == 6 and 0 < score.value < 1
    (grid,) = events.Images("eval/samples@steps=2")
    assert grid.step == 6 and grid.width > 8 * 8  # 8 images of 8×8 per row, padded
    assert not any(t.startswith("eval/train_") or t.startswith("eval/params") for t in scalars)
