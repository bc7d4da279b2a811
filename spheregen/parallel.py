"""Independent methods side by side: ``spheregen run --jobs N``.

Each method's training, sampling and scoring is independent of the others' once the
data is prepared and the shared components are fitted, so they run as jobs on
submitit: its local executor on one machine (each job pinned to its share of the cores,
or to its own GPU), its SLURM executor with ``--launcher slurm`` on a cluster. The
calling process prepares the data; the fit stage (the metrics' feature extractors, then
every component of the methods that spheregen fits, such as a trained tokenizer) is the
first job, :data:`FIT_JOB`, and runs beside the first method jobs instead of before
them, each component fitted once. A method job that needs a component before the fit
job has finished it waits for it and loads it (the fit folder's lock); the metrics come
first in the fit job, and the methods need them only once they sample (guidance
selection) and score. Jobs start in the experiment file's order after the fit job, at most N at
once: list the methods that need no fitted component first, so that they run while it
fits. A method job trains (unless its weights exist for the same config), samples
(unless its sample files are current) and scores its samples (unless its result rows
are current), merging its rows into results.parquet under the report folder's lock, so
its speed columns are timed on its own core while the other jobs run; the report runs
afterwards in the calling process. Every job computes what a sequential run computes:
at equal intra-op thread counts the results are bit-identical.

A failing method job is reported with its log and the tail of its error; the others
finish and keep their results. A failing fit job (missing weights, an unusable feature
space) stops the run: the metrics, or a method's component, are missing.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import attrs

from spheregen.errors import SpheregenError


FIT_JOB = "fit"  # the job of the fit stage (metrics, then the methods' components), queued first


@attrs.frozen(kw_only=True)
class JobSpec:
    """What one job needs to rebuild the experiment in its own process."""

    experiment: str
    overrides: tuple[str, ...]
    runs_dir: str
    reports_dir: str
    method: str  # a method's name, or FIT_JOB
    fit_methods: tuple[str, ...] = ()  # FIT_JOB: the methods whose components it fits
    threads: int
    cpus: tuple[int, ...] = ()
    device: str | None = None
    resume: bool = False
    fresh: bool = False


def _job_workspace(spec: JobSpec) -> Any:
    """The job process pinned to its cores at its thread count, and its Workspace."""
    import torch

    from spheregen.experiment import load_experiment
    from spheregen.workspace import Workspace

    if spec.cpus and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, spec.cpus)
    torch.set_num_threads(spec.threads)
    device = torch.device(spec.device) if spec.device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return Workspace(load_experiment(spec.experiment, spec.overrides), spec.runs_dir, spec.reports_dir, device)


def fit_job(spec: JobSpec) -> dict[str, float]:
    """The fit stage (runs in the job's process): the metrics' feature extractors first,
    then each method's fitted components; returns {"stage": seconds}."""
    from spheregen.fit import describe, fit_experiment

    t0 = time.perf_counter()
    ws = _job_workspace(spec)
    entries = [ws.exp.method(name) for name in spec.fit_methods]
    for result in fit_experiment(ws, entries, resume=spec.resume, progress=False):
        print(describe(result), file=sys.stderr)
    return {"stage": time.perf_counter() - t0}


def method_job(spec: JobSpec) -> dict[str, float]:
    """Train, sample and score one method (runs in the job's process); returns the
    seconds each part took ({"train": s, "sample": s, "evaluate": s}, a part skipped as
    current is absent)."""
    from spheregen.evaluation import evaluate, results_current, sample_entry, samples_current
    from spheregen.fit import fit_session
    from spheregen.runner import is_trained, train_changed
    from spheregen.tracking import log_evaluation

    ws = _job_workspace(spec)
    entry = ws.exp.method(spec.method)
    times = {}
    t0 = time.perf_counter()
    redo = spec.fresh  # and for weights this job changed (runner.train_changed says why)
    if spec.resume or spec.fresh or not is_trained(ws, entry):
        _, changed = train_changed(ws, entry, resume=spec.resume, fresh=spec.fresh)
        times["train"] = time.perf_counter() - t0
        redo = redo or changed
    # the metrics are built inside the fit stage's session: a job that reaches them before
    # the fit job took their lock fits them as the fit job would (resuming an interrupted fit)
    with fit_session(ws, resume=spec.resume, progress=False):
        t0 = time.perf_counter()
        if redo or not samples_current(ws, entry):
            sample_entry(ws, entry, ws.device)
            times["sample"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        if redo or not results_current(ws, entry):
            evaluate(ws, [entry.name], ws.device, beside_others=True)
            log_evaluation(ws, [entry.name])
            times["evaluate"] = time.perf_counter() - t0
    return times


def core_shares(jobs: int) -> list[tuple[int, ...]]:
    """This process's CPUs split into ``jobs`` contiguous shares (as even as they go)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    jobs = max(1, min(jobs, len(cpus)))
    size, extra = divmod(len(cpus), jobs)
    shares, start = [], 0
    for i in range(jobs):
        end = start + size + (1 if i < extra else 0)
        shares.append(tuple(cpus[start:end]))
        start = end
    return shares


def make_executor(launcher: str, folder: Path, options: dict[str, Any]) -> Any:
    """submitit's local executor, or its SLURM one with the cluster options."""
    import submitit

    if launcher == "local":
        executor = submitit.LocalExecutor(folder)
        # submitit's local default is a 2-minute limit, after which it kills the job
        executor.update_parameters(timeout_min=options.get("time_min") or 7 * 24 * 60)
        return executor
    if launcher != "slurm":
        raise SpheregenError(f"--launcher {launcher!r}: choose local or slurm")
    executor = submitit.AutoExecutor(folder, cluster="slurm")
    params = {"timeout_min": options.get("time_min") or 24 * 60, "gpus_per_node": options.get("gpus") or 0,
              "cpus_per_task": options.get("cpus") or 1, "tasks_per_node": 1, "nodes": 1}
    if options.get("partition"):
        params["slurm_partition"] = options["partition"]
    executor.update_parameters(**params)
    return executor


def _progress(ws: Any, name: str) -> str:
    """'step s/S' from a method's training log, 'sampling' once it has weights."""
    if name == FIT_JOB:
        return "fitting"
    if ws.paths.final(name).is_file():
        return "sampling / scoring"
    log = ws.paths.run(name) / "train_log.jsonl"
    try:
        last = log.read_text().strip().splitlines()[-1]
        return f"step {json.loads(last)['step']}/{ws.exp.method(name).train.steps}"
    except (OSError, IndexError, ValueError, KeyError):
        return "preparing"


def run_jobs(ws: Any, names: list[str], specs: dict[str, JobSpec], jobs: int, executor: Any,
             gpus: list[int] | None = None, poll_s: float = 1.0, report_s: float = 15.0,
             times: dict[str, float] | None = None) -> list[str]:
    """Run one job per name (a method, or :data:`FIT_JOB`), at most ``jobs`` at once;
    returns the failed names (each reported with its log on stderr). A failed fit job
    cancels the rest: they need what it fits. ``gpus``: one GPU index per
    slot; ``times`` receives each job's "<part> <name>" seconds."""
    shares = core_shares(jobs) if gpus is None else [() for _ in gpus]
    slots = list(range(len(shares)))
    queue, running, failed = list(names), {}, []
    last_report = 0.0
    while queue or running:
        while queue and slots:
            slot = slots.pop(0)
            name = queue.pop(0)
            spec = attrs.evolve(specs[name], cpus=shares[slot])
            if gpus is not None:
                executor.update_parameters(visible_gpus=(gpus[slot],), gpus_per_node=1)
            running[name] = (slot, executor.submit(fit_job if name == FIT_JOB else method_job, spec))
        for name, (slot, job) in list(running.items()):
            if job.done():
                del running[name]
                slots.append(slot)
                _finish(name, job, failed, times if times is not None else {})
                if FIT_JOB in failed:
                    _cancel(running, queue, failed)
                    break
        if time.monotonic() - last_report >= report_s and running:
            status = " · ".join(f"{n} {_progress(ws, n)}" for n in running)
            print(f"[jobs] {status}" + (f" · queued: {', '.join(queue)}" if queue else ""), file=sys.stderr)
            last_report = time.monotonic()
        time.sleep(poll_s)
    return failed


def _finish(name: str, job: Any, failed: list[str], times: dict[str, float]) -> None:
    try:
        for part, seconds in job.result().items():
            times[f"{part} {name}"] = seconds
        print(f"[jobs] {name}: done", file=sys.stderr)
    except Exception as exc:  # submitit re-raises the job's error with its traceback text
        failed.append(name)
        tail = "\n".join(str(exc).strip().splitlines()[-6:])
        print(f"[jobs] {name}: FAILED (log: {job.paths.stderr})\n{tail}", file=sys.stderr)


def _cancel(running: dict[str, Any], queue: list[str], failed: list[str], wait_s: float = 30.0) -> None:
    """Stop every running job and drop the queued ones (they count as failed); waits up
    to ``wait_s`` for the stopped jobs to end, so that none writes after the run exits."""
    for name, (_, job) in running.items():
        _stop(job)
        print(f"[jobs] {name}: cancelled (the fit stage failed)", file=sys.stderr)
    deadline = time.monotonic() + wait_s
    while any(not job.done() for _, job in running.values()) and time.monotonic() < deadline:
        time.sleep(0.2)
    late = [name for name, (_, job) in running.items() if not job.done()]
    for name in late:  # past the wait: submitit's own cancel, whose controller kills the job
        running[name][1].cancel(check=False)
        print(f"[jobs] {name}: did not stop within {wait_s:g} s of the interrupt; killed", file=sys.stderr)
    failed.extend([*running, *queue])
    running.clear()
    queue.clear()


def _stop(job: Any) -> None:
    """Interrupt a job. A local job's own process is a child of submitit's controller
    process: SIGINT to it ends it (its traceback goes to its log file) and the controller
    then exits quietly; ``job.cancel`` would interrupt the controller itself, which prints
    a KeyboardInterrupt traceback on this terminal. Elsewhere (SLURM, or no /proc) it is
    ``job.cancel``."""
    controller = getattr(job, "_process", None)
    try:
        children = Path(f"/proc/{controller.pid}/task/{controller.pid}/children").read_text().split()
    except (AttributeError, OSError):
        children = []
    for pid in children:
        try:
            os.kill(int(pid), signal.SIGINT)
        except ProcessLookupError:  # it ended meanwhile
            pass
    if not children:
        job.cancel(check=False)
