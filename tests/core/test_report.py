"""The report from results.parquet, tokenizers.parquet and sample files alone: no weights,
no dataset. Results are hand-made, so every number in the tables is known."""

import base64
import io
import re
import shutil
import subprocess

import numpy as np
import polars as pl
import pytest
import torch
from PIL import Image

from spheregen.errors import SpheregenError
from spheregen.samples import save_samples
from spheregen.experiment import load_experiment
from spheregen.interfaces import Column
from spheregen.report import build_report, pareto_front
from spheregen.results import eval_hash
from spheregen.workspace import Workspace

METHODS = '[[methods]]\nname = "ae-a"\nmethod = "toy-ae"\n[[methods]]\nname = "ae-b"\nmethod = "toy-ae"\n'
ROWS = [  # method, steps, fid, gflops, cmmd, latency_b1_s, peak_memory_mb
    ("ae-a", 1, 50.0, 1.0, 0.5, 0.0123, 100.0),
    ("ae-a", 2, 30.0, 2.0, 0.4, 0.0246, 100.0),
    ("ae-b", 1, 40.0, 1.5, None, 0.02, 120.5),
    ("ae-b", 2, 35.0, 3.0, float("nan"), 0.04, 120.5),
]
PLOTS = ("fid_vs_steps.png", "fid_vs_gflops.png", "tokenizers.png")
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome", "headless_shell")


def _results() -> pl.DataFrame:
    cols = ("method", "steps", "fid", "gflops_per_image", "cmmd", "latency_b1_s", "peak_memory_mb")
    df = pl.DataFrame([dict(zip(cols, r)) for r in ROWS], schema_overrides={"cmmd": pl.Float64})
    return df.with_columns(dataset=pl.lit("digits"), num_samples=pl.lit(40), fid_features=pl.lit("toy"))


def _tokenizers() -> pl.DataFrame:
    return pl.DataFrame({
        "tokenizer": ["patch", "rae"], "methods": ["ae-a,ae-b", "ae-b"], "config_hash": ["h1", "h2"],
        "rfid": [None, 3.25], "psnr": [21.5, 18.0], "num_images": [40, 40], "features": [None, "toy"],
    }, schema_overrides={"rfid": pl.Float64})


def _stamped(ws, df: pl.DataFrame) -> pl.DataFrame:
    """Hand-made rows that claim the current config (as evaluate would record it)."""
    hashes = {m.name: eval_hash(ws, m) for m in ws.exp.methods}
    return df.with_columns(eval_hash=pl.col("method").replace_strict(hashes))


@pytest.fixture
def ws(toy_registries, tiny_experiment, tmp_path):
    """A workspace whose report dir holds both parquet files and whose runs hold samples only."""
    ws = Workspace(load_experiment(tiny_experiment(methods=METHODS)), tmp_path / "runs", tmp_path / "reports",
                   torch.device("cpu"))
    ws.paths.report.mkdir(parents=True)
    _stamped(ws, _results()).write_parquet(ws.paths.report / "results.parquet")
    _tokenizers().write_parquet(ws.paths.report / "tokenizers.parquet")
    gen = torch.Generator().manual_seed(0)
    for method, steps, *_ in ROWS:
        images = torch.randint(0, 256, (40, 1, 8, 8), generator=gen, dtype=torch.uint8)
        save_samples(ws.paths.samples(method, steps), images, torch.arange(40) % 10, {"method": method})
    return ws


def _embedded(page: str) -> list[str]:
    return re.findall(r'src="data:image/png;base64,([^"]+)"', page)


