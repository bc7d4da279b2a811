"""Training cost per method (spheregen.cost): wall time and device-hours kept through
resumes, FLOPs counted once per run and multiplied by the images seen."""

from __future__ import annotations

import json

import pytest
import torch

from spheregen.experiment import load_experiment
from spheregen.runner import list_checkpoints, run_hash, train, write_manifest
from spheregen.workspace import Workspace


@pytest.fixture
def trained(toy_registries, tiny_experiment, tmp_path):
    ws = Workspace(load_experiment(tiny_experiment()), tmp_path / "runs", tmp_path / "reports")
    train(ws, ws.exp.methods[0], progress=False)
    return ws, ws.exp.methods[0]


def test_training_cost_columns(trained, monkeypatch):
    from spheregen import cost
    from spheregen.flops import count_training_flops

    ws, entry = trained
    c = cost.training_cost(ws, entry)
    assert c["train_wall_s"] > 0 and c["train_device_hours"] == pytest.approx(c["train_wall_s"] / 3600)
    trained_on = "cuda" if torch.cuda.is_available() else "cpu"  # as runner.make_accelerator
    assert c["train_processes"] == 1 and c["train_device"] == trained_on and c["extended_from"] is None
    images = 6 * 16  # steps × global batch
    assert c["train_gflops_per_image"] > 0
    assert c["train_gflops_total"] == pytest.approx(c["train_gflops_per_image"] * images)
    # placeholder weights count what the real method counts
    real = count_training_flops(ws.build_method(entry), (1, 8, 8), 10, batch=cost.COUNT_BATCH).total
    assert c["train_gflops_per_image"] == pytest.approx(real / 1e9)
    # counted once per run: evaluate reads the cache
    assert (ws.paths.run(entry.name) / cost.CACHE).is_file()
    monkeypatch.setattr(cost, "_count", lambda *a: pytest.fail("counted again"))
    assert cost.training_cost(ws, entry) == c


def test_wall_time_survives_a_resume(trained):
    from spheregen.cost import training_cost

    ws, entry = trained
    run = ws.paths.run(entry.name)
    first = json.loads((ws.paths.final(entry.name).parent / "config.json").read_text())["train_cost"]
    # back to the step-3 checkpoint as a preemption would leave it, with 1,000 s of
    # training recorded there (the manifest resealed)
    ckpt3, ckpt6 = list_checkpoints(run / "checkpoints")
    record = json.loads((ckpt3 / "step.json").read_text())
    assert 0 < record["train_wall_s"] <= first["train_wall_s"] and record["processes"] == 1
    (ckpt3 / "step.json").write_text(json.dumps({**record, "train_wall_s": 1000.0, "train_device_s": 1000.0}))
    (ckpt3 / "manifest.json").unlink()
    write_manifest(ckpt3, 3, run_hash(ws, entry))
    for f in ckpt6.iterdir():
        f.unlink()
    ckpt6.rmdir()
    train(ws, entry, resume=True, progress=False)
    c = training_cost(ws, entry)
    assert 1000 < c["train_wall_s"] < 1300  # the recorded 1,000 s plus steps 4-6 of this launch
    assert c["train_device_hours"] == pytest.approx(c["train_wall_s"] / 3600)


def test_every_builtin_method_is_counted(toy_registries, tiny_experiment, tmp_path):
    """The counted step runs each built-in method's real loss (the Sphere Encoder's
    stratified noise needs at least 3 images per batch)."""
    from spheregen import cost

    methods = '''[[methods]]
name = "se"
method = { name = "sphere-encoder", size = "tiny", patch_size = 4, compression_ratio = 1.5, mixer_depth = 1 }
[[methods]]
name = "fm"
method = { name = "flow-matching", tokenizer = { name = "patch", patch_size = 1 }, denoiser = { name = "dit", width = 32, depth = 1, heads = 2, patch_size = 2 } }
'''
    ws = Workspace(load_experiment(tiny_experiment(methods=methods)), tmp_path / "runs", tmp_path / "reports")
    for entry in ws.exp.methods:
        assert cost.per_image_flops(ws, entry) > 0, entry.name
