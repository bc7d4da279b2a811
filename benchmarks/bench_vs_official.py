"""spheregen's Sphere Encoder against the official code (repository
constantinp/sphere-encoder, its ``sphere.model.G``) at the identical tiny architecture,
timed side by side in one process.

Both models: width 128, 4 layers, 2 heads, patch 4 at 32 px, 3 channels, latent 8×8×32
(compression ratio 1.5), MLP-Mixer depth 2 on both sides, conv pixel head, 10 classes +
the null class (AdaLN-Zero), θmax 80°, hard cases p = 0.1 (the official shared-draw
mixing on both sides), fp32, batch 64. The script checks that the parameter counts are
equal and prints them. Workloads:

* ``train step``: the official train.py step with the recipe of
  experiments/parity_official_tiny.toml (smooth-L1 recon 1.0, pixel consistency 0.5,
  latent consistency 0.1, no perceptual term): ``G.forward`` + its ``ReconstructionLoss``
  on ``x·0.5+0.5`` + backward + grad-norm clip 1.0 + AdamW (β 0.9/0.95, fused, as
  train.py; encoder lr × 0.1) + ``zero_grad``; spheregen's ``method.loss`` + backward +
  clip 1.0 + AdamW as spheregen's trainer builds it (same β and lr groups) + ``zero_grad``,
  the loss and backward at ≥ 2 threads as the trainer runs them by default, one shard of
  the batch per thread (``train.thread_shards``, spheregen.shards; ``--no-thread-shards``:
  the whole batch on the threads, as the official step).
* ``sample T=1`` / ``T=4``, each without and with CFG 1.2 (``combo``, cached noise,
  r = 1): ``G.generate`` against ``SphereSampler.sample``.

Protocol: for each thread count (``torch.set_num_threads``) and workload, one warm-up
call of each side, then rounds (7 per sampling row, 15 for the training step) that call
both sides back to back in alternating order. A row reports each side's median rate and
the ratio spheregen / official (> 1: spheregen is faster) as the median of the
per-round ratios, so the drift of a shared machine's load cancels within a round, with
a distribution-free confidence interval of that median (order statistics of the
per-round ratios). On the shared development machine single training rounds at 2
threads ranged 0.99-1.86 in one run; with 7 rounds the printed median moved ±0.08 from
run to run, hence the 15 training rounds. The official repository is
imported from ``--official`` (a checkout, or ``git archive`` of its ``sphere`` folder);
nothing of it is copied into spheregen. Its ``SIZE_DICT`` gets a ``tiny`` entry at run
time (the official sizes start at width 512), and its perceptual term, off in this
recipe but computed by ``ReconstructionLoss`` at any weight, is replaced by a zero of
the shape it returns, so neither side runs LPIPS.

    python benchmarks/bench_vs_official.py --official /tmp/official
    python benchmarks/bench_vs_official.py --official /tmp/official --threads 1 --quick
    python benchmarks/bench_vs_official.py --official /tmp/official --profile   # + per-op shares of both steps

``OMP_WAIT_POLICY`` is set to PASSIVE by re-running the script when the machine is
oversubscribed (as benchmarks/bench_sphere_encoder.py does; ``--omp-as-is`` opts out).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import platform
import statistics
import sys
import time
import types
from pathlib import Path
from typing import Any, Callable

from machine_load import busy_elsewhere  # the scripts' folder is on sys.path

AUTO_PASSIVE = "SPHEREGEN_BENCH_AUTO_PASSIVE"


def _passive_omp_if_oversubscribed(argv: list[str]) -> None:
    """Re-run under OMP_WAIT_POLICY=PASSIVE when the most threads asked for plus the tasks
    already running exceed the cores (libgomp reads the variable when torch loads)."""
    if "OMP_WAIT_POLICY" in os.environ or "--omp-as-is" in argv:
        return
    threads = parse_args(argv).threads
    others = busy_elsewhere()
    if max(threads) > 1 and others + max(threads) > (os.cpu_count() or 1):
        env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", **{AUTO_PASSIVE: f"{others:g}"})
        os.execve(sys.executable, [sys.executable, *sys.argv], env)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--official", required=True, type=Path,
                    help="folder holding the official 'sphere' package (a checkout of constantinp/sphere-encoder)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="intra-op thread counts (default: 1 2)")
    ap.add_argument("--quick", action="store_true", help="fewer rounds (about 1 minute per thread count)")
    ap.add_argument("--repeats", type=int, default=None, help="rounds per sampling row (default 7, --quick 3)")
    ap.add_argument("--train-repeats", type=int, default=None,
                    help="rounds of the training step (default 15, --quick 5)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--guidance", type=float, default=1.2)
    ap.add_argument("--no-sample", action="store_true", help="time the training step only")
    ap.add_argument("--no-train", action="store_true", help="time sampling only")
    ap.add_argument("--no-thread-shards", action="store_true",
                    help="train spheregen's batch whole on the intra-op threads (train.thread_shards = false)")
    ap.add_argument("--profile", action="store_true",
                    help="also print each side's per-op self-CPU-time shares of one training step")
    ap.add_argument("--omp-as-is", action="store_true", help="keep libgomp's default wait policy")
    return ap.parse_args(argv)


if __name__ == "__main__":
    _passive_omp_if_oversubscribed(sys.argv[1:])

import torch  # noqa: E402  (after the OpenMP environment is settled)

from spheregen import precision  # noqa: E402
from spheregen.interfaces import BuildContext, DataSpec  # noqa: E402
from spheregen.shards import ThreadShards, sharded_backward, use_thread_shards  # noqa: E402
from spheregen_plugins.sphere_encoder.config import SphereEncoderConfig, SphereSamplerConfig  # noqa: E402
from spheregen_plugins.sphere_encoder.method import build_method  # noqa: E402
from spheregen_plugins.sphere_encoder.networks import count_parameters  # noqa: E402
from spheregen_plugins.sphere_encoder.sampler import SphereSampler  # noqa: E402

DATA = DataSpec(image_size=32, channels=3, num_classes=10)
LR = 1e-3  # decoder; encoders at 0.1× on both sides


# ------------------------------------------------------------------ the two models


def fill_zeros(model: torch.nn.Module, seed: int) -> None:
    """Zero-initialised tensors (heads, AdaLN, mixer α) get N(0, 0.02) so that no branch
    is trivially zero; speed does not depend on the values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def build_spheregen() -> torch.nn.Module:
    """SPEC D's tiny model with the parity recipe's losses (experiments/parity_official_tiny.toml)."""
    torch.manual_seed(0)
    cfg = SphereEncoderConfig(size="tiny", patch_size=4, mixer_depth=2, head="conv", noise_angle=80.0,
                              hard_case_fix=False, dist_weight=1.0, con_dist_weight=0.5, lat_con_weight=0.1)
    method = build_method(cfg, BuildContext(data=DATA, build=lambda kind, component: None))
    fill_zeros(method, 0)
    return method


