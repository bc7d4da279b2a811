"""Sampling and scoring: each method at each of its step counts.

Stage ``sample`` writes ``runs/<exp>/samples/<method>/steps-<T>.npz`` (spheregen.samples:
uint8 images, labels and the set's identity); stage ``evaluate`` reads those files,
checks that they were drawn from the current config's weights and sampler, scores them
with the experiment's metrics, counts FLOPs and measures speed, and writes
``reports/<exp>/results.parquet`` plus the resolved config (spheregen.results). Every
sample set of a method uses the same seed, so step counts are compared on the same
starting noise. One process writes a sample folder or a report folder at a time.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
from pathlib import Path
from typing import Any, Iterator

import attrs
import torch

from spheregen import distributed, flops
from spheregen.config import Component, config_hash
from spheregen.data import balanced_labels, to_float, to_uint8
from spheregen.errors import SpheregenError
from spheregen.experiment import MethodEntry
from spheregen.paths import DirLock, check_writable
from spheregen.plugins import registries
from spheregen.results import eval_hash, write_results
from spheregen.runner import load_trained, run_hash
from spheregen.samples import generate, load_samples, read_external_samples, read_meta, sample_identity, save_samples
from spheregen.workspace import Workspace

__all__ = ["evaluate", "read_external_samples", "sample_entry", "score_samples"]


@contextlib.contextmanager
def writer_lock(folder: Path, what: str) -> Iterator[None]:
    """The main process holds ``folder``'s lock while it writes; the other processes
    only compute. (Only run folders carry the ownership marker: nothing deletes a
    sample or report folder.)"""
    if not distributed.is_main():
        yield
        return
    check_writable(folder, what)
    with DirLock(folder, what):
        yield


def default_sampler_name(ws: Workspace, entry: MethodEntry) -> str:
    """The entry's sampler name without loading weights (the method built on ``meta``)."""
    return entry.sampler.name if entry.sampler is not None else ws.build_architecture(entry)[0].default_sampler


def samples_current(ws: Workspace, entry: MethodEntry) -> bool:
    """Every sample file of ``entry`` exists and carries the identity the config asks for
    (``spheregen run`` then skips re-sampling it)."""
    sampler = default_sampler_name(ws, entry)
    for steps in ws.exp.steps_for(entry):
        path = ws.paths.samples(entry.name, steps)
        try:
            meta = read_meta(path)
        except SpheregenError:
            return False
        want = expected_samples(ws, entry, sampler, steps)
        if any(meta.get(k) != v for k, v in want.items()):
            return False
    return True


def results_current(ws: Workspace, entry: MethodEntry) -> bool:
    """results.parquet holds rows of ``entry`` for exactly its step counts, scored under
    the current config from the current weights and sample files (``spheregen run``
    then skips re-scoring it)."""
    import polars as pl

    path = ws.paths.report / "results.parquet"
    try:
        rows = pl.read_parquet(path).filter(pl.col("method") == entry.name)
    except Exception:  # missing or unreadable: evaluate deals with it
        return False
    if not {"eval_hash", "train_hash", "sample_hash"} <= set(rows.columns):
        return False
    sampler = default_sampler_name(ws, entry)
    want = {steps: config_hash(expected_samples(ws, entry, sampler, steps)) for steps in ws.exp.steps_for(entry)}
    have = {r["steps"]: r["sample_hash"] for r in rows.iter_rows(named=True)
            if r["eval_hash"] == eval_hash(ws, entry) and r["train_hash"] == run_hash(ws, entry)}
    return have == want and len(rows) == len(want)


def expected_samples(ws: Workspace, entry: MethodEntry, sampler_name: str, steps: int) -> dict[str, Any]:
    """The identity the sample file of ``entry`` at ``steps`` must carry now."""
    sampler_config = config_hash(entry.sampler) if entry.sampler is not None else None
    return sample_identity(run_hash(ws, entry), sampler_name, sampler_config, steps, entry.guidance, ws.exp.eval)


def sample_entry(ws: Workspace, entry: MethodEntry, device: torch.device, progress: bool = True) -> list[Path]:
    """Write the sample file of every step count of one method (batches shared out over
    the accelerate processes; the main process writes)."""
    ev = ws.exp.eval
    method = load_trained(ws, entry, ev.use_ema, device)
    sampler = ws.build_sampler(entry, method)
    labels = balanced_labels(ev.num_samples, ws.data.spec.num_classes)
    sampler_name = ws.sampler_name(entry, method)
    written = []
    with writer_lock(ws.paths.sample_dir(entry.name), f"sample folder of method '{entry.name}'"):
        for steps in ws.exp.steps_for(entry):
            images = generate(sampler, method, labels, steps, entry.guidance, ev.seed, ev.batch_size, device,
                              desc=f"sample {entry.name} @ {steps} steps" if progress else "")
            path = ws.paths.samples(entry.name, steps)
            if distributed.is_main():
                meta = {"method": entry.name, **expected_samples(ws, entry, sampler_name, steps)}
                save_samples(path, images, labels, meta)
            written.append(path)
    distributed.barrier()
    return written


