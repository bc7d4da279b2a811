"""Sampling speed against the sampling batch size on a CPU (``[eval] batch_size``).

Samples the tiny Sphere Encoder (SPEC D, the weights of bench_sphere_encoder.build) with
its sampler at T steps and guidance w (``combo``, cached noise: the quickstart's
sampler), at each batch size in turn, the rounds interleaving the sizes. Per batch size
it prints the median images/s, the minor page faults per image and the share of the wall
time spent in the kernel (``getrusage``), and the rate relative to the default batch
(250). Why: buffers larger than glibc's mmap threshold (at most 32 MB) are mapped afresh
at every allocation and zeroed page by page by the kernel, so a sampler whose networks see
the whole batch slows down past some batch size; spheregen.guidance.guided therefore runs
the samplers' network evaluations CPU_MICRO_BATCH samples at a time on a CPU, and this
script shows that the rate no longer depends much on the batch (benchmarks/README.md has
the numbers before and after).

    python benchmarks/bench_sample_batch.py                        # 1 thread, batches 25 50 100 250, T = 4, w = 2 (~2.5 min)
    python benchmarks/bench_sample_batch.py --threads 2 --batches 50 250 500 --steps 1
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time

import torch

from bench_sphere_encoder import build  # the scripts' folder is on sys.path
from spheregen_plugins.sphere_encoder.config import SphereSamplerConfig
from spheregen_plugins.sphere_encoder.sampler import SphereSampler

DEFAULT_BATCH = 250  # EvalConfig.batch_size


def one_round(sampler: SphereSampler, method: torch.nn.Module, batch: int, images: int, steps: int,
              guidance: float) -> tuple[float, float, float]:
    """Samples ``images`` (rounded up to whole batches) -> (images/s, minor faults per
    image, kernel share of the wall time)."""
    labels = torch.arange(batch) % 10
    before, start, done = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter(), 0
    while done < images:
        sampler.sample(method, labels, steps, guidance, generator=torch.Generator().manual_seed(done))
        done += batch
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    return done / wall, (after.ru_minflt - before.ru_minflt) / done, (after.ru_stime - before.ru_stime) / wall


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batches", type=int, nargs="+", default=[25, 50, 100, DEFAULT_BATCH])
    ap.add_argument("--images", type=int, default=500, help="images per batch size and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--guidance", type=float, default=2.0)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    method = build().eval()
    sampler = SphereSampler(SphereSamplerConfig(cfg_position="combo", cache_noise=True))
    results: dict[int, list[tuple[float, float, float]]] = {b: [] for b in args.batches}
    with torch.no_grad():
        for b in args.batches:  # warm-up: the first call of a size maps its buffers once
            sampler.sample(method, torch.arange(b) % 10, args.steps, args.guidance, generator=torch.Generator())
        for _ in range(args.rounds):
            for b in args.batches:
                results[b].append(one_round(sampler, method, b, args.images, args.steps, args.guidance))
    rate = {b: statistics.median(r[0] for r in rows) for b, rows in results.items()}
    base = rate.get(DEFAULT_BATCH)
    print(f"tiny Sphere Encoder sampling, T={args.steps}, w={args.guidance:g}, {args.threads} thread(s), "
          f"torch {torch.__version__}; medians over {args.rounds} rounds of {args.images} images")
    print(f"{'batch':>6} {'img/s':>8} {'faults/img':>11} {'kernel %':>9} {'vs ' + str(DEFAULT_BATCH):>8}")
    for b, rows in results.items():
        faults = statistics.median(r[1] for r in rows)
        kernel = statistics.median(r[2] for r in rows)
        rel = f"{rate[b] / base:8.2f}" if base else f"{'-':>8}"
        print(f"{b:6d} {rate[b]:8.1f} {faults:11.0f} {100 * kernel:9.0f} {rel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
