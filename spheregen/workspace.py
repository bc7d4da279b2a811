"""An experiment bound to its files: builds data, methods, samplers and metrics through
the registries. Every stage (train, sample, evaluate, report) starts from one."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch

from spheregen import compat, precision
from spheregen.config import Component, make_component
from spheregen.data import Data
from spheregen.errors import ConfigError
from spheregen.experiment import Experiment, MethodEntry
from spheregen.interfaces import BuildContext, DataSpec, MetricContext
from spheregen.paths import Paths
from spheregen.plugins import registries


def build_component(kind: str, component: Component | str, ctx: Any, where: str = "") -> Any:
    """Build ``component`` (a Component or a bare name with default config) of ``kind``.

    A factory that rejects its config for this data (ValueError: an image size the patch
    does not divide, say) becomes a ConfigError naming ``where`` and the component."""
    if isinstance(component, str):
        component = make_component(kind, component)
    try:
        return registries()[kind].build(component.name, component.config, ctx)
    except ValueError as exc:
        raise ConfigError(f"{where or 'config'}: {kind} '{component.name}' cannot be built: {exc}") from exc


class Workspace:
    def __init__(self, exp: Experiment, runs_root: str | Path = "runs", reports_root: str | Path = "reports",
                 device: torch.device | None = None):
        self.exp = exp
        self.paths = Paths(Path(runs_root), Path(reports_root), exp.name)
        self.device = device or torch.device("cpu")

    @functools.cached_property
    def data(self) -> Data:
        source = build_component("dataset", self.exp.data.source, None, f"{self.exp.source}: data.source")
        return Data(self.exp.data, source, self.paths.cache)

    def build_context(self, device: torch.device | None = None) -> BuildContext:
        return self._context(self.data.spec, device or self.device, data=True)

    def _context(self, spec: DataSpec, device: torch.device, data: bool) -> BuildContext:
        return BuildContext.create(
            build_component,
            data=spec,
            train_data=(lambda: (self.data.train.images, self.data.train.labels)) if data else None,
            cache_dir=str(self.paths.cache) if data else None,
            data_key=self.data.key if data else None,
            device=device,
        )

    def declared_spec(self) -> DataSpec:
        """The DataSpec from the experiment file alone when it declares
        ``data.num_classes``; otherwise the data source is opened to count the classes."""
        cfg = self.exp.data
        if cfg.num_classes is not None:
            return DataSpec(image_size=cfg.image_size, channels=cfg.channels, num_classes=cfg.num_classes)
        return self.data.spec

    def build_architecture(self, entry: MethodEntry) -> tuple[torch.nn.Module, Any]:
        """Method and sampler of ``entry`` on the ``meta`` device: shapes only, no
        weights, no data, no training (factories see ``ctx.device.type == "meta"``)."""
        ctx = self._context(self.declared_spec(), torch.device("meta"), data=False)
        where = f"{self.exp.source}: methods '{entry.name}'"
        with torch.device("meta"):
            method = build_component("method", entry.method, ctx, where)
        return method, self.build_sampler(entry, method, ctx)

    def check_compatibility(self) -> None:
        """Refuse (ConfigError) a method entry whose sampler does not fit its method, for
        every entry, before anything trains: each method is built on the meta device
        (:meth:`build_architecture`) and checked against its sampler's ``requires``, and
        against :class:`~spheregen.interfaces.CheckpointableBlocks` where its
        ``train.activation_checkpointing`` asks for it."""
        ctx = self._context(self.declared_spec(), torch.device("meta"), data=False)
        for entry in self.exp.methods:
            method, sampler = self.build_architecture(entry)
            compat.check_pair(f"{self.exp.source}: methods '{entry.name}'", entry.method.name, method,
                              self.sampler_name(entry, method), sampler, ctx)
            if entry.train.activation_checkpointing:
                precision.checkpoint_blocks(method, f"{self.exp.source}: method '{entry.name}' ({entry.method.name}) "
                                                    "with train.activation_checkpointing = true")

    def build_method(self, entry: MethodEntry, device: torch.device | None = None) -> torch.nn.Module:
        return build_component("method", entry.method, self.build_context(device),
                               f"{self.exp.source}: methods '{entry.name}'")

    def build_sampler(self, entry: MethodEntry, method: Any, ctx: BuildContext | None = None) -> Any:
        """The entry's sampler, or the method's default one (``ctx``: the build context,
        default :meth:`build_context`)."""
        sampler = entry.sampler if entry.sampler is not None else method.default_sampler
        return build_component("sampler", sampler, ctx or self.build_context(),
                               f"{self.exp.source}: methods '{entry.name}'")

    def sampler_name(self, entry: MethodEntry, method: Any) -> str:
        return entry.sampler.name if entry.sampler is not None else method.default_sampler

    def metric_context(self, device: torch.device | None = None) -> MetricContext:
        d = self.data
        return MetricContext(
            data=d.spec,
            train_images=d.train.images,
            train_labels=d.train.labels,
            test_images=d.test.images,
            test_labels=d.test.labels,
            cache_dir=str(self.paths.cache),
            device=device or self.device,
            dataset_key=d.key,
            mixed_precision=self.exp.eval.mixed_precision,
        )

    def build_metrics(self, device: torch.device | None = None) -> list[tuple[str, Any]]:
        """Every metric of ``eval.metrics``, built; two that report the same key (FID in
        two feature spaces, say) are refused: one would silently overwrite the other."""
        ctx = self.metric_context(device)
        where = f"{self.exp.source}: eval.metrics"
        built = [(c.name, build_component("metric", c, ctx, where)) for c in self.exp.eval.metrics]
        owner: dict[str, int] = {}
        for i, (name, metric) in enumerate(built):
            for key in metric.keys:
                if key in owner:
                    j = owner[key]
                    raise ConfigError(
                        f"{where}: entries {j} ('{built[j][0]}') and {i} ('{name}') both report '{key}'; "
                        "one result column holds one metric: keep one of them (score another feature "
                        "space in a second experiment file, or with `spheregen score`)"
                    )
                owner[key] = i
        return built
