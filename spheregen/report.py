"""Tables and plots from ``results.parquet`` and the sample files alone.

``reports/<exp>/results.md``: one row per method × steps; ``fid_vs_steps.png``,
``fid_vs_gflops.png``; ``grid_<method>_steps<T>.png``: ``grid_per_class`` samples per class
(rows are classes).
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import polars as pl  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from spheregen.errors import SpheregenError  # noqa: E402
from spheregen.evaluation import load_samples  # noqa: E402
from spheregen.paths import atomic_write, atomic_write_text  # noqa: E402
from spheregen.workspace import Workspace  # noqa: E402

# column -> (header, format); only the columns present are printed
COLUMNS = {
    "method": ("method", "{}"),
    "sampler": ("sampler", "{}"),
    "steps": ("steps", "{}"),
    "nfe": ("NFE", "{}"),
    "fid": ("FID", "{:.2f}"),
    "kid": ("KID×10³", "{:.2f}"),
    "is": ("IS", "{:.2f}"),
    "precision": ("precision", "{:.3f}"),
    "recall": ("recall", "{:.3f}"),
    "gflops_per_image": ("GFLOPs/img", "{:.3f}"),
    "gflops_paper": ("GFLOPs/img (paper conv.)", "{:.3f}"),
    "images_per_s": ("img/s", "{:.1f}"),
    "params": ("params (M)", "{:.2f}"),
    "trainable_params": ("trained params (M)", "{:.2f}"),
}


def read_results(report_dir: Path) -> pl.DataFrame:
    path = report_dir / "results.parquet"
    if not path.is_file():
        raise SpheregenError(f"{path} does not exist: run `spheregen evaluate` for this experiment first")
    return pl.read_parquet(path)


def _cell(col: str, value: object) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if col == "kid":
        value = float(value) * 1e3
    if col in ("params", "trainable_params"):
        value = float(value) / 1e6
    return COLUMNS[col][1].format(value)


def markdown_table(df: pl.DataFrame) -> str:
    cols = [c for c in COLUMNS if c in df.columns]
    header = [COLUMNS[c][0] for c in cols]
    if "fid_features" in df.columns and "fid" in cols:
        feats = sorted({str(f) for f in df["fid_features"].drop_nulls()})
        header[cols.index("fid")] = f"FID[{', '.join(feats)}]"
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(cols)]
    for row in df.sort(["method", "steps"]).iter_rows(named=True):
        lines.append("| " + " | ".join(_cell(c, row[c]) for c in cols) + " |")
    return "\n".join(lines)


def steps_table(df: pl.DataFrame) -> str:
    """Seed 000's layout: one row per method, FID@k and GFLOPs@k side by side."""
    if "fid" not in df.columns:
        return ""
    steps = sorted(df["steps"].unique().to_list())
    header = ["method"] + [f"FID@{k}" for k in steps] + [f"GFLOPs@{k}" for k in steps]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method in df["method"].unique(maintain_order=True).to_list():
        rows = {r["steps"]: r for r in df.filter(pl.col("method") == method).iter_rows(named=True)}
        fids = [_cell("fid", rows[k]["fid"]) if k in rows else "–" for k in steps]
        gfl = [_cell("gflops_per_image", rows[k]["gflops_per_image"]) if k in rows else "–" for k in steps]
        lines.append("| " + " | ".join([method, *fids, *gfl]) + " |")
    return "\n".join(lines)


def results_markdown(ws: Workspace, df: pl.DataFrame) -> str:
    exp = ws.exp
    n = df["num_samples"].max() if "num_samples" in df.columns else "?"
    parts = [
        f"# {exp.name}: results",
        "",
        f"Data: `{df['dataset'][0] if 'dataset' in df.columns else exp.data.source.name}` at "
        f"{exp.data.image_size}×{exp.data.image_size}, {exp.data.channels} channel(s). "
        f"FID and KID on {n} class-balanced samples per row against the {exp.eval.reference} split. "
        "GFLOPs/img counts every network pass of one sampling call (true FLOPs, attention "
        "included; the paper convention is 2×MACs without attention matmuls).",
        "",
        markdown_table(df),
        "",
        "## By step count",
        "",
        steps_table(df),
        "",
        "![FID vs steps](fid_vs_steps.png) ![FID vs GFLOPs](fid_vs_gflops.png)",
        "",
    ]
    if n != "?" and int(n) < 10_000:
        parts.append(f"FID on {n} samples is biased upwards relative to the usual 50k; compare rows "
                     "within this table, not with papers.")
    return "\n".join(parts) + "\n"


def _save_fig(fig: plt.Figure, path: Path) -> None:
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=120, bbox_inches="tight"))
    plt.close(fig)


def plot_fid(df: pl.DataFrame, out: Path) -> list[Path]:
    if "fid" not in df.columns:
        return []
    paths = []
    for x, name, log in (("steps", "fid_vs_steps.png", True), ("gflops_per_image", "fid_vs_gflops.png", True)):
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for method, g in df.sort("steps").group_by("method", maintain_order=True):
            ax.plot(g[x], g["fid"], marker="o", label=method[0])
        ax.set_xscale("log", base=2 if x == "steps" else 10)
        ax.set_xlabel("sampling steps" if x == "steps" else "GFLOPs per image")
        ax.set_ylabel("FID")
        ax.grid(alpha=0.3)
        ax.legend()
        _save_fig(fig, out / name)
        paths.append(out / name)
    return paths


def sample_grid(images: torch.Tensor, labels: torch.Tensor, per_class: int) -> np.ndarray:
    """uint8 H'×W'×C grid: one row per class, ``per_class`` samples each."""
    classes = sorted(set(labels.tolist()))
    rows = []
    for c in classes:
        picked = images[labels == c][:per_class]
        if len(picked) < per_class:
            pad = torch.zeros((per_class - len(picked), *images.shape[1:]), dtype=images.dtype)
            picked = torch.cat([picked, pad])
        rows.append(torch.cat(list(picked), dim=2))  # C×H×(W·k)
    grid = torch.cat(rows, dim=1).permute(1, 2, 0).numpy()
    return grid[..., 0] if grid.shape[2] == 1 else grid


def write_grids(ws: Workspace, df: pl.DataFrame, out: Path) -> list[Path]:
    paths = []
    for method, steps in df.select("method", "steps").unique().sort(["method", "steps"]).iter_rows():
        images, labels = load_samples(ws.paths.samples(method, steps))
        grid = sample_grid(images, labels, ws.exp.eval.grid_per_class)
        path = out / f"grid_{method}_steps{steps}.png"
        img = Image.fromarray(grid)
        if img.width < 256:  # small digits are unreadable at 1:1
            img = img.resize((img.width * 2, img.height * 2), Image.NEAREST)
        atomic_write(path, lambda p: img.save(p, format="PNG"))
        paths.append(path)
    return paths


def build_report(ws: Workspace) -> Path:
    out = ws.paths.report
    df = read_results(out)
    plot_fid(df, out)
    write_grids(ws, df, out)
    path = out / "results.md"
    atomic_write_text(path, results_markdown(ws, df))
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
