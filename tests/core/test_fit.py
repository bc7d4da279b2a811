"""Fitting is a stage: `spheregen fit` trains the RAE tokenizer and the domain classifier
through the methods' trainer, `run` reuses them, a killed fit resumes bit-identical,
and the stages that only load say how to get what is missing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from spheregen.cli import main

TOY_CLI = Path(__file__).resolve().parents[1] / "toy_cli.py"
pytestmark = pytest.mark.usefixtures("single_thread")  # the subprocesses run --threads 1 too

RAE = ('{{ name = "rae", patch = 4, latent_dim = 8, encoder_width = {w}, encoder_depth = {d}, encoder_heads = 2, '
       'encoder_steps = {s}, decoder_width = {w}, decoder_depth = {d}, decoder_heads = 2, decoder_steps = {s}, '
       'batch_size = 16 }}')
CLASSIFIER = '{ name = "class-accuracy", batch_size = 20, classifier = { width = 8, epochs = 1, batch_size = 32 } }'


def experiment(tmp_path: Path, rae: str, metrics: str = "", train: str = "") -> Path:
    text = f'''name = "fitx"
seed = 0
[data]
source = "digits"
image_size = 8
channels = 1
[train]
steps = 4
batch_size = 16
lr = 0.01
checkpoint_every = 2
log_every = 1
{train}
[eval]
steps = [1]
num_samples = 20
batch_size = 20
throughput_batch = 8
metrics = [{metrics}]
[[methods]]
name = "fm"
method = {{ name = "flow-matching", tokenizer = {rae}, denoiser = {{ name = "dit", width = 32, depth = 1, heads = 2, patch_size = 1 }} }}
sampler = "euler"
'''
    path = tmp_path / "fitx.toml"
    path.write_text(text)
    return path


def fitted(runs: Path) -> dict[str, Path]:
    """component name -> its fit folder (one per component in these tests)."""
    return {d.parent.name: d for d in (runs / ".cache" / "fit").glob("*/*") if (d / "fit.json").is_file()}


def stamps(folders: dict[str, Path]) -> dict[str, tuple[int, int]]:
    return {k: ((d / "weights.safetensors").stat().st_mtime_ns, (d / "fit.json").stat().st_mtime_ns)
            for k, d in folders.items()}


def test_fit_then_run_reuses_the_fitted_tokenizer_and_classifier(tmp_path, capsys):
    exp = experiment(tmp_path, RAE.format(w=32, d=1, s=4), CLASSIFIER)
    dirs = ["--runs-dir", str(tmp_path / "runs"), "--reports-dir", str(tmp_path / "reports")]
    assert main(["fit", str(exp), *dirs]) == 0
    out = capsys.readouterr().out
    assert "rae: fitted" in out and "domain-classifier: fitted" in out
    folders = fitted(tmp_path / "runs")
    assert set(folders) == {"rae", "domain-classifier"}
    before = stamps(folders)
    for name, folder in folders.items():  # a phase log per trained phase, the phases' checkpoints cleared
        meta = json.loads((folder / "fit.json").read_text())
        assert meta["name"] == name and meta["info"]["report_split"] == "test"
        logs = sorted(p.parent.name for p in folder.glob("*/train_log.jsonl"))
        assert logs == (["0-encoder-mae", "2-decoder"] if name == "rae" else ["0-classifier"])
        assert not list(folder.glob("*/checkpoints/step-*"))
    assert 0 < json.loads((folders["domain-classifier"] / "fit.json").read_text())["info"]["test_accuracy"] <= 1
    # a second fit finds both; run fits nothing and trains, samples, scores on them
    assert main(["fit", str(exp), *dirs]) == 0
    assert capsys.readouterr().out.count("already fitted") == 2
    assert main(["run", str(exp), *dirs]) == 0
    out = capsys.readouterr().out
    assert out.count("already fitted") == 2 and ": fitted" not in out
    assert stamps(fitted(tmp_path / "runs")) == before and fitted(tmp_path / "runs") == folders
    assert (tmp_path / "reports" / "fitx" / "results.parquet").is_file()


def test_train_alone_fits_first_and_loading_stages_name_spheregen_fit(tmp_path, capsys):
    """`train` without a prior `fit` fits the method's tokenizer itself (documented
    choice); `sample` and `evaluate` only load, and say how to get what is missing."""
    exp = experiment(tmp_path, RAE.format(w=32, d=1, s=4), CLASSIFIER)
    dirs = ["--runs-dir", str(tmp_path / "runs"), "--reports-dir", str(tmp_path / "reports")]
    assert main(["train", str(exp), *dirs]) == 0
    assert set(fitted(tmp_path / "runs")) == {"rae"}  # the classifier is the metrics' business
    assert main(["sample", str(exp), *dirs]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(exp), *dirs]) == 2
    err = capsys.readouterr().err
    assert "domain-classifier: no fitted weights" in err and "spheregen fit EXPERIMENT.toml" in err
    import shutil

    shutil.rmtree(fitted(tmp_path / "runs")["rae"])
    assert main(["sample", str(exp), *dirs]) == 2
    err = capsys.readouterr().err
    assert "rae: no fitted weights" in err and "spheregen fit EXPERIMENT.toml" in err


class _Cli:
    """``spheregen ARGS --threads 1`` with the toy plugin in the background, its output
    in a file (a pipe nobody reads would block the progress bar, and the fit with it)."""

    def __init__(self, log: Path, *args: object):
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        self.log = log
        with open(log, "w") as out:
            self.proc = subprocess.Popen([sys.executable, str(TOY_CLI), *map(str, args), "--threads", "1"], env=env,
                                         stdout=out, stderr=subprocess.STDOUT)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    @property
    def output(self) -> str:
        return self.log.read_text()


def _interrupt(run: _Cli, folder: Path, phase: str, sig: signal.Signals) -> int:
    """Send ``sig`` once the phase's checkpoint of step 40 exists; the exit code."""
    deadline = time.time() + 240
    while not list(folder.glob(f"*/{phase}/checkpoints/step-0000040")) and time.time() < deadline \
            and run.proc.poll() is None:
        time.sleep(0.005)
    run.proc.send_signal(sig)
    code = run.wait(timeout=120)
    assert not list(folder.glob("*/fit.json")), f"interrupted too late: the fit finished\n{run.output[-2000:]}"
    return code


