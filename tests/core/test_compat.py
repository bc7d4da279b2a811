"""Sampler/method compatibility is checked when the experiment is loaded: a misfit
pairing exits 2 before anything is trained or written, naming the method entry, the
sampler and the samplers that fit."""

import json
import subprocess
import sys

import pytest
import torch

from spheregen import compat
from spheregen.cli import main
from spheregen.experiment import load_experiment
from spheregen.interfaces import AverageVelocityMethod, VelocityMethod
from spheregen.workspace import Workspace

MISFIT = '[[methods]]\nname = "se"\nmethod = { name = "sphere-encoder", size = "tiny", patch_size = 4 }\n' \
         'sampler = "euler"\n'


@pytest.mark.parametrize("command", ["train", "run", "sample", "evaluate"])
def test_misfit_sampler_is_refused_before_anything_runs(command, toy_registries, tiny_experiment, tmp_path, capsys):
    path = tiny_experiment(methods=MISFIT)
    runs, reports = tmp_path / "runs", tmp_path / "reports"
    assert main([command, str(path), "--runs-dir", str(runs), "--reports-dir", str(reports)]) == 2
    err = capsys.readouterr().err
    assert "methods 'se'" in err and "sampler 'euler'" in err and "method 'sphere-encoder'" in err
    assert "needs VelocityMethod (velocity)" in err and "Samplers that fit 'sphere-encoder': sphere" in err
    assert not runs.exists() and not reports.exists()


def test_misfit_fails_from_the_command_line(tiny_experiment, tmp_path):
    """The installed entry point, as a user runs it: exit code 2, one message, no traceback."""
    path = tiny_experiment(methods=MISFIT)
    proc = subprocess.run([sys.executable, "-m", "spheregen.cli", "train", str(path), "--runs-dir",
                           str(tmp_path / "runs")], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "sampler 'euler' does not fit method 'sphere-encoder'" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_fitting_pairs_pass(toy_registries, tiny_experiment, tmp_path):
    methods = MISFIT.replace('"euler"', '"sphere"') + '[[methods]]\nname = "toy"\nmethod = "toy-ae"\n'
    ws = Workspace(load_experiment(tiny_experiment(methods=methods)), tmp_path / "runs", tmp_path / "reports")
    ws.check_compatibility()
    assert not (tmp_path / "runs").exists()


class _Velocity(torch.nn.Module):
    latent_shape = (4, 2, 2)

    def velocity(self, x, t, labels, drop=None):
        return x

    def decode(self, latents):
        return latents


class _Sampler:
    def __init__(self, requires):
        if requires is not None:
            self.requires = requires


@pytest.mark.parametrize("requires, lacks", [
    (None, []),  # declares nothing: fits any method
    ((), []),
    ((VelocityMethod,), []),
    (("velocity", "decode"), []),
    (("velocity", "average_velocity"), ["average_velocity"]),
    ((VelocityMethod, "spherify"), ["spherify"]),
    ((AverageVelocityMethod,), ["AverageVelocityMethod (average_velocity)"]),
])
def test_missing_by_protocol_or_attribute_name(requires, lacks):
    assert compat.missing(_Sampler(requires), _Velocity()) == lacks


def test_list_shows_the_methods_each_sampler_fits(capsys):
    assert main(["list", "--json"]) == 0
    samplers = {e["name"]: e["fits"] for e in json.loads(capsys.readouterr().out)["sampler"]}
    assert samplers["euler"] == ["flow-matching", "meanflow"]
    assert samplers["meanflow"] == ["meanflow"]
    assert samplers["sphere"] == ["sphere-encoder"] and samplers["sphere-latent"] == ["sphere-latent"]
    assert main(["list"]) == 0
    assert "fits methods: flow-matching, meanflow" in capsys.readouterr().out


def test_a_velocity_without_the_guidance_mask_does_not_fit():
    """Protocols are checked beyond names: Euler passes ``drop`` for guidance."""

    class NoDrop(_Velocity):
        def velocity(self, x, t, labels):
            return x

    assert compat.missing(_Sampler((VelocityMethod,)), NoDrop()) == ["VelocityMethod (velocity(drop))"]