SHARDED = ("extract", "score", "reference_features", "feature_key", "cfg")


def sharded_extract(metric: Any, images: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """``metric.extract(images)`` with its batches (``metric.cfg.batch_size``) shared out
    over the processes; the whole on the main process, None on the others."""
    b = metric.cfg.batch_size
    if len(images) <= b:
        return metric.extract(images) if distributed.is_main() else None
    parts = distributed.map_batches(-(-len(images) // b), lambda i: metric.extract(images[i * b:(i + 1) * b]))
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]} if parts is not None else None


def score_all(metrics: list[tuple[str, Any]], samples: torch.Tensor, reference: torch.Tensor,
              shard: bool = True, labels: torch.Tensor | None = None) -> dict[str, Any]:
    """Every metric on one uint8 sample set -> {key: value} on the main process, {} on
    the others.

    Metrics of one feature space (equal ``feature_key``) share one extraction of the
    samples, sharded over the processes (every process takes part, so the collectives
    match). The reference's features are the metric's own cached ones, taken on the
    main process only: they are extracted once per dataset and feature space, and a
    cache hit that differed between processes could never desynchronise a collective.
    A metric without ``extract`` scores by ``compute`` on the main process.
    ``shard=False``: the main process alone extracts (``samples`` may be empty elsewhere).
    ``labels`` (int64 N, the classes the samples were drawn for) go to metrics that
    declare ``needs_labels``."""
    groups: dict[str, list[Any]] = {}
    whole = []
    for _, metric in metrics:
        shardable = all(hasattr(metric, a) for a in SHARDED) and metric.feature_key is not None
        (groups.setdefault(metric.feature_key, []) if shardable else whole).append(metric)
    if shard:
        features = {key: sharded_extract(group[0], samples) for key, group in groups.items()}
    if not distributed.is_main():
        return {}
    if not shard:
        features = {key: group[0].extract(samples) for key, group in groups.items()}
    out: dict[str, Any] = {}
    for metric in whole:
        if not getattr(metric, "needs_labels", False):
            out.update(metric.compute(samples, reference))
        elif labels is None:
            raise SpheregenError(f"metric {type(metric).__name__} needs the labels the samples were drawn for; "
                                 "these samples have none (score spheregen's own sample files, or drop the metric)")
        else:
            out.update(metric.compute(samples, reference, labels=labels))
    for key, group in groups.items():
        needs_ref = any(getattr(m, "NEEDS_REFERENCE", True) for m in group)
        ref = group[0].reference_features(reference) if needs_ref else None
        for metric in group:
            out.update(metric.score(features[key], ref))
    for _, metric in metrics:
        for column in getattr(metric, "columns", ()):
            if column.features:  # which feature space the value is in, beside it
                out[f"{column.key}_features"] = getattr(metric, "feature_info", metric.features)
    return out


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
def _cost_row(ws: Workspace, entry: MethodEntry, method: Any, sampler: Any, steps: int, device: torch.device) -> dict[str, Any]:
    """FLOPs, speed at the throughput batch and at batch 1, and peak tensor memory of one
    sampling call at the throughput batch."""
    ev = ws.exp.eval
    count = flops.count_sampling_flops(sampler, method, steps, entry.guidance, device=device)
    labels = balanced_labels(ev.throughput_batch, ws.data.spec.num_classes).to(device)
    call = lambda y: (lambda: sampler.sample(method, y, steps, entry.guidance, None))  # noqa: E731
    speed = flops.measure_throughput(call(labels), batch=ev.throughput_batch, warmup=1, repeats=3, device=device)
    single = flops.measure_throughput(call(labels[:1]), batch=1, warmup=1, repeats=5, device=device)
    peak = flops.measure_peak_memory(call(labels), method, device)
    return {
        "nfe": sampler.nfe(steps, entry.guidance),
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
    if not hasattr(method, "reconstruct") or getattr(tokenizer, "lossless", False):
        return None
    component = getattr(entry.method.config, "tokenizer", None)
    if isinstance(component, Component) and not getattr(tokenizer, "trainable", True):
        return component.name, config_hash(component)  # frozen: the config is the identity
    # trained with the method: the run (method and training budget) is the identity
    return f"{entry.name} (own autoencoder)", config_hash({"method": entry.method, "train": entry.train})


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over images of 10·log10(255² / MSE) for uint8 N×C×H×W (inf as soon as one
    image is reproduced exactly)."""
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)
    return float((10 * torch.log10(255.0 ** 2 / mse)).mean())


def reconstruction_row(ws: Workspace, entry: MethodEntry, method: Any, metrics: list[tuple[str, Any]],
                       device: torch.device, identity: tuple[str, str] | None) -> dict[str, Any] | None:
    """PSNR and the reconstruction scores (the experiment's metrics with a column declared
    ``reconstruction``, stored as ``r<key>``: rFID = FID(reconstructions, originals), in
    the same features as gFID) of the method's tokenizer (``identity``:
    :func:`tokenizer_identity`) on the held-out test split. ``features``: the feature
    space of the first such column that records one."""
    test = ws.data.test
    if identity is None or len(test.images) == 0:
        return None
    b = ws.exp.eval.batch_size

    def one(i: int) -> torch.Tensor:
        x = to_float(test.images[i * b:(i + 1) * b]).to(device)
        return to_uint8(method.reconstruct(x, test.labels[i * b:(i + 1) * b].to(device))).cpu()

    parts = distributed.map_batches(-(-len(test.images) // b), one)
    if parts is None:  # not the main process
        return None
    recon = torch.cat(parts)
    # the main process alone holds the reconstructions: scored there, unsharded (once
    # per tokenizer, not per step count)
    columns = [c for _, m in metrics for c in getattr(m, "columns", ()) if c.reconstruction]
    scorers = [(n, m) for n, m in metrics if any(c.reconstruction for c in getattr(m, "columns", ()))]
    scores = score_all(scorers, recon, test.images, shard=False) if scorers else {}
    return {
        "tokenizer": identity[0], "config_hash": identity[1], "methods": entry.name,
        **{f"r{c.key}": scores.get(c.key) for c in columns},
        "psnr": psnr(recon, test.images), "num_images": len(recon),
        "features": next((scores.get(f"{c.key}_features") for c in columns if c.features), None),
    }


def evaluate_entry(ws: Workspace, entry: MethodEntry, metrics: list[tuple[str, Any]], reference: torch.Tensor,
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
        "guidance": entry.guidance,
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
    rows = []
    for steps in ws.exp.steps_for(entry):
        identity = expected_samples(ws, entry, sampler_name, steps)
        samples, labels = load_samples(ws.paths.samples(entry.name, steps), identity)
        scores = score_all(metrics, samples, reference, labels=labels)
        if not distributed.is_main():
            continue  # speed and FLOPs are measured by one process
        row = {**base, "steps": steps, "num_samples": len(samples), "sample_hash": config_hash(identity)}
        row.update(_cost_row(ws, entry, method, sampler, steps, device))
        row.update(scores)
        rows.append(row)
    return rows


def evaluate(ws: Workspace, names: list[str] | None = None, device: torch.device | None = None) -> Path:
    """Score every method's samples and write results.parquet (all rows are computed
    before anything is written, so a failure leaves the previous results untouched)."""
    device = device or ws.device
    entries = [ws.exp.method(n) for n in names] if names else list(ws.exp.methods)  # unknown name: error
    with writer_lock(ws.paths.report, "report folder"):
        return _evaluate(ws, entries, device)


def _evaluate(ws: Workspace, entries: list[MethodEntry], device: torch.device) -> Path:
    with distributed.state().main_process_first():  # one process trains/caches the feature network
        metrics = ws.build_metrics(device)
    reference = ws.reference_images()
    rows, tokenizer_rows = [], []
    scored: dict[Any, dict[str, Any] | None] = {}  # tokenizer identity -> its row (scored once)
    for entry in entries:
        method = load_trained(ws, entry, ws.exp.eval.use_ema, device)
        rows.extend(evaluate_entry(ws, entry, metrics, reference, device, method))
        identity = tokenizer_identity(ws, entry, method)
        if identity not in scored:
            scored[identity] = reconstruction_row(ws, entry, method, metrics, device, identity)
            tokenizer_rows.append(scored[identity])
        elif scored[identity] is not None:
            tokenizer_rows.append({**scored[identity], "methods": entry.name})
    tokenizer_rows = [r for r in tokenizer_rows if r is not None]
    path = ws.paths.report / "results.parquet"
    if distributed.is_main():
        write_results(ws, rows, tokenizer_rows)
    distributed.barrier()
    return path


def score_samples(ws: Workspace, samples: torch.Tensor, device: torch.device | None = None) -> dict[str, Any]:
    """The experiment's metrics on any uint8 sample set (same features, same reference)."""
    expected = (ws.data.spec.channels, ws.data.spec.image_size, ws.data.spec.image_size)
    if tuple(samples.shape[1:]) != expected:
        raise SpheregenError(f"samples are {tuple(samples.shape[1:])}, the experiment's data is {expected} (C×H×W)")
    return score_all(ws.build_metrics(device or ws.device), samples, ws.reference_images())
