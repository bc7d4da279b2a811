"""Sampling and scoring: each method at each of its step counts.

Stage ``sample`` writes ``runs/<exp>/samples/<method>/steps-<T>.npz`` (spheregen.samples:
uint8 images, labels and the set's identity; each process writes the shard of its
batches); stage ``evaluate`` opens those files, checks that they were drawn from the
current config's weights and sampler, scores them with the experiment's metrics, counts
FLOPs and measures speed, and writes ``reports/<exp>/results.parquet`` plus the resolved
config (spheregen.results). Each process extracts the features of its block of batches
and the features are gathered, never the images; the reference is reduced to what each
metric needs (spheregen.reference). Every sample set of a method uses the same seed, so
step counts are compared on the same starting noise. One process writes a sample folder
or a report folder at a time.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
from pathlib import Path
from typing import Any, Iterator

import attrs
import torch
from tqdm.auto import tqdm

from spheregen import distributed, flops, precision
from spheregen.config import Component, config_hash
from spheregen.cost import training_cost
from spheregen.data import balanced_labels, to_float, to_uint8
from spheregen.errors import ConfigError, SpheregenError, StaleError
from spheregen.experiment import MethodEntry
from spheregen.interfaces import LabelledMetric, LosslessTokenizer, ReconstructingMethod, ShardableMetric, has
from spheregen.paths import DirLock, check_writable
from spheregen.plugins import registries
from spheregen.reference import ReferenceSet, ReferenceStatisticsMetric, split_reference, write_stats
from spheregen.results import eval_hash, write_results
from spheregen.runner import load_trained, run_hash
from spheregen.samples import generate, identity_differences, open_samples, read_external_samples, read_meta
from spheregen.selection import (SetSpec, choose_guidance, current_choice, expected_identity, record_rows,
                                 scored_sets)
from spheregen.workspace import Workspace

__all__ = ["evaluate", "read_external_samples", "reference_stats", "sample_entry", "score_samples"]


@contextlib.contextmanager
def writer_lock(folder: Path, what: str, wait: bool = False) -> Iterator[None]:
    """The main process holds ``folder``'s lock while it writes; the other processes
    only compute. Held by another process: an error, or with ``wait`` a wait for it.
    (Only run folders carry the ownership marker: nothing deletes a sample or report
    folder.)"""
    if not distributed.is_main():
        yield
        return
    check_writable(folder, what)
    lock = DirLock(folder, what).acquire(wait=wait)
    try:
        yield
    finally:
        lock.release()


def default_sampler_name(ws: Workspace, entry: MethodEntry) -> str:
    """The entry's sampler name without loading weights (the method built on ``meta``)."""
    return entry.sampler.name if entry.sampler is not None else ws.build_architecture(entry)[0].default_sampler


def samples_current(ws: Workspace, entry: MethodEntry) -> bool:
    """Every sample file of ``entry`` exists and carries the identity the config asks for,
    at the guidance scales its current record chose (``spheregen run`` then skips
    re-sampling it)."""
    sampler = default_sampler_name(ws, entry)
    chosen = current_choice(ws, entry, sampler)
    if chosen is None:
        return False
    for spec in scored_sets(ws, entry, chosen):
        try:
            meta = read_meta(spec.path)
        except SpheregenError:
            return False
        if identity_differences(meta, expected_identity(ws, entry, sampler, spec)):
            return False
    return True


