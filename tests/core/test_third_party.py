"""The example third-party package (examples/third_party_plugin/), as a user would use it:
pip-installed into its own folder and found through its entry point alone, it lists its
four components, runs an experiment end to end through ``spheregen run`` with all four
(a Haar tokenizer, a denoiser with only ``forward(x, noise_level, labels)``, a midpoint
sampler and a pixel Fréchet-distance metric whose column the report shows), and passes
the contract tests. It is written against the public toolkit alone."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import spheregen.api

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "third_party_plugin"
COMPONENTS = {"tokenizer": "haar", "denoiser": "film-conv", "sampler": "midpoint", "metric": "pixel-fd"}

EXPERIMENT = """name = "example"
seed = 0
[data]
source = "digits"
image_size = 8
channels = 1
[train]
steps = 6
batch_size = 16
lr = 0.003
checkpoint_every = 0
log_every = 3
[eval]
steps = [1, 2]
num_samples = 20
batch_size = 20
throughput_batch = 4
metrics = [{ name = "pixel-fd" }]

[[methods]]
name = "fm-haar"
method = { name = "flow-matching", tokenizer = "haar", denoiser = { name = "film-conv", width = 16, depth = 1 } }
sampler = "midpoint"
guidance = 2.0

[[methods]]
name = "sphere-latent"
method = { name = "sphere-latent", tokenizer = "haar", denoiser = { name = "film-conv", width = 16, depth = 1 } }
guidance = 1.5
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict[str, str]:
    """The environment of a process that has the example pip-installed: the package is
    built from a copy of its sources (the checkout gets no build/ or egg-info) and
    installed into its own folder, offline, which then goes on PYTHONPATH."""
    tmp = tmp_path_factory.mktemp("third_party")
    src, target = tmp / "src", tmp / "site"
    shutil.copytree(EXAMPLE, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "--disable-pip-version-check", "--target", str(target), str(src)], check=True)
    env = {**os.environ, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("SPHEREGEN_PLUGINS", None)
    return env


@pytest.fixture(scope="module")
def example():
    """The example package imported from its sources, for in-process checks. Loaded by
    file location rather than by putting its folder on sys.path, where the metadata of an
    in-place build (``*.egg-info``) would also register it through its entry point."""
    init = EXAMPLE / "spheregen_example" / "__init__.py"
    spec = importlib.util.spec_from_file_location("spheregen_example", init,
                                                  submodule_search_locations=[str(init.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["spheregen_example"] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        for name in [n for n in sys.modules if n == "spheregen_example" or n.startswith("spheregen_example.")]:
            del sys.modules[name]


def test_installed_components_are_listed(installed):
    """``spheregen list`` finds the four components through the entry point, with their
    plugin and distribution, and the sampler's declared ``requires`` fits it to the
    methods with a velocity."""
    out = subprocess.run([sys.executable, "-m", "spheregen.cli", "list", "--json"], capture_output=True, text=True,
                         env=installed)
    assert out.returncode == 0, out.stderr
    listed = json.loads(out.stdout)
    for kind, name in COMPONENTS.items():
        entry = {e["name"]: e for e in listed[kind]}[name]
        assert (entry["plugin"], entry["distribution"]) == ("example", "spheregen-example"), entry
        assert entry["doc"]
    midpoint = {e["name"]: e for e in listed["sampler"]}["midpoint"]
    assert "flow-matching" in midpoint["fits"] and "sphere-latent" not in midpoint["fits"]


def test_installed_example_runs_an_experiment_end_to_end(installed, tmp_path):
    """``spheregen run`` with all four components: flow matching on Haar latents sampled
    by the midpoint sampler under guidance, and the Sphere Latent Encoder, both with the
    minimal denoiser; the metric's declared column is in results.md and index.html."""
    import polars as pl

    exp = tmp_path / "example.toml"
    exp.write_text(EXPERIMENT)
    reports = tmp_path / "reports"
    out = subprocess.run([sys.executable, "-m", "spheregen.cli", "run", str(exp), "--runs-dir", str(tmp_path / "runs"),
                          "--reports-dir", str(reports)], capture_output=True, text=True, env=installed)
    assert out.returncode == 0, out.stderr[-3000:]
    report = reports / "example"
    df = pl.read_parquet(report / "results.parquet").sort(["method", "steps"])
    assert df["method"].to_list() == ["fm-haar", "fm-haar", "sphere-latent", "sphere-latent"]
    fm = df.filter(pl.col("method") == "fm-haar")
    assert fm["sampler"].to_list() == ["midpoint"] * 2
    assert fm["nfe"].to_list() == [4, 8]  # 2 passes a step, each twice under guidance
    assert df["pixel_fd"].null_count() == 0 and (df["pixel_fd"] > 0).all()
    assert df["pixel_fd_features"].unique().to_list() == ["pixels 4×4"]
    versions = json.loads(df["plugin_versions"][0])
    for kind, name in COMPONENTS.items():
        assert versions[f"{kind}:{name}"] == "spheregen-example==0.2.0"
    md, page = (report / "results.md").read_text(), (report / "index.html").read_text()
    for text in (md, page):
        assert "pixel FD[pixels 4×4]" in text  # the column, with its feature space
        assert "pixel FD@1" in text  # the headline per-step table
    assert (report / "pixel_fd_vs_steps.png").is_file()


def test_installed_example_passes_the_contract_tests(installed):
    """The contract tests, parametrised over the registries, pick the installed example's
    components up with no new test code."""
    selected = " or ".join(["documented", *COMPONENTS.values()])
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "tests" / "contract"),
                          "-k", selected], capture_output=True, text=True, env=installed, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:]
    summary = out.stdout.strip().splitlines()[-1]
    assert "passed" in summary and "failed" not in summary and "error" not in summary, summary
    assert int(summary.split(" passed")[0].split()[-1]) >= 12, summary  # the example's cases ran


def test_example_imports_only_the_toolkit():
    """The example uses the core only through ``spheregen`` / ``spheregen.api`` names,
    and no built-in plugin."""
    bad = []
    for path in sorted((EXAMPLE / "spheregen_example").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                bad += [f"{path.name}: import {a.name}" for a in node.names
                        if a.name.split(".")[0] in ("spheregen", "spheregen_plugins") and a.name != "spheregen"]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                top = (node.module or "").split(".")[0]
                names = [a.name for a in node.names]
                if top == "spheregen_plugins" or (top == "spheregen" and (
                        node.module not in ("spheregen", "spheregen.api")
                        or not set(names) <= {*spheregen.api.__all__, "api"})):
                    bad.append(f"{path.name}: from {node.module} import {', '.join(names)}")
    assert not bad, bad


def test_haar_roundtrip(example):
    from spheregen.api import BuildContext, DataSpec, LosslessTokenizer, has

    tok = example.HaarTokenizer(example.HaarConfig(), BuildContext(data=DataSpec(image_size=8, channels=3,
                                                                                 num_classes=0), build=None))
    x = torch.randn(2, 3, 8, 8)
    z = tok.encode(x)
    assert z.shape == (2, *tok.latent_shape) == (2, 12, 4, 4)
    assert torch.allclose(tok.decode(z), x, atol=1e-6)
    assert torch.allclose(z.square().sum(), x.square().sum(), rtol=1e-5)  # orthonormal
    assert has(tok, LosslessTokenizer)


def test_denoiser_has_only_the_minimal_protocol(example):
    from spheregen.api import (BuildContext, DataSpec, ExplicitAttentionDenoiser, NullMaskDenoiser, TwoTimeDenoiser,
                               has)

    net = example.FilmConvDenoiser(example.FilmConvConfig.tiny(),
                                   BuildContext(data=DataSpec(image_size=4, channels=4, num_classes=3), build=None))
    assert not any(has(net, cap) for cap in (NullMaskDenoiser, TwoTimeDenoiser, ExplicitAttentionDenoiser))
    x = torch.randn(3, 4, 4, 4)
    assert net(x, torch.rand(3), torch.tensor([0, 1, 2])).shape == net(x, torch.rand(3), None).shape == x.shape


def test_pixel_fd_is_shardable_and_exact(example):
    """score(extract) equals compute whatever the batch size; a constant brightness shift
    moves only the means, so the distance is exactly the squared mean difference."""
    from spheregen.api import MetricContext, ShardableMetric, has

    def metric(batch_size):
        ctx = MetricContext(data=None, train_images=None, train_labels=None, test_images=None, test_labels=None,
                            cache_dir="", device=torch.device("cpu"), dataset_key="")
        return example.PixelFD(example.PixelFDConfig(batch_size=batch_size), ctx)

    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 200, (50, 3, 8, 8), generator=g, dtype=torch.uint8)
    b = torch.randint(0, 256, (30, 3, 8, 8), generator=g, dtype=torch.uint8)
    whole, batched = metric(256), metric(7)
    assert has(whole, ShardableMetric)
    torch.testing.assert_close(batched.extract(a)["pixels"], whole.extract(a)["pixels"], rtol=0, atol=0)
    assert whole.score(batched.extract(a), batched.reference_features(b)) == pytest.approx(whole.compute(a, b))
    assert whole.compute(a, a)["pixel_fd"] == pytest.approx(0.0, abs=1e-9)
    # +50 grey levels everywhere: each of the 3·4·4 pooled features moves by 50/127.5
    assert whole.compute(a, a + 50)["pixel_fd"] == pytest.approx(48 * (50 / 127.5) ** 2, rel=1e-6)
    with pytest.raises(ValueError, match="uint8"):
        whole.compute(a.float(), b)


def test_midpoint_on_a_method_without_velocity_is_refused_before_training(example, tiny_experiment, tmp_path,
                                                                          capsys):
    """The sampler's ``requires`` makes a misfit pairing a config error (exit 2) that
    names the sampler and the samplers that fit, before anything is trained."""
    from spheregen import plugins
    from spheregen.cli import main

    methods = ('[[methods]]\nname = "sl"\nmethod = { name = "sphere-latent", tokenizer = "haar", '
               'denoiser = { name = "film-conv", width = 8, depth = 1 } }\nsampler = "midpoint"\n')
    path = tiny_experiment(methods=methods)
    runs = tmp_path / "runs"
    installed_here = any(e.name == "midpoint" for e in plugins.registries().sampler)  # pip-installed in this env
    extra = [] if installed_here else [("example", example)]
    previous = plugins.set_registries(plugins.build_registries(extra=extra))
    try:
        assert main(["train", str(path), "--runs-dir", str(runs), "--reports-dir", str(tmp_path / "r")]) == 2
    finally:
        plugins.set_registries(previous)
    err = capsys.readouterr().err
    assert "methods 'sl'" in err and "sampler 'midpoint' does not fit" in err and "VelocityMethod" in err
    assert not runs.exists()
