"""The results store: ``reports/<exp>/results.parquet`` (one row per method × steps)
and ``tokenizers.parquet`` (one row per tokenizer), with the identity of what produced
each row, so a report never shows a number under a config it did not come from.

Each result row records ``eval_hash`` (:func:`eval_hash`: the method entry with its
training, sampler, guidance and steps, the data config and the evaluation settings that
change a score), ``train_hash`` (the weights' run identity, data content included) and
``sample_hash`` (the sample file's identity). ``spheregen report`` checks ``eval_hash``
against the experiment file and refuses rows of another config. This module needs
neither the runner nor accelerate.
"""

from __future__ import annotations

import importlib.metadata
import sys
import time
from pathlib import Path
from typing import Any

import attrs
import polars as pl

from spheregen.config import config_hash, to_dict
from spheregen.errors import SpheregenError, StaleError
from spheregen.experiment import MethodEntry
from spheregen.paths import atomic_write, atomic_write_json


def eval_hash(ws: Any, entry: MethodEntry) -> str:
    """What a result row of ``entry`` depends on, from the experiment file alone (no
    data opened): the entry (method, training, sampler, guidance, steps), the experiment
    seed and data config, and every eval setting except the grid layout."""
    ev = ws.exp.eval
    scoring = {k: getattr(ev, k) for k in ("num_samples", "batch_size", "metrics", "reference", "use_ema", "seed",
                                            "throughput_batch")}
    # keys added later count only when set, so results scored before them stay current
    for key in ("reference_stats", "reference_subset", "seeds", "guidance", "guidance_seed", "guidance_samples",
                "mixed_precision"):
        if getattr(ev, key) != getattr(attrs.fields(type(ev)), key).default:
            scoring[key] = getattr(ev, key)
    return config_hash({"entry": entry, "seed": ws.exp.seed, "data": ws.exp.data, "eval": scoring,
                        "steps": list(ws.exp.steps_for(entry))})


def scoring_hash(ws: Any) -> str:
    """What a score depends on besides the sample set itself: the data config, the
    metrics and the reference (for the guidance choice's record, spheregen.selection)."""
    ev = ws.exp.eval
    return config_hash({"data": ws.exp.data, "metrics": ev.metrics, "reference": ev.reference,
                        "reference_stats": ev.reference_stats, "reference_subset": ev.reference_subset})


def read_results(ws: Any) -> pl.DataFrame:
    """results.parquet of the experiment, every row checked against the current config."""
    path = ws.paths.report / "results.parquet"
    if not path.is_file():
        raise SpheregenError(f"{path} does not exist: run `spheregen evaluate` for this experiment first")
    try:
        frame = pl.read_parquet(path)
    except Exception as exc:
        raise SpheregenError(f"{path} is corrupt ({type(exc).__name__}: {exc}); re-run `spheregen evaluate`, "
                             "which sets the corrupt file aside and writes a new one") from exc
    check_current(ws, frame, path)
    return frame


def check_current(ws: Any, frame: pl.DataFrame, path: Path) -> None:
    """Refuse rows whose ``eval_hash`` is not the current config's for their method."""
    stale = []
    for method in frame["method"].unique().sort().to_list():
        want = eval_hash(ws, ws.exp.method(method)) if method in {m.name for m in ws.exp.methods} else None
        got = set(frame.filter(pl.col("method") == method).get_column("eval_hash").to_list()) \
            if "eval_hash" in frame.columns else {None}
        if want is None or got != {want}:
            stale.append(method)
    if stale:
        names = " ".join(f"--method {m}" for m in stale)
        raise StaleError(f"{path} holds rows of {stale} computed under another config (or an older spheregen) "
                         f"than {ws.exp.source} now gives: re-run `spheregen evaluate {ws.exp.source} {names}` "
                         "(after `spheregen sample`, or use `spheregen run`)")


def _read_or_set_aside(path: Path) -> pl.DataFrame | None:
    """The frame at ``path``, or None when there is none. A corrupt file is renamed to
    ``<name>.corrupt-<time>`` (kept, never deleted) with a warning, so one bad file
    does not block every later evaluation."""
    if not path.is_file():
        return None
    try:
        return pl.read_parquet(path)
    except Exception as exc:
        aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
        path.rename(aside)
        print(f"spheregen: warning: {path} was corrupt ({type(exc).__name__}); set aside as {aside.name}, "
              "its rows are not kept", file=sys.stderr)
        return None


