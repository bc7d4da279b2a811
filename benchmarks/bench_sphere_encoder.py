"""Sphere Encoder (tiny config, SPEC D) speed on this machine, against a matmul peak
measured in the same run.

Prints, by default for the tiny model at batch 64 in fp32 on the CPU:

* sampling images/s at T = 1 and T = 4, without and with CFG 1.2 (``combo``);
* training steps/s (loss + backward + grad clip 1.0 + AdamW step);
* the true FLOPs per image (sampling, :func:`spheregen.flops.count_sampling_flops`) or
  per step (training, the same ``FlopCounterMode`` count with both SDPA directions);
* the achieved GFLOP/s and its fraction of the peak: the median GFLOP/s of 2048²
  fp32 ``torch.mm`` with the same thread count.

``--device cuda`` runs the same on a GPU (8192² peak, synchronised timings, TF32 off),
``--dtype bf16`` under bf16 autocast against a bf16 peak, ``--model cifar10-base`` with
the official CIFAR-10 model instead of the tiny one.

The peak and the workloads are measured interleaved: every timed call of a workload is
bracketed by two peak measurements, and a workload's fraction is the median over its
calls of (its GFLOP/s / the mean of the two peaks around it). On a shared machine the
load drifts from one second to the next; pairing each call with adjacent peaks keeps
the ratio meaningful. The load average and the OpenMP wait policy are printed: with
``OMP_WAIT_POLICY`` unset, libgomp's spinning barriers stall every elementwise op for
milliseconds when the cores are oversubscribed, so in that case (policy unset, this
run's threads plus the tasks already running exceed the cores) the script re-runs itself
under ``OMP_WAIT_POLICY=PASSIVE`` and says so in its header; ``--omp-as-is`` opts out.

    python benchmarks/bench_sphere_encoder.py            # full run (about 1 min idle, < 2 min busy)
    python benchmarks/bench_sphere_encoder.py --quick    # about 30 s
    python benchmarks/bench_sphere_encoder.py --threads 1 --profile --json out.json
    python benchmarks/bench_sphere_encoder.py --device cuda --dtype bf16 --model cifar10-base

The weights are the model's init with the zero-initialised tensors (heads, AdaLN,
mixer α) filled with N(0, 0.02), so that no branch is trivially zero; speed does not
depend on the values.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable

from machine_load import busy_elsewhere  # the scripts' folder is on sys.path

AUTO_PASSIVE = "SPHEREGEN_BENCH_AUTO_PASSIVE"


def _passive_omp_if_oversubscribed() -> None:
    """Re-run this script under OMP_WAIT_POLICY=PASSIVE when its threads plus the tasks
    already running exceed the cores and the policy is unset: libgomp must read the
    variable before torch loads it. ``--omp-as-is`` opts out."""
    argv = sys.argv[1:]
    if "OMP_WAIT_POLICY" in os.environ or "--omp-as-is" in argv:
        return
    threads = None
    for i, a in enumerate(argv):
        if a.startswith("--threads="):
            threads = int(a.split("=", 1)[1])
        elif a == "--threads" and i + 1 < len(argv):
            threads = int(argv[i + 1])
    cores = os.cpu_count() or 1
    threads = threads or int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or cores
    others = busy_elsewhere()
    if threads > 1 and others + threads > cores:
        env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", **{AUTO_PASSIVE: f"{others:g}"})
        os.execve(sys.executable, [sys.executable, *sys.argv], env)


if __name__ == "__main__":
    _passive_omp_if_oversubscribed()

import torch  # noqa: E402  (after the OpenMP environment is settled)
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count  # noqa: E402

from spheregen.flops import count_sampling_flops  # noqa: E402
from spheregen.interfaces import BuildContext, DataSpec  # noqa: E402
from spheregen_plugins.sphere_encoder.config import SphereEncoderConfig, SphereSamplerConfig  # noqa: E402
from spheregen_plugins.sphere_encoder.method import build_method  # noqa: E402
from spheregen_plugins.sphere_encoder.sampler import SphereSampler  # noqa: E402

aten = torch.ops.aten
PEAK_N = 2048
DATA = DataSpec(image_size=32, channels=3, num_classes=10)


# ------------------------------------------------------------------ setup


MODELS = ("tiny", "cifar10-base")


def model_config(name: str) -> SphereEncoderConfig:
    """``tiny``: SPEC D's CPU recipe. ``cifar10-base``: the official CIFAR-10 model of
    experiments/paper/cifar10.toml (base/base, patch 2, 16×16×8 latent) with the
    perceptual terms off (LPIPS needs the VGG16 weights; the rows then time the smooth-L1
    and latent-consistency objective only)."""
    if name == "tiny":
        return SphereEncoderConfig.tiny()
    return SphereEncoderConfig(size="base", patch_size=2, compression_ratio=1.5, noise_angle=80.0, mixer_depth=2,
                               head="conv", con_dist_weight=0.5, lat_con_weight=0.1)


def build(seed: int = 0, model: str = "tiny") -> torch.nn.Module:
    torch.manual_seed(seed)
    ctx = BuildContext(data=DATA, build=lambda kind, component: None)
    method = build_method(model_config(model), ctx)
    with torch.no_grad():
        for p in method.parameters():
            if p.requires_grad and not p.any():
                p.normal_(std=0.02)
    return method


def synchronizer(device: torch.device) -> Callable[[], None]:
    """Waits for the device's queued kernels (CUDA runs asynchronously); no-op on CPU."""
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


