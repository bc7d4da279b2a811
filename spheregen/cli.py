"""``spheregen``: list | train | sample | evaluate | report | run | flops | score | edit.

Thin by design: each command loads the experiment into a Workspace and calls one stage.
Errors a user can fix (SpheregenError) print one message and exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import torch

from spheregen.errors import SpheregenError
from spheregen.experiment import load_experiment
from spheregen.registry import KINDS
from spheregen.workspace import Workspace


def say(*args: Any) -> None:
    """print on the main process only: under torchrun / accelerate launch every process
    runs the command, and one line per result is enough."""
    from spheregen import distributed

    if distributed.is_main():
        print(*args)


def _workspace(args: argparse.Namespace) -> Workspace:
    if args.threads:
        # on a shared CPU, fewer intra-op threads than busy cores avoids OpenMP barrier
        # stalls that can slow small models by an order of magnitude
        torch.set_num_threads(args.threads)
    exp = load_experiment(args.experiment)
    # the accelerate state first: under a multi-GPU launch it gives each process its own
    # GPU (cuda:<local rank>), which every model and metric is then built on
    from spheregen import distributed

    device = torch.device(args.device) if args.device else distributed.state().device
    return Workspace(exp, args.runs_dir, args.reports_dir, device)


def _entries(ws: Workspace, names: list[str] | None) -> list[Any]:
    return [ws.exp.method(n) for n in names] if names else list(ws.exp.methods)


def cmd_list(args: argparse.Namespace) -> None:
    from spheregen.plugins import registries

    regs = registries()
    table = {
        kind: [{"name": e.name, "plugin": e.provider.plugin, "distribution": e.provider.distribution,
                "version": e.provider.version, "doc": e.doc} for e in regs[kind]]
        for kind in KINDS
    }
    if args.json:
        print(json.dumps(table, indent=2))
        return
    for kind, entries in table.items():
        print(f"{kind}s:")
        for e in entries:
            print(f"  {e['name']:<22} {e['plugin']:<16} {e['doc']}")


def cmd_train(args: argparse.Namespace) -> None:
    from spheregen.runner import is_trained, train

    ws = _workspace(args)
    for entry in _entries(ws, args.method):
        if args.skip_trained and is_trained(ws, entry):
            say(f"{entry.name}: already trained ({ws.paths.final(entry.name)}); skipping")
            continue
        path = train(ws, entry, resume=args.resume, fresh=args.fresh)
        say(f"{entry.name}: weights at {path}")


def cmd_sample(args: argparse.Namespace) -> None:
    from spheregen.evaluation import sample_entry

    ws = _workspace(args)
    for entry in _entries(ws, args.method):
        for path in sample_entry(ws, entry, ws.device):
            say(f"{entry.name}: {path}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from spheregen.evaluation import evaluate

    ws = _workspace(args)
    say(f"results: {evaluate(ws, args.method, ws.device)}")


def cmd_report(args: argparse.Namespace) -> None:
    from spheregen.report import build_report

    ws = _workspace(args)
    say(f"report: {build_report(ws)}")


def cmd_edit(args: argparse.Namespace) -> None:
    from spheregen.report import write_edit_grid
    from spheregen.runner import load_trained

    ws = _workspace(args)
    entry = ws.exp.method(args.method)
    method = load_trained(ws, entry, ws.exp.eval.use_ema, ws.device)
    ops = getattr(method, "edit_ops", ())
    if args.op not in ops:
        raise SpheregenError(f"method '{entry.name}' ({entry.method.name}) supports the edits {list(ops)}, not '{args.op}'")
    print(f"{args.op}: {write_edit_grid(ws, entry, method, args.op, args.n, num=args.num, mode=args.mode)}")


def cmd_score(args: argparse.Namespace) -> None:
    from pathlib import Path

    from spheregen.evaluation import read_external_samples, score_samples

    ws = _workspace(args)
    result = {key: score_samples(ws, read_external_samples(Path(args.samples), key)) for key in args.key}
    say(json.dumps(result, indent=2))


def cmd_flops(args: argparse.Namespace) -> None:
    from spheregen.flops import experiment_flops, format_flops_table

    ws = _workspace(args)
    rows = experiment_flops(ws, args.method, args.steps)
    say(json.dumps(rows, indent=2) if args.json else format_flops_table(rows))


def cmd_run(args: argparse.Namespace) -> None:
    # Metrics are built first: missing weights or an unusable feature space must fail
    # before an hour of training, not after.
    _workspace(args).build_metrics()
    args.skip_trained = not (args.resume or args.fresh)
    for stage in (cmd_train, cmd_sample, cmd_evaluate, cmd_report):
        stage(args)


def _common(p: argparse.ArgumentParser, methods: bool = True) -> None:
    p.add_argument("experiment", help="experiment TOML file, e.g. experiments/quickstart.toml")
    p.add_argument("--runs-dir", default=os.environ.get("SPHEREGEN_RUNS", "runs"), help="checkpoints and samples")
    p.add_argument("--reports-dir", default=os.environ.get("SPHEREGEN_REPORTS", "reports"), help="tables and plots")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--threads", type=int, default=int(os.environ.get("SPHEREGEN_THREADS", "0")),
                   help="torch CPU threads (default: torch's choice; env SPHEREGEN_THREADS)")
    if methods:
        p.add_argument("--method", action="append", help="only this method (repeatable); default: all")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="spheregen", description="Benchmark sphere-based image generators head to head.")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("list", help="every registered component by kind, with its plugin")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_list)
    for name, fn, text in (
        ("train", cmd_train, "train each method (checkpoints in runs/<experiment>/<method>/)"),
        ("run", cmd_run, "train, sample, evaluate and report, in order"),
    ):
        p = sub.add_parser(name, help=text)
        _common(p)
        p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
        p.add_argument("--fresh", action="store_true", help="delete the method's run directory and retrain")
        p.set_defaults(fn=fn, skip_trained=False)
    for name, fn, text in (
        ("sample", cmd_sample, "sample each method at each step count (runs/<experiment>/samples/)"),
        ("evaluate", cmd_evaluate, "score the samples, count FLOPs, time sampling -> results.parquet"),
        ("report", cmd_report, "tables and plots from results.parquet and the samples"),
    ):
        p = sub.add_parser(name, help=text)
        _common(p, methods=name != "report")
        p.set_defaults(fn=fn)
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
    try:
        args.fn(args)
    except SpheregenError as exc:
        print(f"spheregen: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("spheregen: interrupted; completed checkpoints and results are kept", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
