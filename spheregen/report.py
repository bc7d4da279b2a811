"""Tables and plots from ``results.parquet`` and the sample files alone.

Columns are shown as the registered metrics declare them (:class:`spheregen.interfaces.Column`);
the report names no metric. Reads only the experiment (already loaded), the registries,
``reports/<exp>/results.parquet``, the optional
``reports/<exp>/tokenizers.parquet`` and ``runs/<exp>/samples/<method>/steps-<T>.npz``: no
weights, no dataset, so a report can be rebuilt anywhere the files were copied.

Writes into ``reports/<exp>/``: ``results.md`` (one section per dataset: the full table and,
for the headline metric column (FID), the FID@k / GFLOPs@k table, ``fid_vs_steps.png`` and
``fid_vs_gflops.png`` with the Pareto front marked), ``tokenizers.png`` (when
tokenizers.parquet exists), ``grid_<method>_steps<T>.png``
(``grid_per_class`` samples per class, rows are classes) and ``index.html``: the same
content in one self-contained file, every image embedded as a data URI.
"""

from __future__ import annotations

import base64
import html
import math
import re
from pathlib import Path

import attrs
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import polars as pl  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from spheregen.errors import SpheregenError  # noqa: E402
from spheregen.samples import open_samples  # noqa: E402
from spheregen.interfaces import Column  # noqa: E402
from spheregen.paths import DirLock, atomic_write, atomic_write_text  # noqa: E402
from spheregen.results import read_results  # noqa: E402
from spheregen.plugins import registries  # noqa: E402
from spheregen.registry import Entry  # noqa: E402
from spheregen.workspace import Workspace  # noqa: E402

# The core's own result columns, around the metrics' (each metric declares its own,
# :class:`spheregen.interfaces.Column`); only the columns present are printed.
RUN_COLUMNS = (
    Column(key="method", label="method", format="{}"),
    Column(key="sampler", label="sampler", format="{}"),
    Column(key="steps", label="steps", format="{}"),
    Column(key="nfe", label="NFE", format="{}"),
)
COST_COLUMNS = (
    Column(key="gflops_per_image", label="GFLOPs/img", format="{:.3f}", better="lower"),
    Column(key="gflops_paper", label="GFLOPs/img (paper conv.)", format="{:.3f}", better="lower"),
    Column(key="images_per_s", label="img/s", format="{:.1f}", better="higher"),
    Column(key="latency_b1_s", label="latency b=1 (ms)", format="{:.1f}", scale=1e3, better="lower"),
    Column(key="peak_memory_mb", label="peak mem (MB)", format="{:.1f}", better="lower"),
    Column(key="params", label="params (M)", format="{:.2f}", scale=1e-6),
    Column(key="trainable_params", label="trained params (M)", format="{:.2f}", scale=1e-6),
)
TOKENIZER_HEAD = (Column(key="tokenizer", label="tokenizer", format="{}"),
                  Column(key="methods", label="used by", format="{}"))
TOKENIZER_TAIL = (Column(key="psnr", label="PSNR (dB)", format="{:.2f}", better="higher"),
                  Column(key="num_images", label="images", format="{}"))

# A report is a list of blocks rendered twice (markdown and HTML):
#   ("h", level, text) | ("p", text) | ("table", header, rows) | ("images", [(file name, caption)])
# Text may hold `code` spans; table cells are plain strings.
Block = tuple


def read_tokenizers(report_dir: Path) -> pl.DataFrame | None:
    """The tokenizer reconstruction rows, or None: the file is optional."""
    path = report_dir / "tokenizers.parquet"
    return pl.read_parquet(path) if path.is_file() else None


def _missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _fmt(value: object, fmt: str, scale: float = 1.0) -> str:
    if _missing(value):
        return "–"
    return fmt.format(float(value) * scale if scale != 1.0 else value)


def _cell(col: Column, value: object) -> str:
    return _fmt(value, col.format, col.scale)


# the std over eval.seeds of a metric column, beside its mean (over_seeds)
SEED_STD = "_seed_std"


def _row_cell(col: Column, row: dict[str, object]) -> str:
    """A row's cell: ``mean ± std`` when the row is a mean over seeds, else the value."""
    std = row.get(col.key + SEED_STD)
    cell = _cell(col, row.get(col.key))
    return cell if _missing(std) or _missing(row.get(col.key)) else f"{cell} ± {_fmt(std, col.format, col.scale)}"


def over_seeds(ws: Workspace, df: pl.DataFrame) -> pl.DataFrame:
    """One row per method × steps: with several seeds (``eval.seeds``), each numeric
    metric column is their mean and ``<key>_seed_std`` their standard deviation
    (ddof 1), ``n_seeds`` their number; other columns are those of the first seed's row
    (speed and FLOPs are measured once per step count)."""
    if "seed" not in df.columns or df.group_by(["method", "steps"]).len()["len"].max() == 1:
        return df
    numeric = [c.key for c in metric_columns(ws, df.columns) if df.schema[c.key].is_numeric()]
    others = [c for c in df.columns if c not in numeric and c not in ("method", "steps")]
    return (df.sort(["method", "steps", "seed"])
            .group_by(["method", "steps"], maintain_order=True)
            .agg([pl.col(k).mean() for k in numeric] + [pl.col(k).std().alias(k + SEED_STD) for k in numeric]
                 + [pl.len().alias("n_seeds")] + [pl.col(c).first() for c in others]))


class Best(str):
    """A table cell holding the best value of its column (bold in every rendering)."""


