"""Trained methods from Python: ``spheregen.load(...)`` -> a :class:`Generator`.

It needs the run's ``final/`` folder (weights.safetensors and config.json) and, for a
method on a tokenizer spheregen fitted, the runs' ``.cache`` it lives in; never the
dataset. ::

    import spheregen
    g = spheregen.load("runs/quickstart", method="sphere-latent")
    images = g.sample([0, 1, 2], steps=2)          # uint8 3×C×H×W
    recon = g.reconstruct(images)                    # uint8, through the method's tokenizer
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from spheregen.artifacts import read_final
from spheregen.config import structure
from spheregen.data import to_float, to_uint8
from spheregen.errors import SpheregenError
from spheregen.experiment import MethodEntry
from spheregen.interfaces import BuildContext, DataSpec


class Generator:
    """A trained method with its sampler. ``config`` is the run's config.json (method
    entry, data spec, run identity, step); ``method`` the ``nn.Module`` in eval mode."""

    def __init__(self, method: torch.nn.Module, sampler: Any, entry: MethodEntry, config: dict[str, Any],
                 device: torch.device):
        self.method, self.sampler, self.entry, self.config, self.device = method, sampler, entry, config, device
        self.chosen_guidance: dict[int, float] = {}  # {steps: scale} chosen by evaluation from a list

    def guidance(self, steps: int) -> float:
        """The scale sampling uses at ``steps`` by default: the one evaluation chose for
        that step count, else the method's single scale, else 1.0 (no guidance)."""
        if steps in self.chosen_guidance:
            return self.chosen_guidance[steps]
        if isinstance(self.entry.guidance, tuple):
            raise SpheregenError(f"method '{self.entry.name}' has the guidance list {list(self.entry.guidance)} and no "
                                 f"scale was chosen at {steps} steps (run `spheregen sample`); pass guidance=...")
        return 1.0 if self.entry.guidance is None else float(self.entry.guidance)

    @property
    def spec(self) -> DataSpec:
        return DataSpec(**self.config["data"])

    @torch.no_grad()
    def sample(self, labels: Sequence[int] | torch.Tensor, steps: int, guidance: float | None = None, seed: int = 0,
               batch: int = 256) -> torch.Tensor:
        """uint8 N×C×H×W images of the classes ``labels`` (N) in ``steps`` steps, with the
        run's guidance (:meth:`guidance`) unless given; batch i draws from seed (seed, i)
        as evaluation does."""
        from spheregen.samples import batch_seed

        y = torch.as_tensor(labels, dtype=torch.int64)
        if y.ndim != 1 or (self.spec.num_classes and (y.min() < 0 or y.max() >= self.spec.num_classes)):
            raise SpheregenError(f"labels must be a list of classes in [0, {self.spec.num_classes}), got {y.tolist()}")
        w = self.guidance(steps) if guidance is None else float(guidance)
        parts = []
        for i in range(0, len(y), batch):
            gen = torch.Generator(device=self.device).manual_seed(batch_seed(seed, i // batch))
            parts.append(to_uint8(self.sampler.sample(self.method, y[i:i + batch].to(self.device), steps, w, gen)))
        return torch.cat(parts)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, labels: Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
        """uint8 N×C×H×W through the method's tokenizer (or its own encoder-decoder);
        ``images`` uint8, or float in [-1, 1]."""
        if not hasattr(self.method, "reconstruct"):
            raise SpheregenError(f"method '{self.entry.name}' ({self.entry.method.name}) has no reconstruct()")
        x = to_float(images) if images.dtype == torch.uint8 else images.float()
        y = None if labels is None else torch.as_tensor(labels, dtype=torch.int64).to(self.device)
        return to_uint8(self.method.reconstruct(x.to(self.device), y))


def _final_folder(path: Path, method: str | None) -> Path:
    """The ``final/`` folder for a run path: an experiment's runs folder plus a method
    name, a method's run folder, or the final folder itself."""
    if (path / "config.json").is_file() and (path / "weights.safetensors").is_file():
        return path
    if (path / "final").is_dir():
        return path / "final"
    trained = sorted(p.parent.parent.name for p in path.glob("*/final/config.json")) or "none"
    if method is None:
        raise SpheregenError(f"{path}: name the method, spheregen.load({str(path)!r}, method=...); "
                             f"trained here: {trained}")
    folder = path / method / "final"
    if not folder.is_dir():
        raise SpheregenError(f"{folder} does not exist: no trained method {method!r} in {path}; "
                             f"trained here: {trained}")
    return folder


def load(path: str | Path, method: str | None = None, use_ema: bool = True, device: str | torch.device = "cpu",
         runs_dir: str | Path = "runs") -> Generator:
    """A trained method from its saved weights and config alone.

    ``path``: an experiment's runs folder (``runs/quickstart``, with ``method``), a
    method's run folder (``runs/quickstart/sphere-latent``), its ``final/`` folder, or an
    experiment TOML (its runs are looked for under ``runs_dir``). EMA weights are used
    when the run kept them and ``use_ema``."""
    from spheregen.plugins import registries
    from spheregen.workspace import build_component

    path = Path(path)
    if path.suffix == ".toml":
        from spheregen.experiment import load_experiment

        path = Path(runs_dir) / load_experiment(path).name
    folder = _final_folder(path, method)
    model, ema, config = read_final(folder)
    entry = structure(MethodEntry, config["entry"], "", str(folder / "config.json"))
    device = torch.device(device)
    spec = DataSpec(**config["data"])
    cache = folder.parents[2] / ".cache"  # runs/<experiment>/<method>/final -> runs/.cache
    ctx = BuildContext.create(build_component, data=spec, cache_dir=str(cache), data_key=config.get("data_key"),
                              device=device)
    registries()  # plugins loaded before building
    built = build_component("method", entry.method, ctx, f"{folder / 'config.json'}: entry.method")
    built.load_state_dict({**model, **ema} if use_ema and ema is not None else model)
    built = built.to(device).eval()
    sampler = build_component("sampler", entry.sampler or built.default_sampler, ctx,
                              f"{folder / 'config.json'}: entry.sampler")
    generator = Generator(built, sampler, entry, config, device)
    record = folder.parents[1] / "samples" / entry.name / "guidance.json"  # runs/<exp>/samples/<method>/
    if record.is_file():
        generator.chosen_guidance = _chosen(record, config.get("config_hash"))
    return generator


def _chosen(record: Path, run_hash: str | None) -> dict[int, float]:
    """The guidance choice of ``record`` when it was made on these weights, else {}."""
    import json

    try:
        data = json.loads(record.read_text())
    except (OSError, ValueError):
        return {}
    rows = data.get("rows") or [{}]
    if run_hash is None or any(r.get("train_hash", run_hash) != run_hash for r in rows):
        return {}
    return {int(k): float(v) for k, v in data.get("chosen", {}).items()}