def _merge(path: Path, frame: pl.DataFrame, key: str, keep: list[str]) -> pl.DataFrame:
    """``frame`` plus the rows of the file at ``path`` whose ``key`` is not in ``frame``
    and is in ``keep`` (results of methods not re-evaluated now survive), in the order of
    ``keep`` (the experiment's methods), rows of one key in their own order: the same
    file whichever job of ``run --jobs`` finished first."""
    old = _read_or_set_aside(path)
    if old is not None:
        old = old.filter(~pl.col(key).is_in(frame[key].unique().to_list()) & pl.col(key).is_in(keep))
        frame = pl.concat([old, frame], how="diagonal_relaxed") if len(old) else frame
    return _ordered(frame, frame[key].to_list(), keep)


def _ordered(frame: pl.DataFrame, names: list[Any], order: list[str]) -> pl.DataFrame:
    """``frame``'s rows sorted by the place of their ``names`` (one per row) in ``order``
    (names not in it last), rows of one name in their own order. The report orders its
    own tables; the files keep the experiment's order so that ``run --jobs`` writes the
    same files as a sequential run."""
    rank = {k: i for i, k in enumerate(order)}
    return frame.sort(pl.Series([rank.get(n, len(rank)) for n in names]), maintain_order=True)


def _tokenizer_frame(rows: list[dict[str, Any]], order: list[str]) -> pl.DataFrame:
    """One row per tokenizer identity (config hash); ``methods`` lists its users in the
    experiment's ``order`` (not in the order the jobs of ``run --jobs`` wrote them)."""
    merged: dict[str, dict[str, Any]] = {}
    users: dict[str, set[str]] = {}
    for row in rows:
        merged.setdefault(row["config_hash"], dict(row))
        users.setdefault(row["config_hash"], set()).update(str(row["methods"]).split(", "))
    rank = {m: i for i, m in enumerate(order)}
    for key, row in merged.items():
        row["methods"] = ", ".join(sorted(users[key], key=lambda m: (rank.get(m, len(rank)), m)))
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


def _unreplaced(old: pl.DataFrame, fresh: pl.DataFrame, keep: list[str]) -> pl.DataFrame:
    """The old tokenizer rows that still stand: not re-scored now, each listing only its
    users that got no new tokenizer row and are still in the experiment (a retrained
    Sphere Encoder's autoencoder, or one scored with other features, replaces its old
    row; a tokenizer shared with a method that was not re-evaluated keeps that user)."""
    users_now = {m for ms in fresh["methods"].to_list() for m in str(ms).split(", ")}
    hashes_now = set(fresh["config_hash"].to_list())
    rows = []
    for row in old.iter_rows(named=True):
        users = [m for m in str(row["methods"]).split(", ") if m not in users_now and m in keep]
        if row["config_hash"] not in hashes_now and users:
            rows.append({**row, "methods": ", ".join(users)})
    return pl.from_dicts(rows, schema=old.schema) if rows else old.clear()


def write_results(ws: Any, rows: list[dict[str, Any]], tokenizer_rows: list[dict[str, Any]] = (),
                  guidance_rows: list[dict[str, Any]] = ()) -> Path:
    """Write results.parquet (and tokenizers.parquet when there are reconstruction rows,
    guidance.parquet when a guidance scale was chosen from a list); rows of methods not
    re-evaluated now are kept from the old files."""
    report = ws.paths.report
    path = report / "results.parquet"
    names = [m.name for m in ws.exp.methods]
    frame = _merge(path, pl.from_dicts(rows, infer_schema_length=None), "method", names)
    atomic_write(path, lambda p: frame.write_parquet(p))
    if guidance_rows:
        choices = _merge(report / "guidance.parquet", pl.from_dicts(guidance_rows, infer_schema_length=None),
                         "method", names)
        atomic_write(report / "guidance.parquet", lambda p: choices.write_parquet(p))
    if tokenizer_rows:
        tok_path = report / "tokenizers.parquet"
        old_file = _read_or_set_aside(tok_path)
        tokens = _tokenizer_frame(_with_old_users(old_file, list(tokenizer_rows), names), names)
        if old_file is not None:  # rows of tokenizers whose users were not re-evaluated stand
            old = _unreplaced(old_file, tokens, names)
            tokens = pl.concat([old, tokens], how="diagonal_relaxed") if len(old) else tokens
        # each tokenizer row where its first user stands in the experiment
        tokens = _ordered(tokens, [str(m).split(", ")[0] for m in tokens["methods"].to_list()], names)
        atomic_write(tok_path, lambda p: tokens.write_parquet(p))
    atomic_write_json(report / "config.resolved.json", {
        "experiment": to_dict(ws.exp),
        "spheregen": importlib.metadata.version("spheregen"),
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    })
    return path