def mark_best(cols: list[Column], rows: list[list[str]], values: list[list[object]]) -> list[list[str]]:
    """``rows`` with, in each column that declares ``better``, the best finite value(s)
    wrapped in :class:`Best` (``values``: the raw numbers behind the cells)."""
    out = [list(r) for r in rows]
    for j, col in enumerate(cols):
        if col.better not in ("lower", "higher"):
            continue
        nums = [(i, float(v[j])) for i, v in enumerate(values) if not _missing(v[j]) and math.isfinite(float(v[j]))]
        if len({x for _, x in nums}) < 2:  # one value, or all equal: nothing stands out
            continue
        pick = min if col.better == "lower" else max
        best = pick(x for _, x in nums)
        for i, x in nums:
            if x == best:
                out[i][j] = Best(out[i][j])
    return out


def _features_header(header: str, features: pl.Series) -> str:
    """``FID`` -> ``FID[inception, ...]``: which feature extractor(s) the distance used."""
    feats = sorted({str(f) for f in features.drop_nulls()})
    return f"{header}[{', '.join(feats)}]" if feats else header


def declared_columns(entry: Entry) -> tuple[Column, ...]:
    """A registered metric's columns, read from its factory (no metric is built): its
    ``columns``, else its ``keys`` shown as-is with a generic format."""
    columns = getattr(entry.factory, "columns", None)
    if columns is not None:
        return tuple(columns)
    return tuple(Column(key=k, label=k) for k in getattr(entry.factory, "keys", ()))


def metric_columns(ws: Workspace, present: list[str]) -> list[Column]:
    """The columns among ``present`` (result keys, in file order) that registered metrics
    declare: the experiment's metrics first, in ``eval.metrics`` order, then any other
    registered metric's (rows kept from an earlier metric list) in file order."""
    reg = registries().metric
    listed = {c.name for c in ws.exp.eval.metrics}
    cols = {c.key: c for m in ws.exp.eval.metrics for c in declared_columns(reg.get(m.name))}
    others = {c.key: c for e in reg if e.name not in listed for c in declared_columns(e)}
    for key in present:
        cols.setdefault(key, others.get(key))
    return [c for c in cols.values() if c is not None and c.key in present]


def _header(col: Column, df: pl.DataFrame, features: str) -> str:
    """The column's label, naming the feature space(s) from ``df[features]`` when it asks."""
    if col.label_features and features in df.columns:
        return _features_header(col.label, df[features])
    return col.label


def results_rows(ws: Workspace, df: pl.DataFrame) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the full table: one row per method × steps, present columns only."""
    cols = [c for c in RUN_COLUMNS if c.key in df.columns] + metric_columns(ws, df.columns)
    cols += [c for c in COST_COLUMNS if c.key in df.columns]
    header = [_header(c, df, f"{c.key}_features") for c in cols]
    records = list(df.sort(["method", "steps"]).iter_rows(named=True))
    values = [[r[c.key] for c in cols] for r in records]
    return header, mark_best(cols, [[_row_cell(c, r) for c in cols] for r in records], values)


def headline(ws: Workspace, df: pl.DataFrame) -> Column | None:
    """The first headline metric column of ``df`` (FID), or None."""
    return next((c for c in metric_columns(ws, df.columns) if c.headline), None)


def steps_rows(df: pl.DataFrame, head: Column | None, with_gflops: bool = True
               ) -> tuple[list[str], list[list[str]]] | None:
    """Seed 000's layout: one row per method, FID@k and GFLOPs@k side by side (``head``:
    the headline column, e.g. FID; None without one; ``with_gflops=False``: ``head`` alone)."""
    if head is None:
        return None
    steps = sorted(df["steps"].unique().to_list())
    gflops = COST_COLUMNS[0]
    has_gflops = with_gflops and gflops.key in df.columns
    header = (["method"] + [f"{head.label}@{k}" for k in steps]
              + ([f"GFLOPs@{k}" for k in steps] if has_gflops else []))
    rows, raw = [], []
    cols = [Column(key="method", label="method")] + [head] * len(steps) + ([gflops] * len(steps) if has_gflops else [])
    for method in df["method"].unique(maintain_order=True).to_list():
        by_steps = {r["steps"]: r for r in df.filter(pl.col("method") == method).iter_rows(named=True)}
        nums = [by_steps[k][head.key] if k in by_steps else None for k in steps]
        gfl = [by_steps[k][gflops.key] if k in by_steps else None for k in steps] if has_gflops else []
        raw.append([method, *nums, *gfl])
        cells = [_row_cell(head, by_steps[k]) if k in by_steps else "–" for k in steps]
        rows.append([method] + cells + [_cell(gflops, v) for v in gfl])
    return header, mark_best(cols, rows, raw)


def reconstruction_columns(ws: Workspace, toks: pl.DataFrame) -> list[Column]:
    """The tokenizer table's metric columns: each registered metric column declared
    ``reconstruction``, stored as ``r<key>`` and labelled ``r<label>`` (rFID)."""
    scored = [c[1:] for c in toks.columns if c.startswith("r")]
    return [attrs.evolve(c, key=f"r{c.key}", label=f"r{c.label}")
            for c in metric_columns(ws, scored) if c.reconstruction]


def tokenizer_rows(ws: Workspace, toks: pl.DataFrame) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the reconstruction table; ``methods`` is shown comma-spaced.
    ``features`` names the feature space of the reconstruction scores."""
    cols = [c for c in TOKENIZER_HEAD if c.key in toks.columns] + reconstruction_columns(ws, toks)
    cols += [c for c in TOKENIZER_TAIL if c.key in toks.columns]
    header = [_header(c, toks, "features") for c in cols]
    rows, values = [], []
    for r in toks.iter_rows(named=True):
        if r.get("methods"):
            r["methods"] = ", ".join(m.strip() for m in str(r["methods"]).split(",") if m.strip())
        rows.append([_cell(c, r[c.key]) for c in cols])
        values.append([r[c.key] for c in cols])
    return header, mark_best(cols, rows, values)


