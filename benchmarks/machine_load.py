"""How busy the machine is, without importing torch (the benchmarks settle the OpenMP
environment before torch loads)."""

from __future__ import annotations

import os
import statistics
import time


def busy_elsewhere(samples: int = 7, interval_s: float = 0.05) -> float:
    """Median number of runnable tasks besides this process (Linux /proc/loadavg, sampled
    over ~0.3 s); elsewhere the 1-minute load average. Unlike the load average it does
    not remember this script's own previous runs."""
    try:
        counts = []
        for _ in range(samples):
            with open("/proc/loadavg") as f:
                counts.append(int(f.read().split()[3].split("/")[0]) - 1)
            time.sleep(interval_s)
        return statistics.median(counts)
    except (OSError, ValueError, IndexError):
        return os.getloadavg()[0]
