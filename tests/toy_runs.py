"""Subprocess helpers for the kill / preempt / resume tests: `spheregen` with the toy
plugin (tests/toy_cli.py) run to completion or started in the background, and the
bit-for-bit comparison of two runs' final weights."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from spheregen.artifacts import read_final

TOY_CLI = Path(__file__).resolve().parent / "toy_cli.py"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def toy_cli(*args, cwd) -> subprocess.CompletedProcess:
    """``spheregen ARGS`` with the toy plugin, to completion."""
    return subprocess.run([sys.executable, str(TOY_CLI), *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          env=ENV, timeout=300)


def start_toy_train(exp: Path, runs: Path, cwd: Path, stderr=subprocess.DEVNULL) -> subprocess.Popen:
    """``spheregen train EXP --runs-dir RUNS`` with the toy plugin, in the background."""
    return subprocess.Popen([sys.executable, str(TOY_CLI), "train", str(exp), "--runs-dir", str(runs)], cwd=cwd,
                            env=ENV, stdout=subprocess.DEVNULL, stderr=stderr, text=True)


def assert_same_final(a: Path, b: Path) -> None:
    """The final folders ``a`` and ``b`` hold bit-identical model and EMA weights."""
    fa, fb = read_final(a), read_final(b)
    for part in (0, 1):  # model, EMA
        assert fa[part].keys() == fb[part].keys()
        for k in fa[part]:
            assert torch.equal(fa[part][k], fb[part][k]), (part, k)


def dirs(root: Path) -> list[str]:
    """--runs-dir / --reports-dir options for a test's own folders under ``root``."""
    return ["--runs-dir", str(root / "runs"), "--reports-dir", str(root / "reports")]


def run_main(capsys, *args) -> tuple[int, str]:
    """``spheregen ARGS`` in process -> (exit code, stderr)."""
    from spheregen.cli import main

    capsys.readouterr()
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err
