"""A denoiser written from the documented contract alone, ``forward(x, noise_level,
labels)``, registered as a third party would: it trains and samples under the built-in
``flow-matching`` and ``sphere-latent`` methods, with and without guidance, and a
``meanflow`` method, which needs a second time input, refuses it when it is built."""

from __future__ import annotations

import sys

import attrs
import pytest
import torch
import torch.nn.functional as F

import spheregen
from spheregen import plugins
from spheregen.api import BuildContext, ConfigError, DataSpec, make_component
from spheregen.cli import main
from spheregen.workspace import build_component

SPEC = DataSpec(image_size=8, channels=1, num_classes=3)


@attrs.frozen(kw_only=True)
class MinimalConfig:
    """A two-conv denoiser with only the minimal Denoiser protocol."""

    width: int = 16


class MinimalDenoiser(torch.nn.Module):
    """Exactly ``spheregen.interfaces.Denoiser``: no ``drop``, no second time, no options.
    ``calls`` records (batch size, labels given) per forward pass."""

    def __init__(self, cfg: MinimalConfig, ctx: BuildContext):
        super().__init__()
        c, self.num_classes = ctx.data.channels, ctx.data.num_classes
        self.inp = torch.nn.Conv2d(c, cfg.width, 3, padding=1)
        self.time = torch.nn.Linear(1, cfg.width)
        self.label = torch.nn.Embedding(self.num_classes + 1, cfg.width)
        self.out = torch.nn.Conv2d(cfg.width, c, 3, padding=1)
        self.calls: list[tuple[int, bool]] = []

    def forward(self, x, noise_level, labels):
        self.calls.append((len(x), labels is not None))
        rows = torch.full((len(x),), self.num_classes, device=x.device) if labels is None else labels
        cond = self.time(noise_level[:, None].to(x.dtype)) + self.label(rows)
        return self.out(F.silu(self.inp(x) + cond[:, :, None, None]))


@spheregen.hookimpl
def spheregen_register_denoisers(register):
    register("minimal-conv", MinimalDenoiser, MinimalConfig)


@pytest.fixture
def minimal_registered():
    previous = plugins.set_registries(plugins.build_registries(extra=[("minimal", sys.modules[__name__])]))
    yield
    plugins.set_registries(previous)


def build_method(name: str):
    torch.manual_seed(0)
    method = make_component("method", name, tokenizer={"name": "patch", "patch_size": 2},
                            denoiser={"name": "minimal-conv"}, label_dropout=0.5)
    return build_component("method", method, BuildContext.create(build_component, data=SPEC))


@pytest.mark.usefixtures("minimal_registered")
@pytest.mark.parametrize("name", ["flow-matching", "sphere-latent"])
def test_trains_and_samples_with_and_without_guidance(name):
    method = build_method(name)
    den = method.denoiser
    assert isinstance(den, MinimalDenoiser) and method.latent_shape == (4, 4, 4)
    images = torch.rand(8, 1, 8, 8) * 2 - 1
    labels = torch.arange(8) % 3
    opt = torch.optim.Adam(method.param_groups()[0]["params"], lr=1e-3)
    before = [p.detach().clone() for p in den.parameters()]
    for _ in range(2):
        loss, logs = method.loss(images, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss) and all(isinstance(v, float) for v in logs.values())
    assert all(not torch.equal(a, b) for a, b in zip(before, den.parameters()))
    assert {given for _, given in den.calls} == {True, False}, "label dropout trains the null class"

    sampler = build_component("sampler", method.default_sampler, BuildContext.create(build_component, data=SPEC))
    method.eval()
    for guidance in (1.0, 2.0):
        den.calls.clear()
        out = sampler.sample(method, labels[:3], 2, guidance, torch.Generator().manual_seed(0))
        assert out.shape == (3, 1, 8, 8) and torch.isfinite(out).all() and out.abs().max() <= 1
        assert sum(n for n, _ in den.calls) == 3 * sampler.nfe(2, guidance)
        assert any(not given for _, given in den.calls) == (guidance > 1), "guidance runs the null class"


@pytest.mark.usefixtures("minimal_registered")
def test_meanflow_refuses_it_when_built():
    with pytest.raises(ConfigError, match="TwoTimeDenoiser .*MinimalDenoiser lacks time_inputs, forward\\(noise_level2\\)"):
        build_method("meanflow")


@pytest.mark.usefixtures("minimal_registered")
def test_meanflow_with_it_exits_2_before_training(tiny_experiment, tmp_path, capsys):
    methods = ('[[methods]]\nname = "mf"\nmethod = { name = "meanflow", tokenizer = { name = "patch", patch_size = 2 }, '
               'denoiser = { name = "minimal-conv" } }\n')
    path = tiny_experiment(methods=methods)
    runs = tmp_path / "runs"
    assert main(["train", str(path), "--runs-dir", str(runs), "--reports-dir", str(tmp_path / "reports")]) == 2
    assert "TwoTimeDenoiser" in capsys.readouterr().err
    assert not runs.exists()
