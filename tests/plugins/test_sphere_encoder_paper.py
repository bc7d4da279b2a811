"""The paper experiment files (experiments/paper/*.toml) load and build what they say."""

from __future__ import annotations

import tomllib
from pathlib import Path

import attrs
import pytest
import torch

from spheregen.config import structure
from spheregen.experiment import load_experiment
from spheregen.interfaces import DataSpec
from spheregen.plugins import registries
from spheregen_plugins.sphere_encoder.config import SphereEncoderConfig, SphereSamplerConfig
from spheregen_plugins.sphere_encoder.method import SphereEncoder
from spheregen_plugins.sphere_encoder.networks import count_parameters

PAPER = Path(__file__).resolve().parents[2] / "experiments" / "paper"
# file -> (HF id, num_classes, parameters of the official model, guidance)
FILES = {
    "cifar10": ("uoft-cs/cifar10", 10, 263.8e6, 1.2),
    "animal_faces": ("huggan/AFHQ", 0, 642.1e6, 1.0),
    "oxford_flowers": ("nelorth/oxford-flowers", 102, 948.8e6, 1.6),
    "imagenet_large": ("ILSVRC/imagenet-1k", 1000, 950.4e6, 1.4),
    "imagenet_xlarge": ("ILSVRC/imagenet-1k", 1000, 1388.9e6, 1.4),
}


def _missing_components(raw):
    regs = registries()
    needed = [("dataset", raw["data"]["source"]["name"])]
    needed += [("metric", m if isinstance(m, str) else m["name"]) for m in raw["eval"].get("metrics", [])]
    return [f"{kind} '{name}'" for kind, name in needed if name not in regs[kind]]


@pytest.mark.parametrize("stem", sorted(FILES))
def test_paper_experiment_loads(stem):
    path = PAPER / f"{stem}.toml"
    raw = tomllib.loads(path.read_text())
    missing = _missing_components(raw)
    if missing:
        pytest.skip(f"{path.name} names components not registered here: {', '.join(missing)}")
    exp = load_experiment(path)
    hf_id, _, _, guidance = FILES[stem]
    assert exp.data.source.name == "hf" and exp.data.source.config.id == hf_id
    (entry,) = exp.methods
    assert entry.method.name == "sphere-encoder" and entry.sampler.name == "sphere"
    assert entry.guidance == guidance and entry.train.lr == 1e-4 and entry.train.batch_size == 256


@pytest.mark.parametrize("stem", sorted(FILES))
def test_paper_method_matches_official_size(stem):
    raw = tomllib.loads((PAPER / f"{stem}.toml").read_text())
    (method,) = raw["methods"]
    options = {k: v for k, v in method["method"].items() if k != "name"}
    cfg = structure(SphereEncoderConfig, options, "method", stem)
    structure(SphereSamplerConfig, {k: v for k, v in method["sampler"].items() if k != "name"}, "sampler", stem)
    _, classes, params, _ = FILES[stem]
    data = DataSpec(image_size=raw["data"]["image_size"], channels=3, num_classes=classes)
    with torch.device("meta"):
        # Perceptual weights off: LPIPS adds no trainable parameter and needs the VGG file.
        model = SphereEncoder(attrs.evolve(cfg, perc_weight=0.0, con_perc_weight=0.0), data)
    assert abs(count_parameters(model) - params) / params < 0.005
