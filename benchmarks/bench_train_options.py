"""What the ``[train]`` speed options buy on one training step (spheregen.precision).

For ``SphereEncoderConfig.tiny()`` at 32 px, batch 64 (``--model cifar10-base`` for the
CIFAR-10 recipe's network), it prints:

* activation checkpointing: the bytes autograd keeps for the backward pass (every tensor
  saved outside a checkpointed block, counted once per storage, parameters excluded;
  exact, whatever the device's allocator does) and the step time, without and with;
* fused AdamW: the optimizer step time, torch's ``foreach`` loop against the fused kernel;
* on CUDA: the step time with TF32 off and on (``--device cuda``);
* on a CPU with ≥ 2 intra-op threads: ``thread_shards`` (on by default), the loss and
  backward of the whole batch on the threads against one shard per thread side by side
  (spheregen.shards), as paired rounds in alternating order: the median (and range) of
  the per-round ratios whole / sharded (> 1: the shards are faster).

    python benchmarks/bench_train_options.py [--device cuda] [--model cifar10-base] [--repeats 5]
    python benchmarks/bench_train_options.py --threads 2 --rounds 16    # + thread shards on a CPU

Times are the median of ``--repeats`` steps after one warm-up step.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from spheregen import precision
from spheregen.interfaces import DataSpec
from spheregen.shards import ThreadShards, sharded_backward
from spheregen_plugins.sphere_encoder.config import SphereEncoderConfig
from spheregen_plugins.sphere_encoder.method import SphereEncoder

MODELS = {"tiny": SphereEncoderConfig.tiny, "cifar10-base": lambda: SphereEncoderConfig(size="base", head="conv")}
SPEC = DataSpec(image_size=32, channels=3, num_classes=10)


def build(name: str, device: torch.device, checkpointed: bool) -> SphereEncoder:
    torch.manual_seed(0)
    model = SphereEncoder(MODELS[name](), SPEC).to(device)
    if checkpointed:
        precision.checkpoint_activations(precision.checkpoint_blocks(model, "bench"))
    return model


def batch(device: torch.device, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return (torch.rand(n, 3, 32, 32, generator=g) * 2 - 1).to(device), (torch.arange(n) % 10).to(device)


def kept_bytes(model: SphereEncoder, x: torch.Tensor, y: torch.Tensor) -> int:
    """Bytes of the tensors autograd keeps for the backward pass of one loss."""
    params = {p.data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.data_ptr() not in params:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = model.loss(x, y)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(kept.values())


def timed(fn, device: torch.device, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def step_fn(model: SphereEncoder, x: torch.Tensor, y: torch.Tensor):
    def step() -> None:
        torch.manual_seed(0)
        loss, _ = model.loss(x, y)
        loss.backward()
        model.zero_grad(set_to_none=True)
    return step


def thread_shards_ratios(model: SphereEncoder, x: torch.Tensor, y: torch.Tensor, rounds: int) -> list[float]:
    """Per round: (whole-batch loss + backward time) / (the same as one shard per thread),
    each timed over two steps, the two in alternating order."""
    params = [p for p in model.parameters() if p.requires_grad]
    pool = ThreadShards(torch.get_num_threads())

    def whole() -> None:
        step_fn(model, x, y)()

    def sharded() -> None:
        torch.manual_seed(0)
        sharded_backward(model, params, x, y, pool)
        model.zero_grad(set_to_none=True)

    try:
        whole(), sharded()
        ratios = []
        for r in range(rounds):
            took = {}
            for name, fn in ((("whole", whole), ("sharded", sharded)) if r % 2 == 0 else
                             (("sharded", sharded), ("whole", whole))):
                t0 = time.perf_counter()
                fn(), fn()
                took[name] = time.perf_counter() - t0
            ratios.append(took["whole"] / took["sharded"])
        return ratios
    finally:
        pool.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", choices=sorted(MODELS), default="tiny")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--rounds", type=int, default=16, help="paired rounds of the thread-shards comparison")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    x, y = batch(device, args.batch)
    print(f"{args.model} Sphere Encoder, 32 px, batch {args.batch}, {device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    for checkpointed in (False, True):
        model = build(args.model, device, checkpointed)
        mib = kept_bytes(model, x, y) / 2**20
        sec = timed(step_fn(model, x, y), device, args.repeats)
        print(f"activation checkpointing {'on ' if checkpointed else 'off'}: kept for backward {mib:8.1f} MiB, "
              f"loss + backward {sec * 1e3:8.1f} ms")
    model = build(args.model, device, False)
    step_fn(model, x, y)()
    torch.manual_seed(0)
    loss, _ = model.loss(x, y)
    loss.backward()
    params = [p for p in model.parameters() if p.requires_grad]
    for fused in (False, True):
        opt = precision.adamw([{"params": params}], 1e-4, (0.9, 0.95), 0.0, fused=fused)
        sec = timed(opt.step, device, args.repeats)
        print(f"AdamW {'fused  ' if fused else 'foreach'}: optimizer step {sec * 1e3:8.2f} ms "
              f"({sum(p.numel() for p in params) / 1e6:.1f}M parameters)")
    if device.type == "cpu" and torch.get_num_threads() >= 2:
        ratios = thread_shards_ratios(build(args.model, device, False), x, y, args.rounds)
        print(f"thread shards ({torch.get_num_threads()}): loss + backward whole / sharded "
              f"{statistics.median(ratios):.3f} (median of {len(ratios)} rounds, {min(ratios):.2f}-{max(ratios):.2f})")
    if device.type == "cuda":
        for on in (False, True):
            with precision.tf32(on):
                sec = timed(step_fn(model, x, y), device, args.repeats)
            print(f"TF32 {'on ' if on else 'off'}: loss + backward {sec * 1e3:8.1f} ms")


if __name__ == "__main__":
    main()