def test_markdown_tables(ws):
    md = build_report(ws).read_text()
    assert "## Dataset: digits" in md
    assert "| method | steps | FID[toy] | CMMD | GFLOPs/img | latency b=1 (ms) | peak mem (MB) |" in md
    # the best value of each column that declares a direction is bold
    assert "| ae-a | 1 | 50.00 | 0.500 | **1.000** | **12.3** | **100.0** |" in md
    assert "| ae-a | 2 | **30.00** | **0.400** | 2.000 | 24.6 | **100.0** |" in md
    assert "| ae-b | 1 | 40.00 | – | 1.500 | 20.0 | 120.5 |" in md  # null
    assert "| ae-b | 2 | 35.00 | – | 3.000 | 40.0 | 120.5 |" in md  # NaN
    assert "| method | FID@1 | FID@2 | GFLOPs@1 | GFLOPs@2 |" in md
    assert "| ae-a | 50.00 | **30.00** | **1.000** | **2.000** |" in md and "| ae-b | **40.00** | 35.00 |" in md
    assert "## Tokenizers: reconstruction" in md
    assert "| tokenizer | used by | rFID[toy] | PSNR (dB) | images |" in md
    assert "| patch | ae-a, ae-b | – | **21.50** | 40 |" in md and "| rae | ae-b | 3.25 | 18.00 | 40 |" in md
    for name in (*PLOTS, "grid_ae-a_steps1.png", "grid_ae-b_steps2.png"):
        assert (ws.paths.report / name).is_file() and f"]({name})" in md, name


def test_html_is_self_contained(ws):
    build_report(ws)
    page = (ws.paths.report / "index.html").read_text()
    assert page.count("<table>") == 3 and "<h2>Dataset: digits</h2>" in page and "<td>50.00</td>" in page
    assert not [s for s in re.findall(r'src="([^"]*)"', page) if not s.startswith("data:")]
    assert "href=" not in page
    images = _embedded(page)
    assert len(images) == len(PLOTS) + len(ROWS)  # plots + one grid per method × steps
    for data in images:
        with Image.open(io.BytesIO(base64.b64decode(data))) as img:
            img.verify()
    for method in ("ae-a", "ae-b"):
        assert f"<h3>{method}</h3>" in page


def test_without_tokenizers_file(ws):
    (ws.paths.report / "tokenizers.parquet").unlink()
    md = build_report(ws).read_text()
    assert "Tokenizers" not in md and not (ws.paths.report / "tokenizers.png").exists()
    assert len(_embedded((ws.paths.report / "index.html").read_text())) == len(PLOTS) - 1 + len(ROWS)


def test_rebuilt_from_the_parquet_files_alone(ws):
    first = build_report(ws).read_text()
    for path in ws.paths.report.iterdir():
        if path.suffix != ".parquet":
            path.unlink()
    assert build_report(ws).read_text() == first
    assert (ws.paths.report / "index.html").is_file() and (ws.paths.report / "fid_vs_gflops.png").is_file()
    assert "data" not in ws.__dict__  # the dataset was never built


def test_grids_of_step_counts_no_longer_run_are_removed(ws):
    stale = ws.paths.report / "grid_ae-a_steps99.png"
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_bytes(b"old")
    others = [ws.paths.report / name for name in ("notes.png", "grid_ae-a_steps2_annotated.png")]
    for other in others:  # not the report's: left alone
        other.write_bytes(b"mine")
    build_report(ws)
    assert not stale.exists() and all(other.exists() for other in others)
    for other in others:
        other.unlink()
    assert sorted(p.name for p in ws.paths.report.glob("grid_*.png")) == sorted(
        f"grid_{method}_steps{steps}.png" for method, steps, *_ in ROWS)


def test_missing_sample_file_names_it(ws):
    missing = ws.paths.samples("ae-b", 2)
    missing.unlink()
    with pytest.raises(SpheregenError, match=r"steps-2\.npz.*spheregen sample"):
        build_report(ws)


def test_pareto_front():
    df = pl.DataFrame({
        "method": ["a", "a", "a", "b", "b", "b", "c", "c", "d"],
        "gflops_per_image": [1.0, 2.0, 4.0, 1.5, 3.0, 8.0, 2.0, 0.5, 0.1],
        "fid": [50.0, 30.0, 20.0, 40.0, 35.0, 10.0, 31.0, None, float("nan")],
    })
    fid = Column(key="fid", label="FID", better="lower")
    front = pareto_front(df, fid)
    assert front["gflops_per_image"].to_list() == [1.0, 1.5, 2.0, 4.0, 8.0]
    assert front["fid"].to_list() == [50.0, 40.0, 30.0, 20.0, 10.0]
    assert front["method"].to_list() == ["a", "b", "a", "a", "b"]
    assert len(pareto_front(df.drop("fid"), fid)) == 0
    # a higher-is-better headline: the same front on the negated values
    negated = df.with_columns(score=-pl.col("fid"))
    front = pareto_front(negated, Column(key="score", label="score", better="higher"))
    assert front["score"].to_list() == [-50.0, -40.0, -30.0, -20.0, -10.0]


