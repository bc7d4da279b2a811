"""bf16 training speed of the paper-size models through the streaming data path, on a GPU.

For the CIFAR-size Sphere Encoder (experiments/paper/cifar10.toml's model, 32 px) and the
sphere-latent B model (experiments/paper/sphere_latent_oxford_flowers.toml's DiT-B on
DINOv2-B latents, 256 px) this builds a synthetic on-disk parquet dataset (PNG at 32 px;
JPEG at 320×288 cropped by ADM's center crop to 256 px) and times the same training step
(bf16 autocast, fp32 weights, AdamW, grad clip 1.0, the loss read back every step as the
trainer does) fed by:

* ``memory``: a few batches made once and kept on the device (the upper bound: no data
  cost at all);
* ``stream``: the trainer's own path (``spheregen.runner.train_batches``): ``DataLoader``
  with ``--workers`` worker processes decoding from the dataset's Arrow memory-map,
  pinned memory, the copy to the device issued a batch ahead on a side stream, uint8
  converted and mirrored on the device;
* for the latent model also ``disk latents``: the frozen tokenizer's latents (both
  flips) extracted once into memory-mapped files (``DiskLatents``, the paper files'
  path) and read ahead by the same loader's workers, against latents kept on the device.

It prints steps/s and images/s per row and the ratio to the ``memory`` row (1.0: the
data path costs nothing). Weights: no download is possible on an offline GPU machine, so
the DINOv2 encoder gets timm's random initialisation saved as a local weights file, the
RAE decoder is a small one fitted for two steps (it is not part of the timed step), and
the Sphere Encoder's perceptual terms are off (LPIPS-VGG weights are not at hand). None
of that changes the cost of what is timed beyond those terms.

    python benchmarks/bench_gpu_stream.py --json out.json          # a CUDA device, ~4 min
    python benchmarks/bench_gpu_stream.py --smoke                  # CPU, tiny sizes: the script runs
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import numpy as np

SE_METHOD = ('{ name = "sphere-encoder", size = "%s", compression_ratio = 1.5, noise_angle = 80.0, '
             'hard_case_prob = 0.1, hard_case_fix = true, mixer_depth = 2, mixer_affine = true, head = "conv", '
             'conditional = true, label_dropout = 0.1, dist_weight = 1.0, perc_weight = 0.0, con_dist_weight = 0.5, '
             'con_perc_weight = 0.0, lat_con_weight = 0.1, pixel_consistency = true, encoder_lr_scale = 0.1 }')
SL_METHOD = """
[methods.method]
name = "sphere-latent"
conditional = true
sphere = "global"
target = "raw"
max_noise = 85.0
max_noise_unit = "angle"
noise_dist = "logit-normal"
noise_mean = 0.4
noise_std = 1.0
sub_noise_max = 0.5
noise_level = "angle"
denoiser = {denoiser}