def _md_cell(cell: str) -> str:
    return f"**{cell}**" if isinstance(cell, Best) else cell


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows])






# ---------------------------------------------------------------------------------- plots


def _save_fig(fig: plt.Figure, path: Path) -> None:
    """``path`` (PNG, for the pages) and the same figure as PDF beside it (for papers)."""
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=120, bbox_inches="tight"))
    atomic_write(path.with_suffix(".pdf"), lambda p: fig.savefig(p, format="pdf", bbox_inches="tight"))
    plt.close(fig)


def _finite(col: str) -> pl.Expr:
    # null -> null, which filter() drops like NaN and inf
    return pl.col(col).cast(pl.Float64).is_finite()


def pareto_front(df: pl.DataFrame, col: Column) -> pl.DataFrame:
    """Rows no other row beats: the best ``col`` value (e.g. lowest FID) among all rows
    with at most its GFLOPs/img.

    Over all methods and step counts; rows without a finite value or GFLOPs are left out.
    Returns those rows sorted by ``gflops_per_image`` (the value improves strictly along
    them)."""
    if col.key not in df.columns or "gflops_per_image" not in df.columns:
        return df.clear()
    # ranked as a loss: lower is better after the sign
    loss = pl.col(col.key) * (-1.0 if col.better == "higher" else 1.0)
    pts = df.filter(_finite(col.key) & _finite("gflops_per_image")).sort([pl.col("gflops_per_image"), loss])
    # best value among the rows before (cheaper, or as cheap and better)
    best_before = loss.cum_min().shift(1)
    return pts.filter(best_before.is_null() | (loss < best_before))


def _mark_pareto(ax: plt.Axes, df: pl.DataFrame, col: Column) -> None:
    front = pareto_front(df, col)
    if len(front) == 0:
        return
    x, y = front["gflops_per_image"].to_list(), front[col.key].to_list()
    # 'post': past a front point, its value is the best until the next one is affordable
    ax.step(x, y, where="post", linestyle="--", color="0.3", linewidth=1, label="Pareto front", zorder=1)
    ax.scatter(x, y, s=150, facecolors="none", edgecolors="k", linewidths=1.2, zorder=3)


# x axes of the headline plots: (column, file-name part, axis label, log base)
HEADLINE_AXES = (
    ("steps", "steps", "sampling steps", 2),
    ("gflops_per_image", "gflops", "GFLOPs per image (true FLOPs, CFG passes included)", 10),
    ("images_per_s", "images_per_s", "images/s at the throughput batch", 10),
    ("train_gflops_total", "train_compute", "training compute (GFLOPs, forward + backward)", 10),
)


def _point_labels(ax: plt.Axes, g: pl.DataFrame, x: str, y: str) -> None:
    """Each point labelled with its step count (and NFE when it differs)."""
    for r in g.iter_rows(named=True):
        if _missing(r[x]) or _missing(r[y]):
            continue
        nfe = r.get("nfe")
        text = f"{r['steps']}" + (f" ({nfe} NFE)" if nfe is not None and nfe != r["steps"] else "")
        ax.annotate(text, (r[x], r[y]), textcoords="offset points", xytext=(4, 3), fontsize=7, color="0.25")


def plot_headline(df: pl.DataFrame, col: Column | None, out: Path, suffix: str = "") -> list[Path]:
    """``<key>_vs_<x><suffix>.png`` (and .pdf) of the headline column ``col`` (FID) against
    steps, GFLOPs per image (Pareto front marked), images/s and training compute, each
    where the results have that column; points labelled with steps (NFE); [] without a
    headline column."""
    if col is None:
        return []
    ylabel = _header(col, df, f"{col.key}_features")
    paths = []
    for x, name, xlabel, base in HEADLINE_AXES:
        if x not in df.columns or df.filter(_finite(x) & _finite(col.key)).is_empty():
            continue
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for method, g in df.sort("steps").group_by("method", maintain_order=True):
            std = g[col.key + SEED_STD].to_numpy() if col.key + SEED_STD in g.columns else None
            ax.errorbar(g[x].to_numpy(), g[col.key].to_numpy(), yerr=std, marker="o", capsize=3, label=method[0],
                        zorder=2)
            if x != "steps":
                _point_labels(ax, g, x, col.key)
        if x == "gflops_per_image":
            _mark_pareto(ax, df, col)
        ax.set_xscale("log", base=base)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{ylabel} ({col.better} is better)" if col.better else ylabel)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False)  # outside the data
        path = out / f"{col.key}_vs_{name}{suffix}.png"
        _save_fig(fig, path)
        paths.append(path)
    return paths