def test_screenshot_in_headless_browser(ws, tmp_path):
    browser = next((b for b in map(shutil.which, BROWSERS) if b), None)
    if browser is None:
        pytest.skip(f"no headless browser on PATH (looked for {', '.join(BROWSERS)})")
    build_report(ws)
    shot = tmp_path / "shot.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                    "--window-size=1280,2000", (ws.paths.report / "index.html").resolve().as_uri()],
                   check=False, timeout=60, capture_output=True, cwd=tmp_path)
    assert shot.is_file(), "the browser wrote no screenshot"
    with Image.open(shot) as img:
        pixels = np.asarray(img.convert("RGB"))
    assert pixels.reshape(-1, 3).std(axis=0).max() > 0, "the screenshot is one flat colour"


def test_one_section_per_dataset(ws):
    df = _results().with_columns(dataset=pl.when(pl.col("method") == "ae-a").then(pl.lit("digits"))
                                 .otherwise(pl.lit("hf:ylecun/mnist")))
    _stamped(ws, df).write_parquet(ws.paths.report / "results.parquet")
    md = build_report(ws).read_text()
    digits, mnist = md.split("## Dataset: hf:ylecun/mnist")
    assert "## Dataset: digits" in digits and "| ae-a | 1 | 50.00 |" in digits and "| ae-b |" not in digits
    assert "| ae-b | 1 | 40.00 |" in mnist.split("## Tokenizers")[0]
    for name in ("fid_vs_gflops_digits.png", "fid_vs_gflops_hf-ylecun-mnist.png"):
        assert (ws.paths.report / name).is_file() and f"]({name})" in md


def test_speed_note_names_the_setup_and_warns_on_mixed_setups():
    from spheregen.report import speed_note

    one = pl.DataFrame({"device": ["cpu", "cpu"], "torch_threads": [1, 1]})
    assert speed_note(one) == "img/s and latency measured on cpu, 1 thread(s)."
    mixed = pl.DataFrame({"device": ["cpu", "cpu"], "torch_threads": [1, 2]})
    assert "different setups" in speed_note(mixed) and "2 thread(s)" in speed_note(mixed)
    assert speed_note(pl.DataFrame({"method": ["a"]})) == ""


def test_a_plugin_metrics_columns_reach_the_report(ws, toy_registries):
    """Columns come from what registered metrics declare: the toy plugin's ``toy-score``
    declares its column, ``toy-raw`` declares nothing and is shown by its keys as-is."""
    df = pl.read_parquet(ws.paths.report / "results.parquet")
    df.with_columns(toy_score=pl.lit(0.123456), toy_raw=pl.lit(7.0), toy_hidden=pl.lit(1.0)).write_parquet(
        ws.paths.report / "results.parquet")
    md = build_report(ws).read_text()
    assert "| method | steps | FID[toy] | CMMD | toy score ↑ | toy_raw | GFLOPs/img |" in md
    assert "| ae-a | 1 | 50.00 | 0.500 | 123.5 | 7 | **1.000** |" in md
    page = (ws.paths.report / "index.html").read_text()
    assert "<th>toy score ↑</th>" in page and "<td>123.5</td>" in page and "<th>toy_raw</th>" in page
    assert "toy_hidden" not in md  # a declaring metric's undeclared key stays in the parquet


def test_a_plugin_metric_runs_end_to_end(toy_registries, tiny_experiment, tmp_path):
    """run -> results.parquet -> results.md / index.html with plugin metrics alone."""
    from spheregen.cli import main

    exp = tiny_experiment('metrics = ["toy-score", "toy-raw"]')
    assert main(["run", str(exp), "--runs-dir", str(tmp_path / "runs"), "--reports-dir", str(tmp_path / "reports")]) == 0
    report = tmp_path / "reports" / "tiny"
    df = pl.read_parquet(report / "results.parquet")
    assert {"toy_score", "toy_hidden", "toy_raw"} <= set(df.columns) and df["toy_raw"].to_list() == [40.0, 40.0]
    md, page = (report / "results.md").read_text(), (report / "index.html").read_text()
    assert "| NFE | toy score ↑ | toy_raw | GFLOPs/img |" in md and "<th>toy score ↑</th>" in page
    assert "| 40 |" in md and "<td>40</td>" in page


