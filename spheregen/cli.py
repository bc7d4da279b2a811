"""``spheregen``: list | fit | train | sample | evaluate | report | run | flops | score | edit.

Thin by design: each command loads the experiment into a Workspace and calls one stage.
Errors a user can fix (SpheregenError) print one message and exit 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from typing import Any, Iterator

import torch

from spheregen.errors import Preempted, SpheregenError
from spheregen.experiment import load_experiment
from spheregen.registry import KINDS
from spheregen.workspace import Workspace


def say(*args: Any) -> None:
    """print on the main process only: under torchrun / accelerate launch every process
    runs the command, and one line per result is enough. (A command that never started
    accelerate, such as ``report``, runs as one process and just prints.)"""
    if "spheregen.distributed" in sys.modules:
        from spheregen import distributed

        if not distributed.is_main():
            return
    print(*args)


WORK = ("fit", "train", "run", "sample", "evaluate")  # commands that fit, train, sample or score


def _workspace(args: argparse.Namespace) -> Workspace:
    if args.offline:
        os.environ["SPHEREGEN_OFFLINE"] = "1"
    threads = _threads(args.threads)
    if threads:
        # on a shared CPU, fewer intra-op threads than busy cores avoids OpenMP barrier
        # stalls that can slow small models by an order of magnitude
        torch.set_num_threads(threads)
    exp = load_experiment(args.experiment, args.set or ())
    ws = Workspace(exp, args.runs_dir, args.reports_dir, _default_device(args))
    if args.command in WORK:  # a misfit sampler, an absurd size or an unwritable folder fails before any work
        ws.check_compatibility()
        _check_outputs(ws, args.command)
        from spheregen.resources import check_fits

        check_fits(exp, ws.device)
    return ws


def _default_device(args: argparse.Namespace) -> torch.device:
    """--device, else the accelerate state's: under a multi-GPU launch it gives each
    process its own GPU (cuda:<local rank>), which every model and metric is built on.
    ``report`` computes nothing and stays on the CPU without starting accelerate."""
    if args.device:
        return _device(args.device)
    if args.command == "report":
        return torch.device("cpu")
    from spheregen import distributed

    return distributed.state().device


def _threads(value: str | None) -> int:
    """--threads / SPHEREGEN_THREADS as a positive int (0 or unset: torch's choice)."""
    value = value if value is not None else os.environ.get("SPHEREGEN_THREADS", "")
    if value in ("", "0"):
        return 0
    if not value.isdigit():
        raise SpheregenError(f"--threads / SPHEREGEN_THREADS must be a positive integer, got {value!r}; "
                             "e.g. --threads 1, or unset SPHEREGEN_THREADS for torch's choice")
    return int(value)


def _device(name: str) -> torch.device:
    """--device, checked: a typo or a CUDA device on a machine without one is an error
    here, not a traceback after the data was prepared."""
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise SpheregenError(f"--device {name!r} is not a torch device ({exc}); use cpu, cuda or cuda:N") from exc
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0 or (device.index is not None and device.index >= count):
            raise SpheregenError(f"--device {name}: this machine has {count} CUDA device(s); "
                                 "use --device cpu (or leave --device out: cuda if available, else cpu)")
    elif device.type not in ("cpu", "mps"):
        raise SpheregenError(f"--device {name}: spheregen runs on cpu or cuda; use one of those")
    return device


def _check_outputs(ws: Workspace, command: str) -> None:
    """Output folders writable before any work (a read-only or misdirected reports
    folder used to be found only after training and scoring)."""
    from spheregen.paths import check_writable

    check_writable(ws.paths.runs_root, "runs folder (--runs-dir)")
    if command in ("run", "evaluate"):
        check_writable(ws.paths.reports_root, "reports folder (--reports-dir)")


def _entries(ws: Workspace, names: list[str] | None) -> list[Any]:
    return [ws.exp.method(n) for n in names] if names else list(ws.exp.methods)


def cmd_list(args: argparse.Namespace) -> None:
    from spheregen.compat import fit_table
    from spheregen.plugins import registries

    regs = registries()
    table = {
        kind: [{"name": e.name, "plugin": e.provider.plugin, "distribution": e.provider.distribution,
                "version": e.provider.version, "doc": e.doc} for e in regs[kind]]
        for kind in KINDS
    }
    fits = fit_table()
    for e in table["sampler"]:
        e["fits"] = fits[e["name"]]
    if args.json:
        print(json.dumps(table, indent=2))
        return
    for kind, entries in table.items():
        print(f"{kind}s:")
        for e in entries:
            print(f"  {e['name']:<22} {e['plugin']:<16} {e['doc']}")
            if "fits" in e:
                print(f"  {'':<22} {'':<16} fits methods: {', '.join(e['fits']) or '(none registered)'}")


def cmd_fit(args: argparse.Namespace) -> None:
    """Fit what the experiment's components need fitted (tokenizers spheregen trains,
    feature extractors), each once per identity; the metrics first, so an unusable
    feature space fails before any fitting of a method's components."""
    from spheregen.fit import describe, fit_experiment

    ws = _workspace(args)
    entries = _entries(ws, getattr(args, "method", None))
    if args.command == "run" and getattr(args, "jobs", 1) > 1:
        # the fit stage is the first job, beside the method jobs (spheregen.parallel);
        # here the data is prepared once, before any job reads it
        if ws.exp.eval.metrics:
            ws.data.splits()
        return
    results = fit_experiment(ws, entries, resume=args.resume, fresh=args.fresh and args.command == "fit")
    for result in results:
        say(describe(result))


def cmd_train(args: argparse.Namespace) -> None:
    from spheregen.runner import is_trained, train, train_changed

    extend_to = getattr(args, "extend_to", None)
    if extend_to is not None and (args.resume or args.fresh):
        raise SpheregenError("--extend-to continues a finished run (and an interrupted extension of it): "
                             "leave out --resume and --fresh")
    ws = _workspace(args)
    for entry in _entries(ws, args.method):
        if extend_to is not None:
            from spheregen.extension import extend

            path = extend(ws, entry, extend_to)
            say(f"{entry.name}: weights extended to {extend_to} steps at {path}; use them with "
                f"--set methods.{entry.name}.train.steps={extend_to}")
            continue
        if args.skip_trained and is_trained(ws, entry):
            say(f"{entry.name}: already trained ({ws.paths.final(entry.name)}); skipping")
            continue
        retrained = getattr(args, "retrained", None)  # run: which methods' weights this invocation changed
        with _clock(args, f"train {entry.name}"):
            if retrained is None:
                path = train(ws, entry, resume=args.resume, fresh=args.fresh)
            else:
                path, changed = train_changed(ws, entry, resume=args.resume, fresh=args.fresh)
                if changed:
                    retrained.add(entry.name)
        say(f"{entry.name}: weights at {path}")


def cmd_sample(args: argparse.Namespace) -> None:
    from spheregen.evaluation import sample_entry, samples_current

    ws = _workspace(args)
    for entry in _entries(ws, args.method):
        if args.skip_current and entry.name not in getattr(args, "retrained", ()) and samples_current(ws, entry):
            say(f"{entry.name}: samples up to date ({ws.paths.sample_dir(entry.name)}); skipping")
            continue
        with _clock(args, f"sample {entry.name}"):
            written = sample_entry(ws, entry, ws.device)
        for path in written:
            say(f"{entry.name}: {path}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from spheregen.evaluation import evaluate, results_current

    ws = _workspace(args)
    entries = _entries(ws, args.method)
    if args.skip_current:
        retrained = getattr(args, "retrained", ())
        current = [e.name for e in entries if e.name not in retrained and results_current(ws, e)]
        for name in current:
            say(f"{name}: results up to date; skipping")
        entries = [e for e in entries if e.name not in current]
        if not entries:
            return
    say(f"results: {evaluate(ws, [e.name for e in entries], ws.device)}")
    from spheregen.tracking import log_evaluation

    log_evaluation(ws, [e.name for e in entries])  # to the trackers of [train] log_with, if any


def cmd_report(args: argparse.Namespace) -> None:
    from spheregen.report import build_report

    ws = _workspace(args)
    if getattr(args, "readme", None):
        from pathlib import Path

        from spheregen.report import update_readme

        say(f"tables of {ws.exp.name}: {update_readme(ws, Path(args.readme))}")
        return
    say(f"report: {build_report(ws)}")


def cmd_edit(args: argparse.Namespace) -> None:
    from spheregen.report import write_edit_grid
    from spheregen.runner import load_trained

    ws = _workspace(args)
    entry = ws.exp.method(args.method)
    method = load_trained(ws, entry, ws.exp.eval.use_ema, ws.device)
    from spheregen.interfaces import EditableMethod, has

    ops = method.edit_ops if has(method, EditableMethod) else ()
    if args.op not in ops:
        raise SpheregenError(f"method '{entry.name}' ({entry.method.name}) supports the edits {list(ops)}, not '{args.op}'")
    print(f"{args.op}: {write_edit_grid(ws, entry, method, args.op, args.n, num=args.num, mode=args.mode)}")


def cmd_score(args: argparse.Namespace) -> None:
    from pathlib import Path

    from spheregen.evaluation import read_external_samples, score_samples

    ws = _workspace(args)
    result = {key: score_samples(ws, read_external_samples(Path(args.samples), key)) for key in args.key}
    say(json.dumps(result, indent=2))


def cmd_export(args: argparse.Namespace) -> None:
    from pathlib import Path

    from spheregen.evaluation import current_sets, expected_identity
    from spheregen.samples import export_samples

    ws = _workspace(args)
    out = Path(args.out)
    for entry in _entries(ws, args.method):
        sampler = ws.sampler_name(entry, ws.build_architecture(entry)[0])
        first = ws.exp.eval.scored_seeds[0]
        for spec in current_sets(ws, entry, sampler):
            name = f"steps-{spec.steps}" + ("" if spec.seed == first else f"_seed-{spec.seed}")
            written = export_samples(spec.path, out / entry.name / name, args.format,
                                     expected_identity(ws, entry, sampler, spec))
            say(f"{entry.name} @ {spec.steps} (seed {spec.seed}): {written}")


def cmd_reference_stats(args: argparse.Namespace) -> None:
    from pathlib import Path

    from spheregen.evaluation import reference_stats

    ws = _workspace(args)
    say(f"reference statistics: {reference_stats(ws, Path(args.out), ws.device)}")


def cmd_flops(args: argparse.Namespace) -> None:
    from spheregen.flops import experiment_flops, format_flops_table

    ws = _workspace(args)
    rows = experiment_flops(ws, args.method, args.steps)
    say(json.dumps(rows, indent=2) if args.json else format_flops_table(rows))


def cmd_run(args: argparse.Namespace) -> None:
    # The fit stage first, which builds the metrics before anything else: missing weights
    # or an unusable feature space must fail before an hour of training, not after (with
    # --jobs it is the first job, and its failure cancels the method jobs beside it).
    # Fitted components are reused (--resume continues an interrupted fit; --fresh
    # retrains the methods, not what `spheregen fit --fresh` refits).
    if args.jobs < 1:
        raise SpheregenError(f"--jobs {args.jobs}: give a number of parallel jobs >= 1")
    args.clock = {}
    t0 = time.perf_counter()
    with _clock(args, "fit" if args.jobs == 1 else "data"):  # with jobs, the fit is a job
        cmd_fit(args)
    # a stage whose inputs did not change is skipped: trained weights of the same run,
    # sample files of the same identity, result rows of the same weights, samples and metrics.
    # A method whose weights file this invocation changed is re-sampled and re-scored
    # (runner.train_changed says why); --resume keeps what a finished run's resume left
    # unchanged, as the --jobs path does.
    args.skip_trained = not (args.resume or args.fresh)
    args.skip_current = not args.fresh
    args.retrained = set()
    if args.jobs > 1:
        with _clock(args, f"fit, train, sample and evaluate ({args.jobs} jobs)"):
            _parallel_jobs(args)
        stages = (cmd_report,)
    else:
        stages = (cmd_train, cmd_sample, cmd_evaluate, cmd_report)
    for stage in stages:
        with _clock(args, stage.__name__.removeprefix("cmd_"), aggregate=stage in (cmd_train, cmd_sample)):
            stage(args)
    from spheregen.report import terminal_summary

    ws = _workspace(args)
    summary = terminal_summary(ws)
    if summary:
        say(f"\n{summary}")
    _report_timing(ws, args.clock, time.perf_counter() - t0)


@contextlib.contextmanager
def _clock(args: argparse.Namespace, name: str, aggregate: bool = False) -> Iterator[None]:
    """Time a stage of ``spheregen run`` into ``args.clock`` (a no-op outside run).
    ``aggregate``: the stage's own parts (one per method) are timed inside it."""
    clock = getattr(args, "clock", None)
    t0 = time.perf_counter()
    try:
        yield
    finally:
        if clock is not None and not aggregate:
            clock[name] = clock.get(name, 0.0) + time.perf_counter() - t0


def _report_timing(ws: Workspace, clock: dict[str, float], total: float) -> None:
    """Print where the run's time went and keep it as reports/<experiment>/timing.json."""
    from spheregen import distributed
    from spheregen.paths import atomic_write_json

    if not distributed.is_main():
        return
    width = max(len(k) for k in clock) if clock else 0
    lines = [f"  {k:<{width}}  {v / 60:5.1f} min" for k, v in clock.items()]
    say("\ntime by stage (wall clock):\n" + "\n".join(lines) + f"\n  {'total':<{width}}  {total / 60:5.1f} min")
    atomic_write_json(ws.paths.report / "timing.json", {"stages_s": clock, "total_s": total,
                                                        "threads": torch.get_num_threads(),
                                                        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


def _parallel_jobs(args: argparse.Namespace) -> None:
    """--jobs N: the data prepared here (cmd_fit), then the fit stage and one job per
    method (train, sample, evaluate) as submitit jobs (spheregen.parallel)."""
    import torch

    from spheregen import parallel
    from spheregen.runner import list_checkpoints

    ws = _workspace(args)
    entries = _entries(ws, args.method)
    threads = _threads(args.threads) or max(1, len(parallel.core_shares(args.jobs)[-1]))
    names = [parallel.FIT_JOB, *(e.name for e in entries)]
    specs = {name: parallel.JobSpec(experiment=args.experiment, overrides=tuple(args.set or ()),
                                    runs_dir=str(ws.paths.runs_root), reports_dir=str(ws.paths.reports_root),
                                    method=name, threads=threads, device=args.device, resume=args.resume,
                                    fresh=args.fresh and name != parallel.FIT_JOB,
                                    fit_methods=tuple(e.name for e in entries)) for name in names}
    gpus = list(range(torch.cuda.device_count()))[:args.jobs] if ws.device.type == "cuda" and args.launcher == "local" \
        else None
    options = {"partition": args.partition, "time_min": args.time_min, "gpus": args.gpus_per_job,
               "cpus": args.cpus_per_job}
    executor = parallel.make_executor(args.launcher, ws.paths.experiment_runs / ".jobs", options)
    say(f"the fit stage and {len(entries)} method(s) as {args.launcher} jobs, {args.jobs} at a time, "
        f"{threads} thread(s) each")
    job_times: dict[str, float] = {}
    failed = parallel.run_jobs(ws, names, specs, args.jobs, executor, gpus or None, times=job_times)
    if getattr(args, "clock", None) is not None:  # each job's own time (they overlap)
        args.clock.update({f"  {k} (job)": v for k, v in job_times.items()})
    if parallel.FIT_JOB in failed:
        # a method job stopped while training saves a checkpoint (SIGINT is a preemption)
        stopped = [e.name for e in entries if not ws.paths.final(e.name).is_file()
                   and list_checkpoints(ws.paths.checkpoints(e.name))]
        again = (f"run again with --resume, which continues {', '.join(stopped)} from its checkpoint (--fresh "
                 "starts over)") if stopped else "run again"
        raise SpheregenError("the fit stage failed (log above): the metrics or a method's component could not be "
                             f"fitted, so the method jobs were stopped; fix it and {again} (`spheregen fit "
                             f"{args.experiment}` runs that stage alone)")
    if failed:
        if any(e.name not in failed for e in entries):  # the others evaluated their rows: report them
            try:
                cmd_report(args)
            except SpheregenError as exc:  # the jobs' failure is the error to exit with
                print(f"spheregen: the report of the other methods failed too: {exc}", file=sys.stderr)
        raise SpheregenError(f"job(s) failed: {', '.join(failed)} (logs above); the other methods' weights, "
                             "samples and results are kept")


def _common(p: argparse.ArgumentParser, methods: bool = True) -> None:
    p.add_argument("experiment", help="experiment TOML file, e.g. experiments/quickstart.toml")
    p.add_argument("--runs-dir", default=os.environ.get("SPHEREGEN_RUNS", "runs"), help="checkpoints and samples")
    p.add_argument("--reports-dir", default=os.environ.get("SPHEREGEN_REPORTS", "reports"), help="tables and plots")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override one experiment key (repeatable; dotted: train.steps=5, eval.num_samples=100, "
                        "methods.NAME.train.lr=1e-3); typed and checked as in the file, recorded in the results")
    p.add_argument("--offline", action="store_true",
                   help="download no pretrained weights (as SPHEREGEN_OFFLINE=1 or HF_HUB_OFFLINE=1)")
    p.add_argument("--threads", default=None,
                   help="torch CPU threads (default: torch's choice; env SPHEREGEN_THREADS)")
    if methods:
        p.add_argument("--method", action="append", help="only this method (repeatable); default: all")


def _jobs_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--jobs", type=int, default=1,
                   help="run the fit stage and each method (train, sample, evaluate) as submitit jobs, up to N at "
                        "once (each pinned to its share of the cores, or its own GPU); results equal a sequential "
                        "run at the same --threads")
    p.add_argument("--launcher", default="local", choices=["local", "slurm"], help="where --jobs run")
    p.add_argument("--partition", help="SLURM partition (--launcher slurm)")
    p.add_argument("--time-min", type=int, help="SLURM time limit per job, minutes (default 1440)")
    p.add_argument("--gpus-per-job", type=int, help="SLURM GPUs per job")
    p.add_argument("--cpus-per-job", type=int, help="SLURM CPUs per job")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="spheregen", description="Benchmark sphere-based image generators head to head.")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("list", help="every registered component by kind, with its plugin")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_list)
    p = sub.add_parser("fit", help="fit what the components need before use (tokenizers spheregen trains, the "
                                   "domain classifier) in runs/.cache/fit/; run and train do it first")
    _common(p)
    p.add_argument("--resume", action="store_true", help="continue interrupted fits from their latest checkpoints")
    p.add_argument("--fresh", action="store_true", help="delete the experiment's fitted components and refit them")
    p.set_defaults(fn=cmd_fit)
    for name, fn, text in (
        ("train", cmd_train, "train each method (checkpoints in runs/<experiment>/<method>/)"),
        ("run", cmd_run, "train, sample, evaluate and report, in order"),
    ):
        p = sub.add_parser(name, help=text)
        _common(p)
        p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
        p.add_argument("--fresh", action="store_true", help="delete the method's run directory and retrain")
        p.set_defaults(fn=fn, skip_trained=False, skip_current=False, jobs=1)
        if name == "run":
            _jobs_options(p)
        else:
            p.add_argument("--extend-to", type=int, metavar="N",
                           help="continue the finished run (the config's train.steps = S < N) from its last "
                                "checkpoint to N steps, on the N-step LR schedule from step S on (the first S steps "
                                "followed the S-step one, so this is not a fresh N-step run); later stages use it "
                                "with --set methods.NAME.train.steps=N. See README, 'Extending a finished run'")
    for name, fn, text in (
        ("sample", cmd_sample, "sample each method at each step count (runs/<experiment>/samples/)"),
        ("evaluate", cmd_evaluate, "score the samples, count FLOPs, time sampling -> results.parquet"),
        ("report", cmd_report, "tables and plots from results.parquet and the samples"),
    ):
        p = sub.add_parser(name, help=text)
        _common(p, methods=name != "report")
        p.set_defaults(fn=fn, skip_current=False)
        if name == "report":
            p.add_argument("--readme", metavar="FILE",
                           help="instead, write the experiment's tables (from results.parquet alone) between its "
                                "'<!-- spheregen report NAME: ... -->' markers in FILE (e.g. README.md)")
    p = sub.add_parser("export", help="sample files in another layout: adm (arr_0 N×H×W×C uint8 + arr_1 labels, "
                                      "ADM's evaluator), png (a folder per method and step count), npz (native)")
    _common(p)
    p.add_argument("--format", required=True, choices=["adm", "png", "npz"])
    p.add_argument("--out", required=True, help="folder: <out>/<method>/steps-<T>.npz or steps-<T>/*.png")
    p.set_defaults(fn=cmd_export)
    p = sub.add_parser("reference-stats", help="FID statistics (mu, sigma: the ADM / Sphere Encoder fid_stats layout, "
                                               "with their feature space) of the experiment's reference split, for "
                                               "[eval] reference_stats")
    _common(p, methods=False)
    p.add_argument("--out", required=True, help=".npz file to write")
    p.set_defaults(fn=cmd_reference_stats)
    p = sub.add_parser("flops", help="GFLOPs per image of every method at each step count, true and paper "
                                     "convention, counted on the meta device (no weights or data needed)")
    _common(p)
    p.add_argument("--steps", type=int, nargs="+", help="step counts (default: the experiment's)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_flops)
    p = sub.add_parser("score", help="score an external .npz of uint8 samples with the experiment's metrics")
    _common(p, methods=False)
    p.add_argument("samples", help=".npz file")
    p.add_argument("--key", action="append", required=True, help="array name in the file (repeatable)")
    p.set_defaults(fn=cmd_score)
    p = sub.add_parser("edit", help="edits a method supports (Sphere Encoder: reconstruct, interpolate, "
                                    "manipulate) on test images, written as a grid PNG")
    _common(p, methods=False)
    p.add_argument("op", help="reconstruct | interpolate | manipulate")
    p.add_argument("--method", required=True, help="the method (run name) to edit with")
    p.add_argument("-n", type=int, default=8, help="number of test images (one per class first)")
    p.add_argument("--num", type=int, default=8, help="interpolation points")
    p.add_argument("--mode", default="slerp", choices=["slerp", "lerp"], help="interpolation path")
    p.set_defaults(fn=cmd_edit)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from spheregen.fit import on_demand

    try:
        with on_demand(False):  # only fit, run and train fit (as a stage); the others load
            args.fn(args)
    except Preempted as exc:
        print(f"spheregen: {exc}", file=sys.stderr)
        return exc.exit_code
    except SpheregenError as exc:
        print(f"spheregen: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("spheregen: interrupted; completed checkpoints and results are kept", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
