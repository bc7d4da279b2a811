"""Calling a denoiser with a null class, and classifier-free guidance (CFG), once for
every method and sampler.

The null (unconditional) class is ``labels=None``, or per sample a ``drop`` mask for a
denoiser with the :class:`~spheregen.interfaces.NullMaskDenoiser` capability. For a
denoiser with only the minimal ``forward(x, noise_level, labels)``, :func:`call_denoiser`
splits the batch: kept samples with their labels, dropped ones with ``labels=None``, two
calls whose results are reassembled in the batch's order. The contract's "samples do not
interact" makes that the same function; it costs the same network work.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from spheregen.interfaces import accepts_keyword


def call_denoiser(denoiser: Callable[..., Tensor], x: Tensor, noise_level: Tensor, labels: Tensor | None,
                  drop: Tensor | None = None, noise_level2: Tensor | None = None, **options: Any) -> Tensor:
    """``denoiser(x, noise_level, labels[, noise_level2], **options)`` (B×... -> B×...)
    with the samples where ``drop`` (B bool) is True given the null class: through
    ``drop=`` when the denoiser takes it, else by splitting the batch (module
    docstring). Noise levels are B tensors; ``noise_level2`` is passed only when given
    (a :class:`~spheregen.interfaces.TwoTimeDenoiser`'s second time)."""
    extra = () if noise_level2 is None else (noise_level2,)
    if drop is None or labels is None:
        return denoiser(x, noise_level, labels, *extra, **options)
    if accepts_keyword(denoiser, "drop"):
        return denoiser(x, noise_level, labels, *extra, drop=drop, **options)
    drop = drop.to(device=x.device, dtype=torch.bool)
    kept, dropped = (~drop).nonzero().squeeze(1), drop.nonzero().squeeze(1)
    parts = [denoiser(x[rows], noise_level[rows], lab, *(t[rows] for t in extra), **options)
             for rows, lab in ((kept, labels[kept]), (dropped, None)) if len(rows)]
    return torch.cat(parts)[torch.argsort(torch.cat([kept, dropped]))]


def cfg_mix(cond: Tensor, uncond: Tensor, guidance: float) -> Tensor:
    """The guided output uncond + w·(cond − uncond)."""
    return uncond + guidance * (cond - uncond)


def cfg_passes(guidance: float) -> int:
    """Network passes per image and evaluation: 2 under guidance (> 1), else 1 (for a
    labelled batch: :func:`guided` with ``labels=None`` makes one pass at any guidance)."""
    return 2 if guidance > 1 else 1


# Without autograd on a CPU, guided() evaluates ``fn`` on slices of at most this many
# samples (the contract lets a batch be split: spheregen.interfaces.Denoiser.forward and
# the sampler capabilities there); a ``drop=`` CFG pass then sees twice as many rows.
# Somewhere between 100 and 250 rows a small network's activations leave the cache and
# its largest buffers pass glibc's mmap threshold (at most 32 MB), so every call maps and
# zeroes them afresh: the tiny Sphere Encoder sampled 1.73x as fast at batch 50 as at 250
# before this (benchmarks/bench_sample_batch.py). Other devices, and calls under
# autograd, keep the whole batch.
CPU_MICRO_BATCH = 64


def guided(fn: Callable[..., Tensor], x: Tensor, times: tuple[Tensor | float, ...], labels: Tensor | None,
           guidance: float) -> Tensor:
    """``fn(x, *times, labels)`` under classifier-free guidance ``guidance`` (<= 1: the
    plain conditional call); ``times`` are B tensors, or values every sample shares (a
    float, a 0-d tensor). When ``fn`` takes a null mask (``drop=``) the conditional
    and null passes run as one batch of 2B; otherwise as ``fn(..., labels)`` and
    ``fn(..., None)``. ``fn`` is a denoiser or a method's function of the same shape
    (``velocity``, ``encode_raw``, ``decode``); B×... -> B×.... On a CPU without
    autograd the batch is evaluated :data:`CPU_MICRO_BATCH` samples at a time, so ``fn``
    must treat samples independently (no batch statistics, no random draws); times that
    are not B tensors (a float, a 0-d tensor) are passed to every slice (and to both
    halves of a ``drop=`` batch) as they are. With ``labels=None`` the conditional pass
    would be the null one, so it is one null call whatever ``guidance`` is."""
    b = x.shape[0]
    if x.device.type == "cpu" and not torch.is_grad_enabled() and b > CPU_MICRO_BATCH:
        parts = []
        for i in range(0, b, CPU_MICRO_BATCH):
            rows = slice(i, i + CPU_MICRO_BATCH)
            parts.append(_guided(fn, x[rows], tuple(_rows(t, b, rows) for t in times),
                                 None if labels is None else labels[rows], guidance))
        return torch.cat(parts)
    return _guided(fn, x, times, labels, guidance)


def _rows(t: Any, b: int, rows: slice) -> Any:
    """``t[rows]`` for a per-sample tensor, else ``t`` itself."""
    return t[rows] if _per_sample(t, b) else t


def _per_sample(t: Any, b: int) -> bool:
    """True for a tensor with one entry per sample (leading dim b)."""
    return isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == b


def _twice(t: Any, b: int) -> Any:
    """A per-sample tensor repeated for the null half of a ``drop=`` batch; any other
    time (a float, a 0-d tensor) as it is."""
    return torch.cat([t, t]) if _per_sample(t, b) else t


def _guided(fn: Callable[..., Tensor], x: Tensor, times: tuple[Tensor | float, ...], labels: Tensor | None,
            guidance: float) -> Tensor:
    """:func:`guided` on one batch."""
    if guidance <= 1 or labels is None:
        # Without labels the conditional pass is the null one, and uncond + w·(uncond −
        # uncond) is uncond exactly: one call.
        return fn(x, *times, labels)
    if accepts_keyword(fn, "drop"):
        b = x.shape[0]
        drop = torch.cat([torch.zeros(b, dtype=torch.bool), torch.ones(b, dtype=torch.bool)]).to(x.device)
        both = fn(torch.cat([x, x]), *(_twice(t, b) for t in times), torch.cat([labels, labels]), drop=drop)
        cond, uncond = both.chunk(2)
    else:
        cond, uncond = fn(x, *times, labels), fn(x, *times, None)
    return cfg_mix(cond, uncond, guidance)
