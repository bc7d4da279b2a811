"""A training batch evaluated as shards side by side, one per CPU core.

At the sizes a laptop CPU trains (the tiny Sphere Encoder: 64 tokens, width 128), a
step's kernels are too small to keep several intra-op threads busy: from 1 to 2 threads
its step gets 1.71× faster, the CPU flash-attention kernels 1.2-1.3× and the
weight-gradient products 1.24-1.64× (benchmarks/README.md). Split instead, each shard
of the batch runs its forward and backward on one thread, in Python threads (torch
releases the GIL inside its kernels); the step was then 1.09-1.16× faster at 2 threads
in paired runs (benchmarks/README.md; ``benchmarks/bench_train_options.py --threads 2``
compares the two, benchmarks/bench_vs_official.py measures against the official code).

The batch's random numbers are drawn once, before the split, in the order the
whole-batch loss draws them (:class:`spheregen.interfaces.ShardableLoss`), so the shards
compute the batch's loss and gradient: the same math, with the rounding of a different
summation order (as a different thread count already gives). The trainer uses this for
a method with the capability on a CPU with several intra-op threads, one process, no
autocast or compile and at least :data:`MIN_SHARD_ROWS` rows a shard
(``train.thread_shards``, :func:`use_thread_shards`).
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, TypeVar

import torch
from torch import Tensor

from spheregen.interfaces import ShardableLoss

T = TypeVar("T")


class ThreadShards:
    """Runs ``n`` calls at once: the first on the calling thread, the others on ``n - 1``
    worker threads, each with one intra-op thread (the caller's count is restored)."""

    def __init__(self, n: int):
        if n < 2:
            raise ValueError(f"thread shards need at least 2 threads, got {n}")
        self.n = n
        # torch.set_num_threads in a worker sets that thread's OpenMP and MKL counts
        self._pool = ThreadPoolExecutor(n - 1, thread_name_prefix="spheregen-shard",
                                        initializer=torch.set_num_threads, initargs=(1,))

    def run(self, calls: list[Callable[[], T]]) -> list[T]:
        """The results of ``calls`` (at most ``n``) in order; a worker's exception is raised here."""
        if not 0 < len(calls) <= self.n:
            raise ValueError(f"{len(calls)} calls for {self.n} thread shards")
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            futures = [self._pool.submit(call) for call in calls[1:]]
            first = calls[0]()
            return [first, *(f.result() for f in futures)]
        finally:
            torch.set_num_threads(threads)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def shard_rows(batch: int, n: int) -> list[slice]:
    """``n`` contiguous row ranges of a batch, sizes differing by at most one (no empty one)."""
    bounds = [batch * i // n for i in range(n + 1)]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def sharded_backward(method: ShardableLoss, params: list[torch.nn.Parameter], images: Tensor,
                     labels: Tensor | None, shards: ThreadShards, scale: float = 1.0
                     ) -> tuple[Tensor, dict[str, float]]:
    """The batch's loss and logs, with ``scale`` × its gradient added to ``params``' grads.

    The batch's random numbers are drawn here (``method.loss_draws``), then each shard's
    loss, weighted by its share of the batch, is differentiated on its own thread; the
    shards' gradients are summed in shard order (deterministic for a thread count)."""
    batch = images.shape[0]
    draws = method.loss_draws(images, labels)
    parts = shards.run([functools.partial(_shard, method, params, images, labels, draws, rows, batch, scale)
                        for rows in shard_rows(batch, shards.n)])
    for i, p in enumerate(params):
        grads = [g[i] for _, _, g in parts if g[i] is not None]
        if grads:
            total = functools.reduce(torch.add, grads)
            p.grad = _in_layout(total, p) if p.grad is None else p.grad.add_(total)
    loss = functools.reduce(torch.add, [part_loss for part_loss, _, _ in parts])
    keys = parts[0][1].keys()
    return loss, {k: sum(logs[k] for _, logs, _ in parts) for k in keys}


def _in_layout(grad: Tensor, p: Tensor) -> Tensor:
    """``grad`` with ``p``'s strides, as ``backward()`` leaves a gradient (autograd.grad
    returns e.g. a transposed product as it came; torch's fused AdamW reads its buffers
    by position and ignores strides)."""
    return grad if grad.stride() == p.stride() else torch.empty_like(p).copy_(grad)


def _shard(method: ShardableLoss, params: list[torch.nn.Parameter], images: Tensor, labels: Tensor | None,
           draws: dict[str, Tensor], rows: slice, batch: int, scale: float
           ) -> tuple[Tensor, dict[str, float], tuple[Tensor | None, ...]]:
    """One shard: (its weighted loss, its weighted logs, its parameters' gradients)."""
    share = (rows.stop - rows.start) / batch
    loss, logs = method.loss(images[rows], None if labels is None else labels[rows],
                             draws={k: v[rows] for k, v in draws.items()})
    grads = torch.autograd.grad(loss * (share * scale), params, allow_unused=True)
    return loss.detach() * share, {k: float(v) * share for k, v in logs.items()}, grads


# Rows a shard needs to pay off: the tiny Sphere Encoder's loss and backward at 2 threads,
# whole / sharded, was 1.01 at 8 rows a shard (batch 16), 1.10 at 16 and 1.12 at 32
# (benchmarks/bench_train_options.py --threads 2 --batch B, 16 paired rounds each).
MIN_SHARD_ROWS = 16


def use_thread_shards(enabled: bool, method: Any, device: torch.device, processes: int, mixed_precision: str,
                      compiled: bool, rows: int) -> int:
    """How many thread shards the trainer uses for micro-batches of ``rows``: torch's
    intra-op thread count N when ``train.thread_shards`` is on, the method has
    :class:`ShardableLoss`, the step runs on a CPU in one process without autocast or
    compile (autocast is per thread; a compiled step is one graph) and each shard gets
    at least :data:`MIN_SHARD_ROWS` rows; else 0 (the whole batch on the N threads)."""
    threads = torch.get_num_threads()
    usable = (enabled and isinstance(method, ShardableLoss) and device.type == "cpu" and processes == 1
              and mixed_precision == "no" and not compiled and rows >= MIN_SHARD_ROWS * threads)
    return threads if usable and threads >= 2 else 0