def results_current(ws: Workspace, entry: MethodEntry) -> bool:
    """results.parquet holds rows of ``entry`` for exactly its step counts and seeds,
    scored under the current config from the current weights and sample files
    (``spheregen run`` then skips re-scoring it)."""
    import polars as pl

    path = ws.paths.report / "results.parquet"
    try:
        rows = pl.read_parquet(path).filter(pl.col("method") == entry.name)
    except Exception:  # missing or unreadable: evaluate deals with it
        return False
    if not {"eval_hash", "train_hash", "sample_hash"} <= set(rows.columns):
        return False
    sampler = default_sampler_name(ws, entry)
    chosen = current_choice(ws, entry, sampler)
    if chosen is None:
        return False
    sets = scored_sets(ws, entry, chosen)
    want = {(config_hash(expected_identity(ws, entry, sampler, spec)), _drawn(spec.path)) for spec in sets}
    current = eval_hash(ws, entry), run_hash(ws, entry)  # run_hash reads the run folder: once
    have = {(r["sample_hash"], r.get("sample_file_ns")) for r in rows.iter_rows(named=True)
            if (r["eval_hash"], r["train_hash"]) == current}
    return have == want and len(rows) == len(want)


def _drawn(path: Path) -> int | None:
    """When the sample file at ``path`` was written (ns): rows scored from an earlier draw
    of the same identity (weights retrained elsewhere round differently; a report copied
    with its experiment) are not current for a new draw."""
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return None


def current_sets(ws: Workspace, entry: MethodEntry, sampler_name: str) -> list[SetSpec]:
    """The scored sample sets of ``entry`` at the recorded guidance choice, or a
    StaleError naming the command when the choice has not been made under this config."""
    chosen = current_choice(ws, entry, sampler_name)
    if chosen is None:
        raise StaleError(f"{ws.paths.sample_dir(entry.name)}: the guidance scales {list(ws.exp.guidances_for(entry))} "
                         f"of '{entry.name}' have not been chosen under the current config: run "
                         f"`spheregen sample {ws.exp.source} --method {entry.name}` first")
    return scored_sets(ws, entry, chosen)


def sample_entry(ws: Workspace, entry: MethodEntry, device: torch.device, progress: bool = True) -> list[Path]:
    """Write the sample sets of one method: with a list of guidance scales, first the
    sets the scale is chosen on (spheregen.selection), then every step count at its
    scale with every seed (each process draws a block of the batches and writes it;
    spheregen.samples.generate)."""
    ev = ws.exp.eval
    method = load_trained(ws, entry, ev.use_ema, device)
    sampler = ws.build_sampler(entry, method)
    labels = balanced_labels(ev.num_samples, ws.data.spec.num_classes)
    sampler_name = ws.sampler_name(entry, method)
    written = []
    # drawn with TF32 where the method trained with it (train.tf32, in each set's train hash)
    with writer_lock(ws.paths.sample_dir(entry.name), f"sample folder of method '{entry.name}'"), \
            precision.sampling_tf32(entry.train.tf32):
        chosen = choose_guidance(ws, entry, method, sampler, sampler_name, device, progress)
        for spec in scored_sets(ws, entry, chosen):
            meta = {"method": entry.name, **expected_identity(ws, entry, sampler_name, spec)}
            seed = f", seed {spec.seed}" if len(ev.scored_seeds) > 1 else ""
            desc = f"sample {entry.name} @ {spec.steps} steps{seed}" if progress else ""
            written.append(generate(sampler, method, labels, spec.steps, spec.guidance, spec.seed, ev.batch_size,
                                    device, spec.path, meta, desc=desc))
    distributed.barrier()
    return written


