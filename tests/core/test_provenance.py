"""Numbers that can be trusted: no write or delete outside the project, one writer per
run, every stage checks the provenance of what it reads, data identified by content,
preemption saves a checkpoint, and each fault is an exit-2 message naming the file."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from PIL import Image

from spheregen.cli import main
from toy_runs import assert_same_final, dirs, run_main, start_toy_train, toy_cli

def edited(path: Path, old: str, new: str) -> Path:
    text = path.read_text()
    assert old in text, old
    out = path.with_name(f"edited-{abs(hash((old, new)))}.toml")
    out.write_text(text.replace(old, new, 1))
    return out


# ---------------------------------------------------------------- names and paths


def test_fresh_never_deletes_a_folder_spheregen_did_not_create(toy_registries, tiny_experiment, tmp_path, capsys):
    exp = tiny_experiment()
    theirs = tmp_path / "runs" / "tiny" / "toy"
    theirs.mkdir(parents=True)
    (theirs / "thesis.tex").write_text("months of work")
    code, err = run_main(capsys, "train", exp, *dirs(tmp_path), "--fresh")
    assert code == 2 and "was not created by spheregen" in err and str(theirs) in err
    assert (theirs / "thesis.tex").read_text() == "months of work"
    code, err = run_main(capsys, "train", exp, *dirs(tmp_path))
    assert code == 2 and "thesis.tex" in err and (theirs / "thesis.tex").is_file()


def test_fresh_deletes_its_own_run(toy_registries, tiny_experiment, tmp_path, capsys):
    exp = tiny_experiment()
    assert run_main(capsys, "train", exp, *dirs(tmp_path))[0] == 0
    stray = tmp_path / "runs" / "tiny" / "toy" / "checkpoints" / "step-9999999"
    stray.mkdir()
    assert run_main(capsys, "train", exp, *dirs(tmp_path), "--fresh")[0] == 0
    assert not stray.exists() and (tmp_path / "runs" / "tiny" / "toy" / "final" / "weights.safetensors").is_file()


def test_fresh_on_a_run_that_never_existed_trains(toy_registries, tiny_experiment, tmp_path, capsys):
    # the run's lock is taken before --fresh clears the folder: a folder holding only
    # that lock is new, not someone else's
    exp = tiny_experiment()
    assert run_main(capsys, "train", exp, *dirs(tmp_path), "--fresh")[0] == 0
    assert (tmp_path / "runs" / "tiny" / "toy" / "final" / "weights.safetensors").is_file()


def test_every_path_is_checked_to_lie_inside_its_root(tmp_path):
    from spheregen.errors import SpheregenError
    from spheregen.paths import Paths, inside, remove_owned

    paths = Paths(tmp_path / "runs", tmp_path / "reports", "exp")
    assert paths.run("m") == tmp_path / "runs" / "exp" / "m"
    for bad in ("../../etc", "/abs"):
        with pytest.raises(SpheregenError, match="not inside"):
            paths.run(bad)
    with pytest.raises(SpheregenError, match="not inside"):
        Paths(tmp_path / "runs", tmp_path / "reports", "..").report
    with pytest.raises(SpheregenError, match="not inside"):
        inside(tmp_path, tmp_path)
    victim = tmp_path / "victim"
    victim.mkdir()
    with pytest.raises(SpheregenError, match="not inside"):
        remove_owned(victim, tmp_path / "runs")
    assert victim.is_dir()


# ---------------------------------------------------------------- locks


def test_a_second_writer_is_refused_with_the_holder(toy_registries, tiny_experiment, tmp_path, capsys):
    from spheregen.paths import DirLock

    exp = tiny_experiment()
    run_dir = tmp_path / "runs" / "tiny" / "toy"
    with DirLock(run_dir, "run folder"):
        code, err = run_main(capsys, "train", exp, *dirs(tmp_path), "--fresh")
    assert code == 2 and "in use by another spheregen process" in err
    assert f"pid {os.getpid()}" in err and socket.gethostname() in err
    # the lock died with its holder: the file left behind is stale and simply taken over
    assert (run_dir / ".spheregen-lock").is_file()
    assert run_main(capsys, "train", exp, *dirs(tmp_path))[0] == 0


def test_a_lock_held_by_another_process_refuses_and_is_freed_by_its_death(tmp_path):
    from spheregen.errors import SpheregenError
    from spheregen.paths import DirLock

    folder = tmp_path / "run"
    code = f"from spheregen.paths import DirLock; import time; DirLock(__import__('pathlib').Path({str(folder)!r}), 'x').acquire(); print('held', flush=True); time.sleep(60)"
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SpheregenError, match=f"pid {holder.pid}"):
            DirLock(folder, "run folder").acquire()
    finally:
        holder.kill()
        holder.wait()
    DirLock(folder, "run folder").acquire().release()  # SIGKILL released it


# ---------------------------------------------------------------- provenance


@pytest.fixture
def trained(toy_registries, tiny_experiment, tmp_path, capsys):
    exp = tiny_experiment()
    assert run_main(capsys, "run", exp, *dirs(tmp_path))[0] == 0
    return exp


def test_resume_refuses_a_checkpoint_of_another_config(trained, tmp_path, capsys):
    other = edited(trained, "lr = 0.01", "lr = 0.02")
    # the run.json guard and the checkpoint guard each refuse; remove run.json to reach the second
    (tmp_path / "runs" / "tiny" / "toy" / "run.json").unlink()
    code, err = run_main(capsys, "train", other, *dirs(tmp_path), "--resume")
    assert code == 2 and "written by a run of another config" in err and "--fresh" in err


def test_resume_refuses_a_checkpoint_beyond_the_budget(trained, tmp_path, capsys):
    from spheregen.config import config_hash  # noqa: F401  (the hash is recomputed by the trainer)

    run = tmp_path / "runs" / "tiny" / "toy"
    fewer = edited(trained, "steps = 6", "steps = 4")
    meta = json.loads((run / "run.json").read_text())
    # a run of the 4-step config whose checkpoint claims step 6 (the a.toml / b.toml race)
    from spheregen.experiment import load_experiment
    from spheregen.runner import run_hash
    from spheregen.workspace import Workspace

    ws = Workspace(load_experiment(fewer), tmp_path / "runs", tmp_path / "reports")
    h = run_hash(ws, ws.exp.methods[0])
    (run / "run.json").write_text(json.dumps({**meta, "config_hash": h}))
    manifest = run / "checkpoints" / "step-0000006" / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "config_hash": h}))
    code, err = run_main(capsys, "train", fewer, *dirs(tmp_path), "--resume")
    assert code == 2 and "beyond train.steps = 4" in err


def test_sample_refuses_weights_of_another_config(trained, tmp_path, capsys):
    other = edited(trained, "lr = 0.01", "lr = 0.03")
    code, err = run_main(capsys, "sample", other, *dirs(tmp_path))
    assert code == 2 and "trained with another config" in err and "spheregen train" in err


def test_evaluate_refuses_samples_of_another_guidance(trained, tmp_path, capsys):
    before = (tmp_path / "reports" / "tiny" / "results.parquet").read_bytes()
    other = edited(trained, 'method = "toy-ae"', 'method = "toy-ae"\nguidance = 4.0')
    code, err = run_main(capsys, "evaluate", other, *dirs(tmp_path))
    assert code == 2 and "sampled under another config" in err and "guidance: file 1.0, config 4.0" in err
    assert (tmp_path / "reports" / "tiny" / "results.parquet").read_bytes() == before
    # re-sampling makes it consistent again
    assert run_main(capsys, "sample", other, *dirs(tmp_path))[0] == 0
    assert run_main(capsys, "evaluate", other, *dirs(tmp_path))[0] == 0
    rows = pl.read_parquet(tmp_path / "reports" / "tiny" / "results.parquet")
    assert set(rows["guidance"].to_list()) == {4.0}


def test_report_refuses_rows_of_another_config(trained, tmp_path, capsys):
    other = edited(trained, "num_samples = 40", "num_samples = 60")
    code, err = run_main(capsys, "report", other, *dirs(tmp_path))
    assert code == 2 and "computed under another config" in err and "spheregen evaluate" in err


def test_result_rows_record_their_provenance(trained, tmp_path):
    rows = pl.read_parquet(tmp_path / "reports" / "tiny" / "results.parquet")
    for col in ("eval_hash", "train_hash", "sample_hash", "data_key"):
        assert rows[col].null_count() == 0, col
    meta = json.loads(str(np.load(tmp_path / "runs" / "tiny" / "samples" / "toy" / "steps-1.npz")["meta"]))
    run = json.loads((tmp_path / "runs" / "tiny" / "toy" / "run.json").read_text())
    assert meta["train_hash"] == run["config_hash"] == rows["train_hash"][0]
    assert meta["steps"] == 1 and meta["guidance"] == 1.0 and meta["seed"] == 2


# ---------------------------------------------------------------- data identity


def _folder(root: Path, shade: int) -> None:
    for c in ("a", "b"):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(6):
            Image.new("L", (8, 8), color=shade + i).save(root / c / f"{i}.png")


def test_data_identity_follows_the_content_and_the_absolute_path(toy_registries, tmp_path, monkeypatch):
    from spheregen.experiment import experiment_from_dict
    from spheregen.workspace import Workspace

    def key(cwd: Path) -> tuple[str, int]:
        monkeypatch.chdir(cwd)
        exp = experiment_from_dict({"name": "d", "data": {"source": {"name": "imagefolder", "path": "imgs"},
                                                          "image_size": 8, "channels": 1},
                                    "methods": [{"name": "toy", "method": "toy-ae"}]})
        ws = Workspace(exp, tmp_path / "shared-runs", tmp_path / "reports")
        return ws.data.key, int(ws.data.train.images.float().sum())

    _folder(tmp_path / "p1" / "imgs", 10)
    _folder(tmp_path / "p2" / "imgs", 200)
    k1, s1 = key(tmp_path / "p1")
    k2, s2 = key(tmp_path / "p2")
    assert k1 != k2 and s1 != s2  # same relative path, other project: its own images
    for f in (tmp_path / "p1" / "imgs" / "a").iterdir():  # images replaced in place
        Image.new("L", (8, 8), color=99).save(f)
    k3, s3 = key(tmp_path / "p1")
    assert k3 != k1 and s3 != s1


def test_a_corrupt_data_cache_is_named_and_rebuilt(trained, tmp_path, capsys):
    # training streams the data; evaluation's reference is the in-memory cache
    (cache,) = (tmp_path / "runs" / ".cache").glob("data-*.pt")
    cache.write_bytes(b"\0" * 100)
    code, err = run_main(capsys, "evaluate", trained, *dirs(tmp_path))
    assert code == 0 and str(cache) in err and "rebuilding" in err
    assert cache.stat().st_size > 100


# ---------------------------------------------------------------- preemption


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_preemption_checkpoints_and_resume_is_bit_identical(tiny_experiment, tmp_path, sig):
    # no checkpoint cadence at all: only the signal makes the checkpoint
    methods = ('[[methods]]\nname = "toy"\nmethod = "toy-ae"\n[methods.train]\nsteps = 400\n'
               'checkpoint_every = 0\ncheckpoint_minutes = 0.0\nema_decay = 0.9\nlog_every = 1\n')
    exp = tiny_experiment("", methods)
    ref = toy_cli("train", exp, "--runs-dir", tmp_path / "ref", cwd=tmp_path)
    assert ref.returncode == 0, ref.stderr
    proc = start_toy_train(exp, tmp_path / "pre", tmp_path, stderr=subprocess.PIPE)
    log = tmp_path / "pre" / "tiny" / "toy" / "train_log.jsonl"
    deadline = time.time() + 120
    while (not log.is_file() or len(log.read_text().splitlines()) < 50) and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(sig)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 75, err
    assert f"stopped by {signal.Signals(sig).name}" in err and "--resume" in err
    (ckpt,) = (tmp_path / "pre" / "tiny" / "toy" / "checkpoints").glob("step-*")
    stopped = int(ckpt.name.split("-")[1])
    assert 50 <= stopped < 400
    assert not (tmp_path / "pre" / "tiny" / "toy" / "final").exists()
    # lines past the checkpoint (none here, as it saves at the step boundary) are cut on resume
    with open(log, "a") as f:
        f.write(json.dumps({"step": stopped + 1, "loss": 0.0}) + "\n" + '{"step": 4')
    resumed = toy_cli("train", exp, "--runs-dir", tmp_path / "pre", "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_final(tmp_path / "ref" / "tiny" / "toy" / "final", tmp_path / "pre" / "tiny" / "toy" / "final")
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert steps == list(range(1, 401))


def test_time_based_checkpoints_are_on_by_default():
    from spheregen.experiment import TrainConfig

    assert TrainConfig().checkpoint_minutes > 0


# ---------------------------------------------------------------- errors


def test_corrupt_or_empty_sample_files_are_named(trained, tmp_path, capsys):
    f = tmp_path / "runs" / "tiny" / "samples" / "toy" / "steps-2.npz"
    for content in (b"", b"PK\x03\x04 truncated"):
        f.write_bytes(content)
        code, err = run_main(capsys, "evaluate", trained, *dirs(tmp_path))
        assert code == 2 and str(f) in err and "re-run `spheregen sample`" in err


def test_a_corrupt_results_file_is_set_aside_not_blocking(trained, tmp_path, capsys):
    path = tmp_path / "reports" / "tiny" / "results.parquet"
    path.write_bytes(b"not parquet")
    code, err = run_main(capsys, "report", trained, *dirs(tmp_path))
    assert code == 2 and str(path) in err and "spheregen evaluate" in err
    code, err = run_main(capsys, "evaluate", trained, *dirs(tmp_path))
    assert code == 0 and "set aside" in err
    assert len(pl.read_parquet(path)) == 2
    assert [p.read_bytes() for p in path.parent.glob("results.parquet.corrupt-*")] == [b"not parquet"]


def test_non_utf8_toml_is_named(tmp_path, capsys):
    bad = tmp_path / "latin1.toml"
    bad.write_bytes('name = "caf\u00e9"\n'.encode("latin-1"))
    code, err = run_main(capsys, "train", bad, *dirs(tmp_path))
    assert code == 2 and str(bad) in err and "UTF-8" in err


def test_a_full_disk_while_caching_data_leaves_no_temp_file(toy_registries, tiny_experiment, tmp_path, capsys,
                                                             monkeypatch):
    import shutil

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1 << 20))
    code, err = run_main(capsys, "run", tiny_experiment(), *dirs(tmp_path))
    assert code == 2 and "not enough disk space" in err and "data cache" in err
    assert not list((tmp_path / "runs").rglob("*.tmp*"))


def test_a_failed_checkpoint_write_removes_its_partial_folder(toy_registries, tiny_experiment, tmp_path, capsys,
                                                               monkeypatch):
    import accelerate

    def full(self, output_dir, **kw):
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        (Path(output_dir) / "model.safetensors").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(accelerate.Accelerator, "save_state", full)
    code, err = run_main(capsys, "train", tiny_experiment(), *dirs(tmp_path))
    assert code == 2 and "No space left on device" in err and "partial folder was removed" in err
    assert not list((tmp_path / "runs").rglob(".tmp-step-*"))


def test_a_misdirected_reports_folder_fails_before_training(toy_registries, tiny_experiment, tmp_path, capsys):
    (tmp_path / "reports").write_text("a file, not a folder")
    code, err = run_main(capsys, "run", tiny_experiment(), *dirs(tmp_path))
    assert code == 2 and "reports folder" in err and "not writable" in err
    assert not (tmp_path / "runs" / "tiny").exists()


@pytest.mark.parametrize("env, args, expect", [
    ({"SPHEREGEN_THREADS": "two"}, [], "SPHEREGEN_THREADS must be a positive integer"),
    ({}, ["--device", "cuda:7"], "CUDA device"),
    ({}, ["--device", "gpu"], "not a torch device"),
])
def test_bad_environment_and_devices_exit_2(toy_registries, tiny_experiment, tmp_path, capsys, monkeypatch, env,
                                            args, expect):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    code, err = run_main(capsys, "train", tiny_experiment(), *dirs(tmp_path), *args)
    assert code == 2 and expect in err
    assert not (tmp_path / "runs" / "tiny").exists()


def test_help_works_with_a_bad_threads_variable(monkeypatch):
    monkeypatch.setenv("SPHEREGEN_THREADS", "two")
    with pytest.raises(SystemExit) as exc:
        main(["train", "--help"])
    assert exc.value.code == 0


def test_a_stalled_hub_fails_within_the_timeout(monkeypatch):
    """A proxy that accepts connections and never answers (on the loopback address)."""
    from spheregen.errors import DataError
    from spheregen_plugins.datasets import HFConfig, build_hf

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    accepted = []
    stop = threading.Event()

    def hold():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except OSError:
                continue

    t = threading.Thread(target=hold, daemon=True)
    t.start()
    proxy = f"http://127.0.0.1:{server.getsockname()[1]}"
    for var in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"):
        monkeypatch.setenv(var, proxy)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    monkeypatch.setenv("SPHEREGEN_HUB_TIMEOUT", "2")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # read at import
    t0 = time.monotonic()
    try:
        with pytest.raises(DataError, match="SPHEREGEN_HUB_TIMEOUT = 2 s"):
            build_hf(HFConfig(id="someone/some-data"), None)
    finally:
        stop.set()
        t.join()
        for c in accepted:
            c.close()
        server.close()
    assert accepted, "the request never reached the stalled proxy"
    assert time.monotonic() - t0 < 60


def test_resume_without_a_checkpoint_says_so(toy_registries, tiny_experiment, tmp_path, capsys):
    code, err = run_main(capsys, "train", tiny_experiment(), *dirs(tmp_path), "--resume")
    assert code == 0 and "--resume found no checkpoint" in err and "starting from step 0" in err