def test_a_fit_stopped_by_sigterm_and_killed_by_sigkill_resumes_bit_identical(tmp_path):
    """SIGTERM in the encoder phase (a checkpoint, exit 75), SIGKILL in the decoder phase
    (the encoder's result and the decoder's last checkpoint survive): resumed twice, the
    fit ends with the weights of an uninterrupted one, bit for bit."""
    exp = experiment(tmp_path, RAE.format(w=64, d=2, s=200), train="checkpoint_minutes = 0")
    exp.write_text(exp.read_text().replace("checkpoint_every = 2", "checkpoint_every = 20"))
    assert main(["fit", str(exp), "--runs-dir", str(tmp_path / "ref")]) == 0  # in this process, one thread too
    folder, runs = tmp_path / "killed" / ".cache" / "fit" / "rae", tmp_path / "killed"
    run = _Cli(tmp_path / "term.log", "fit", exp, "--runs-dir", runs)
    assert _interrupt(run, folder, "0-encoder-mae", signal.SIGTERM) == 75
    assert "stopped by SIGTERM" in run.output and "--resume" in run.output
    again = _Cli(tmp_path / "again.log", "fit", exp, "--runs-dir", runs)
    assert again.wait(timeout=120) == 2 and "interrupted fit of rae" in again.output
    run = _Cli(tmp_path / "kill.log", "fit", exp, "--runs-dir", runs, "--resume")
    _interrupt(run, folder, "2-decoder", signal.SIGKILL)
    resumed = _Cli(tmp_path / "resumed.log", "fit", exp, "--runs-dir", runs, "--resume")
    assert resumed.wait(timeout=600) == 0, resumed.output[-3000:]
    a, b = fitted(tmp_path / "ref")["rae"], fitted(runs)["rae"]
    assert a.name == b.name
    wa, wb = load_file(str(a / "weights.safetensors")), load_file(str(b / "weights.safetensors"))
    assert wa.keys() == wb.keys() and {k.split(".")[0] for k in wa} == {"encoder", "decoder", "mean", "var"}
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    # each phase's log has every step once, as the uninterrupted one
    for log in ("0-encoder-mae/train_log.jsonl", "2-decoder/train_log.jsonl"):
        steps_a = [json.loads(line)["step"] for line in (a / log).read_text().splitlines()]
        steps_b = [json.loads(line)["step"] for line in (b / log).read_text().splitlines()]
        assert steps_a == steps_b == list(range(1, 201))


