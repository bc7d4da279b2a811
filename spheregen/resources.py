"""Checks of what the machine can hold, made before any work starts.

An experiment that asks for 10⁹ samples or 100,000-pixel images would otherwise train
for hours and then fail to allocate. These are lower bounds (one sample set in memory,
one float batch with a few activations of its size); a refusal names the estimate.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from spheregen.errors import ConfigError

# a float32 batch lives several times over during a step (input, noise, target,
# prediction, gradients): a floor, not an estimate of the model's activations
BATCH_COPIES = 4


def available_memory(device: torch.device) -> int:
    """Bytes free on ``device``: GPU memory for CUDA, MemAvailable of the host otherwise."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_fits(exp: Any, device: torch.device) -> None:
    """Refuse an experiment whose sample set or largest batch cannot fit, with numbers."""
    c, s = exp.data.channels, exp.data.image_size
    image = c * s * s
    ev = exp.eval
    host = available_memory(torch.device("cpu"))
    samples = 2 * ev.num_samples * image  # the gathered set and the copy written to disk
    if samples > host:
        raise ConfigError(f"{exp.source}: eval.num_samples = {ev.num_samples} images of {c}×{s}×{s} take about "
                          f"{samples / 2**30:,.1f} GiB in memory, {host / 2**30:,.1f} GiB are available; "
                          "lower eval.num_samples or data.image_size")
    batch = max([ev.batch_size, ev.throughput_batch] + [m.train.batch_size for m in exp.methods])
    need = BATCH_COPIES * batch * image * 4
    free = available_memory(device) if device.type != "meta" else host
    if need > free:
        raise ConfigError(f"{exp.source}: a float batch of {batch} images of {c}×{s}×{s} needs at least "
                          f"{need / 2**30:,.1f} GiB on {device}, {free / 2**30:,.1f} GiB are free; lower the batch "
                          "sizes (train.batch_size, eval.batch_size, eval.throughput_batch) or data.image_size")