class _ZeroPerceptual(torch.nn.Module):
    """Stands in for the official PerceptualLoss (LPIPS + ConvNeXt, whose weights are a
    download): ReconstructionLoss calls it even at weight 0; a zero per sample is what
    its ``.mean(dim=C,H,W)`` expects."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__()

    def forward(self, inp: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        return inp.new_zeros(inp.shape[0], 1, 1, 1)


def build_official(path: Path) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The official G at the tiny architecture and its ReconstructionLoss for the parity
    recipe. Returns (G, loss)."""
    if not (path / "sphere" / "model.py").is_file():
        raise SystemExit(f"--official {path}: no sphere/model.py there; point it at a checkout of "
                         "constantinp/sphere-encoder (or 'git archive HEAD sphere' of it)")
    sys.path.insert(0, str(path.resolve()))
    if importlib.util.find_spec("requests") is None:
        # sphere/lpips.py imports it to download LPIPS weights, which this script never uses
        sys.modules["requests"] = types.ModuleType("requests")
    import sphere.loss as official_loss
    import sphere.model as official_model

    official_model.SIZE_DICT["tiny"] = {"width": 128, "layers": 4, "heads": 2, "in_context_start": 0}
    torch.manual_seed(0)
    g = official_model.G(input_size=32, patch_size=4, vit_enc_model_size="tiny", vit_dec_model_size="tiny",
                         token_channels=32, num_classes=10, pixel_head_type="conv", use_pixel_consistency=True,
                         use_latent_consistency=True, noise_sigma_max_angle=80.0, vit_enc_latent_mlp_mixer_depth=2,
                         vit_dec_latent_mlp_mixer_depth=2, affine_latent_mlp_mixer=True, mix_hard_cases=True,
                         mix_hard_cases_prob=0.1, mix_hard_cases_max_angle=85.0)
    fill_zeros(g, 0)
    official_loss.PerceptualLoss = _ZeroPerceptual
    loss = official_loss.ReconstructionLoss(perceptual_weight=0.0, distance_loss_type="l1", distance_weight=1.0,
                                            pixel_consistency_distance_weight=0.5,
                                            pixel_consistency_perceptual_weight=0.0, latent_consistency_weight=0.1)
    return g, loss