def test_fresh_refits_and_other_data_is_another_fit(tmp_path, capsys):
    exp = experiment(tmp_path, RAE.format(w=32, d=1, s=2))
    dirs = ["--runs-dir", str(tmp_path / "runs")]
    assert main(["fit", str(exp), *dirs]) == 0
    before = stamps(fitted(tmp_path / "runs"))
    capsys.readouterr()
    assert main(["fit", str(exp), *dirs, "--fresh"]) == 0
    assert "rae: fitted" in capsys.readouterr().out
    after = stamps(fitted(tmp_path / "runs"))
    assert after.keys() == before.keys() and after["rae"] != before["rae"]
    assert main(["fit", str(exp), *dirs, "--set", "data.test_fraction=0.2"]) == 0
    assert len(list((tmp_path / "runs" / ".cache" / "fit" / "rae").iterdir())) == 2


ROOT = Path(__file__).resolve().parents[1]


def _fit_worker():
    """Each launched process: fit the experiment's components (a collective stage)."""
    import torch

    from spheregen.experiment import load_experiment
    from spheregen.fit import fit_experiment
    from spheregen.workspace import Workspace

    torch.set_num_threads(1)
    exp = load_experiment(os.environ["SG_TEST_EXP"])
    ws = Workspace(exp, os.environ["SG_TEST_RUNS"], os.environ["SG_TEST_RUNS"] + "-reports")
    fit_experiment(ws, progress=False)


def _launch(num_processes: int, exp: Path, runs: Path) -> None:
    # a fresh interpreter: forking this multi-threaded test process can deadlock (OpenMP)
    code = ("import sys; sys.path.insert(0, %r); from core.test_fit import _fit_worker; "
            "from accelerate import debug_launcher; debug_launcher(_fit_worker, num_processes=%d)"
            % (str(ROOT), num_processes))
    env = {**os.environ, "SG_TEST_EXP": str(exp), "SG_TEST_RUNS": str(runs), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]


def test_two_processes_fit_together_like_one(tmp_path):
    """The fit is one stage of every process: the same global batches (the per-process
    noise draws differ), the statistics summed over both, one folder written once."""
    exp = experiment(tmp_path, RAE.format(w=32, d=1, s=30), CLASSIFIER.replace("epochs = 1", "epochs = 2"))
    assert main(["fit", str(exp), "--runs-dir", str(tmp_path / "one")]) == 0
    _launch(2, exp, tmp_path / "two")
    one, two = fitted(tmp_path / "one"), fitted(tmp_path / "two")
    assert set(one) == set(two) == {"rae", "domain-classifier"}
    assert [d.name for d in one.values()] == [d.name for d in two.values()]  # one identity, whatever the launch
    for name in one:
        a, b = (json.loads((d[name] / "fit.json").read_text())["info"] for d in (one, two))
        for phase, info in a["phases"].items():
            assert b["phases"][phase].get("steps") == info.get("steps")
        if name == "domain-classifier":  # no noise draws: the same global batches, averaged gradients
            assert abs(a["test_accuracy"] - b["test_accuracy"]) < 0.1
        else:
            assert abs(a["psnr"] - b["psnr"]) < 0.15 * a["psnr"]
    # the encoder phase draws no noise that matters (mask ratio 0): two processes averaging
    # the gradients of half batches follow one process up to float rounding
    sa = load_file(str(one["rae"] / "weights.safetensors"))
    sb = load_file(str(two["rae"] / "weights.safetensors"))
    enc = [k for k in sa if k.startswith("encoder.")]
    assert enc and all(torch.allclose(sa[k], sb[k], atol=1e-3, rtol=1e-3) for k in enc)