class TensorRows:
    """Images in memory read by row range, as :class:`spheregen.samples.SampleSet` is."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def read(self, start: int, stop: int) -> torch.Tensor:
        return self.images[start:stop]


def sharded_extract(metric: Any, rows: Any, desc: str = "") -> dict[str, torch.Tensor] | None:
    """``metric.extract`` of every row of ``rows`` (``len``, ``read(start, stop)``) in
    batches of ``metric.batch_size``: each process extracts a block of the batches and
    the features are gathered in order, whole on the main process (None elsewhere).
    ``desc``: a progress bar of the main process's block."""
    b = metric.batch_size
    mine = distributed.block(-(-len(rows) // b))
    parts = []
    for i in tqdm(mine, desc=desc, leave=False, disable=not desc or not distributed.is_main()):
        parts.append(metric.extract(rows.read(i * b, (i + 1) * b)))
    local = {k: torch.cat([p[k] for p in parts]) for k in parts[0]} if parts else None
    gathered = distributed.gather(local)
    if gathered is None:
        return None
    done = [g for g in gathered if g is not None]
    return {k: torch.cat([g[k] for g in done]) for k in done[0]}


def reference_for(metric: Any, reference: ReferenceSet) -> Any:
    """What ``metric.score`` takes as its reference: None for a metric that declares
    ``NEEDS_REFERENCE = False``, the statistics of a :class:`ReferenceStatisticsMetric`,
    else ``reference_features`` of the reference's capped, class-balanced subset. Each
    is cached by the metric, so asking again is cheap."""
    if not getattr(metric, "NEEDS_REFERENCE", True):
        return None
    if has(metric, ReferenceStatisticsMetric):
        return metric.reference_statistics(reference)
    return metric.reference_features(reference.subset_images())


def score_all(metrics: list[tuple[str, Any]], samples: Any, reference: ReferenceSet,
              labels: torch.Tensor | None = None, what: str = "samples") -> dict[str, Any]:
    """Every metric on one uint8 sample set -> {key: value} on the main process, {} on
    the others (every process calls it).

    ``samples``: a :class:`spheregen.samples.SampleSet`, :class:`TensorRows` or anything
    with ``len`` and ``read(start, stop)``. Metrics of one feature space (equal
    ``feature_key``) share one extraction of the samples, sharded over the processes
    (:func:`sharded_extract`). The reference is the metrics' own cached reduction of it
    (:func:`reference_for`), made on the main process only: once per data identity and
    feature space, and a cache hit that differed between processes could never
    desynchronise a collective. A metric that is not a ShardableMetric scores by
    ``compute`` on the main process, with the whole sample set and the reference's
    subset; ``labels`` (int64 N, the classes the samples were drawn for) go to a
    LabelledMetric. An error on the main process is raised on every process."""
    groups: dict[str, list[Any]] = {}
    whole = []
    for _, metric in metrics:
        shardable = has(metric, ShardableMetric) and metric.feature_key is not None
        (groups.setdefault(metric.feature_key, []) if shardable else whole).append(metric)
    features = {key: sharded_extract(group[0], samples, f"features of the {what} ({group[0].features})")
                for key, group in groups.items()}

    def score() -> dict[str, Any]:
        out: dict[str, Any] = {}
        if whole:
            images, ref = samples.read(0, len(samples)), reference.subset_images()
        for metric in whole:
            if not has(metric, LabelledMetric):
                out.update(metric.compute(images, ref))
            elif labels is None:
                raise SpheregenError(f"metric {type(metric).__name__} needs the labels the samples were drawn for; "
                                     "these samples have none (score spheregen's own sample files, or drop the "
                                     "metric)")
            else:
                out.update(metric.compute(images, ref, labels=labels))
        for key, group in groups.items():
            for metric in group:
                out.update(metric.score(features[key], reference_for(metric, reference)))
        for _, metric in metrics:
            for column in getattr(metric, "columns", ()):
                if column.features:  # which feature space the value is in, beside it
                    out[f"{column.key}_features"] = getattr(metric, "feature_info", metric.features)
        return out

    return distributed.on_main(score) or {}


def prepare_reference(metrics: list[tuple[str, Any]], reference: ReferenceSet) -> None:
    """Reduce the reference for every metric before any method is scored (on the main
    process; an error, such as statistics in another feature space, stops every
    process). With ``reference.stats``, at least one metric must use them."""
    users = [name for name, m in metrics if has(m, ReferenceStatisticsMetric)]
    if reference.stats is not None and not users:
        raise ConfigError(f"eval.reference_stats = {reference.stats['path']!r} is set, but none of eval.metrics "
                          f"({', '.join(n for n, _ in metrics) or 'none'}) scores against reference statistics "
                          "(FID does): add the metric or remove the key")
    distributed.on_main(lambda: [reference_for(m, reference) for _, m in metrics
                                 if has(m, ShardableMetric) and m.feature_key is not None])


def _provider(kind: str, name: str) -> str:
    p = registries()[kind].get(name).provider
    return f"{p.distribution}=={p.version}"


def _components(obj: Any, kind: str | None = None) -> list[tuple[str, str]]:
    """(kind, name) of every component in a config tree, nested ones included; the
    kind comes from the attrs field metadata that declares the component."""
    found: list[tuple[str, str]] = []
    if isinstance(obj, Component):
        if kind is not None:
            found.append((kind, obj.name))
        obj = obj.config
    if attrs.has(type(obj)):
        for f in attrs.fields(type(obj)):
            value = getattr(obj, f.name)
            items = value if isinstance(value, (list, tuple)) else [value]
            for item in items:
                found += _components(item, f.metadata.get("kind"))
    return found


def plugin_versions(ws: Workspace, entry: MethodEntry, sampler: str) -> str:
    """JSON {"kind:name": "distribution==version"} of every component a result row
    depends on: dataset, method with its nested tokenizer/denoiser, sampler, metrics."""
    parts = _components(entry) + _components(ws.exp.data) + _components(ws.exp.eval) + [("sampler", sampler)]
    return json.dumps({f"{k}:{n}": _provider(k, n) for k, n in sorted(set(parts))}, sort_keys=True)


@torch.no_grad()
def _cost_row(ws: Workspace, entry: MethodEntry, method: Any, sampler: Any, steps: int, guidance: float,
              device: torch.device) -> dict[str, Any]:
    """FLOPs, speed at the throughput batch and at batch 1, and peak tensor memory of one
    sampling call at the throughput batch (a four-part progress bar)."""
    ev = ws.exp.eval
    bar = tqdm(total=4, desc=f"FLOPs and timing of {entry.name} @ {steps} steps", leave=False)
    count = flops.count_sampling_flops(sampler, method, steps, guidance, device=device)
    bar.update()
    labels = balanced_labels(ev.throughput_batch, ws.data.spec.num_classes).to(device)
    call = lambda y: (lambda: sampler.sample(method, y, steps, guidance, None))  # noqa: E731
    speed = flops.measure_throughput(call(labels), batch=ev.throughput_batch, warmup=1, repeats=3, device=device)
    bar.update()
    single = flops.measure_throughput(call(labels[:1]), batch=1, warmup=1, repeats=5, device=device)
    bar.update()
    peak = flops.measure_peak_memory(call(labels), method, device)
    bar.close()
    return {
        "nfe": sampler.nfe(steps, guidance),
        "gflops_per_image": count.total / 1e9,
        "gflops_paper": count.paper / 1e9,
        "images_per_s": speed.images_per_s,
        "latency_s": speed.latency_s,
        "throughput_batch": ev.throughput_batch,
        "latency_b1_s": single.latency_s,
        "peak_memory_mb": peak / 2**20,
        # speed depends on it: rows timed with different thread counts do not compare
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
    }


def tokenizer_identity(ws: Workspace, entry: MethodEntry, method: Any) -> tuple[str, str] | None:
    """(label, config hash) of the tokenizer behind ``method.reconstruct``, or None when
    there is nothing to report: the method's own ``tokenizer_identity()`` when it has one,
    else the default below. Default: None without ``reconstruct`` or for a lossless
    tokenizer such as ``patch``; methods sharing a frozen tokenizer config share one
    identity; a method that is its own autoencoder (the Sphere Encoder) is identified
    by its entry."""
    if hasattr(method, "tokenizer_identity"):
        return method.tokenizer_identity()
    tokenizer = getattr(method, "tokenizer", None)
    if not has(method, ReconstructingMethod) or has(tokenizer, LosslessTokenizer):
        return None
    component = getattr(entry.method.config, "tokenizer", None)
    if isinstance(component, Component) and not getattr(tokenizer, "trainable", True):
        return component.name, config_hash(component)  # frozen: the config is the identity
    # trained with the method: the run (method and training budget) is the identity
    return f"{entry.name} (own autoencoder)", config_hash({"method": entry.method, "train": entry.train})


def image_psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """float64 N: 10·log10(255² / MSE) of each image of uint8 N×C×H×W ``a`` against ``b``."""
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(255.0 ** 2 / mse)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over images of :func:`image_psnr` (inf as soon as one image is reproduced
    exactly)."""
    return float(image_psnr(a, b).mean())


class Reconstructions:
    """The method's reconstructions of a :class:`ReferenceSet` (the test split), read by
    row range like a sample set and made as they are read, in batches of ``batch``
    (the last one kept for the next read), so each process reconstructs about its own
    block and every batch is the one a single process would make. The PSNR of each
    image of each batch made is kept (``psnr``: batch index -> float64 values)."""

    def __init__(self, method: Any, originals: ReferenceSet, batch: int, device: torch.device, desc: str = ""):
        self.method, self.originals, self.batch, self.device = method, originals, batch, device
        self.psnr: dict[int, torch.Tensor] = {}
        self._last: tuple[int, torch.Tensor] | None = None
        self._bar = tqdm(total=len(distributed.block(-(-len(originals) // batch))), desc=desc, leave=False,
                         disable=not desc or not distributed.is_main())

    def __len__(self) -> int:
        return len(self.originals)

    def read(self, start: int, stop: int) -> torch.Tensor:
        stop, b = min(stop, len(self)), self.batch
        parts = [self.made(j)[max(start, j * b) - j * b:stop - j * b] for j in range(start // b, -(-stop // b))]
        return torch.cat(parts)

    @torch.no_grad()
    def made(self, j: int) -> torch.Tensor:
        """uint8 reconstructions of batch ``j``."""
        if self._last is None or self._last[0] != j:
            b = self.batch
            x = self.originals.read(j * b, (j + 1) * b)
            labels = self.originals.labels[j * b:(j + 1) * b].to(self.device)
            out = to_uint8(self.method.reconstruct(to_float(x).to(self.device), labels)).cpu()
            self.psnr[j] = image_psnr(out, x)
            self._last = (j, out)
            self._bar.update()
        return self._last[1]

    def mean_psnr(self) -> float | None:
        """Mean PSNR over every image (every process makes the batches of its block that
        the reads did not, then the values are gathered): on the main process only."""
        mine = distributed.block(-(-len(self) // self.batch))
        for j in mine:
            if j not in self.psnr:
                self.made(j)
        self._bar.close()
        gathered = distributed.gather([self.psnr[j] for j in mine])
        return None if gathered is None else float(torch.cat([v for part in gathered for v in part]).mean())


def reconstruction_row(ws: Workspace, entry: MethodEntry, method: Any, metrics: list[tuple[str, Any]],
                       device: torch.device, identity: tuple[str, str] | None,
                       originals: ReferenceSet | None = None) -> dict[str, Any] | None:
    """PSNR and the reconstruction scores (the experiment's metrics with a column declared
    ``reconstruction``, stored as ``r<key>``: rFID = FID(reconstructions, originals), in
    the same features as gFID) of the method's tokenizer (``identity``:
    :func:`tokenizer_identity`) on the held-out test split (``originals``, default read
    from the data), sharded over the processes like a sample set. ``features``: the
    feature space of the first such column that records one. On the main process only."""
    if identity is None:
        return None
    originals = originals if originals is not None else split_reference(ws, "test")
    if len(originals) == 0:
        return None
    recon = Reconstructions(method, originals, ws.exp.eval.batch_size, device, desc=f"reconstruct ({identity[0]})")
    columns = [c for _, m in metrics for c in getattr(m, "columns", ()) if c.reconstruction]
    scorers = [(n, m) for n, m in metrics if any(c.reconstruction for c in getattr(m, "columns", ()))]
    scores = score_all(scorers, recon, originals, what="reconstructions") if scorers else {}
    mean_psnr = recon.mean_psnr()
    if not distributed.is_main():
        return None
    return {
        "tokenizer": identity[0], "config_hash": identity[1], "methods": entry.name,
        **{f"r{c.key}": scores.get(c.key) for c in columns},
        "psnr": mean_psnr, "num_images": len(recon),
        "features": next((scores.get(f"{c.key}_features") for c in columns if c.features), None),
    }


def evaluate_entry(ws: Workspace, entry: MethodEntry, metrics: list[tuple[str, Any]], reference: ReferenceSet,
                   device: torch.device, method: Any) -> list[dict[str, Any]]:
    sampler = ws.build_sampler(entry, method)
    sampler_name = ws.sampler_name(entry, method)
    params = flops.count_params(method)
    base = {
        "experiment": ws.exp.name,
        "dataset": ws.data.source.key,
        "method": entry.name,
        "method_plugin": entry.method.name,
        "sampler": sampler_name,
        "params": params.total,
        "trainable_params": params.trainable,
        "train_steps": entry.train.steps,
        "images_seen": entry.train.steps * entry.train.batch_size,  # batch_size is global
        "config_hash": config_hash(entry),
        "eval_hash": eval_hash(ws, entry),
        "train_hash": run_hash(ws, entry),
        "data_key": ws.data.key,
        "provider": _provider("method", entry.method.name),
        "plugin_versions": plugin_versions(ws, entry, sampler_name),
        "spheregen_version": importlib.metadata.version("spheregen"),
    }
    base.update(training_cost(ws, entry))
    scales = ws.exp.guidances_for(entry)
    if len(scales) > 1:  # which scales the row's scale was chosen from, and on which seed
        base.update(guidance_scales=json.dumps(scales), guidance_seed=ws.exp.eval.guidance_seed)
    rows, costs = [], {}
    for spec in current_sets(ws, entry, sampler_name):
        identity = expected_identity(ws, entry, sampler_name, spec)
        samples = open_samples(spec.path, identity)  # memory-mapped
        scores = score_all(metrics, samples, reference, labels=samples.labels,
                           what=f"samples of {entry.name} @ {spec.steps} steps, seed {spec.seed}")
        if not distributed.is_main():
            continue  # speed and FLOPs are measured by one process, once per step count and scale
        key = (spec.steps, spec.guidance)
        if key not in costs:  # timed in the numerics the samples were drawn in
            with precision.autocast(device, ws.exp.eval.mixed_precision), precision.tf32(entry.train.tf32):
                costs[key] = _cost_row(ws, entry, method, sampler, spec.steps, spec.guidance, device)
        row = {**base, "steps": spec.steps, "guidance": spec.guidance, "seed": spec.seed,
               "num_samples": len(samples), "sample_hash": config_hash(identity), "sample_file_ns": _drawn(spec.path)}
        row.update(costs[key])
        row.update(scores)
        rows.append(row)
    return rows


def evaluate(ws: Workspace, names: list[str] | None = None, device: torch.device | None = None,
             beside_others: bool = False) -> Path:
    """Score every method's samples and write results.parquet (all rows are computed
    before anything is written, so a failure leaves the previous results untouched).

    The report folder is locked for the whole stage, so that a second ``evaluate`` is
    refused before it computes anything. ``beside_others`` (the jobs of ``run --jobs``,
    each scoring its own method): compute first, then wait for the lock and merge the
    rows into the files, so that jobs finishing together queue for the write."""
    device = device or ws.device
    entries = [ws.exp.method(n) for n in names] if names else list(ws.exp.methods)  # unknown name: error
    if beside_others:
        rows = _evaluate_rows(ws, entries, device)
        with writer_lock(ws.paths.report, "report folder", wait=True):
            return _write(ws, *rows)
    with writer_lock(ws.paths.report, "report folder"):
        return _write(ws, *_evaluate_rows(ws, entries, device))


def build_metrics(ws: Workspace, device: torch.device | None = None) -> list[tuple[str, Any]]:
    """The experiment's metrics, built by every process together (loading a fitted
    feature network is collective, spheregen.fit) once the main process has decoded
    and cached the data splits they are given."""
    with distributed.state().main_process_first():
        ws.data.splits()
    return ws.build_metrics(device)


def _evaluate_rows(ws: Workspace, entries: list[MethodEntry], device: torch.device) -> tuple[list, list, list]:
    """(result rows, tokenizer rows, guidance rows) of ``entries``, computed by every
    process; nothing is written."""
    metrics = build_metrics(ws, device)
    reference = workspace_reference(ws)
    prepare_reference(metrics, reference)
    originals = split_reference(ws, "test")
    rows, tokenizer_rows, guidance_rows = [], [], []
    scored: dict[Any, dict[str, Any] | None] = {}  # tokenizer identity -> its row (scored once)
    for entry in entries:
        method = load_trained(ws, entry, ws.exp.eval.use_ema, device)
        rows.extend(evaluate_entry(ws, entry, metrics, reference, device, method))
        guidance_rows.extend(record_rows(ws, entry))
        identity = tokenizer_identity(ws, entry, method)
        if identity not in scored:
            scored[identity] = reconstruction_row(ws, entry, method, metrics, device, identity, originals)
            tokenizer_rows.append(scored[identity])
        elif scored[identity] is not None:
            tokenizer_rows.append({**scored[identity], "methods": entry.name})
    return rows, [r for r in tokenizer_rows if r is not None], guidance_rows


def _write(ws: Workspace, rows: list, tokenizer_rows: list, guidance_rows: list) -> Path:
    path = ws.paths.report / "results.parquet"
    if distributed.is_main():
        write_results(ws, rows, tokenizer_rows, guidance_rows)
    distributed.barrier()
    return path


def workspace_reference(ws: Workspace) -> ReferenceSet:
    """The experiment's reference: split ``eval.reference``, with ``eval.reference_stats``."""
    return split_reference(ws, ws.exp.eval.reference, ws.exp.eval.reference_stats_path(ws.exp.source))


