"""Two CPU processes (gloo) under accelerate follow the single-process run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]


def _train_worker():
    """Runs in each launched process: toy plugin, tiny experiment, train."""
    import sys

    sys.path.insert(0, str(ROOT))
    import toy_plugin
    from accelerate import Accelerator

    from spheregen import plugins
    from spheregen.experiment import load_experiment
    from spheregen.runner import train
    from spheregen.workspace import Workspace

    plugins.set_registries(plugins.build_registries(extra=[("toy", toy_plugin)]))
    exp = load_experiment(os.environ["SG_TEST_EXP"])
    ws = Workspace(exp, os.environ["SG_TEST_RUNS"], os.environ["SG_TEST_RUNS"] + "-reports")
    acc = Accelerator(cpu=True)
    train(ws, exp.methods[0], accelerator=acc, progress=False)


def _losses(runs: Path) -> list[float]:
    log = runs / "tiny" / "toy" / "train_log.jsonl"
    return [json.loads(line)["loss"] for line in log.read_text().splitlines()]


def _launch(num_processes: int, exp: Path, runs: Path) -> None:
    """debug_launcher in a fresh interpreter: forking this (already multi-threaded) test
    process can deadlock in OpenMP, so the workers fork from a clean parent."""
    code = ("import sys; sys.path.insert(0, %r); from core.test_distributed import _train_worker; "
            "from accelerate import debug_launcher; debug_launcher(_train_worker, num_processes=%d)"
            % (str(ROOT), num_processes))
    env = {**os.environ, "SG_TEST_EXP": str(exp), "SG_TEST_RUNS": str(runs), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]


def test_two_processes_follow_one(toy_registries, tiny_experiment, tmp_path):
    methods = '[[methods]]\nname = "toy"\nmethod = "toy-ae"\n[methods.train]\nsteps = 8\ncheckpoint_every = 4\n'
    one = tiny_experiment("", methods.replace("steps = 8", "steps = 8\nbatch_size = 16"))
    _launch(1, one, tmp_path / "one")
    _launch(2, one, tmp_path / "two")  # the same file: train.batch_size is the global batch
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(a) == len(b) == 8
    # same global batches and the same initial weights; the per-process noise draws
    # differ, so the curves agree within noise rather than bit for bit
    assert abs(a[-1] - b[-1]) < 0.25 * a[0] and b[-1] < b[0]
    # only the main process writes: one log line per step, one manifest per checkpoint
    ckpts = sorted(p.name for p in (tmp_path / "two" / "tiny" / "toy" / "checkpoints").iterdir())
    assert ckpts == ["step-0000004", "step-0000008"]
    files = sorted(p.name for p in (tmp_path / "two" / "tiny" / "toy" / "checkpoints" / "step-0000008").iterdir())
    assert "random_states_1.pkl" in files and files.count("manifest.json") == 1
