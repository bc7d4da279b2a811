"""`spheregen train --extend-to N`: a finished run continued to a larger budget is neither
the run it continued nor a fresh run of the larger budget, and every stage knows which
weights it reads."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import attrs
import polars as pl
import pytest
import torch

from spheregen.artifacts import read_final
from spheregen.experiment import load_experiment
from spheregen.workspace import Workspace
from toy_runs import dirs, run_main

SIX = ("--set", "methods.toy.train.steps=6")


def four_steps(tiny_experiment, root: Path) -> Path:
    """The tiny experiment at train.steps = 4 (checkpoints every 3 steps and at the end)."""
    path = tiny_experiment()
    out = root / "four.toml"
    out.write_text(path.read_text().replace("steps = 6\n", "steps = 4\n", 1))
    return out


def six(exp: Path, root: Path) -> tuple[Workspace, object]:
    ws = Workspace(load_experiment(exp, [SIX[1]]), root / "runs", root / "reports")
    return ws, ws.exp.methods[0]


@pytest.fixture
def extended(toy_registries, tiny_experiment, tmp_path, capsys):
    """A 4-step run extended to 6: (experiment, the 4-step final folder's contents)."""
    exp = four_steps(tiny_experiment, tmp_path)
    assert run_main(capsys, "train", exp, *dirs(tmp_path))[0] == 0
    before = read_final(tmp_path / "runs" / "tiny" / "toy" / "final")
    code, err = run_main(capsys, "train", exp, *dirs(tmp_path), "--extend-to", 6)
    assert code == 0, err
    return exp, before


def test_an_extension_continues_on_the_longer_schedule_under_its_own_identity(extended, tmp_path):
    from spheregen.runner import lr_lambda, run_hash

    exp, (model4, _, meta4) = extended
    run = tmp_path / "runs" / "tiny" / "toy"
    model, _, meta = read_final(run / "final")
    ws, entry = six(exp, tmp_path)
    assert meta["step"] == 6 and meta["extended_from"] == [4]
    # neither the 4-step run nor a fresh 6-step run; stages given steps = 6 find it
    assert meta["config_hash"] == run_hash(ws, entry, (4,)) == run_hash(ws, entry)
    assert meta["config_hash"] not in (run_hash(ws, entry, ()), meta4["config_hash"])
    assert any(not torch.equal(model[k], model4[k]) for k in model)
    record = json.loads((run / "run.json").read_text())
    assert record["config_hash"] == meta["config_hash"] and record["extended_from"] == [4]
    assert [(h["from_steps"], h["to_steps"], h["from_hash"]) for h in record["history"]] == \
        [(4, 6, meta4["config_hash"])]
    assert json.loads((run / "checkpoints" / "step-0000006" / "step.json").read_text())["extended_from"] == [4]
    # steps 1-4 followed the 4-step schedule (ending at its minimum), 5-6 follow the
    # 6-step one from step 4 on (param group 0: lr 0.01 × lr_scale 0.1)
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    f4, f6 = lr_lambda(attrs.evolve(entry.train, steps=4)), lr_lambda(entry.train)
    assert log[3]["lr"] == pytest.approx(1e-3 * f4(4)) and f4(4) == pytest.approx(0.01)  # min_lr_ratio
    assert log[4]["lr"] == pytest.approx(1e-3 * f6(5)) and log[4]["lr"] > 5 * log[3]["lr"]


def test_later_stages_take_the_extended_weights_at_the_new_budget_only(extended, tmp_path, capsys):
    exp, _ = extended
    assert run_main(capsys, "sample", exp, *dirs(tmp_path), *SIX)[0] == 0
    assert run_main(capsys, "evaluate", exp, *dirs(tmp_path), *SIX)[0] == 0
    rows = pl.read_parquet(tmp_path / "reports" / "tiny" / "results.parquet")
    meta = json.loads((tmp_path / "runs" / "tiny" / "toy" / "final" / "config.json").read_text())
    assert rows["extended_from"].to_list() == ["4", "4"] and rows["train_steps"].to_list() == [6, 6]
    assert set(rows["train_hash"].to_list()) == {meta["config_hash"]}
    # the 4-step config does not take them for its own
    for command in ("sample", "evaluate"):
        code, err = run_main(capsys, command, exp, *dirs(tmp_path))
        assert code == 2 and "extended from [4] to 6 steps" in err and "train.steps = 6" in err, err


def test_an_extension_is_refused_with_the_fix(toy_registries, tiny_experiment, tmp_path, capsys):
    exp = four_steps(tiny_experiment, tmp_path)
    code, err = run_main(capsys, "train", exp, *dirs(tmp_path), "--extend-to", 6)
    assert code == 2 and "no run of method 'toy' to extend" in err and "spheregen train" in err
    assert run_main(capsys, "train", exp, *dirs(tmp_path))[0] == 0
    for n in (4, 3):
        code, err = run_main(capsys, "train", exp, *dirs(tmp_path), "--extend-to", n)
        assert code == 2 and "train.steps = 4" in err and "more steps" in err
    code, err = run_main(capsys, "train", exp, *dirs(tmp_path), "--extend-to", 6, "--resume")
    assert code == 2 and "leave out --resume and --fresh" in err
    code, err = run_main(capsys, "train", exp, *dirs(tmp_path), "--extend-to", 6, "--set", "train.lr=0.02")
    assert code == 2 and "another config" in err and "train.lr: run 0.01, config 0.02" in err
    run = tmp_path / "runs" / "tiny" / "toy"
    for ckpt in (run / "checkpoints").iterdir():
        for f in ckpt.iterdir():
            f.unlink()
        ckpt.rmdir()
    code, err = run_main(capsys, "train", exp, *dirs(tmp_path), "--extend-to", 6)
    assert code == 2 and "no checkpoint of the finished run (step 4)" in err and "--fresh" in err
    (run / "final" / "weights.safetensors").unlink()
    code, err = run_main(capsys, "train", exp, *dirs(tmp_path), "--extend-to", 6)
    assert code == 2 and "is not finished" in err and "--resume" in err
    assert not (run / "final" / "weights.safetensors").exists()


def test_a_fresh_run_of_the_new_budget_is_not_the_extended_one(extended, tmp_path, capsys):
    from spheregen.runner import run_hash

    exp, _ = extended
    run = tmp_path / "runs" / "tiny" / "toy"
    extended_model = read_final(run / "final")[0]
    assert run_main(capsys, "sample", exp, *dirs(tmp_path), *SIX)[0] == 0
    assert run_main(capsys, "train", exp, *dirs(tmp_path), *SIX, "--fresh")[0] == 0
    model, _, meta = read_final(run / "final")
    ws, entry = six(exp, tmp_path)
    assert meta["extended_from"] == [] and meta["config_hash"] == run_hash(ws, entry, ()) == run_hash(ws, entry)
    assert "extended_from" not in json.loads((run / "run.json").read_text())
    assert any(not torch.equal(model[k], extended_model[k]) for k in model)
    # the samples drawn from the extended weights are not scored as the fresh run's
    code, err = run_main(capsys, "evaluate", exp, *dirs(tmp_path), *SIX)
    assert code == 2 and "sampled under another config" in err and "train_hash" in err


def test_an_interrupted_extension_is_continued_by_extending_again(toy_registries, tiny_experiment, tmp_path, capsys,
                                                                 monkeypatch):
    from spheregen.runner import Loop

    exp = four_steps(tiny_experiment, tmp_path)
    ref = tmp_path / "ref"
    assert run_main(capsys, "train", exp, *dirs(ref))[0] == 0
    assert run_main(capsys, "train", exp, *dirs(ref), "--extend-to", 6)[0] == 0
    assert run_main(capsys, "train", exp, *dirs(tmp_path))[0] == 0
    def sigterm_after_step_5(self, stop, last):
        if self.step == 5:
            stop.signum = signal.SIGTERM
        return self.step == 5, False

    with monkeypatch.context() as m:
        m.setattr(Loop, "_agree", sigterm_after_step_5)
        code, err = run_main(capsys, "train", exp, *dirs(tmp_path), "--extend-to", 6)
    assert code == 75 and "continue with --extend-to 6" in err
    run = tmp_path / "runs" / "tiny" / "toy"
    # until it finishes, the folder's final weights are the 4-step run's, usable as such
    assert read_final(run / "final")[2]["step"] == 4
    assert run_main(capsys, "sample", exp, *dirs(tmp_path))[0] == 0
    code, err = run_main(capsys, "train", exp, *dirs(tmp_path), "--resume")
    assert code == 2 and "another config" in err and "--extend-to 6" in err
    assert run_main(capsys, "train", exp, *dirs(tmp_path), "--extend-to", 6)[0] == 0
    a, b = read_final(ref / "runs" / "tiny" / "toy" / "final")[0], read_final(run / "final")[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # as if never stopped