class Peak:
    """n² matmuls (2048 on CPU, 8192 on CUDA) in the workload's dtype: each call times
    ``reps`` back-to-back ``mm`` and returns GFLOP/s."""

    def __init__(self, n: int | None = None, reps: int = 2, device: torch.device = torch.device("cpu"),
                 dtype: torch.dtype = torch.float32):
        n = n or (PEAK_N if device.type == "cpu" else 4 * PEAK_N)
        g = torch.Generator().manual_seed(0)
        self.a = torch.randn(n, n, generator=g).to(device, dtype)
        self.b = torch.randn(n, n, generator=g).to(device, dtype)
        self.c = torch.empty(n, n, device=device, dtype=dtype)
        self.n, self.sync = n, synchronizer(device)
        self.flops = 2 * n**3 * reps
        self.reps = reps
        self.samples: list[float] = []

    def __call__(self) -> float:
        self.sync()
        start = time.perf_counter()
        for _ in range(self.reps):
            torch.mm(self.a, self.b, out=self.c)
        self.sync()
        gflops = self.flops / (time.perf_counter() - start) / 1e9
        self.samples.append(gflops)
        return gflops


def _cpu_sdpa_fwd(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_bwd(grad_out_shape, query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def count_train_flops(step: Callable[[], Any]) -> int:
    """True FLOPs of one training step (forward + backward). Same counter as
    spheregen.flops (FlopCounterMode), with formulas for the CPU flash-attention kernels,
    which torch leaves uncounted; the optimizer's elementwise work counts 0, as every
    elementwise op does."""
    mapping = {
        aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_fwd,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_bwd,
    }
    counter = FlopCounterMode(display=False, custom_mapping=mapping)
    with counter:
        step()
    return int(counter.get_total_flops())


# ------------------------------------------------------------------ measuring


def measure(name: str, fn: Callable[[], Any], flops: int, units: int, peak: Peak, repeats: int,
            budget_s: float, min_repeats: int = 3, warmup: int = 1) -> dict[str, Any]:
    """Time ``fn`` (``units`` images or steps per call) up to ``repeats`` times, at least
    ``min_repeats``, fewer once ``budget_s`` is spent. Each timed call is bracketed by two
    peak measurements; its fraction uses their mean."""
    for _ in range(warmup):
        start = time.perf_counter()
        fn()
        # a call that eats the budget by itself (a stalled machine) is timed fewer times
        min_repeats = min(min_repeats, max(1, int(budget_s / (time.perf_counter() - start))))
    times, fractions, peaks = [], [], []
    before = peak()
    for i in range(repeats):
        start = time.perf_counter()
        fn()
        dt = time.perf_counter() - start
        after = peak()
        p = (before + after) / 2
        before = after
        times.append(dt)
        peaks.append(p)
        fractions.append(flops / dt / 1e9 / p)
        if i + 1 >= min_repeats and sum(times) > budget_s:
            break
    latency = statistics.median(times)
    return {
        "name": name,
        "units_per_s": units / latency,
        "latency_s": latency,
        "gflop_per_call": flops / 1e9,
        "achieved_gflops": flops / latency / 1e9,
        "peak_gflops": statistics.median(peaks),
        "fraction_of_peak": statistics.median(fractions),
        "repeats": len(times),
        "times_s": times,
    }


def op_breakdown(fn: Callable[[], Any], top: int = 14) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """One call of ``fn`` under torch.profiler: self CPU time per aten op (top ``top``)
    and per category."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    rows = [
        {"op": e.key, "calls": e.count, "self_ms": e.self_cpu_time_total / 1e3, "share": e.self_cpu_time_total / total}
        for e in sorted(events, key=lambda e: -e.self_cpu_time_total)
    ]
    categories: dict[str, float] = {}
    for r in rows:
        categories[_category(r["op"])] = categories.get(_category(r["op"]), 0.0) + r["share"]
    return rows[:top], dict(sorted(categories.items(), key=lambda kv: -kv[1]))


def _category(op: str) -> str:
    name = op.removeprefix("aten::")
    if name in ("mm", "addmm", "bmm", "baddbmm", "addmv", "mv", "matmul", "linear"):
        return "matmul"
    if "scaled_dot_product" in name:
        return "attention (SDPA)"
    if "conv" in name or name in ("col2im", "im2col", "reflection_pad2d"):
        return "conv head / fold"
    if name in ("copy_", "clone", "contiguous", "cat", "stack", "_to_copy", "empty", "empty_strided", "resize_"):
        return "copies / allocation"
    if name.endswith("_backward") or "backward" in name:
        return "backward kernels"
    return "elementwise / norms / other"


def compiled_rows(method, samplers, b, peak, repeats, budget, min_reps, sampler, guidance) -> list[dict[str, Any]]:
    """The sampling rows again with the encoder and decoder compiled by inductor: its
    kernels (C++ on the CPU, Triton on CUDA) fuse the elementwise chains (AdaLN
    modulation, SwiGLU, RoPE, norms) that eager runs as separate passes, and ``freezing``
    folds the weights into constants (on the CPU linears then run as MKL packed GEMMs).
    Run last: frozen weights must not change after."""
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    method.eval()
    method.encoder.compile(dynamic=False)
    method.decoder.compile(dynamic=False)
    rows = []
    for steps, g in ((1, 1.0), (4, 1.0), (1, guidance), (4, guidance)):
        start = time.perf_counter()
        samplers[(steps, g)]()  # compiles for this batch shape (and the null-class branch)
        compile_s = time.perf_counter() - start
        per_image = count_sampling_flops(sampler, method, steps, g).total
        cfg = f" cfg {g:g}" if g > 1 else ""
        row = measure(f"sample T={steps}{cfg} compiled", samplers[(steps, g)], per_image * b, b, peak, repeats,
                      budget, min_reps())
        row.update(kind="sample-compiled", steps=steps, guidance=g, flops_per_unit=per_image,
                   nfe=sampler.nfe(steps, g), first_call_s=compile_s)
        rows.append(row)
        print(f"  {row['name']:<28} {row['units_per_s']:8.1f} img/s", file=sys.stderr, flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 repeats per workload, short budget")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON ('-' = stdout)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all, torch.get_num_threads())")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--guidance", type=float, default=1.2)
    ap.add_argument("--no-train", action="store_true", help="sampling only")
    ap.add_argument("--omp-as-is", action="store_true",
                    help="keep libgomp's default wait policy even on an oversubscribed machine")
    ap.add_argument("--compile", action="store_true",
                    help="also time sampling with encoder and decoder compiled by torch.compile (inductor, "
                         "weights frozen as constants; about 20 s of compilation per shape)")
    ap.add_argument("--profile", action="store_true",
                    help="also print the per-op self-CPU-time breakdown of one T=4 CFG sampling call (CPU only)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda[:i]")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                    help="fp32 (on CUDA with TF32 off) or bf16 autocast; the peak matmul uses the same dtype")
    ap.add_argument("--model", choices=MODELS, default="tiny",
                    help="tiny (SPEC D, the CPU recipe) or cifar10-base (the official CIFAR-10 model, a GPU size)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: torch {torch.__version__} sees no CUDA device; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        ap.error(f"--device {args.device}: only cpu and cuda are supported")
    if args.profile and device.type != "cpu":
        ap.error("--profile breaks down CPU op time; run it with --device cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 means fp32
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    sync = synchronizer(device)

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")

    t_start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    repeats, budget, deadline = (3, 3.0, 40.0) if args.quick else (9, 10.0, 95.0)
    load_before = os.getloadavg()
    omp_policy = os.environ.get("OMP_WAIT_POLICY", "(unset)")
    others = float(os.environ[AUTO_PASSIVE]) if AUTO_PASSIVE in os.environ else busy_elsewhere()
    if AUTO_PASSIVE in os.environ:
        omp_policy += (f" (set by this script: {others:g} other runnable task(s) + {threads} threads > "
                       f"{os.cpu_count()} cores; --omp-as-is keeps libgomp's default)")
    elif threads > 1 and others + threads > (os.cpu_count() or 1) and "OMP_WAIT_POLICY" not in os.environ:
        print(f"warning: {others:g} other runnable task(s) + {threads} threads > {os.cpu_count()} cores with "
              "OMP_WAIT_POLICY unset: libgomp's spinning barriers stall every op while a thread waits for a "
              "core; the numbers measure the scheduler more than the model", file=sys.stderr)

    method = build(model=args.model).to(device)
    sampler = SphereSampler(SphereSamplerConfig(cfg_position="combo"))
    b = args.batch
    labels = (torch.arange(b) % DATA.num_classes).to(device)
    peak = Peak(device=device, dtype=dtype)
    for _ in range(3):  # warm the BLAS and the clocks
        peak()
    peak.samples.clear()

    def min_reps() -> int:  # keep the whole run near its deadline on a slow / busy machine
        return 3 if time.perf_counter() - t_start < deadline else 1

    rows = []
    method.eval()
    samplers: dict[tuple[int, float], Callable[[], Any]] = {}
    for steps, guidance in ((1, 1.0), (4, 1.0), (1, args.guidance), (4, args.guidance)):
        per_image = count_sampling_flops(sampler, method, steps, guidance).total
        gen = torch.Generator(device=device)

        def run(steps=steps, guidance=guidance, gen=gen):
            gen.manual_seed(0)
            with autocast():
                sampler.sample(method, labels, steps, guidance, generator=gen)
            sync()

        samplers[(steps, guidance)] = run
        cfg = f" cfg {guidance:g}" if guidance > 1 else ""
        row = measure(f"sample T={steps}{cfg}", run, per_image * b, b, peak, repeats, budget, min_reps())
        row.update(kind="sample", steps=steps, guidance=guidance, flops_per_unit=per_image,
                   nfe=sampler.nfe(steps, guidance))
        rows.append(row)
        print(f"  {row['name']:<20} {row['units_per_s']:8.1f} img/s", file=sys.stderr, flush=True)

    if not args.no_train:
        method.train()
        groups = [{"params": g["params"], "lr": 1e-3 * g["lr_scale"]} for g in method.param_groups()]
        opt = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0)
        params = [p for g in groups for p in g["params"]]
        g = torch.Generator().manual_seed(1)
        x = (torch.rand(b, DATA.channels, DATA.image_size, DATA.image_size, generator=g) * 2 - 1).to(device)

        def forward_backward():
            with autocast():
                loss, _ = method.loss(x, labels)
            loss.backward()

        def train_step():
            forward_backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync()

        step_flops = count_train_flops(forward_backward)
        opt.zero_grad(set_to_none=True)
        row = measure("train step", train_step, step_flops, 1, peak, repeats, budget, min_reps())
        row.update(kind="train", steps=None, guidance=None, flops_per_unit=step_flops, nfe=None)
        rows.append(row)
        print(f"  {row['name']:<20} {row['units_per_s']:8.2f} steps/s", file=sys.stderr, flush=True)
        method.eval()

    if args.compile:
        rows += compiled_rows(method, samplers, b, peak, repeats, budget, min_reps, sampler, args.guidance)

    breakdown = None
    if args.profile:
        ops, categories = op_breakdown(samplers[(4, args.guidance)])
        breakdown = {"workload": f"sample T=4 cfg {args.guidance:g}", "ops": ops, "categories": categories}

    load_after = os.getloadavg()
    peak_all = statistics.median(peak.samples)
    meta = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": threads,
        "cpu_count": os.cpu_count(),
        "omp_wait_policy": omp_policy,
        "other_runnable_tasks_at_start": others,
        "load_avg_before": load_before,
        "load_avg_after": load_after,
        "batch": b,
        "peak_gflops_median": peak_all,
        "peak_gflops_min": min(peak.samples),
        "peak_gflops_max": max(peak.samples),
        "wall_s": time.perf_counter() - t_start,
        "config": f"{args.model} at 32 px, 10 classes; sampler combo, cache noise, r = 1",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "dtype": args.dtype,
        "peak_n": peak.n,
    }

    where = meta["device"] if device.type == "cuda" else f"{threads} CPU thread(s)"
    print(f"Sphere Encoder {args.model}, batch {b}, {args.dtype}, {where}, torch {torch.__version__}, "
          f"OMP_WAIT_POLICY={omp_policy}")
    print(f"load average (1/5/15 min): before {load_before[0]:.2f}/{load_before[1]:.2f}/{load_before[2]:.2f}, "
          f"after {load_after[0]:.2f}/{load_after[1]:.2f}/{load_after[2]:.2f} on {os.cpu_count()} cores; "
          f"{others:g} other runnable task(s) at start")
    print(f"matmul peak ({peak.n}² {args.dtype} mm, {where}): median {peak_all:.1f} GFLOP/s "
          f"(min {meta['peak_gflops_min']:.1f}, max {meta['peak_gflops_max']:.1f}, n = {len(peak.samples)})")
    header = (f"{'workload':<28} {'NFE':>4} {'rate':>14} {'GFLOP/unit':>11} {'GFLOP/s':>8} "
              f"{'peak':>6} {'of peak':>8} {'n':>3}")
    print(header)
    print("-" * len(header))
    for r in rows:
        unit = "img/s" if r["kind"].startswith("sample") else "steps/s"
        nfe = "" if r["nfe"] is None else str(r["nfe"])
        print(f"{r['name']:<28} {nfe:>4} {r['units_per_s']:8.2f} {unit:<5} {r['flops_per_unit'] / 1e9:11.4f} "
              f"{r['achieved_gflops']:8.1f} {r['peak_gflops']:6.1f} {100 * r['fraction_of_peak']:7.1f}% "
              f"{r['repeats']:>3}")
    print("GFLOP/unit: true FLOPs (FlopCounterMode, attention included) per image (sampling) or per training "
          "step (forward + backward, whole batch). peak: median of the matmul peaks around the workload's "
          "calls. of peak: median over calls of achieved / (mean of the peaks just before and after).")
    if breakdown is not None:
        print(f"\nper-op self CPU time, one '{breakdown['workload']}' call (torch.profiler):")
        for name, share in breakdown["categories"].items():
            print(f"  {name:<30} {100 * share:5.1f}%")
        for r in breakdown["ops"]:
            print(f"    {r['op']:<52} {100 * r['share']:5.1f}% {r['self_ms']:8.1f} ms {r['calls']:5d} calls")
    print(f"(run took {meta['wall_s']:.0f} s)")

    if args.json:
        payload = json.dumps({"meta": meta, "rows": rows, "breakdown": breakdown}, indent=2)
        if args.json == "-":
            print(payload)
        else:
            with open(args.json, "w") as f:
                f.write(payload + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
