"""`spheregen run --jobs 2`: methods as parallel submitit jobs, with results equal to a
sequential run at the same thread count, and a failing job that loses nothing else."""

from __future__ import annotations

import json
import shutil
import time

import polars as pl
import pytest

from spheregen.cli import main

EXPERIMENT = '''name = "par"
seed = 0
[data]
source = "digits"
image_size = 8
channels = 1
[train]
steps = 8
batch_size = 32
lr = 0.003
log_every = 2
[eval]
steps = [1, 2]
num_samples = 40
batch_size = 20
throughput_batch = 4
metrics = [{ name = "fid", features = "domain-classifier" }]
[[methods]]
name = "fm-a"
method = { name = "flow-matching", tokenizer = { name = "patch", patch_size = 1 }, denoiser = { name = "dit", width = 32, depth = 1, heads = 2, patch_size = 2 } }
[[methods]]
name = "fm-b"
method = { name = "flow-matching", tokenizer = { name = "patch", patch_size = 1 }, denoiser = { name = "dit", width = 32, depth = 2, heads = 2, patch_size = 2 } }
guidance = 2.0
'''
TIMING = {"images_per_s", "latency_s", "latency_b1_s", "peak_memory_mb", "torch_threads",
          "train_wall_s", "train_device_hours", "sample_file_ns"}  # measured or file times


def _run(tmp_path, name, *extra):
    exp = tmp_path / "par.toml"
    exp.write_text(EXPERIMENT)
    dirs = ["--runs-dir", str(tmp_path / name / "runs"), "--reports-dir", str(tmp_path / name / "reports")]
    return main(["run", str(exp), *dirs, "--threads", "1", *extra])


