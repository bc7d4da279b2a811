"""Memory and loader speed of the streaming data path, at two dataset sizes.

Builds synthetic on-disk parquet datasets (64 px RGB PNGs, 10 classes; 5,000 and 80,000
images by default, made once under --root), then prints in one run:

1. peak RSS (``/usr/bin/time -v``, maximum resident set) of ``spheregen train`` for a
   few steps of a tiny flow-matching model on each size, the growth between the two
   sizes, and that growth as a share of the extra raw bytes (N × 64 × 64 × 3);
2. the same for the in-memory path (the whole training split decoded into one uint8
   tensor, as evaluation's reference and build-time tokenizer fitting read it);
3. DataLoader images/s over the streamed split with 0 and 2 worker processes, against
   indexing an in-memory tensor;
4. training steps/s of the same tiny model fed by the 2-worker loader against the same
   steps on in-memory batches (the loader keeps up when the ratio is near 1);
5. latent extraction to disk (spheregen.latent_cache.DiskLatents) images/s through the loader.

    python benchmarks/bench_scale.py                   # 5k and 80k images, about 10 minutes
    python benchmarks/bench_scale.py --sizes 2000 20000 --steps 10   # quicker
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

IMAGE = 64
CLASSES = 10
EXPERIMENT = """name = "scale-{n}"
seed = 0
[data]
source = {{ name = "parquet", path = "{path}" }}
image_size = {size}
channels = 3
test_fraction = 0.02
[train]
steps = {steps}
batch_size = 64
num_workers = {workers}
checkpoint_minutes = 0.0
log_every = 5
[eval]
steps = [1]
num_samples = 10
batch_size = 10
throughput_batch = 4
[[methods]]
name = "fm"
method = {{ name = "flow-matching", tokenizer = {{ name = "patch", patch_size = 1 }}, denoiser = {{ name = "dit", width = 64, depth = 2, heads = 2, patch_size = 8 }} }}
"""


def make_dataset(root: Path, n: int) -> Path:
    """n 64-px RGB PNGs (smooth random blobs, so they compress like photos, not noise)
    in parquet shards of 5,000 rows, labels i % 10; made once."""
    import polars as pl
    from PIL import Image

    folder = root / f"parquet-{n}"
    done = folder / "DONE"
    if done.exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(n)
    for shard, start in enumerate(range(0, n, 5000)):
        rows = []
        for i in range(start, min(n, start + 5000)):
            low = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            img = Image.fromarray(low).resize((IMAGE, IMAGE), Image.BILINEAR)
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            rows.append({"image": {"bytes": buf.getvalue(), "path": None}, "label": i % CLASSES})
        pl.DataFrame(rows).write_parquet(folder / f"shard-{shard:04d}.parquet")
        print(f"  made {min(n, start + 5000):,} / {n:,} images", file=sys.stderr)
    done.write_text("")
    return folder


def peak_rss_mb(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(maximum resident set in MB, wall seconds) of a command under /usr/bin/time -v."""
    t0 = time.perf_counter()
    out = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"command failed ({out.returncode}): {' '.join(cmd)}\n{out.stderr[-3000:]}")
    kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", out.stderr).group(1))
    return kb / 1024, wall


def train_rss(root: Path, folder: Path, n: int, steps: int, workers: int, env: dict[str, str]) -> tuple[float, float]:
    exp = root / f"scale-{n}.toml"
    exp.write_text(EXPERIMENT.format(n=n, path=folder, size=IMAGE, steps=steps, workers=workers))
    runs = Path(tempfile.mkdtemp(dir=root, prefix="runs-"))
    return peak_rss_mb([sys.executable, "-m", "spheregen.cli", "train", str(exp), "--runs-dir", str(runs),
                        "--threads", "1"], env)


IN_MEMORY = """
import sys
from spheregen.experiment import load_experiment
from spheregen.workspace import Workspace
ws = Workspace(load_experiment(sys.argv[1]), sys.argv[2], sys.argv[2] + "-reports")
print(ws.data.train.images.shape)
"""


def in_memory_rss(root: Path, n: int, env: dict[str, str]) -> tuple[float, float]:
    runs = Path(tempfile.mkdtemp(dir=root, prefix="mem-"))
    return peak_rss_mb([sys.executable, "-c", IN_MEMORY, str(root / f"scale-{n}.toml"), str(runs)], env)


def loader_rates(exp_path: Path, batches: int) -> dict[str, float]:
    """images/s of the streamed split through a DataLoader (0 and 2 workers) and of
    indexing the same images held in memory."""
    import torch
    from torch.utils.data import DataLoader

    from spheregen.data import collate
    from spheregen.experiment import load_experiment
    from spheregen.runner import StepSampler
    from spheregen.workspace import Workspace

    ws = Workspace(load_experiment(exp_path), tempfile.mkdtemp(), tempfile.mkdtemp())
    examples = ws.data.examples("train")
    out = {}
    for workers in (0, 2):
        sampler = StepSampler(len(examples), 64, 0, 1, 0, 0, batches)
        loader = DataLoader(examples, batch_sampler=sampler, num_workers=workers, collate_fn=collate,
                            generator=torch.Generator(), prefetch_factor=4 if workers else None)
        it = iter(loader)
        next(it)  # workers started
        t0 = time.perf_counter()
        count = sum(len(images) for images, _ in it)
        out[f"stream, {workers} workers"] = count / (time.perf_counter() - t0)
    held = torch.stack([examples[i][0] for i in range(64 * 8)])
    t0 = time.perf_counter()
    for k in range(batches):
        idx = torch.randint(len(held), (64,))
        _ = held[idx].float()
    out["in-memory tensor"] = 64 * batches / (time.perf_counter() - t0)
    return out


