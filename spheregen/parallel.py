"""Independent methods side by side: ``spheregen run --jobs N``.

Each method's training, sampling and scoring is independent of the others' once the
data is prepared, so they run as jobs on submitit: its local executor on one machine
(each job pinned to its share of the cores, or to its own GPU), its SLURM executor with
``--launcher slurm`` on a cluster. The calling process prepares the data; everything
fitted is fitted once, in a job, beside the others: the metrics' feature extractors (a
domain classifier) by the first job, :data:`METRICS_JOB`, and a component of the
methods (a tokenizer spheregen trains) by the first method job that trains on it. A job
that needs a component meanwhile waits for that fit and loads it (the fit folder's
lock). The methods need the metrics only once they sample (guidance selection), so
fitting them no longer holds every core but one idle. Jobs start in the experiment
file's order after the metrics job, at most N at once: list a method whose job fits a
shared tokenizer early. A method job trains (unless its weights exist for the same
config), samples (unless its sample files are current) and scores its samples (unless
its result rows are current), merging its rows into results.parquet under the report
folder's lock, so its speed columns are timed on its own core while the other jobs
run; the report runs afterwards in the calling process. Every job computes what a
sequential run computes: at equal intra-op thread counts the results are bit-identical.

A failing method job is reported with its log and the tail of its error; the others
finish and keep their results. A failing metrics job (missing weights, an unusable
feature space) stops the run: every method needs the metrics.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import attrs

from spheregen.errors import SpheregenError


METRICS_JOB = "metrics"  # the job that fits the metrics' feature extractors, queued first


@attrs.frozen(kw_only=True)
class JobSpec:
    """What one job needs to rebuild the experiment in its own process."""

    experiment: str
    overrides: tuple[str, ...]
    runs_dir: str
    reports_dir: str
    method: str  # a method's name, or METRICS_JOB
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


def metrics_job(spec: JobSpec) -> dict[str, float]:
    """Fit the metrics' feature extractors (runs in the job's process); returns
    {"fit": seconds}."""
    from spheregen.fit import fit_experiment

    t0 = time.perf_counter()
    ws = _job_workspace(spec)
    for result in fit_experiment(ws, entries=[], metrics=True, resume=spec.resume, progress=False):
        print(f"{result.name}: {'fitted' if result.fitted_now else 'found'} at {result.folder}", file=sys.stderr)
    return {"fit": time.perf_counter() - t0}


def method_job(spec: JobSpec) -> dict[str, float]:
    """Train, sample and score one method (runs in the job's process); returns the
    seconds each part took ({"train": s, "sample": s, "evaluate": s}, a part skipped as
    current is absent)."""
    from spheregen.evaluation import evaluate, results_current, sample_entry, samples_current
    from spheregen.runner import is_trained, train
    from spheregen.tracking import log_evaluation

    ws = _job_workspace(spec)
    entry = ws.exp.method(spec.method)
    times = {}
    t0 = time.perf_counter()
    if spec.resume or spec.fresh or not is_trained(ws, entry):
        train(ws, entry, resume=spec.resume, fresh=spec.fresh)
        times["train"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if spec.fresh or not samples_current(ws, entry):
        sample_entry(ws, entry, ws.device)
        times["sample"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if spec.fresh or not results_current(ws, entry):
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
    if name == METRICS_JOB:
        return "fitting"
    if ws.paths.final(name).is_file():
        return "sampling / scoring"
    log = ws.paths.run(name) / "train_log.jsonl"
    try:
        last = log.read_text().strip().splitlines()[-1]
        return f"step {json.loads(last)['step']}/{ws.exp.method(name).train.steps}"
    except (OSError, IndexError, ValueError, KeyError):
        return "starting"


def run_jobs(ws: Any, names: list[str], specs: dict[str, JobSpec], jobs: int, executor: Any,
             gpus: list[int] | None = None, poll_s: float = 1.0, report_s: float = 15.0,
             times: dict[str, float] | None = None) -> list[str]:
    """Run one job per name (a method, or :data:`METRICS_JOB`), at most ``jobs`` at once;
    returns the failed names (each reported with its log on stderr). A failed metrics
    job cancels the rest: nothing can be scored without it. ``gpus``: one GPU index per
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
            running[name] = (slot, executor.submit(metrics_job if name == METRICS_JOB else method_job, spec))
        for name, (slot, job) in list(running.items()):
            if job.done():
                del running[name]
                slots.append(slot)
                _finish(name, job, failed, times if times is not None else {})
                if METRICS_JOB in failed:
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


def _cancel(running: dict[str, Any], queue: list[str], failed: list[str]) -> None:
    """Stop every running job and drop the queued ones (they count as failed)."""
    for name, (_, job) in running.items():
        job.cancel(check=False)
        print(f"[jobs] {name}: cancelled (the metrics could not be fitted)", file=sys.stderr)
    failed.extend([*running, *queue])
    running.clear()
    queue.clear()