def score_samples(ws: Workspace, samples: torch.Tensor, device: torch.device | None = None) -> dict[str, Any]:
    """The experiment's metrics on any uint8 sample set (same features, same reference)."""
    expected = (ws.data.spec.channels, ws.data.spec.image_size, ws.data.spec.image_size)
    if tuple(samples.shape[1:]) != expected:
        raise SpheregenError(f"samples are {tuple(samples.shape[1:])}, the experiment's data is {expected} (C×H×W)")
    metrics = ws.build_metrics(device or ws.device)
    reference = workspace_reference(ws)
    prepare_reference(metrics, reference)
    return score_all(metrics, TensorRows(samples), reference)


def reference_stats(ws: Workspace, out: Path, device: torch.device | None = None) -> Path:
    """Write the statistics (feature mean and covariance) of the experiment's reference
    split, in the feature space of its metric that scores against statistics (FID), to
    ``out`` (.npz: ``mu``, ``sigma``, ``features``, ``provenance``), for
    ``[eval] reference_stats``. The main process writes."""
    ev = ws.exp.eval
    metrics = [(n, m) for n, m in build_metrics(ws, device or ws.device) if has(m, ReferenceStatisticsMetric)]
    if len(metrics) != 1:
        names = [c.name for c in ev.metrics]
        raise ConfigError(f"{ws.exp.source}: eval.metrics ({', '.join(names) or 'none'}) must hold exactly one metric "
                          f"that scores against reference statistics (FID), found {len(metrics)}")
    name, metric = metrics[0]
    reference = split_reference(ws, ev.reference)

    def write() -> Path:
        stats = metric.reference_statistics(reference)
        provenance = {"dataset": ws.data.key, "split": ev.reference, "images": len(reference), "metric": name,
                      "feature_info": getattr(metric, "feature_info", metric.features),
                      "spheregen_version": importlib.metadata.version("spheregen")}
        return write_stats(out, stats, metric.statistics_features, provenance)

    written = distributed.on_main(write)
    distributed.barrier()
    return written if written is not None else out
