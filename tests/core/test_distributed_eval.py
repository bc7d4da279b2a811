"""Evaluation sharded over two CPU processes (gloo, accelerate's debug_launcher) gives
the single process's samples and metrics exactly: each process writes the shard of its
sample batches and extracts the features of its block, and the features are gathered."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import torch

from spheregen.samples import load_samples, read_meta

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
    index = runs / "tiny" / "samples" / "toy" / "steps-2.npz"
    _launch(1, path, runs, tmp_path / "one")
    one_samples, one_labels = load_samples(index)
    with np.load(index) as z:  # one process: one self-contained file, no shards
        assert set(z.files) == {"images", "labels", "meta"} and np.array_equal(z["images"], one_samples.numpy())
    _launch(2, path, runs, tmp_path / "two")
    # 40 samples in 2 batches of 20: each process wrote the shard of its batch, the main one the index
    with np.load(index) as z:
        assert set(z.files) == {"labels", "meta", "shards"}
        assert json.loads(str(z["shards"])) == [["steps-2.shards/part-00000-of-00002.npz", 20],
                                                ["steps-2.shards/part-00001-of-00002.npz", 20]]
    two_samples, two_labels = load_samples(index)
    assert torch.equal(two_samples, one_samples) and torch.equal(two_labels, one_labels)
    with np.load(index.parent / "steps-2.shards" / "part-00001-of-00002.npz") as z:  # a shard: images, identity
        assert np.array_equal(z["images"], one_samples[20:].numpy()) and json.loads(str(z["meta"])) == read_meta(index)
    one = pl.read_parquet(tmp_path / "one" / "tiny" / "results.parquet").sort("steps")
    two = pl.read_parquet(tmp_path / "two" / "tiny" / "results.parquet").sort("steps")
    assert len(one) == len(two) == 2
    assert sorted(p.name for p in (tmp_path / "two").glob("rank*")) == ["rank0of2", "rank1of2"]
    for key in ("fid", "kid", "cmmd"):
        assert two[key].to_list() == one[key].to_list(), key
    assert one["fid"].min() > 0