def test_latex_pdf_and_best_values(ws):
    build_report(ws)
    tex = (ws.paths.report / "results.tex").read_text()
    assert r"\toprule" in tex and r"\bottomrule" in tex and r"\textbf{30.00}" in tex
    assert r"FID[toy]" in tex and r"GFLOPs/img" in tex and r"\caption{By step count}" in tex
    for plot in PLOTS:
        assert (ws.paths.report / plot).with_suffix(".pdf").read_bytes()[:4] == b"%PDF"


def test_fid_against_speed_is_plotted_when_timed(ws):
    df = pl.read_parquet(ws.paths.report / "results.parquet")
    df.with_columns(images_per_s=pl.Series([100.0, 50.0, 80.0, 40.0]), nfe=pl.Series([1, 2, 2, 4])) \
        .write_parquet(ws.paths.report / "results.parquet")
    md = build_report(ws).read_text()
    assert "fid_vs_images_per_s.png" in md and (ws.paths.report / "fid_vs_images_per_s.pdf").is_file()


def test_grids_show_a_bounded_labelled_set_of_classes(ws):
    from spheregen.report import grid_classes

    labels = torch.arange(1000) % 1000
    assert grid_classes(labels, 10) == [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
    assert grid_classes(labels, (5, 7, 2000)) == [5, 7]
    assert grid_classes(torch.arange(4), 10) == [0, 1, 2, 3]
    ws.exp = __import__("attrs").evolve(ws.exp, eval=__import__("attrs").evolve(ws.exp.eval, grid_classes=3))
    build_report(ws)
    with Image.open(ws.paths.report / "grid_ae-a_steps1.png") as img:
        # 3 rows of 8×8 digits, upscaled ×4 to reach 256 px wide (8 per row), plus a label margin
        assert img.height == 3 * 8 * 4 and img.width > 8 * 8 * 4


def test_an_ablation_names_what_differs(toy_registries, tiny_experiment, tmp_path):
    from spheregen.report import config_differences

    methods = METHODS.replace('name = "ae-b"\nmethod = "toy-ae"\n',
                              'name = "ae-b"\nmethod = { name = "toy-ae", channels = 4 }\nguidance = 2.0\n')
    ws = Workspace(load_experiment(tiny_experiment(methods=methods)), tmp_path / "r", tmp_path / "p")
    keys, rows = config_differences(ws, ["ae-a", "ae-b"])
    assert keys == ["guidance", "method.channels"]
    assert rows == [["ae-a", "1.0", "8"], ["ae-b", "2.0", "4"]]


def test_training_curves_come_from_the_logs(toy_registries, tiny_experiment, tmp_path):
    from spheregen.cli import main

    exp = tiny_experiment()
    assert main(["run", str(exp), "--runs-dir", str(tmp_path / "runs"), "--reports-dir", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "tiny" / "results.md").read_text()
    assert "## Training" in md and (tmp_path / "rep" / "tiny" / "training_loss.png").is_file()


def test_the_report_module_needs_neither_the_runner_nor_accelerate():
    import subprocess
    import sys

    code = ("import sys, spheregen.report, spheregen.cli; "
            "print([m for m in ('accelerate', 'spheregen.runner', 'spheregen.evaluation') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_a_shared_tokenizer_lists_its_users_in_the_experiments_order():
    """Jobs of `run --jobs` write their rows in the order they finish; the "used by" column
    must not depend on it."""
    from spheregen.results import _tokenizer_frame

    row = {"config_hash": "abc", "psnr": 27.0}
    rows = [{**row, "methods": "meanflow"}, {**row, "methods": "fm-latent, sphere-latent"}]
    frame = _tokenizer_frame(rows, ["sphere-latent", "fm-latent", "meanflow"])
    assert frame["methods"].to_list() == ["sphere-latent, fm-latent, meanflow"]
