"""Which sample sets a method is drawn and scored on, and the guidance scale each uses.

A method with one guidance scale (``guidance = 2.0``) is sampled at it with every seed of
``eval.seeds``. A method with a list (``guidance = [1.5, 2.0, 3.0]``, or ``eval.guidance``)
first draws one set per scale and step count with ``eval.guidance_seed``
(``eval.guidance_samples`` images each), scores them with the experiment's metrics, and
takes per step count the scale whose headline metric (FID) is best there. Only that
scale is then drawn with the scored seeds. The choice is thus made on samples that are
never scored in the results table, so a reported number is not tuned on its own noise,
and a FID that grows with steps at one hand-picked scale cannot pass for a property of
the method.

The choice is recorded in ``runs/<exp>/samples/<method>/guidance.json`` (one row per
scale and step count: scores and the selection set's identity) and reused while the
weights, sampler, scales, seed, count and metrics are unchanged; evaluation copies its
rows into ``reports/<exp>/guidance.parquet`` for the report's FID-vs-guidance plot and
best-guidance table.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import attrs
import torch

from spheregen import distributed
from spheregen.config import config_hash
from spheregen.data import balanced_labels
from spheregen.errors import ConfigError, SpheregenError
from spheregen.experiment import MethodEntry
from spheregen.paths import atomic_write_json
from spheregen.results import scoring_hash
from spheregen.runner import run_hash
from spheregen.samples import generate, open_samples, sample_identity
from spheregen.workspace import Workspace


@attrs.frozen
class SetSpec:
    """One sample set: drawn at ``steps`` and ``guidance`` with ``seed``, ``num_samples``
    images, written to ``path``."""

    steps: int
    guidance: float
    seed: int
    num_samples: int
    path: Path


def expected_identity(ws: Workspace, entry: MethodEntry, sampler_name: str, spec: SetSpec) -> dict[str, Any]:
    """The identity the sample file ``spec`` must carry under the current config."""
    sampler_config = config_hash(entry.sampler) if entry.sampler is not None else None
    return sample_identity(run_hash(ws, entry), sampler_name, sampler_config, spec.steps, spec.guidance, ws.exp.eval,
                           seed=spec.seed, num_samples=spec.num_samples)


def scored_sets(ws: Workspace, entry: MethodEntry, chosen: dict[int, float]) -> list[SetSpec]:
    """The sets scored in the results table: every step count (at its ``chosen`` scale)
    × every seed of ``eval.seeds``; the first seed's set is ``steps-<T>.npz``."""
    ev = ws.exp.eval
    return [SetSpec(steps, chosen[steps], seed, ev.num_samples,
                    ws.paths.samples(entry.name, steps, None if i == 0 else seed))
            for steps in ws.exp.steps_for(entry) for i, seed in enumerate(ev.scored_seeds)]


def selection_sets(ws: Workspace, entry: MethodEntry) -> list[SetSpec]:
    """The sets the guidance scale is chosen on (none for a single scale)."""
    ev, scales = ws.exp.eval, ws.exp.guidances_for(entry)
    if len(scales) == 1:
        return []
    n = ev.guidance_samples or ev.num_samples
    return [SetSpec(steps, w, ev.guidance_seed, n, ws.paths.guidance_samples(entry.name, steps, w))
            for steps in ws.exp.steps_for(entry) for w in scales]


def record_path(ws: Workspace, entry: MethodEntry) -> Path:
    return ws.paths.sample_dir(entry.name) / "guidance.json"


def read_record(ws: Workspace, entry: MethodEntry) -> dict[str, Any] | None:
    try:
        return json.loads(record_path(ws, entry).read_text())
    except (OSError, ValueError):
        return None


def current_choice(ws: Workspace, entry: MethodEntry, sampler_name: str) -> dict[int, float] | None:
    """{steps: scale} under the current config, or None when a list of scales has no
    current record (the selection sets must be drawn and scored first)."""
    scales = ws.exp.guidances_for(entry)
    if len(scales) == 1:
        return {steps: scales[0] for steps in ws.exp.steps_for(entry)}
    record = read_record(ws, entry)
    if record is None or record.get("scoring_hash") != scoring_hash(ws):
        return None
    want = {(s.steps, s.guidance): config_hash(expected_identity(ws, entry, sampler_name, s))
            for s in selection_sets(ws, entry)}
    have = {(r["steps"], r["guidance"]): r["sample_hash"] for r in record["rows"]}
    return {int(k): float(v) for k, v in record["chosen"].items()} if have == want else None