def training_ratio(exp_path: Path, steps: int) -> dict[str, float]:
    """Steps/s of the tiny model fed by the 2-worker loader vs in-memory batches."""
    import torch
    from torch.utils.data import DataLoader

    from spheregen.data import collate, to_float
    from spheregen.experiment import load_experiment
    from spheregen.runner import StepSampler
    from spheregen.workspace import Workspace

    torch.set_num_threads(1)
    ws = Workspace(load_experiment(exp_path), tempfile.mkdtemp(), tempfile.mkdtemp())
    examples = ws.data.examples("train")
    method = ws.build_method(ws.exp.methods[0])
    opt = torch.optim.AdamW(method.parameters(), lr=1e-3)

    def step(images: torch.Tensor, labels: torch.Tensor) -> None:
        loss, _ = method.loss(to_float(images), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    held = [collate([examples[i] for i in range(b * 64, b * 64 + 64)]) for b in range(4)]
    for b in held:  # warm-up
        step(*b)
    t0 = time.perf_counter()
    for k in range(steps):
        step(*held[k % len(held)])
    memory = steps / (time.perf_counter() - t0)
    loader = DataLoader(examples, batch_sampler=StepSampler(len(examples), 64, 0, 1, 0, 0, steps + 1), num_workers=2,
                        collate_fn=collate, generator=torch.Generator(), prefetch_factor=4)
    it = iter(loader)
    step(*next(it))
    t0 = time.perf_counter()
    for images, labels in it:
        step(images, labels)
    stream = steps / (time.perf_counter() - t0)
    return {"in-memory batches steps/s": memory, "2-worker loader steps/s": stream, "ratio": stream / memory}


def latent_rate(exp_path: Path, limit: int) -> float:
    """images/s of encoding the split through a frozen tokenizer via the loader path."""
    import torch

    from spheregen.experiment import load_experiment
    from spheregen.latent_cache import DiskLatents
    from spheregen.workspace import Workspace

    ws = Workspace(load_experiment(exp_path), tempfile.mkdtemp(), tempfile.mkdtemp())
    examples = ws.data.examples("train")
    examples = examples.subset(torch.arange(min(limit, len(examples))))
    method = ws.build_method(ws.exp.methods[0])
    t0 = time.perf_counter()
    DiskLatents.open(method, examples, False, torch.device("cpu"), Path(tempfile.mkdtemp()) / "latents",
                     progress=False, workers=2)
    return len(examples) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", default=os.path.join(tempfile.gettempdir(), "spheregen-scale"))
    ap.add_argument("--sizes", type=int, nargs=2, default=[5000, 80000])
    ap.add_argument("--steps", type=int, default=20, help="training steps of the RSS runs")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", help="write the numbers here too")
    args = ap.parse_args()
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(root / "hf-home")}
    os.environ.update(HF_HUB_OFFLINE="1", HF_HOME=str(root / "hf-home"))  # the in-process rows use the same cache
    small, large = args.sizes
    folders = {n: make_dataset(root, n) for n in (small, large)}
    result: dict[str, object] = {"sizes": [small, large], "image": IMAGE}
    print(f"spheregen scale benchmark: {small:,} and {large:,} images of {IMAGE}×{IMAGE}×3 (parquet, PNG)")
    # one untimed pass first: `datasets` converts the parquet to its Arrow cache once
    for n in (small, large):
        train_rss(root, folders[n], n, 1, 0, env)
    rss = {n: train_rss(root, folders[n], n, args.steps, args.workers, env) for n in (small, large)}
    mem = {n: in_memory_rss(root, n, env) for n in (small, large)}
    extra_raw = (large - small) * IMAGE * IMAGE * 3 / 2**20
    print(f"\nextra raw bytes between the sizes: {extra_raw:,.0f} MB")
    print("| path | RSS @ {:,} | RSS @ {:,} | growth | growth / extra raw |".format(small, large))
    print("|---|---|---|---|---|")
    for name, d in (("train (streaming, {} workers, {} steps)".format(args.workers, args.steps), rss),
                    ("in-memory split", mem)):
        growth = d[large][0] - d[small][0]
        print(f"| {name} | {d[small][0]:,.0f} MB | {d[large][0]:,.0f} MB | {growth:,.0f} MB | {growth / extra_raw:.1%} |")
        result[name] = {"rss_mb": [d[small][0], d[large][0]], "growth_share": growth / extra_raw}
    exp_large = root / f"scale-{large}.toml"
    rates = loader_rates(exp_large, 60)
    print("\n| loader | images/s |\n|---|---|")
    for k, v in rates.items():
        print(f"| {k} | {v:,.0f} |")
    ratio = training_ratio(exp_large, 40)
    print("\n| tiny flow-matching training (1 thread) | value |\n|---|---|")
    for k, v in ratio.items():
        print(f"| {k} | {v:.3f} |")
    lat = latent_rate(exp_large, 5000)
    print(f"\nlatent extraction to disk through the loader (the method's frozen tokenizer, 2 workers): "
          f"{lat:,.0f} images/s")
    result.update(loader=rates, training=ratio, latent_images_per_s=lat)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