def plot_training(ws: Workspace, methods: list[str], out: Path) -> Path | None:
    """``training_loss.png``: each method's training loss by step, from its
    ``train_log.jsonl`` (None when no log is at hand, e.g. a report copied elsewhere)."""
    import json

    curves = {}
    for method in methods:
        log = ws.paths.run(method) / "train_log.jsonl"
        if not log.is_file():
            continue
        rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        rows = [r for r in rows if isinstance(r.get("loss"), (int, float)) and math.isfinite(r["loss"])]
        if rows:
            curves[method] = ([r["step"] for r in rows], [r["loss"] for r in rows])
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for method, (steps, loss) in curves.items():
        ax.plot(steps, loss, label=method, linewidth=1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (each method's own objective)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False)
    path = out / "training_loss.png"
    _save_fig(fig, path)
    return path


def read_guidance(ws: Workspace, df: pl.DataFrame) -> pl.DataFrame | None:
    """The rows of ``guidance.parquet`` behind the shown results: methods whose scale was
    chosen from a list (spheregen.selection), from the same weights; None without any."""
    path = ws.paths.report / "guidance.parquet"
    if not path.is_file() or "guidance_scales" not in df.columns:
        return None
    listed = df.filter(pl.col("guidance_scales").is_not_null()).select("method", "train_hash").unique()
    rows = pl.read_parquet(path).join(listed, on=["method", "train_hash"], how="semi")
    return rows if len(rows) else None


def guidance_table(head: Column, g: pl.DataFrame, df: pl.DataFrame, label: str
                   ) -> tuple[list[str], list[list[str]]]:
    """(header, rows): per method and step count, the headline value at each scale on the
    selection seed (the chosen one bold) and the chosen scale's value on the scored seeds."""
    scales = sorted(g["guidance"].unique().to_list())
    header = ["method", "steps", *[f"{label} w={w:g}" for w in scales], "chosen w", f"{label} (scored seeds)"]
    shown = {(r["method"], r["steps"]): r for r in df.iter_rows(named=True)}
    rows = []
    for (method, steps), part in sorted(g.group_by(["method", "steps"]), key=lambda kv: kv[0]):
        by_scale = {r["guidance"]: r for r in part.iter_rows(named=True)}
        cells = []
        for w in scales:
            r = by_scale.get(w)
            cell = "–" if r is None else _cell(head, r.get(head.key))
            cells.append(Best(cell) if r is not None and r.get("chosen") else cell)
        chosen = next((w for w, r in by_scale.items() if r.get("chosen")), None)
        scored = shown.get((method, steps))
        rows.append([method, str(steps), *cells, "–" if chosen is None else f"{chosen:g}",
                     "–" if scored is None else _row_cell(head, scored)])
    return header, rows


def plot_guidance(head: Column, g: pl.DataFrame, label: str, out: Path, suffix: str = "") -> Path:
    """``<key>_vs_guidance.png``: the headline value on the selection seed against the
    guidance scale, one panel per step count, the chosen scale ringed."""
    steps = sorted(g["steps"].unique().to_list())
    cols = min(len(steps), 4)
    nrows = -(-len(steps) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols + 1.5, 2.8 * nrows), squeeze=False, sharey=True)
    for ax, k in zip(axes.flat, steps):
        for method, part in g.filter(pl.col("steps") == k).sort("guidance").group_by("method", maintain_order=True):
            line = ax.plot(part["guidance"], part[head.key], marker="o", label=method[0])[0]
            best = part.filter(pl.col("chosen"))
            ax.scatter(best["guidance"], best[head.key], s=140, facecolors="none", edgecolors=line.get_color())
        ax.set_title(f"{k} step(s)", fontsize=9)
        ax.set_xlabel("guidance scale w")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(steps):]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel(f"{head.label} ({head.better} is better)" if head.better else head.label)
    fig.suptitle(f"{label} on the guidance-choice seed; the chosen scale ringed", fontsize=9)
    axes.flat[0].legend(loc="upper left", bbox_to_anchor=(cols * 1.08 + 0.1, 1.0), fontsize=8, frameon=False)
    path = out / f"{head.key}_vs_guidance{suffix}.png"
    _save_fig(fig, path)
    return path


def guidance_blocks(ws: Workspace, df: pl.DataFrame, out: Path, suffix: str = "") -> list[Block]:
    """The guidance section: the best-guidance table and the FID-vs-guidance plot."""
    head = headline(ws, df)
    g = read_guidance(ws, df) if head is not None else None
    if g is None or head.key not in g.columns:
        return []
    label = _header(head, df, f"{head.key}_features")
    ev = ws.exp.eval
    n = g["num_samples"].max()
    return [
        ("h", 3, "Guidance"),
        ("p", f"Each method was sampled at every listed guidance scale with seed {ev.guidance_seed} ({n} samples "
              f"each; never scored in the tables above), and per step count the scale with the best {head.label} "
              "there (bold) is the one drawn with the scored seeds."),
        ("table", *guidance_table(head, g, df, head.label)),
        ("images", [(plot_guidance(head, g, label, out, suffix).name, f"{head.label} vs guidance")]),
    ]


def _floats(df: pl.DataFrame, col: str) -> list[float]:
    if col not in df.columns:
        return [math.nan] * len(df)
    return [math.nan if _missing(v) else float(v) for v in df[col].to_list()]


def _title(col: Column) -> str:
    """``rFID (lower is better)``; ``PSNR (dB)`` -> ``PSNR, dB (higher is better)``."""
    label = col.label.replace(" (", ", ").rstrip(")")
    return f"{label} ({col.better} is better)" if col.better else label


def plot_tokenizers(toks: pl.DataFrame, scores: list[Column], out: Path) -> Path:
    """``tokenizers.png``: bars per tokenizer of each reconstruction score (``scores``,
    rFID) and PSNR; a missing value is labelled '–'."""
    names = toks["tokenizer"].to_list()
    cols = [*scores, TOKENIZER_TAIL[0]]
    fig, axes = plt.subplots(1, len(cols), figsize=(max(6.0, 2.0 + 1.4 * len(names)), 3.6), squeeze=False)
    for ax, col in zip(axes[0], cols):
        values = _floats(toks, col.key)
        bars = ax.bar(range(len(names)), [0.0 if math.isnan(v) else v for v in values], color="C0")
        ax.bar_label(bars, labels=["–" if math.isnan(v) else f"{v:.2f}" for v in values], fontsize=8)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_title(_title(col))
        ax.grid(axis="y", alpha=0.3)
    path = out / "tokenizers.png"
    _save_fig(fig, path)
    return path