def headline_column(metrics: list[tuple[str, Any]], source: str) -> Any:
    """The column the scale is chosen by: the first headline column (FID) of the metrics."""
    for name, metric in metrics:
        for column in getattr(metric, "columns", ()):
            if column.headline and column.better is not None:
                return column
    raise ConfigError(f"{source}: a list of guidance scales is chosen by the first headline metric column (FID), "
                      f"and none of eval.metrics ({', '.join(n for n, _ in metrics) or 'none'}) declares one: "
                      "add `fid` to eval.metrics or give each method one guidance scale")


def best_scales(rows: list[dict[str, Any]], key: str, better: str) -> dict[int, float]:
    """Per step count, the scale with the best ``key`` (ties: the smaller scale, the
    cheaper and less saturated one); a NaN score never wins."""
    sign = 1.0 if better == "lower" else -1.0
    chosen: dict[int, tuple[float, float]] = {}
    for r in rows:
        value = r.get(key)
        score = math.inf if value is None or math.isnan(value) else sign * value
        best = chosen.get(r["steps"])
        if best is None or (score, r["guidance"]) < best:
            chosen[r["steps"]] = (score, r["guidance"])
    return {steps: w for steps, (_, w) in chosen.items()}


def choose_guidance(ws: Workspace, entry: MethodEntry, method: Any, sampler: Any, sampler_name: str,
                    device: torch.device, progress: bool = True) -> dict[int, float]:
    """{steps: scale}: the current record's choice, else draw and score the selection
    sets and record the choice (every process calls it; the main process writes)."""
    chosen = current_choice(ws, entry, sampler_name)
    if chosen is not None:
        return chosen
    from spheregen.evaluation import build_metrics, prepare_reference, score_all, workspace_reference

    metrics = build_metrics(ws, device)
    column = headline_column(metrics, ws.exp.source)
    reference = workspace_reference(ws)
    prepare_reference(metrics, reference)
    rows = []
    for spec in selection_sets(ws, entry):
        identity = expected_identity(ws, entry, sampler_name, spec)
        labels = balanced_labels(spec.num_samples, ws.data.spec.num_classes)
        what = f"{entry.name} @ {spec.steps} steps, guidance {spec.guidance:g} (choosing the scale)"
        generate(sampler, method, labels, spec.steps, spec.guidance, spec.seed, ws.exp.eval.batch_size, device,
                 spec.path, {"method": entry.name, **identity}, desc=f"sample {what}" if progress else "")
        samples = open_samples(spec.path, identity)
        scores = score_all(metrics, samples, reference, labels=samples.labels, what=f"samples of {what}")
        rows.append({"method": entry.name, "steps": spec.steps, "guidance": spec.guidance, "seed": spec.seed,
                     "num_samples": spec.num_samples, "sample_hash": config_hash(identity),
                     "train_hash": identity["train_hash"], **scores})
    if distributed.is_main():
        if any(column.key not in r for r in rows):
            raise SpheregenError(f"metric column '{column.key}' missing from the scores of {entry.name}'s guidance "
                                 "sets; the metric did not return it")
        chosen = best_scales(rows, column.key, column.better)
        for r in rows:
            r["chosen"] = chosen[r["steps"]] == r["guidance"]
        atomic_write_json(record_path(ws, entry), {"criterion": column.key, "better": column.better,
                                                   "scoring_hash": scoring_hash(ws), "rows": rows,
                                                   "chosen": {str(k): v for k, v in chosen.items()}})
    distributed.barrier()
    chosen = current_choice(ws, entry, sampler_name)
    if chosen is None:
        raise SpheregenError(f"{record_path(ws, entry)}: the guidance choice was not recorded; re-run `spheregen sample`")
    return chosen


def record_rows(ws: Workspace, entry: MethodEntry) -> list[dict[str, Any]]:
    """The rows of the entry's guidance record (for guidance.parquet), each with the
    criterion it was chosen by; [] for a single scale."""
    if len(ws.exp.guidances_for(entry)) == 1:
        return []
    record = read_record(ws, entry) or {"rows": []}
    return [{**r, "criterion": record.get("criterion")} for r in record["rows"]]
