"""A killed job and bad input cost minutes, not results."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from spheregen.artifacts import read_final

TOY_CLI = Path(__file__).resolve().parents[1] / "toy_cli.py"


def cli(*args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(TOY_CLI), *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=300)


def test_sigkill_then_resume_is_bit_identical(tiny_experiment, tmp_path):
    methods = ('[[methods]]\nname = "toy"\nmethod = "toy-ae"\n[methods.train]\nsteps = 200\n'
               'checkpoint_every = 40\nema_decay = 0.9\n')
    exp = tiny_experiment("", methods)
    ref = cli("train", exp, "--runs-dir", tmp_path / "ref", cwd=tmp_path)
    assert ref.returncode == 0, ref.stderr
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, str(TOY_CLI), "train", str(exp), "--runs-dir", str(tmp_path / "killed")],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = tmp_path / "killed" / "tiny" / "toy" / "checkpoints"
    deadline = time.time() + 120
    while not (ckpts / "step-0000080").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "tiny" / "toy" / "final").exists(), "killed too late: the run finished"
    resumed = cli("train", exp, "--runs-dir", tmp_path / "killed", "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    a = read_final(tmp_path / "ref" / "tiny" / "toy" / "final")
    b = read_final(tmp_path / "killed" / "tiny" / "toy" / "final")
    for part in (0, 1):  # model, EMA
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    # the last checkpoints hold model, optimizer, scheduler, EMA and every RNG stream:
    # their manifests list each file's sha256, so equal manifests mean bit-identical state
    last = "checkpoints/step-0000200/manifest.json"
    ma = json.loads((tmp_path / "ref" / "tiny" / "toy" / last).read_text())
    mb = json.loads((tmp_path / "killed" / "tiny" / "toy" / last).read_text())
    assert ma["files"] == mb["files"] and any(n.startswith("random_states") for n in ma["files"])
    assert any(n.startswith("optimizer") for n in ma["files"])