# ---------------------------------------------------------------------------------- grids


def grid_classes(labels: torch.Tensor, chosen: int | tuple[int, ...]) -> list[int]:
    """The classes a grid shows: ``chosen`` of them spread evenly over the classes
    present (all when there are no more), or the listed ones that are present."""
    present = sorted(set(labels.tolist()))
    if isinstance(chosen, tuple):
        return [c for c in chosen if c in present]
    if len(present) <= chosen:
        return present
    if chosen == 1:
        return present[:1]
    return [present[round(i * (len(present) - 1) / (chosen - 1))] for i in range(chosen)]


def sample_grid(images: torch.Tensor, labels: torch.Tensor, per_class: int,
                classes: list[int] | None = None) -> np.ndarray:
    """uint8 H'×W'×C grid: one row per class of ``classes`` (default: every class
    present), ``per_class`` samples each."""
    classes = sorted(set(labels.tolist())) if classes is None else classes
    rows = []
    for c in classes:
        picked = images[labels == c][:per_class]
        if len(picked) < per_class:
            pad = torch.zeros((per_class - len(picked), *images.shape[1:]), dtype=images.dtype)
            picked = torch.cat([picked, pad])
        rows.append(torch.cat(list(picked), dim=2))  # C×H×(W·k)
    grid = torch.cat(rows, dim=1).permute(1, 2, 0).numpy()
    return grid[..., 0] if grid.shape[2] == 1 else grid


def _grid_keys(df: pl.DataFrame) -> list[tuple[str, int]]:
    return df.select("method", "steps").unique().sort(["method", "steps"]).rows()


GRID_FILE = re.compile(r"grid_.+_steps\d+\.png")


def grid_name(method: str, steps: int) -> str:
    return f"grid_{method}_steps{steps}.png"


def labelled_grid(grid: np.ndarray, classes: list[int]) -> Image.Image:
    """The grid (upscaled while narrower than 256 px: small digits are unreadable at 1:1)
    with each row's class index written in a left margin."""
    from PIL import ImageDraw

    img = Image.fromarray(grid).convert("RGB")
    while img.width < 256:
        img = img.resize((img.width * 2, img.height * 2), Image.NEAREST)
    row = img.height / max(1, len(classes))
    margin = 8 + 7 * max(len(str(c)) for c in classes) if classes else 0
    canvas = Image.new("RGB", (img.width + margin, img.height), "white")
    canvas.paste(img, (margin, 0))
    draw = ImageDraw.Draw(canvas)
    for i, c in enumerate(classes):
        draw.text((3, i * row + row / 2 - 5), str(c), fill="black")
    return canvas


def write_grids(ws: Workspace, df: pl.DataFrame, out: Path) -> list[Path]:
    """One PNG per method × steps row: ``eval.grid_classes`` classes (rows, labelled),
    ``eval.grid_per_class`` samples each; a missing sample file names itself and its
    command."""
    paths = []
    for method, steps in _grid_keys(df):
        samples = open_samples(ws.paths.samples(method, steps))  # memory-mapped: only the grid's rows are read
        classes = grid_classes(samples.labels, ws.exp.eval.grid_classes)
        images, labels = samples.first_of_classes(classes, ws.exp.eval.grid_per_class)
        img = labelled_grid(sample_grid(images, labels, ws.exp.eval.grid_per_class, classes), classes)
        path = out / grid_name(method, steps)
        atomic_write(path, lambda p: img.save(p, format="PNG"))
        paths.append(path)
    for old in set(out.glob("grid_*_steps*.png")) - set(paths):  # a method or step count no longer run
        if old.is_file() and GRID_FILE.fullmatch(old.name):  # only names this function writes
            old.unlink()
    return paths


# ---------------------------------------------------------------------------------- content


def by_dataset(ws: Workspace, df: pl.DataFrame) -> list[tuple[str, pl.DataFrame]]:
    """(dataset, rows) in file order; without a ``dataset`` column, the experiment's source."""
    fallback = ws.exp.data.source.name
    if "dataset" not in df.columns:
        return [(fallback, df)]
    df = df.with_columns(pl.col("dataset").cast(pl.String).fill_null(fallback))
    return [(part["dataset"][0], part) for part in df.partition_by("dataset", maintain_order=True)]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "dataset"


def speed_note(df: pl.DataFrame) -> str:
    """Where img/s and latency were measured (device, torch threads), and a warning when
    rows were timed differently: such rows do not compare."""
    if "torch_threads" not in df.columns or "device" not in df.columns:
        return ""
    setups = sorted({f"{d}, {t} thread(s)" for d, t in df.select("device", "torch_threads").iter_rows()
                     if d is not None})
    if not setups:
        return ""
    if len(setups) == 1:
        return f"img/s and latency measured on {setups[0]}."
    return (f"img/s and latency were measured in different setups ({'; '.join(setups)}): compare speed "
            "only between rows of one setup (columns device, torch_threads of results.parquet).")


def _seeds_note(df: pl.DataFrame) -> str:
    if "n_seeds" not in df.columns:
        return ""
    return (f", mean ± standard deviation over {df['n_seeds'].max()} sampling seeds (error bars in the plots; "
            "speed and FLOPs measured once)")