[methods.method.tokenizer]
name = "rae"
encoder = "dinov2"
dinov2_model = "{dino}"
dinov2_weights = "{weights}"
dinov2_image_size = {dino_size}
decoder_width = 64
decoder_depth = 1
decoder_heads = 2
decoder_steps = 2
batch_size = 16
"""
EXPERIMENT = """name = "gpu-{key}"
seed = 0
[data]
source = {{ name = "parquet", path = "{path}" }}
image_size = {size}
channels = 3
fit = "{fit}"
flip = true
test_fraction = 0.02
[train]
steps = 1000
batch_size = {batch}
num_workers = {workers}
mixed_precision = "{precision}"
cache_latents = "{cache}"
cache_latents_max_gb = 1000.0
[eval]
steps = [1]
num_samples = 10
[[methods]]
name = "{key}"
{method}
"""


def _encode_image(args: tuple[int, int, int, str]) -> bytes:
    """One smooth random image (an upsampled 8×8 noise field, so it compresses like a
    photo rather than like noise) encoded as PNG or JPEG."""
    from PIL import Image

    i, w, h, fmt = args
    low = np.random.default_rng(i).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    img = Image.fromarray(low).resize((w, h), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def make_dataset(folder: Path, n: int, w: int, h: int, fmt: str) -> Path:
    """n images in parquet shards of 2,000 rows (HF's image struct, labels i % 10), made
    once, encoded on every core."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if (folder / "DONE").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor() as pool:
        for shard, start in enumerate(range(0, n, 2000)):
            ids = range(start, min(n, start + 2000))
            blobs = list(pool.map(_encode_image, [(i, w, h, fmt) for i in ids], chunksize=64))
            table = pa.table({"image": [{"bytes": b, "path": None} for b in blobs], "label": [i % 10 for i in ids]})
            pq.write_table(table, folder / f"shard-{shard:04d}.parquet")
    (folder / "DONE").write_text("")
    return folder


def dinov2_weights(root: Path, name: str, size: int) -> Path:
    """timm's random initialisation of ``name`` saved as a local weights file (the GPU
    machine cannot download the pretrained one; the cost of a forward pass is the same)."""
    import timm
    import torch

    path = root / f"{name}-random.pth"
    if not path.exists():
        torch.save(timm.create_model(name, pretrained=False, num_classes=0, img_size=size).state_dict(), path)
    return path


def write_experiment(root: Path, key: str, **fields: Any) -> Path:
    path = root / f"{key}.toml"
    path.write_text(EXPERIMENT.format(key=key, **fields))
    return path


class Stepper:
    """The trainer's optimizer step on one method: autocast, loss, backward, clip 1.0,
    AdamW, zero_grad, and the loss read back (the trainer logs and checks it every step)."""

    def __init__(self, method: Any, device: Any, precision: str, latent: bool):
        import torch

        self.method, self.device, self.latent = method, device, latent
        self.dtype = {"bf16": torch.bfloat16, "no": None}[precision]
        self.params = [p for p in method.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0)

    def __call__(self, x: Any, y: Any) -> float:
        import torch

        with torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            loss, _ = self.method.latent_loss(x, y) if self.latent else self.method.loss(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        value = float(loss.detach())
        if not np.isfinite(value):
            raise SystemExit(f"non-finite loss {value}")
        return value


def timed(step: Stepper, batches: Iterator[tuple[Any, Any]], warmup: int, steps: int) -> float:
    """steps/s over ``steps`` steps after ``warmup`` (the loader's workers are started
    and its prefetch queue filled during the warm-up)."""
    import torch

    for _ in range(warmup):
        step(*next(batches))
    sync = torch.cuda.synchronize if step.device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step(*next(batches))
    sync()
    return steps / (time.perf_counter() - t0)


def loader_rate(batches: Iterator[tuple[Any, Any]], warmup: int, steps: int) -> float:
    """images/s the path delivers to the device with no training step to hide behind."""
    import torch

    for _ in range(warmup):
        next(batches)
    t0, n = time.perf_counter(), 0
    for _ in range(steps):
        x, _ = next(batches)
        n += len(x)
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def cycle(batches: list[tuple[Any, Any]]) -> Iterator[tuple[Any, Any]]:
    while True:
        yield from batches


def stream(t: dict[str, Any], start: int, end: int, cache: Any = None) -> Iterator[tuple[Any, Any]]:
    """The trainer's own data path (spheregen.runner.train_batches): images decoded by the
    loader's workers, or a disk latent cache read by them; pinned, copied ahead on CUDA."""
    from spheregen.runner import train_batches

    return train_batches(t["examples"], cache, t["batch"], 0, 1, 0, True, start, end, t["workers"], t["device"])


def bench_model(root: Path, key: str, exp_path: Path, args: argparse.Namespace, batch: int,
                rows_of: list[str]) -> list[dict[str, Any]]:
    """The rows of one model: "images" (memory vs stream) and/or "latents" (memory vs
    disk cache; the model's frozen tokenizer is fitted first)."""
    import torch

    from spheregen.experiment import load_experiment
    from spheregen.latent_cache import DiskLatents, identity
    from spheregen.workspace import Workspace

    device = torch.device(args.device)
    runs = root / "runs"
    if "latents" in rows_of:  # the fit stage (the RAE's statistics and its small decoder), as `spheregen run` does first
        subprocess.run([sys.executable, "-m", "spheregen.cli", "fit", str(exp_path), "--runs-dir", str(runs)],
                       check=True, cwd=Path(__file__).resolve().parents[1])
    ws = Workspace(load_experiment(exp_path), runs, root / "reports")
    entry = ws.exp.methods[0]
    examples = ws.data.examples("train")
    torch.manual_seed(0)
    method = ws.build_method(entry, device).to(device).train()  # the trainer's prepare() moves it too
    params = sum(p.numel() for p in method.parameters() if p.requires_grad)
    t = {"examples": examples, "batch": batch, "workers": args.workers, "device": device}
    total = args.warmup + args.steps
    rows: list[dict[str, Any]] = []

    def row(name: str, rate: float, base: float | None, extra: dict[str, Any] | None = None) -> None:
        rows.append({"model": key, "path": name, "batch": batch, "trained_params_M": params / 1e6,
                     "steps_per_s": rate, "images_per_s": rate * batch,
                     "ratio_to_memory": rate / base if base else 1.0, **(extra or {})})
        print(f"  {key:10s} {name:34s} {rate:7.3f} steps/s {rate * batch:9.1f} img/s"
              f"{'' if base is None else f'   ratio {rate / base:.3f}'}", flush=True)

    if "images" in rows_of:  # a few real batches held on the device, then the streaming loader
        held = [b for _, b in zip(range(4), stream(t, 0, 4))]
        step = Stepper(method, device, args.precision, latent=False)
        mem = timed(step, cycle(held), args.warmup, args.steps)
        row("images, memory", mem, None)
        row(f"images, stream ({args.workers} workers)", timed(step, stream(t, 4, 4 + total), args.warmup,
                                                              args.steps), mem)
        rate = loader_rate(stream(t, 0, total), args.warmup, args.steps)
        print(f"  {key:10s} the loader alone (no step): {rate:,.0f} images/s", flush=True)
    if "latents" in rows_of:
        key_ = identity(method, entry.method.config.tokenizer, ws.data.key, True)
        t0 = time.perf_counter()
        cache = DiskLatents.open(method, examples, True, device, ws.paths.cache / "latents" / key_,
                                 progress=False, workers=args.workers)
        extract = len(examples) / (time.perf_counter() - t0)
        print(f"  {key:10s} latent extraction to disk (both flips): {extract:,.0f} images/s", flush=True)
        lstep = Stepper(method, device, args.precision, latent=True)
        zs = [b for _, b in zip(range(4), stream(t, 0, 4, cache))]
        lmem = timed(lstep, cycle(zs), args.warmup, args.steps)
        row("latents, memory", lmem, None, {"extract_images_per_s": extract})
        row(f"latents, disk ({args.workers} workers)", timed(lstep, stream(t, 4, 4 + total, cache),
                                                             args.warmup, args.steps), lmem)
    del method
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", default=os.path.join(tempfile.gettempdir(), "spheregen-gpu-stream"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--precision", default="bf16", choices=["bf16", "no"])
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--models", nargs="+", default=["se-cifar", "sl-b"], choices=["se-cifar", "sl-b"])
    ap.add_argument("--se-batch", type=int, default=128)
    ap.add_argument("--sl-batch", type=int, default=256)
    ap.add_argument("--sl-rows", nargs="+", default=["images", "latents"], choices=["images", "latents"],
                    help="which of the latent model's row pairs to time")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU, fp32, tiny models and datasets: checks the script, measures nothing")
    ap.add_argument("--json", help="write the rows here too")
    args = ap.parse_args()
    if args.smoke:
        args.device, args.precision, args.workers, args.steps, args.warmup = "cpu", "no", 2, 2, 1
        args.se_batch, args.sl_batch = 8, 8
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    os.environ.update(HF_HUB_OFFLINE="1", HF_HOME=str(root / "hf-home"))
    import torch

    cuda = torch.cuda.is_available() and args.device == "cuda"
    if args.device == "cuda" and not cuda:
        raise SystemExit("no CUDA device: run on a GPU machine, or --smoke to check the script on a CPU")
    print(f"spheregen GPU streaming benchmark: torch {torch.__version__}, "
          f"{torch.cuda.get_device_name() if cuda else 'cpu'}, {args.precision}, {args.workers} loader workers, "
          f"{os.cpu_count()} CPU cores; {args.warmup} warm-up + {args.steps} timed steps per row", flush=True)
    rows: list[dict[str, Any]] = []
    small = args.smoke
    if "se-cifar" in args.models:
        t0 = time.perf_counter()
        folder = make_dataset(root / "png32", 2000 if small else 10000, 32, 32, "PNG")
        print(f"  dataset png32 ready ({time.perf_counter() - t0:.0f} s)", flush=True)
        exp = write_experiment(root, "se-cifar", path=folder, size=32, fit="resize-crop", batch=args.se_batch,
                               workers=args.workers, precision=args.precision, cache="off",
                               method=f"method = {SE_METHOD % ('tiny' if small else 'base')}")
        rows += bench_model(root, "se-cifar", exp, args, args.se_batch, ["images"])
    if "sl-b" in args.models:
        t0 = time.perf_counter()
        size, src = (56, (70, 64)) if small else (256, (320, 288))
        folder = make_dataset(root / f"jpeg{size}", 600 if small else 6000, *src, "JPEG")
        dino, dino_size = ("vit_small_patch14_reg4_dinov2", 56) if small else ("vit_base_patch14_reg4_dinov2", 224)
        weights = dinov2_weights(root, dino, dino_size)
        print(f"  dataset jpeg{size} and random {dino} weights ready ({time.perf_counter() - t0:.0f} s)", flush=True)
        denoiser = ('{ name = "dit", width = 64, depth = 1, heads = 2, patch_size = 1 }' if small
                    else '{ name = "dit", size = "B", patch_size = 1 }')
        exp = write_experiment(root, "sl-b", path=folder, size=size, fit="adm-center-crop", batch=args.sl_batch,
                               workers=args.workers, precision=args.precision, cache="off",
                               method=SL_METHOD.format(denoiser=denoiser, dino=dino, weights=weights,
                                                       dino_size=dino_size))
        rows += bench_model(root, "sl-b", exp, args, args.sl_batch, args.sl_rows)
    print("\n| model | path | batch | steps/s | img/s | vs memory |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['path']} | {r['batch']} | {r['steps_per_s']:.3f} | {r['images_per_s']:,.0f} | "
              f"{r['ratio_to_memory']:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