def test_two_jobs_equal_one(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    assert _run(tmp_path, "seq") == 0
    assert _run(tmp_path, "par", "--jobs", "2") == 0
    # the same rows in the same order (the experiment's methods), whichever job finished first
    a, b = (pl.read_parquet(tmp_path / n / "reports" / "par" / "results.parquet") for n in ("seq", "par"))
    columns = [c for c in a.columns if c not in TIMING]
    assert a.select(columns).equals(b.select(columns))
    assert a["fid"].null_count() == 0 and b["train_gflops_total"].null_count() == 0
    # the fit stage and each method's scoring ran in jobs, beside the others
    stages = json.loads((tmp_path / "par" / "reports" / "par" / "timing.json").read_text())["stages_s"]
    assert {"  stage fit (job)", "  evaluate fm-a (job)", "  evaluate fm-b (job)"} <= set(stages)
    assert "evaluate" not in stages
    assert "data" in stages and "fit" not in stages  # with jobs the fit is a job, the first stage the data
    # fm-a's weights trained anew under the same config: its samples are redone, fm-b's kept
    samples = {m: tmp_path / "par" / "runs" / "par" / "samples" / m / "steps-1.npz" for m in ("fm-a", "fm-b")}
    drawn = {m: p.stat().st_mtime_ns for m, p in samples.items()}
    shutil.rmtree(tmp_path / "par" / "runs" / "par" / "fm-a")
    assert _run(tmp_path, "par", "--jobs", "2") == 0
    assert samples["fm-a"].stat().st_mtime_ns != drawn["fm-a"] and samples["fm-b"].stat().st_mtime_ns == drawn["fm-b"]


def test_a_failing_fit_job_stops_the_run(tmp_path, capfd, monkeypatch):
    """Inception FID without its weights offline: the fit job fails within seconds, the
    method jobs are stopped, and the run exits 2 naming the cause. (capfd: the jobs'
    submitit controllers write to this process's stderr file descriptor.)"""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    monkeypatch.setenv("SPHEREGEN_OFFLINE", "1")
    # fm-a trains long enough to be stopped mid-run
    (tmp_path / "par.toml").write_text(EXPERIMENT.replace('features = "domain-classifier"', 'features = "inception"')
                                       .replace("steps = 8", "steps = 5000"))
    dirs = ["--runs-dir", str(tmp_path / "runs"), "--reports-dir", str(tmp_path / "reports")]
    code = main(["run", str(tmp_path / "par.toml"), *dirs, "--threads", "1", "--jobs", "2"])
    time.sleep(2)  # what a stopped job's controller would print after the run returned lands here too
    err = capfd.readouterr().err
    assert code == 2 and "fit: FAILED" in err and "the fit stage failed" in err and "weights-inception" in err
    assert "KeyboardInterrupt" not in err, "a stopped job's controller must not print a traceback here"
    # fm-a was training beside the fit job: cancelled; queued fm-b never started
    assert "fm-a: cancelled" in err and "fm-b: " not in err
    # a job stopped while training saves a checkpoint (SIGINT is a preemption; before its
    # first step it has none): the message sends the user to --resume exactly then
    checkpointed = any((tmp_path / "runs" / "par" / "fm-a" / "checkpoints").glob("step-*"))
    assert ("run again with --resume, which continues fm-a" in err) == checkpointed
    assert checkpointed or "fix it and run again (" in err
    assert not (tmp_path / "reports" / "par" / "results.parquet").exists()


def test_a_failing_job_keeps_the_others(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    broken = EXPERIMENT.replace("guidance = 2.0\n", "guidance = 2.0\n[methods.train]\nlr = 1e30\n")
    (tmp_path / "par.toml").write_text(broken)
    dirs = ["--runs-dir", str(tmp_path / "runs"), "--reports-dir", str(tmp_path / "reports")]
    code = main(["run", str(tmp_path / "par.toml"), *dirs, "--threads", "1", "--jobs", "2"])
    err = capsys.readouterr().err
    assert code == 2 and "fm-b: FAILED" in err and "non-finite loss" in err and "fm-a: done" in err
    rows = pl.read_parquet(tmp_path / "reports" / "par" / "results.parquet")
    assert set(rows["method"]) == {"fm-a"}


def test_fit_is_not_a_method_name(tmp_path, capsys):
    """`fit` names run --jobs's fit job: a method of that name would be run as it."""
    (tmp_path / "par.toml").write_text(EXPERIMENT.replace('name = "fm-a"', 'name = "fit"'))
    code = main(["run", str(tmp_path / "par.toml"), "--runs-dir", str(tmp_path / "r"), "--reports-dir",
                 str(tmp_path / "o"), "--jobs", "2"])
    assert code == 2 and "'fit' is reserved" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_jobs_must_be_positive(tmp_path, capsys):
    assert _run(tmp_path, "x", "--jobs", "0") == 2
    assert "--jobs 0" in capsys.readouterr().err


def test_a_fit_waits_for_the_job_fitting_the_same_component(tmp_path, capsys):
    """Two jobs needing one tokenizer: the second waits on the fit folder's lock (and
    then finds the component fitted) instead of failing or fitting it twice."""
    import threading

    from spheregen.errors import SpheregenError
    from spheregen.paths import DirLock

    holder = DirLock(tmp_path, "fit folder of rae").acquire()
    with pytest.raises(SpheregenError, match="in use by another spheregen process"):
        DirLock(tmp_path, "fit folder of rae").acquire()
    got = []
    waiter = threading.Thread(target=lambda: got.append(DirLock(tmp_path, "fit folder of rae").acquire(wait=True)))
    waiter.start()
    waiter.join(0.5)
    assert waiter.is_alive() and not got  # blocked while the other holds it
    holder.release()
    waiter.join(10)
    assert got and not waiter.is_alive()
    got[0].release()
    assert "waiting for fit folder of rae" in capsys.readouterr().err


def test_local_jobs_have_no_two_minute_limit(tmp_path):
    """submitit's local executor kills a job after 2 minutes unless told otherwise: a
    quickstart job trains for several."""
    from spheregen.parallel import make_executor

    assert make_executor("local", tmp_path, {}).parameters["timeout_min"] >= 24 * 60
    assert make_executor("local", tmp_path, {"time_min": 90}).parameters["timeout_min"] == 90


def test_cancel_falls_back_to_submitit_and_kills_a_job_that_does_not_stop(capsys):
    """Without a local controller process (a SLURM job) the interrupt is submitit's cancel;
    a job still running after the wait is cancelled again (submitit kills it) and named."""
    from spheregen.parallel import _cancel

    class Job:  # never finishes, like a step that ignores the interrupt
        cancels = 0

        def done(self):
            return False

        def cancel(self, check=True):
            self.cancels += 1

    job, failed, queue = Job(), [], ["queued-method"]
    _cancel({"stuck": (0, job)}, queue, failed, wait_s=0.2)
    assert job.cancels == 2 and failed == ["stuck", "queued-method"] and not queue
    assert "stuck: did not stop within 0.2 s of the interrupt; killed" in capsys.readouterr().err