def dataset_blocks(ws: Workspace, dataset: str, df: pl.DataFrame, out: Path, suffix: str) -> list[Block]:
    """The section of one dataset; its plots are written into ``out`` (file names end in
    ``suffix``)."""
    exp = ws.exp
    head = headline(ws, df)
    plots = plot_headline(df, head, out, suffix)
    n = df["num_samples"].max() if "num_samples" in df.columns else None
    blocks: list[Block] = [
        ("h", 2, f"Dataset: {dataset}"),
        ("p", f"Data: `{dataset}` at {exp.data.image_size}×{exp.data.image_size}, {exp.data.channels} "
              f"channel(s). Metrics on {n if n is not None else '?'} class-balanced samples per row "
              f"against the {exp.eval.reference} split{_seeds_note(df)}."),
        ("table", *results_rows(ws, df)),
    ]
    timing = speed_note(df)
    if timing:
        blocks.append(("p", timing))
    steps = steps_rows(df, head)
    if steps:
        blocks += [("h", 3, "By step count"), ("table", *steps)]
    if plots:
        blocks.append(("images", [(p.name, p.stem.replace("_", " ")) for p in plots]))
    blocks += guidance_blocks(ws, df, out, suffix)
    if any(p.name.startswith(f"{head.key}_vs_gflops") for p in plots):
        best = "highest" if head.better == "higher" else "lowest"
        blocks.append(("p", f"Rings and the dashed line in {head.label} vs GFLOPs: the Pareto front ({best} "
                            f"{head.label} for at most that many GFLOPs/img, over all methods and step counts)."))
    if n is not None and int(n) < 10_000 and head is not None:
        blocks.append(("p", f"{head.label} on {n} samples is biased upwards relative to the usual 50k; compare "
                            "rows within this table, not with papers."))
    return blocks


def tokenizer_blocks(ws: Workspace, toks: pl.DataFrame, out: Path) -> list[Block]:
    """The reconstruction section; its plot is written into ``out``."""
    scores = reconstruction_columns(ws, toks)
    plot = plot_tokenizers(toks, scores, out)
    against = "".join(f"{c.label} against the originals ({c.better} is better) and " if c.better else
                      f"{c.label} against the originals and " for c in scores)
    return [
        ("h", 2, "Tokenizers: reconstruction"),
        ("p", f"Encode → decode of real images by each tokenizer: {against}PSNR in dB (higher is better)."),
        ("table", *tokenizer_rows(ws, toks)),
        ("images", [(plot.name, " and ".join([c.label for c in scores] + ["PSNR"]) + " per tokenizer")]),
    ]


def grid_blocks(ws: Workspace, df: pl.DataFrame) -> list[Block]:
    chosen = ws.exp.eval.grid_classes
    rows = f"the classes {list(chosen)}" if isinstance(chosen, tuple) else f"up to {chosen} classes, evenly spread"
    blocks: list[Block] = [("h", 2, "Samples"), ("p", f"One row per class ({rows}; the class index at the left), "
                                                     f"{ws.exp.eval.grid_per_class} samples each.")]
    for method in sorted(df["method"].unique().to_list()):
        steps = [s for m, s in _grid_keys(df) if m == method]
        blocks += [("h", 3, method), ("images", [(grid_name(method, s), f"{s} step(s)") for s in steps])]
    return blocks


def report_blocks(ws: Workspace, df: pl.DataFrame, toks: pl.DataFrame | None, out: Path) -> list[Block]:
    """Write every plot and grid into ``out`` and return the report's content."""
    datasets = by_dataset(ws, df)
    blocks: list[Block] = [
        ("h", 1, f"{ws.exp.name}: results"),
        ("p", "GFLOPs/img counts every network pass of one sampling call (true FLOPs, attention "
              "included; the paper convention is 2×MACs without attention matmuls)."),
    ]
    for dataset, part in datasets:
        suffix = "" if len(datasets) == 1 else f"_{_slug(dataset)}"
        blocks += dataset_blocks(ws, dataset, part, out, suffix)
    if toks is not None and len(toks):
        blocks += tokenizer_blocks(ws, toks, out)
    blocks += training_blocks(ws, df, out)
    blocks += difference_blocks(ws, df)
    write_grids(ws, df, out)
    return blocks + grid_blocks(ws, df)


def training_blocks(ws: Workspace, df: pl.DataFrame, out: Path) -> list[Block]:
    """Each method's training cost (when the rows record it) and the training-loss
    curves (when the runs' logs are at hand)."""
    plot = plot_training(ws, df["method"].unique(maintain_order=True).to_list(), out)
    cost = training_cost_rows(df)
    blocks: list[Block] = [("table", *cost)] if cost else []
    if plot is not None:
        blocks += [("p", "Training loss by optimizer step (`runs/<experiment>/<method>/train_log.jsonl`); each "
                         "method's own objective, so compare shapes, not levels, across methods."),
                   ("images", [(plot.name, "training loss")])]
    return [("h", 2, "Training"), *blocks] if blocks else []


def training_cost_rows(df: pl.DataFrame) -> tuple[list[str], list[list[str]]] | None:
    """(header, rows): what training each method cost (spheregen.cost: FLOPs of forward
    and backward, wall time summed over resumes, device-hours = wall × processes) and
    the budgets a run extended by ``--extend-to`` continued; None without cost columns."""
    if "train_gflops_total" not in df.columns:
        return None
    header = ["method", "train steps", "images seen", "training GFLOPs", "wall (s)", "device-hours", "devices",
              "extended from (steps)"]
    rows = []
    for (method,), g in df.group_by("method", maintain_order=True):
        r = g.row(0, named=True)
        devices = "–" if _missing(r.get("train_processes")) else f"{r['train_processes']} × {r.get('train_device')}"
        rows.append([method, _fmt(r.get("train_steps"), "{:,}"), _fmt(r.get("images_seen"), "{:,}"),
                     _fmt(r.get("train_gflops_total"), "{:.3g}"), _fmt(r.get("train_wall_s"), "{:.0f}"),
                     _fmt(r.get("train_device_hours"), "{:.3g}"), devices, r.get("extended_from") or "–"])
    return header, rows


