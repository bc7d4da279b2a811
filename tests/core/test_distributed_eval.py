"""Evaluation sharded over two CPU processes (gloo, accelerate's debug_launcher) gives
the single process's samples and metrics exactly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl

ROOT = Path(__file__).resolve().parents[1]
METRICS = '''metrics = [
  { name = "fid", features = "domain-classifier", batch_size = 16, classifier = { width = 8, epochs = 1, batch_size = 64 } },
  { name = "kid", features = "domain-classifier", batch_size = 16, classifier = { width = 8, epochs = 1, batch_size = 64 } },
  { name = "cmmd", embedding = "domain-classifier", batch_size = 16, classifier = { width = 8, epochs = 1, batch_size = 64 } },
]'''


def _eval_worker():
    """Each launched process: toy plugin, sample and evaluate the trained toy method."""
    import sys

    sys.path.insert(0, str(ROOT))
    import torch
    import toy_plugin

    from spheregen import plugins
    from spheregen.evaluation import evaluate, sample_entry
    from spheregen.experiment import load_experiment
    from spheregen.workspace import Workspace

    torch.set_num_threads(1)
    plugins.set_registries(plugins.build_registries(extra=[("toy", toy_plugin)]))
    exp = load_experiment(os.environ["SG_TEST_EXP"])
    ws = Workspace(exp, os.environ["SG_TEST_RUNS"], os.environ["SG_TEST_REPORTS"])
    sample_entry(ws, exp.methods[0], torch.device("cpu"), progress=False)
    evaluate(ws, device=torch.device("cpu"))
    from accelerate import PartialState

    st = PartialState()
    Path(os.environ["SG_TEST_REPORTS"], f"rank{st.process_index}of{st.num_processes}").touch()


def _launch(num_processes: int, exp: Path, runs: Path, reports: Path) -> None:
    # a fresh interpreter: forking this multi-threaded test process can deadlock (OpenMP)
    code = ("import sys; sys.path.insert(0, %r); from core.test_distributed_eval import _eval_worker; "
            "from accelerate import debug_launcher; debug_launcher(_eval_worker, num_processes=%d)"
            % (str(ROOT), num_processes))
    env = {**os.environ, "SG_TEST_EXP": str(exp), "SG_TEST_RUNS": str(runs), "SG_TEST_REPORTS": str(reports),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]


def test_two_process_evaluation_equals_one(toy_registries, tiny_experiment, tmp_path):
    from spheregen.experiment import load_experiment
    from spheregen.runner import train
    from spheregen.workspace import Workspace

    path = tiny_experiment(METRICS)
    runs = tmp_path / "runs"
    train(Workspace(load_experiment(path), runs, tmp_path / "unused"), load_experiment(path).methods[0], progress=False)
    _launch(1, path, runs, tmp_path / "one")
    with np.load(runs / "tiny" / "samples" / "toy" / "steps-2.npz") as z:
        one_samples = z["images"].copy()
    _launch(2, path, runs, tmp_path / "two")
    with np.load(runs / "tiny" / "samples" / "toy" / "steps-2.npz") as z:
        assert np.array_equal(z["images"], one_samples)  # 40 samples in 2 batches of 20, one per process
    one = pl.read_parquet(tmp_path / "one" / "tiny" / "results.parquet").sort("steps")
    two = pl.read_parquet(tmp_path / "two" / "tiny" / "results.parquet").sort("steps")
    assert len(one) == len(two) == 2
    assert sorted(p.name for p in (tmp_path / "two").glob("rank*")) == ["rank0of2", "rank1of2"]
    for key in ("fid", "kid", "cmmd"):
        assert two[key].to_list() == one[key].to_list(), key
    assert one["fid"].min() > 0