# ------------------------------------------------------------------ workloads


def official_train_step(g: torch.nn.Module, loss_fn: torch.nn.Module, x: torch.Tensor,
                        y: torch.Tensor) -> Callable[[], None]:
    """train.py's inner loop body (fp32 on the CPU: its autocast context is a no-op)."""
    enc = [p for n, p in g.named_parameters() if p.requires_grad and n.startswith("encoder.")]
    dec = [p for n, p in g.named_parameters() if p.requires_grad and not n.startswith("encoder.")]
    opt = torch.optim.AdamW([{"params": enc, "lr": LR * 0.1}, {"params": dec, "lr": LR}], lr=LR,
                            betas=(0.90, 0.95), weight_decay=0.0, fused=True)

    def step() -> None:
        rec, extra, z_noisy, z_clean = g(x, y)
        loss = loss_fn(input=rec * 0.5 + 0.5, target=x * 0.5 + 0.5, extra_loss=extra,
                       noisy_latent=z_noisy, clean_latent=z_clean)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(g.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def spheregen_train_step(method: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                         thread_shards: bool = True) -> Callable[[], None]:
    """What spheregen's trainer runs per step on one CPU process: ``method.loss``,
    backward, clip 1.0 over all parameters, its AdamW (``precision.adamw`` as runner.py
    calls it, ``train.fused_adamw`` at its default false), zero_grad. With ``train.thread_shards``
    at its default (on) and ≥ 2 intra-op threads, the loss and backward run as one shard
    of the batch per thread (spheregen.shards), as the trainer runs them."""
    groups = [{"params": g["params"], "lr": LR * g["lr_scale"]} for g in method.param_groups()]
    opt = precision.adamw(groups, LR, (0.9, 0.95), 0.0, fused=False)
    params = [p for g in groups for p in g["params"]]
    n = use_thread_shards(thread_shards, method, torch.device("cpu"), 1, "no", False, x.shape[0])
    pool = ThreadShards(n) if n else None

    def step() -> None:
        if pool is not None:
            sharded_backward(method, params, x, y, pool)
        else:
            loss, _ = method.loss(x, y)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(method.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def sampling_calls(method: torch.nn.Module, g: torch.nn.Module, labels: torch.Tensor, steps: int,
                   guidance: float) -> tuple[Callable[[], Any], Callable[[], Any]]:
    sampler = SphereSampler(SphereSamplerConfig(cfg_position="combo", cache_noise=True))
    gen = torch.Generator()

    def ours() -> Any:
        gen.manual_seed(0)
        return sampler.sample(method, labels, steps, guidance, generator=gen)

    def theirs() -> Any:
        torch.manual_seed(0)
        return g.generate(labels.shape[0], y=labels, cfg=guidance, cfg_position="combo", forward_steps=steps,
                          cache_sampling_noise=True, device="cpu")

    return ours, theirs


# ------------------------------------------------------------------ measuring


def paired(ours: Callable[[], Any], theirs: Callable[[], Any], repeats: int) -> dict[str, Any]:
    """One warm-up call each, then ``repeats`` rounds of both, the order alternating.
    Returns the median wall seconds per call of each side, the median per-round ratio
    theirs / ours of wall time (= our rate / their rate), and the same ratio of the
    process's CPU time, which a busy machine's preemptions do not inflate."""
    ours(), theirs()
    wall: dict[str, list[float]] = {"ours": [], "theirs": []}
    cpu: dict[str, list[float]] = {"ours": [], "theirs": []}
    for i in range(repeats):
        order = (("ours", ours), ("theirs", theirs)) if i % 2 == 0 else (("theirs", theirs), ("ours", ours))
        for side, fn in order:
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            cpu[side].append(time.process_time() - start_cpu)
            wall[side].append(time.perf_counter() - start)
    ratios = [b / a for a, b in zip(wall["ours"], wall["theirs"])]
    cpu_ratios = [b / a for a, b in zip(cpu["ours"], cpu["theirs"])]
    low, high, coverage = median_ci(ratios)
    return {"ours_s": statistics.median(wall["ours"]), "theirs_s": statistics.median(wall["theirs"]),
            "ratio": statistics.median(ratios), "ratio_low": low, "ratio_high": high, "coverage": coverage,
            "cpu_ratio": statistics.median(cpu_ratios), "repeats": repeats}


def median_ci(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """(low, high, coverage): the order-statistic confidence interval of the median of
    ``values`` (any continuous distribution; rounds independent). [x_(k), x_(n+1-k)] with
    the largest k whose exact coverage 1 − 2·P(Binomial(n, ½) < k) is still ≥ ``level``;
    with too few values (n < 6 for 95%) the range [min, max] and its own coverage."""
    xs, n = sorted(values), len(values)
    tail = [math.comb(n, i) / 2**n for i in range(n + 1)]  # P(Binomial(n, 1/2) = i)
    k, below = 1, tail[0]  # below: P(Binomial < k)
    while k + 1 <= (n + 1) // 2 and 1 - 2 * (below + tail[k]) >= level:
        below += tail[k]
        k += 1
    return xs[k - 1], xs[n - k], 1 - 2 * below


def op_shares(fn: Callable[[], Any], top: int = 12) -> list[tuple[str, float, int]]:
    """(aten op, share of self CPU time, calls) of one call of ``fn``, the top ``top``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    events.sort(key=lambda e: -e.self_cpu_time_total)
    return [(e.key, e.self_cpu_time_total / total, e.count) for e in events[:top]]


def run_threads(threads: int, args: argparse.Namespace, method, g, loss_fn, repeats: int,
                train_repeats: int) -> list[dict[str, Any]]:
    torch.set_num_threads(threads)
    b = args.batch
    labels = torch.arange(b) % DATA.num_classes
    rows = []
    if not args.no_sample:
        method.eval(), g.eval()
        for steps, guidance in ((1, 1.0), (4, 1.0), (1, args.guidance), (4, args.guidance)):
            ours, theirs = sampling_calls(method, g, labels, steps, guidance)
            row = paired(ours, theirs, repeats)
            cfg = f" cfg {guidance:g}" if guidance > 1 else ""
            rows.append({"name": f"sample T={steps}{cfg}", "unit": "img/s", "per_call": b, **row})
            _progress(threads, rows[-1])
    if not args.no_train:
        method.train(), g.train()
        gen = torch.Generator().manual_seed(1)
        x = torch.rand(b, 3, 32, 32, generator=gen) * 2 - 1
        ours = spheregen_train_step(method, x, labels, not args.no_thread_shards)
        theirs = official_train_step(g, loss_fn, x, labels)
        row = paired(ours, theirs, train_repeats)
        rows.append({"name": "train step", "unit": "img/s", "per_call": b, **row})
        _progress(threads, rows[-1])
        if args.profile:
            for side, fn in (("spheregen", ours), ("official", theirs)):
                print(f"\n{threads} thread(s), one {side} training step, self CPU time by op:")
                for op, share, calls in op_shares(fn):
                    print(f"    {op:<52} {100 * share:5.1f}% {calls:6d} calls")
    for r in rows:
        r["threads"] = threads
    return rows


def _progress(threads: int, r: dict[str, Any]) -> None:
    print(f"  [{threads} thr] {r['name']:<18} spheregen {r['per_call'] / r['ours_s']:8.1f} img/s, official "
          f"{r['per_call'] / r['theirs_s']:8.1f} img/s, ratio {r['ratio']:.2f} (cpu {r['cpu_ratio']:.2f})",
          file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 7)
    train_repeats = args.train_repeats or (5 if args.quick else 15)
    method = build_spheregen()
    g, loss_fn = build_official(args.official)
    ours_n, theirs_n = count_parameters(method), sum(p.numel() for p in g.parameters())
    if ours_n != theirs_n:
        raise SystemExit(f"parameter counts differ: spheregen {ours_n:,}, official {theirs_n:,}")
    load_before = os.getloadavg()
    omp = os.environ.get("OMP_WAIT_POLICY", "(unset)")
    if AUTO_PASSIVE in os.environ:
        omp += f" (set by this script: {os.environ[AUTO_PASSIVE]} other runnable task(s) at start)"
    t0 = time.perf_counter()
    rows = [r for t in args.threads for r in run_threads(t, args, method, g, loss_fn, repeats, train_repeats)]
    load_after = os.getloadavg()

    print(f"Sphere Encoder tiny, spheregen vs official G: parameters {ours_n:,} = {theirs_n:,}; batch "
          f"{args.batch}, fp32, torch {torch.__version__}, python {platform.python_version()}, "
          f"{os.cpu_count()} cores, OMP_WAIT_POLICY={omp}")
    print(f"load average (1/5/15 min): before {load_before[0]:.2f}/{load_before[1]:.2f}/{load_before[2]:.2f}, "
          f"after {load_after[0]:.2f}/{load_after[1]:.2f}/{load_after[2]:.2f}; {time.strftime('%Y-%m-%d %H:%M')}")
    header = (f"{'threads':>7} {'workload':<18} {'spheregen':>12} {'official':>12} {'ratio':>6} {'(CI)':>11} "
              f"{'cpu ratio':>9} {'n':>3}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['threads']:>7} {r['name']:<18} {r['per_call'] / r['ours_s']:8.1f} {r['unit']:<3} "
              f"{r['per_call'] / r['theirs_s']:8.1f} {r['unit']:<3} {r['ratio']:6.2f} "
              f"{r['ratio_low']:5.2f}-{r['ratio_high']:<5.2f} {r['cpu_ratio']:9.2f} {r['repeats']:>3}")
    print("rates: medians over the rounds (images per second; a training step is one batch). ratio: median "
          "over rounds of official wall time / spheregen wall time (> 1: spheregen is faster); cpu ratio: the "
          "same with the process's CPU time (less sensitive to other jobs taking the cores). CI: confidence "
          "interval of the ratio's median from the order statistics of the n per-round ratios (coverage "
          + ", ".join(sorted({f"{100 * r['coverage']:.1f}% at n = {r['repeats']}" for r in rows})) + ").")
    print(f"(run took {time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