def config_differences(ws: Workspace, methods: list[str]) -> tuple[list[str], list[list[str]]]:
    """(keys, rows): the configuration keys (method options, training recipe, sampler,
    guidance, steps) whose values differ between the given methods, one row each."""
    from spheregen.config import to_dict

    def flat(obj: object, prefix: str = "") -> dict[str, object]:
        if isinstance(obj, dict):
            return {k: v for key, val in obj.items() for k, v in flat(val, f"{prefix}{key}.").items()}
        return {prefix.rstrip("."): obj}

    def effective(m: str) -> dict[str, object]:  # guidance as sampled (its own, else eval.guidance, else 1.0)
        scales = ws.exp.guidances_for(ws.exp.method(m))
        return {**to_dict(ws.exp.method(m)), "guidance": scales[0] if len(scales) == 1 else list(scales)}

    configs = {m: flat({k: v for k, v in effective(m).items() if k != "name"}) for m in methods}
    keys = sorted({k for c in configs.values() for k in c})
    differ = [k for k in keys if len({repr(c.get(k)) for c in configs.values()}) > 1]
    return differ, [[m] + ["–" if configs[m].get(k) is None else str(configs[m][k]) for k in differ] for m in methods]


def difference_blocks(ws: Workspace, df: pl.DataFrame, limit: int = 8) -> list[Block]:
    """An ablation's table of what differs between its rows (the methods share a method
    plugin and differ in at most ``limit`` keys; other comparisons differ in everything)."""
    methods = [m for m in df["method"].unique(maintain_order=True).to_list() if m in {e.name for e in ws.exp.methods}]
    plugins = {ws.exp.method(m).method.name for m in methods}
    if len(methods) < 2 or len(plugins) > 1:
        return []
    keys, rows = config_differences(ws, methods)
    if not keys or len(keys) > limit:
        return []
    return [("h", 2, "What differs between the rows"), ("table", ["method", *keys], rows)]


# ---------------------------------------------------------------------------------- render


def to_markdown(blocks: list[Block]) -> str:
    parts = []
    for block in blocks:
        kind = block[0]
        if kind == "h":
            parts.append("#" * block[1] + " " + block[2])
        elif kind == "p":
            parts.append(block[1])
        elif kind == "table":
            parts.append(_md_table(block[1], block[2]))
        elif kind == "images":
            parts.append(" ".join(f"![{cap}]({name})" for name, cap in block[1]))
    return "\n\n".join(parts) + "\n"


LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                 "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "–": "--",
                 "×": r"$\times$", "↑": r"$\uparrow$", "↓": r"$\downarrow$"}


def _tex(text: str) -> str:
    return "".join(LATEX_SPECIAL.get(ch, ch) for ch in str(text))


def _tex_table(caption: str, header: list[str], rows: list[list[str]]) -> str:
    """One booktabs table: first column left-aligned, the rest right; best values bold."""
    cells = lambda r: " & ".join(rf"\textbf{{{_tex(c)}}}" if isinstance(c, Best) else _tex(c) for c in r)  # noqa: E731
    lines = [r"\begin{table}[t]", r"\centering", rf"\caption{{{_tex(caption)}}}", r"\small",
             rf"\begin{{tabular}}{{l{'r' * (len(header) - 1)}}}", r"\toprule", " & ".join(map(_tex, header)) + r" \\",
             r"\midrule", *[cells(r) + r" \\" for r in rows], r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines)


def to_latex(blocks: list[Block], title: str) -> str:
    """Every table of the report as a LaTeX booktabs table, captioned with the heading
    above it (``\\usepackage{booktabs}``); best values in bold."""
    parts = [f"% {title}: tables generated by spheregen from results.parquet; needs \\usepackage{{booktabs}}"]
    caption = title
    for block in blocks:
        if block[0] == "h":
            caption = block[2]
        elif block[0] == "table":
            parts.append(_tex_table(caption, block[1], block[2]))
    return "\n\n".join(parts) + "\n"


def _inline(text: str) -> str:
    return re.sub(r"`([^`]*)`", r"<code>\1</code>", html.escape(text))


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td><b>{html.escape(c)}</b></td>" if isinstance(c, Best) else
                                    f"<td>{html.escape(c)}</td>" for c in r) + "</tr>\n" for r in rows)
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody>\n</table>"


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _img_class(name: str) -> str:
    # sample grids stay sharp when the page scales them; plots are smoothed as usual
    return ' class="grid"' if name.startswith("grid_") else ""


def _html_images(images: list[tuple[str, str]], out: Path) -> str:
    figs = "".join(f'<figure><img src="{_data_uri(out / name)}" alt="{html.escape(cap)}"{_img_class(name)}>'
                   f"<figcaption>{html.escape(cap)}</figcaption></figure>" for name, cap in images)
    return f'<div class="images">{figs}</div>'


CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}
th:first-child,td:first-child{text-align:left}th{background:#f2f2f2}
code{background:#f2f2f2;padding:0 3px}
.images{display:flex;flex-wrap:wrap;gap:1em;align-items:flex-start}
figure{margin:0}figcaption{font-size:13px;color:#555;text-align:center}
img{max-width:100%}img.grid{image-rendering:pixelated}"""


def to_html(blocks: list[Block], title: str, out: Path) -> str:
    """One self-contained page: the images in ``out`` named by the blocks become data URIs."""
    parts = []
    for block in blocks:
        kind = block[0]
        if kind == "h":
            parts.append(f"<h{block[1]}>{html.escape(block[2])}</h{block[1]}>")
        elif kind == "p":
            parts.append(f"<p>{_inline(block[1])}</p>")
        elif kind == "table":
            parts.append(_html_table(block[1], block[2]))
        elif kind == "images":
            parts.append(_html_images(block[1], out))
    body = "\n".join(parts)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f"<title>{html.escape(title)}</title>\n<style>\n{CSS}\n</style>\n</head>\n"
            f"<body>\n{body}\n</body>\n</html>\n")




def terminal_summary(ws: Workspace) -> str:
    """The by-steps table (headline metric and GFLOPs per step count) of each dataset, as
    markdown text for the end of ``spheregen run``."""
    df = over_seeds(ws, read_results(ws))
    parts = []
    for dataset, part in by_dataset(ws, df):
        table = steps_rows(part, headline(ws, part))
        if table is not None:
            header, rows = table
            parts.append(f"{dataset}:\n" + _md_table(header, rows))
    return "\n\n".join(parts)


def readme_markers(ws: Workspace) -> tuple[str, str]:
    return (f"<!-- spheregen report {ws.exp.name}: generated from reports/{ws.exp.name}/, do not edit -->",
            f"<!-- spheregen report {ws.exp.name}: end -->")


def readme_block(ws: Workspace) -> str:
    """The tables a README shows of this experiment, from its results files alone, per
    dataset: the by-steps table of the headline metric with GFLOPs (mean ± std over
    seeds), one by-steps table of each other metric column that says which way is
    better, the best-guidance choices; then the tokenizer table."""
    df = over_seeds(ws, read_results(ws))
    parts = []
    for dataset, part in by_dataset(ws, df):
        head = headline(ws, part)
        if head is not None:
            parts.append(_md_table(*steps_rows(part, head)))
        for col in metric_columns(ws, part.columns):
            if col.better is not None and col is not head:
                parts.append(_md_table(*steps_rows(part, col, with_gflops=False)))
        g = read_guidance(ws, part)
        if g is not None and head is not None:
            parts.append(_md_table(*guidance_table(head, g, part, head.label)))
    toks = read_tokenizers(ws.paths.report)
    if toks is not None and len(toks):
        parts.append(_md_table(*tokenizer_rows(ws, toks)))
    return "\n\n".join(parts)


def update_readme(ws: Workspace, readme: Path) -> Path:
    """Replace the text between the experiment's markers in ``readme`` by
    :func:`readme_block` (the markers must be there: the README says where tables go)."""
    begin, end = readme_markers(ws)
    text = readme.read_text(encoding="utf-8")
    if begin not in text or end not in text or text.index(begin) > text.index(end):
        raise SpheregenError(f"{readme}: no block to fill; put the two lines\n{begin}\n{end}\nwhere the tables of "
                             f"'{ws.exp.name}' go")
    head, rest = text.split(begin, 1)
    tail = rest.split(end, 1)[1]
    atomic_write_text(readme, f"{head}{begin}\n{readme_block(ws)}\n{end}{tail}")
    return readme


def build_report(ws: Workspace) -> Path:
    """results.md, index.html, plots and grids from the parquet files and samples alone.

    Returns the path of results.md."""
    out = ws.paths.report
    with DirLock(out, "report folder"):  # one writer of reports/<experiment>/ at a time
        blocks = report_blocks(ws, over_seeds(ws, read_results(ws)), read_tokenizers(out), out)
        atomic_write_text(out / "index.html", to_html(blocks, f"{ws.exp.name}: results", out))
        atomic_write_text(out / "results.tex", to_latex(blocks, f"{ws.exp.name}: results"))
        path = out / "results.md"
        atomic_write_text(path, to_markdown(blocks))
    return path


def _first_per_class(labels: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of n test images, cycling through the classes (so a grid shows each)."""
    order = []
    by_class = {int(c): (labels == c).nonzero().flatten().tolist() for c in labels.unique()}
    rank = 0
    while len(order) < min(n, len(labels)):
        for idx in by_class.values():
            if rank < len(idx) and len(order) < n:
                order.append(idx[rank])
        rank += 1
    return torch.tensor(order, dtype=torch.int64)


def write_edit_grid(ws: Workspace, entry, method, op: str, n: int, **options) -> Path:
    """Run ``method.edit(op, ...)`` on n test images; rows are images. Returns the PNG."""
    from spheregen.data import to_float, to_uint8

    test = ws.data.test
    idx = _first_per_class(test.labels, n)
    device = next(method.parameters()).device
    with torch.no_grad():
        grid = method.edit(op, to_float(test.images[idx]).to(device), test.labels[idx].to(device), **options)
    b, k = grid.shape[:2]
    tiles = to_uint8(grid.flatten(0, 1)).view(b, k, *grid.shape[2:])
    rows = torch.cat([torch.cat(list(r), dim=2) for r in tiles], dim=1).permute(1, 2, 0).numpy()
    img = Image.fromarray(rows[..., 0] if rows.shape[2] == 1 else rows)
    if img.width < 256:
        img = img.resize((img.width * 2, img.height * 2), Image.NEAREST)
    path = ws.paths.report / f"edit_{entry.name}_{op}.png"
    atomic_write(path, lambda p: img.save(p, format="PNG"))
    return path
