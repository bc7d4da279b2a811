"""A killed job and bad input cost minutes, not results."""

from __future__ import annotations

import json
import signal
import time

from toy_runs import assert_same_final, start_toy_train, toy_cli


def test_sigkill_then_resume_is_bit_identical(tiny_experiment, tmp_path):
    methods = ('[[methods]]\nname = "toy"\nmethod = "toy-ae"\n[methods.train]\nsteps = 200\n'
               'checkpoint_every = 40\nema_decay = 0.9\n')
    exp = tiny_experiment("", methods)
    ref = toy_cli("train", exp, "--runs-dir", tmp_path / "ref", cwd=tmp_path)
    assert ref.returncode == 0, ref.stderr
    proc = start_toy_train(exp, tmp_path / "killed", tmp_path)
    ckpts = tmp_path / "killed" / "tiny" / "toy" / "checkpoints"
    deadline = time.time() + 120
    while not (ckpts / "step-0000080").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "tiny" / "toy" / "final").exists(), "killed too late: the run finished"
    resumed = toy_cli("train", exp, "--runs-dir", tmp_path / "killed", "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_final(tmp_path / "ref" / "tiny" / "toy" / "final", tmp_path / "killed" / "tiny" / "toy" / "final")
    # the last checkpoints hold model, optimizer, scheduler, EMA and every RNG stream:
    # their manifests list each file's sha256, so equal manifests mean bit-identical state
    last = "checkpoints/step-0000200/manifest.json"
    ma = json.loads((tmp_path / "ref" / "tiny" / "toy" / last).read_text())
    mb = json.loads((tmp_path / "killed" / "tiny" / "toy" / last).read_text())
    # (step.json also records the training wall time, which differs)
    state = lambda m: {k: v for k, v in m["files"].items() if k != "step.json"}  # noqa: E731
    assert state(ma) == state(mb) and any(n.startswith("random_states") for n in ma["files"])
    assert any(n.startswith("optimizer") for n in ma["files"])
