"""Sampling and scoring: each method at each of its step counts.

Stage ``sample`` writes ``runs/<exp>/samples/<method>/steps-<T>.npz`` (uint8 N×C×H×W
``images`` and int64 ``labels``); stage ``evaluate`` reads those files, scores them with
the experiment's metrics, counts FLOPs and measures speed, and writes
``reports/<exp>/results.parquet`` plus the resolved config. Every sample set of a method
uses the same seed, so step counts are compared on the same starting noise.
"""

from __future__ import annotations

import importlib.metadata
import json
import time
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import polars as pl
import torch
from tqdm.auto import tqdm

from spheregen import distributed, flops
from spheregen.config import Component, config_hash, to_dict
from spheregen.data import balanced_labels, to_float, to_uint8
from spheregen.errors import SpheregenError
from spheregen.experiment import MethodEntry
from spheregen.paths import atomic_write, atomic_write_json
from spheregen.plugins import registries
from spheregen.runner import load_trained
from spheregen.workspace import Workspace


def batch_seed(seed: int, index: int) -> int:
    """The seed of sample batch ``index``: batches draw independent streams, so any
    process can draw any batch and the result does not depend on the process count."""
    return seed * 1_000_003 + index


def generate(sampler: Any, method: Any, labels: torch.Tensor, steps: int, guidance: float, seed: int,
             batch: int, device: torch.device, desc: str = "") -> torch.Tensor | None:
    """uint8 N×C×H×W samples for ``labels`` (N) on the CPU, in batches of ``batch``
    seeded by :func:`batch_seed`, spread over the accelerate processes and gathered on
    the main process (the others return None)."""
    n_batches = -(-len(labels) // batch)
    bar = tqdm(total=n_batches, desc=desc, leave=False, disable=not desc or not distributed.is_main())

    def one(i: int) -> torch.Tensor:
        gen = torch.Generator(device=device).manual_seed(batch_seed(seed, i))
        y = labels[i * batch:(i + 1) * batch].to(device)
        with torch.no_grad():
            out = to_uint8(sampler.sample(method, y, steps, guidance, gen)).cpu()
        bar.update()
        return out

    try:
        parts = distributed.map_batches(n_batches, one)
        return torch.cat(parts) if parts is not None else None
    finally:
        bar.close()


def save_samples(path: Path, images: torch.Tensor, labels: torch.Tensor, meta: dict[str, Any]) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append '.npz' to a name
            np.savez_compressed(f, images=images.numpy(), labels=labels.numpy(), meta=np.array(str(meta)))

    atomic_write(path, write)


def load_samples(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    if not path.is_file():
        raise SpheregenError(f"{path} does not exist: run `spheregen sample` for this experiment first")
    with np.load(path) as z:
        return torch.from_numpy(z["images"]), torch.from_numpy(z["labels"])


def sample_entry(ws: Workspace, entry: MethodEntry, device: torch.device, progress: bool = True) -> list[Path]:
    """Write the sample file of every step count of one method (batches shared out over
    the accelerate processes; the main process writes)."""
    ev = ws.exp.eval
    method = load_trained(ws, entry, ev.use_ema, device)
    sampler = ws.build_sampler(entry, method)
    labels = balanced_labels(ev.num_samples, ws.data.spec.num_classes)
    written = []
    for steps in ws.exp.steps_for(entry):
        images = generate(sampler, method, labels, steps, entry.guidance, ev.seed, ev.batch_size, device,
                          desc=f"sample {entry.name} @ {steps} steps" if progress else "")
        path = ws.paths.samples(entry.name, steps)
        if distributed.is_main():
            save_samples(path, images, labels, {"method": entry.name, "steps": steps, "seed": ev.seed})
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
        for key in ("fid", "cmmd"):
            if key in metric.keys:
                out[f"{key}_features"] = getattr(metric, "feature_info", metric.features)
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
    there is nothing to report (no ``reconstruct``, or a lossless tokenizer such as
    ``patch``). Methods sharing a tokenizer config share one identity; a method that is
    its own autoencoder (the Sphere Encoder) is identified by its entry."""
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
    """rFID (the experiment's FID metrics, same features as gFID) and PSNR of the
    method's tokenizer (``identity``: :func:`tokenizer_identity`) on the held-out test
    split: FID(reconstructions, originals)."""
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
    fids = [(n, m) for n, m in metrics if "fid" in m.keys]
    scores = score_all(fids, recon, test.images, shard=False) if fids else {}
    return {
        "tokenizer": identity[0], "config_hash": identity[1], "methods": entry.name,
        "rfid": scores.get("fid"), "psnr": psnr(recon, test.images), "num_images": len(recon),
        "features": scores.get("fid_features"),
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
        "images_seen": entry.train.steps * entry.train.batch_size * entry.train.grad_accum,
        "config_hash": config_hash(entry),
        "provider": _provider("method", entry.method.name),
        "plugin_versions": plugin_versions(ws, entry, sampler_name),
        "spheregen_version": importlib.metadata.version("spheregen"),
    }
    rows = []
    for steps in ws.exp.steps_for(entry):
        samples, labels = load_samples(ws.paths.samples(entry.name, steps))
        scores = score_all(metrics, samples, reference, labels=labels)
        if not distributed.is_main():
            continue  # speed and FLOPs are measured by one process
        row = {**base, "steps": steps, "num_samples": len(samples)}
        row.update(_cost_row(ws, entry, method, sampler, steps, device))
        row.update(scores)
        rows.append(row)
    return rows


def _merge(path: Path, frame: pl.DataFrame, key: str, keep: list[str]) -> pl.DataFrame:
    """``frame`` plus the rows of the file at ``path`` whose ``key`` is not in ``frame``
    and is in ``keep`` (results of methods not re-evaluated now survive)."""
    if not path.is_file():
        return frame
    old = pl.read_parquet(path)
    old = old.filter(~pl.col(key).is_in(frame[key].unique().to_list()) & pl.col(key).is_in(keep))
    return pl.concat([old, frame], how="diagonal_relaxed") if len(old) else frame


def _tokenizer_frame(rows: list[dict[str, Any]]) -> pl.DataFrame:
    """One row per tokenizer identity (config hash); ``methods`` lists its users."""
    merged: dict[str, dict[str, Any]] = {}
    for row in rows:
        seen = merged.setdefault(row["config_hash"], dict(row))
        if row["methods"] not in seen["methods"].split(", "):
            seen["methods"] += f", {row['methods']}"
    return pl.from_dicts(list(merged.values()), infer_schema_length=None)


def _with_old_users(old_file: pl.DataFrame | None, rows: list[dict[str, Any]], keep: list[str]
                    ) -> list[dict[str, Any]]:
    """``rows`` plus, for each tokenizer re-scored now, a row per method of the old file
    that used it and is still in the experiment (evaluating one method of three that
    share a tokenizer must not drop the other two from its "used by")."""
    if old_file is None:
        return rows
    fresh = {r["config_hash"]: r for r in rows}
    extra = []
    for old in old_file.iter_rows(named=True):
        if old["config_hash"] in fresh:
            for name in str(old["methods"]).split(", "):
                if name in keep:
                    extra.append({**fresh[old["config_hash"]], "methods": name})
    return rows + extra


def write_results(ws: Workspace, rows: list[dict[str, Any]], tokenizer_rows: list[dict[str, Any]] = ()) -> Path:
    """Write results.parquet (and tokenizers.parquet when there are reconstruction rows);
    rows of methods not re-evaluated now are kept from the old files."""
    report = ws.paths.report
    path = report / "results.parquet"
    frame = _merge(path, pl.from_dicts(rows, infer_schema_length=None), "method", [m.name for m in ws.exp.methods])
    atomic_write(path, lambda p: frame.write_parquet(p))
    if tokenizer_rows:
        tok_path = report / "tokenizers.parquet"
        old_file = pl.read_parquet(tok_path) if tok_path.is_file() else None
        tokens = _tokenizer_frame(_with_old_users(old_file, list(tokenizer_rows), [m.name for m in ws.exp.methods]))
        if old_file is not None:  # tokenizers not re-scored now keep their rows
            old = old_file.filter(~pl.col("config_hash").is_in(tokens["config_hash"].to_list()))
            tokens = pl.concat([old, tokens], how="diagonal_relaxed") if len(old) else tokens
        atomic_write(tok_path, lambda p: tokens.write_parquet(p))
    atomic_write_json(report / "config.resolved.json", {
        "experiment": to_dict(ws.exp),
        "spheregen": importlib.metadata.version("spheregen"),
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    })
    return path


def evaluate(ws: Workspace, names: list[str] | None = None, device: torch.device | None = None) -> Path:
    """Score every method's samples and write results.parquet (all rows are computed
    before anything is written, so a failure leaves the previous results untouched)."""
    device = device or ws.device
    with distributed.state().main_process_first():  # one process trains/caches the feature network
        metrics = ws.build_metrics(device)
    reference = ws.reference_images()
    entries = [ws.exp.method(n) for n in names] if names else list(ws.exp.methods)  # unknown name: error
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


def read_external_samples(path: Path, key: str) -> torch.Tensor:
    """uint8 N×C×H×W from array ``key`` of an .npz holding N×H×W×C or N×C×H×W images
    (another implementation's samples, e.g. the official code's reference set)."""
    if not path.is_file():
        raise SpheregenError(f"{path} does not exist")
    with np.load(path) as z:
        if key not in z.files:
            raise SpheregenError(f"{path} has no array {key!r}; it holds {z.files}")
        arr = z[key]
    if arr.dtype != np.uint8 or arr.ndim != 4:
        raise SpheregenError(f"{path}:{key} must be uint8 N×H×W×C or N×C×H×W, got {arr.dtype} {arr.shape}")
    if arr.shape[-1] in (1, 3) and arr.shape[1] not in (1, 3):
        arr = arr.transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(arr))


def score_samples(ws: Workspace, samples: torch.Tensor, device: torch.device | None = None) -> dict[str, Any]:
    """The experiment's metrics on any uint8 sample set (same features, same reference)."""
    expected = (ws.data.spec.channels, ws.data.spec.image_size, ws.data.spec.image_size)
    if tuple(samples.shape[1:]) != expected:
        raise SpheregenError(f"samples are {tuple(samples.shape[1:])}, the experiment's data is {expected} (C×H×W)")
    return score_all(ws.build_metrics(device or ws.device), samples, ws.reference_images())
